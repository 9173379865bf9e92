"""A training run leaves a complete MLflow run: params, per-epoch metrics, tags, files, model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.predict import load_model
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import param_text
from mnist_mlflow.training import EpochMetrics, create_state, fit
from tests.conftest import tiny_config, use_store
from tests.helpers import model_uri, train_one

EPOCH_METRICS = ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds"]


@pytest.fixture(scope="module")
def finished_run(store_dir: Path, mnist_root: Path):
    """One tracked tiny run, shared by the tests that read what it logged."""
    config = tiny_config(dropout=0.05, epochs=3)
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        result = train_one(config, mnist_root, "unit", progress=False)
    return config, result, MlflowClient().get_run(result.run_id)


def test_run_logs_every_setting_as_a_param(store: str, finished_run) -> None:
    config, _, run = finished_run
    params, tags = run.data.params, run.data.tags
    # Every setting: a param, or a tag for how it ran (threads), with the same value.
    for name, value in config.as_params().items():
        # Booleans as `mlflow run` spells them (`false`): one spelling whatever started it.
        assert (tags if name == "threads" else params)[name] == param_text(value), name
    assert params["num_params"] == "6132"
    # How it ran is a tag (a resumed run may go on elsewhere), with why auto chose it.
    assert tags["resolved_device"] == "cpu"
    assert tags["compile_reason"] == "auto: eager on the CPU"
    assert tags["torch_version"] == torch.__version__
    assert "torchvision_version" in tags
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("s1 opt d0.05 ")


def test_run_logs_one_value_per_epoch_for_each_metric(store: str, finished_run) -> None:
    config, result, run = finished_run
    client = MlflowClient()
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2, 3], name
    test_acc = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "test_acc"),
                                        key=lambda m: m.step)]
    # Logged to the digits they mean: 0.01 points of accuracy.
    assert test_acc == [round(m.test_acc, 2) for m in result.history]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")] == [0.01] * 3
    metrics = run.data.metrics  # summary metrics rounded: accuracies to 0.01 points
    assert metrics["best_test_acc"] == round(max(test_acc), 2)
    assert test_acc[int(metrics["best_epoch"]) - 1] == pytest.approx(max(test_acc))
    last = result.history[-1]
    assert metrics["final_gap"] == round(last.train_acc - last.test_acc, 2)


def test_run_tags_and_artifacts(store: str, finished_run) -> None:
    _, _, run = finished_run
    tags = run.data.tags
    assert tags["variant"] == "opt" and tags["dropout_enabled"] == "true"
    assert tags["mnist_md5.train-images-idx3-ubyte"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert tags["mnist_md5.t10k-labels-idx1-ubyte"] == "ec29112dd5afa0611ce80d1b7f02629c"
    client = MlflowClient()
    paths = {f.path for f in client.list_artifacts(run.info.run_id)}
    paths |= {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/training_curves.png", "training.log", "model_summary.txt"} <= paths
    log_text = Path(client.download_artifacts(run.info.run_id, "training.log")).read_text()
    assert log_text.count("epoch ") >= 3 and "test_acc" in log_text
    summary = Path(client.download_artifacts(run.info.run_id, "model_summary.txt")).read_text()
    assert "[1, 10, 26, 26]" in summary and "6,132" in summary


def served_scores(run_id: str, mnist_root: Path, test_limit: int) -> tuple[np.ndarray, float]:
    """The logged model's scores for raw test pixels, and its accuracy % on them."""
    model = load_model(model_uri(run_id))
    images, labels = load_mnist(mnist_root, test_limit=test_limit).test_tensors()
    scores = np.asarray(model.predict((images.float() / 255).unsqueeze(1).numpy()))
    return scores, 100.0 * (scores.argmax(axis=1) == labels.numpy()).mean()


def test_logged_model_predicts_real_test_images(store: str, finished_run, mnist_root: Path) -> None:
    config, result, run = finished_run
    scores, accuracy = served_scores(run.info.run_id, mnist_root, config.test_limit)
    assert scores.shape == (config.test_limit, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    # Normalization lives in the logged model: raw pixels in, the run's own test accuracy out.
    assert accuracy == pytest.approx(result.history[-1].test_acc, abs=0.5)


def test_compiled_run_logs_a_model_that_scores_as_the_run_did(store: str,
                                                              mnist_root: Path) -> None:
    """`--compile on` trains a compiled NHWC model (as CUDA does by default); what is logged
    is the plain module, and it serves the accuracy the run logged."""
    config = tiny_config(compile="on", threads=1, train_limit=640, epochs=1)
    result = train_one(config, mnist_root, "unit", progress=False)
    run = MlflowClient().get_run(result.run_id)
    assert (run.data.tags["resolved_compile"],
            run.data.tags["resolved_channels_last"]) == ("true", "true")
    _, accuracy = served_scores(run.info.run_id, mnist_root, config.test_limit)
    assert accuracy == pytest.approx(result.history[-1].test_acc, abs=0.5)


@pytest.mark.parametrize("pipeline", ["fast", "torchvision"])
def test_same_seed_on_cpu_gives_the_same_metrics(mnist_root: Path, pipeline: str) -> None:
    config = tiny_config(dropout=0.05, pipeline=pipeline)
    data = load_mnist(mnist_root, config.train_limit, config.test_limit)

    def train(config: TrainConfig) -> list[EpochMetrics]:
        built = build_pipeline(config, data, resolve(config))
        return fit(config, create_state(config, resolve(config), built.steps_per_epoch), built,
                   progress=False)

    runs = [train(config) for _ in range(2)]
    strip = [[{k: v for k, v in m.to_record().items() if k != "epoch_seconds"} for m in h]
             for h in runs]
    assert strip[0] == strip[1]
    other_seed = train(tiny_config(dropout=0.05, pipeline=pipeline, seed=2))
    assert other_seed[0].train_loss != runs[0][0].train_loss


def test_a_second_run_of_one_configuration_is_logged_by_its_own_name(
        store: str, mnist_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The runs table cuts long names at about 20 characters: the number that tells a second
    run from the first comes within them, and the log line prints the name as the UI does."""
    config = tiny_config(epochs=1)
    train_one(config, mnist_root, "same-config")
    with caplog.at_level(logging.INFO, logger="mnist_mlflow"):
        second = train_one(config, mnist_root, "same-config")
    name = MlflowClient().get_run(second.run_id).info.run_name
    seed, rest = config.run_name.split(" ", 1)
    assert name == f"{seed} #2 {rest}"
    assert name[:20] != config.run_name[:20]
    assert f"run {second.run_id}: training {name} on " in caplog.text


def test_a_run_tested_on_one_image_logs_a_model_that_takes_any_batch(
        store: str, mnist_root: Path) -> None:
    # MLflow exports the model with an example of the test images: an example of one image
    # would fix the exported program to batches of one.
    result = train_one(tiny_config(epochs=1, test_limit=1, val_size=0), mnist_root,
                       "one-test-image")
    scores = np.asarray(load_model(model_uri(result.run_id)).predict(
        np.zeros((5, 1, 28, 28), np.float32)))
    assert scores.shape == (5, 10)
