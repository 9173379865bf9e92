"""A local sweep trains its children side by side in worker processes, and every promise of a
sweep holds: Ctrl-C ends each child KILLED with its checkpoint, `--resume` finishes each epoch
once, a worker that dies costs only its own child's epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mnist_mlflow.schema import ROLE_TAG
from tests.helpers import children_of, runs_of
from tests.test_interrupt import mnist_mlflow, wait_for_epoch

# Epochs of about 2 s with two children on two cores: a signal after epoch 1 lands mid-run.
ARGS = ["--variant", "opt:0,opt:0.05", "--workers", "2", "--epochs", "3", "--train-limit",
        "4096", "--test-limit", "256", "--val-size", "256", "--device", "cpu"]


def sweep_in_training(store: str, mnist_root: Path, experiment: str
                      ) -> tuple[MlflowClient, subprocess.Popen[str], set[str]]:
    """A sweep of ARGS, started and waited for until both children have logged an epoch;
    its client, process and the two children's run ids."""
    client = MlflowClient(store)
    process = mnist_mlflow(store, "sweep", *ARGS, "--data-dir", str(mnist_root),
                           "--experiment", experiment)
    try:
        first = wait_for_epoch(client, process, experiment, 1)
        second = wait_for_epoch(client, process, experiment, 1, {first})
    except BaseException:
        process.kill()
        raise
    return client, process, {first, second}


def stop_sweep(process: subprocess.Popen[str], signum: int) -> tuple[list[int], str]:
    """Send the sweep `signum` and wait for it to end: its workers (listed before) and what
    it wrote on stderr."""
    try:
        workers = workers_of(process.pid)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return workers, err


def workers_of(pid: int) -> list[int]:
    """The worker processes sweep `pid` started (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running, after a moment to exit."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        running = [p for p in pids if Path(f"/proc/{p}").exists()
                   and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"]
        if not running:
            break
        time.sleep(0.1)
    return running


def test_ctrl_c_stops_every_child_killed_and_resume_finishes_each_epoch_once(
        tracking_store: str, mnist_root: Path) -> None:
    client, process, training = sweep_in_training(tracking_store, mnist_root, "side-by-side")
    # Both trained at once: the second had begun before the first ended.
    runs = {r.info.run_id: r for r in runs_of("side-by-side")}
    if not all(runs[run_id].info.status == "RUNNING" for run_id in training):
        process.kill()
        pytest.fail(f"not both RUNNING: {[runs[run_id].info.status for run_id in training]}")
    workers, err = stop_sweep(process, signal.SIGINT)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    [parent] = [r for r in runs_of("side-by-side") if r.data.tags.get(ROLE_TAG) == "sweep"]
    parent_id = parent.info.run_id
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted SIGINT after epoch ")
    assert last.endswith(f"resume it with: mnist-mlflow sweep --resume {parent_id}")
    assert parent.info.status == "KILLED" and parent.data.tags["children_killed"] == "2"
    children = children_of("side-by-side", parent_id)
    assert {c.info.run_id for c in children} == training
    for child in children:
        assert child.info.status == "KILLED"
        assert child.data.tags["failure_reason"].startswith("interrupted (SIGINT) after epoch")
        assert child.data.tags["torch_threads"] == "1"  # its share (OMP_NUM_THREADS here)
        assert "mnist_mlflow.lease" not in child.data.tags
    assert len(workers) == 2 and alive(workers) == []  # no worker outlived the sweep

    resumed = mnist_mlflow(tracking_store, "sweep", "--resume", parent_id, "--workers", "2",
                           "--data-dir", str(mnist_root))
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert f"sweep {parent_id}: all 2 children finished" in out
    # Each line of a child says whose it is.
    for child in children:
        assert f"[{child.info.run_name}] run {child.info.run_id}: resuming" in err
    for child in children_of("side-by-side", parent_id):
        assert child.info.run_id in training and child.info.status == "FINISHED"
        for key in ("test_acc", "val_acc", "train_loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [1, 2, 3], (key, steps)
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_a_worker_killed_ends_its_child_killed_and_the_sweep_goes_on(
        tracking_store: str, mnist_root: Path) -> None:
    client = MlflowClient(tracking_store)
    # Three children, two workers: one waits for a worker, and a new pool, to begin.
    args = ["--variant", "opt:0,opt:0.05,opt:0.1", *ARGS[2:4], "--epochs", "2", *ARGS[6:]]
    process = mnist_mlflow(tracking_store, "sweep", *args, "--data-dir", str(mnist_root),
                           "--experiment", "worker-killed")
    try:
        victim_run = wait_for_epoch(client, process, "worker-killed", 1)
        lease = client.get_run(victim_run).data.tags["mnist_mlflow.lease"]
        os.kill(int(lease.split()[1]), signal.SIGKILL)  # "pid N on host, heartbeat T"
        out, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    victim = client.get_run(victim_run)
    assert victim.info.status == "KILLED"
    assert victim.data.tags["failure_reason"].startswith("its worker process died")
    [parent] = [r for r in runs_of("worker-killed") if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = children_of("worker-killed", parent.info.run_id)
    assert len(children) == 3 and not [c for c in children if c.info.status == "RUNNING"]
    # The child that had not begun was trained all the same.
    assert sum(c.info.status == "FINISHED" for c in children) >= 1
    assert err.strip().splitlines()[-1].endswith(
        f"finish them with: mnist-mlflow sweep --resume {parent.info.run_id}")


def test_a_sweep_killed_outright_leaves_no_worker_and_no_child_running(
        tracking_store: str, mnist_root: Path) -> None:
    client, process, training = sweep_in_training(tracking_store, mnist_root, "sweep-killed")
    try:
        workers = workers_of(process.pid)
        process.send_signal(signal.SIGKILL)  # no chance to pass anything on
        process.communicate(timeout=60)
    finally:
        process.kill()
    # Each worker notices its sweep is gone: its child ends KILLED (resumable), it exits.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
            client.get_run(run_id).info.status == "RUNNING" for run_id in training):
        time.sleep(0.2)
    for run_id in training:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["failure_reason"].startswith("interrupted (SIGTERM) after epoch")
    assert len(workers) == 2 and alive(workers) == []


def test_sigterm_while_one_worker_waits_for_work_ends_the_sweep(
        tracking_store: str, mnist_root: Path) -> None:
    """Three children on two workers: once two have finished, one worker trains the third and
    the other waits for work, holding the pool's queue lock. SIGTERM then (as `mlflow run`
    sends on Ctrl-C) used to kill the waiting worker with that lock held, and the sweep waited
    forever for the other."""
    args = ["--variant", "opt:0,opt:0.05,opt:0.1", *ARGS[2:]]
    process = mnist_mlflow(tracking_store, "sweep", *args, "--data-dir", str(mnist_root),
                           "--experiment", "end-phase")
    deadline = time.monotonic() + 240
    statuses: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        statuses = sorted(r.info.status for r in runs_of("end-phase")
                          if r.data.tags.get(ROLE_TAG) == "train")
        if statuses == ["FINISHED", "FINISHED", "RUNNING"]:
            break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"never two children finished and one training: {statuses}")
    workers, err = stop_sweep(process, signal.SIGTERM)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted SIGTERM"), last
    [parent] = [r for r in runs_of("end-phase") if r.data.tags.get(ROLE_TAG) == "sweep"]
    third = [c for c in children_of("end-phase", parent.info.run_id)
             if c.info.status != "FINISHED"]
    if third:  # else the signal came while it finished: it ended FINISHED, and said so
        [child] = third
        assert child.info.status == "KILLED"
        assert child.data.tags["failure_reason"].startswith("interrupted (SIGTERM) after epoch")
    assert alive(workers) == []
