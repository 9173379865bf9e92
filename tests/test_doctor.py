"""`mnist-mlflow doctor`: a store broken the ways a user's store breaks (a trainer gone, a
cleanup job deleting a run's files, records that disagree with their metrics, a version whose
model is gone under `production`) is checked in one table, and `--repair` mends what it
safely can, tags the rest, deletes nothing, and leaves every command working past it.
Real training on a slice of MNIST, a real SQLite store, the real command line in process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow import registry
from mnist_mlflow.records import Records
from mnist_mlflow.schema import (
    BROKEN_TAG,
    BROKEN_VERSION_TAG,
    CODE_DIRTY_TAG,
    COMPARISON_ROLE,
    FAILURE_REASON_TAG,
    FINAL_VAL_ACC,
    LEASE_TAG,
    PREDICTIONS_DIR,
    ROLE_TAG,
    TRAIN_ROLE,
    records_artifact,
)
from tests.conftest import tiny_config
from tests.helpers import craft_run, run_cli, train_one

EXPERIMENT = "doctor"
MODEL = "doctor-cnn"


def artifacts_dir(run_id: str) -> Path:
    return Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://"))


def model_dir(run_id: str) -> Path:
    uri = registry.logged_model_uri(run_id)
    assert uri is not None
    model = MlflowClient().get_logged_model(uri.removeprefix("models:/"))
    return Path(model.artifact_location.removeprefix("file://"))


@pytest.fixture(scope="module")
def broken(store_dir: Path, mnist_root: Path) -> dict[str, str]:
    """Four real runs of one configuration (seeds 1-4), then the faults, by role:
    `whole` untouched (registered as version 2), `records` without its validation records,
    `gone` without its model files and checkpoints (registered as version 1, production),
    `wrong` with test records that disagree with its metrics; a trainer gone (RUNNING, its
    pid dead) and a comparison that FAILED."""
    with pytest.MonkeyPatch.context() as patch:
        from tests.conftest import use_store

        use_store(store_dir, patch)
        results = [train_one(tiny_config(seed=seed, epochs=1), mnist_root, EXPERIMENT)
                   for seed in (1, 2, 3, 4)]
        whole, records, gone, wrong = (r.run_id for r in results)
        client = MlflowClient()
        registry.register_run(gone, MODEL, FINAL_VAL_ACC, "to be broken")
        registry.move_production(MODEL, "1", "first")
        registry.register_run(whole, MODEL, FINAL_VAL_ACC, "whole")

        (artifacts_dir(records) / records_artifact("validation")).unlink()
        shutil.rmtree(model_dir(gone))
        shutil.rmtree(artifacts_dir(gone) / "checkpoints")
        test_records = artifacts_dir(wrong) / records_artifact("test")
        found = Records.read(test_records)
        Records(found.index, found.label, (found.label + 1) % 10, found.p_predicted
                ).write(test_records)

        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        finished = subprocess.Popen(["true"])
        finished.wait()  # a pid no process holds: its trainer is gone
        stale = client.create_run(experiment_id, run_name="trainer-gone", tags={
            ROLE_TAG: TRAIN_ROLE,
            LEASE_TAG: f"pid {finished.pid} on {socket.gethostname()}, heartbeat "
                       f"{time.time():.0f}"}).info.run_id
        failed = client.create_run(experiment_id, run_name="comparison-failed", tags={
            ROLE_TAG: COMPARISON_ROLE, FAILURE_REASON_TAG: "OSError: disk full"}).info.run_id
        client.set_terminated(failed, "FAILED")
    return {"whole": whole, "records": records, "gone": gone, "wrong": wrong,
            "stale": stale, "failed": failed, "store_dir": str(store_dir)}


def doctor(args: list[str], capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> tuple[int, str, str]:
    return run_cli(["doctor", "--experiment", EXPERIMENT, "--data-dir", str(data_dir), *args],
                   capsys, monkeypatch)


def row_of(out: str, run_id: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith("|") and run_id in line]
    assert len(rows) == 1, out
    return rows[0]


def test_doctor_names_every_fault_and_repair_mends_or_tags_each_deleting_nothing(
        store: str, broken: dict[str, str], mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    runs_before = {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id])}

    code, out, err = doctor([], capsys, monkeypatch, mnist_root)

    assert code == 1, err
    assert "checked 6 runs and 2 registered versions: 7 problems" in out
    assert broken["whole"] not in out
    assert "validation records gone" in row_of(out, broken["records"])
    gone = row_of(out, broken["gone"])
    assert "model files gone (models:/m-" in gone and "checkpoint of epoch 1 gone" in gone
    assert "test records say " in row_of(out, broken["wrong"])
    assert "RUNNING, but process gone (pid" in row_of(out, broken["stale"])
    assert "a comparison that FAILED: OSError: disk full" in row_of(out, broken["failed"])
    assert f"| {MODEL} version 1 (@production) " in out and "its model files are gone" in out
    assert f"{MODEL}@production" in out and "--version 2" in out
    # Checking changed nothing.
    assert client.get_run(broken["stale"]).info.status == "RUNNING"

    code, out, err = doctor(["--repair"], capsys, monkeypatch, mnist_root)

    assert code == 1, err  # production still points at the broken version: kept, reported
    assert f"repaired run trainer-gone ({broken['stale']}): marked KILLED" in out
    assert client.get_run(broken["stale"]).info.status == "KILLED"
    # The records scored again from the run's own model agree with its metrics.
    rescored = client.get_run(broken["records"])
    assert BROKEN_TAG not in rescored.data.tags
    assert records_artifact("validation") in {
        a.path for a in client.list_artifacts(broken["records"], PREDICTIONS_DIR)}
    assert "model files gone" in client.get_run(broken["gone"]).data.tags[BROKEN_TAG]
    assert "test records say" in client.get_run(broken["wrong"]).data.tags[BROKEN_TAG]
    assert BROKEN_TAG in client.get_run(broken["failed"]).data.tags
    assert BROKEN_VERSION_TAG in client.get_model_version(MODEL, "1").tags
    after = out.split("After the repairs:")[1]
    assert "1 problem\n" in after and f"{MODEL}@production" in after
    # Nothing deleted.
    assert {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id])} == runs_before
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2

    # A broken version cannot be promoted; the healthy one can, and then the store is whole.
    code, out, err = run_cli(["promote", "--model-name", MODEL, "--version", "1"], capsys,
                             monkeypatch)
    assert code != 0 and "cannot be production: tagged broken (" in err
    code, out, err = run_cli(["models", "--model-name", MODEL], capsys, monkeypatch)
    assert code == 0 and "Note: version 1 (production) is broken: tagged broken (" in out
    code, out, err = run_cli(["promote", "--model-name", MODEL, "--version", "2"], capsys,
                             monkeypatch)
    assert code == 0, err

    code, out, err = doctor([], capsys, monkeypatch, mnist_root)

    assert code == 0, out
    assert "the store is whole" in out
    assert "4 tagged broken by an earlier repair" in out  # three runs and version 1

    # Every command leaves the tagged runs out, saying why, and judges the rest.
    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT, "--model-name", MODEL,
                              "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err
    for role in ("gone", "wrong"):
        assert f"({broken[role]}): tagged broken (" in err
    # A broken run can still be checked: `reproduce` reruns it from its record, saying so.
    code, out, err = run_cli(["reproduce", broken["gone"], "--data-dir", str(mnist_root)],
                             capsys, monkeypatch)
    assert code == 0, err
    assert f"({broken['gone']}) is tagged broken (model files gone" in out
    assert len([r for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        f"tags.{ROLE_TAG} = '{COMPARISON_ROLE}' and attributes.status = 'FAILED'")]) == 1


def test_doctor_of_an_unknown_experiment_is_one_line_and_a_whole_store_exits_0(
        tmp_path: Path, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import use_store

    use_store(tmp_path, monkeypatch)
    code, out, err = doctor([], capsys, monkeypatch, mnist_root)
    assert code == 2 and err.strip().splitlines() == [
        f"Error: no experiment named {EXPERIMENT!r} in {mlflow.get_tracking_uri()}"], err

    code, out, err = run_cli(["doctor"], capsys, monkeypatch)
    assert code == 0, err
    assert "checked 0 runs and 0 registered versions: the store is whole" in out


def test_a_compare_that_fails_leaves_no_failed_comparison_run_behind_per_try(
        tracking_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.entities import ViewType

    for seed, accuracy in ((1, 99.0), (2, 99.1)):
        craft_run("fails", f"run-{seed}", accuracy, seed=seed)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("fails").experiment_id
    folder = tmp_path / "mlruns" / experiment_id
    folder.mkdir(parents=True, exist_ok=True)
    # Its report cannot be written (as a full quota or a backup tool leaves a folder).
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not allowed here (it needs root on a filesystem with it)")
    try:
        for _ in range(2):
            code, out, err = run_cli(["compare", "--experiment", "fails", "--no-register"],
                                     capsys, monkeypatch)
            assert code != 0 and err.count("\n") == 1, err
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    query = f"tags.{ROLE_TAG} = '{COMPARISON_ROLE}'"
    assert client.search_runs([experiment_id], query) == []
    # Kept by MLflow, with why it failed: `mlflow runs restore` brings one back.
    deleted = client.search_runs([experiment_id], query, ViewType.DELETED_ONLY)
    assert [r.info.status for r in deleted] == ["FAILED", "FAILED"]
    assert all(FAILURE_REASON_TAG in r.data.tags for r in deleted)


def test_a_version_whose_run_was_deleted_and_a_run_whose_patch_is_gone_are_named(
        tracking_store: str, saved_model: Path, mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registered = craft_run("deleted", "registered", 99.0, model=saved_model)
    registry.register_run(registered, "deleted-cnn", FINAL_VAL_ACC, "its run will be deleted")
    client = MlflowClient()
    client.delete_run(registered)  # by hand, in the UI: the version stays
    dirty = craft_run("deleted", "dirty", 99.1, seed=2, model=saved_model)
    client.set_tag(dirty, CODE_DIRTY_TAG, "true")  # made from uncommitted changes...
    # ...whose patch (what `reproduce --at-commit` rebuilds the code from) is not there.

    code, out, err = run_cli(["doctor", "--data-dir", str(mnist_root)], capsys, monkeypatch)

    assert code == 1, err
    version = [line for line in out.splitlines() if "| deleted-cnn version 1 " in line]
    assert len(version) == 1 and (f"its source run registered ({registered}) was deleted; "
                                  f"restore it with `mlflow runs restore --run-id "
                                  f"{registered}`") in version[0]
    assert "code/uncommitted.patch gone (`reproduce --at-commit` needs it)" in row_of(out, dirty)

    code, out, err = run_cli(["doctor", "--repair", "--data-dir", str(mnist_root)], capsys,
                             monkeypatch)
    assert code == 0, out
    assert BROKEN_VERSION_TAG in client.get_model_version("deleted-cnn", "1").tags
    assert client.get_run(registered).info.lifecycle_stage == "deleted"  # still restorable
