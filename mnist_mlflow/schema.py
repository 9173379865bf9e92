"""What the runs hold, named once: tags, metrics, params and artifacts shared by modules, and
the TrainConfig <-> params conversion. Imports no torch, so `compare`, `models` and `promote`
start fast.

A per-epoch metric is one entry of EPOCH_METRICS: the loop measures it, and the log line, the
training curves and the comparison tables take it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnist_mlflow.config import LATER_SETTINGS, TrainConfig, UserError

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_EXPERIMENT = "mnist-optimization"
DEFAULT_MODEL_NAME = "mnist-cnn"

# --- tags -------------------------------------------------------------------------------------
# What a run is: training runs are the candidates; sweep parents and comparisons hold no
# training metrics. Filter the UI with `tags.mnist_mlflow.role = 'train'`.
ROLE_TAG = "mnist_mlflow.role"
TRAIN_ROLE = "train"
SWEEP_ROLE = "sweep"
COMPARISON_ROLE = "comparison"
# A rerun made by `reproduce`: a check of another run, never a candidate.
REPRODUCTION_ROLE = "reproduction"
# On a sweep's parent and every child: the phase the sweep trained (empty for --variant sweeps).
PHASE_TAG = "mnist_mlflow.phase"
# On a sweep's parent: the command that started it, quoted in RESULTS.md.
COMMAND_TAG = "mnist_mlflow.command"
# Why a run ended FAILED or KILLED; deleted when a resume goes on with it.
FAILURE_REASON_TAG = "failure_reason"
RESUMED_AFTER_TAG = "resumed_after_epochs"
RESUMED_ON_TAG = "resumed_on"
# On the run `mlflow run -e main -P resume=ID` creates: the run it resumed.
RESUMES_RUN_TAG = "resumes_run_id"
COMPILE_FALLBACK_TAG = "compile_fallback"
# Which code a training process ran (codestate.py): "git" or "package", whether tracked
# files had uncommitted changes (their patch is the artifact PATCH_ARTIFACT), the package's
# version. The commit is MLflow's own tag, mlflow.source.git.commit.
CODE_SOURCE_TAG = "mnist_mlflow.code.source"
CODE_DIRTY_TAG = "mnist_mlflow.code.dirty"
CODE_VERSION_TAG = "mnist_mlflow.code.version"
# Where it ran, beside the torch versions and the resolved_* tags: what reproduce compares.
MLFLOW_VERSION_TAG, CPU_TAG, TORCH_THREADS_TAG = "mlflow_version", "cpu_model", "torch_threads"
# On a run `reproduce` made: the run it reproduces, the epochs compared, and the verdict.
REPRODUCES_TAG = "mnist_mlflow.reproduces"
# On the rerun and on a registered version reproduced: the verdict, and when (with the run).
REPRODUCED_TAG, REPRODUCED_AT_TAG = "reproduced", "reproduced_at"
VARIANT_TAG = "variant"
# On a sweep's child: the seconds it waited SCHEDULED before it began. The UI's Duration
# counts from a run's creation (the sweep creates every child first, and MLflow cannot move a
# run's start), so a child's training time is its Duration less this.
QUEUED_TAG = "queued_seconds"
# On each child of `sweep --stack-seeds`: the seeds trained with it in the same passes.
STACKED_TAG = "stacked_seeds"
# The run's configuration without its seed, readable (`opt-dropout0.05`, or
# `gap8k-dropout0 lr=0.05 scheduler=onecycle`): the UI's "Group by" puts its seeds together,
# and `compare` aggregates over it.
CONFIG_GROUP_TAG = "config_group"
MNIST_MD5_TAG_PREFIX = "mnist_md5."
CHOSEN_RUN_TAG = "chosen_run_id"
# The lease of a RUNNING run, one tag (three came first in the UI's tag list):
# `pid 4242 on devbox, heartbeat 1764650000` (Unix seconds), rewritten after every epoch.
LEASE_TAG = "mnist_mlflow.lease"
# The three tags it replaced (host, pid, heartbeat): still read, for runs left RUNNING by
# code from before.
OLD_LEASE_TAGS = ("mnist_mlflow.lease.host", "mnist_mlflow.lease.pid",
                  "mnist_mlflow.lease.heartbeat")
# MLflow's own: the description shown on run, experiment and model pages.
DESCRIPTION_TAG = "mlflow.note.content"

# --- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """How a metric reads: its label, its unit, and the digits that mean something."""

    label: str
    kind: str  # "loss", "accuracy", "rate", "seconds", "epoch": plots put a kind in one panel
    digits: int

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "accuracy"

    def format(self, value: float) -> str:
        """As the log line and tables print it: `99.21%`, `0.0312`, `0.01`, `13.2s`."""
        if self.kind == "rate":
            return f"{value:.6g}"
        suffix = {"accuracy": "%", "seconds": "s"}.get(self.kind, "")
        sign = "+" if self.kind == "gap" else ""
        return f"{value:{sign}.{self.digits}f}{suffix}"


TRAIN_LOSS, TRAIN_ACC, TEST_LOSS, TEST_ACC = "train_loss", "train_acc", "test_loss", "test_acc"
VAL_LOSS, VAL_ACC = "val_loss", "val_acc"
LR, EPOCH_SECONDS = "lr", "epoch_seconds"
# One value per epoch, at step = epoch (1-based). Accuracies in percent: 0.01 is one image in
# 10,000; losses to 1e-4. Validation metrics only where the run holds out a split.
EPOCH_METRICS: dict[str, MetricSpec] = {
    TRAIN_LOSS: MetricSpec("Training loss", "loss", 4),
    TRAIN_ACC: MetricSpec("Training accuracy (%)", "accuracy", 2),
    VAL_LOSS: MetricSpec("Validation loss", "loss", 4),
    VAL_ACC: MetricSpec("Validation accuracy (%)", "accuracy", 2),
    TEST_LOSS: MetricSpec("Test loss", "loss", 4),
    TEST_ACC: MetricSpec("Test accuracy (%)", "accuracy", 2),
    LR: MetricSpec("Learning rate", "rate", 6),
    EPOCH_SECONDS: MetricSpec("Seconds per epoch", "seconds", 1),
}

# The ">= 99.4% at each of the last 3 epochs" target is read off LAST3_METRIC.
LAST_EPOCHS = 3
LAST3_METRIC = f"min_test_acc_last{LAST_EPOCHS}"
BEST_TEST_ACC, BEST_EPOCH, FINAL_GAP = "best_test_acc", "best_epoch", "final_gap"
FINAL_TEST_ACC, FINAL_TEST_LOSS = "final_test_acc", "final_test_loss"
FINAL_VAL_ACC, BEST_VAL_ACC, BEST_VAL_EPOCH = "final_val_acc", "best_val_acc", "best_val_epoch"
MEAN_EPOCH_SECONDS = "mean_epoch_seconds"
# The summary metrics that per-image records measure, with the set they score: their
# intervals count images as well as seeds.
RECORDED_METRICS = {FINAL_VAL_ACC: "validation", FINAL_TEST_ACC: "test"}
# One value per run, at step 0 (the UI draws them as bars, one per run), rounded as they read.
SUMMARY_METRICS: dict[str, MetricSpec] = {
    FINAL_VAL_ACC: MetricSpec("Validation accuracy, last epoch (%)", "accuracy", 2),
    BEST_VAL_ACC: MetricSpec("Best validation accuracy (%)", "accuracy", 2),
    BEST_VAL_EPOCH: MetricSpec("Epoch of the best validation accuracy", "epoch", 0),
    FINAL_TEST_ACC: MetricSpec("Test accuracy, last epoch (%)", "accuracy", 2),
    FINAL_TEST_LOSS: MetricSpec("Test loss, last epoch", "loss", 4),
    BEST_TEST_ACC: MetricSpec("Best test accuracy (%)", "accuracy", 2),
    BEST_EPOCH: MetricSpec("Epoch of the best test accuracy", "epoch", 0),
    FINAL_GAP: MetricSpec("Train − test accuracy, last epoch (points)", "gap", 2),
    LAST3_METRIC: MetricSpec(f"Worst test accuracy of the last {LAST_EPOCHS} epochs (%)",
                             "accuracy", 2),
    MEAN_EPOCH_SECONDS: MetricSpec("Mean seconds per epoch", "seconds", 2),
}
METRICS = {**EPOCH_METRICS, **SUMMARY_METRICS}
SUMMARY_STEP = 0


def rounded(name: str, value: float) -> float:
    """`value` to the digits metric `name` means (unknown metrics unchanged)."""
    spec = METRICS.get(name)
    return value if spec is None else round(value, spec.digits)


def higher_is_better(metric: str) -> bool:
    """Whether higher is better for `metric`: accuracies up; losses, gaps and seconds down."""
    spec = METRICS.get(metric)
    if spec is not None:
        return spec.higher_is_better
    return not any(word in metric for word in ("loss", "gap", "seconds"))


# --- artifacts --------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoints"
# Runs made before per-epoch checkpoints have one, replaced after each epoch; still resumed.
LEGACY_CHECKPOINT = f"{CHECKPOINT_DIR}/last.pt"
_CHECKPOINT_PREFIX, _CHECKPOINT_SUFFIX = "epoch-", ".pt"


def checkpoint_artifact(epoch: int) -> str:
    """The run artifact holding the whole training state after `epoch`. Each epoch has its
    own: a write cut short (a full disk, a server gone) never damages the one before."""
    return f"{CHECKPOINT_DIR}/{_CHECKPOINT_PREFIX}{epoch:03d}{_CHECKPOINT_SUFFIX}"


def checkpoint_epoch(artifact: str) -> int | None:
    """The epoch of a `checkpoint_artifact` path; None for any other path."""
    name = artifact.removeprefix(f"{CHECKPOINT_DIR}/")
    number = name.removeprefix(_CHECKPOINT_PREFIX).removesuffix(_CHECKPOINT_SUFFIX)
    if name == artifact or not name.startswith(_CHECKPOINT_PREFIX) or not number.isdigit():
        return None
    return int(number)


TRAINING_LOG = "training.log"
CURVES_DIR = "plots"
# Beside a figure, its small copy (THUMB_WIDTH pixels wide): what a description shows inline,
# linked to the full figure (MLflow's renderer drops width attributes, and a full-size
# figure widens the run page past the window).
THUMBS_DIR, THUMB_WIDTH = "thumbs", 440
CURVES_FILE = "training_curves.png"
MODEL_SUMMARY = "model_summary.txt"
PATCH_ARTIFACT = "code/uncommitted.patch"
# A sweep parent's list of every child's whole configuration, read by --resume.
PLAN_ARTIFACT = "sweep_plan.json"
REPORT_FILE = "comparison.md"
REPORT_PLOT = "comparison.png"
REPORT_PARETO = "comparison_pareto.png"
# Per-image records of the logged model (records.py), one file per scored set, and the
# pictures drawn from them.
PREDICTIONS_DIR = "predictions"
RECORD_SETS = ("validation", "test")
CONFUSION_FILE = "confusion_matrix.png"
MISTAKES_FILE = "confident_mistakes.png"
REPORT_DISAGREEMENTS = "disagreements.png"
# The chosen run's own pictures, copied beside the comparison's report.
CHOSEN_CONFUSION = f"chosen_{CONFUSION_FILE}"
CHOSEN_MISTAKES = f"chosen_{MISTAKES_FILE}"


def records_artifact(scored: str) -> str:
    """Where a run keeps its per-image records of `scored` ("validation" or "test")."""
    return f"{PREDICTIONS_DIR}/{scored}.parquet"


# --- params -----------------------------------------------------------------------------------
NUM_PARAMS = "num_params"
# SHA-256 (16 hex digits) of the held-out training indices: equal on runs that validated on
# the same images.
VAL_SPLIT_DIGEST = "val_split_digest"
# Settings recorded as tags, not params: how a run ran, which a resumption may change.
PLUMBING_SETTINGS = ("threads",)


def logged_model_name(run_name: str) -> str:
    """A run's logged model is named for the run, as MLflow allows (no '.', spaces, '#')."""
    return "".join(c if c.isalnum() or c in "-_" else {".": "_"}.get(c, "-")
                   for c in run_name.replace(" #", "-")).strip("-")


def param_text(value: object) -> str:
    """A setting as a param: booleans as `mlflow run` writes them (`false`), so a setting
    reads the same whichever command started the run."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def params_from_config(config: TrainConfig) -> dict[str, str]:
    """Every setting as an MLflow param (strings, as MLflow stores them)."""
    return {name: param_text(value) for name, value in config.as_params().items()}


def settings_of(run: Run) -> dict[str, str]:
    """A run's settings as strings: its params, and the plumbing settings kept as tags."""
    tags = {k: run.data.tags[k] for k in PLUMBING_SETTINGS if k in run.data.tags}
    return {**tags, **run.data.params}


def settings_from_params(params: Mapping[str, str]) -> dict[str, object]:
    """The TrainConfig settings among a run's params, typed (not validated)."""
    defaults = TrainConfig()
    params = {**{k: str(v) for k, v in LATER_SETTINGS.items()}, **params}
    settings: dict[str, object] = {}
    for name in TrainConfig.field_names():
        if name not in params:
            continue
        kind, text = type(getattr(defaults, name)), params[name]
        if kind is bool:
            settings[name] = text.strip().lower() in ("true", "1", "yes", "on")
        else:
            # `mlflow run` logs -P values as typed (say epochs "20.0"), hence int via float.
            settings[name] = int(float(text)) if kind is int else kind(text)
    return settings


def config_from_params(run_id: str, params: Mapping[str, str],
                       given: Mapping[str, object]) -> TrainConfig:
    """Run `run_id`'s TrainConfig from its params; UserError when `given` contradicts one."""
    settings = settings_from_params(params)
    # How it ran is no part of what it learns: a run killed between logging its params and
    # its tags (threads is one) resumes with the default, or what the user gives.
    defaults = TrainConfig()
    settings |= {name: getattr(defaults, name) for name in PLUMBING_SETTINGS
                 if name not in settings}
    missing = [name for name in TrainConfig.field_names() if name not in settings]
    if missing:
        raise UserError(f"run {run_id} has no param {missing[0]!r}: it is not a training run")
    for name, value in given.items():
        if value != settings[name]:
            raise UserError(f"--{name.replace('_', '-')} {value} conflicts with run "
                            f"{run_id}, which has {name} {settings[name]}; "
                            "leave it out to resume")
    return TrainConfig(**settings).validate()
