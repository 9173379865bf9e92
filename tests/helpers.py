"""Test helpers: the real command line in this process, and runs of an experiment."""

from __future__ import annotations

import sys

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow.cli import main


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


def runs_of(experiment: str) -> list[mlflow.entities.Run]:
    """Every run of `experiment` in the current store (none when it does not exist)."""
    found = MlflowClient().get_experiment_by_name(experiment)
    return [] if found is None else MlflowClient().search_runs([found.experiment_id])


def children_of(experiment: str, parent_id: str) -> list[mlflow.entities.Run]:
    """The child runs of `parent_id`, oldest first."""
    children = [r for r in runs_of(experiment)
                if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id]
    return sorted(children, key=lambda r: r.info.start_time)


def model_uri(run_id: str) -> str:
    """`models:/<id>` of the model `run_id` logged (named for its variant)."""
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    [model] = mlflow.search_logged_models([experiment_id], f"source_run_id = '{run_id}'",
                                          output_format="list")
    return f"models:/{model.model_id}"
