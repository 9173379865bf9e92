"""Time `doctor` over many FINISHED training runs in one SQLite store (target: seconds for 1,000).

    python benchmarks/doctor_speed.py [--runs 1000] [--broken 10] [--store DIR]

Each run carries what a training run logs that `doctor` reads: params and metrics (as
benchmarks/compare_runs.py makes them), per-image records of the validation (5,000 images)
and test (10,000) sets that agree with its final accuracies, a checkpoint of its last epoch,
and a logged model (READY, with its MLmodel file). Then `--broken` runs lose their model
files and as many lose their validation records, as a cleanup job would leave them. Creating
the store is not timed; it times `doctor` as a user runs it (a fresh process, imports
included) and checks that it names exactly the runs broken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from compare_runs import create_runs
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient

from mnist_mlflow.records import Records
from mnist_mlflow.schema import (
    CHECKPOINT_DIR,
    FINAL_TEST_ACC,
    FINAL_VAL_ACC,
    PREDICTIONS_DIR,
    checkpoint_artifact,
    records_artifact,
)

EXPERIMENT = "benchmark"
IMAGES = {"validation": 5000, "test": 10_000}


def records_of(count: int, wrong: int) -> Records:
    label = np.arange(count, dtype=np.int64) % 10
    predicted = label.copy()
    predicted[:wrong] = (label[:wrong] + 1) % 10
    return Records(np.arange(count, dtype=np.int64), label, predicted,
                   np.full(count, 0.9, dtype=np.float32))


def add_artifacts(client: MlflowClient, experiment_id: str, epochs: int, folder: Path) -> None:
    """Records, a last checkpoint and a READY logged model for every run; final accuracies
    logged again as the records score them."""
    model = folder / "model"
    model.mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    rng = np.random.default_rng(0)
    for run in client.search_runs([experiment_id], max_results=50_000):
        run_id = run.info.run_id
        staged = folder / run_id
        (staged / PREDICTIONS_DIR).mkdir(parents=True)
        (staged / CHECKPOINT_DIR).mkdir()
        accuracies = {}
        for scored, count in IMAGES.items():
            found = records_of(count, int(rng.integers(40, 90)))
            found.write(staged / records_artifact(scored))
            accuracies[scored] = found.accuracy
        (staged / checkpoint_artifact(epochs)).write_bytes(b"\0" * 1024)
        client.log_artifacts(run_id, str(staged))
        shutil.rmtree(staged)
        now = int(time.time() * 1000)
        client.log_batch(run_id, [Metric(FINAL_VAL_ACC, accuracies["validation"], now, epochs),
                                  Metric(FINAL_TEST_ACC, accuracies["test"], now, epochs)])
        logged = client.create_logged_model(experiment_id, name="opt", source_run_id=run_id)
        client.log_model_artifacts(logged.model_id, str(model))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def break_some(client: MlflowClient, experiment_id: str, broken: int) -> set[str]:
    """`broken` runs lose their model files and `broken` others their validation records."""
    runs = client.search_runs([experiment_id], max_results=50_000)
    hit = set()
    for run in runs[:broken]:
        [model] = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        shutil.rmtree(model.artifact_location.removeprefix("file://"))
        hit.add(run.info.run_id)
    for run in runs[broken:2 * broken]:
        Path(run.info.artifact_uri.removeprefix("file://"), records_artifact("validation")
             ).unlink()
        hit.add(run.info.run_id)
    return hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--broken", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--store", type=Path, default=None,
                        help="Folder for mlflow.db (default: a temporary folder).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.store or Path(tmp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment_id = client.create_experiment(EXPERIMENT,
                                                 artifact_location=str(folder / "mlruns"))
        started = time.perf_counter()
        create_runs(client, experiment_id, args.runs, args.epochs)
        add_artifacts(client, experiment_id, args.epochs, Path(tmp) / "staging")
        hit = break_some(client, experiment_id, args.broken)
        print(f"created {args.runs} runs with records, checkpoints and models in "
              f"{time.perf_counter() - started:.0f} s; broke {len(hit)}")

        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "doctor", "--experiment",
                               EXPERIMENT], env=env, capture_output=True, text=True,
                              check=False)
        seconds = time.perf_counter() - started
        found = {line.split("(")[1].split(")")[0] for line in done.stdout.splitlines()
                 if line.startswith("| ") and "(" in line and " run " in line}
        print(done.stdout.splitlines()[0])
        print(f"mnist-mlflow doctor (a new process, imports included): {seconds:.1f} s for "
              f"{args.runs} runs; exit {done.returncode}; named the {len(hit)} broken runs "
              f"exactly: {found == hit}")


if __name__ == "__main__":
    main()
