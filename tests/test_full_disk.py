"""A disk that fills: while a run writes a checkpoint, while it logs its model and records,
and while MNIST is extracted. On a real, small tmpfs (mounting needs root: skipped without).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from benchmarks.common import fill
from mnist_mlflow.schema import checkpoint_artifact
from tests.conftest import SHARED_MNIST
from tests.helpers import run_cli, runs_of
from tests.test_chaos import assert_finished_once
from tests.test_interrupt import mnist_mlflow, wait_for_epoch

# Epochs of about 2 s on one thread: time to fill the disk between two checkpoints.
TRAIN = ["--train-limit", "6144", "--test-limit", "256", "--val-size", "256", "--device", "cpu",
         "--threads", "1"]


def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` for the test."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}):"
                    " the full-disk tests need root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def artifact_disk(tmp_path: Path) -> Iterator[Path]:
    yield from small_disk(tmp_path / "disk", "16m")


def train_until_the_disk_fills(store: str, disk: Path, mnist_root: Path, epochs: int,
                               fill_after: int) -> tuple[MlflowClient, str, str]:
    """`train` with its artifacts on `disk`, which fills once epoch `fill_after` is logged;
    the client, the run and what the trainer said."""
    client = MlflowClient(store)
    client.create_experiment("full-disk", artifact_location=str(disk / "artifacts"))
    trainer = mnist_mlflow(store, "train", *TRAIN, "--epochs", str(epochs), "--data-dir",
                           str(mnist_root), "--experiment", "full-disk")
    try:
        run_id = wait_for_epoch(client, trainer, "full-disk", fill_after)
        # Held still while the disk fills: its next write is the first to find it full.
        trainer.send_signal(signal.SIGSTOP)
        fill(disk)
        trainer.send_signal(signal.SIGCONT)
        _, err = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
    assert trainer.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return client, run_id, err.strip().splitlines()[-1]


def test_a_disk_full_at_a_checkpoint_fails_the_run_keeps_the_last_and_resume_finishes(
        tracking_store: str, artifact_disk: Path, mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    client, run_id, said = train_until_the_disk_fills(tracking_store, artifact_disk,
                                                      mnist_root, epochs=3, fill_after=1)

    assert said.startswith(f"Error: no space left on device writing {checkpoint_artifact(2)} "
                           "to the run's artifacts in ")
    assert f"(disk {artifact_disk}, 0.0 MiB free)" in said
    assert said.endswith(f"run {run_id} ended FAILED; its checkpoints up to epoch 1 of 3 are "
                         f"intact; free space, then resume it with: mnist-mlflow train "
                         f"--resume {run_id}")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("no space left on device writing")
    # The checkpoint before is whole, and nothing of the one cut short is left.
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        checkpoint_artifact(1)]
    torch.load(client.download_artifacts(run_id, checkpoint_artifact(1), str(tmp_path)),
               weights_only=True)
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == [1]

    (artifact_disk / ".filler").unlink()
    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)

    assert code == 0, err
    assert_finished_once(client, run_id)
    for name in ("test_acc", "val_acc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        checkpoint_artifact(epoch) for epoch in (1, 2, 3)]


def test_a_disk_full_while_the_model_and_records_are_logged_then_resume_logs_them_once(
        tracking_store: str, artifact_disk: Path, mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    client, run_id, said = train_until_the_disk_fills(tracking_store, artifact_disk,
                                                      mnist_root, epochs=2, fill_after=2)

    assert said.startswith("Error: no space left on device writing its model, records and "
                           "pictures to ")
    assert said.endswith(f"its checkpoints up to epoch 2 of 2 are intact; free space, then "
                         f"resume it with: mnist-mlflow train --resume {run_id}")
    assert client.get_run(run_id).info.status == "FAILED"

    (artifact_disk / ".filler").unlink()
    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)

    assert code == 0, err
    assert_finished_once(client, run_id)
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"plots", "predictions", "training.log"} <= artifacts, artifacts


def test_a_data_folder_too_small_to_extract_mnist_is_one_line_and_leaves_no_cut_file(
        tracking_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Room for the .gz files (11 MiB), not for the 53 MiB they extract to.
    for disk in small_disk(tmp_path / "data", "16m"):
        raw = disk / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for archive in (SHARED_MNIST / "MNIST" / "raw").glob("*.gz"):
            shutil.copy(archive, raw)

        code, _, err = run_cli(["train", "--epochs", "1", "--data-dir", str(disk)], capsys,
                               monkeypatch)

        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"Error: no space left on device extracting MNIST in {raw} "
                              f"(disk {disk}, ")
        assert "free space, or point --data-dir at another disk" in err
        assert runs_of("Default") == [] and runs_of("mnist-optimization") == []
        assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(
            p.name for p in raw.glob("*.gz")), "a cut extracted file was left"
