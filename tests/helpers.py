"""Helpers shared by the sweep/compare/registry/serving tests: a reused store, the real CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest

from mnist_mlflow.cli import main


def use_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point MLflow (this process and subprocesses) at the SQLite store in `folder`.

    Creating a store costs seconds (schema migrations), so a module creates one and its
    tests keep apart by experiment or registered-model name.
    """
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run the real entry point (`main`, with its error mapping); (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mnist-mlflow", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
