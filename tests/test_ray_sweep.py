"""`sweep --executor ray`: children as Ray tasks on a real local Ray, against the same store.

Each test starts its own Ray (as the command does) and the workers import torch and MLflow,
so these take tens of seconds; the jobs are tiny.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytest.importorskip("ray", reason="the ray extra is not installed")

from mnist_mlflow.mlrun import lease_of  # noqa: E402
from mnist_mlflow.ray_executor import RayExecutor  # noqa: E402
from mnist_mlflow.schema import ROLE_TAG  # noqa: E402
from mnist_mlflow.store import open_store  # noqa: E402
from mnist_mlflow.sweep import LocalExecutor, run_sweep  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.helpers import children_of, run_cli, runs_of  # noqa: E402

COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr")
SLOW = ["--epochs", "3", "--train-limit", "4096", "--test-limit", "256", "--val-size", "256",
        "--device", "cpu"]


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in COMPARED}


def test_ray_children_match_a_local_sweep_and_a_failing_one_fails_alone(
        store: str, mnist_root: Path) -> None:
    configs = [tiny_config(threads=1, dropout=dropout) for dropout in (0.0, 0.05)]
    configs.append(tiny_config(threads=1, dropout=0.1, lr=1e6))  # diverges in its first epoch
    local = run_sweep(configs, mnist_root, "local-twin", progress=False,
                      executor=LocalExecutor())
    spread = run_sweep(configs, mnist_root, "on-ray", progress=False,
                       executor=RayExecutor(cpus_per_run=1))

    assert [c.status for c in spread.children if c.config.lr == 1e6] == ["FAILED"]
    failed = next(c for c in spread.children if c.status == "FAILED")
    run = MlflowClient().get_run(failed.run_id)
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["failure_reason"]
    by_config = {c.config: c.run_id for c in local.children if c.status == "FINISHED"}
    finished = [c for c in spread.children if c.status == "FINISHED"]
    assert len(finished) == 2
    for child in finished:
        # The same seeds give the same per-epoch metrics, whichever process trained them.
        assert histories(child.run_id) == histories(by_config[child.config])
        run = MlflowClient().get_run(child.run_id)
        assert run.data.tags["threads"] == "1"
        assert run.data.tags["mlflow.parentRunId"] == spread.parent_run_id
        # The worker records the code it ran, as any training process does.
        assert run.data.tags["mnist_mlflow.code.source"] in ("git", "package")
        assert run.data.tags["mnist_mlflow.code.version"]
    parent = MlflowClient().get_run(spread.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["children_failed"] == "1"


def test_a_worker_that_dies_leaves_its_child_killed_and_the_others_finish(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker training seed 1 is SIGKILLed mid-run (its lease names its pid)."""
    client = MlflowClient()

    def kill_the_first_worker() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for run in runs_of("dying"):
                lease = lease_of(run)
                pid = lease.pid if lease else None
                if (run.data.tags.get(ROLE_TAG) == "train" and pid
                        and run.data.params.get("seed") == "1"
                        and client.get_metric_history(run.info.run_id, "test_acc")):
                    os.kill(int(pid), signal.SIGKILL)
                    return
            time.sleep(0.1)

    import threading

    killer = threading.Thread(target=kill_the_first_worker)
    killer.start()
    code, out, err = run_cli(["sweep", *SLOW, "--seeds", "1,2", "--variant", "opt:0",
                              "--executor", "ray", "--data-dir", str(mnist_root),
                              "--experiment", "dying"], capsys, monkeypatch)
    killer.join()
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "1 of 2 sweep children did not finish" in last and " KILLED)" in last, last
    children = {c.data.params["seed"]: c for c in runs_of("dying")
                if c.data.tags.get(ROLE_TAG) == "train"}
    assert children["2"].info.status == "FINISHED"
    # KILLED, as a local sweep's: `sweep --resume` goes on from its checkpoint.
    dead = children["1"]
    assert dead.info.status == "KILLED"
    assert dead.data.tags["failure_reason"].startswith("its worker process died")


def test_ctrl_c_on_the_driver_kills_the_tasks_and_resume_finishes_on_ray(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_store, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mnist_mlflow", "sweep", *SLOW, "--seeds", "1,2,3",
            "--variant", "opt:0", "--executor", "ray", "--data-dir", str(mnist_root),
            "--experiment", "ctrl-c"]
    # Created now, not by the subprocess while this test's client polls it: two processes
    # creating one new SQLite store race in MLflow's migrations (`duplicate column name`),
    # and only mnist-mlflow's commands take the lock that orders them.
    open_store()
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = MlflowClient()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        children = [r for r in runs_of("ctrl-c") if r.data.tags.get(ROLE_TAG) == "train"]
        # Both tasks begun (a busy machine starts the second Ray worker seconds later), one
        # through its first epoch.
        if sum(r.info.status == "RUNNING" for r in children) == 2 and any(
                client.get_metric_history(r.info.run_id, "test_acc") for r in children):
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode != 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    parent = next(r for r in runs_of("ctrl-c") if r.data.tags.get(ROLE_TAG) == "sweep")
    assert parent.info.status == "KILLED"
    children = children_of("ctrl-c", parent.info.run_id)
    # Two tasks ran (2 CPUs, 1 each) and were killed; the third never began.
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED", "SCHEDULED"]

    # The resume from this process, as the other tests here start Ray.
    code, _, err = run_cli(["sweep", "--resume", parent.info.run_id, "--executor", "ray",
                            "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = children_of("ctrl-c", parent.info.run_id)
    assert [c.info.status for c in children] == ["FINISHED"] * 3
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [
            1, 2, 3]
