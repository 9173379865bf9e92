"""What a comparison found and says: the `Comparison` (groups, verdict, what the registry
did), its tables, the report (comparison.md), the verdict as the registry's version page opens
with it. comparison.py decides what goes in; this module only holds and renders it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from tabulate import tabulate

from mnist_mlflow.promotion import ALREADY, FIRST, Verdict, sentence
from mnist_mlflow.schema import (
    BEST_TEST_ACC,
    FINAL_GAP,
    FINAL_TEST_ACC,
    FINAL_VAL_ACC,
    METRICS,
    REPORT_DISAGREEMENTS,
    REPORT_PARETO,
    REPORT_PLOT,
    TRAIN_ACC,
)
from mnist_mlflow.selection import (
    SEED_PROTOCOL,
    Group,
    RunSummary,
    SelectionRule,
    contrast,
    on_test_set,
)
from mnist_mlflow.stats import METHOD, Difference, Interval, Pooled, Summary, interval
from mnist_mlflow.stats import difference as group_difference


@dataclass(frozen=True)
class VerdictNumbers:
    """The verdict in numbers, on the selection metric: the chosen group, what it was judged
    against (production's group; with no production, the runner-up) and the difference."""

    ours: Interval
    against: Group | None
    against_is_production: bool
    against_interval: Interval | None
    difference: Difference | None
    pooled: Pooled  # the seed variance the intervals used


@dataclass
class Comparison:
    """The outcome: groups ranked (eligible first, in rule order), the verdict against
    production, what the registry did, and the report."""

    experiment: str
    rule: SelectionRule
    filter_string: str
    groups: list[Group]
    skipped: list[str]
    notes: list[str] = field(default_factory=list)
    pooled: dict[str, Pooled] = field(default_factory=dict)
    verdict: Verdict | None = None
    reason: str = ""
    differences: list[str] = field(default_factory=list)
    # When the verdict's difference is within noise: how many seeds would likely decide it.
    seeds: str = ""
    model_name: str = ""
    registered_version: str = ""
    # Why nothing was registered though registering was asked: no run of the chosen group
    # has a model that loads (empty: it was asked not to register, or it registered).
    unregistrable: str = ""
    promotion: str = ""
    disagreements: int = 0
    files: list[str] = field(default_factory=list)  # the report and its figures
    comparison_run_id: str = ""
    report: str = ""
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    # One moment for the run's name, its report and its description: each rendering asking
    # the clock could cross a minute between them.
    compared_at: datetime = field(default_factory=datetime.now)

    @property
    def ranked(self) -> list[RunSummary]:
        """Every compared run, group by group in rank order."""
        return [run for group in self.groups for run in group.runs]

    @property
    def eligible(self) -> list[Group]:
        return [g for g in self.groups if self.rule.eligible(g)]

    @property
    def chosen_group(self) -> Group:
        return self.verdict.group

    @property
    def chosen(self) -> RunSummary:
        return self.verdict.run

    def interval(self, group: Group, metric: str) -> Interval | None:
        """The group's 95% interval of `metric` over seeds and images (None without it)."""
        sample = group.sample(metric)
        if sample is None:
            return None
        return interval(sample, self.pooled.get(metric) or Pooled.of([sample]))

    def numbers(self) -> VerdictNumbers:
        rule, verdict = self.rule, self.verdict
        pooled = self.pooled.get(rule.metric) or Pooled.of([verdict.group.sample(rule.metric)])
        ours = interval(verdict.group.sample(rule.metric), pooled)
        production = verdict.production.group if verdict.production is not None else None
        against = production or next((g for g in self.eligible if g is not verdict.group),
                                     None)
        if against is None or not against.has(rule.metric):
            return VerdictNumbers(ours, None, False, None, None, pooled)
        found = verdict.difference if production is not None else None
        if found is None:
            found = group_difference(verdict.group.sample(rule.metric),
                                     against.sample(rule.metric), pooled,
                                     rule.higher_is_better)
        return VerdictNumbers(ours, against, production is not None,
                              interval(against.sample(rule.metric), pooled), found, pooled)

    def difference_sentence(self, a: Group, b: Group, metric: str) -> str:
        label = f"{contrast(a.config, b.config)}, {metric}"
        if not (a.has(metric) and b.has(metric)):
            missing = a if not a.has(metric) else b
            return f"{label}: no {metric} on {missing.label()}"
        found = group_difference(a.sample(metric), b.sample(metric),
                                 self.pooled.get(metric) or Pooled(), self.rule.better(1, 0))
        return found.sentence(label)



# The side-by-side rows, as the seed's report labelled them.
TABLE_ROWS = {FINAL_VAL_ACC: "Val Acc (final)", FINAL_TEST_ACC: "Test Acc (final)",
              TRAIN_ACC: "Train Acc (final)", FINAL_GAP: "Gap (train − test)",
              BEST_TEST_ACC: "Best Test Acc"}


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


def _sd_cell(summary: Summary | None, digits: int = 2) -> str:
    if summary is None:
        return "—"
    if summary.n == 1:
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.sd:.{digits}f}"


def interval_cell(found: Interval | None) -> str:
    """`99.36 [99.20, 99.52]`: a group mean with its 95% interval (seeds and images)."""
    if found is None:
        return "—"
    if found.low is None:
        return f"{found.mean:.2f} (no CI)"
    return f"{found.mean:.2f} [{found.low:.2f}, {found.high:.2f}]"


def _status(group: Group, comparison: Comparison) -> str:
    rule = comparison.rule
    if comparison.verdict is not None and group is comparison.verdict.group:
        return "chosen"
    if not rule.eligible(group):
        return rule.why_not(group)
    return "" if group.validated or on_test_set(rule.metric) else SEED_PROTOCOL


def summary_table(comparison: Comparison) -> list[list[str]]:
    """The seed's "Experiment Summary Table", one row per group: the selection metric and
    final test accuracy with 95% intervals over seeds and images, the rest mean ± sd over
    seeds; header first. A group of one run shows as that run."""
    rule = comparison.rule
    rows = [["Experiment", "n", "Architecture", "Parameters",
             f"{rule.metric} (selection), 95% CI", "Test Acc (final), 95% CI",
             "Test Acc min–max", "Train Acc ± sd", "Gap ± sd", "Epochs", "LR", "Batch Size",
             "Dropout", "Status", "Run"]]
    chosen = comparison.verdict.run if comparison.verdict else None
    # `compare --no-register` chooses the same run and registers nothing.
    registered = bool(comparison.registered_version)
    for group in comparison.groups:
        config, test = group.config, group.summary(FINAL_TEST_ACC)
        selection = comparison.interval(group, rule.metric)
        rows.append([group.name if group.n > 1 else group.runs[0].name, str(group.n),
                     config.model, f"{group.num_params:,}",
                     interval_cell(selection) if selection else SEED_PROTOCOL
                     if not group.validated else "—",
                     interval_cell(comparison.interval(group, FINAL_TEST_ACC)),
                     f"{test.min:.2f}–{test.max:.2f}",
                     _sd_cell(group.summary(TRAIN_ACC)), _sd_cell(group.summary(FINAL_GAP)),
                     str(config.epochs), f"{config.lr:g}", str(config.batch_size),
                     f"{config.dropout:g}", _status(group, comparison),
                     group.runs[0].run_id[:8] if group.n == 1 else
                     f"{chosen.run_id[:8]} ({'registered' if registered else 'chosen'})"
                     if chosen is not None and chosen in group.runs else f"{group.n} runs"])
    return rows


def side_by_side_table(groups: Sequence[Group], rule: SelectionRule) -> list[list[str]]:
    """Metrics as rows (mean ± sd over seeds), groups as columns (the chosen one first), then
    each group's mean minus the first's."""
    # Numbered columns: config_groups can be long, and each Δ column would repeat two of them.
    names = [f"{index}: {g.label()}" for index, g in enumerate(groups, 1)]
    metrics = [*TABLE_ROWS, *([rule.metric] if rule.metric not in TABLE_ROWS else [])]
    rows = [["Metric (mean ± sd over seeds)", *names,
             *(f"Δ {index} − 1" for index in range(2, len(groups) + 1))]]
    for key in metrics:
        summaries = [g.summary(key) for g in groups]
        if not any(summaries):
            continue
        digits = METRICS[key].digits if key in METRICS else 4
        first = summaries[0]
        rows.append([TABLE_ROWS.get(key, key), *(_sd_cell(s, digits) for s in summaries),
                     *("—" if s is None or first is None else f"{s.mean - first.mean:+.{digits}f}"
                       for s in summaries[1:])])
    counts = [g.num_params for g in groups]
    rows.append(["Parameters", *(f"{c:,}" for c in counts),
                 *(f"{c - counts[0]:+,}" for c in counts[1:])])
    return rows


def verdict_lines(comparison: Comparison) -> list[str]:
    """The verdict and what was done about it, as the report and the terminal say it."""
    c = comparison
    if c.verdict is None:
        return []
    if c.unregistrable:
        return [f"Not registered: {c.unregistrable}. Production stays as it was."]
    if not c.registered_version:
        would = ("production would move to it" if c.verdict.moves
                 else f"production would stay: {c.verdict.why}")
        return [f"Not registered (--no-register): {c.verdict.run.name} would be; {would}."]
    lines = [sentence(c.verdict, c.rule.metric, c.model_name, c.registered_version)]
    if c.promotion:
        lines.append(f"{c.promotion[0].upper()}{c.promotion[1:]}.")
    return lines


def reading(comparison: Comparison, numbers: VerdictNumbers) -> str:
    """The verdict in plain words: how sure the registry is that this is the better model."""
    verdict, found = comparison.verdict, numbers.difference
    if verdict.kind == ALREADY:
        return "already production: nothing moved"
    if numbers.against_is_production:
        return (f"a real gain over production: it moved on {verdict.kind}" if verdict.moves
                else f"not a sure gain over production, which stays: {verdict.why}")
    first = "first promotion" if verdict.kind == FIRST else verdict.kind
    if found is None or not found.known:
        return f"{first}; no runner-up to measure it against"
    if found.real:
        return f"{first}; a real lead over the runner-up"
    return (f"{first}; within noise of the runner-up (the interval of the difference holds "
            "zero): chosen by the rule's order, not by a sure lead")


def verdict_table(comparison: Comparison) -> list[str]:
    """The verdict in numbers as Markdown lines: this group and what it was judged against,
    each with its mean, 95% interval and seeds, the difference with its interval and p, and
    the reading."""
    c = comparison
    numbers = c.numbers()
    metric = c.rule.metric
    rows = [["", "group", "seeds", f"{metric}, 95% interval"],
            ["**chosen**", c.verdict.group.name, str(numbers.ours.n), numbers.ours.format()]]
    if numbers.against is not None:
        short = "production" if numbers.against_is_production else "runner-up"
        role = (f"production (version {c.verdict.production.version})"
                if numbers.against_is_production else short)
        rows.append([role, numbers.against.name, str(numbers.against.n),
                     numbers.against_interval.format()])
        found = numbers.difference
        p = (f", one-sided p = {found.p_better:.2g}"
             if found.known and not math.isnan(found.p_better) else "")
        rows.append(["difference", f"chosen − {short}", "", f"{found.interval_text()}{p}"])
    return [markdown_table(rows), "", f"**Reading:** {reading(c, numbers)}."]


def file_figure(alt: str, name: str) -> str:
    """A figure beside comparison.md (the --report folder, docs/)."""
    return f"![{alt}]({name})"


def render_report(comparison: Comparison, shown: Sequence[Group],
                  figure: Callable[[str, str], str] = file_figure) -> str:
    """comparison.md: the headline, the verdict, what was compared, the rule, the choice and
    why, whether the differences are real, both tables, the figures (the markdown `figure`
    makes of each: alt text, file name)."""
    c = comparison
    matching = f" matching `{c.filter_string}`" if c.filter_string else ""
    verdict = c.verdict
    lines = [headline(c.rule), "", f"# Run comparison: experiment `{c.experiment}`", "",
             f"{len(c.ranked)} FINISHED training runs{matching} in {len(c.groups)} groups "
             "(one configuration over its seeds, tag `config_group`), compared by "
             f"`mnist-mlflow compare` on {c.compared_at:%Y-%m-%d %H:%M}.", "",
             f"Method: {METHOD}.", ""]
    if verdict is not None:
        lines += ["## Verdict", "", *verdict_lines(c), "", *verdict_table(c), ""]
        if REPORT_DISAGREEMENTS in c.files:
            lines += [figure("The validation images on which the new and the production "
                             "model answer differently", REPORT_DISAGREEMENTS), ""]
    lines += ["## Selection rule", "", f"The production candidate is chosen by the "
              f"{c.rule.describe()}.", ""]
    if verdict is not None:
        test = c.interval(verdict.group, FINAL_TEST_ACC)
        lines += ["## Choice", "", f"**{verdict.group.label()}**: {c.reason}.", "",
                  f"Registered run: {verdict.run.name} (`{verdict.run.run_id}`), "
                  f"{c.rule.metric} {verdict.run.metrics[c.rule.metric]:.2f}, "
                  f"{verdict.run.num_params:,} parameters. Test accuracy of the recipe: "
                  f"{test.format() if test else '—'}; of this run: "
                  f"{verdict.run.metrics[FINAL_TEST_ACC]:.2f}.", ""]
    if c.differences:
        lines += ["## Is the difference real?", "",
                  "Difference of group means with its 95% interval over seeds and images; "
                  "\"within noise\" when it holds zero.", "",
                  *(f"- {d}" for d in c.differences), ""]
        if c.seeds:
            lines += [f"Seeds to decide: {c.seeds}", ""]
    if c.skipped or c.notes:
        lines += ["Left out, and how runs were scored:", "",
                  *(f"- {s}" for s in [*c.skipped, *c.notes]), ""]
    lines += ["## Experiment Summary Table", "",
              markdown_table(summary_table(c)), "",
              "The selection metric and the final test accuracy: group mean with its 95% "
              "interval over seeds and images; Train Acc and Gap: mean ± sd over a group's "
              "seeds (n), of the last epoch, whose model is logged.", "",
              f"## Side by side (top {len(shown)} groups)", "",
              markdown_table(side_by_side_table(shown, c.rule)), "",
              "## Figures", "",
              f"Per epoch, mean over each group's seeds ({REPORT_PLOT}):", "",
              figure("Per-epoch curves, mean over each group's seeds", REPORT_PLOT), "",
              f"Test accuracy against parameters, group means with 95% intervals over seeds "
              f"and images ({REPORT_PARETO}):", "",
              figure("Test accuracy against parameters", REPORT_PARETO), ""]
    return "\n".join(lines)


# A run's page in the MLflow UI, from any page of it (the description is Markdown there).
RUN_LINK = "#/runs/{run_id}"


def version_description(comparison: Comparison) -> str:
    """The registered version's description: the verdict in one sentence first (the
    registry's version table shows only the start), then in numbers (this group and what it
    was judged against, the difference, the reading), the comparison run as a link, then
    the recipe's expected test accuracy (after validation: it is not what chose) and the
    rule."""
    c, verdict = comparison, comparison.verdict
    test = c.interval(verdict.group, FINAL_TEST_ACC)
    link = f"[{c.comparison_run_id}]({RUN_LINK.format(run_id=c.comparison_run_id)})"
    return "\n".join([
        " ".join(verdict_lines(c)), "", *verdict_table(c), "",
        f"Chosen by `mnist-mlflow compare`, comparison run {link}: {c.reason}.", "",
        f"Test accuracy of its recipe ({verdict.group.name}): "
        f"{test.format() if test else '—'} (seeds and images); of this run: "
        f"{verdict.run.metrics[FINAL_TEST_ACC]:.2f}. {headline(c.rule)}", "",
        f"Rule: {c.rule.describe()}."])
