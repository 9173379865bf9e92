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
from mnist_mlflow.record import SIGNATURE, pip_requirements
from mnist_mlflow.registry import PREVIOUS, PRODUCTION
from tests.conftest import tiny_config, use_store
from tests.helpers import run_cli, train_one

EXPERIMENT = "registry"


# Real tiny runs with real models, two seeds per group, `strong` three (at two, Welch's
# interval has one degree of freedom and seeds this small spread by 10 points), `single` one.
# `weak` (lr 1e-5) stays near chance; `twin` differs from `strong` only by a weight decay too
# small to matter.
GROUPS = {
    "weak": {"lr": 1e-5},
    "strong": {"lr": 0.05},
    "twin": {"lr": 0.05, "weight_decay": 1e-7},
    "single": {"lr": 0.05, "momentum": 0.8},
}
FILTERS = {
    "weak": "params.lr = '1e-05'",
    "strong": "params.lr = '0.05' and params.weight_decay = '0.0' and params.momentum = '0.9'",
    "twin": "params.weight_decay = '1e-07'",
    "single": "params.momentum = '0.8'",
}


@pytest.fixture(scope="module")
def groups(store_dir: Path, mnist_root: Path) -> dict[str, list[str]]:
    """Group name -> its run ids, trained for real (2 epochs on 2,048 images)."""
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        return {name: [train_one(tiny_config(epochs=2, train_limit=2048, seed=seed,
                                                 **settings), mnist_root, EXPERIMENT,
                                     progress=False).run_id
                       for seed in {"single": (1,), "strong": (1, 2, 3)}.get(name, (1, 2))]
                for name, settings in GROUPS.items()}


def compare_group(group: str, model: str, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch, *extra: str) -> str:
    """`compare` restricted to one group's runs; returns its stdout."""
    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT, "--filter", FILTERS[group],
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
        store: str, groups: dict[str, list[str]], mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = compare_group("strong", "mnist-cnn", capsys, monkeypatch)
    client = MlflowClient()
    chosen_id = out.split("Registered run: ")[1].split("(")[1].split(")")[0]
    assert chosen_id in groups["strong"]
    chosen = client.get_run(chosen_id)
    # The group's run with the highest validation accuracy.
    assert chosen.data.metrics["final_val_acc"] == max(
        client.get_run(r).data.metrics["final_val_acc"] for r in groups["strong"])
    version = client.get_model_version("mnist-cnn", "1")
    assert version.run_id == chosen_id
    assert aliases("mnist-cnn") == {PRODUCTION: "1"}
    assert version.tags | {"selection_metric": "final_val_acc",
                           "final_val_acc": str(chosen.data.metrics["final_val_acc"]),
                           "run_name": chosen.info.run_name,
                           "verdict": "production: first promotion"} == version.tags
    assert version.description.startswith(
        f"mnist-cnn version 1, {chosen.info.run_name} (final_val_acc "
        f"{chosen.data.metrics['final_val_acc']:.2f}), is production: the first promotion")
    assert "Test accuracy of its recipe" in version.description
    assert "95% CI" in version.description and "n = 3)" in version.description
    # The verdict in numbers (one group compared: no runner-up), and the reading.
    chosen_row = version.description.split("| **chosen** ")[1].split("\n")[0]
    assert "| 3 " in chosen_row and "95% CI" in chosen_row
    assert ("**Reading:** first promotion; no runner-up to measure it against."
            in version.description)
    assert version.tags["comparison_run"] in version.description
    assert "highest mean `final_val_acc`" in version.description
    assert "Production -> version 1 (first promotion)." in out

    # The same choice again: no second version, the alias stays.
    out = compare_group("strong", "mnist-cnn", capsys, monkeypatch)
    assert "is production already" in out and "Version 1 is already production." in out
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 1

    model = load_model("models:/mnist-cnn@production")
    images, labels = load_mnist(mnist_root, test_limit=256).test_tensors()
    scores = np.asarray(model.predict((images.float() / 255).unsqueeze(1).numpy()))
    assert scores.shape == (256, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = 100.0 * float((scores.argmax(axis=1) == labels.numpy()).mean())
    # The served model is the evaluated one: same accuracy on the same 256 test images.
    assert abs(accuracy - chosen.data.metrics["test_acc"]) <= 100 / 256


def test_production_moves_on_a_real_gain_only_or_when_forced(
        store: str, groups: dict[str, list[str]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = "honest"
    out = compare_group("weak", model, capsys, monkeypatch)
    assert "Production -> version 1 (first promotion)." in out

    out = compare_group("strong", model, capsys, monkeypatch)
    assert aliases(model) == {PRODUCTION: "2", PREVIOUS: "1"}
    assert "replaces version 1 (opt e2 lr1e-05" in out
    assert "n = 3 vs 2; image by image on the validation set" in out
    assert "moved on a real gain." in out
    assert "Production -> version 2 (a real gain); version 1 is now previous." in out

    out = compare_group("twin", model, capsys, monkeypatch)
    assert aliases(model) == {PRODUCTION: "2", PREVIOUS: "1"}  # registered, not promoted
    assert version_of(model, out.split("Registered run: ")[1].split("(")[1].split(")")[0]) == "3"
    assert "is registered but not production: version 2 (" in out
    assert "Why: weight_decay 1e-07 vs 0, final_val_acc: " in out and "within noise." in out
    assert "--force would move it anyway." in out
    assert "Production stays at version 2." in out

    # One seed: judged with the seed variance pooled over the other groups (here production's).
    out = compare_group("single", model, capsys, monkeypatch)
    assert aliases(model) == {PRODUCTION: "2", PREVIOUS: "1"}
    assert "momentum 0.8 vs 0.9, final_val_acc: " in out and "n = 1 vs 3" in out

    out = compare_group("twin", model, capsys, monkeypatch, "--force")
    assert aliases(model) == {PRODUCTION: "3", PREVIOUS: "2"}
    assert "Production -> version 3 (--force); version 2 is now previous." in out


def test_promote_rolls_back_and_models_lists_the_versions(
        store: str, groups: dict[str, list[str]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    worse, better = groups["weak"], groups["strong"]
    compare_group("weak", "rollback", capsys, monkeypatch)
    compare_group("strong", "rollback", capsys, monkeypatch)
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
    for row, run_ids, alias in zip(rows, (worse, better), (PRODUCTION, PREVIOUS), strict=True):
        run_id = next(r for r in run_ids if r in row)
        value = client.get_run(run_id).data.metrics["final_val_acc"]
        assert alias in row and f"final_val_acc {value}" in row
        assert "95% CI" in row  # the group promotion judged, not only the best seed

    code, _, err = run_cli(["models", "--model-name", "nothing"], capsys, monkeypatch)
    assert code == 2 and "no registered model 'nothing'" in err


def test_production_never_points_at_a_failed_run(
        store: str, groups: dict[str, list[str]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    compare_group("strong", "guarded", capsys, monkeypatch)
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


def test_a_run_without_a_model_is_compared_but_leaves_the_registry_untouched(
        store: str, groups: dict[str, list[str]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    source = client.get_run(groups["strong"][0])
    run = client.create_run(source.info.experiment_id, run_name="metrics-only")
    for key, value in source.data.params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in source.data.metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)

    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT, "--model-name",
                              "no-model", "--filter", f"attributes.run_id = '{run.info.run_id}'"],
                             capsys, monkeypatch)

    # Compared and reported; the run is named with what it lacks, and nothing registered.
    assert code == 0, err
    assert (f"run metrics-only ({run.info.run_id}) cannot be registered: has no logged "
            "model to register") in out
    assert "Not registered: no run of " in out and "Production stays as it was." in out
    assert client.search_registered_models("name = 'no-model'") == []
    [comparison] = [r for r in client.search_runs([run.info.experiment_id])
                    if r.data.tags.get("mnist_mlflow.role") == "comparison"
                    and r.info.start_time > run.info.start_time]
    assert comparison.info.status == "FINISHED"
