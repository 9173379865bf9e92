"""User mistakes: one line naming the problem, a non-zero exit, and no run created."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from torchvision import datasets

from tests.helpers import run_cli


def all_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True))


@pytest.mark.parametrize(("args", "named"), [
    (["--dropout", "abc"], "--dropout"),
    (["--epochs", "2.5"], "--epochs"),
    (["--dropout", "1.0"], "dropout"),
    (["--dropout", "-0.1"], "dropout"),
    (["--lr", "0"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--model", "resnet"], "model"),
    (["--device", "tpu"], "device"),
    (["--pipeline", "dali"], "pipeline"),
    (["--scheduler", "cosine"], "scheduler"),
    (["--label-smoothing", "1"], "label_smoothing"),
    (["--label-smoothing", "-0.1"], "label_smoothing"),
    (["--rotation", "-5"], "rotation"),
    (["--translate", "0.5"], "translate"),
    (["--scale", "1.0"], "scale"),
])
def test_bad_option_is_one_line_and_creates_no_run(
    tracking_store: str, mnist_root: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], args: list[str], named: str,
) -> None:
    code, _, err = run_cli(["train", "--data-dir", str(mnist_root), *args], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and named in lines[0], err
    assert "Traceback" not in err
    assert all_runs() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(
    tracking_store: str, mnist_root: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(["train", "--data-dir", str(mnist_root),
                            "--device", "cuda"], capsys, monkeypatch)
    assert code == 2 and "CUDA is not available" in err and all_runs() == 0


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_mnist_file_is_named_and_creates_no_run(
    tracking_store: str, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], damage: str,
) -> None:
    root = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST", root / "MNIST")
    victim = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    content = victim.read_bytes()
    altered = content[:500] + bytes([content[500] ^ 0xFF]) + content[501:]
    victim.write_bytes(content[:1000] if damage == "truncate" else altered)
    assert victim.read_bytes() != content
    code, _, err = run_cli(["train", "--data-dir", str(root)], capsys, monkeypatch)
    assert code == 2 and str(victim) in err and len(err.strip().splitlines()) == 1
    assert ("bytes" if damage == "truncate" else "checksum") in err
    assert victim.exists() and all_runs() == 0


def test_missing_mnist_file_is_named_when_it_cannot_be_downloaded(
    tracking_store: str, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_root / "MNIST" / "raw" / name, root / "MNIST" / "raw" / name)
    # Where a user's machine would download from: a closed local port, as when offline.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    code, _, err = run_cli(["train", "--data-dir", str(root)], capsys, monkeypatch)
    missing = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"MNIST file {missing} is missing" in err and "could not be downloaded" in err
    assert all_runs() == 0
