"""Registration and the `production`/`previous` aliases, on real tiny runs with real models."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.data import load_mnist
from mnist_mlflow.models import InferenceModel, build_model
from mnist_mlflow.predict import load_model
from mnist_mlflow.registry import PREVIOUS, PRODUCTION
from mnist_mlflow.tracking import SIGNATURE, pip_requirements, train_tracked
from tests.conftest import tiny_config, use_store
from tests.helpers import run_cli

EXPERIMENT = "registry"


@pytest.fixture(scope="module")
def better_worse(store_dir: Path, mnist_root: Path) -> tuple[str, str]:
    """Two real tiny runs, as (lower test_loss, higher test_loss): a strict order for the rule."""
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        run_ids = [train_tracked(tiny_config(epochs=1, dropout=dropout), mnist_root, EXPERIMENT,
                                 progress=False).run_id for dropout in (0.0, 0.05)]
        losses = {r: MlflowClient().get_run(r).data.metrics["test_loss"] for r in run_ids}
    assert len(set(losses.values())) == 2
    better, worse = sorted(run_ids, key=losses.get)
    return better, worse


def compare_only(run_id: str, model: str, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch, *extra: str) -> str:
    """`compare` restricted to one run, selecting by test_loss; returns its stdout."""
    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT, "--metric", "test_loss",
                              "--filter", f"attributes.run_id = '{run_id}'",
                              "--model-name", model, *extra], capsys, monkeypatch)
    assert code == 0, err
    return out


def aliases(model: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in
            MlflowClient().get_registered_model(model).aliases.items()}


def version_of(model: str, run_id: str) -> str:
    versions = MlflowClient().search_model_versions(f"name = '{model}'")
    return next(str(v.version) for v in versions if v.run_id == run_id)


def test_compare_registers_the_choice_and_production_predicts_real_images(
        store: str, better_worse: tuple[str, str], mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT], capsys, monkeypatch)
    assert code == 0, err
    client = MlflowClient()
    chosen_id = out.split("Chosen: ")[1].split("(")[1].split(")")[0]
    chosen = client.get_run(chosen_id)
    version = client.get_model_version("mnist-cnn", "1")
    assert version.run_id == chosen_id
    assert aliases("mnist-cnn") == {PRODUCTION: "1"}
    assert version.tags == {"selection_metric": "best_test_acc",
                            "best_test_acc": str(chosen.data.metrics["best_test_acc"]),
                            "run_name": chosen.info.run_name}
    assert chosen_id in version.description and "highest `best_test_acc`" in version.description
    assert "production -> version 1 (no version was production yet)" in out

    # The same choice again: no second version, the alias stays.
    code, out, _ = run_cli(["compare", "--experiment", EXPERIMENT], capsys, monkeypatch)
    assert code == 0 and "version 1 is already production" in out
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 1

    model = load_model("models:/mnist-cnn@production")
    images, labels = load_mnist(mnist_root, test_limit=256).test_tensors()
    scores = np.asarray(model.predict((images.float() / 255).unsqueeze(1).numpy()))
    assert scores.shape == (256, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = 100.0 * float((scores.argmax(axis=1) == labels.numpy()).mean())
    # The served model is the evaluated one: same accuracy on the same 256 test images.
    assert abs(accuracy - chosen.data.metrics["test_acc"]) <= 100 / 256


def test_a_better_version_takes_production_and_the_old_one_becomes_previous(
        store: str, better_worse: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    better, worse = better_worse
    compare_only(worse, "moves", capsys, monkeypatch)
    out = compare_only(better, "moves", capsys, monkeypatch)
    assert aliases("moves") == {PRODUCTION: version_of("moves", better),
                                PREVIOUS: version_of("moves", worse)}
    assert "beats" in out


def test_a_worse_version_is_registered_but_production_stays_unless_forced(
        store: str, better_worse: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    better, worse = better_worse
    compare_only(better, "keeps", capsys, monkeypatch)
    out = compare_only(worse, "keeps", capsys, monkeypatch)
    assert aliases("keeps") == {PRODUCTION: version_of("keeps", better)}
    assert f"production stays at version {version_of('keeps', better)}" in out
    assert "does not beat" in out

    compare_only(worse, "keeps", capsys, monkeypatch, "--force")
    assert aliases("keeps") == {PRODUCTION: version_of("keeps", worse),
                                PREVIOUS: version_of("keeps", better)}


def test_promote_rolls_back_and_models_lists_the_versions(
        store: str, better_worse: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    better, worse = better_worse
    compare_only(worse, "rollback", capsys, monkeypatch)
    compare_only(better, "rollback", capsys, monkeypatch)
    assert aliases("rollback") == {PRODUCTION: "2", PREVIOUS: "1"}

    code, out, err = run_cli(["promote", "--model-name", "rollback", "--version", "1"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert aliases("rollback") == {PRODUCTION: "1", PREVIOUS: "2"}

    code, out, err = run_cli(["promote", "--model-name", "rollback", "--version", "7"],
                             capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "has no version '7'" in err
    assert aliases("rollback") == {PRODUCTION: "1", PREVIOUS: "2"}

    code, out, err = run_cli(["models", "--model-name", "rollback"], capsys, monkeypatch)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    client = MlflowClient()
    for row, run_id, alias in zip(rows, (worse, better), (PRODUCTION, PREVIOUS), strict=True):
        loss = client.get_run(run_id).data.metrics["test_loss"]
        assert alias in row and f"test_loss {loss}" in row and run_id in row

    code, _, err = run_cli(["models", "--model-name", "nothing"], capsys, monkeypatch)
    assert code == 2 and "no registered model 'nothing'" in err


def test_production_never_points_at_a_failed_run(
        store: str, better_worse: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    compare_only(better_worse[0], "guarded", capsys, monkeypatch)
    # A version registered by hand from a run that then failed (a real logged model).
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="failed-after-logging") as run:
        mlflow.pytorch.log_model(InferenceModel(build_model("opt", 0.0)).eval(), name="model",
                                 signature=SIGNATURE, pip_requirements=pip_requirements(),
                                 input_example=np.zeros((1, 1, 28, 28), np.float32))
    MlflowClient().set_terminated(run.info.run_id, "FAILED")
    failed_version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "guarded").version

    code, _, err = run_cli(["promote", "--model-name", "guarded", "--version",
                            str(failed_version)], capsys, monkeypatch)

    assert code == 2 and err.count("\n") == 1 and "is FAILED" in err
    assert aliases("guarded") == {PRODUCTION: "1"}


def test_a_run_without_a_model_leaves_the_registry_untouched(
        store: str, better_worse: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    source = client.get_run(better_worse[0])
    run = client.create_run(source.info.experiment_id, run_name="metrics-only")
    for key, value in source.data.params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in source.data.metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)

    code, _, err = run_cli(["compare", "--experiment", EXPERIMENT, "--model-name", "no-model",
                            "--filter", f"attributes.run_id = '{run.info.run_id}'"],
                           capsys, monkeypatch)

    assert code == 2 and "has no logged model to register" in err
    assert client.search_registered_models("name = 'no-model'") == []
