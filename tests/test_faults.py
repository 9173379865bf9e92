"""Faults that end a run honestly: divergence, a tracking store that is down, refused resumes."""

from __future__ import annotations

import shutil
import signal
import socket
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.schema import ROLE_TAG
from tests.helpers import children_of, run_cli, runs_of
from tests.test_interrupt import mnist_mlflow, wait_for_epoch

# Two epochs of about 1.5 s each: long enough to damage a file while the first child trains.
TRAIN_ARGS = ["--epochs", "2", "--train-limit", "4096", "--test-limit", "256", "--device",
              "cpu", "--threads", "1"]

TINY = ["--epochs", "2", "--train-limit", "512", "--test-limit", "256", "--device", "cpu"]


def test_huge_learning_rate_fails_the_run_at_the_diverging_step_and_logs_no_model(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["train", *TINY, "--lr", "1e6", "--data-dir", str(mnist_root),
                            "--experiment", "diverging"], capsys, monkeypatch)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: training diverged: non-finite training loss (nan) in "
                                "epoch 1, at step ")
    assert "Traceback" not in err
    [run] = runs_of("diverging")
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert reason.startswith("TrainingDiverged: non-finite training loss (nan) in epoch 1, at step")
    step, steps = (int(n) for n in reason.split("at step ")[1].split(" of "))
    assert 1 <= step < steps == 8  # stopped inside the epoch, not at its end
    client = MlflowClient()
    assert client.get_metric_history(run.info.run_id, "test_acc") == []
    # No model, no checkpoint, no plot (only, from a dirty tree, the code it ran).
    assert [a.path for a in client.list_artifacts(run.info.run_id)] in ([], ["code"])
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       output_format="list") == []

    # It diverged before its first checkpoint: nothing to resume, and the record stays as is.
    code, _, err = run_cli(["train", "--resume", run.info.run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert f"run {run.info.run_id} FAILED before its first checkpoint" in err
    after = client.get_run(run.info.run_id)
    assert (after.info.status, after.data.tags) == ("FAILED", run.data.tags)


def test_resuming_a_finished_run_or_an_unknown_id_is_refused_and_changes_nothing(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["train", *TINY, "--data-dir", str(mnist_root), "--experiment",
                              "finished"], capsys, monkeypatch)
    assert code == 0, err
    [run] = runs_of("finished")
    code, _, err = run_cli(["train", "--resume", run.info.run_id, "--data-dir",
                            str(mnist_root)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert f"run {run.info.run_id} is FINISHED: there is nothing left to resume" in err
    [after] = runs_of("finished")
    assert after.info == run.info and after.data.tags == run.data.tags
    assert after.data.metrics == run.data.metrics

    code, _, err = run_cli(["train", "--resume", "0123456789abcdef0123456789abcdef",
                            "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert "no run '0123456789abcdef0123456789abcdef' in the tracking store" in err
    assert [r.info.run_id for r in runs_of("finished")] == [run.info.run_id]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_unreachable_tracking_store_fails_at_once_in_one_line(
        mnist_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        command: str) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        start = time.monotonic()
        code, _, err = run_cli([command, *TINY, "--data-dir", str(mnist_root)], capsys,
                               monkeypatch)
        elapsed = time.monotonic() - start
    finally:
        mlflow.set_tracking_uri(previous)
    assert code == 2 and err.count("\n") == 1, err
    assert f"tracking store {uri} cannot be reached" in err
    assert elapsed < 10


def test_sweep_resume_trains_only_the_unfinished_child_and_goes_on_from_its_checkpoint(
        tracking_store: str, mnist_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST", data / "MNIST")
    victim = data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    original = victim.read_bytes()
    # One child after another: the second opens MNIST after the first has trained.
    args = ["sweep", "--variant", "opt:0,opt:0.05", "--workers", "1", "--data-dir", str(data),
            "--experiment", "faulty-sweep", *TRAIN_ARGS]
    process = mnist_mlflow(tracking_store, *args)
    try:
        client = MlflowClient(tracking_store)
        # The first child has its data in memory; the second will find a cut-short file.
        wait_for_epoch(client, process, "faulty-sweep", 1)
        victim.write_bytes(original[:100])
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 1, err[-2000:]
    assert "1 of 2 sweep children did not finish (s1 opt d0.05 e2 n4096 t256 FAILED)" in (
        err.strip().splitlines()[-1])
    [parent] = [r for r in runs_of("faulty-sweep") if r.data.tags.get(ROLE_TAG) == "sweep"]
    parent_id = parent.info.run_id
    assert parent.info.status == "FAILED"
    assert [parent.data.tags[f"children_{s}"] for s in ("finished", "failed", "killed")] == [
        "1", "1", "0"]
    first, failed = children_of("faulty-sweep", parent_id)
    assert (first.info.run_name, first.info.status) == ("s1 opt e2 n4096 t256", "FINISHED")
    assert (failed.info.run_name, failed.info.status) == ("s1 opt d0.05 e2 n4096 t256", "FAILED")
    assert str(victim) in failed.data.tags["failure_reason"]

    victim.write_bytes(original)  # the file is fetched again
    # sweep --resume, itself stopped by SIGTERM while it trains the child again...
    resumed = mnist_mlflow(tracking_store, "sweep", "--resume", parent_id, "--data-dir",
                           str(data))
    try:
        retrained_id = wait_for_epoch(client, resumed, "faulty-sweep", 1, {first.info.run_id})
        resumed.send_signal(signal.SIGTERM)
        _, err = resumed.communicate(timeout=60)
    finally:
        resumed.kill()
    assert resumed.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(
        f"run {retrained_id} ended KILLED; resume it with: mnist-mlflow sweep --resume {parent_id}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED"
    assert [parent.data.tags[f"children_{s}"] for s in ("finished", "failed", "killed")] == [
        "1", "0", "1"]

    # ...and once more (no signal to send: in this process): the killed child goes on from
    # its checkpoint, in the same run.
    code, out, err = run_cli(["sweep", "--resume", parent_id, "--data-dir", str(data)], capsys,
                             monkeypatch)
    assert code == 0, err[-2000:]
    assert f"sweep {parent_id}: all 2 children finished" in out
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert [parent.data.tags[f"children_{s}"] for s in ("finished", "failed", "killed")] == [
        "2", "0", "0"]
    children = children_of("faulty-sweep", parent_id)
    assert [c.info.run_id for c in children] == [first.info.run_id, failed.info.run_id,
                                                 retrained_id]
    assert client.get_run(first.info.run_id).info == first.info  # never trained again
    assert client.get_run(failed.info.run_id).info.status == "FAILED"  # its record stays
    retrained = client.get_run(retrained_id)
    # The same configuration and seed again: told apart from the failed run by its name.
    assert (retrained.info.run_name, retrained.info.status) == ("s1 #2 opt d0.05 e2 n4096 t256",
                                                                "FINISHED")
    assert retrained.data.params["dropout"] == failed.data.params["dropout"] == "0.05"
    assert retrained.data.tags["resumed_after_epochs"] == "1"
    assert [m.step for m in client.get_metric_history(retrained_id, "test_acc")] == [1, 2]
