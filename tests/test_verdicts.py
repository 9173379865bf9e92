"""Verdicts you can bet on: intervals that count seeds and images, promotion that controls its
error over groups and looks, McNemar before production moves, and a registry that says why.

Crafted stores: runs with chosen per-image records (so chosen accuracies, in whole images)
and a real logged model each, registered and loaded for real. A real tiny sweep checks what
training writes.
"""

from __future__ import annotations

import math
import re
import shutil
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from mnist_mlflow.records import Records
from mnist_mlflow.registry import LOOKS_TAG, PREVIOUS, PRODUCTION
from mnist_mlflow.schema import DESCRIPTION_TAG, records_artifact
from mnist_mlflow.stats import (
    FAMILY_ALPHA,
    Looks,
    Pooled,
    Sample,
    difference,
    holm,
    interval,
    mcnemar,
    seeds_to_decide,
)
from mnist_mlflow.sweep import run_sweep
from tests.conftest import tiny_config
from tests.helpers import children_of, craft_run, misses, run_cli, train_one

# Validation and test images a crafted run may miss: the "hard" ones (every 17th).
POOL = {"validation": np.arange(0, 5000, 17), "test": np.arange(0, 10_000, 17)}


def craft_group(experiment: str, name: str, accuracies: list[float], model: Path,
                seed: int = 0, **settings: object) -> list[str]:
    """One crafted run per accuracy (seeds 1, 2, ...), each missing random hard images."""
    rng = np.random.default_rng(seed or zlib.crc32(f"{experiment}/{name}".encode()))
    return [craft_run(experiment, f"{name}-seed{index}", None, seed=index, model=model,
                      wrong={scored: misses(accuracy, scored, POOL[scored], rng)
                             for scored in POOL}, **settings)
            for index, accuracy in enumerate(accuracies, 1)]


def compare(experiment: str, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[int, str, str]:
    return run_cli(["compare", "--experiment", experiment, "--model-name", experiment,
                    *extra], capsys, monkeypatch)


def with_production(experiment: str, accuracies: list[float], model: Path,
                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                    **settings: object) -> None:
    """A production group (lr 0.02 unless given): crafted, compared alone, made production."""
    settings = {"lr": 0.02, **settings}
    craft_group(experiment, "production", accuracies, model, **settings)
    code, out, err = compare(experiment, capsys, monkeypatch, "--filter",
                             f"params.lr = '{settings['lr']}'")
    assert code == 0, err
    assert "the first promotion" in out
    assert aliases(experiment) == {PRODUCTION: "1"}


def registered_run(out: str) -> str:
    """The id of the run `compare` says it registered."""
    return out.split("Registered run: ")[1].split("(")[1].split(")")[0]


def aliases(model: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in
            MlflowClient().get_registered_model(model).aliases.items()}


def interval_of(out: str) -> tuple[float, float]:
    """The 95% interval of the verdict's difference, from what `compare` printed."""
    found = re.search(r"group vs production's: [+-][\d.]+ points, 95% CI \[([+-][\d.]+), "
                      r"([+-][\d.]+)\]", out)
    assert found, out
    return float(found.group(1)), float(found.group(2))


# --- the statistics, by hand ------------------------------------------------------------------


def crossed(seeds: int, images: int, error: float, rng: np.random.Generator) -> np.ndarray:
    return rng.random((seeds, images)) >= error


def test_a_group_interval_counts_seeds_and_images_as_the_crossed_design_says() -> None:
    rng = np.random.default_rng(1)
    correct = crossed(4, 3000, 0.02 + 0.1 * (np.arange(3000) % 7 == 0), rng)
    sample = Sample([0] * 4, correct)
    cells = 100.0 * correct
    seeds_acc, per_image = cells.mean(1), cells.mean(0)
    residual = ((cells - per_image - seeds_acc[:, None] + cells.mean()) ** 2).sum() / (3 * 2999)
    seed_var = np.var(seeds_acc, ddof=1)
    image_var = max(np.var(per_image, ddof=1) - residual / 4, 0) / 3000
    variance = seed_var / 4 + image_var
    df_seed = 3
    df = variance**2 / ((seed_var / 4) ** 2 / df_seed + image_var**2 / 2999)
    half = stats.t.ppf(0.975, df) * math.sqrt(variance)

    found = interval(sample, Pooled.of([sample]))

    assert found.mean == pytest.approx(cells.mean())
    assert (found.low, found.high) == pytest.approx((cells.mean() - half, cells.mean() + half))
    # Wider than seeds alone would say: images count too.
    assert found.high - found.mean > stats.t.ppf(0.975, 3) * np.std(seeds_acc, ddof=1) / 2 * 0.5


def test_a_one_seed_group_borrowing_the_pooled_spread_keeps_its_degrees_of_freedom() -> None:
    """A one-seed challenger and a five-seed production judged with one pooled seed variance:
    one estimate, with the 4 degrees of freedom it has (not 5.5, as if two estimates)."""
    production, challenger = Sample([99.0, 99.2, 99.4, 99.1, 99.3]), Sample([99.5])
    pooled = Pooled.of([production, challenger])
    assert pooled.seed_df == 4
    found = difference(challenger, production, pooled)
    half = stats.t.ppf(0.975, 4) * math.sqrt(pooled.seed_var * (1 + 1 / 5))
    assert found.high - found.delta == pytest.approx(half)
    assert found.p_better == pytest.approx(stats.t.sf(found.delta / (half / stats.t.ppf(
        0.975, 4)), 4))


def test_zero_spread_never_makes_a_zero_width_interval() -> None:
    rng = np.random.default_rng(2)
    pool = np.arange(0, 5000, 17)

    def tied(accuracy: float) -> np.ndarray:  # two seeds with the same total, other images
        rows = []
        for _ in range(2):
            row = np.ones(5000, dtype=bool)
            row[misses(accuracy, "validation", pool, rng)] = False
            rows.append(row)
        return np.stack(rows)

    production, challenger = Sample([0, 0], tied(99.10)), Sample([0, 0], tied(99.12))
    assert production.seed_var == 0 and challenger.seed_var == 0
    found = difference(challenger, production, Pooled.of([production, challenger]))
    assert found.delta == pytest.approx(0.02)
    assert found.high - found.low > 0.1 and not found.real
    # One side without spread: its uncertainty still counts.
    values = (99.02, 99.06, 99.10, 99.14, 99.18)
    spread = Sample([0] * 5, np.stack([tied(a)[0] for a in values]))
    flat = Sample([0] * 3, np.concatenate([tied(99.20), tied(99.20)[:1]]))
    found = difference(flat, spread, Pooled.of([flat, spread]))
    ignored = stats.ttest_ind([99.20] * 3, values, equal_var=False).confidence_interval(0.95)
    assert found.high - found.low > ignored.high - ignored.low


def test_seeds_to_decide_shrink_the_seed_noise_and_stop_at_the_images_own() -> None:
    a = Sample([99.00, 99.10, 99.20], images=1_000_000)
    b = Sample([98.95, 99.05, 99.15], images=1_000_000)  # the same spread: nothing pooled
    pooled = Pooled.of([a, b])
    plan = seeds_to_decide(a, b, pooled, 0.10, 0.025)
    z = 1.959964 + 0.841621  # one-sided 0.025, power 0.80

    def standard_error(seeds: int) -> float:
        return math.sqrt((a.seed_var + b.seed_var) / seeds + a.binomial() + b.binomial())

    assert plan.seeds is not None and plan.seeds > 4
    assert z * standard_error(plan.seeds) <= 0.10 < z * standard_error(plan.seeds - 1)
    # On 5,000 images, each model's own image noise alone hides 0.10 points at any seeds.
    small = seeds_to_decide(Sample(a.values, images=5000), Sample(b.values, images=5000),
                            pooled, 0.10, 0.025)
    assert small.seeds is None and z * small.floor > 0.10 and not small.why
    # One seed each: the seed spread is unknown, and it says so.
    lone = seeds_to_decide(Sample([99.0], images=5000), Sample([99.1], images=5000),
                           Pooled(), 0.10, 0.025)
    assert lone.seeds is None and "train a second seed" in lone.why


def test_holm_mcnemar_and_the_looks_alpha_spending() -> None:
    assert holm([0.001, 0.02, 0.04], 0.05) == [True, True, True]
    assert holm([0.001, 0.02, 0.04], 0.05, family=10) == [True, False, False]
    assert holm([0.03, 0.001], 0.05) == [True, True]
    assert holm([math.nan, 0.001], 0.05) == [False, True]

    new = np.array([True] * 90 + [True] * 12 + [False] * 3 + [False] * 5)
    old = np.array([True] * 90 + [False] * 12 + [True] * 3 + [False] * 5)
    found = mcnemar(new, old)
    assert (found.new_only, found.old_only) == (12, 3)
    assert found.p == pytest.approx(stats.binomtest(12, 15, 0.5).pvalue)
    assert not found.new_is_worse and mcnemar(old, new).new_is_worse is (found.p < 0.05)

    first = Looks().after(["a", "b"])
    assert (first.count, first.alpha) == (1, FAMILY_ALPHA / 2)
    assert first.after(["a"]) == first  # the same evidence again spends nothing
    second = first.after(["a", "c"])
    assert (second.count, len(second.seen), second.alpha) == (2, 3, FAMILY_ALPHA / 4)
    # However many looks, they spend at most FAMILY_ALPHA together.
    assert sum(FAMILY_ALPHA * 0.5**t for t in range(1, 60)) <= FAMILY_ALPHA


# --- crafted stores: what the user sees ---------------------------------------------------


def test_ties_on_both_sides_do_not_move_production(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_production("ties", [99.10, 99.10], saved_model, capsys, monkeypatch)
    craft_group("ties", "challenger", [99.12, 99.12], saved_model, lr=0.03)

    code, out, err = compare("ties", capsys, monkeypatch)

    assert code == 0, err
    low, high = interval_of(out)
    assert low < 0.02 < high and high - low > 0.1
    assert "is registered but not production: version 1" in out and "within noise" in out
    assert "Production stays at version 1." in out
    assert aliases("ties") == {PRODUCTION: "1"}
    # Undecided, it says what would decide it: at the observed difference and at the
    # smallest one worth acting on, seeds per group, or that no number of seeds can.
    [seeds] = [line for line in out.splitlines() if line.startswith("Seeds to decide: ")]
    assert seeds.startswith("Seeds to decide: within noise against production; for 80% "
                            "power at one-sided level ")
    assert "at the observed 0.02 points, " in seeds and "at --min-effect 0.1 points, " in seeds


@pytest.mark.parametrize(("value", "shown", "why"), [
    (math.nan, "nan", "not a finite number"),
    # SQL stores keep +inf as the largest double, which passes isfinite.
    (math.inf, "1.79769e+308", "not an accuracy in [0, 100]"),
    (100.5, "100.5", "not an accuracy in [0, 100]"),
    (-3.0, "-3", "not an accuracy in [0, 100]")], ids=["nan", "inf", "over-100", "negative"])
@pytest.mark.parametrize("seeds", [1, 2])
def test_a_metric_no_accuracy_can_have_is_named_and_left_out(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, seeds: int, value: float, shown: str,
        why: str) -> None:
    experiment = f"impossible-{seeds}-" + "".join(c if c.isalnum() else "_" for c in shown)
    craft_group(experiment, "fine", [99.20, 99.26], saved_model, lr=0.03)
    broken = craft_run(experiment, "broken-seed1", value, 99.0, seed=1, model=saved_model,
                       lr=0.05)
    if seeds == 2:
        craft_run(experiment, "broken-seed2", 99.0, seed=2, model=saved_model, lr=0.05)

    code, out, err = compare(experiment, capsys, monkeypatch)

    assert code == 0, err
    assert "Traceback" not in err
    assert (f"skipping run broken-seed1 ({broken}): final_val_acc is {shown}, {why}; left out "
            "of every group") in err
    chosen = out.split("Registered run: ")[1]
    assert chosen.startswith("fine-seed")
    assert "+nan" not in out and "nan points" not in out and "e+308" not in out
    assert aliases(experiment) == {PRODUCTION: "1"}


def test_a_lucky_one_seed_group_does_not_block_a_real_winner_with_more_seeds(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_production("lucky", [99.02, 99.06, 99.10, 99.14, 99.18], saved_model, capsys,
                    monkeypatch)
    # One seed, the highest mean; judged with the seeds' spread pooled over the other groups,
    # its gain over production is less sure than the five-seed group's.
    craft_group("lucky", "one-seed", [99.42], saved_model, lr=0.04)
    five = craft_group("lucky", "five", [99.36, 99.38, 99.40, 99.42, 99.44], saved_model,
                       lr=0.03)

    code, out, err = compare("lucky", capsys, monkeypatch)

    assert code == 0, err
    assert "opt lr0.04, seed 1 has the highest, 99.42" in out
    assert "of the groups that beat production it is the surest gain" in out
    registered = registered_run(out)
    assert registered in five
    assert "replaces version 1" in out and "moved on a real gain" in out
    assert aliases("lucky") == {PRODUCTION: "2", PREVIOUS: "1"}


def test_the_first_promotion_does_not_go_to_a_one_seed_group_high_by_luck(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No production yet: a one-seed group 0.4 points above a noisy four-seed group has the
    higher mean, but with the seeds' spread (pooled) its lower bound is lower."""
    four = craft_group("first-lucky", "four", [99.00, 99.40, 99.80, 99.40], saved_model,
                       lr=0.03)
    craft_group("first-lucky", "one-seed", [99.80], saved_model, lr=0.04)

    code, out, err = compare("first-lucky", capsys, monkeypatch)

    assert code == 0, err
    assert "opt lr0.04, seed 1 has the highest, 99.80" in out
    assert "the first promotion goes to the surest group" in out
    registered = registered_run(out)
    assert registered in four
    assert aliases("first-lucky") == {PRODUCTION: "1"}


def test_a_run_whose_model_files_are_gone_is_passed_over_for_its_groups_next_best(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    best, _ = craft_group("model-gone", "group", [99.40, 99.30], saved_model, lr=0.03)
    [model] = mlflow.search_logged_models(
        [MlflowClient().get_run(best).info.experiment_id], f"source_run_id = '{best}'",
        output_format="list")
    shutil.rmtree(model.artifact_location.removeprefix("file://"))  # a cleanup job's doing

    code, out, err = compare("model-gone", capsys, monkeypatch)

    assert code == 0, err
    assert (f"run group-seed1 ({best}) cannot be registered: its model files are gone "
            f"(models:/{model.model_id})") in out
    assert "leave it out with `mnist-mlflow doctor --repair`" in out
    assert "Registered run: group-seed2 (" in out
    assert aliases("model-gone") == {PRODUCTION: "1"}
    version = MlflowClient().get_model_version("model-gone", "1")
    assert version.run_id != best


def test_a_one_seed_production_is_replaced_by_a_real_winner(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_production("one-seed-production", [99.10], saved_model, capsys, monkeypatch)
    craft_group("one-seed-production", "five", [99.36, 99.38, 99.40, 99.42, 99.44],
                saved_model, lr=0.03)

    code, out, err = compare("one-seed-production", capsys, monkeypatch)

    assert code == 0, err
    assert "n = 5 vs 1" in out and "moved on a real gain" in out
    assert aliases("one-seed-production") == {PRODUCTION: "2", PREVIOUS: "1"}


@pytest.mark.parametrize("fault", ["deleted", "no-validation", "other-images"])
def test_a_production_that_cannot_be_judged_says_why_and_what_to_do(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    experiment = f"unjudged-{fault}"
    client = MlflowClient()
    if fault == "deleted":
        with_production(experiment, [99.10, 99.14], saved_model, capsys, monkeypatch)
        production_run = client.get_model_version_by_alias(experiment, PRODUCTION).run_id
        client.delete_run(production_run)
        expected = (f"was deleted; restore it with `mlflow runs restore --run-id "
                    f"{production_run}`")
    elif fault == "other-images":  # validated on another split than the new runs
        with_production(experiment, [99.10, 99.14], saved_model, capsys, monkeypatch,
                        val_split_digest="old-split")
        expected = "its final_val_acc is measured on other images (validation split old-split)"
    else:
        for seed in (1, 2):  # made with --val-size 0: chosen on test the first time
            craft_run(experiment, f"old-seed{seed}", None, 99.0, seed=seed, model=saved_model,
                      lr=0.02)
        code, _, err = compare(experiment, capsys, monkeypatch, "--metric", "final_test_acc")
        assert code == 0, err
        expected = "has no final_val_acc (made with --val-size 0"
    craft_group(experiment, "challenger", [99.36, 99.40, 99.38], saved_model, lr=0.03)

    code, out, err = compare(experiment, capsys, monkeypatch)

    assert code == 0, err
    [line] = [line for line in out.splitlines() if "is registered but not production" in line]
    assert "cannot be judged against" in line and expected in line
    assert "--force" in line
    assert aliases(experiment) == {PRODUCTION: "1"}
    code, out, err = compare(experiment, capsys, monkeypatch, "--force")
    assert code == 0, err
    assert aliases(experiment)[PRODUCTION] == "2"


def test_runs_validated_on_other_images_are_never_compared(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    craft_group("splits", "ours", [99.20, 99.24], saved_model, lr=0.03)
    other = craft_run("splits", "elsewhere", 99.9, seed=1, model=saved_model, lr=0.05,
                      val_split_digest="another-split")

    code, out, err = compare("splits", capsys, monkeypatch)

    assert code == 0, err
    assert f"leaving out run elsewhere ({other}): its final_val_acc is measured on other " \
           "images (validation split another-split" in err
    assert "lr=0.05" not in out.split("Rule:")[0]
    assert out.split("Registered run: ")[1].startswith("ours-seed")


def test_a_model_worse_than_production_image_by_image_is_not_promoted(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Production's group is weak but its registered run is its one strong seed; the
    challenger group is better on average, yet its best run's model is worse than
    production's on the validation images."""
    with_production("worse-model", [99.80, *[98.70] * 7], saved_model, capsys, monkeypatch)
    craft_group("worse-model", "challenger", [99.30, 99.32, 99.34, 99.36, 99.38], saved_model,
                lr=0.03)

    code, out, err = compare("worse-model", capsys, monkeypatch)

    assert code == 0, err
    assert "significantly worse than production's on the validation images" in out
    assert aliases("worse-model") == {PRODUCTION: "1"}
    version = MlflowClient().get_model_version("worse-model", "2")
    assert int(version.tags["mcnemar_production"]) > int(version.tags["mcnemar_new"])
    assert float(version.tags["mcnemar_p"]) < 0.05
    code, out, err = compare("worse-model", capsys, monkeypatch, "--force")
    assert code == 0, err
    assert aliases("worse-model") == {PRODUCTION: "2", PREVIOUS: "1"}


def test_every_look_is_counted_on_the_production_version(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_production("looks", [99.10, 99.14], saved_model, capsys, monkeypatch)
    craft_group("looks", "first", [99.12, 99.16], saved_model, lr=0.03)
    compare("looks", capsys, monkeypatch)
    client = MlflowClient()
    assert client.get_model_version("looks", "1").tags[LOOKS_TAG] == "1"
    _, out, _ = compare("looks", capsys, monkeypatch)  # the same evidence: the same look
    assert client.get_model_version("looks", "1").tags[LOOKS_TAG] == "1"
    assert "look 1)" in out and "0.025 needed" in out
    craft_group("looks", "second", [99.14, 99.12], saved_model, lr=0.04)
    _, out, _ = compare("looks", capsys, monkeypatch)
    assert client.get_model_version("looks", "1").tags[LOOKS_TAG] == "2"
    # Look 2 spends FAMILY_ALPHA / 4 over both groups seen: 0.0125 / 2 for the best.
    assert "look 2)" in out and "0.00625 needed" in out


def test_the_same_seeds_trained_again_are_new_evidence_and_spend_a_look(
        store: str, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds trained again (another thread count or device gives other numbers) are new
    runs: judging them is another look, or re-rolling until one wins would cost nothing."""
    with_production("rerolls", [99.10, 99.14], saved_model, capsys, monkeypatch)
    craft_group("rerolls", "challenger", [99.12, 99.16], saved_model, lr=0.03)
    _, out, _ = compare("rerolls", capsys, monkeypatch)
    client = MlflowClient()
    assert client.get_model_version("rerolls", "1").tags[LOOKS_TAG] == "1"
    # The same configuration and seeds, trained again: the latest run of each seed counts.
    craft_group("rerolls", "challenger-again", [99.13, 99.15], saved_model, seed=7, lr=0.03)
    _, out, _ = compare("rerolls", capsys, monkeypatch)
    assert client.get_model_version("rerolls", "1").tags[LOOKS_TAG] == "2"
    # Look 2 spends FAMILY_ALPHA / 4 over both pieces of evidence: 0.0125 / 2.
    assert "look 2)" in out and "0.00625 needed" in out


# --- a real tiny sweep: what training writes and what the registry says --------------------


def test_a_sweep_and_two_compares_leave_records_tags_verdicts_and_pictures(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = run_sweep([tiny_config(seed=seed, lr=0.02) for seed in (1, 2)], mnist_root,
                      "tiny-verdicts", progress=False)
    client = MlflowClient()
    for child in children_of("tiny-verdicts", first.parent_run_id):
        run_id, metrics = child.info.run_id, child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
        assert {"plots/confusion_matrix.png", "plots/confident_mistakes.png"} <= artifacts
        for scored, metric, count in (("validation", "final_val_acc", 256),
                                      ("test", "final_test_acc", 256)):
            records = Records.read(client.download_artifacts(run_id, records_artifact(scored),
                                                             str(tmp_path / run_id)))
            assert len(records) == count
            assert round(records.accuracy, 2) == metrics[metric]
            assert ((records.p_predicted > 0) & (records.p_predicted <= 1)).all()
    code, out, err = run_cli(["compare", "--experiment", "tiny-verdicts", "--model-name",
                              "tiny-verdicts", "--data-dir", str(mnist_root)], capsys,
                             monkeypatch)
    assert code == 0, err
    second = run_sweep([tiny_config(seed=seed, lr=0.05, epochs=3) for seed in (1, 2, 3)],
                       mnist_root, "tiny-verdicts", progress=False)
    assert second.count("FINISHED") == 3

    code, out, err = run_cli(["compare", "--experiment", "tiny-verdicts", "--model-name",
                              "tiny-verdicts", "--data-dir", str(mnist_root), "--report",
                              str(tmp_path / "report")], capsys, monkeypatch)

    assert code == 0, err
    version = client.get_model_version("tiny-verdicts", "2")
    production = client.get_model_version("tiny-verdicts", "1")
    new, old = (Records.read(client.download_artifacts(
        v.run_id, records_artifact("validation"), str(tmp_path / str(v.version))))
        for v in (version, production))
    assert int(version.tags["mcnemar_new"]) == int(np.sum(new.correct & ~old.correct))
    assert int(version.tags["mcnemar_production"]) == int(np.sum(old.correct & ~new.correct))
    assert version.description.startswith("tiny-verdicts version 2, ")
    assert "version 1" in version.description.split(". ")[0]
    # Judged against production, not the runner-up, in numbers.
    assert "| production (version 1) " in version.description
    assert "**Reading:** " in version.description and " over production" in version.description
    comparison = client.get_run(version.tags["comparison_run"])
    assert version.tags["comparison_run"] in version.description
    assert comparison.data.tags["registered_version"] == "2"
    assert comparison.data.tags["production_alias"].startswith(
        ("production -> version 2", "production stays at version 1"))
    assert comparison.data.tags[DESCRIPTION_TAG].count("## Verdict") == 1
    # The verdict in numbers, for its Metrics tab and the runs tables: the chosen group (the
    # second sweep's three seeds) against production's (the first sweep's two).
    metrics = comparison.data.metrics
    assert (metrics["chosen_n"], metrics["against_n"]) == (3, 2)
    assert metrics["difference"] == pytest.approx(  # each logged to 0.001
        metrics["chosen_mean"] - metrics["against_mean"], abs=0.002)
    assert metrics["chosen_low"] <= metrics["chosen_mean"] <= metrics["chosen_high"]
    assert metrics["difference_low"] <= metrics["difference"] <= metrics["difference_high"]
    assert 0 <= metrics["difference_p"] <= 1
    assert "disagreements.png" in {a.path for a in client.list_artifacts(comparison.info.run_id)}
    assert (tmp_path / "report" / "disagreements.png").read_bytes()[:4] == b"\x89PNG"

    # A --diff pair outside the shown groups is judged on its records too (paired).
    code, out, err = run_cli(["compare", "--experiment", "tiny-verdicts", "--no-register",
                              "--top", "1", "--diff", "opt e2 lr0.02",
                              "opt e3 lr0.05"], capsys, monkeypatch)
    assert code == 0, err
    label = "epochs 2, lr 0.02 vs epochs 3, lr 0.05, final_val_acc"
    [diff] = [line for line in out.splitlines() if label in line]
    assert "unpaired" not in diff

    code, out, err = run_cli(["models", "--model-name", "tiny-verdicts"], capsys, monkeypatch)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| 2 "))
    assert version.tags["group_interval"] in row and "95% CI" in row


def test_runs_made_before_records_are_scored_from_their_model_or_named(
        store: str, mnist_root: Path, saved_model: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = MlflowClient()
    old = [train_one(tiny_config(seed=seed), mnist_root, "before-records",
                         progress=False).run_id for seed in (1, 2)]
    for run_id in old:  # as runs logged before per-image records existed
        artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
        shutil.rmtree(artifacts / "predictions")
    digest = client.get_run(old[0]).data.params["val_split_digest"]
    unscorable = craft_run("before-records", "no-model", 95.0, seed=3, lr=0.03, val_size=256,
                           val_split_digest=digest)

    code, out, err = run_cli(["compare", "--experiment", "before-records", "--no-register",
                              "--data-dir", str(mnist_root)], capsys, monkeypatch)

    assert code == 0, err
    assert ("Note: 2 run(s) without per-image records (made before them, or their records "
            f"gone) were scored now from their logged models on the MNIST files in "
            f"{mnist_root}") in out
    assert f"Note: could not score no-model ({unscorable}): it logged no model" in out
    for run_id in old:  # scored once, kept: the next compare reads them
        records = Records.read(client.download_artifacts(
            run_id, records_artifact("validation"), str(tmp_path / run_id)))
        assert round(records.accuracy, 2) == client.get_run(run_id).data.metrics["final_val_acc"]
