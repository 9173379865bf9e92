"""What a training run records, in one place: its params and tags, its datasets, a checkpoint
and metrics per epoch, and at its end the summary, curves, per-image records and the model,
written through one `RunRecord` per run (which knows where it is, so a full disk names what it
was writing). The experiment's saved views and description live here too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import platform
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torchvision
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelStatus, RunStatus
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from mnist_mlflow import codestate
from mnist_mlflow.codestate import CodeState
from mnist_mlflow.config import (
    TrainConfig,
    UserError,
)
from mnist_mlflow.data import RAW_FILES, MnistData, Pipeline
from mnist_mlflow.mlrun import MlflowRun, inline_figure, saved_view
from mnist_mlflow.models import InferenceModel, count_parameters, model_summary
from mnist_mlflow.plots import plot_confusion, plot_gallery, plot_training_curves, thumbnail
from mnist_mlflow.records import Records
from mnist_mlflow.runtime import torch_threads
from mnist_mlflow.schema import (
    BEST_EPOCH,
    BEST_TEST_ACC,
    BEST_VAL_ACC,
    BEST_VAL_EPOCH,
    CHECKPOINT_DIR,
    CODE_DIRTY_TAG,
    CODE_SOURCE_TAG,
    CODE_VERSION_TAG,
    CONFIG_GROUP_TAG,
    CONFUSION_FILE,
    CPU_TAG,
    CURVES_DIR,
    CURVES_FILE,
    DESCRIPTION_TAG,
    DROPOUT_ENABLED_TAG,
    FINAL_GAP,
    FINAL_TEST_ACC,
    FINAL_TEST_LOSS,
    FINAL_VAL_ACC,
    LAST3_METRIC,
    LAST_EPOCHS,
    LEGACY_CHECKPOINT,
    MEAN_EPOCH_SECONDS,
    MISTAKES_FILE,
    MLFLOW_VERSION_TAG,
    MNIST_MD5_TAG_PREFIX,
    MODEL_SUMMARY,
    NUM_PARAMS,
    PATCH_ARTIFACT,
    PLUMBING_SETTINGS,
    PREDICTIONS_DIR,
    ROLE_TAG,
    SUMMARY_STEP,
    TEST_ACC,
    THUMBS_DIR,
    TORCH_THREADS_TAG,
    TORCH_VERSION_TAG,
    TORCHVISION_VERSION_TAG,
    TRAIN_ROLE,
    TRAINING_LOG,
    VAL_ACC,
    VAL_SPLIT_DIGEST,
    VARIANT_TAG,
    checkpoint_artifact,
    checkpoint_epoch,
    logged_model_name,
    params_from_config,
    rounded,
)
from mnist_mlflow.training import (
    EpochMetrics,
    TrainState,
    predict,
)

log = logging.getLogger("mnist_mlflow")

# MLflow's UI sorted by time (its default) nests a sweep's children under their parent; filtered
# on the training role and sorted by a metric it lists them flat. Two saved views (the UI's
# "Views") hold that, one with a configuration's seeds grouped (mean and band in the charts).
# They work in place from the Views menu; the description links them too (a new tab).
# The UI orders a view's metric columns by name, whatever order they are selected in: the
# last epoch's test accuracy is shown as `test_acc` (its latest value, the same number as
# final_test_acc), which sorts after the ranking metric. The dataset, the same for every run,
# is left out so that the figures fit beside the Assistant panel the UI opens at 1600 px.
_TRAINING_RUNS = {"searchFilter": f"tags.{ROLE_TAG} = '{TRAIN_ROLE}'",
                  "orderByKey": f"metrics.`{FINAL_VAL_ACC}`", "orderByAsc": False,
                  "selectedColumns": [f"metrics.`{FINAL_VAL_ACC}`", f"metrics.`{TEST_ACC}`",
                                      f"params.`{NUM_PARAMS}`", "attributes.`Models`"]}
BEST_FIRST_ID, BY_CONFIGURATION_ID = "mnist_mlflow_best_first", "mnist_mlflow_by_configuration"
# The UI opens a saved view from its address too (what a description's link can do). It also
# takes the mode from there: a fresh browser would otherwise open the runs in its GenAI mode.
VIEW_LINK = ("#/experiments/{experiment_id}/runs?workflowType=machine_learning"
             "&viewStateShareKey=")
BEST_FIRST_VIEW = "Training runs, best first"
BY_CONFIGURATION_VIEW = "Training runs by configuration"
EXPERIMENT_TAGS = {
    # Its first line is what the experiment's page shows uncut: how to see the training runs.
    DESCRIPTION_TAG: (
        f"**Training runs: Views (top right) → [{BEST_FIRST_VIEW}]({VIEW_LINK}{BEST_FIRST_ID}) "
        f"or [{BY_CONFIGURATION_VIEW}]({VIEW_LINK}{BY_CONFIGURATION_ID})** "
        f"(or filter `tags.{ROLE_TAG} = '{TRAIN_ROLE}'` and sort by a metric: sorted by Created, "
        "a sweep's children fold under their parent).\n\n"
        "Compact MNIST CNNs (the seed's 6,132-parameter net and its GAP successors under 8k and "
        "5k parameters), one training run per variant and seed. Sweep parents and comparison "
        "runs hold no training metrics; Group by `config_group` puts a configuration's seeds "
        "together."),
    **saved_view(BEST_FIRST_ID, BEST_FIRST_VIEW, **_TRAINING_RUNS),
    **saved_view(BY_CONFIGURATION_ID, BY_CONFIGURATION_VIEW, **_TRAINING_RUNS,
                 groupBy={"aggregateFunction": "average", "groupByKeys": [
                     {"mode": "tag", "groupByData": CONFIG_GROUP_TAG}]}),
}
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
)


def _release(package: str) -> str:
    """Installed version without a local tag (2.14.1+cu128 -> 2.14.1), for pip requirements."""
    return version(package).split("+")[0]


def pip_requirements() -> list[str]:
    """Explicit requirements of the logged model (inferring them costs seconds per model)."""
    return [f"torch=={_release('torch')}", f"mlflow=={_release('mlflow')}", "numpy"]


def summary_metrics(history: list[EpochMetrics]) -> dict[str, float]:
    """The run in a few numbers, rounded to what they mean.

    best_test_acc and best_epoch (first epoch reaching it); final_test_acc/loss and final_gap
    (train - test accuracy) at the last epoch, whose model is logged; min_test_acc_last3 (the
    worst of the last 3 epochs: a run that peaks once does not count); mean_epoch_seconds.
    """
    best = max(history, key=lambda m: (m.test_acc, -m.epoch))
    last = history[-1]
    values = {FINAL_TEST_ACC: last.test_acc, FINAL_TEST_LOSS: last.test_loss,
              BEST_TEST_ACC: best.test_acc, BEST_EPOCH: best.epoch,
              FINAL_GAP: last.train_acc - last.test_acc,
              LAST3_METRIC: min(m.test_acc for m in history[-LAST_EPOCHS:]),
              MEAN_EPOCH_SECONDS: sum(m.epoch_seconds for m in history) / len(history)}
    if VAL_ACC in last.values:
        # What selection reads: the logged (last) epoch's, and the best for the record.
        best_val = max(history, key=lambda m: (m.val_acc, -m.epoch))
        values |= {FINAL_VAL_ACC: last.val_acc, BEST_VAL_ACC: best_val.val_acc,
                   BEST_VAL_EPOCH: best_val.epoch}
    return {name: rounded(name, value) for name, value in values.items()}


def settings_record(config: TrainConfig) -> tuple[dict[str, str], dict[str, str]]:
    """`config`'s settings as a run records them, (params, tags): the plumbing settings
    (PLUMBING_SETTINGS) as tags, since a resumed run may go on with others; the rest as
    params. Every run that records settings (a training run, a sweep's child or parent)
    records them through this."""
    settings = params_from_config(config)
    return ({k: v for k, v in settings.items() if k not in PLUMBING_SETTINGS},
            {k: v for k, v in settings.items() if k in PLUMBING_SETTINGS})


def run_params(config: TrainConfig, state: TrainState, data: MnistData) -> dict[str, str]:
    """What the run learns from: the settings and the parameter count. How it ran (device,
    precision, compile, threads, versions) goes in tags: a resumed run may go on elsewhere."""
    params, _ = settings_record(config)
    params[NUM_PARAMS] = str(count_parameters(state.model))
    if config.val_size:
        params[VAL_SPLIT_DIGEST] = data.val_digest
    return params


def run_tags(config: TrainConfig, data: MnistData) -> dict[str, str]:
    tags = {VARIANT_TAG: config.model, CONFIG_GROUP_TAG: config.config_group,
            DROPOUT_ENABLED_TAG: str(config.dropout > 0).lower(),
            TORCH_VERSION_TAG: torch.__version__, TORCHVISION_VERSION_TAG: torchvision.__version__,
            **settings_record(config)[1]}
    tags |= {f"{MNIST_MD5_TAG_PREFIX}{name.removesuffix('.gz')}": md5
             for name, md5 in data.md5s.items()}
    return tags


def mnist_inputs(data: MnistData) -> dict[str, MetaDataset]:
    """MNIST's train, validation and test splits as MLflow datasets, named by the slice used
    and identified by the MD5 of their files (and the held-out indices' digest)."""
    train_files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test_files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    held_out = f"-val{data.val_size}" if data.val_size else ""
    splits = [("train", train_files, data.train_limit, held_out),
              ("test", test_files, data.test_limit, "")]
    if data.val_size:
        splits.insert(1, ("validation", train_files, data.val_size, ""))
    datasets = {}
    for context, (images_file, labels_file), limit, minus in splits:
        md5s = [data.md5s.get(name) or RAW_FILES[name][0] for name in (images_file, labels_file)]
        digest = "".join(md5[:4] for md5 in md5s) + (f"-{limit}" if limit else "")
        name = f"mnist-{context}{minus}" + (f"[:{limit}]" if limit else "")
        if context == "validation":
            digest, name = data.val_digest, f"mnist-validation[{data.val_size}]"
        elif minus:
            digest += f"-{data.val_digest[:8]}"
        with warnings.catch_warnings():
            # Two local-file source types match a path; MLflow picks the same one either way.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(
                str((data.root / "MNIST" / "raw" / images_file).resolve()))
        datasets[context] = MetaDataset(
            source, name=name, digest=digest,
            schema=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28), "images"),
                           TensorSpec(np.dtype(np.int64), (-1,), "labels")]))
    return datasets


def input_example(data: MnistData, count: int = 4) -> np.ndarray:
    """`count` test images, repeated when the test slice has fewer: MLflow exports the model
    with this example, and an example of one image would fix the exported program (and
    every request to it) to batches of one."""
    images, _ = data.test_tensors()
    example = (images[:count].float() / 255).unsqueeze(1).numpy()
    return example[np.arange(count) % len(example)]


def describe(config: TrainConfig, num_params: int, outcome: str) -> str:
    """The run's description: variant, recipe and outcome in a sentence."""
    return (f"{config.variant_name}, seed {config.seed}: {num_params:,} parameters, "
            f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} of "
            f"{config.recipe()}. {outcome}")


# The figures a training run's description shows (small copies, in CURVES_DIR/THUMBS_DIR).
DESCRIBED_FIGURES = (("Training curves", CURVES_FILE), ("Confusion matrix", CONFUSION_FILE),
                     ("Most confident mistakes", MISTAKES_FILE))


def figures(run_id: str) -> str:
    """The run's pictures, small and inline in its description (the UI shows them on the
    run's and its model's pages; under Artifacts they are a click each), each linked to the
    full figure."""
    figure = inline_figure(run_id)
    return "\n\n" + " ".join(figure(alt, f"{CURVES_DIR}/{name}")
                              for alt, name in DESCRIBED_FIGURES)


def checkpoints(client: MlflowClient, run_id: str) -> list[str]:
    """The run's checkpoint artifacts, latest epoch first (a run from before per-epoch
    checkpoints has its one `last.pt`)."""
    found = {a.path: checkpoint_epoch(a.path)
             for a in client.list_artifacts(run_id, CHECKPOINT_DIR) if not a.is_dir}
    latest_first = sorted((path for path, epoch in found.items() if epoch is not None),
                          key=lambda path: found[path], reverse=True)
    return latest_first + [path for path in found if path == LEGACY_CHECKPOINT]


def load_checkpoint(client: MlflowClient, run_id: str) -> dict[str, object]:
    """The run's latest checkpoint that reads whole, loaded without unpickling anything but
    tensors and numbers. One cut short (the disk filled, the server went away as it was
    written) is passed over for the epoch before, which its writer never touched."""
    unreadable = []
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in checkpoints(client, run_id):
            path = client.download_artifacts(run_id, artifact, tmp)
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # truncated or altered: torch says it in many ways
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                unreadable.append(f"{artifact}: {first}")
                continue
            if unreadable:
                log.warning("run %s: %s cannot be read; going on from %s", run_id,
                            "; ".join(unreadable), artifact)
            return loaded
    if not unreadable:
        raise UserError(f"run {run_id} has no checkpoint: it cannot go on; start a new run")
    raise UserError(f"no checkpoint of run {run_id} can be read ({'; '.join(unreadable)}); the "
                    "run cannot go on: start a new run")


def log_missing_epochs(run: MlflowRun, history: list[EpochMetrics]) -> set[int]:
    """Log the checkpointed epochs whose metrics never reached the store (checkpoint is
    first); the epochs the run has metrics for."""
    logged = {m.step for m in run.client.get_metric_history(run.run_id, TEST_ACC)}
    for metrics in history:
        if metrics.epoch not in logged:
            run.log_metrics(metrics.as_metrics(), step=metrics.epoch)
    return logged | {metrics.epoch for metrics in history}


@dataclass
class RunRecord:
    """One run being trained: what it records at its start, after each epoch, at its end."""

    run: MlflowRun
    config: TrainConfig
    state: TrainState
    history: list[EpochMetrics]
    command: str  # resumes it
    tmp: Path
    resumed: bool = False  # goes on from a checkpoint: its finish may have begun before
    ended: bool = False
    writing: str = "its start"  # what it records now: a full disk names it
    checkpointed: int = 0  # the epoch of its latest checkpoint
    # Epochs whose metrics are in the store already: a resume that goes on from an earlier
    # checkpoint (the latest could not be read) trains them again but logs them once.
    logged: set[int] = dataclasses.field(default_factory=set)

    @property
    def num_params(self) -> int:
        return count_parameters(self.state.model)

    def start(self, data: MnistData) -> None:
        self.run.hold_lease()
        self.checkpointed = self.state.epoch  # resumed: the checkpoint it goes on from
        if not self.history:
            _log_start(self.run, self.config, self.state, data, self.tmp)
            log.info("run %s: training %s on %s (%d parameters)", self.run.run_id,
                     self.run.name, self.state.runtime.describe(), self.num_params)
        self.run.describe(describe(self.config, self.num_params, "Training."))

    def epoch(self, metrics: EpochMetrics, trained: TrainState) -> None:
        self.history.append(metrics)
        # Held signals: a checkpoint is never half-written, and the checkpoint goes first,
        # so a resume can log any epoch whose metrics were lost (never one twice).
        with signals_deferred():
            self.writing = checkpoint_artifact(metrics.epoch)
            log_checkpoint(self.run, trained, self.history, self.tmp)
            self.checkpointed = metrics.epoch
            if metrics.epoch not in self.logged:
                self.run.log_metrics(metrics.as_metrics(), step=metrics.epoch,
                                     synchronous=False)
            self.run.heartbeat()

    def finish(self, data: MnistData, pipeline: Pipeline) -> None:
        """The model, its records and pictures, the summary; FINISHED (signals held).

        A finish cut short (kill -9 while it logged, then `--resume`) is completed, not
        repeated: a model it left READY is kept, one left PENDING is deleted, and summary
        metrics it logged are not logged twice.
        """
        run, config = self.run, self.config
        self.writing = "its model, records and pictures"
        run.flush()
        summary = summary_metrics(self.history)
        finished = describe(config, self.num_params, (
            f"Finished: test accuracy {summary[FINAL_TEST_ACC]:.2f}% at the last epoch "
            f"(best {summary[BEST_TEST_ACC]:.2f}% at epoch {summary[BEST_EPOCH]:.0f})."
            )) + figures(run.run_id)
        earlier = run.logged_models() if self.resumed else []
        for model in earlier:
            if model.status != LoggedModelStatus.READY:  # its logging was cut short
                run.client.delete_logged_model(model.model_id)
        ready = [m.model_id for m in earlier if m.status == LoggedModelStatus.READY]
        model_id = _log_artifacts(run, config, self.state, data, pipeline, self.history,
                                  self.tmp, finished, model_id=ready[0] if ready else "")
        logged = set(run.client.get_run(run.run_id).data.metrics) if self.resumed else set()
        # Once, after the model: they are its metrics too, with their datasets.
        run.log_metrics({k: v for k, v in summary.items() if k not in logged},
                        step=SUMMARY_STEP, model_id=model_id, datasets=measured_on(data))
        run.describe(finished)
        run.end(RunStatus.FINISHED)
        self.ended = True

    def stop(self, status: int, reason: str, outcome: str) -> None:
        """End the run KILLED or FAILED with `reason` (signals held), unless it ended."""
        if not self.ended:
            with signals_deferred(deliver=False):
                end_run(self.run, status, reason, describe(self.config, self.num_params, outcome))
            self.ended = True


@contextlib.contextmanager
def signals_deferred(deliver: bool = True) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM until the block is done; yields the list of those caught.

    Then deliver the first one as usual, or, with `deliver=False`, leave it to the caller.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught  # only the main thread receives signals (and may set handlers)
        return
    previous = {signum: signal.signal(signum, lambda got, _frame: caught.append(got))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if caught and deliver:
            signal.raise_signal(caught[0])  # now handled by the restored handler


def log_checkpoint(run: MlflowRun, state: TrainState, history: list[EpochMetrics],
                   tmp: Path) -> None:
    """Log the state after the latest epoch as the run's `checkpoints/epoch-NNN.pt`.

    A new file each epoch, so the one before is never touched; one cut short is removed
    (a full disk leaves no half checkpoint behind). Serialised in memory first: a disk that
    fills then says so (errno and file), where torch.save says "file write failed".
    """
    artifact = checkpoint_artifact(state.epoch)
    buffer = io.BytesIO()
    torch.save({"state": state.state_dict(), "history": [m.to_record() for m in history]},
               buffer)
    path = tmp / Path(artifact).name
    try:
        try:
            path.write_bytes(buffer.getbuffer())
        except OSError as err:  # says which file: the temporary folder's disk, not the store's
            raise OSError(err.errno, err.strerror, str(path)) from err
        run.log_artifact(path, CHECKPOINT_DIR)
    except BaseException:
        run.discard_artifact(artifact)
        raise
    finally:
        path.unlink(missing_ok=True)


def code_tags(code: CodeState) -> dict[str, str]:
    """What the run records of the code that trains it (the patch goes as an artifact)."""
    tags = {CODE_SOURCE_TAG: code.source, CODE_VERSION_TAG: code.version}
    if code.source == "git":
        tags |= {MLFLOW_GIT_COMMIT: code.commit, CODE_DIRTY_TAG: str(code.dirty).lower()}
    return tags


def environment_tags(threads: int) -> dict[str, str]:
    """Where it runs, beyond device and precision: what `reproduce` compares."""
    with torch_threads(threads):
        count = torch.get_num_threads()
    return {MLFLOW_VERSION_TAG: _release("mlflow"), CPU_TAG: cpu_model(),
            TORCH_THREADS_TAG: str(count)}


def cpu_model() -> str:
    """The processor's model name, as /proc/cpuinfo says it (else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _log_start(run: MlflowRun, config: TrainConfig, state: TrainState, data: MnistData,
               tmp: Path) -> None:
    run.log_new_params(run_params(config, state, data))
    run.set_tags({**run_tags(config, data), **state.runtime.tags()})
    code = codestate.current()  # git's answer takes a moment: the settings are in first
    run.set_tags({**code_tags(code), **environment_tags(state.runtime.threads)})
    if code.dirty:
        patch = tmp / Path(PATCH_ARTIFACT).name
        patch.write_text(code.patch)
        run.log_artifact(patch, str(Path(PATCH_ARTIFACT).parent))
    run.log_inputs(mnist_inputs(data))


def image_records(model: torch.nn.Module, pipeline: Pipeline, data: MnistData
                  ) -> dict[str, Records]:
    """The model's answer on every scored image: validation (where held out) and test."""
    records = {}
    scored = [("test", pipeline.test_batches(), *data.test_tensors())]
    if pipeline.num_val:
        scored.insert(0, ("validation", pipeline.val_batches(), *data.val_tensors()))
    for name, batches, _images, labels in scored:
        predicted, confidence = predict(model, batches)
        index = data.val_indices if name == "validation" else torch.arange(len(labels))
        records[name] = Records(index.numpy().astype(np.int64), labels.numpy().astype(np.int64),
                                predicted.numpy().astype(np.int64), confidence.numpy())
    return records


# The most confident mistakes shown per run (the gallery's grid is 8 wide).
GALLERY_SIZE = 24


def _log_records(run: MlflowRun, config: TrainConfig, records: dict[str, Records],
                 data: MnistData, tmp: Path) -> None:
    """The per-image records, then a confusion matrix and the most confident mistakes of
    the validation images (the test images for a run without a split)."""
    for scored, found in records.items():
        run.log_artifact(found.write(tmp / f"{scored}.parquet"), PREDICTIONS_DIR)
    scored = "validation" if "validation" in records else "test"
    shown = records[scored]
    images = (data.train if scored == "validation" else data.test).data.numpy()
    title = f"{config.run_name}, {scored} images, last epoch"
    run.log_artifact(plot_confusion(shown.label, shown.predicted, tmp / CONFUSION_FILE, title),
                     CURVES_DIR)
    worst = shown.mistakes(GALLERY_SIZE)
    captions = [f"#{shown.index[i]}\n{shown.label[i]} → {shown.predicted[i]} "
                f"p {shown.p_predicted[i]:.2f}" for i in worst]
    run.log_artifact(plot_gallery(images[shown.index[worst]], captions, tmp / MISTAKES_FILE,
                                  f"{title}: the {len(worst)} most confident mistakes "
                                  "(image row: true → answer, probability)"), CURVES_DIR)


def measured_on(data: MnistData) -> dict[str, tuple[str, str]]:
    """Summary metric -> (dataset name, digest) of the MNIST slice it was measured on."""
    inputs = mnist_inputs(data)
    on = {context: (dataset.name, dataset.digest) for context, dataset in inputs.items()}
    found = {name: on["test"] for name in (FINAL_TEST_ACC, FINAL_TEST_LOSS, BEST_TEST_ACC,
                                            LAST3_METRIC)}
    if "validation" in on:
        found |= {FINAL_VAL_ACC: on["validation"], BEST_VAL_ACC: on["validation"]}
    return found


def _log_artifacts(run: MlflowRun, config: TrainConfig, state: TrainState, data: MnistData,
                   pipeline: Pipeline, history: list[EpochMetrics], tmp: Path,
                   description: str, model_id: str = "") -> str:
    """Curves, records and their pictures, summary, log; then the model (its id), logged as
    made at the last epoch, unless `model_id` names the one already logged."""
    plot = plot_training_curves(history, tmp / CURVES_FILE, config.run_name)
    run.log_artifact(plot, CURVES_DIR)
    _log_records(run, config, image_records(state.model, pipeline, data), data, tmp)
    for _, name in DESCRIBED_FIGURES:
        run.log_artifact(thumbnail(tmp / name), f"{CURVES_DIR}/{THUMBS_DIR}")
    summary = tmp / MODEL_SUMMARY
    summary.write_text(model_summary(state.model))
    run.log_artifact(summary)
    run.log_artifact(tmp / TRAINING_LOG)
    if model_id:
        return model_id
    # Served as plain NCHW: channels_last is a training-speed setting (and torch.export's
    # packaging warns about NHWC weights).
    net = copy.deepcopy(state.model).cpu().to(memory_format=torch.contiguous_format).eval()
    # Named for the variant, made at the last epoch (whose metrics MLflow copies onto it).
    name = logged_model_name(run.client.get_run(run.run_id).info.run_name)
    return run.log_pytorch_model(InferenceModel(net).eval(), name=name,
                                 step=history[-1].epoch, description=description,
                                 signature=SIGNATURE, input_example=input_example(data),
                                 pip_requirements=pip_requirements())


def end_run(run: MlflowRun, status: int, reason: str, description: str) -> None:
    """End the run with `status`, recording why; metrics already logged stay."""
    try:
        run.describe(description)
    finally:
        run.end(status, reason)
