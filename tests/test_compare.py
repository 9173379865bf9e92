"""`mnist-mlflow compare`: tables from the logged values, the selection rule, the report run."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnist_mlflow.comparison import (
    SelectionRule,
    compare,
    find_runs,
    markdown_table,
    select,
    side_by_side_table,
    summary_table,
)
from mnist_mlflow.config import UserError
from mnist_mlflow.schema import COMPARISON_ROLE, ROLE_TAG
from mnist_mlflow.tracking import train_tracked
from tests.conftest import tiny_config, use_store
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def real_runs(store_dir: Path, mnist_root: Path) -> list[str]:
    """Two real tiny training runs (two epochs each) in experiment `real`."""
    with pytest.MonkeyPatch.context() as patch:
        use_store(store_dir, patch)
        return [train_tracked(tiny_config(epochs=2, dropout=dropout), mnist_root, "real",
                              progress=False).run_id for dropout in (0.0, 0.05)]


def craft_run(experiment: str, name: str, best: float, gap: float = 1.0,
              num_params: int = 6132, start: int = 0, status: str = "FINISHED",
              **extra_metrics: float) -> str:
    """A run carrying what a training run logs, with chosen values (no training needed)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = (found.experiment_id if found else client.create_experiment(experiment))
    run = client.create_run(experiment_id, start_time=start or int(time.time() * 1000),
                            run_name=name)
    run_id = run.info.run_id
    for key, value in {"model": "opt", "epochs": 20, "lr": 0.01, "batch_size": 64,
                       "dropout": 0.0, "num_params": num_params}.items():
        client.log_param(run_id, key, value)
    metrics = {"train_acc": best + gap, "test_acc": best, "final_gap": gap,
               "best_test_acc": best, "test_loss": 0.02, **extra_metrics}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=20)
    client.set_terminated(run_id, status)
    return run_id


def choose(experiment: str, rule: SelectionRule | None = None) -> tuple[str, str]:
    runs, _ = find_runs(experiment, "", (rule or SelectionRule()).metric)
    chosen, reason = select(runs, rule or SelectionRule())
    return chosen.name, reason


def test_tables_show_the_logged_values_of_real_runs(store: str, real_runs: list[str],
                                                     tmp_path: Path) -> None:
    result = compare("real", report_dir=tmp_path / "report")

    client = MlflowClient()
    logged = {run_id: client.get_run(run_id) for run_id in real_runs}
    assert sorted(r.run_id for r in result.ranked) == sorted(real_runs)
    table = summary_table(result.ranked, result.chosen, result.rule)
    assert table[0] == ["Experiment", "Date", "Architecture", "Parameters", "Train Acc",
                        "Test Acc", "Gap", "Epochs", "LR", "Batch Size", "Dropout", "Status",
                        "Run"]
    for row, summary in zip(table[1:], result.ranked, strict=True):
        run = logged[summary.run_id]
        m, p = run.data.metrics, run.data.params
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert m["test_acc"] == max(history, key=lambda x: x.step).value  # the last epoch's
        assert row[0] == run.info.run_name
        assert row[2:12] == [p["model"], f"{int(p['num_params']):,}", f"{m['train_acc']:.2f}%",
                             f"{m['test_acc']:.2f}%", f"{m['final_gap']:+.2f}", p["epochs"],
                             p["lr"], p["batch_size"], p["dropout"],
                             "FINISHED, chosen" if summary == result.chosen else "FINISHED"]
    side = side_by_side_table(result.ranked, result.rule)
    first, second = (logged[s.run_id].data.metrics for s in result.ranked)
    assert side[1] == ["Test Acc (final)", f"{first['test_acc']:.2f}",
                       f"{second['test_acc']:.2f}",
                       f"{second['test_acc'] - first['test_acc']:+.2f}"]
    assert side[4][0] == "Best Test Acc" and side[4][1] == f"{first['best_test_acc']:.2f}"

    report = (tmp_path / "report" / "comparison.md").read_text()
    assert markdown_table(table) in report and markdown_table(side) in report
    assert SelectionRule().describe() in report
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert {name: [step for step, _ in points]
            for name, points in result.histories[result.chosen.name].items()} == {
        "test_acc": [1, 2], "test_loss": [1, 2]}


def test_the_report_lives_in_a_comparison_run(store: str, real_runs: list[str],
                                               tmp_path: Path) -> None:
    result = compare("real")

    client = MlflowClient()
    run = client.get_run(result.comparison_run_id)
    assert run.data.tags[ROLE_TAG] == COMPARISON_ROLE
    assert run.data.tags["chosen_run_id"] == result.chosen.run_id
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "comparison.md", "comparison.png"}
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="comparison.md", dst_path=str(tmp_path))
    assert Path(downloaded).read_text() == result.report
    # Comparison runs (and sweep parents) are never candidates themselves.
    assert compare("real").ranked == result.ranked


def test_the_rule_picks_the_best_metric_within_the_parameter_budget(store: str) -> None:
    craft_run("budget", "small-good", 99.30, num_params=6000)
    craft_run("budget", "small-best", 99.41, num_params=7900)
    craft_run("budget", "big-better", 99.60, num_params=9000)
    name, reason = choose("budget")
    assert name == "small-best"
    assert "highest best_test_acc (99.41) of the 2 eligible runs" in reason
    assert choose("budget", SelectionRule(max_params=10_000))[0] == "big-better"


def test_ties_go_to_the_smaller_absolute_gap(store: str) -> None:
    craft_run("tie-gap", "wide-gap", 99.40, gap=0.30)
    craft_run("tie-gap", "negative-small-gap", 99.40, gap=-0.10)
    name, reason = choose("tie-gap")
    assert name == "negative-small-gap"
    assert "smaller absolute gap (0.10 vs 0.30)" in reason


def test_then_to_fewer_parameters_then_to_the_earlier_run(store: str) -> None:
    now = int(time.time() * 1000)
    craft_run("tie-params", "bigger", 99.40, gap=-0.2, num_params=7000, start=now - 5000)
    craft_run("tie-params", "smaller", 99.40, gap=0.2, num_params=5000, start=now)
    assert choose("tie-params") == ("smaller", "it ties with bigger on best_test_acc (99.4) "
                                               "and wins on fewer parameters (5,000 vs 7,000)")
    craft_run("tie-all", "later", 99.40, start=now)
    craft_run("tie-all", "earlier", 99.40, start=now - 60_000)
    name, reason = choose("tie-all")
    assert name == "earlier" and "earlier run" in reason


def test_another_metric_can_be_minimized(store: str) -> None:
    craft_run("loss", "high-acc-high-loss", 99.5, test_loss=0.05)
    craft_run("loss", "low-loss", 99.3, test_loss=0.02)
    assert choose("loss", SelectionRule("test_loss", higher_is_better=False))[0] == "low-loss"
    assert choose("loss")[0] == "high-acc-high-loss"


def test_unfinished_and_metricless_runs_are_left_out_with_a_warning(store: str) -> None:
    craft_run("mixed", "finished", 99.0)
    craft_run("mixed", "failed-but-better", 99.9, status=RunStatus.to_string(RunStatus.FAILED))
    craft_run("mixed", "still-running", 99.9, status="RUNNING")
    client = MlflowClient()
    bare = client.create_run(client.get_experiment_by_name("mixed").experiment_id,
                             run_name="no-metrics")
    client.set_terminated(bare.info.run_id)

    runs, skipped = find_runs("mixed", "", "best_test_acc")

    assert [r.name for r in runs] == ["finished"]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"skipping run no-metrics ({bare.info.run_id}): no ")
    assert "best_test_acc" in skipped[0] and "num_params" in skipped[0]


def test_filter_string_narrows_the_candidates(store: str) -> None:
    craft_run("filtered", "best", 99.5)
    craft_run("filtered", "also-ran", 99.2)
    runs, _ = find_runs("filtered", "metrics.best_test_acc < 99.4", "best_test_acc")
    assert [r.name for r in runs] == ["also-ran"]
    with pytest.raises(UserError, match="invalid --filter"):
        find_runs("filtered", "metrics.best_test_acc <<< 1", "best_test_acc")


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "missing"], "no experiment named 'missing'"),
    (["--experiment", "empty"], "no FINISHED runs with training metrics to compare"),
    (["--experiment", "too-big", "--max-params", "8000"], "no run has num_params <= 8,000"),
    (["--experiment", "too-big", "--filter", "params.lr = "], "invalid --filter"),
    (["--experiment", "too-big", "--top", "0"], "invalid --top"),
    (["--experiment", "too-big", "--metric", "typo_acc"], "check --metric and --filter"),
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
    craft_run("cli", "opt-dropout0.05", 99.33, gap=-0.1)
    code, out, err = run_cli(["compare", "--experiment", "cli", "--no-register",
                              "--report", str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 0, err
    assert "| Experiment " in out and "| Metric " in out
    assert "Chosen: opt-dropout0.05" in out
    best_row = next(line for line in out.splitlines() if line.startswith("| Best Test Acc"))
    assert [cell.strip() for cell in best_row.split("|")[1:-1]] == [
        "Best Test Acc", "99.33", "99.27", "-0.06"]
    assert (tmp_path / "r" / "comparison.md").is_file()
    assert MlflowClient().search_registered_models() == []
