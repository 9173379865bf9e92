"""Compare tracked training runs: groups over seeds, the selection rule, whether differences
are real, and the report run.

A group is one configuration over its seeds (`config_group`). Groups are chosen by the mean
of a validation metric over their seeds; test metrics are reported, never used to choose
(unless `--metric` names one, and then the report says so first). Differences between groups
come with Welch's 95% interval: a gain smaller than the spread between seeds is not a gain.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from mlflow.entities import Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from tabulate import tabulate

from mnist_mlflow.config import TrainConfig, UserError, shown_value
from mnist_mlflow.mlrun import MlflowRun, experiment_id
from mnist_mlflow.plots import plot_comparison, plot_pareto
from mnist_mlflow.schema import (
    BEST_TEST_ACC,
    CHOSEN_RUN_TAG,
    COMPARISON_ROLE,
    FINAL_GAP,
    FINAL_TEST_ACC,
    FINAL_VAL_ACC,
    METRICS,
    NUM_PARAMS,
    REPORT_FILE,
    REPORT_PARETO,
    REPORT_PLOT,
    ROLE_TAG,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_ROLE,
    VAL_ACC,
    settings_from_params,
    settings_of,
)
from mnist_mlflow.stats import Difference, Summary, welch

log = logging.getLogger("mnist_mlflow")

DEFAULT_METRIC = FINAL_VAL_ACC
DEFAULT_MAX_PARAMS = 8000
# What every report says of runs without a validation split (--val-size 0).
SEED_PROTOCOL = "selected on test (the seed's protocol)"
# The side-by-side rows, as the seed's report labelled them; every compared run needs the
# test and train ones (validation ones where it has a split).
TABLE_ROWS = {FINAL_VAL_ACC: "Val Acc (final)", FINAL_TEST_ACC: "Test Acc (final)",
              TRAIN_ACC: "Train Acc (final)", FINAL_GAP: "Gap (train − test)",
              BEST_TEST_ACC: "Best Test Acc"}
REQUIRED_METRICS = (TEST_ACC, TRAIN_ACC, FINAL_GAP, BEST_TEST_ACC)
PLOT_METRICS = (VAL_ACC, TEST_ACC, TEST_LOSS)


def metric_text(metric: str, value: float) -> str:
    """A metric's value to the digits it means (99.36, 0.0213), without its unit."""
    spec = METRICS.get(metric)
    return spec.format(value).rstrip("%s") if spec else f"{value:.4g}"


def on_test_set(metric: str) -> bool:
    """Whether choosing on `metric` looks at the test set."""
    return "test" in metric


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
    config: TrainConfig

    @classmethod
    def from_run(cls, run: Run) -> RunSummary:
        metrics = dict(run.data.metrics)
        # Runs before final_test_acc existed: the latest test_acc is the last epoch's.
        metrics.setdefault(FINAL_TEST_ACC, metrics[TEST_ACC])
        config = TrainConfig(**settings_from_params(settings_of(run)))
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                   run.info.start_time, run.info.status, int(run.data.params[NUM_PARAMS]),
                   dict(run.data.params), metrics, config)

    @property
    def group(self) -> str:
        return self.config.config_group


@dataclass(frozen=True)
class Group:
    """One configuration over its seeds: the latest FINISHED run of each seed."""

    name: str
    runs: tuple[RunSummary, ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def config(self) -> TrainConfig:
        return self.runs[0].config

    @property
    def num_params(self) -> int:
        return self.runs[0].num_params

    @property
    def validated(self) -> bool:
        """Whether its runs held out a validation split (else: the seed's protocol)."""
        return all(r.config.val_size > 0 for r in self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.config.seed for r in self.runs]

    def has(self, metric: str) -> bool:
        return all(metric in r.metrics for r in self.runs)

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs]

    def summary(self, metric: str) -> Summary | None:
        return Summary.of(self.values(metric)) if self.has(metric) else None

    def label(self) -> str:
        """`name (n = 5)`; a group of one run names its seed (run names may repeat)."""
        return f"{self.name} (n = {self.n})" if self.n > 1 else f"{self.name}, seed {self.seeds[0]}"


def group_runs(runs: Iterable[RunSummary]) -> list[Group]:
    """Runs grouped by config_group, first-seen order; per seed only the latest run counts
    (a rerun of a seed is not another seed)."""
    by_group: dict[str, dict[int, RunSummary]] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        by_group.setdefault(run.group, {})[run.config.seed] = run
    return [Group(name, tuple(sorted(seeds.values(), key=lambda r: r.config.seed)))
            for name, seeds in by_group.items()]


@dataclass(frozen=True)
class SelectionRule:
    """Best mean `metric` over a group's seeds, among groups with at most `max_params`."""

    metric: str = DEFAULT_METRIC
    max_params: int = DEFAULT_MAX_PARAMS
    higher_is_better: bool = True

    def describe(self) -> str:
        best = "highest" if self.higher_is_better else "lowest"
        return (f"{best} mean `{self.metric}` over a group's seeds (a group: one configuration, "
                f"`config_group`), among groups with `num_params` ≤ {self.max_params:,}; ties "
                "go to more seeds, then fewer parameters, then the smaller mean absolute gap "
                "(train − test accuracy at the last epoch). The registered run is the winning "
                f"group's run with the {best} `{self.metric}`")

    def eligible(self, group: Group) -> bool:
        return group.num_params <= self.max_params and group.has(self.metric)

    def why_not(self, group: Group) -> str:
        if group.num_params > self.max_params:
            return f"over {self.max_params:,} params"
        if not group.validated and not on_test_set(self.metric):
            return f"no {self.metric}: {SEED_PROTOCOL}"
        return f"no {self.metric}"

    def sort_key(self, group: Group) -> tuple[float, int, int, float]:
        """Ascending order puts the preferred group first."""
        value = group.summary(self.metric).mean
        gap = sum(abs(v) for v in group.values(FINAL_GAP)) / group.n
        return (-value if self.higher_is_better else value, -group.n, group.num_params, gap)

    def best_run(self, group: Group) -> RunSummary:
        """The group's run to register: best on the metric, then the earlier run."""
        sign = -1 if self.higher_is_better else 1
        return min(group.runs, key=lambda r: (sign * r.metrics[self.metric], r.start_time))

    def difference(self, a: Group, b: Group, metric: str | None = None) -> Difference:
        return welch(a.values(metric or self.metric), b.values(metric or self.metric))


@dataclass
class Comparison:
    """The outcome: groups ranked (eligible first, in rule order), the choice and the report."""

    experiment: str
    rule: SelectionRule
    filter_string: str
    groups: list[Group]
    skipped: list[str]
    chosen_group: Group
    chosen: RunSummary
    reason: str
    differences: list[str] = field(default_factory=list)
    comparison_run_id: str = ""
    report: str = ""
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    @property
    def ranked(self) -> list[RunSummary]:
        """Every compared run, group by group in rank order."""
        return [run for group in self.groups for run in group.runs]

    @property
    def eligible(self) -> list[Group]:
        return [g for g in self.groups if self.rule.eligible(g)]


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


def training_runs(runs: Iterable[Run]) -> tuple[list[RunSummary], list[str]]:
    """The training runs among `runs` with what a comparison reads, and skip warnings."""
    summaries, skipped = [], []
    for run in runs:
        if run.data.tags.get(ROLE_TAG, TRAIN_ROLE) != TRAIN_ROLE:
            continue  # sweep parents and earlier comparisons are not candidates
        missing = [m for m in REQUIRED_METRICS if m not in run.data.metrics]
        missing += [] if run.data.params.get(NUM_PARAMS, "").isdigit() else [NUM_PARAMS]
        if missing:
            skipped.append(f"skipping run {run.info.run_name} ({run.info.run_id}): "
                           f"no {', '.join(missing)}")
            continue
        summaries.append(RunSummary.from_run(run))
    return summaries, skipped


def find_runs(experiment: str, filter_string: str) -> tuple[list[RunSummary], list[str]]:
    """FINISHED training runs of `experiment` matching `filter_string`, and skip warnings."""
    client = MlflowClient()
    found_id = experiment_id(experiment, client)
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = search_all(client, found_id, query)
    except MlflowException as err:
        raise UserError(f"invalid --filter {filter_string!r}: "
                        f"{err.message.splitlines()[0]}") from None
    return training_runs(runs)


def rank(groups: Sequence[Group], rule: SelectionRule) -> list[Group]:
    """Eligible groups in rule order, then the others by parameter count."""
    eligible = sorted((g for g in groups if rule.eligible(g)), key=rule.sort_key)
    others = sorted((g for g in groups if not rule.eligible(g)),
                    key=lambda g: (g.num_params, g.name))
    return eligible + others


def select(groups: Sequence[Group], rule: SelectionRule) -> tuple[Group, str]:
    """The group the rule picks and a sentence saying why; UserError when none qualifies."""
    if not groups:
        raise UserError("no FINISHED runs with training metrics to compare")
    ranked = rank(groups, rule)
    chosen = ranked[0]
    if not rule.eligible(chosen):
        small = [g for g in groups if g.num_params <= rule.max_params]
        if not small:
            smallest = min(g.num_params for g in groups)
            raise UserError(f"no run has num_params <= {rule.max_params:,} (the smallest of "
                            f"the {sum(g.n for g in groups)} runs has {smallest:,}); "
                            "raise --max-params")
        hint = (f" (runs with --val-size 0 follow the seed's protocol; --metric "
                f"{FINAL_TEST_ACC} selects on the test set)" if rule.metric == FINAL_VAL_ACC
                else "; check --metric")
        raise UserError(f"no run within {rule.max_params:,} parameters has metric "
                        f"{rule.metric!r}{hint}")
    return chosen, _reason(chosen, [g for g in ranked if rule.eligible(g)], rule)


def _reason(chosen: Group, eligible: list[Group], rule: SelectionRule) -> str:
    best = "highest" if rule.higher_is_better else "lowest"
    mean = chosen.summary(rule.metric).mean
    if len(eligible) == 1:
        return (f"it is the only eligible group (mean {rule.metric} "
                f"{metric_text(rule.metric, mean)}, n = {chosen.n})")
    runner_up = eligible[1]
    other = runner_up.summary(rule.metric).mean
    text = (f"it has the {best} mean {rule.metric} ({metric_text(rule.metric, mean)}, "
            f"n = {chosen.n}) of the {len(eligible)} eligible groups; the runner-up "
            f"{runner_up.label()} has {metric_text(rule.metric, other)}")
    if mean == other:
        text += (f"; tied, it wins on {'more seeds' if chosen.n != runner_up.n else ''}"
                 f"{'fewer parameters' if chosen.n == runner_up.n else ''}")
    return text


def contrast(a: TrainConfig, b: TrainConfig) -> str:
    """What sets two configurations apart, like `dropout 0.05 vs 0` or
    `model gap8k, lr 0.05 vs model opt, lr 0.01`."""
    a, b = a.what_it_learns(), b.what_it_learns()
    names = [n for n in TrainConfig.field_names() if n != "seed" and getattr(a, n) != getattr(b, n)]
    if not names:
        return f"{a.config_group} vs itself"
    if len(names) == 1:
        return f"{names[0]} {shown_value(getattr(a, names[0]))} vs " \
               f"{shown_value(getattr(b, names[0]))}"

    def values(config: TrainConfig) -> str:
        return ", ".join(f"{n} {shown_value(getattr(config, n))}" for n in names)
    return f"{values(a)} vs {values(b)}"


def difference_sentences(a: Group, b: Group, rule: SelectionRule) -> list[str]:
    """A vs B on the selection metric and, reported only, on final test accuracy."""
    label = contrast(a.config, b.config)
    lines = [rule.difference(a, b).sentence(f"{label}, {rule.metric}")]
    if rule.metric != FINAL_TEST_ACC:
        lines.append(rule.difference(a, b, FINAL_TEST_ACC).sentence(
            f"{label}, {FINAL_TEST_ACC} (reported, not used to choose)"))
    return lines


def find_group(groups: Sequence[Group], name: str) -> Group:
    """The group named `name` (or the only one it begins); UserError listing them otherwise."""
    exact = [g for g in groups if g.name == name]
    prefixed = [g for g in groups if g.name.startswith(name)]
    found = exact or prefixed
    if len(found) != 1:
        what = "matches several groups" if found else "names no group"
        raise UserError(f"invalid --diff {name!r}: {what}; groups: "
                        + "; ".join(g.name for g in groups))
    return found[0]


def _cell(summary: Summary | None, digits: int = 2) -> str:
    if summary is None:
        return "—"
    if summary.n == 1:
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.sd:.{digits}f}"


def _status(group: Group, comparison: Comparison) -> str:
    if group is comparison.chosen_group:
        return "chosen"
    if not comparison.rule.eligible(group):
        return comparison.rule.why_not(group)
    return "" if group.validated or on_test_set(comparison.rule.metric) else SEED_PROTOCOL


def summary_table(comparison: Comparison) -> list[list[str]]:
    """The seed's "Experiment Summary Table", one row per group (n seeds, mean ± sd), header
    first. A group of one run shows as that run."""
    rule = comparison.rule
    rows = [["Experiment", "n", "Architecture", "Parameters", f"{rule.metric} (selection)",
             "Test Acc (final)", "Test Acc min–max", "Train Acc", "Gap", "Epochs", "LR",
             "Batch Size", "Dropout", "Status", "Run"]]
    for group in comparison.groups:
        config, test = group.config, group.summary(FINAL_TEST_ACC)
        selection = group.summary(rule.metric)
        rows.append([group.name if group.n > 1 else group.runs[0].name, str(group.n),
                     config.model, f"{group.num_params:,}",
                     _cell(selection) if selection else SEED_PROTOCOL if not group.validated
                     else "—", _cell(test), f"{test.min:.2f}–{test.max:.2f}",
                     _cell(group.summary(TRAIN_ACC)), _cell(group.summary(FINAL_GAP)),
                     str(config.epochs), f"{config.lr:g}", str(config.batch_size),
                     f"{config.dropout:g}", _status(group, comparison),
                     group.runs[0].run_id[:8] if group.n == 1 else
                     f"{comparison.chosen.run_id[:8]} (registered)"
                     if group is comparison.chosen_group else f"{group.n} runs"])
    return rows


def side_by_side_table(groups: Sequence[Group], rule: SelectionRule) -> list[list[str]]:
    """Metrics as rows (mean ± sd over seeds), groups as columns (the chosen one first), then
    each group's mean minus the first's."""
    # Numbered columns: config_groups can be long, and each Δ column would repeat two of them.
    names = [f"{index}: {g.label()}" for index, g in enumerate(groups, 1)]
    metrics = [*TABLE_ROWS, *([rule.metric] if rule.metric not in TABLE_ROWS else [])]
    rows = [["Metric", *names, *(f"Δ {index} − 1" for index in range(2, len(groups) + 1))]]
    for key in metrics:
        summaries = [g.summary(key) for g in groups]
        if not any(summaries):
            continue
        digits = METRICS[key].digits if key in METRICS else 4
        first = summaries[0]
        rows.append([TABLE_ROWS.get(key, key), *(_cell(s, digits) for s in summaries),
                     *("—" if s is None or first is None else f"{s.mean - first.mean:+.{digits}f}"
                       for s in summaries[1:])])
    counts = [g.num_params for g in groups]
    rows.append(["Parameters", *(f"{c:,}" for c in counts),
                 *(f"{c - counts[0]:+,}" for c in counts[1:])])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to align, so it reads the same in a terminal."""
    return tabulate(rows[1:], headers=rows[0], tablefmt="github", disable_numparse=True)


def headline(rule: SelectionRule) -> str:
    """The report's first line: it says when the choice looked at the test set."""
    if on_test_set(rule.metric):
        return (f"Selected on the test set (`{rule.metric}`): the choice looked at the test "
                "images, so its test accuracy is optimistic.")
    return (f"Selected on validation (`{rule.metric}`, held-out training images); test "
            "metrics are reported, never used to choose.")


def render_report(comparison: Comparison, shown: Sequence[Group]) -> str:
    """comparison.md: the headline, what was compared, the rule, the choice and why, whether
    the differences are real, both tables, the plots."""
    c = comparison
    matching = f" matching `{c.filter_string}`" if c.filter_string else ""
    chosen_test = c.chosen_group.summary(FINAL_TEST_ACC)
    lines = [headline(c.rule), "", f"# Run comparison: experiment `{c.experiment}`", "",
             f"{len(c.ranked)} FINISHED training runs{matching} in {len(c.groups)} groups "
             "(one configuration over its seeds, tag `config_group`), compared by "
             f"`mnist-mlflow compare` on {datetime.now():%Y-%m-%d %H:%M}.", "",
             "## Selection rule", "", f"The production candidate is chosen by the "
             f"{c.rule.describe()}.", "",
             "## Choice", "",
             f"**{c.chosen_group.label()}**: {c.reason}.", "",
             f"Registered run: {c.chosen.name} (`{c.chosen.run_id}`), {c.rule.metric} "
             f"{metric_text(c.rule.metric, c.chosen.metrics[c.rule.metric])}, "
             f"{c.chosen.num_params:,} parameters. "
             f"Test accuracy of the recipe: {chosen_test.format_interval()}; of this run: "
             f"{c.chosen.metrics[FINAL_TEST_ACC]:.2f}.", ""]
    if c.differences:
        lines += ["## Is the difference real?", "",
                  "Difference of group means with Welch's 95% interval (scipy.stats); "
                  "\"within seed noise\" when the interval holds zero.", "",
                  *(f"- {d}" for d in c.differences), ""]
    if c.skipped:
        lines += ["Skipped:", "", *(f"- {s}" for s in c.skipped), ""]
    lines += ["## Experiment Summary Table", "",
              markdown_table(summary_table(c)), "",
              "Mean ± sd over a group's seeds (n); Train Acc, Test Acc and Gap are those of "
              "the last epoch, whose model is logged.", "",
              f"## Side by side (top {len(shown)} groups)", "",
              markdown_table(side_by_side_table(shown, c.rule)), "",
              f"Per epoch, mean over each group's seeds: `{REPORT_PLOT}`. Test accuracy "
              f"against parameters, group means with 95% intervals: `{REPORT_PARETO}`.", ""]
    return "\n".join(lines)


def mean_histories(groups: Sequence[Group]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per group label: metric -> [(epoch, mean over its seeds)] for the plotted metrics."""
    client = MlflowClient()
    histories = {}
    for group in groups:
        curves: dict[str, list[tuple[int, float]]] = {}
        for metric in PLOT_METRICS:
            by_step: dict[int, list[float]] = {}
            for run in group.runs:
                for point in client.get_metric_history(run.run_id, metric):
                    by_step.setdefault(point.step, []).append(point.value)
            points = [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())
                      if len(v) == group.n]
            if points:
                curves[metric] = points
        histories[group.label()] = curves
    return histories


def pareto_points(groups: Sequence[Group]) -> list[tuple[str, int, Summary]]:
    return [(g.label(), g.num_params, g.summary(FINAL_TEST_ACC)) for g in groups]


def compare(experiment: str, filter_string: str = "",
            rule: SelectionRule | None = None, top: int = 5,
            report_dir: Path | None = None, runner_run_id: str | None = None,
            diffs: Sequence[tuple[str, str]] = ()) -> Comparison:
    """Group the runs, pick a group and its best run by `rule`, say whether the top two (and
    each of `diffs`) really differ, write the report and log it as a run.

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
    runs, skipped = find_runs(experiment, filter_string)
    for warning in skipped:
        log.warning(warning)
    if skipped and not runs:
        raise UserError(f"none of the {len(skipped)} FINISHED runs has every metric the "
                        f"comparison needs ({', '.join(REQUIRED_METRICS)}); check --filter")
    groups = group_runs(runs)
    pairs = [(find_group(groups, a), find_group(groups, b)) for a, b in diffs]
    chosen_group, reason = select(groups, rule)
    ranked = rank(groups, rule)
    comparison = Comparison(experiment, rule, filter_string, ranked, skipped, chosen_group,
                            rule.best_run(chosen_group), reason)
    eligible = comparison.eligible
    if len(eligible) > 1:
        pairs.insert(0, (eligible[0], eligible[1]))
    for a, b in pairs:
        if a.has(rule.metric) and b.has(rule.metric):
            comparison.differences += difference_sentences(a, b, rule)
        else:
            comparison.differences.append(
                f"{contrast(a.config, b.config)}: no {rule.metric} on "
                f"{a.label() if not a.has(rule.metric) else b.label()} ({SEED_PROTOCOL})")
    shown = ranked[:top]
    comparison.histories = mean_histories(shown)
    comparison.report = render_report(comparison, shown)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / REPORT_FILE).write_text(comparison.report)
        plot_comparison(comparison.histories, folder / REPORT_PLOT,
                        f"{experiment}: {len(shown)} of {len(ranked)} groups, mean over seeds")
        plot_pareto(pareto_points(ranked), folder / REPORT_PARETO,
                    f"{experiment}: test accuracy against size, one point per group")
        comparison.comparison_run_id = _log_comparison_run(comparison, folder, runner_run_id)
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in (REPORT_FILE, REPORT_PLOT, REPORT_PARETO):
                (report_dir / name).write_bytes((folder / name).read_bytes())
    return comparison


def version_description(comparison: Comparison) -> str:
    """The registered version's description: first sentence short (the registry's version
    table shows only the start), then the recipe's expected test accuracy and why."""
    c, metric = comparison, comparison.rule.metric
    test = c.chosen_group.summary(FINAL_TEST_ACC)
    return (f"{c.chosen.name}: {metric} {metric_text(metric, c.chosen.metrics[metric])}, "
            f"{c.chosen.num_params:,} parameters. Test accuracy of its recipe "
            f"({c.chosen_group.name}): {test.format_interval()}; of this run: "
            f"{c.chosen.metrics[FINAL_TEST_ACC]:.2f}. {headline(c.rule)} Run {c.chosen.run_id}, "
            f"chosen by `mnist-mlflow compare` (comparison run {c.comparison_run_id}): "
            f"{c.reason}. "
            f"Rule: {c.rule.describe()}.")


def _log_comparison_run(comparison: Comparison, folder: Path, runner_run_id: str | None) -> str:
    """A run tagged as a comparison, named with its time, holding the report as its
    description and artifacts, so it lives in MLflow too."""
    run = MlflowRun.create_or_adopt(
        runner_run_id, comparison.experiment, f"comparison-{datetime.now():%Y-%m-%d-%H%M}",
        tags={ROLE_TAG: COMPARISON_ROLE, CHOSEN_RUN_TAG: comparison.chosen.run_id,
              "chosen_run_name": comparison.chosen.name,
              "chosen_group": comparison.chosen_group.name,
              "selected_on": "test" if on_test_set(comparison.rule.metric) else "validation"},
        description=comparison.report)
    run.log_new_params({"metric": comparison.rule.metric,
                        "max_params": comparison.rule.max_params,
                        "higher_is_better": comparison.rule.higher_is_better,
                        "filter": comparison.filter_string,
                        "candidates": len(comparison.ranked),
                        "groups": len(comparison.groups)})
    for name in (REPORT_FILE, REPORT_PLOT, REPORT_PARETO):
        run.log_artifact(folder / name)
    run.end(RunStatus.FINISHED)
    return run.run_id


# --- promotion --------------------------------------------------------------------------------


class PromotionCase(NamedTuple):
    """Whether the challenger's group really beats production's, and why (or why not)."""

    beats: bool
    why: str


def group_of_run(run_id: str) -> Group | None:
    """The group of `run_id` among the FINISHED training runs of its experiment."""
    client = MlflowClient()
    run = client.get_run(run_id)
    summaries, _ = training_runs([run])
    if not summaries:
        return None
    name = summaries[0].group
    peers, _ = training_runs(search_all(client, run.info.experiment_id,
                                        "attributes.status = 'FINISHED'"))
    found = [g for g in group_runs(peers) if g.name == name]
    return found[0] if found else None


def promotion_case(comparison: Comparison, production_run_id: str) -> PromotionCase:
    """Production moves only when the challenger's group beats production's group on the
    selection metric with the 95% interval of the difference on the better side of zero."""
    rule, challenger = comparison.rule, comparison.chosen_group
    current = group_of_run(production_run_id)
    if current is None:
        return PromotionCase(False, "the production version's run has no training metrics "
                                    "to compare with")
    if current.name == challenger.name:
        return PromotionCase(False, f"the challenger is production's own group "
                                    f"({challenger.name}): another seed of the same recipe")
    if not current.has(rule.metric):
        return PromotionCase(False, f"production's group {current.label()} has no "
                                    f"{rule.metric}" + ("" if current.validated else
                                                        f" ({SEED_PROTOCOL})"))
    difference = rule.difference(challenger, current)
    sentence = difference.sentence(
        f"{contrast(challenger.config, current.config)}, {rule.metric}")
    if not difference.known:
        return PromotionCase(False, f"too few seeds: {sentence}")
    if difference.above_zero(rule.higher_is_better):
        return PromotionCase(True, sentence)
    return PromotionCase(False, sentence if difference.real else f"within noise: {sentence}")
