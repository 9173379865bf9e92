"""Stacked seeds: several seeds of one configuration in one vmap'd pass, each ending where it
would have ended alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import UserError
from mnist_mlflow.data import Batch, Pipeline, build_pipeline, load_mnist
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import ROLE_TAG
from mnist_mlflow.stacked import StackedSeeds
from mnist_mlflow.training import create_state, fit, fit_seeds
from tests.conftest import tiny_config
from tests.helpers import children_of, run_cli, runs_of

SEEDS = (1, 2, 3)


class InFloat64:
    """A pipeline's batches in float64. A float32 run and its stacked twin round differently
    (a grouped convolution sums in another order); through ReLU and max-pooling such a
    difference can pick another maximum and grow tenfold a step, as between runs with 1 and
    2 threads. In float64 it stays far below the tolerance: what is left to compare is what
    each seed computes, not how its sums round."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.steps_per_epoch, self.num_val = inner.steps_per_epoch, inner.num_val

    def train_batches(self, seed: int) -> Iterator[Batch]:
        return ((x.double(), y) for x, y in self.inner.train_batches(seed))

    def val_batches(self) -> Iterator[Batch]:
        return ((x.double(), y) for x, y in self.inner.val_batches())

    def test_batches(self) -> Iterator[Batch]:
        return ((x.double(), y) for x, y in self.inner.test_batches())


@pytest.mark.parametrize("settings", [
    {"model": "opt", "dropout": 0.05},  # the seed's recipe: StepLR, rotation, dropout masks
    {"model": "gap8k", "dropout": 0.1, "scheduler": "onecycle", "lr": 0.05,
     "label_smoothing": 0.05, "translate": 0.1, "scale": 0.1},
])
def test_each_stacked_seed_ends_as_it_would_alone(mnist_root: Path,
                                                  settings: dict[str, object]) -> None:
    base = tiny_config(train_limit=512, test_limit=256, epochs=2, threads=1, **settings)
    configs = [dataclasses.replace(base, seed=seed) for seed in SEEDS]
    data = load_mnist(mnist_root, base.train_limit, base.test_limit, base.val_size)
    runtime = resolve(base)
    pipeline = InFloat64(build_pipeline(base, data, runtime))
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the models' parameters and statistics
    try:
        alone = []
        for config in configs:
            state = create_state(config, runtime, pipeline.steps_per_epoch)
            alone.append((fit(config, state, pipeline, progress=False), state))
        stack = StackedSeeds(configs, runtime, pipeline.steps_per_epoch)
        stacked = fit_seeds(stack, pipeline, progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    for (history, state), stacked_history, stacked_state in zip(
            alone, stacked, stack.states, strict=True):
        assert len(stacked_history) == len(history) == 2
        for solo, together in zip(history, stacked_history, strict=True):
            for name, value in solo.values.items():
                if name == "epoch_seconds":
                    continue
                assert together.values[name] == pytest.approx(value, rel=1e-7, abs=1e-9), name
        # The state each seed is left in (what its checkpoint and logged model hold).
        for (name, solo), together in zip(state.model.state_dict().items(),
                                          stacked_state.model.state_dict().values(),
                                          strict=True):
            assert torch.allclose(solo, together, rtol=1e-7, atol=1e-9), name
        solo_momentum = [state.optimizer.state[p]["momentum_buffer"]
                         for p in state.model.parameters()]
        stacked_momentum = [stacked_state.optimizer.state[p]["momentum_buffer"]
                            for p in stacked_state.model.parameters()]
        for solo, together in zip(solo_momentum, stacked_momentum, strict=True):
            assert torch.allclose(solo, together, rtol=1e-7, atol=1e-9)
        assert stacked_state.epoch == state.epoch == 2


def test_only_seeds_may_differ_in_a_stack(mnist_root: Path) -> None:
    configs = [tiny_config(seed=1), tiny_config(seed=2, dropout=0.1)]
    with pytest.raises(UserError, match="everything but the seed"):
        StackedSeeds(configs, resolve(configs[0]), 4)


def test_a_stacked_sweep_logs_each_seed_to_its_own_child_as_if_alone(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["sweep", "--stack-seeds", "--variant", "opt:0.05", "--seeds", "1,2",
                              "--epochs", "2", "--train-limit", "512", "--test-limit", "256",
                              "--device", "cpu", "--threads", "1", "--data-dir",
                              str(mnist_root), "--experiment", "stacked"], capsys, monkeypatch)
    assert code == 0, err
    [parent] = [r for r in runs_of("stacked") if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = children_of("stacked", parent.info.run_id)
    assert [c.info.run_name for c in children] == ["s1 opt d0.05 e2 n512 t256",
                                                   "s2 opt d0.05 e2 n512 t256"]
    client = MlflowClient()
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["stacked_seeds"] == "1,2"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "test_acc")] == [
            1, 2]
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {
            "checkpoints", "plots", "predictions", "training.log"}
        [model] = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id],
                                              filter_string=f"source_run_id = "
                                                            f"'{child.info.run_id}'",
                                              output_format="list")
        assert model.status == "READY"
    # Two seeds, two trainings: not one seed's numbers logged twice.
    first, second = (client.get_metric_history(c.info.run_id, "train_loss")[-1].value
                     for c in children)
    assert first != second


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "ray"], "--stack-seeds trains the stacked seeds in this process"),
    (["--workers", "2"], "--stack-seeds trains the stacked seeds in this process"),
    (["--compile", "on"], "--stack-seeds trains eager"),
])
def test_stacked_sweep_options_that_cannot_apply_are_one_line(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    code, _, err = run_cli(["sweep", "--stack-seeds", *args, "--data-dir", str(mnist_root),
                            "--experiment", "never-stacked"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert runs_of("never-stacked") == []
