"""Honest comparison: a fixed validation split, groups over seeds, selection on validation,
Welch intervals for differences, and a `production` alias that does not move on noise."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from mnist_mlflow.comparison import compare
from mnist_mlflow.data import TorchvisionPipeline, build_pipeline, load_mnist
from mnist_mlflow.queries import find_runs
from mnist_mlflow.report import summary_table
from mnist_mlflow.runtime import resolve
from mnist_mlflow.schema import CONFIG_GROUP_TAG
from mnist_mlflow.selection import SEED_PROTOCOL, group_runs
from mnist_mlflow.sweep import run_sweep
from tests.conftest import tiny_config
from tests.helpers import children_of, craft_run, run_cli, runs_of

# Crafted final accuracies of five seeds per group, spread as our real seeds spread (~0.1).
BASE = [99.21, 99.33, 99.27, 99.18, 99.30]
REAL = [99.41, 99.46, 99.39, 99.44, 99.48]   # +0.18


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
    assert groups == {"opt e2 val300 n512 t256", "opt d0.05 e2 val300 n512 t256"}
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


def test_without_per_image_records_images_count_as_a_binomial_draw(store: str) -> None:
    """Runs made before records (crafted here without them) are judged on their seeds and a
    binomial image term per side: wider than seeds alone, since nothing cancels."""
    for seed, (base, real) in enumerate(zip(BASE, REAL, strict=True), 1):
        craft_run("binomial", f"base-seed{seed}", base, seed=seed)
        craft_run("binomial", f"real-seed{seed}", real, seed=seed, dropout=0.1)

    result = compare("binomial")

    assert result.chosen_group.name == "opt d0.1"
    assert result.chosen.name == "real-seed5"  # the group's best run is registered
    found = result.differences[0]
    a, b = statistics.fmean(REAL), statistics.fmean(BASE)
    seeds_only = stats.ttest_ind(REAL, BASE, equal_var=False).confidence_interval(0.95)
    low, high = (float(x) for x in re.findall(r"\[([+-][\d.]+), ([+-][\d.]+)\]", found)[0])
    assert found.startswith(f"dropout 0.1 vs 0, final_val_acc: {a - b:+.2f} points")
    assert high - low > seeds_only.high - seeds_only.low
    assert "(images unpaired: no per-image records)" in found
    binomial = 1e4 * (a / 100) * (1 - a / 100) / 5000 + 1e4 * (b / 100) * (1 - b / 100) / 5000
    assert (high - low) / 2 >= 1.96 * math.sqrt(binomial) - 0.01
    assert "## Is the difference real?" in result.report
    assert "Test accuracy of the recipe: " in result.report
