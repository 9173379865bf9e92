"""The one typed training configuration, and the errors a user sees. Imports no torch.

Each setting is one field: its default, its help text and its choices live here, and the
command-line options and MLproject parameters are made from (and tested against) them, so a
new setting is one field plus its check in `validate`.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The model variants (built by mnist_mlflow.models, which checks it builds exactly these).
MODEL_CHOICES = {
    "opt": "the seed's 6,132-parameter CNN (Opt-1, Opt-2 with dropout)",
    "gap8k": "wider early layers, 1x1 transition, GAP head (7,580 parameters, < 8k)",
    "gap5k": "gap8k made narrower (4,974 parameters, < 5k)",
    "gap3k": "gap5k made narrower again, width kept early (2,800 parameters, < 3k)",
    "gap3k-late": "under 3k with the width moved after the transition (2,998 parameters)",
}
DEVICES = ("auto", "cpu", "cuda")
PIPELINES = ("fast", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
# step: the seed's StepLR, once per epoch. onecycle: OneCycleLR up to `lr` and down, per step.
SCHEDULERS = ("step", "onecycle")
# Settings that say how a run runs here, not what it learns: a run may be resumed on another
# kind of machine with other values of these.
# --threads auto: each run counts the cores free when it starts (runtime.resolve_threads).
AUTO_THREADS = "auto"
RUNTIME_SETTINGS = ("device", "precision", "compile", "threads", "deterministic")
# Settings added after the first runs were tracked, with what the runs made before did: a run
# without the param ran with this value (for all but val_size, the default).
LATER_SETTINGS: dict[str, object] = {
    "scheduler": "step", "label_smoothing": 0.0, "rotation": 7.0, "translate": 0.0,
    "scale": 0.0, "deterministic": False, "val_size": 0}
# MNIST's training images; --val-size holds some of them out.
MNIST_TRAIN_IMAGES = 60_000
# torch.manual_seed takes seeds in [-2**63, 2**64); ours are non-negative, and epoch seeds
# (seed * 1_000_003 + epoch) must stay in range too.
MAX_SEED = (2**64 - 1) // 1_000_003 - 1_000


# How a setting that differs from its default reads in names (`e15` for 15 epochs); the
# scheduler and the pipeline read as their value alone (`onecycle`).
SHORT_NAMES = {"epochs": "e", "lr": "lr", "batch_size": "b", "momentum": "m", "step_size": "step",
               "gamma": "g", "weight_decay": "wd", "scheduler": "", "label_smoothing": "ls",
               "rotation": "rot", "translate": "shift", "scale": "zoom", "pipeline": "",
               "val_size": "val", "train_limit": "n", "test_limit": "t"}


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data); shown as one line, no traceback."""


class DiskFull(Exception):
    """A disk filled while runs wrote a checkpoint, the model or its records: they ended
    FAILED with the checkpoints of their earlier epochs intact; free space, then resume."""


class ServerAway(Exception):
    """The tracking server did not answer through MLflow's retries: the runs being trained
    stopped (KILLED, if the server could be told) and can be resumed once it is back.
    `what` says what happened, `command` resumes (a sweep puts its own in place)."""

    def __init__(self, what: str, command: str) -> None:
        super().__init__(what, command)
        self.what = what
        self.command = command

    def __str__(self) -> str:
        return f"{self.what}; once the server is back, resume with: {self.command}"


# What a full disk or quota raises.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def mount_of(path: Path | str) -> str:
    """The mount point holding `path` (or the nearest folder of it that exists), and its free
    space: which disk to clear."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = os.statvfs(folder)
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return f"{folder}, {free.f_bavail * free.f_frsize / 2**20:.1f} MiB free"


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite at `step` (a batch of the epoch)."""

    def __init__(self, loss: float, step: int, steps: int, exact: bool = True) -> None:
        super().__init__(loss, step, steps, exact)
        self.loss = loss
        self.step = step
        self.steps = steps
        # On CUDA the loss is checked every few steps only: it went bad at `step` or before.
        self.exact = exact
        self.epoch = 0  # filled in by `fit`, which knows the epoch

    def __str__(self) -> str:
        where = "at" if self.exact else "by"
        return (f"non-finite training loss ({self.loss}) in epoch {self.epoch}, "
                f"{where} step {self.step} of {self.steps}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends KILLED with what it had logged.

    `mlflow run` answers Ctrl-C by sending SIGTERM to the entry point.
    """

    exit_code = 143


def raise_terminated(_signum: int, _frame: object) -> None:
    """The SIGTERM handler of a process that trains (the CLI, a sweep's worker)."""
    raise Terminated("SIGTERM")


def shown_value(value: object) -> str:
    """A setting as people write it: floats without trailing zeros (0.05, 0, 1e-05)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A TrainConfig field with the help text (and choices) of its command-line option."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides what a training run learns (defaults are the seed's)."""

    model: str = setting("opt", "Model variant: " + "; ".join(
        f"{name}: {what}" for name, what in MODEL_CHOICES.items()) + ".", tuple(MODEL_CHOICES))
    dropout: float = setting(0.0, "Dropout probability after each conv block but the first, "
                                  "in [0, 1).")
    epochs: int = setting(20, "Training epochs.")
    lr: float = setting(0.01, "SGD learning rate (OneCycleLR: the peak rate).")
    batch_size: int = setting(64, "Training batch size.")
    momentum: float = setting(0.9, "SGD momentum, in [0, 1).")
    step_size: int = setting(10, "StepLR: epochs between learning-rate decays.")
    gamma: float = setting(0.1, "StepLR: factor of each decay, in (0, 1].")
    weight_decay: float = setting(0.0, "SGD weight decay (L2).")
    scheduler: str = setting("step", "The seed's StepLR (per epoch), or OneCycleLR (per batch, "
                                     "up to --lr in the first 30%, then down).", SCHEDULERS)
    label_smoothing: float = setting(0.0, "Label smoothing of the training loss, in [0, 1).")
    rotation: float = setting(7.0, "Random rotation of training images within ± this many "
                                   "degrees.")
    translate: float = setting(0.0, "Random shift up to this fraction of the image size "
                                    "(RandomAffine).")
    scale: float = setting(0.0, "Random zoom by a factor in [1 - s, 1 + s] (RandomAffine).")
    seed: int = setting(1, "Seed of initialization, data order, augmentation and dropout.")
    device: str = setting("auto", "auto picks CUDA when available.", DEVICES)
    pipeline: str = setting("fast", "Input pipeline: fast (MNIST resident on the device) or "
                                    "torchvision (the seed's DataLoader).", PIPELINES)
    precision: str = setting("auto", "bf16 autocast for training; auto is bf16 on a GPU with "
                                     "native bf16, else fp32. Evaluation is always fp32.",
                             PRECISIONS)
    compile: str = setting("auto", "torch.compile the model; auto compiles (with CUDA graphs) "
                                   "on a GPU that can, not on the CPU, where 'on' is ~13% faster "
                                   "per epoch once its first compile (~35 s) is cached.",
                           COMPILE_MODES)
    threads: str = setting(AUTO_THREADS, "CPU threads for torch: auto (the cores free when "
                                         "the run starts, at least 1; a Ray task its share), a "
                                         "count, or 0 (torch's default: every core, even "
                                         "busy ones).")
    deterministic: bool = setting(False, "Deterministic algorithms "
                                         "(torch.use_deterministic_algorithms), so that a CUDA "
                                         "run repeats exactly; on the CPU runs repeat anyway. "
                                         "With --compile auto, also trains eager.")
    val_size: int = setting(5000, "Hold out N of the 60,000 training images for validation "
                                  "(the same N for every run: a fixed split seed); selection "
                                  "uses them, never the test set. 0: the seed's protocol, "
                                  "no validation.")
    train_limit: int = setting(0, "Train on the first N examples only (0: all, after the "
                                  "validation images are held out).")
    test_limit: int = setting(0, "Evaluate on the first N test examples only (0: all).")

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first bad option; return self when all are fine."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"invalid {f.name}: must be a finite number, got {value!r}")
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise UserError(f"invalid {f.name}: must be one of {', '.join(choices)}, "
                                f"got {value!r}")
        checks = [
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)"),
            ("step_size", self.step_size >= 1, "must be >= 1"),
            ("gamma", 0.0 < self.gamma <= 1.0, "must be in (0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)"),
            ("rotation", 0.0 <= self.rotation <= 180.0, "must be in [0, 180] degrees"),
            ("translate", 0.0 <= self.translate < 0.5, "must be in [0, 0.5) of the image size"),
            ("scale", 0.0 <= self.scale < 1.0, "must be in [0, 1)"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be in [0, {MAX_SEED}]"),
            ("threads", self.threads == AUTO_THREADS or self.threads.isdigit(),
             "must be auto or a count >= 0 (0 keeps torch's default)"),
            ("val_size", 0 <= self.val_size < MNIST_TRAIN_IMAGES,
             f"must be in [0, {MNIST_TRAIN_IMAGES:,}) (0: no validation split)"),
            ("train_limit", 0 <= self.train_limit <= MNIST_TRAIN_IMAGES - self.val_size,
             f"must be in [0, {MNIST_TRAIN_IMAGES - self.val_size:,}] (0 means all; "
             f"{self.val_size:,} of the {MNIST_TRAIN_IMAGES:,} are held out)"),
            ("test_limit", self.test_limit >= 0, "must be >= 0 (0 means all)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"invalid {name}: {rule}, got {getattr(self, name)!r}")
        return self

    def __post_init__(self) -> None:
        # One spelling, whether it came as 1 (Python), "1" (a param) or "Auto" (a user).
        object.__setattr__(self, "threads", str(self.threads).strip().lower())

    def what_it_learns(self) -> TrainConfig:
        """This config with the RUNTIME_SETTINGS at their defaults: equal for two runs that
        learn the same, wherever and however fast they ran."""
        defaults = TrainConfig()
        return dataclasses.replace(self, **{n: getattr(defaults, n) for n in RUNTIME_SETTINGS})

    @property
    def config_group(self) -> str:
        """What the run learns, without its seed, short enough to read where the UI cuts it:
        the model, its dropout when it has one, then each setting that differs from the
        defaults in a few letters (`gap8k e15 lr0.05 onecycle`, `opt d0.05`). Runs that
        differ only in seed, or in how they ran (RUNTIME_SETTINGS), share it."""
        learns, defaults = self.what_it_learns(), TrainConfig()
        differ = [f"{SHORT_NAMES.get(name, name)}{shown_value(getattr(learns, name))}"
                  for name in self.field_names() if name not in ("model", "dropout", "seed")
                  and getattr(learns, name) != getattr(defaults, name)]
        dropout = [f"d{self.dropout:g}"] if self.dropout else []
        return " ".join([self.model, *dropout, *differ])

    @property
    def variant_name(self) -> str:
        """Model and dropout, like `opt-dropout0.05`: what its seeds have in common."""
        return f"{self.model}-dropout{self.dropout:g}"

    @property
    def run_name(self) -> str:
        """The seed first, where the UI's cut spares it, then the configuration:
        `s1 gap8k e15 lr0.05 onecycle`."""
        return f"s{self.seed} {self.config_group}"

    def recipe(self) -> str:
        """The training recipe in a few words: schedule, batch, smoothing, augmentation."""
        if self.scheduler == "onecycle":
            parts = [f"OneCycle to lr {self.lr:g}"]
        else:
            parts = [f"StepLR lr {self.lr:g} ×{self.gamma:g}/{self.step_size} ep"]
        parts.append(f"batch {self.batch_size}")
        if self.weight_decay:
            parts.append(f"wd {self.weight_decay:g}")
        if self.label_smoothing:
            parts.append(f"smoothing {self.label_smoothing:g}")
        augment = [f"rot ±{self.rotation:g}°"] if self.rotation else []
        augment += [f"shift {self.translate:g}"] if self.translate else []
        augment += [f"zoom ±{self.scale:g}"] if self.scale else []
        parts.append(", ".join(augment) or "no augmentation")
        if not self.val_size:
            parts.append("no validation split")
        if self.train_limit or self.test_limit:
            parts.append(f"slice {self.train_limit or 'all'}/{self.test_limit or 'all'}")
        return "; ".join(parts)

    def as_params(self) -> dict[str, object]:
        """All settings as a flat dict."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
