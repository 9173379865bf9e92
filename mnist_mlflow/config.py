"""The one typed training configuration: validated once, logged whole as MLflow params."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mnist_mlflow.models import MODELS

DEVICES = ("auto", "cpu", "cuda")
PIPELINES = ("fast", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
# step: the seed's StepLR, once per epoch. onecycle: OneCycleLR up to `lr` and down, per step.
SCHEDULERS = ("step", "onecycle")
# Settings that say how a run runs here, not what it learns: a run may be resumed on another
# kind of machine with other values of these.
RUNTIME_SETTINGS = ("device", "precision", "compile", "threads", "deterministic")
# Settings added after the first runs were tracked, whose defaults are what those runs did:
# a run without the param used the default.
LATER_SETTINGS = ("scheduler", "label_smoothing", "rotation", "translate", "scale",
                  "deterministic")


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data); shown as one line, no traceback."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides what a training run learns (defaults are the seed's)."""

    model: str = "opt"
    dropout: float = 0.0
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    step_size: int = 10
    gamma: float = 0.1
    weight_decay: float = 0.0
    scheduler: str = "step"
    label_smoothing: float = 0.0
    rotation: float = 7.0
    translate: float = 0.0
    scale: float = 0.0
    seed: int = 1
    device: str = "auto"
    pipeline: str = "fast"
    precision: str = "auto"
    compile: str = "auto"
    threads: int = 0
    deterministic: bool = False
    train_limit: int = 0
    test_limit: int = 0

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first bad option; return self when all are fine."""
        checks = [
            ("model", self.model in MODELS, f"must be one of {', '.join(sorted(MODELS))}"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)"),
            ("step_size", self.step_size >= 1, "must be >= 1"),
            ("gamma", 0.0 < self.gamma <= 1.0, "must be in (0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("scheduler", self.scheduler in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)"),
            ("rotation", 0.0 <= self.rotation <= 180.0, "must be in [0, 180] degrees"),
            ("translate", 0.0 <= self.translate < 0.5, "must be in [0, 0.5) of the image size"),
            ("scale", 0.0 <= self.scale < 1.0, "must be in [0, 1)"),
            ("device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
            ("pipeline", self.pipeline in PIPELINES, f"must be one of {', '.join(PIPELINES)}"),
            ("precision", self.precision in PRECISIONS,
             f"must be one of {', '.join(PRECISIONS)}"),
            ("compile", self.compile in COMPILE_MODES,
             f"must be one of {', '.join(COMPILE_MODES)}"),
            ("threads", self.threads >= 0, "must be >= 0 (0 keeps torch's default)"),
            ("train_limit", self.train_limit >= 0, "must be >= 0 (0 means all)"),
            ("test_limit", self.test_limit >= 0, "must be >= 0 (0 means all)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"invalid {name}: {rule}, got {getattr(self, name)!r}")
        return self

    def what_it_learns(self) -> TrainConfig:
        """This config with the RUNTIME_SETTINGS at their defaults: equal for two runs that
        learn the same, wherever and however fast they ran."""
        defaults = TrainConfig()
        return dataclasses.replace(self, **{n: getattr(defaults, n) for n in RUNTIME_SETTINGS})

    @property
    def variant_name(self) -> str:
        """Model and dropout, like `opt-dropout0.05`: what its seeds have in common."""
        return f"{self.model}-dropout{self.dropout:g}"

    @property
    def run_name(self) -> str:
        """The variant name, with `-seed2` for any seed but the default 1."""
        seed = "" if self.seed == 1 else f"-seed{self.seed}"
        return f"{self.variant_name}{seed}"

    def as_params(self) -> dict[str, object]:
        """All settings as a flat dict, ready for `mlflow.log_params`."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
