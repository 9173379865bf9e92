"""Phases and recipes: `sweep --phase NAME --seeds ...`, OneCycleLR, and RESULTS.md."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.phases import PHASES, phase_configs
from mnist_mlflow.results import meets_target
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import ROLE_TAG
from mnist_mlflow.selection import Group, RunSummary
from mnist_mlflow.training import EpochMetrics, create_state, fit
from tests.conftest import tiny_config
from tests.helpers import children_of, run_cli, runs_of

TINY = ["--epochs", "3", "--train-limit", "512", "--test-limit", "256", "--device", "cpu"]


def test_phase_sweep_over_seeds_then_results_from_the_runs(
        store: str, store_dir: Path, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["sweep", "--phase", "gap", "--seeds", "1,2", *TINY, "--data-dir", str(mnist_root),
            "--experiment", "phases"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    (parent,) = [r for r in runs_of("phases") if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert parent.data.params["phase"] == "gap"
    assert parent.data.params["seeds"] == "1,2"
    assert parent.data.params["variants"] == "gap8k:0,gap5k:0"
    assert parent.data.tags["mnist_mlflow.command"] == "mnist-mlflow " + " ".join(args)
    plan = json.loads(Path(MlflowClient().download_artifacts(
        parent.info.run_id, "sweep_plan.json")).read_text())
    assert [(c["model"], c["seed"]) for c in plan] == [
        ("gap8k", 1), ("gap5k", 1), ("gap8k", 2), ("gap5k", 2)]
    children = children_of("phases", parent.info.run_id)
    # Every child carries its seed, and the parent says what it trains.
    assert [c.info.run_name for c in children] == [
        "s1 gap8k e3 lr0.05 onecycle n512 t256", "s1 gap5k e3 lr0.05 onecycle n512 t256",
        "s2 gap8k e3 lr0.05 onecycle n512 t256", "s2 gap5k e3 lr0.05 onecycle n512 t256"]
    assert parent.info.run_name == "sweep gap: gap8k, gap5k s1-2"
    for child in children:
        params = child.data.params
        assert child.info.status == "FINISHED"
        assert child.data.tags["mnist_mlflow.phase"] == "gap"
        # The phase's recipe, with the options given on the command line on top.
        assert (params["scheduler"], params["batch_size"], params["epochs"]) == (
            "onecycle", "64", "3")
        history = MlflowClient().get_metric_history(child.info.run_id, "test_acc")
        last3 = min(m.value for m in history)  # 3 epochs: all of them are the last 3
        assert child.data.metrics["min_test_acc_last3"] == round(last3, 2)  # rounded: 0.01

    results = store_dir / "RESULTS.md"
    compare = ["compare", "--experiment", "phases", "--metric", "min_test_acc_last3",
               "--no-register", "--results", str(results)]
    code, out, err = run_cli(compare, capsys, monkeypatch)
    assert code == 0, err
    text = results.read_text()
    assert "mnist-mlflow " + " ".join(compare) in text  # how the file itself was made
    assert "## Phase `gap`" in text and " ".join(args) in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| gap")}
    for name in ("gap8k-dropout0", "gap5k-dropout0"):
        runs = [c for c in children if c.data.params["model"] == name.split("-")[0]]
        values = [r.data.metrics["min_test_acc_last3"] for r in runs]
        row = rows[name]
        assert row[2] == PHASES["gap"].chosen_by  # how the recipe was picked, truthfully
        assert row[3] == f"{int(runs[0].data.params['num_params']):,}"
        assert row[5] == "1,2"
        assert row[9] == f"{min(values):.2f}"
        assert row[10] == " / ".join(f"{v:.2f}" for v in values)
        val = [r.data.metrics["final_val_acc"] for r in runs]
        low, high = (float(x) for x in row[6].split("[")[1].rstrip("]").split(", "))
        # The mean of the seeds (from their per-image records), inside its interval.
        assert row[6].startswith(f"{statistics.fmean(val):.2f} [")
        assert low < statistics.fmean(val) < high
        assert row[-1] == "no"  # two seeds: the target asks for three (checked below)
    assert "## Targets, for the recipe validation picks" in text
    assert "- **gap8k** (7,580 parameters): chosen on validation from 1 recipe(s)" in text


@pytest.mark.parametrize(("last3", "num_params", "epochs", "met"), [
    ([99.41, 99.40, 99.52], 7580, 15, True),
    ([99.41, 99.39, 99.52], 7580, 15, False),  # one seed below
    ([99.41, 99.45], 7580, 15, False),  # two seeds are not three
    ([99.41, 99.40, 99.52], 8000, 15, False),  # not fewer than 8,000 parameters
    ([99.41, 99.40, 99.52], 4974, 16, False),  # more than 15 epochs
])
def test_the_target_is_met_only_by_every_one_of_three_seeds(
        last3: list[float], num_params: int, epochs: int, met: bool) -> None:
    config = TrainConfig(model="gap8k", epochs=epochs)
    runs = tuple(RunSummary(f"run{seed}", f"seed{seed}", seed, "FINISHED", num_params, {},
                            {"min_test_acc_last3": v}, dataclasses.replace(config, seed=seed))
                 for seed, v in enumerate(last3))
    assert meets_target(Group(config.config_group, runs)) is met


def test_phases_name_valid_configs_and_the_seed_phase_is_the_seeds_runs() -> None:
    for name in PHASES:
        assert phase_configs(name, {})
    seed = phase_configs("seed", {})
    assert [(c.model, c.dropout, c.epochs, c.scheduler) for c in seed] == [
        ("opt", 0.0, 20, "step"), ("opt", 0.05, 20, "step")]
    assert all(c.epochs <= 15 for c in phase_configs("gap", {}))
    assert {c.threads for c in phase_configs("gap", {"threads": 1})} == {"1"}


def train(config, data) -> tuple[list[EpochMetrics], object]:
    pipeline = build_pipeline(config, data, resolve(config))
    state = create_state(config, resolve(config), pipeline.steps_per_epoch)
    return fit(config, state, pipeline, progress=False), state


@pytest.fixture(scope="module")
def data(mnist_root: Path):
    return load_mnist(mnist_root, train_limit=640, test_limit=256)


def test_onecycle_warms_up_to_lr_then_anneals_stepping_every_batch(data) -> None:
    config = tiny_config(scheduler="onecycle", lr=0.05, epochs=5, batch_size=64,
                         train_limit=640, threads=1)
    history, state = train(config, data)
    lrs = [m.lr for m in history]  # the rate at each epoch's first step
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4]
    assert max(lrs) <= 0.05
    assert state.scheduler.last_epoch == 5 * 10  # ten batches an epoch
    assert state.optimizer.param_groups[0]["lr"] < 0.05 / 100  # annealed to ~0 at the end


def test_onecycle_run_resumes_exactly_from_a_checkpointed_state(data) -> None:
    config = tiny_config(scheduler="onecycle", lr=0.05, epochs=3, dropout=0.05,
                         label_smoothing=0.1, translate=0.1, scale=0.1, train_limit=640,
                         threads=1)
    straight, _ = train(config, data)
    pipeline = build_pipeline(config, data, resolve(config))
    state = create_state(config, resolve(config), pipeline.steps_per_epoch)
    # Stop after epoch 1 (a callback raising, as Ctrl-C would), keep the state dict, go on.
    saved: dict[str, object] = {}

    class Stop(Exception):
        pass

    def stop_after_first(metrics: EpochMetrics, trained) -> None:
        saved.update(trained.state_dict())
        raise Stop

    with pytest.raises(Stop):
        fit(config, state, pipeline, on_epoch=stop_after_first, progress=False)
    resumed = create_state(config, resolve(config), pipeline.steps_per_epoch)
    resumed.load_state_dict(saved)
    rest = fit(config, resumed, pipeline, progress=False)
    strip = [{k: v for k, v in m.to_record().items() if k != "epoch_seconds"}
             for m in straight[1:]]
    assert strip == [{k: v for k, v in m.to_record().items() if k != "epoch_seconds"}
                     for m in rest]
