"""Shared fixtures: a private copy of MNIST and a real SQLite MLflow store per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

# Two test workers share the machine (pyproject's addopts): with torch's default of one
# OpenMP thread per core, each worker's threads wait on the other's and a 1 s training takes
# a minute. Set before torch is imported; subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import load_mnist

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("MNIST_SHARED_DIR", REPO.parent / "shared" / "mnist"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a copy of ../shared/mnist/MNIST, extracted once per test run."""
    source = SHARED_MNIST / "MNIST"
    if not (source / "raw").is_dir():
        pytest.fail(f"MNIST copy not found at {source} (set MNIST_SHARED_DIR)")
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(source, root / "MNIST")
    load_mnist(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def empty_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new, empty SQLite store as MLflow creates one, built once per test process:
    MLflow builds a store by running all its schema migrations (seconds of CPU), and copying
    the result takes a millisecond."""
    global _EMPTY_STORE
    _EMPTY_STORE = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{_EMPTY_STORE}").search_experiments()
    return _EMPTY_STORE


_EMPTY_STORE: Path | None = None


def empty_store(folder: Path) -> str:
    """A new, empty SQLite store at `folder`/mlflow.db, copied from the template; its URI.
    Its Default experiment keeps its artifacts under `folder`, as in a store created there."""
    assert _EMPTY_STORE is not None, "the empty_store_template fixture has not run"
    shutil.copyfile(_EMPTY_STORE, folder / "mlflow.db")
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as database, database:
        database.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                         (str(folder / "mlruns" / "0"),))
    return f"sqlite:///{folder / 'mlflow.db'}"


def use_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point MLflow at a SQLite store in `folder` (a new one unless there is one) and make
    `folder` the working directory."""
    if not (folder / "mlflow.db").exists():
        empty_store(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store in `tmp_path`, which is also the working directory."""
    yield use_store(tmp_path, monkeypatch)
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one SQLite store for all tests of a module: a new store costs seconds,
    so tests share it and keep apart by experiment or registered-model name."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def store(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLflow pointed at the module's shared store for this test."""
    return use_store(store_dir, monkeypatch)


def tiny_config(**overrides: object) -> TrainConfig:
    """A configuration that trains in about a second: a slice of MNIST, few epochs, CPU."""
    settings = {"train_limit": 512, "test_limit": 256, "val_size": 256, "epochs": 2,
                "device": "cpu"}
    return TrainConfig(**(settings | overrides))


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow model (an untrained `opt` net, as training logs it) saved once, which
    crafted runs attach as their logged model: registering and loading it is real."""
    import numpy as np
    import torch

    from mnist_mlflow.models import InferenceModel, build_model
    from mnist_mlflow.record import SIGNATURE, pip_requirements

    folder = tmp_path_factory.mktemp("model") / "saved"
    torch.manual_seed(0)
    mlflow.pytorch.save_model(InferenceModel(build_model("opt", 0.0)).eval(), str(folder),
                              signature=SIGNATURE, pip_requirements=pip_requirements(),
                              # Four images, as training logs: an example of one would
                              # specialize the exported program to batches of one.
                              input_example=np.zeros((4, 1, 28, 28), np.float32))
    return folder

