"""Honest comparison: a fixed validation split, groups over seeds, selection on validation,
Welch intervals for differences, and a `production` alias that does not move on noise."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from mnist_mlflow.comparison import (
    SEED_PROTOCOL,
    SelectionRule,
    compare,
    find_runs,
    group_runs,
    promotion_case,
    summary_table,
)
from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import TorchvisionPipeline, build_pipeline, load_mnist
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import CONFIG_GROUP_TAG
from mnist_mlflow.stats import Summary, welch
from mnist_mlflow.sweep import run_sweep
from tests.conftest import tiny_config
from tests.helpers import children_of, craft_run, run_cli, runs_of

# Crafted final accuracies of five seeds per group, spread as our real seeds spread (~0.1).
BASE = [99.21, 99.33, 99.27, 99.18, 99.30]
NOISE = [99.27, 99.31, 99.37, 99.22, 99.28]  # a "gain" of +0.03: within seed noise
REAL = [99.41, 99.46, 99.39, 99.44, 99.48]   # +0.18: real


def test_the_split_is_fixed_held_out_of_training_and_the_same_in_both_pipelines(
        mnist_root: Path) -> None:
    data = load_mnist(mnist_root, val_size=500)
    train, val = set(data.train_indices.tolist()), set(data.val_indices.tolist())
    assert len(val) == 500 and len(train) == 59_500 and not train & val
    # Fixed: not drawn from the run's seed, and a smaller split is part of a larger one.
    torch.manual_seed(12345)
    assert load_mnist(mnist_root, val_size=500).val_digest == data.val_digest
    assert val >= set(load_mnist(mnist_root, val_size=100).val_indices.tolist())

    config = tiny_config(val_size=500, train_limit=0)
    fast = build_pipeline(config, data, resolve(config))
    assert torch.equal(fast.train_labels, data.train.targets[data.train_indices])
    assert fast.num_val == 500 and fast.num_train == 59_500
    reference = TorchvisionPipeline(data, 64, torch.device("cpu"))
    assert set(reference.train_set.indices).isdisjoint(reference.val_set.indices)
    assert sorted(reference.val_set.indices) == sorted(val)
    # Validation images are seen as the test images are: no augmentation, same values.
    first_val = torch.cat([images for images, _ in fast.val_batches()])
    assert torch.allclose(first_val, torch.cat([images for images, _ in
                                                reference.val_batches()]), atol=1e-6)


def test_every_seed_and_variant_validates_on_the_same_images_each_epoch(
        store: str, mnist_root: Path) -> None:
    configs = [tiny_config(dropout=dropout, seed=seed, val_size=300)
               for seed in (1, 2) for dropout in (0.0, 0.05)]
    result = run_sweep(configs, mnist_root, "split", progress=False)
    children = children_of("split", result.parent_run_id)
    assert len(children) == 4
    client = MlflowClient()
    assert len({c.data.params["val_split_digest"] for c in children}) == 1
    for child in children:
        assert child.data.params["val_size"] == "300"
        for name in ("val_acc", "val_loss", "test_acc"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, name)] == [1, 2]
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert child.data.metrics["final_val_acc"] == round(
            max(history, key=lambda m: m.step).value, 2)
        assert child.data.metrics["best_val_acc"] == round(max(m.value for m in history), 2)
    # The UI's "Group by config_group" puts a variant's seeds together.
    groups = {c.data.tags[CONFIG_GROUP_TAG] for c in children}
    assert groups == {"opt-dropout0 epochs=2 val_size=300 train_limit=512 test_limit=256",
                      "opt-dropout0.05 epochs=2 val_size=300 train_limit=512 test_limit=256"}
    runs, _ = find_runs("split", "")
    assert sorted(g.n for g in group_runs(runs)) == [2, 2]


def test_val_size_0_is_the_seeds_protocol_and_says_so(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["train", "--val-size", "0", "--epochs", "1", "--train-limit", "512",
                            "--test-limit", "256", "--device", "cpu", "--data-dir",
                            str(mnist_root), "--experiment", "protocol"], capsys, monkeypatch)
    assert code == 0, err
    [run] = runs_of("protocol")
    assert not [m for m in run.data.metrics if "val" in m]
    assert "val_split_digest" not in run.data.params

    code, _, err = run_cli(["compare", "--experiment", "protocol", "--no-register"], capsys,
                           monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert "has metric 'final_val_acc'" in err and "--metric final_test_acc" in err

    code, out, err = run_cli(["compare", "--experiment", "protocol", "--no-register",
                              "--metric", "final_test_acc"], capsys, monkeypatch)
    assert code == 0, err
    assert out.splitlines()[0].startswith("Selected on the test set (`final_test_acc`)")

    # Beside validated runs, the seed's protocol is not chosen, and the table says why.
    craft_run("protocol", "validated", 98.0, lr=0.02)
    runs, _ = find_runs("protocol", "")
    result = compare("protocol")
    assert result.chosen.name == "validated"
    row = next(r for r in summary_table(result) if r[0] == run.info.run_name)
    assert row[4] == SEED_PROTOCOL and row[13] == f"no final_val_acc: {SEED_PROTOCOL}"


def test_the_interval_is_welchs_as_computed_by_hand() -> None:
    a, b = REAL, BASE
    va, vb, na, nb = statistics.variance(a), statistics.variance(b), len(a), len(b)
    se = math.sqrt(va / na + vb / nb)
    df = se**4 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    delta = statistics.fmean(a) - statistics.fmean(b)
    half = stats.t.ppf(0.975, df) * se

    difference = welch(a, b)

    assert difference.delta == pytest.approx(delta)
    assert (difference.low, difference.high) == pytest.approx((delta - half, delta + half))
    assert difference.real and difference.verdict() == "real at 95%"
    assert welch(NOISE, BASE).verdict() == "within seed noise"
    assert welch([99.3], BASE).sentence("x") == "x: +0.04 points, n = 1 vs 5: one seed: cannot tell"
    # The recipe's expected accuracy: the t interval of its mean.
    summary = Summary.of(BASE)
    half_mean = stats.t.ppf(0.975, 4) * statistics.stdev(BASE) / math.sqrt(5)
    assert summary.mean_interval() == pytest.approx((summary.mean - half_mean,
                                                     summary.mean + half_mean))
    assert summary.format_interval() == f"{summary.mean:.2f} ± {half_mean:.2f} (95% CI, n = 5)"


def craft_groups(experiment: str, **groups: tuple[list[float | None], dict[str, object]]
                 ) -> None:
    """One crafted run per value and seed of each group (its settings), named group-seedN."""
    for name, (values, settings) in groups.items():
        for seed, value in enumerate(values, 1):
            craft_run(experiment, f"{name}-seed{seed}", value, 99.2 if value is None else value,
                      seed=seed, **settings)


def test_the_report_says_whether_the_top_two_and_any_diff_really_differ(store: str) -> None:
    craft_groups("verdicts", base=(BASE, {}), noise=(NOISE, {"dropout": 0.05}),
                 real=(REAL, {"dropout": 0.1}))

    result = compare("verdicts", diffs=[("opt-dropout0.05", "opt-dropout0")])

    assert result.chosen_group.name == "opt-dropout0.1"
    assert result.chosen.name == "real-seed5"  # the group's best run is registered
    top_two = welch(REAL, NOISE)
    assert result.differences[0] == (
        f"dropout 0.1 vs 0.05, final_val_acc: {top_two.delta:+.2f} points, 95% CI "
        f"[{top_two.low:+.2f}, {top_two.high:+.2f}], n = 5 vs 5: real at 95%")
    noise = welch(NOISE, BASE)
    assert (f"dropout 0.05 vs 0, final_val_acc: +0.03 points, 95% CI [{noise.low:+.2f}, "
            f"{noise.high:+.2f}], n = 5 vs 5: within seed noise") in result.differences
    assert "## Is the difference real?" in result.report
    expected = Summary.of(REAL).format_interval()
    assert f"Test accuracy of the recipe: {expected}" in result.report


def production_of(experiment: str, values: list[float | None], **settings: object) -> str:
    """A crafted production group: the run id of its first seed."""
    craft_groups(experiment, production=(values, settings))
    return next(r.info.run_id for r in runs_of(experiment)
                if r.info.run_name == "production-seed1")


@pytest.mark.parametrize(("challenger", "production", "production_settings", "beats", "why"), [
    (REAL, BASE, {}, True, "real at 95%"),
    (NOISE, BASE, {}, False, "within noise: dropout 0.05 vs 0, final_val_acc: +0.03 points"),
    ([99.9], BASE, {}, False, "too few seeds: "),
    (REAL, [99.1], {}, False, "n = 5 vs 1: one seed: cannot tell"),
    (REAL, [None] * 5, {}, False, f"has no final_val_acc ({SEED_PROTOCOL})"),
    (BASE, REAL, {"dropout": 0.1}, False, "real at 95%"),  # really worse
])
def test_promotion_needs_a_real_gain_over_productions_group(
        store: str, request: pytest.FixtureRequest, challenger: list[float],
        production: list[float | None], production_settings: dict[str, object], beats: bool,
        why: str) -> None:
    experiment = f"promote-{request.node.callspec.id}"
    production_run = production_of(experiment, production, **production_settings)
    dropout = 0.05 if not production_settings else 0.0
    craft_groups(experiment, challenger=(challenger, {"dropout": dropout}))
    result = compare(experiment, filter_string="attributes.run_name LIKE 'challenger%'")

    case = promotion_case(result, production_run)

    assert case.beats is beats
    assert why in case.why


def test_the_same_recipe_is_not_a_challenger(store: str) -> None:
    production_run = production_of("same-recipe", BASE)
    result = compare("same-recipe", rule=SelectionRule())
    case = promotion_case(result, production_run)
    assert not case.beats and "production's own group" in case.why
    assert TrainConfig().config_group == "opt-dropout0"
