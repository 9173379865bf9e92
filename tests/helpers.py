"""Test helpers: the real command line in this process, and runs of an experiment."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow.cli import main
from mnist_mlflow.config import TrainConfig
from mnist_mlflow.records import Records
from mnist_mlflow.registry import logged_model_uri
from mnist_mlflow.schema import PREDICTIONS_DIR
from mnist_mlflow.tracking import Destination, RunResult, Training, train


def train_one(config: TrainConfig, data_dir: Path | str, experiment: str,
              progress: bool = False) -> RunResult:
    """`config` trained into a new run of `experiment`, through the package's one entry."""
    (result,) = train(Training((config,)), data_dir, Destination(experiment), progress)
    return result


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run the real entry point (`main`, with its error mapping); (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mnist-mlflow", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def runs_of(experiment: str) -> list[mlflow.entities.Run]:
    """Every run of `experiment` in the current store (none when it does not exist)."""
    found = MlflowClient().get_experiment_by_name(experiment)
    return [] if found is None else MlflowClient().search_runs([found.experiment_id])


def children_of(experiment: str, parent_id: str) -> list[mlflow.entities.Run]:
    """The child runs of `parent_id`, oldest first."""
    children = [r for r in runs_of(experiment)
                if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id]
    return sorted(children, key=lambda r: r.info.start_time)


def model_uri(run_id: str) -> str:
    """`models:/<id>` of the model `run_id` logged (named for its variant)."""
    uri = logged_model_uri(run_id)
    assert uri is not None, f"run {run_id} logged no model"
    return uri


# Crafted per-image records: images of the validation set (as --val-size's default) and the
# test set, labelled 0-9 in turn; a run answers every image right but those it is told to miss.
CRAFTED_IMAGES = {"validation": 5000, "test": 10_000}


def crafted_records(scored: str, wrong: np.ndarray) -> Records:
    """Records of `CRAFTED_IMAGES[scored]` images, wrong exactly on the positions `wrong`."""
    count = CRAFTED_IMAGES[scored]
    label = np.arange(count, dtype=np.int64) % 10
    predicted = label.copy()
    predicted[wrong] = (label[wrong] + 1) % 10
    return Records(np.arange(count, dtype=np.int64), label, predicted,
                   np.full(count, 0.9, dtype=np.float32))


def misses(accuracy: float, scored: str, pool: np.ndarray, rng: np.random.Generator
           ) -> np.ndarray:
    """Positions a run must miss to score `accuracy` (%) on `scored`, drawn from `pool`."""
    count = round((100 - accuracy) / 100 * CRAFTED_IMAGES[scored])
    return rng.choice(pool, size=count, replace=False)


def craft_run(experiment: str, name: str, val: float | None, test: float | None = None,
              seed: int = 1, gap: float = 1.0, num_params: int = 6132, start: int = 0,
              status: str = "FINISHED", wrong: dict[str, np.ndarray] | None = None,
              model: Path | None = None, **settings: object) -> str:
    """A FINISHED-looking training run with chosen metric values: what the comparison reads,
    without training. `val` None is a run made with --val-size 0.

    With `wrong` (scored set -> positions missed) it logs per-image records and its
    accuracies are theirs; with `model` (a saved MLflow model folder) it logs that model as
    its own, READY, so that it can be registered, loaded and served."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, start_time=start or int(time.time() * 1000),
                            run_name=name)
    run_id = run.info.run_id
    records = {scored: crafted_records(scored, positions)
               for scored, positions in (wrong or {}).items()}
    if "validation" in records:
        val = records["validation"].accuracy
    if "test" in records:
        test = records["test"].accuracy
    params = {"model": "opt", "epochs": 20, "lr": 0.01, "batch_size": 64, "dropout": 0.0,
              "seed": seed, "val_size": 0 if val is None else 5000, "num_params": num_params,
              **({} if val is None else {"val_split_digest": "crafted"}), **settings}
    test = val if test is None else test
    # Training accuracy test + gap, as an accuracy can be (at most 100).
    metrics = {"train_acc": min(100.0, test + gap), "test_acc": test, "final_test_acc": test,
               "final_gap": gap, "best_test_acc": test, "test_loss": 0.02}
    if val is not None:
        metrics |= {"final_val_acc": val, "val_acc": val}
    client.log_batch(run_id, [Metric(k, v, int(time.time() * 1000), 20)
                              for k, v in metrics.items()],
                     [Param(k, str(v)) for k, v in params.items()], [])
    with tempfile.TemporaryDirectory() as tmp:
        for scored, found_records in records.items():
            client.log_artifact(run_id, str(found_records.write(Path(tmp) / f"{scored}.parquet")),
                                PREDICTIONS_DIR)
    if model is not None:
        logged = client.create_logged_model(experiment_id, name="opt-dropout0",
                                            source_run_id=run_id)
        client.log_model_artifacts(logged.model_id, str(model))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.set_terminated(run_id, status)
    return run_id
