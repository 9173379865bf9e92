"""What the runs hold, named once: tags, metrics, params and artifacts shared by modules, and
the TrainConfig <-> params conversion. Imports no torch, so `compare`, `models` and `promote`
start fast.

A per-epoch metric is one entry of EPOCH_METRICS: the loop measures it, and the log line, the
training curves and the comparison tables take it from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnist_mlflow.config import LATER_SETTINGS, TrainConfig, UserError

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_EXPERIMENT = "mnist-optimization"
DEFAULT_MODEL_NAME = "mnist-cnn"
# The smallest difference worth acting on, in accuracy points: what `compare` plans seeds
# for when its verdict is within noise (`--min-effect`).
DEFAULT_MIN_EFFECT = 0.10

# --- the run record ---------------------------------------------------------------------------
# Every key below is declared with where it is recorded and what it means: the docs' run record
# reference (docs/run-record.md) is generated from RECORD, so it cannot drift from the code.


@dataclass(frozen=True)
class Recorded:
    """One key of what the store records: a tag, param, metric or artifact, and on what."""

    kind: str  # "tag", "param", "metric", "artifact"
    key: str
    on: str  # which records carry it (one of RECORDS)
    meaning: str


# What carries a key: the runs by role, a registered model version, the experiment.
RECORDS = ("every run", "training run", "sweep parent", "comparison run", "reproduction run",
           "model version", "experiment")
RECORD: list[Recorded] = []


def _recorded(kind: str, key: str, on: str, meaning: str) -> str:
    assert on in RECORDS, on
    RECORD.append(Recorded(kind, key, on, meaning))
    return key


def tag(key: str, on: str, meaning: str) -> str:
    return _recorded("tag", key, on, meaning)


def param(key: str, on: str, meaning: str) -> str:
    return _recorded("param", key, on, meaning)


def metric(key: str, on: str, meaning: str) -> str:
    return _recorded("metric", key, on, meaning)


def artifact(key: str, on: str, meaning: str) -> str:
    return _recorded("artifact", key, on, meaning)


# --- tags -------------------------------------------------------------------------------------
# What a run is: training runs are the candidates; sweep parents and comparisons hold no
# training metrics. Filter the UI with `tags.mnist_mlflow.role = 'train'`.
ROLE_TAG = tag("mnist_mlflow.role", "every run",
               "what the run is: `train`, `sweep`, `comparison` or `reproduction`")
TRAIN_ROLE = "train"
SWEEP_ROLE = "sweep"
COMPARISON_ROLE = "comparison"
# A rerun made by `reproduce`: a check of another run, never a candidate.
REPRODUCTION_ROLE = "reproduction"
# MLflow's own: the description shown on run, experiment and model pages.
DESCRIPTION_TAG = tag("mlflow.note.content", "every run",
                      "the description the UI shows: what the run is and how it ended")
# Why a run ended FAILED or KILLED; deleted when a resume goes on with it.
FAILURE_REASON_TAG = tag("failure_reason", "every run",
                         "why the run ended FAILED or KILLED; removed when a resume goes on")
# The lease of a RUNNING run, one tag: `pid 4242 on devbox, heartbeat 1764650000` (Unix
# seconds), rewritten after every epoch.
LEASE_TAG = tag("mnist_mlflow.lease", "every run",
                "while the run trains: `pid P on HOST, heartbeat T`, renewed every epoch; one "
                "run has one trainer")
# Leases written as three tags (host, pid, heartbeat) by older versions: still read, so that
# runs they left RUNNING are found stale.
OLD_LEASE_TAGS = ("mnist_mlflow.lease.host", "mnist_mlflow.lease.pid",
                  "mnist_mlflow.lease.heartbeat")
# What `doctor --repair` found broken on a run or a version, in words: every command leaves
# it out and says this. A tag, never a deletion: remove it once the run is whole again.
BROKEN_TAG = tag("mnist_mlflow.broken", "every run",
                 "set by `mnist-mlflow doctor --repair`: what is missing or wrong; every command "
                 "leaves the run out, saying so")
# On a sweep's parent and every child: the phase the sweep trained (none for --variant sweeps).
PHASE_TAG = tag("mnist_mlflow.phase", "training run",
                "the phase its sweep trained (on the sweep parent too); absent on `--variant` "
                "sweeps")
VARIANT_TAG = tag("variant", "training run",
                  "the model variant: `opt`, `gap8k`, `gap5k`, `gap3k`, `gap3k-late`")
# The run's configuration without its seed, readable (`opt-dropout0.05`, or
# `gap8k-dropout0 lr=0.05 scheduler=onecycle`): the UI's "Group by" puts its seeds together,
# and `compare` aggregates over it.
CONFIG_GROUP_TAG = tag("config_group", "training run",
                       "the configuration without its seed: the UI's Group by, and the group "
                       "`compare` judges")
DROPOUT_ENABLED_TAG = tag("dropout_enabled", "training run", "`true` when dropout > 0")
MNIST_MD5_TAG_PREFIX = tag("mnist_md5.", "training run",
                           "`mnist_md5.<file>`: the MD5 of each MNIST file it read")
RESUMED_AFTER_TAG = tag("resumed_after_epochs", "training run",
                        "the epochs it had when it was last resumed")
RESUMED_ON_TAG = tag("resumed_on", "training run",
                     "where each resumption ran (`after epoch 3: cpu, fp32, eager`)")
COMPILE_FALLBACK_TAG = tag("compile_fallback", "training run",
                           "why compiling failed, when the run went on eager")
# How it ran here: what `--device`, `--precision`, `--compile` and `--threads` resolved to,
# and why. A resumed run may go on elsewhere, so these are tags, not params.
DEVICE_TAG = tag("resolved_device", "training run", "the device it trained on")
PRECISION_TAG = tag("resolved_precision", "training run", "`fp32` or `bf16`")
COMPILED_TAG = tag("resolved_compile", "training run", "whether the model was compiled")
CHANNELS_LAST_TAG = tag("resolved_channels_last", "training run",
                        "whether its tensors were channels_last")
COMPILE_REASON_TAG = tag("compile_reason", "training run", "why `--compile` chose as it did")
PRECISION_REASON_TAG = tag("precision_reason", "training run",
                           "why `--precision` chose as it did")
THREADS_TAG = tag("threads", "training run", "the `--threads` asked for: `auto` or a count")
TORCH_THREADS_TAG = tag("torch_threads", "training run", "the torch threads it used")
THREADS_REASON_TAG = tag("threads_reason", "training run",
                         "why that count (`auto: 1 of 2 cores free ...`)")
TORCH_VERSION_TAG = tag("torch_version", "training run", "torch's version")
TORCHVISION_VERSION_TAG = tag("torchvision_version", "training run", "torchvision's version")
MLFLOW_VERSION_TAG = tag("mlflow_version", "training run", "MLflow's version")
CPU_TAG = tag("cpu_model", "training run", "the CPU's model name")
# Which code a training process ran (codestate.py): "git" or "package", whether tracked
# files had uncommitted changes (their patch is the artifact PATCH_ARTIFACT), the package's
# version. The commit is MLflow's own tag, mlflow.source.git.commit.
CODE_SOURCE_TAG = tag("mnist_mlflow.code.source", "training run",
                      "`git` (the commit is MLflow's `mlflow.source.git.commit`) or `package`")
CODE_DIRTY_TAG = tag("mnist_mlflow.code.dirty", "training run",
                     "`true` when tracked files had uncommitted changes (their patch is an "
                     "artifact)")
CODE_VERSION_TAG = tag("mnist_mlflow.code.version", "training run",
                       "the package's version, when it ran from an installed package")
# On a sweep's child: the seconds it waited SCHEDULED before it began. The UI's Duration
# counts from a run's creation (the sweep creates every child first, and MLflow cannot move a
# run's start), so a child's training time is its Duration less this.
QUEUED_TAG = tag("queued_seconds", "training run",
                 "a sweep child's wait, SCHEDULED, before it began (Duration counts it)")
# On each child of `sweep --stack-seeds`: the seeds trained with it in the same passes.
STACKED_TAG = tag("stacked_seeds", "training run",
                  "the seeds trained with it as one stacked model (`--stack-seeds`)")
# On the run `mlflow run -e main -P resume=ID` creates: the run it resumed.
RESUMES_RUN_TAG = tag("resumes_run_id", "training run",
                      "on the run `mlflow run -P resume=ID` creates: the run it resumed")
# On a sweep's parent: the command that started it, quoted in RESULTS.md.
COMMAND_TAG = tag("mnist_mlflow.command", "sweep parent", "the command that started the sweep")
# On a sweep's parent: how its children ended, by status.
CHILDREN_TAGS = {status: tag(f"children_{status.lower()}", "sweep parent",
                             f"how many children ended {status}")
                 for status in ("FINISHED", "FAILED", "KILLED", "SCHEDULED")}
# On a comparison run: what it chose and did.
CHOSEN_RUN_TAG = tag("chosen_run_id", "comparison run", "the run it chose")
CHOSEN_RUN_NAME_TAG = tag("chosen_run_name", "comparison run", "that run's name")
CHOSEN_GROUP_TAG = tag("chosen_group", "comparison run", "the group it chose")
SELECTED_ON_TAG = tag("selected_on", "comparison run", "`validation` or `test`")
RUN_VERDICT_TAG = tag("verdict", "comparison run", "what it decided, in words")
REGISTERED_MODEL_TAG = tag("registered_model", "comparison run", "the registered model's name")
REGISTERED_VERSION_TAG = tag("registered_version", "comparison run", "the version it registered")
PRODUCTION_ALIAS_TAG = tag("production_alias", "comparison run",
                           "what became of the `production` alias")
# On a run `reproduce` made: the run it reproduces, and the verdict.
REPRODUCES_TAG = tag("mnist_mlflow.reproduces", "reproduction run", "the run it reproduces")
REPRODUCED_EPOCHS_TAG = tag("reproduced_epochs", "reproduction run",
                            "the epochs retrained (`reproduce --epochs`)")
REPRODUCED_CODE_TAG = tag("reproduced_code", "reproduction run",
                          "which code trained it: today's, or the recorded commit and patch")
REPRODUCED_TAG = tag("reproduced", "reproduction run",
                     "the verdict: `identical`, `within-noise` or `differs`")
REPRODUCTION_MEASURE_TAG = tag("reproduction_measure", "reproduction run",
                               "what the verdict measured")
REPRODUCTION_LARGEST_TAG = tag("reproduction_largest", "reproduction run",
                               "the largest difference of each metric, with its epoch")
REPRODUCTION_ENVIRONMENT_TAG = tag("reproduction_environment", "reproduction run",
                                   "how this machine differs from the original's record")
# On a registered version: the verdict that put it there, and what `reproduce` found.
VERSION_GROUP_TAG = tag("group", "model version", "the group promotion judged")
VERSION_GROUP_MEAN_TAG = tag("group_mean", "model version", "that group's mean")
VERSION_GROUP_INTERVAL_TAG = tag("group_interval", "model version",
                                 "its 95% interval over seeds and images")
VERSION_VERDICT_TAG = tag(RUN_VERDICT_TAG, "model version",
                          "`production: ...` or `not production: ...` and why")
COMPARISON_RUN_TAG = tag("comparison_run", "model version", "the comparison run that registered it")
MCNEMAR_NEW_TAG = tag("mcnemar_new", "model version",
                      "validation images only it gets right, against production's model")
MCNEMAR_PRODUCTION_TAG = tag("mcnemar_production", "model version",
                             "validation images only production's model gets right")
MCNEMAR_P_TAG = tag("mcnemar_p", "model version", "McNemar's exact p-value on those images")
# On a production version: the looks at challengers so far, which set the level of the next
# one (stats.Looks).
LOOKS_TAG = tag("challenger_looks", "model version",
                "on production: how many compares brought new challengers")
SEEN_TAG = tag("challengers_seen", "model version",
               "on production: the evidence (runs) already judged; the same runs compared "
               "again are judged as before")
BROKEN_VERSION_TAG = tag(BROKEN_TAG, "model version",
                        "set by `mnist-mlflow doctor --repair`: its source run or model files "
                        "are gone; `promote` refuses it")
REPRODUCED_VERSION_TAG = tag(REPRODUCED_TAG, "model version", "what `reproduce` found")
REPRODUCED_AT_TAG = tag("reproduced_at", "model version", "when, and the run it made")
# The experiment's description and the saved views of the runs table (the UI's own kind).
EXPERIMENT_DESCRIPTION_TAG = tag(DESCRIPTION_TAG, "experiment",
                                 "how to see the training runs, with links to the saved views")
SHARED_VIEW_TAG_PREFIX = tag("mlflow.sharedViewState.", "experiment",
                             "the saved views *Training runs, best first* and *Training runs "
                             "by configuration*")

# What a training run must have recorded to be rebuilt by `reproduce` (besides every setting
# and the MD5 of each MNIST file it read).
RECORD_TAGS = (CODE_SOURCE_TAG, TORCH_VERSION_TAG, DEVICE_TAG, PRECISION_TAG, COMPILED_TAG,
               THREADS_TAG)

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
# The step of the metrics logged once per run (summaries, a sweep parent's counts).
SUMMARY_STEP = 0
for _name, _spec in EPOCH_METRICS.items():
    metric(_name, "training run", f"{_spec.label}: one value per epoch, at step = epoch")
for _name, _spec in SUMMARY_METRICS.items():
    metric(_name, "training run", f"{_spec.label}: one value, logged with the model")
# On a sweep's parent when it ends: how its children did.
CHILDREN_FINISHED = metric("children_finished", "sweep parent", "children that FINISHED")
CHILDREN_NOT_FINISHED = metric("children_not_finished", "sweep parent",
                               "children that FAILED, were KILLED or never began")
BEST_GROUP_VAL_ACC = metric(f"best_group_{FINAL_VAL_ACC}", "sweep parent",
                            f"the best group's mean {FINAL_VAL_ACC} among the finished children")
BEST_CHILD_VAL_ACC = metric(f"best_child_{FINAL_VAL_ACC}", "sweep parent",
                            f"the best {FINAL_VAL_ACC} of a finished child")
MEAN_CHILD_VAL_ACC = metric(f"mean_child_{FINAL_VAL_ACC}", "sweep parent",
                            f"the mean {FINAL_VAL_ACC} over the finished children")

# A comparison's verdict in numbers, on the selection metric: what its Metrics tab and the
# runs tables show. "Against" is production's group, or with no production the runner-up.
CHOSEN_MEAN = metric("chosen_mean", "comparison run", "the chosen group's mean")
CHOSEN_N = metric("chosen_n", "comparison run", "the chosen group's seeds")
CHOSEN_LOW = metric("chosen_low", "comparison run", "the lower end of its mean's 95% interval")
CHOSEN_HIGH = metric("chosen_high", "comparison run", "the upper end of that interval")
AGAINST_MEAN = metric("against_mean", "comparison run",
                      "the mean of what it was judged against: production's group, or with "
                      "no production the runner-up")
AGAINST_N = metric("against_n", "comparison run", "that group's seeds")
DIFFERENCE = metric("difference", "comparison run", "chosen − against, in the metric's units")
DIFFERENCE_LOW = metric("difference_low", "comparison run",
                        "the lower end of the difference's 95% interval (seeds and images)")
DIFFERENCE_HIGH = metric("difference_high", "comparison run", "its upper end")
DIFFERENCE_P = metric("difference_p", "comparison run",
                      "the one-sided p-value that the chosen group is better")


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


artifact(f"{CHECKPOINT_DIR}/{_CHECKPOINT_PREFIX}NNN{_CHECKPOINT_SUFFIX}", "training run",
         "the whole training state after epoch NNN (model, optimizer, scheduler, RNG states), "
         "one file per epoch; `torch.load(path, weights_only=True)`")
artifact(TRAINING_LOG, "training run", "the run's log lines")
artifact(MODEL_SUMMARY, "training run", "the network's layers and parameter counts")
artifact(PATCH_ARTIFACT, "training run", "the uncommitted changes of tracked files, when any")
for _scored in RECORD_SETS:
    artifact(records_artifact(_scored), "training run",
             f"one row per {_scored} image scored by the logged model: `index`, `label`, "
             "`predicted`, `p_predicted`")
artifact(f"{CURVES_DIR}/{CURVES_FILE}", "training run", "the per-epoch curves")
artifact(f"{CURVES_DIR}/{CONFUSION_FILE}", "training run", "the validation confusion matrix")
artifact(f"{CURVES_DIR}/{MISTAKES_FILE}", "training run",
         "the 24 most confident wrong answers on validation")
artifact(f"{CURVES_DIR}/{THUMBS_DIR}/", "training run",
         f"{THUMB_WIDTH}-pixel copies of the figures, shown in the description")
artifact(PLAN_ARTIFACT, "sweep parent",
         "every child's whole configuration, read by `sweep --resume`")
artifact(REPORT_FILE, "comparison run", "the report: tables, differences, verdict")
artifact(REPORT_PLOT, "comparison run", "per-epoch curves, mean over each group's seeds")
artifact(REPORT_PARETO, "comparison run", "test accuracy against parameters, one point a group")
artifact(REPORT_DISAGREEMENTS, "comparison run",
         "validation images the new and production models answer differently")
artifact(CHOSEN_CONFUSION, "comparison run", "the chosen run's confusion matrix")
artifact(CHOSEN_MISTAKES, "comparison run", "the chosen run's most confident mistakes")
artifact(f"{THUMBS_DIR}/", "comparison run", f"{THUMB_WIDTH}-pixel copies of its figures")


# --- params -----------------------------------------------------------------------------------
NUM_PARAMS = "num_params"
# SHA-256 (16 hex digits) of the held-out training indices: equal on runs that validated on
# the same images.
VAL_SPLIT_DIGEST = "val_split_digest"
# Settings recorded as tags, not params: how a run ran, which a resumption may change.
PLUMBING_SETTINGS = ("threads",)
for _field in dataclasses.fields(TrainConfig):
    if _field.name not in PLUMBING_SETTINGS:
        param(_field.name, "training run", _field.metadata["help"])
param(NUM_PARAMS, "training run", "the network's parameter count")
param(VAL_SPLIT_DIGEST, "training run",
      "which training images were held out for validation (runs with equal digests "
      "validated on the same images)")
# A sweep's parent: what it sweeps (besides the settings all its children share, as params).
SWEEP_PARAMS = {
    "variants": "the variants, `model:dropout`", "seeds": "the seeds",
    "phase": "the phase, or `none`", "children": "how many children it planned"}
for _name, _meaning in SWEEP_PARAMS.items():
    param(_name, "sweep parent", _meaning)
# A sweep with --until-decided: how its rounds run, as params of its parent.
SEQUENTIAL_PARAMS = {
    "first_round": "seeds per group in the first round",
    "round_seeds": "seeds added a round to each group still in contention",
    "max_seeds": "the most seeds a group gets", "min_effect": "the smallest difference "
    "worth acting on, in points", "model_name": "the registered model the last compare "
    "registers to"}
for _name, _meaning in SEQUENTIAL_PARAMS.items():
    param(_name, "sweep parent", _meaning)
# Its children: the round each was trained in. Its parent: where the rounds stand.
ROUND_TAG = tag("mnist_mlflow.round", "training run",
                "the round of a `sweep --until-decided` it was trained in")
ROUNDS_TAG = tag("mnist_mlflow.rounds", "sweep parent",
                 "a `sweep --until-decided`: the rounds so far and the call, in words")
ROUNDS_ARTIFACT = "rounds.json"
artifact(ROUNDS_ARTIFACT, "sweep parent",
         "a `sweep --until-decided`: each round's seeds, share of the error allowance, call "
         "and the groups it gave more seeds")
# The round's best group's mean of the selection metric, at step = the round.
ROUND_BEST = metric("round_best_mean", "sweep parent",
                    "a `sweep --until-decided`: the leading group's mean of the selection "
                    "metric after each round (step = the round)")
# A comparison's rule, as params of its run.
COMPARISON_PARAMS = {
    "metric": "the selection metric", "max_params": "the largest network eligible",
    "higher_is_better": "the metric's direction", "filter": "the `--filter` over the runs",
    "candidates": "training runs read", "groups": "groups formed",
    "register": "whether it registered and promoted"}
for _name, _meaning in COMPARISON_PARAMS.items():
    param(_name, "comparison run", _meaning)


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
