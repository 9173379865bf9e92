"""`mnist-mlflow compare`: tables from the logged values, the selection rule, the report run."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnist_mlflow.comparison import compare
from mnist_mlflow.config import UserError
from mnist_mlflow.mlrun import CUT_NOTE, TAG_LIMIT
from mnist_mlflow.queries import find_runs
from mnist_mlflow.report import markdown_table, side_by_side_table, summary_table
from mnist_mlflow.schema import COMPARISON_ROLE, DESCRIPTION_TAG, ROLE_TAG
from mnist_mlflow.selection import SelectionRule, group_runs, rank, ranking_reason, top
from tests.conftest import tiny_config, use_store
from tests.helpers import craft_run, run_cli, train_one


@pytest.fixture(scope="module")
def real_runs(store_dir: Path, mnist_root: Path) -> list[str]:
    """Two real tiny training runs (two epochs each) in experiment `real`."""
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        return [train_one(tiny_config(epochs=2, dropout=dropout), mnist_root, "real",
                              progress=False).run_id for dropout in (0.0, 0.05)]


def choose(experiment: str, rule: SelectionRule | None = None) -> tuple[str, str]:
    runs, _ = find_runs(experiment, "")
    rule = rule or SelectionRule()
    groups = group_runs(runs)
    chosen = top(groups, rule)
    return chosen.name, ranking_reason(chosen, [g for g in rank(groups, rule)
                                                if rule.eligible(g)], rule)


def test_tables_show_the_logged_values_of_real_runs(store: str, real_runs: list[str],
                                                     tmp_path: Path) -> None:
    result = compare("real", report_dir=tmp_path / "report")

    client = MlflowClient()
    logged = {run_id: client.get_run(run_id) for run_id in real_runs}
    assert sorted(r.run_id for r in result.ranked) == sorted(real_runs)
    # One seed each: every group is one run, shown as that run.
    assert [g.n for g in result.groups] == [1, 1]
    table = summary_table(result)
    assert table[0] == ["Experiment", "n", "Architecture", "Parameters",
                        "final_val_acc (selection), 95% CI", "Test Acc (final), 95% CI",
                        "Test Acc min–max", "Train Acc ± sd", "Gap ± sd", "Epochs", "LR",
                        "Batch Size", "Dropout", "Status", "Run"]
    for row, group in zip(table[1:], result.groups, strict=True):
        run = logged[group.runs[0].run_id]
        m, p = run.data.metrics, run.data.params
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert m["final_test_acc"] == round(max(history, key=lambda x: x.step).value, 2)
        assert row[0] == run.info.run_name and row[1] == "1"
        # One seed each and no other group with two: no seed variance, so no interval.
        assert row[2:14] == [p["model"], f"{int(p['num_params']):,}",
                             f"{m['final_val_acc']:.2f} (no CI)",
                             f"{m['final_test_acc']:.2f} (no CI)",
                             f"{m['final_test_acc']:.2f}–{m['final_test_acc']:.2f}",
                             f"{m['train_acc']:.2f}", f"{m['final_gap']:.2f}", p["epochs"],
                             f"{float(p['lr']):g}", p["batch_size"], f"{float(p['dropout']):g}",
                             "chosen" if group is result.chosen_group else ""]
        assert row[14] == run.info.run_id[:8]
    side = side_by_side_table(result.groups, result.rule)
    first, second = (logged[g.runs[0].run_id].data.metrics for g in result.groups)
    assert side[1] == ["Val Acc (final)", f"{first['final_val_acc']:.2f}",
                       f"{second['final_val_acc']:.2f}",
                       f"{second['final_val_acc'] - first['final_val_acc']:+.2f}"]
    assert side[5][0] == "Best Test Acc" and side[5][1] == f"{first['best_test_acc']:.2f}"

    report = (tmp_path / "report" / "comparison.md").read_text()
    assert report.splitlines()[0].startswith("Selected on validation (`final_val_acc`")
    assert markdown_table(table) in report and markdown_table(side) in report
    assert SelectionRule().describe() in report
    assert "one seed: cannot tell" in report
    # The verdict in numbers: the chosen group against the runner-up, and the reading.
    verdict = report.split("## Verdict")[1].split("## ")[0]
    assert "| **chosen** " in verdict and "| runner-up " in verdict and "| difference " in verdict
    assert "**Reading:** first promotion; " in verdict
    for picture in ("comparison.png", "comparison_pareto.png"):
        assert (tmp_path / "report" / picture).read_bytes()[:4] == b"\x89PNG"
    label = result.chosen_group.label()
    assert {name: [step for step, _ in points]
            for name, points in result.histories[label].items()} == {
        "val_acc": [1, 2], "test_acc": [1, 2], "test_loss": [1, 2]}


def test_the_report_lives_in_a_comparison_run(store: str, real_runs: list[str],
                                               tmp_path: Path) -> None:
    result = compare("real")

    client = MlflowClient()
    run = client.get_run(result.comparison_run_id)
    assert run.data.tags[ROLE_TAG] == COMPARISON_ROLE
    assert run.data.tags["chosen_run_id"] == result.chosen.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["selected_on"] == "validation"
    # The report, its figures, and the chosen run's own pictures beside them.
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "comparison.md", "comparison.png", "comparison_pareto.png",
        "chosen_confusion_matrix.png", "chosen_confident_mistakes.png", "thumbs"}
    # The small copies its description shows inline, each linked to the full figure.
    assert {a.path for a in client.list_artifacts(run.info.run_id, "thumbs")} == {
        "thumbs/comparison.png", "thumbs/comparison_pareto.png"}
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="comparison.md", dst_path=str(tmp_path))
    assert Path(downloaded).read_text() == result.report
    # Comparison runs (and sweep parents) are never candidates themselves.
    assert compare("real").ranked == result.ranked


def test_a_report_too_long_for_a_description_is_cut_at_a_line_and_kept_whole_as_artifact(
        store: str, tmp_path: Path) -> None:
    """PostgreSQL stores refuse a tag over 8,000 characters: a comparison over many groups
    failed on the team server when it created its run."""
    for index in range(80):
        craft_run("many", f"recipe-{index}", 99.0 + index / 1000, lr=round(0.001 * (index + 1), 3))
    result = compare("many")
    assert len(result.report) > TAG_LIMIT
    description = MlflowClient().get_run(result.comparison_run_id).data.tags[DESCRIPTION_TAG]
    assert len(description) <= TAG_LIMIT and description.endswith(CUT_NOTE)
    assert result.report.startswith(description.removesuffix(CUT_NOTE))
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=result.comparison_run_id, artifact_path="comparison.md", dst_path=str(tmp_path))
    assert Path(downloaded).read_text() == result.report


def test_the_rule_picks_the_best_group_mean_within_the_parameter_limit(store: str) -> None:
    for seed, (small, best, big) in enumerate([(99.30, 99.41, 99.60), (99.32, 99.39, 99.58)]):
        craft_run("limit", "small-good", small, num_params=6000, seed=seed, lr=0.02)
        craft_run("limit", "small-best", best, num_params=7900, seed=seed, lr=0.03)
        craft_run("limit", "big-better", big, num_params=9000, seed=seed, lr=0.04)
    name, reason = choose("limit")
    assert name == "opt lr0.03"
    assert "highest mean final_val_acc (99.40, n = 2) of the 2 eligible groups" in reason
    assert choose("limit", SelectionRule(max_params=10_000))[0] == "opt lr0.04"


def test_ties_go_to_more_seeds_then_fewer_parameters(store: str) -> None:
    craft_run("tie", "one-seed", 99.40, lr=0.02)
    for seed in (1, 2):
        craft_run("tie", "two-seeds", 99.40, seed=seed, lr=0.03)
    assert choose("tie")[0] == "opt lr0.03"
    craft_run("tie-params", "bigger", 99.40, num_params=7000, lr=0.02)
    craft_run("tie-params", "smaller", 99.40, num_params=5000, lr=0.03)
    name, reason = choose("tie-params")
    assert name == "opt lr0.03" and "fewer parameters" in reason


def test_the_registered_run_is_the_groups_best_and_reruns_of_a_seed_count_once(
        store: str) -> None:
    now = int(time.time() * 1000)
    craft_run("reruns", "seed1-old", 99.90, seed=1, start=now - 60_000)
    craft_run("reruns", "seed1-new", 99.10, seed=1, start=now)
    craft_run("reruns", "seed2", 99.30, seed=2, start=now)
    runs, _ = find_runs("reruns", "")
    [group] = group_runs(runs)
    assert [r.name for r in group.runs] == ["seed1-new", "seed2"]  # the latest of each seed
    assert SelectionRule().best_run(group).name == "seed2"


def test_another_metric_can_be_minimized(store: str) -> None:
    craft_run("loss", "high-acc-high-loss", 99.5, lr=0.02, test_loss=0.05)
    craft_run("loss", "low-loss", 99.3, lr=0.03)
    client = MlflowClient()
    for run in client.search_runs([client.get_experiment_by_name("loss").experiment_id]):
        loss = 0.05 if run.info.run_name == "high-acc-high-loss" else 0.02
        client.log_metric(run.info.run_id, "test_loss", loss, step=21)
    assert choose("loss", SelectionRule("test_loss", higher_is_better=False))[0] == (
        "opt lr0.03")
    assert choose("loss")[0] == "opt lr0.02"


def test_unfinished_and_metricless_runs_are_left_out_with_a_warning(store: str) -> None:
    craft_run("mixed", "finished", 99.0)
    craft_run("mixed", "failed-but-better", 99.9, seed=2,
              status=RunStatus.to_string(RunStatus.FAILED))
    craft_run("mixed", "still-running", 99.9, seed=3, status="RUNNING")
    client = MlflowClient()
    bare = client.create_run(client.get_experiment_by_name("mixed").experiment_id,
                             run_name="no-metrics")
    client.set_terminated(bare.info.run_id)

    runs, skipped = find_runs("mixed", "")

    assert [r.name for r in runs] == ["finished"]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"skipping run no-metrics ({bare.info.run_id}): no ")
    assert "best_test_acc" in skipped[0] and "num_params" in skipped[0]


def test_filter_string_narrows_the_candidates(store: str) -> None:
    craft_run("filtered", "best", 99.5)
    craft_run("filtered", "also-ran", 99.2, seed=2)
    runs, _ = find_runs("filtered", "metrics.best_test_acc < 99.4")
    assert [r.name for r in runs] == ["also-ran"]
    with pytest.raises(UserError, match="invalid --filter"):
        find_runs("filtered", "metrics.best_test_acc <<< 1")


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "missing"], "no experiment named 'missing'"),
    (["--experiment", "empty"], "no FINISHED runs with training metrics to compare"),
    (["--experiment", "too-big", "--max-params", "8000"], "no run has num_params <= 8,000"),
    (["--experiment", "too-big", "--filter", "params.lr = "], "invalid --filter"),
    (["--experiment", "too-big", "--top", "0"], "invalid --top"),
    (["--experiment", "too-big", "--max-params", "60000", "--metric", "typo_acc"],
     "has metric 'typo_acc'; check --metric"),
    (["--experiment", "too-big", "--diff", "opt", "nothing"], "invalid --diff 'nothing'"),
])
def test_nothing_to_choose_is_one_line_and_leaves_the_registry_alone(
        store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        args: list[str], message: str) -> None:
    client = MlflowClient()
    if client.get_experiment_by_name("empty") is None:
        client.create_experiment("empty")
        craft_run("too-big", "huge", 99.9, num_params=50_000)
    before = len(client.search_runs([client.get_experiment_by_name("too-big").experiment_id]))

    code, out, err = run_cli(["compare", *args], capsys, monkeypatch)

    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert client.search_registered_models() == []
    after = client.search_runs([client.get_experiment_by_name("too-big").experiment_id])
    assert len(after) == before  # no comparison run either


def test_cli_prints_both_tables_and_the_choice(store: str, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    craft_run("cli", "opt-dropout0", 99.27, gap=0.2)
    craft_run("cli", "opt-dropout0.05", 99.33, gap=-0.1, dropout=0.05)
    code, out, err = run_cli(["compare", "--experiment", "cli", "--no-register",
                              "--report", str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("Selected on validation")
    assert "| Experiment " in out and "| Metric " in out
    assert "Chosen: opt d0.05, seed 1" in out
    best_row = next(line for line in out.splitlines() if line.startswith("| Val Acc"))
    assert [cell.strip() for cell in best_row.split("|")[1:-1]] == [
        "Val Acc (final)", "99.33", "99.27", "-0.06"]
    assert ("Difference: dropout 0.05 vs 0, final_val_acc: +0.06 points, n = 1 vs 1: "
            "one seed: cannot tell") in out
    assert (tmp_path / "r" / "comparison.md").is_file()
    assert MlflowClient().search_registered_models() == []


def test_the_chosen_run_is_called_registered_only_when_it_was(store: str,
                                                              saved_model: Path) -> None:
    for seed, val in ((1, 99.2), (2, 99.4)):
        craft_run("named-choice", f"s{seed} opt", val, seed=seed, model=saved_model)
    craft_run("named-choice", "s1 opt d0.05", 98.0, dropout=0.05, model=saved_model)

    def run_cell(register: bool) -> str:
        result = compare("named-choice", register=register, model_name="named-choice")
        row = next(r for r in summary_table(result)[1:] if r[1] == "2")
        return row[-1]

    assert run_cell(register=False).endswith(" (chosen)")
    assert run_cell(register=True).endswith(" (registered)")
