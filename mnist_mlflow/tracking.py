"""One training run as one MLflow run: params, per-epoch metrics, plots, log, model."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.entities import RunStatus
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import MnistData, build_pipeline, load_mnist
from mnist_mlflow.models import InferenceModel, count_parameters, model_summary
from mnist_mlflow.plots import plot_training_curves
from mnist_mlflow.training import EpochMetrics, TrainState, create_state, fit

log = logging.getLogger("mnist_mlflow")

DEFAULT_EXPERIMENT = "mnist-optimization"
MODEL_NAME_IN_RUN = "model"
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


def summary_metrics(history: list[EpochMetrics]) -> dict[str, float]:
    """best_test_acc, best_epoch (first epoch reaching it) and final_gap (train - test, last)."""
    best = max(history, key=lambda m: (m.test_acc, -m.epoch))
    last = history[-1]
    return {"best_test_acc": best.test_acc, "best_epoch": best.epoch,
            "final_gap": last.train_acc - last.test_acc}


def run_params(config: TrainConfig, state: TrainState, device: torch.device) -> dict[str, object]:
    return {**config.as_params(), "num_params": count_parameters(state.model),
            "resolved_device": str(device),
            "resolved_precision": str(config.autocast_dtype(device) or torch.float32),
            "resolved_compile": config.compiles(device), "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__}


def run_tags(config: TrainConfig, data: MnistData) -> dict[str, str]:
    tags = {"variant": config.model, "dropout_enabled": str(config.dropout > 0).lower(),
            "mlflow.runName": config.run_name}
    tags |= {f"mnist_md5.{name.removesuffix('.gz')}": md5 for name, md5 in data.md5s.items()}
    return tags


def input_example(data: MnistData, count: int = 4) -> np.ndarray:
    images, _ = data.test_tensors()
    return (images[:count].float() / 255).unsqueeze(1).numpy()


def train_tracked(config: TrainConfig, data_dir: Path | str,
                  experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                  progress: bool = True) -> RunResult:
    """Validate, load data, then train `config` as one MLflow run and log everything.

    Under `mlflow run` (MLFLOW_RUN_ID set) the run MLflow created is used; otherwise a new
    run is started in `experiment`, as a child of `parent_run_id` when given.
    """
    config.validate()
    device = config.resolved_device()
    data = load_mnist(data_dir, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config.pipeline, data, config.batch_size, device)
    state = create_state(config, device)

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=config.run_name, parent_run_id=parent_run_id)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        handler = logging.FileHandler(Path(tmp) / "training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)  # training.log records every epoch, whatever the root level
        try:
            _log_start(config, state, device, data)
            log.info("run %s: training %s on %s (%d parameters)", run_id, config.run_name,
                     device, count_parameters(state.model))
            history = fit(config, state, pipeline, on_epoch=_log_epoch, progress=progress)
            mlflow.flush_async_logging()
            mlflow.log_metrics(summary_metrics(history), step=config.epochs)
            handler.flush()
            _log_artifacts(config, state, data, history, Path(tmp))
        except KeyboardInterrupt as err:
            _end(run_id, RunStatus.KILLED, f"interrupted ({err or 'SIGINT'}) after epoch "
                                           f"{state.epoch} of {config.epochs}")
            raise
        except BaseException as err:
            _end(run_id, RunStatus.FAILED, f"{type(err).__name__}: {err}")
            raise
        finally:
            log.removeHandler(handler)
            handler.close()
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    return RunResult(run_id, history)


def _log_start(config: TrainConfig, state: TrainState, device: torch.device,
               data: MnistData) -> None:
    # `mlflow run` has already logged the -P values as given (say "0.050"); MLflow forbids
    # changing a param, so only the ones it did not log are added.
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    params = {k: v for k, v in run_params(config, state, device).items() if k not in existing}
    mlflow.log_params(params)
    mlflow.set_tags(run_tags(config, data))


def _log_epoch(metrics: EpochMetrics, _state: TrainState) -> None:
    mlflow.log_metrics(metrics.as_metrics(), step=metrics.epoch, synchronous=False)


def _log_artifacts(config: TrainConfig, state: TrainState, data: MnistData,
                   history: list[EpochMetrics], tmp: Path) -> None:
    plot = plot_training_curves(history, tmp / "training_curves.png", config.run_name)
    mlflow.log_artifact(str(plot), "plots")
    summary = tmp / "model_summary.txt"
    summary.write_text(model_summary(state.model))
    mlflow.log_artifact(str(summary))
    mlflow.log_artifact(str(tmp / "training.log"))
    net = copy.deepcopy(state.model).cpu().eval()
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
