"""Ctrl-C or SIGTERM during training: the run ends KILLED, completed epochs stay logged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient


def wait_for_epoch(client: MlflowClient, process: subprocess.Popen, epochs: int) -> str:
    """Poll the store until the training subprocess has logged `epochs` epochs; its run id."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                if len(client.get_metric_history(run.info.run_id, "test_acc")) >= epochs:
                    return run.info.run_id
        time.sleep(0.5)
    pytest.fail(f"no epoch logged in time; exit code {process.poll()}")


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_the_run_killed_and_keeps_finished_epochs(
    tracking_store: str, mnist_root: Path, signum: int, exit_code: int
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_store}
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlflow", "train", "--data-dir", str(mnist_root),
         "--train-limit", "2000", "--test-limit", "200", "--epochs", "500", "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(tracking_store)
        run_id = wait_for_epoch(client, process, 1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, err[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "test_acc"))
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 500
    assert run.data.tags["failure_reason"].startswith("interrupted (")
    assert "Traceback" not in err
