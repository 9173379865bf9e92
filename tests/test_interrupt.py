"""Ctrl-C or SIGTERM during training: the run ends KILLED with its checkpoint; --resume ends it
exactly as if it had never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import rounded
from mnist_mlflow.store import open_store
from mnist_mlflow.training import EpochMetrics, create_state, fit
from tests.conftest import tiny_config
from tests.helpers import run_cli

# Long enough epochs (about 2 s) that a signal sent right after epoch 1 lands in epoch 2.
TRAIN_LIMIT, TEST_LIMIT, EPOCHS = 6144, 256, 3
TRAIN_ARGS = ["--train-limit", str(TRAIN_LIMIT), "--test-limit", str(TEST_LIMIT),
              "--val-size", "256",
              "--epochs", str(EPOCHS), "--device", "cpu", "--threads", "1"]
# Not epoch_seconds; validation metrics too: a resumed run validates as if it never stopped.
COMPARED = ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr"]


def mnist_mlflow(store: str, *args: str) -> subprocess.Popen[str]:
    """The real command line in a subprocess, reporting to `store`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    # Created now, not by the subprocess while this test's client polls it: two processes
    # creating one new SQLite store race in MLflow's migrations (`duplicate column name`),
    # and only mnist-mlflow's commands take the lock that orders them.
    open_store()
    # Ctrl-C as a user's terminal delivers it: a shell's background job (CI may be one)
    # inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "mnist_mlflow", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_epoch(client: MlflowClient, process: subprocess.Popen[str], experiment: str,
                   epochs: int, ignore: Collection[str] = ()) -> str:
    """Poll the store until the training subprocess has logged `epochs` epochs in a run not
    in `ignore`; that run's id."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        found = client.get_experiment_by_name(experiment)
        for run in client.search_runs([found.experiment_id]) if found else []:
            if run.info.run_id in ignore:
                continue
            if len(client.get_metric_history(run.info.run_id, "test_acc")) >= epochs:
                return run.info.run_id
        time.sleep(0.05)
    pytest.fail(f"no epoch logged in time; exit code {process.poll()}: "
                f"{process.communicate()[1][-2000:]}")


@pytest.fixture(scope="module")
def twin(mnist_root: Path) -> list[EpochMetrics]:
    """The same training left alone, in this process, with the same seed and one thread."""
    config = tiny_config(train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT, epochs=EPOCHS,
                         threads=1)
    threads = torch.get_num_threads()
    try:
        data = load_mnist(mnist_root, config.train_limit, config.test_limit, config.val_size)
        pipeline = build_pipeline(config, data, resolve(config))
        state = create_state(config, resolve(config), pipeline.steps_per_epoch)
        return fit(config, state, pipeline, progress=False)
    finally:
        torch.set_num_threads(threads)  # leave the other tests their threads


# SIGINT only: SIGTERM takes the same path (config.raise_terminated) and is tested without the
# twin, which costs half a minute a case: exit 143 and KILLED in test_faults,
# test_parallel_sweep and test_mlproject.
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130)])
def test_signal_in_epoch_2_ends_killed_and_resume_matches_the_uninterrupted_twin(
    tracking_store: str, mnist_root: Path, twin: list[EpochMetrics], signum: int,
    exit_code: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = f"interrupt-{signum}"
    process = mnist_mlflow(tracking_store, "train", *TRAIN_ARGS, "--data-dir", str(mnist_root),
                           "--experiment", experiment)
    try:
        client = MlflowClient(tracking_store)
        run_id = wait_for_epoch(client, process, experiment, 1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, err[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == [1]
    assert run.data.tags["failure_reason"] == (
        f"interrupted ({signal.Signals(signum).name}) after epoch 1 of {EPOCHS}")
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        "checkpoints/epoch-001.pt"]
    checkpoint = torch.load(client.download_artifacts(run_id, "checkpoints/epoch-001.pt"),
                            weights_only=True)
    assert checkpoint["state"]["epoch"] == 1
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.endswith(f"resume it with: mnist-mlflow train --resume {run_id}")

    if signum == signal.SIGINT:
        # A setting that contradicts the run's: one line, and the run is left as it was.
        code, _, refused = run_cli(["train", "--resume", run_id, "--lr", "0.5", "--data-dir",
                                    str(mnist_root)], capsys, monkeypatch)
        assert code == 2 and refused.count("\n") == 1
        assert f"--lr 0.5 conflicts with run {run_id}, which has lr 0.01" in refused
        assert client.get_run(run_id).info.status == "KILLED"

    # Settings repeated as they were are no conflict. (In this process: what is resumed
    # is the run's record, not the process that was stopped.)
    code, out, err = run_cli(["train", "--resume", run_id, "--threads", "1", "--data-dir",
                              str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert f"run {run_id} finished" in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags
    assert run.data.tags["resumed_after_epochs"] == "1"
    # Summary metrics are rounded to 0.01 points.
    assert run.data.metrics["best_test_acc"] == round(max(m.test_acc for m in twin), 2)
    assert run.data.metrics["final_val_acc"] == round(twin[-1].val_acc, 2)
    assert run.data.metrics["best_val_acc"] == round(max(m.val_acc for m in twin), 2)
    assert "model_summary.txt" in {a.path for a in client.list_artifacts(run_id)}
    for name in [*COMPARED, "epoch_seconds"]:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), name
    for name in COMPARED:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        # As logged: to the digits each metric means (rounding the same values).
        assert [v for _, v in logged] == [rounded(name, getattr(m, name)) for m in twin], name
