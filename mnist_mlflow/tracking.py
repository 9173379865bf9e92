"""One training run as one MLflow run: params, per-epoch metrics, plots, log, model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.entities import Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from mnist_mlflow.config import LATER_SETTINGS, RUNTIME_SETTINGS, TrainConfig, UserError
from mnist_mlflow.data import MnistData, Pipeline, build_pipeline, load_mnist
from mnist_mlflow.models import InferenceModel, count_parameters, model_summary
from mnist_mlflow.plots import plot_training_curves
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import EpochMetrics, TrainState, create_state, fit

log = logging.getLogger("mnist_mlflow")

DEFAULT_EXPERIMENT = "mnist-optimization"
MODEL_NAME_IN_RUN = "model"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
# An HTTP tracking server that does not accept a connection within this is reported as down.
STORE_CONNECT_TIMEOUT_S = 5.0
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


@dataclass(frozen=True)
class RunResult:
    run_id: str
    history: list[EpochMetrics]


# The ">= 99.4% at each of the last 3 epochs" target is read off this metric.
LAST_EPOCHS = 3
LAST3_METRIC = f"min_test_acc_last{LAST_EPOCHS}"


def summary_metrics(history: list[EpochMetrics]) -> dict[str, float]:
    """The run in a few numbers.

    best_test_acc and best_epoch (first epoch reaching it); final_gap (train - test accuracy
    at the last epoch); min_test_acc_last3 (the worst of the last 3 epochs: a run that peaks
    once does not count); mean_epoch_seconds (training plus evaluation).
    """
    best = max(history, key=lambda m: (m.test_acc, -m.epoch))
    last = history[-1]
    return {"best_test_acc": best.test_acc, "best_epoch": best.epoch,
            "final_gap": last.train_acc - last.test_acc,
            LAST3_METRIC: min(m.test_acc for m in history[-LAST_EPOCHS:]),
            "mean_epoch_seconds": sum(m.epoch_seconds for m in history) / len(history)}


def run_params(config: TrainConfig, state: TrainState) -> dict[str, object]:
    """What the run learns from. How it ran (device, precision, compile) goes in tags: a
    resumed run may go on on another machine."""
    return {**config.as_params(), "num_params": count_parameters(state.model),
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__}


def run_tags(config: TrainConfig, data: MnistData) -> dict[str, str]:
    tags = {"variant": config.model, "dropout_enabled": str(config.dropout > 0).lower(),
            "mlflow.runName": config.run_name}
    tags |= {f"mnist_md5.{name.removesuffix('.gz')}": md5 for name, md5 in data.md5s.items()}
    return tags


def input_example(data: MnistData, count: int = 4) -> np.ndarray:
    images, _ = data.test_tensors()
    return (images[:count].float() / 255).unsqueeze(1).numpy()


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a run, which ended KILLED with its last checkpoint kept."""

    def __init__(self, signal_name: str, run_id: str, epoch: int, epochs: int,
                 command: str, exit_code: int) -> None:
        super().__init__(signal_name, run_id, epoch, epochs, command, exit_code)
        self.signal_name = signal_name
        self.run_id = run_id
        self.epoch = epoch
        self.epochs = epochs
        self.command = command  # a sweep puts its own in place of the child's
        self.exit_code = exit_code

    def __str__(self) -> str:
        return (f"{self.signal_name} after epoch {self.epoch} of {self.epochs}; run "
                f"{self.run_id} ended KILLED; resume it with: {self.command}")


def resume_command(run_id: str, under_mlflow_run: bool) -> str:
    """The command that resumes `run_id`, in the form the user started it."""
    if under_mlflow_run:
        return f"mlflow run . -e main -P resume={run_id}"
    return f"mnist-mlflow train --resume {run_id}"


def check_tracking_store() -> None:
    """UserError at once when an HTTP tracking server does not answer (not minutes of retries)."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return  # a local store (SQLite, files) is opened, or created, by MLflow itself
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=STORE_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(f"tracking store {uri} cannot be reached ({err.strerror or err}); "
                        "start the server or set MLFLOW_TRACKING_URI") from None


def train_tracked(config: TrainConfig, data_dir: Path | str,
                  experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                  progress: bool = True, tags: Mapping[str, str] | None = None) -> RunResult:
    """Validate, load data, then train `config` as one MLflow run and log everything.

    Under `mlflow run` (MLFLOW_RUN_ID set) the run MLflow created is used; otherwise a new
    run is started in `experiment`, as a child of `parent_run_id` when given, with `tags`.
    """
    config.validate()
    runtime = resolve(config)
    check_tracking_store()
    data = load_mnist(data_dir, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, runtime)
    state = create_state(config, runtime, pipeline.steps_per_epoch)
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    if not under_mlflow_run:
        mlflow.set_experiment(experiment)
    run_id = mlflow.start_run(run_name=config.run_name, parent_run_id=parent_run_id,
                              tags=dict(tags or {})).info.run_id
    return _train_in_run(run_id, config, data, pipeline, state, [], progress,
                         resume_command(run_id, under_mlflow_run))


def resume_tracked(run_id: str, data_dir: Path | str, given: Mapping[str, object] | None = None,
                   progress: bool = True) -> RunResult:
    """Reopen run `run_id`, restore its checkpoint and train the epochs it has left.

    Settings come from the run's params; `given` (options the user set) must agree with them,
    except how it runs (device, precision, compile, threads, determinism), which may change:
    a run may go on on another kind of machine. Every check happens before the run is
    touched: a refused resume changes nothing.
    """
    check_tracking_store()
    client = MlflowClient()
    run = resumable_run(client, run_id)
    given = dict(given or {})
    overrides = {name: given.pop(name) for name in RUNTIME_SETTINGS if name in given}
    config = dataclasses.replace(config_from_params(run_id, run.data.params, given), **overrides)
    if config.device == "cuda" and "device" not in overrides and not torch.cuda.is_available():
        raise UserError(f"run {run_id} trained with --device cuda and CUDA is not available "
                        "here; resume it with --device cpu")
    runtime = resolve(config)
    data = load_mnist(data_dir, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, runtime)
    state = create_state(config, runtime, pipeline.steps_per_epoch)
    checkpoint = load_checkpoint(client, run_id)
    state.load_state_dict(checkpoint["state"])
    history = [EpochMetrics(**m) for m in checkpoint["history"]]
    runner_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    command = resume_command(run_id, runner_run_id is not None)
    if runner_run_id:
        # `mlflow run` made a new run for this command; say that it only resumed another.
        client.set_tag(runner_run_id, MLFLOW_RUN_NAME, f"resume-{run_id[:8]}")
        client.set_tag(runner_run_id, "resumes_run_id", run_id)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    mlflow.start_run(run_id=run_id)
    if "failure_reason" in run.data.tags:  # it is going on: the interruption is no failure
        client.delete_tag(run_id, "failure_reason")
    resumed_at = run.data.tags.get("resumed_after_epochs", "")
    mlflow.set_tag("resumed_after_epochs", ",".join(filter(None, [resumed_at, str(state.epoch)])))
    # The resolved_* tags now say how it goes on; this keeps where each resumption ran.
    resumed_on = run.data.tags.get("resumed_on", "")
    here = f"after epoch {state.epoch}: {runtime.describe()}"
    mlflow.set_tags({**runtime.tags(), "resumed_on": "; ".join(filter(None, [resumed_on, here]))})
    _log_missing_epochs(client, run_id, history)
    log.info("run %s: resuming %s after epoch %d of %d", run_id, config.run_name, state.epoch,
             config.epochs)
    return _train_in_run(run_id, config, data, pipeline, state, history, progress, command)


def resumable_run(client: MlflowClient, run_id: str) -> Run:
    """The run to resume; UserError when it is unknown, FINISHED or has no checkpoint."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in the tracking store "
                        f"{mlflow.get_tracking_uri()}") from None
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} is FINISHED: there is nothing left to resume")
    artifacts = client.list_artifacts(run_id, CHECKPOINT_DIR)
    if not any(a.path == CHECKPOINT_ARTIFACT for a in artifacts):
        raise UserError(f"run {run_id} ({run.info.status}) has no checkpoint: it stopped before "
                        "its first epoch ended; start a new run instead")
    return run


def config_from_params(run_id: str, params: Mapping[str, str],
                       given: Mapping[str, object]) -> TrainConfig:
    """Run `run_id`'s TrainConfig from its params; UserError when `given` contradicts one."""
    settings = settings_from_params(params)
    missing = [name for name in TrainConfig.field_names() if name not in settings]
    if missing:
        raise UserError(f"run {run_id} has no param {missing[0]!r}: it is not a training run")
    for name, value in given.items():
        if value != settings[name]:
            raise UserError(f"--{name.replace('_', '-')} {value} conflicts with run "
                            f"{run_id}, which has {name} {settings[name]}; "
                            "leave it out to resume")
    return TrainConfig(**settings).validate()


def settings_from_params(params: Mapping[str, str]) -> dict[str, object]:
    """The TrainConfig settings among a run's params, typed (not validated)."""
    defaults = TrainConfig()
    params = {**{k: str(getattr(defaults, k)) for k in LATER_SETTINGS}, **params}
    settings: dict[str, object] = {}
    for name in TrainConfig.field_names():
        if name in params:
            kind, text = type(getattr(defaults, name)), params[name]
            # `mlflow run` logs -P values as typed (say epochs "20.0"), hence int via float.
            if kind is bool:
                settings[name] = text.strip().lower() in ("true", "1", "yes", "on")
            else:
                settings[name] = int(float(text)) if kind is int else kind(text)
    return settings


def load_checkpoint(client: MlflowClient, run_id: str) -> dict[str, object]:
    """The run's last checkpoint, loaded without unpickling anything but tensors and numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp)
        return torch.load(path, map_location="cpu", weights_only=True)


def _log_missing_epochs(client: MlflowClient, run_id: str, history: list[EpochMetrics]) -> None:
    """Log the checkpointed epochs whose metrics never reached the store (checkpoint is first)."""
    logged = {m.step for m in client.get_metric_history(run_id, "test_acc")}
    for metrics in history:
        if metrics.epoch not in logged:
            mlflow.log_metrics(metrics.as_metrics(), step=metrics.epoch)


def _train_in_run(run_id: str, config: TrainConfig, data: MnistData, pipeline: Pipeline,
                  state: TrainState, history: list[EpochMetrics], progress: bool,
                  command: str) -> RunResult:
    """Train the active run `run_id` from `state` to the end, checkpointing every epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        handler = logging.FileHandler(Path(tmp) / "training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)  # training.log records every epoch, whatever the root level

        def on_epoch(metrics: EpochMetrics, trained: TrainState) -> None:
            history.append(metrics)
            # Held signals: a checkpoint is never half-written, and the checkpoint goes first,
            # so a resume can log any epoch whose metrics were lost (never one twice).
            with signals_deferred():
                log_checkpoint(trained, history, Path(tmp))
                mlflow.log_metrics(metrics.as_metrics(), step=metrics.epoch, synchronous=False)

        def on_compile_fallback(reason: str) -> None:
            mlflow.set_tags({"resolved_compile": "false", "compile_fallback": reason})

        try:
            if not history:
                _log_start(config, state, data)
                log.info("run %s: training %s on %s (%d parameters)", run_id, config.run_name,
                         state.runtime.describe(), count_parameters(state.model))
            fit(config, state, pipeline, on_epoch=on_epoch, progress=progress,
                on_compile_fallback=on_compile_fallback)
            mlflow.flush_async_logging()
            mlflow.log_metrics(summary_metrics(history), step=config.epochs)
            handler.flush()
            _log_artifacts(config, state, data, history, Path(tmp))
        except KeyboardInterrupt as err:
            name = str(err) or "SIGINT"
            _end(run_id, RunStatus.KILLED, f"interrupted ({name}) after epoch "
                                           f"{state.epoch} of {config.epochs}")
            raise RunInterrupted(name, run_id, state.epoch, config.epochs, command,
                                 getattr(err, "exit_code", 130)) from err
        except BaseException as err:
            _end(run_id, RunStatus.FAILED, f"{type(err).__name__}: {err}")
            raise
        finally:
            log.removeHandler(handler)
            handler.close()
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    return RunResult(run_id, history)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals (and may set handlers)
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda got, _frame: caught.append(got))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])  # now handled by the restored handler


def log_checkpoint(state: TrainState, history: list[EpochMetrics], tmp: Path) -> None:
    """Replace the run's `checkpoints/last.pt` with the state after the latest epoch."""
    path = tmp / CHECKPOINT_FILE
    torch.save({"state": state.state_dict(), "history": [asdict(m) for m in history]}, path)
    mlflow.log_artifact(str(path), CHECKPOINT_DIR)


def log_new_params(run_id: str, params: Mapping[str, object]) -> None:
    """Log the params `run_id` does not have yet.

    `mlflow run` has already logged the -P values as given (say "0.050"); MLflow forbids
    changing a param, so only the ones it did not log are added.
    """
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()
                                     if k not in existing])


def _log_start(config: TrainConfig, state: TrainState, data: MnistData) -> None:
    log_new_params(mlflow.active_run().info.run_id, run_params(config, state))
    mlflow.set_tags({**run_tags(config, data), **state.runtime.tags()})


def _log_artifacts(config: TrainConfig, state: TrainState, data: MnistData,
                   history: list[EpochMetrics], tmp: Path) -> None:
    plot = plot_training_curves(history, tmp / "training_curves.png", config.run_name)
    mlflow.log_artifact(str(plot), "plots")
    summary = tmp / "model_summary.txt"
    summary.write_text(model_summary(state.model))
    mlflow.log_artifact(str(summary))
    mlflow.log_artifact(str(tmp / "training.log"))
    # Served as plain NCHW: channels_last is a training-speed setting (and torch.export's
    # packaging warns about NHWC weights).
    net = copy.deepcopy(state.model).cpu().to(memory_format=torch.contiguous_format).eval()
    mlflow.pytorch.log_model(InferenceModel(net).eval(), name=MODEL_NAME_IN_RUN,
                             signature=SIGNATURE, input_example=input_example(data),
                             pip_requirements=pip_requirements())


def _end(run_id: str, status: int, reason: str) -> None:
    """End the run with `status`, recording why; metrics already logged stay."""
    try:
        mlflow.flush_async_logging()
    finally:
        mlflow.set_tag("failure_reason", reason[:5000])
        mlflow.end_run(RunStatus.to_string(status))
