"""The selection rule: runs grouped over seeds, and which group a comparison prefers.

A group is one configuration over its seeds (`config_group`). Groups are ranked by the mean of
a validation metric over their seeds; test metrics are reported, never used to choose (unless
`--metric` names one, and then the report says so first). Pure data over run summaries: the
MLflow queries are in queries.py, the statistics in stats.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mnist_mlflow.config import TrainConfig, UserError, shown_value
from mnist_mlflow.records import Records
from mnist_mlflow.schema import (
    FINAL_GAP,
    FINAL_TEST_ACC,
    FINAL_VAL_ACC,
    METRICS,
    RECORDED_METRICS,
)
from mnist_mlflow.stats import Sample, Summary

DEFAULT_METRIC = FINAL_VAL_ACC
DEFAULT_MAX_PARAMS = 8000
# What every report says of runs without a validation split (--val-size 0).
SEED_PROTOCOL = "selected on test (the seed's protocol)"


def metric_text(metric: str, value: float) -> str:
    """A metric's value to the digits it means (99.36, 0.0213), without its unit."""
    spec = METRICS.get(metric)
    return spec.format(value).rstrip("%s") if spec else f"{value:.4g}"


def on_test_set(metric: str) -> bool:
    """Whether choosing on `metric` looks at the test set."""
    return "test" in metric


@dataclass(frozen=True)
class RunSummary:
    """What the comparison needs of one FINISHED training run; `records` holds its per-image
    records by scored set ("validation", "test") once they are loaded."""

    run_id: str
    name: str
    start_time: int
    status: str
    num_params: int
    params: dict[str, str]
    metrics: dict[str, float]
    config: TrainConfig
    val_split: str = ""
    records: dict[str, Records] = field(default_factory=dict, compare=False)

    @property
    def group(self) -> str:
        return self.config.config_group

    def scored_on(self, metric: str) -> str:
        """Which images `metric` was measured on: runs measured on other images are never
        compared on it."""
        if on_test_set(metric):
            return f"test images {self.config.test_limit or 'all'}"
        return f"validation split {self.val_split or 'none'}"

    def images(self, scored: str) -> int:
        """How many images the run scored in set `scored`."""
        if scored == "validation":
            return self.config.val_size
        return self.config.test_limit or 10_000


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
        """n, mean, sd, min and max of `metric` over the seeds (None when a run lacks it)."""
        return Summary.of(self.values(metric)) if self.has(metric) else None

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return sum(values) / len(values)

    def recorded(self, metric: str) -> bool:
        """Whether every run has per-image records of what `metric` measures."""
        scored = RECORDED_METRICS.get(metric)
        return scored is not None and all(scored in r.records for r in self.runs)

    def sample(self, metric: str) -> Sample | None:
        """The group's `metric` for the statistics: per-image records where every run has
        them (accuracies from the records), else the values with a binomial image term
        (accuracies) or none (other metrics)."""
        if not self.has(metric):
            return None
        scored = RECORDED_METRICS.get(metric)
        if scored is None:
            return Sample(self.values(metric))
        if self.recorded(metric):
            records = [r.records[scored] for r in self.runs]
            if all(r.aligned_with(records[0]) for r in records):
                return Sample(self.values(metric), np.stack([r.correct for r in records]),
                              key=records[0].digest())
        return Sample(self.values(metric), images=self.runs[0].images(scored))

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
                "(train − test accuracy at the last epoch). The first promotion goes to the "
                "first group unless one of more seeds is surer (a better 95% bound of its "
                "mean, seed and image noise counted); production moves only to a group that "
                "beats production's beyond seed and image noise, with the error rate of every "
                "look controlled (Holm); the "
                f"registered run is that group's run with the {best} `{self.metric}`")

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
        value = group.mean(self.metric)
        gap = sum(abs(v) for v in group.values(FINAL_GAP)) / group.n
        return (-value if self.higher_is_better else value, -group.n, group.num_params, gap)

    def best_run(self, group: Group) -> RunSummary:
        """The group's run to register: best on the metric, then the earlier run."""
        return self.best_runs(group)[0]

    def best_runs(self, group: Group) -> list[RunSummary]:
        """The group's runs in the order they would be registered (best_run first)."""
        sign = -1 if self.higher_is_better else 1
        return sorted(group.runs, key=lambda r: (sign * r.metrics[self.metric], r.start_time))

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


def rank(groups: Sequence[Group], rule: SelectionRule) -> list[Group]:
    """Eligible groups in rule order, then the others by parameter count."""
    eligible = sorted((g for g in groups if rule.eligible(g)), key=rule.sort_key)
    others = sorted((g for g in groups if not rule.eligible(g)),
                    key=lambda g: (g.num_params, g.name))
    return eligible + others


def top(groups: Sequence[Group], rule: SelectionRule) -> Group:
    """The group the rule ranks first; UserError when none qualifies."""
    if not groups:
        raise UserError("no FINISHED runs with training metrics to compare")
    chosen = rank(groups, rule)[0]
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
    return chosen


def ranking_reason(chosen: Group, eligible: Sequence[Group], rule: SelectionRule) -> str:
    """Where the rule ranks `chosen` among `eligible`, and against whom, in a sentence."""
    best = "highest" if rule.higher_is_better else "lowest"
    mean = chosen.mean(rule.metric)
    own = f"{rule.metric} {metric_text(rule.metric, mean)}, n = {chosen.n}"
    if len(eligible) == 1:
        return f"it is the only eligible group (mean {own})"
    if chosen is not eligible[0]:
        first = eligible[0]
        return (f"its mean {own}, ranks {eligible.index(chosen) + 1} of the {len(eligible)} "
                f"eligible groups; {first.label()} has the {best}, "
                f"{metric_text(rule.metric, first.mean(rule.metric))}")
    runner_up = eligible[1]
    other = runner_up.mean(rule.metric)
    text = (f"it has the {best} mean {rule.metric} ({metric_text(rule.metric, mean)}, "
            f"n = {chosen.n}) of the {len(eligible)} eligible groups; the runner-up "
            f"{runner_up.label()} has {metric_text(rule.metric, other)}")
    if mean == other:
        tie_break = "more seeds" if chosen.n != runner_up.n else "fewer parameters"
        text += f"; tied, it wins on {tie_break}"
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
