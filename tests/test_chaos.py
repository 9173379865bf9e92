"""Chaos: a store turned read-only, a run killed while it finished, and what comes after."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow.mlrun import lease_tags
from tests.helpers import run_cli, runs_of
from tests.test_interrupt import mnist_mlflow
from tests.test_nothing_lost import TINY, all_runs


def test_a_read_only_store_is_one_line_for_commands_that_record_and_still_reads(
        tracking_store: str, mnist_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["train", *TINY, "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err
    database = tmp_path / "mlflow.db"
    for target in (database, tmp_path):  # the database immutable, then its folder
        read_only_store(target, tracking_store, database, mnist_root, capsys, monkeypatch)


def read_only_store(target: Path, tracking_store: str, database: Path, mnist_root: Path,
                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # As a backup tool or a full quota leaves it; root ignores permission bits, not this.
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode:
        pytest.skip("chattr +i is not allowed here (it needs root on a filesystem with it)")
    try:
        before = database.read_bytes()
        for args in (["train", *TINY], ["sweep", *TINY], ["compare", "--no-register"]):
            code, _, err = run_cli([*args, "--data-dir", str(mnist_root)], capsys, monkeypatch)
            assert code == 2 and err.count("\n") == 1, err
            assert f"tracking store {tracking_store} is read-only: {target} cannot be " \
                   "written (attempt to write a readonly database)" in err
        code, out, err = run_cli(["models"], capsys, monkeypatch)  # read: none registered
        assert "no registered model 'mnist-cnn'" in err and "read-only" not in err, err
        code, out, err = run_cli(["runs", "--stale"], capsys, monkeypatch)
        assert code == 0, err
        assert database.read_bytes() == before
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


SUMMARY = ("final_val_acc", "final_test_acc", "best_test_acc", "final_gap",
           "min_test_acc_last3")


def assert_finished_once(client: MlflowClient, run_id: str) -> None:
    """FINISHED, each summary metric logged once, one logged model and it READY."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in SUMMARY:
        assert len(client.get_metric_history(run_id, key)) == 1, key
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    assert [m.status.name for m in models] == ["READY"]


def test_killed_after_its_summary_a_resumed_run_logs_nothing_twice(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["train", *TINY, "--val-size", "256", "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 0, err
    [run] = all_runs()
    run_id = run.info.run_id
    # What kill -9 leaves between the summary metrics and the run's end: RUNNING, the model
    # READY, the summary logged, a lease naming a process that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, *lease_tags(gone.pid).popitem())
    assert run_cli(["runs", "--stale", "--mark-killed"], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 0, err
    assert_finished_once(client, run_id)


def test_killed_while_logging_its_model_a_resumed_run_leaves_no_pending_model(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(tracking_store)
    process = mnist_mlflow(tracking_store, "train", *TINY, "--val-size", "256", "--data-dir",
                           str(mnist_root), "--experiment", "cut-short")
    try:
        deadline = time.monotonic() + 120
        models: list = []
        while not models and time.monotonic() < deadline and process.poll() is None:
            found = client.get_experiment_by_name("cut-short")
            models = mlflow.search_logged_models(experiment_ids=[found.experiment_id],
                                                 output_format="list") if found else []
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # while the model is being logged
        process.communicate(timeout=30)
    finally:
        process.kill()
    [run] = runs_of("cut-short")
    if run.info.status == "FINISHED":
        pytest.fail("the run ended before the kill: this machine logs the model too fast")
    assert run_cli(["runs", "--stale", "--mark-killed"], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["train", "--resume", run.info.run_id, "--data-dir",
                            str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err
    assert_finished_once(client, run.info.run_id)


def test_a_sweep_killed_while_creating_a_child_resumes_and_ends_the_orphan(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the sweep between creating a child run and logging its settings (found by
    benchmarks/chaos.py: every `sweep --resume` then stopped on the child without params)."""
    from mlflow.entities import RunStatus

    from mnist_mlflow.mlrun import MlflowRun
    from mnist_mlflow.schema import ROLE_TAG, TRAIN_ROLE
    from mnist_mlflow.sweep import ORPHAN_CHILD, create_child, start_parent, sweep_configs
    from tests.conftest import tiny_config

    configs = sweep_configs(tiny_config(epochs=1, threads=1), [("opt", 0.0), ("opt", 0.05)])
    parent = start_parent("orphan", configs)
    create_child(parent, configs[0])
    orphan = MlflowRun.create("orphan", configs[1].run_name, parent_run_id=parent.run_id,
                              tags={ROLE_TAG: TRAIN_ROLE})  # then the kill: no params
    parent.end(RunStatus.KILLED, "process gone")  # as `runs --stale --mark-killed` leaves it

    code, _, err = run_cli(["sweep", "--resume", parent.run_id, "--data-dir",
                            str(mnist_root)], capsys, monkeypatch)

    assert code == 0, err
    client = MlflowClient()
    ended = client.get_run(orphan.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["failure_reason"] == ORPHAN_CHILD
    trained = [r for r in runs_of("orphan") if r.data.tags.get(ROLE_TAG) == TRAIN_ROLE
               and r.info.run_id != orphan.run_id]
    assert sorted(r.data.params["dropout"] for r in trained) == ["0.0", "0.05"]
    assert all(r.info.status == "FINISHED" for r in trained)
    assert client.get_run(parent.run_id).info.status == "FINISHED"
