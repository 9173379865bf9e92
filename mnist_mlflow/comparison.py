"""Compare tracked training runs: query, tables, the selection rule, and the report run."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mlflow.entities import Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from tabulate import tabulate

from mnist_mlflow.config import UserError
from mnist_mlflow.mlrun import MlflowRun, experiment_id
from mnist_mlflow.plots import plot_comparison
from mnist_mlflow.schema import (
    BEST_TEST_ACC,
    CHOSEN_RUN_TAG,
    COMPARISON_ROLE,
    FINAL_GAP,
    METRICS,
    NUM_PARAMS,
    REPORT_FILE,
    REPORT_PLOT,
    ROLE_TAG,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_ROLE,
)

log = logging.getLogger("mnist_mlflow")

DEFAULT_METRIC = BEST_TEST_ACC
DEFAULT_MAX_PARAMS = 8000
# The side-by-side rows, as the seed's report labelled them; every compared run needs these
# metrics (the selection metric on top).
TABLE_ROWS = {TEST_ACC: "Test Acc (final)", TRAIN_ACC: "Train Acc (final)",
              FINAL_GAP: "Gap (train − test)", BEST_TEST_ACC: "Best Test Acc"}
TABLE_METRICS = tuple(TABLE_ROWS)
PLOT_METRICS = (TEST_ACC, TEST_LOSS)


@dataclass(frozen=True)
class RunSummary:
    """What the comparison needs of one FINISHED training run."""

    run_id: str
    name: str
    start_time: int
    status: str
    num_params: int
    params: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def from_run(cls, run: Run) -> RunSummary:
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                   run.info.start_time, run.info.status, int(run.data.params[NUM_PARAMS]),
                   dict(run.data.params), dict(run.data.metrics))


@dataclass(frozen=True)
class SelectionRule:
    """Best `metric` among runs with at most `max_params` parameters, then the tie-breaks."""

    metric: str = DEFAULT_METRIC
    max_params: int = DEFAULT_MAX_PARAMS
    higher_is_better: bool = True

    def describe(self) -> str:
        best = "highest" if self.higher_is_better else "lowest"
        return (f"{best} `{self.metric}` among runs with `num_params` ≤ {self.max_params:,}; "
                "ties go to the smaller absolute gap (`final_gap`, train − test accuracy "
                "at the last epoch), then fewer parameters, then the earlier run")

    def eligible(self, run: RunSummary) -> bool:
        return run.num_params <= self.max_params

    def sort_key(self, run: RunSummary) -> tuple[float, float, int, int]:
        """Ascending order puts the preferred run first."""
        value = run.metrics[self.metric]
        return (-value if self.higher_is_better else value, abs(run.metrics["final_gap"]),
                run.num_params, run.start_time)

    def beats(self, value: float, other: float) -> bool:
        """Strictly better: an equal value does not displace the incumbent."""
        return value > other if self.higher_is_better else value < other


@dataclass
class Comparison:
    """The outcome: runs ranked (eligible first, in rule order), the choice and the report."""

    experiment: str
    rule: SelectionRule
    filter_string: str
    ranked: list[RunSummary]
    skipped: list[str]
    chosen: RunSummary
    reason: str
    comparison_run_id: str = ""
    report: str = ""
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)


def search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every active run of the experiment matching `query`, oldest first, page by page."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], query, ViewType.ACTIVE_ONLY,
                                  SEARCH_MAX_RESULTS_THRESHOLD, ["attributes.start_time ASC"],
                                  page_token)
        runs += page
        page_token = page.token
        if not page_token:
            return runs


def find_runs(experiment: str, filter_string: str, metric: str) -> tuple[list[RunSummary],
                                                                          list[str]]:
    """FINISHED training runs of `experiment` matching `filter_string`, and skip warnings."""
    client = MlflowClient()
    found_id = experiment_id(experiment, client)
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = search_all(client, found_id, query)
    except MlflowException as err:
        raise UserError(f"invalid --filter {filter_string!r}: "
                        f"{err.message.splitlines()[0]}") from None
    needed = sorted({*TABLE_METRICS, metric})
    summaries, skipped = [], []
    for run in runs:
        if run.data.tags.get(ROLE_TAG, TRAIN_ROLE) != TRAIN_ROLE:
            continue  # sweep parents and earlier comparisons are not candidates
        missing = [m for m in needed if m not in run.data.metrics]
        missing += [] if run.data.params.get(NUM_PARAMS, "").isdigit() else [NUM_PARAMS]
        if missing:
            skipped.append(f"skipping run {run.info.run_name} ({run.info.run_id}): "
                           f"no {', '.join(missing)}")
            continue
        summaries.append(RunSummary.from_run(run))
    return summaries, skipped


def rank(runs: Sequence[RunSummary], rule: SelectionRule) -> list[RunSummary]:
    """Eligible runs in rule order, then the ineligible ones by parameter count."""
    eligible = sorted((r for r in runs if rule.eligible(r)), key=rule.sort_key)
    others = sorted((r for r in runs if not rule.eligible(r)),
                    key=lambda r: (r.num_params, r.start_time))
    return eligible + others


def select(runs: Sequence[RunSummary], rule: SelectionRule) -> tuple[RunSummary, str]:
    """The run the rule picks and a sentence saying why; UserError when none qualifies."""
    if not runs:
        raise UserError("no FINISHED runs with training metrics to compare")
    ranked = rank(runs, rule)
    chosen = ranked[0]
    if not rule.eligible(chosen):
        raise UserError(f"no run has num_params <= {rule.max_params:,} (the smallest of the "
                        f"{len(runs)} runs has {chosen.num_params:,}); raise --max-params")
    eligible = [r for r in ranked if rule.eligible(r)]
    return chosen, _reason(chosen, eligible, rule)


def _reason(chosen: RunSummary, eligible: list[RunSummary], rule: SelectionRule) -> str:
    best = "highest" if rule.higher_is_better else "lowest"
    value = chosen.metrics[rule.metric]
    if len(eligible) == 1:
        return f"it is the only eligible run ({rule.metric} {value:.6g})"
    runner_up = eligible[1]
    other = runner_up.metrics[rule.metric]
    if value != other:
        return (f"it has the {best} {rule.metric} ({value:.6g}) of the {len(eligible)} eligible "
                f"runs; the runner-up {runner_up.name} has {other:.6g}")
    tie = f"it ties with {runner_up.name} on {rule.metric} ({value:.6g}) and wins on"
    gaps = abs(chosen.metrics["final_gap"]), abs(runner_up.metrics["final_gap"])
    if gaps[0] != gaps[1]:
        return f"{tie} the smaller absolute gap ({gaps[0]:.2f} vs {gaps[1]:.2f})"
    if chosen.num_params != runner_up.num_params:
        return f"{tie} fewer parameters ({chosen.num_params:,} vs {runner_up.num_params:,})"
    return f"{tie} gap and parameters too, and it is the earlier run"


def _status(run: RunSummary, chosen: RunSummary, rule: SelectionRule) -> str:
    if run.run_id == chosen.run_id:
        return f"{run.status}, chosen"
    if not rule.eligible(run):
        return f"{run.status}, over {rule.max_params:,} params"
    return run.status


def summary_table(ranked: Sequence[RunSummary], chosen: RunSummary,
                  rule: SelectionRule) -> list[list[str]]:
    """The seed's "Experiment Summary Table", one row per run, header first."""
    rows = [["Experiment", "Date", "Architecture", "Parameters", "Train Acc", "Test Acc", "Gap",
             "Epochs", "LR", "Batch Size", "Dropout", "Status", "Run"]]
    for run in ranked:
        p, m = run.params, run.metrics
        rows.append([run.name, datetime.fromtimestamp(run.start_time / 1000).strftime(
            "%Y-%m-%d %H:%M"), p.get("model", "?"), f"{run.num_params:,}",
            f"{m['train_acc']:.2f}%", f"{m['test_acc']:.2f}%", f"{m['final_gap']:+.2f}",
            p.get("epochs", "?"), p.get("lr", "?"), p.get("batch_size", "?"),
            p.get("dropout", "?"), _status(run, chosen, rule), run.run_id[:8]])
    return rows


def side_by_side_table(runs: Sequence[RunSummary], rule: SelectionRule) -> list[list[str]]:
    """Metrics as rows, runs as columns (the chosen one first), then each run minus the first."""
    names = labels(runs)
    metrics = [*TABLE_METRICS, *([rule.metric] if rule.metric not in TABLE_METRICS else [])]
    rows = [["Metric", *names, *(f"Δ {name} − {names[0]}" for name in names[1:])]]
    for key in metrics:
        spec = METRICS.get(key)
        values = [r.metrics[key] for r in runs]
        shown = [spec.format(v).rstrip("%") if spec else f"{v:.6g}" for v in values]
        rows.append([TABLE_ROWS.get(key, key), *shown,
                     *(f"{v - values[0]:+.2f}" for v in values[1:])])
    counts = [r.num_params for r in runs]
    rows.append(["Parameters", *(f"{c:,}" for c in counts),
                 *(f"{c - counts[0]:+,}" for c in counts[1:])])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to align, so it reads the same in a terminal."""
    return tabulate(rows[1:], headers=rows[0], tablefmt="github", disable_numparse=True)


def render_report(comparison: Comparison, shown: Sequence[RunSummary]) -> str:
    """comparison.md: what was compared, the rule, the choice and why, both tables, the plot."""
    c = comparison
    matching = f" matching `{c.filter_string}`" if c.filter_string else ""
    lines = [f"# Run comparison: experiment `{c.experiment}`", "",
             f"{len(c.ranked)} FINISHED training runs{matching}, compared by "
             f"`mnist-mlflow compare` on {datetime.now():%Y-%m-%d %H:%M}.", "",
             "## Selection rule", "", f"The production candidate is the run with the "
             f"{c.rule.describe()}.", "",
             "## Choice", "",
             f"**{c.chosen.name}** (run `{c.chosen.run_id}`, "
             f"{c.rule.metric} {c.chosen.metrics[c.rule.metric]:.6g}, "
             f"{c.chosen.num_params:,} parameters): {c.reason}.", ""]
    if c.skipped:
        lines += ["Skipped:", "", *(f"- {s}" for s in c.skipped), ""]
    lines += ["## Experiment Summary Table", "",
              markdown_table(summary_table(c.ranked, c.chosen, c.rule)), "",
              "Train Acc, Test Acc and Gap are those of the last epoch.", "",
              f"## Side by side (top {len(shown)})", "",
              markdown_table(side_by_side_table(shown, c.rule)), "",
              f"Test accuracy and test loss per epoch: `{REPORT_PLOT}`, beside this report.",
              ""]
    return "\n".join(lines)


def labels(runs: Sequence[RunSummary]) -> list[str]:
    """Run names, with a short run id where a name occurs more than once (seeds, reruns)."""
    names = [r.name for r in runs]
    return [f"{r.name} ({r.run_id[:8]})" if names.count(r.name) > 1 else r.name for r in runs]


def metric_histories(runs: Sequence[RunSummary]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per run label: metric -> [(epoch, value)] for the plotted metrics."""
    client = MlflowClient()
    return {label: {metric: sorted((m.step, m.value)
                                   for m in client.get_metric_history(run.run_id, metric))
                    for metric in PLOT_METRICS}
            for label, run in zip(labels(runs), runs, strict=True)}


def compare(experiment: str, filter_string: str = "",
            rule: SelectionRule | None = None, top: int = 5,
            report_dir: Path | None = None, runner_run_id: str | None = None) -> Comparison:
    """Rank the runs, pick one by `rule`, write comparison.md/png and log them as a run.

    Under `mlflow run` (`runner_run_id`) the experiment is the one the runner put its run in.
    """
    rule = rule or SelectionRule()
    if top < 1:
        raise UserError(f"invalid --top: must be >= 1, got {top}")
    if rule.max_params < 1:
        raise UserError(f"invalid --max-params: must be >= 1, got {rule.max_params}")
    if runner_run_id:
        client = MlflowClient()
        experiment = client.get_experiment(
            client.get_run(runner_run_id).info.experiment_id).name
    runs, skipped = find_runs(experiment, filter_string, rule.metric)
    for warning in skipped:
        log.warning(warning)
    if skipped and not runs:
        raise UserError(f"none of the {len(skipped)} FINISHED runs has every metric the "
                        f"comparison needs ({', '.join(sorted({*TABLE_METRICS, rule.metric}))}); "
                        "check --metric and --filter")
    chosen, reason = select(runs, rule)
    ranked = rank(runs, rule)
    shown = ranked[:top]
    comparison = Comparison(experiment, rule, filter_string, ranked, skipped, chosen, reason)
    comparison.histories = metric_histories(shown)
    comparison.report = render_report(comparison, shown)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / REPORT_FILE).write_text(comparison.report)
        plot_comparison(comparison.histories, folder / REPORT_PLOT,
                        f"{experiment}: {len(shown)} of {len(ranked)} runs")
        comparison.comparison_run_id = _log_comparison_run(comparison, folder, runner_run_id)
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in (REPORT_FILE, REPORT_PLOT):
                (report_dir / name).write_bytes((folder / name).read_bytes())
    return comparison


def _log_comparison_run(comparison: Comparison, folder: Path, runner_run_id: str | None) -> str:
    """A run tagged as a comparison, named with its time, holding the report as its
    description and artifacts, so it lives in MLflow too."""
    run = MlflowRun.create_or_adopt(
        runner_run_id, comparison.experiment, f"comparison-{datetime.now():%Y-%m-%d-%H%M}",
        tags={ROLE_TAG: COMPARISON_ROLE, CHOSEN_RUN_TAG: comparison.chosen.run_id,
              "chosen_run_name": comparison.chosen.name},
        description=comparison.report)
    run.log_new_params({"metric": comparison.rule.metric,
                        "max_params": comparison.rule.max_params,
                        "higher_is_better": comparison.rule.higher_is_better,
                        "filter": comparison.filter_string,
                        "candidates": len(comparison.ranked)})
    run.log_artifact(folder / REPORT_FILE)
    run.log_artifact(folder / REPORT_PLOT)
    run.end(RunStatus.FINISHED)
    return run.run_id
