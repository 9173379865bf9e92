"""RESULTS.md: one table per phase, from the tracked runs, with the commands that made them.

Runs of a phase are grouped by variant: the same settings but for the seed (and how they
ran: device, threads). Each row gives the variant's worst-of-the-last-3-epochs test accuracy
over its seeds, the figure the "≥ 99.4% at each of the last 3 epochs" target is read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from statistics import mean

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow.comparison import markdown_table, search_all
from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.mlrun import experiment_id
from mnist_mlflow.phases import PHASES
from mnist_mlflow.schema import (
    COMMAND_TAG,
    LAST3_METRIC,
    MEAN_EPOCH_SECONDS,
    NUM_PARAMS,
    PHASE_TAG,
    TEST_ACC,
    settings_from_params,
    settings_of,
)

# The seed's next target: at least this at each of the last 3 epochs, for every seed.
TARGET_ACC = 99.40
TARGET_PARAMS = 8000
TARGET_EPOCHS = 15
TARGET_SEEDS = 3
# Settings that say how a run ran, not what it learned: runs differing only here are pooled.
RUN_ONLY_SETTINGS = ("seed", "device", "threads", "compile", "deterministic")


@dataclass(frozen=True)
class VariantResult:
    """One variant of a phase over its seeds (the latest finished run per seed)."""

    name: str
    settings: dict[str, object]
    num_params: int
    runs: list[Run]

    @property
    def last3(self) -> list[float]:
        return [r.data.metrics[LAST3_METRIC] for r in self.runs]

    def meets_target(self) -> bool:
        return (self.num_params < TARGET_PARAMS and int(self.settings["epochs"]) <= TARGET_EPOCHS
                and len(self.runs) >= TARGET_SEEDS and min(self.last3) >= TARGET_ACC)

    def row(self) -> list[str]:
        metrics = [r.data.metrics for r in self.runs]
        seeds = [int(settings_from_params(settings_of(r))["seed"]) for r in self.runs]
        return [self.name, TrainConfig(**self.settings).recipe(), f"{self.num_params:,}",
                str(self.settings["epochs"]), ",".join(map(str, seeds)),
                f"{mean(self.last3):.2f}", f"{min(self.last3):.2f}",
                " / ".join(f"{v:.2f}" for v in self.last3),
                f"{mean(m[TEST_ACC] for m in metrics):.2f}",
                f"{mean(m[MEAN_EPOCH_SECONDS] for m in metrics):.1f}",
                how_run(self.runs[0]), "yes" if self.meets_target() else "no"]


def how_run(run: Run) -> str:
    """Device and torch threads, like `cpu, 1 thread`."""
    settings = settings_of(run)
    # A tag since runs record how they ran as tags; a param in runs made before.
    device = run.data.tags.get("resolved_device") or settings.get("resolved_device", "?")
    threads = int(float(settings.get("threads", "0")))
    if not threads:
        return device
    return f"{device}, {threads} thread{'s' if threads > 1 else ''}"


def variant_results(runs: Sequence[Run]) -> list[VariantResult]:
    """Runs grouped by variant, first-seen order; per seed only the latest run counts."""
    groups: dict[tuple[tuple[str, object], ...], dict[int, Run]] = {}
    for run in runs:  # oldest first, so a later run of the same seed replaces an earlier one
        settings = settings_from_params(settings_of(run))
        key = tuple((k, v) for k, v in settings.items() if k not in RUN_ONLY_SETTINGS)
        groups.setdefault(key, {})[int(settings["seed"])] = run
    results = []
    for key, by_seed in groups.items():
        settings = dict(key)
        name = TrainConfig(**settings).variant_name
        chosen = [by_seed[seed] for seed in sorted(by_seed)]
        results.append(VariantResult(name, settings, int(chosen[0].data.params[NUM_PARAMS]),
                                     chosen))
    return results


HEADER = ["Variant", "Recipe", "Params", "Epochs", "Seeds", "Last-3 min, mean", "Last-3 min, min",
          "Last-3 min per seed", "Final test acc, mean", "s/epoch", "Device",
          f"Target met (< {TARGET_PARAMS:,}, ≤ {TARGET_EPOCHS} ep, ≥ {TARGET_ACC:.2f}%)"]


def phase_runs(experiment: str) -> dict[str, list[Run]]:
    """FINISHED training runs of `experiment` by phase tag, oldest first."""
    client = MlflowClient()
    by_phase: dict[str, list[Run]] = {}
    for run in search_all(client, experiment_id(experiment, client),
                          "attributes.status = 'FINISHED'"):
        phase = run.data.tags.get(PHASE_TAG)
        if phase and LAST3_METRIC in run.data.metrics and MLFLOW_PARENT_RUN_ID in run.data.tags:
            by_phase.setdefault(phase, []).append(run)
    if not by_phase:
        raise UserError(f"experiment {experiment!r} has no finished runs of a phase; "
                        "train one with `mnist-mlflow sweep --phase NAME`")
    return by_phase


def sweep_commands(runs: Sequence[Run]) -> list[str]:
    """The command of each sweep these runs belong to, in the order they ran, each followed
    by what it trained (a phase may have been redefined since)."""
    client = MlflowClient()
    trained: dict[str, list[Run]] = {}
    for run in runs:
        trained.setdefault(run.data.tags[MLFLOW_PARENT_RUN_ID], []).append(run)
    lines = []
    for parent, children in trained.items():
        command = client.get_run(parent).data.tags.get(COMMAND_TAG) or f"(sweep run {parent})"
        settings = [settings_from_params(settings_of(r)) for r in children]
        variants = dict.fromkeys(TrainConfig(**s).variant_name for s in settings)
        recipes = dict.fromkeys(TrainConfig(**s).recipe() for s in settings)
        lines.append(f"{command}\n    # trained {', '.join(variants)}: {' | '.join(recipes)}")
    return lines


def render_results(experiment: str, command: str) -> str:
    """RESULTS.md for every phase trained in `experiment`."""
    lines = ["# Results", "",
             f"Generated by `{command}` on {datetime.now():%Y-%m-%d %H:%M} from the finished "
             f"runs of experiment `{experiment}`; nothing here is typed by hand.", "",
             f"\"Last-3 min\" is `{LAST3_METRIC}`: a run's lowest test accuracy (%, on all "
             "10,000 test images unless the recipe names a slice) over its last 3 epochs. "
             "Per variant: its mean and minimum over the seeds, and each seed's value. "
             f"\"Target met\": fewer than {TARGET_PARAMS:,} parameters, at most "
             f"{TARGET_EPOCHS} epochs, and last-3 min ≥ {TARGET_ACC:.2f}% for every one of "
             f"at least {TARGET_SEEDS} seeds. s/epoch is training plus evaluation, on the "
             "device and threads shown.", ""]
    defaults = TrainConfig()
    for phase, runs in phase_runs(experiment).items():
        known = PHASES.get(phase)
        lines += [f"## Phase `{phase}`", ""]
        if known:
            lines += [f"{known.description[0].upper()}{known.description[1:]}.", ""]
        rows = [HEADER, *(v.row() for v in variant_results(runs))]
        lines += [markdown_table(rows), "", "Commands:", "", "```",
                  *sweep_commands(runs), "```", ""]
    lines += [f"Defaults (the seed's recipe): StepLR lr {defaults.lr:g} ×{defaults.gamma:g} every "
              f"{defaults.step_size} epochs, SGD momentum {defaults.momentum:g}, batch "
              f"{defaults.batch_size}, rotation ±{defaults.rotation:g}°.", ""]
    return "\n".join(lines)
