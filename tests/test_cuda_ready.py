"""The CUDA path, checked on the CPU by patching what CUDA answers: what the first GPU user
would otherwise hit (models that do not load, compile without a toolchain, Dynamo's recompile
limit in sweeps, resuming on another machine, emulated bf16, TF32 in evaluation)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException
from torch import nn

from mnist_mlflow import runtime as runtime_module
from mnist_mlflow import training
from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import MnistData, build_pipeline, load_mnist
from mnist_mlflow.models import GlobalAvgPool, build_model
from mnist_mlflow.predict import load_model
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import CHECKPOINT_DIR, LEGACY_CHECKPOINT, rounded
from mnist_mlflow.training import create_state, evaluate, fit
from tests.conftest import tiny_config, use_store
from tests.helpers import model_uri, run_cli, train_one


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA says it is there, on an A100 (compute capability 8.0) with Triton and a compiler."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(runtime_module, "triton_installed", lambda: True)
    monkeypatch.setattr(runtime_module, "python_headers", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(runtime_module, "c_compiler", lambda: "/usr/bin/gcc")


@pytest.fixture(scope="module")
def logged_run(store_dir: Path, mnist_root: Path) -> str:
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        return train_one(tiny_config(epochs=1), mnist_root, "cuda-ready",
                             progress=False).run_id


def test_a_logged_model_loads_and_predicts_where_cuda_is_available(
        store: str, logged_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = model_uri(logged_run)
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    expected = np.asarray(load_model(uri).predict(images))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # What MLflow does on its own there: it picks CUDA for a model exported on the CPU.
    with pytest.raises(MlflowException, match="can't be loaded on 'cuda' device"):
        mlflow.pyfunc.load_model(uri)
    scores = np.asarray(load_model(uri).predict(images))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.shape == (3, 10) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    # docs/gpu.md's advice for `mlflow models serve` on a GPU machine.
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    np.testing.assert_allclose(mlflow.pyfunc.load_model(uri).predict(images), expected,
                               rtol=1e-6)


def test_predict_works_where_cuda_is_available(
        store: str, logged_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    image = tmp_path / "digit.png"
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[6:22, 13:15] = 255  # a "1": framing needs ink
    Image.fromarray(pixels).save(image)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, out, err = run_cli(["predict", "--model-uri", model_uri(logged_run),
                              str(image)], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(f"{image}: ")


def test_auto_on_a_gpu_with_a_toolchain_compiles_with_cuda_graphs_in_bf16(gpu: None) -> None:
    run = resolve(TrainConfig())
    assert run.device.type == "cuda" and run.compile and run.cuda_graphs and run.channels_last
    assert run.autocast_dtype == torch.bfloat16
    assert run.compile_reason == "auto: compiled with CUDA graphs"


@pytest.mark.parametrize(("missing", "reason"), [
    ("triton", "Triton is not installed"),
    ("compiler", "no C compiler"),
    ("headers", "Python.h is missing"),
    ("capability", "compute capability 6.1 is below Triton's 7.0"),
])
def test_compile_auto_is_eager_where_compiling_cannot_work(
        gpu: None, monkeypatch: pytest.MonkeyPatch, missing: str, reason: str) -> None:
    if missing == "triton":
        monkeypatch.setattr(runtime_module, "triton_installed", lambda: False)
    elif missing == "compiler":
        monkeypatch.undo()  # the real probe, pointed at a compiler that is not there
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(runtime_module, "triton_installed", lambda: True)
        monkeypatch.setenv("CC", "/nonexistent/cc")
    elif missing == "headers":
        monkeypatch.setattr(runtime_module, "python_headers", lambda: False)
    else:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    run = resolve(TrainConfig())
    assert not run.compile and not run.cuda_graphs
    assert run.compile_reason.startswith("auto: eager, ") and reason in run.compile_reason
    assert run.channels_last  # NHWC is for cuDNN, compiled or not
    # What the user asks for explicitly is kept (and falls back at run time if it must).
    assert resolve(TrainConfig(compile="on")).compile


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), None), ((7, 0), None),
                                                   ((8, 0), torch.bfloat16),
                                                   ((9, 0), torch.bfloat16)])
def test_precision_auto_is_bf16_only_where_the_gpu_has_it_natively(
        gpu: None, monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
        dtype: torch.dtype | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # torch says yes on a T4 or V100 too, through emulation: that is not what auto asks.
    run = resolve(TrainConfig())
    assert run.autocast_dtype == dtype
    if dtype is None:
        assert "no native bf16" in run.precision_reason
    assert resolve(TrainConfig(precision="bf16")).autocast_dtype == torch.bfloat16


def test_on_the_cpu_auto_is_eager_fp32_nchw() -> None:
    run = resolve(TrainConfig(device="cpu"))
    assert (run.compile, run.autocast_dtype, run.channels_last) == (False, None, False)
    assert resolve(TrainConfig(device="cpu", compile="on")).channels_last
    assert resolve(TrainConfig(device="cpu", precision="bf16")).autocast_dtype == torch.bfloat16


def test_deterministic_auto_trains_eager_on_a_gpu(gpu: None) -> None:
    run = resolve(TrainConfig(deterministic=True))
    assert run.deterministic and not run.compile and "deterministic" in run.compile_reason


@pytest.fixture(scope="module")
def two_shapes(mnist_root: Path) -> MnistData:
    """100 images at batch 64: a full batch and a partial one, the two graphs of an epoch."""
    return load_mnist(mnist_root, train_limit=100, test_limit=64, val_size=tiny_config().val_size)


def train_children(data: MnistData, dropouts: list[float]) -> list[str]:
    """Like a sweep in one process: each dropout trained compiled; the fallbacks recorded."""
    fallbacks = []
    for dropout in dropouts:
        config = tiny_config(dropout=dropout, compile="on", epochs=1, train_limit=100,
                             test_limit=64, threads=1)
        runtime = resolve(config)
        pipeline = build_pipeline(config, data, runtime)
        state = create_state(config, runtime, pipeline.steps_per_epoch)
        fit(config, state, pipeline, progress=False, on_compile_fallback=fallbacks.append)
    return fallbacks


DROPOUTS = [0.0, 0.05, 0.1, 0.15, 0.2]


def test_five_dropout_variants_with_two_batch_shapes_compile_in_one_process(
        two_shapes: MnistData, monkeypatch: pytest.MonkeyPatch) -> None:
    # Dynamo's graph counting without Inductor's code generation, which costs seconds a graph.
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        assert train_children(two_shapes, DROPOUTS) == []


def test_without_a_reset_between_children_the_limit_is_hit_and_recorded_as_eager(
        two_shapes: MnistData, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the reset prevents, and that a child which hits the limit anyway says so."""
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    fallbacks = train_children(two_shapes, DROPOUTS)
    assert fallbacks and all("RecompileLimit" in reason for reason in fallbacks)


def test_a_compile_that_fails_falls_back_to_eager_and_the_run_says_so(
        store: str, mnist_root: Path, tmp_path: Path) -> None:
    """A C++ compiler that is not there (as on a machine without build tools). In its own
    process: Inductor caches what it found out about the compiler."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "CXX": "/nonexistent/g++",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # no kernels built before
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mnist_mlflow", "train", "--compile", "on", "--epochs", "1",
         "--train-limit", "512", "--test-limit", "256", "--device", "cpu", "--threads", "1",
         "--data-dir", str(mnist_root), "--experiment", "compile-fallback"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.compile failed" in done.stderr and "training eager instead" in done.stderr
    client = MlflowClient()
    experiment = client.get_experiment_by_name("compile-fallback")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resolved_compile"] == "false"
    assert "C++ compiler" in run.data.tags["compile_fallback"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(client.download_artifacts(run.info.run_id, "training.log", tmp))
        assert "torch.compile failed" in log.read_text()


def test_evaluate_turns_tf32_off_and_restores_it(two_shapes: MnistData) -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cudnn.conv.fp32_precision,
                         torch.backends.cuda.matmul.fp32_precision))
            return torch.zeros(len(images), 10)

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    try:
        images, labels = two_shapes.test_tensors()
        evaluate(Probe(), [(images.float().unsqueeze(1), labels)])
        assert seen == [("ieee", "ieee")]
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_training_leaves_threads_and_deterministic_mode_as_it_found_them(
        two_shapes: MnistData) -> None:
    threads = torch.get_num_threads()
    config = tiny_config(model="gap5k", deterministic=True, threads=1, epochs=1,
                         train_limit=100, test_limit=64)
    runtime = resolve(config)
    pipeline = build_pipeline(config, two_shapes, runtime)
    state = create_state(config, runtime, pipeline.steps_per_epoch)
    during = []
    fit(config, state, pipeline, progress=False,
        on_epoch=lambda *_: during.append((torch.get_num_threads(),
                                           torch.are_deterministic_algorithms_enabled())))
    assert during == [(1, True)]
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_gap_nets_pool_with_a_plain_mean_that_matches_adaptive_avg_pool() -> None:
    # AdaptiveAvgPool2d's backward has no deterministic CUDA kernel.
    for name in ("gap8k", "gap5k"):
        assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in build_model(name, 0).modules())
    x = torch.randn(4, 12, 5, 5)
    torch.testing.assert_close(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x))


def test_a_checkpoint_with_eight_gpu_rng_states_restores_the_training_device_s_only(
        two_shapes: MnistData, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(epochs=1, train_limit=100, test_limit=64)
    runtime = resolve(config)
    state = create_state(config, runtime, 2)
    saved = state.state_dict()
    assert set(saved["rng"]) == {"cpu"}  # a CPU run keeps no GPU state
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    saved["rng"]["cuda"] = gpu_states  # as checkpoints of an 8-GPU machine held them
    state.load_state_dict(saved)  # on the CPU: nothing to restore on a GPU
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new_state, device="cuda": restored.append((new_state, device)))
    on_one_gpu = create_state(config, runtime, 2)
    on_one_gpu.runtime = dataclasses.replace(runtime, device=torch.device("cuda", 0))
    on_one_gpu.load_state_dict(saved)
    [(new_state, device)] = restored
    assert torch.equal(new_state, gpu_states[0]) and device == torch.device("cuda", 0)


def test_a_run_recorded_on_cuda_resumes_on_this_cpu_with_device_cpu(
        store: str, mnist_root: Path, two_shapes: MnistData, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA run (device=cuda, 8 GPUs' RNG states) killed after epoch 1, resumed here."""
    cpu = tiny_config(epochs=2, train_limit=100, test_limit=64)
    twin = [m.to_record() for m in fit(cpu, *_state_and_pipeline(cpu, two_shapes),
                                          progress=False)]
    state, pipeline = _state_and_pipeline(cpu, two_shapes)
    history = [m.to_record() for m in fit(dataclasses.replace(cpu, epochs=1), state, pipeline,
                                          progress=False)]
    checkpoint = {"state": state.state_dict(), "history": history}
    checkpoint["state"]["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    recorded = dataclasses.replace(cpu, device="cuda")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cuda-ready") or client.get_experiment(
        client.create_experiment("cuda-ready"))
    run_id = client.create_run(experiment.experiment_id, run_name="on-a-gpu").info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in recorded.as_params().items()])
    # As runs made before per-epoch checkpoints kept it: resumed all the same.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(LEGACY_CHECKPOINT).name
        torch.save(checkpoint, path)
        client.log_artifact(run_id, str(path), CHECKPOINT_DIR)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))

    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [
        f"Error: run {run_id} trained with --device cuda and CUDA is not available here; "
        "resume it with --device cpu"]
    assert client.get_run(run_id).info.status == "KILLED"

    code, _, err = run_cli(["train", "--resume", run_id, "--device", "cpu", "--data-dir",
                            str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["device"] == "cuda"  # what was asked for at the start stays
    assert run.data.tags["resolved_device"] == "cpu"
    # Where each resumption ran, and which code (commit, or package version) it ran.
    assert run.data.tags["resumed_on"].startswith("after epoch 1: cpu, fp32, eager, ")
    second = {m.key: m.value for m in (client.get_metric_history(run_id, key)[-1]
                                       for key in ("train_loss", "test_loss", "test_acc"))}
    assert second == {k: rounded(k, twin[1][k]) for k in second}  # logged as rounded


def _state_and_pipeline(config: TrainConfig, data: MnistData):
    runtime = resolve(config)
    pipeline = build_pipeline(config, data, runtime)
    return create_state(config, runtime, pipeline.steps_per_epoch), pipeline
