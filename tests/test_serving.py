"""The production model in use: `predict` on image files and a real `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

from benchmarks.common import free_port
from benchmarks.framing_accuracy import IMAGES, read_set
from mnist_mlflow.data import load_mnist
from mnist_mlflow.models import INVALID_PIXELS
from mnist_mlflow.predict import DEFAULT_MODEL_URI, load_model
from mnist_mlflow.registry import promote, register_run
from tests.conftest import tiny_config, use_store
from tests.helpers import model_uri, run_cli, train_one

COUNT = 10  # MNIST test images per test
SERVER_START_LIMIT_S = 120
# What framing adds on the font digits, at least, with this quick model (about 93% on
# MNIST): it measured 22% resized whole, 60% framed. benchmarks/README.md has the full
# models' figures.
FRAMING_GAIN = 0.2


@pytest.fixture(scope="module")
def production(store_dir: Path, mnist_root: Path) -> str:
    """`mnist-cnn@production`: one epoch on 6,000 images (about 93%), enough for easy digits."""
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        config = tiny_config(epochs=1, train_limit=6000, test_limit=1000, lr=0.05,
                             batch_size=32)
        run_id = train_one(config, mnist_root, "serving", progress=False).run_id
        version = register_run(run_id, "mnist-cnn", "best_test_acc", "for the serving tests")
        promote("mnist-cnn", str(version.version))
    return run_id


@pytest.fixture(scope="module")
def test_images(store_dir: Path, production: str,
                mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images (uint8 (N, 28, 28)) and labels that the model gets right from arrays.

    The model is a quick one (about 93%); taking digits it classifies correctly from the raw
    arrays makes these tests about the image files and the server, not about its accuracy.
    """
    images, labels = load_mnist(mnist_root, test_limit=100).test_tensors()
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        model = load_model(model_uri(production))
        predicted = np.asarray(model.predict(as_model_input(images.numpy()))).argmax(axis=1)
    right = np.flatnonzero(predicted == labels.numpy())[:COUNT]
    assert len(right) == COUNT
    return images.numpy()[right], labels.numpy()[right]


def as_model_input(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255)[:, np.newaxis]


def test_pngs_of_mnist_test_images_are_predicted_as_their_labels(
        store: str, production: str, test_images: tuple[np.ndarray, np.ndarray],
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = test_images
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray(image).save(paths[-1])

    code, out, err = run_cli(["predict", *map(str, paths)], capsys, monkeypatch)

    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in paths]
    assert [int(line.split(": ")[1].split(" ")[0]) for line in lines] == labels.tolist()
    probabilities = [float(line.split("(p=")[1].rstrip(")")) for line in lines]
    assert all(0.1 < p <= 1.0 for p in probabilities)


def test_any_size_dark_on_light_image_reads_like_mnist_and_bad_files_are_named(
        store: str, production: str, test_images: tuple[np.ndarray, np.ndarray],
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = test_images
    # Ink on paper, three times the size, as a colour JPEG.
    paper = Image.fromarray(255 - images[0]).resize((84, 84)).convert("RGB")
    paper.save(tmp_path / "paper.jpg", quality=95)
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(images[1]).save(tmp_path / "digit.png")

    code, out, err = run_cli(["predict", str(tmp_path / "paper.jpg"), str(tmp_path / "notes.png"),
                              str(tmp_path / "digit.png"), str(tmp_path / "missing.png")],
                             capsys, monkeypatch)

    assert code == 1
    assert out.splitlines()[0].startswith(f"{tmp_path / 'paper.jpg'}: {labels[0]} (p=")
    assert out.splitlines()[1].startswith(f"{tmp_path / 'digit.png'}: {labels[1]} (p=")
    errors = err.splitlines()
    assert f"Error: {tmp_path / 'notes.png'}: not an image" in errors[0]
    assert f"Error: {tmp_path / 'missing.png'}: no such file" in errors[1]
    assert "2 of 4 files could not be predicted" in errors[2]


def test_framing_reads_digits_not_cut_like_mnist_better_than_resizing(
        store: str, production: str) -> None:
    """The shipped font digits (`tests/data/make_font_digits.py`) through the same model,
    resized whole as `predict` used to, and framed as MNIST's digits were made: the
    framing benchmark's own reading of them."""
    _, labels, batches = read_set(IMAGES)
    model = load_model(model_uri(production))
    accuracy = {name: (np.asarray(model.predict(batch)).argmax(axis=1) == labels).mean()
                for name, batch in batches.items()}
    assert accuracy["MNIST framing"] >= accuracy["whole-frame resize"] + FRAMING_GAIN, accuracy


def test_an_unknown_model_is_one_line(store: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (28, 28)).save(tmp_path / "blank.png")
    code, _, err = run_cli(["predict", "--model-uri", "models:/no-such-model@production",
                            str(tmp_path / "blank.png")], capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and "cannot load model 'models:/no-such-model@production'" in err


def test_mlflow_models_serve_answers_with_ten_scores_per_image(
        store: str, production: str, test_images: tuple[np.ndarray, np.ndarray],
        store_dir: Path) -> None:
    images, labels = test_images
    port = free_port()
    log_path = store_dir / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", DEFAULT_MODEL_URI,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
            # As docs/gpu.md says to serve on a GPU machine: the pt2 model's weights are on
            # the CPU and cannot move (a no-op here, where CUDA is absent).
            env={**os.environ, "MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"},
            start_new_session=True)  # its own process group, so its workers go with it
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log_path)
        url = f"http://127.0.0.1:{port}/invocations"
        response = requests.post(url, json={"inputs": as_model_input(images).tolist()},
                                 timeout=60)
        assert response.status_code == 200, response.text
        scores = np.array(strict_json(response.text)["predictions"])
        for bad in (float("nan"), float("inf"), -float("inf"), 1e308, -0.5, 2.0):
            pixels = as_model_input(images[:2]).astype(np.float64)  # 1e308 as sent
            pixels[1, 0, 14, 14] = bad
            refused = requests.post(url, data=json.dumps({"inputs": pixels.tolist()}),
                                    headers={"Content-Type": "application/json"}, timeout=60)
            assert refused.status_code == 400, (bad, refused.text[:500])
            assert INVALID_PIXELS in strict_json(refused.text)["stack_trace"], bad
        again = requests.post(url, json={"inputs": as_model_input(images).tolist()}, timeout=60)
        assert again.status_code == 200 and strict_json(again.text)["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    assert scores.shape == (COUNT, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert scores.argmax(axis=1).tolist() == labels.tolist()
    direct = load_model(DEFAULT_MODEL_URI).predict(as_model_input(images))
    np.testing.assert_allclose(scores, np.asarray(direct), atol=1e-5)
    assert MlflowClient().get_model_version_by_alias("mnist-cnn", "production").run_id == \
        production


def strict_json(text: str) -> dict:
    """JSON as strict parsers read it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in a JSON answer")
    return json.loads(text, parse_constant=refuse)


def wait_until_up(url: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll `url` until it answers, the server exits, or the start limit passes."""
    deadline = time.monotonic() + SERVER_START_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited {server.returncode}:\n"
                        f"{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer within {SERVER_START_LIMIT_S} s:\n"
                f"{log_path.read_text()[-3000:]}")
