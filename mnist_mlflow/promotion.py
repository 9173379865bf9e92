"""Whether `production` moves: the eligible groups judged against production's group over
seeds and images (stats.judge, with the error allowance left by this production version's
looks), then McNemar's test of the two models on the validation images. Decides; registry.py moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mnist_mlflow.selection import (
    Group,
    RunSummary,
    SelectionRule,
    contrast,
    metric_text,
)
from mnist_mlflow.stats import (
    Difference,
    Judgement,
    Looks,
    McNemar,
    Pooled,
    fingerprint,
    interval,
    judge,
)

FIRST, GAIN, STAYS, FORCED, ALREADY = ("first promotion", "a real gain", "stays", "--force",
                                       "already production")


@dataclass(frozen=True)
class Production:
    """The version holding `production`, its group on the comparison's images (None, with
    `problem` saying why, when it cannot be judged against), and its looks so far."""

    version: str
    run_id: str
    run_name: str
    group: Group | None
    problem: str = ""
    looks: Looks = Looks()


@dataclass(frozen=True)
class Verdict:
    """The group whose best run is registered, whether production moves to it, and why."""

    group: Group
    run: RunSummary
    moves: bool
    kind: str  # FIRST, GAIN, STAYS or FORCED
    why: str
    difference: Difference | None = None
    judgement: Judgement | None = None
    mcnemar: McNemar | None = None
    production: Production | None = None

    def replaces(self) -> str:
        """`version 1 (gap8k-dropout0 ..., n = 3)`, what production was."""
        if self.production is None:
            return "no version"
        group = self.production.group
        what = f" ({group.label()})" if group is not None else ""
        return f"version {self.production.version}{what}"


def pooled_over(groups: Sequence[Group], metric: str) -> Pooled:
    """The seed variance pooled over the groups with `metric` (each counted once)."""
    unique = {g.name: g for g in groups if g is not None and g.has(metric)}
    return Pooled.of([g.sample(metric) for g in unique.values()])


def evidence(group: Group, production: Group, rule: SelectionRule) -> str:
    """Names what a judgement of `group` against `production` looked at: the same runs on
    the same images are the same evidence. Runs, not seeds: seeds trained again (another
    thread count or device gives other numbers) are new evidence and spend a look, or
    re-rolling them until a challenger wins would cost nothing."""
    return fingerprint(rule.metric, group.name, [r.run_id for r in group.runs],
                       production.name, [r.run_id for r in production.runs],
                       group.runs[0].scored_on(rule.metric))


def surest(eligible: Sequence[Group], rule: SelectionRule, pooled: Pooled) -> Group:
    """The rule's first group, unless a group of more seeds is surer: its 95% bound on the
    metric (the lower for a higher-is-better one; seed and image noise, the seeds' spread
    pooled) is better. So a one-seed group that is high by luck is not chosen over one
    measured on more seeds, and groups of equal seeds keep the rule's order. Where no bound
    can be told (no group has two seeds), the rule's first."""
    def bound(group: Group) -> float | None:
        found = interval(group.sample(rule.metric), pooled)
        if found.low is None:
            return None
        return found.low if rule.higher_is_better else -found.high

    chosen, chosen_bound = eligible[0], bound(eligible[0])
    for group in eligible[1:]:  # in the rule's order: the first of equals stays
        if group.n > chosen.n and chosen_bound is not None:
            found = bound(group)
            if found is not None and found > chosen_bound:
                chosen, chosen_bound = group, found
    return chosen


def decide(eligible: Sequence[Group], rule: SelectionRule, pooled: Pooled,
           production: Production | None, share: float = 1.0) -> Verdict:
    """The verdict over `eligible` (in rule order) against `production`, spending `share`
    of this look's allowance (less than all when a sequential sweep's rounds spent part)."""
    top = eligible[0]
    if production is None:
        group = surest(eligible, rule, pooled)
        return Verdict(group, rule.best_run(group), True, FIRST,
                       "the first promotion: no version was production yet")
    base = production.group
    if base is None:
        return Verdict(top, rule.best_run(top), False, STAYS,
                       f"production (version {production.version}) cannot be judged against: "
                       f"{production.problem}", production=production)
    challengers = [g for g in eligible if g.name != base.name]
    looks = production.looks.after([evidence(g, base, rule) for g in challengers]) \
        if challengers else production.looks
    judgement = judge(base.sample(rule.metric), {g.name: g.sample(rule.metric)
                                                for g in challengers},
                      pooled, looks, rule.higher_is_better, share)
    winners = [g for g in challengers if g.name in judgement.beats]
    if winners:
        # Of several real gains the surest: the highest lower bound, so that a one-seed group
        # whose mean is higher by luck does not win over one measured on five seeds.
        group = max(winners, key=lambda g: judgement.differences[g.name].surest_gain(
            rule.higher_is_better))
        found = judgement.differences[group.name]
        return Verdict(group, rule.best_run(group), True, GAIN,
                       _judged(group, base, found, judgement, rule), found, judgement,
                       production=production)
    if top.name == base.name:
        if rule.best_run(top).run_id == production.run_id:
            return Verdict(top, rule.best_run(top), False, ALREADY,
                           f"its run is production's (version {production.version})",
                           None, judgement, production=production)
        why = (f"the top group is production's own recipe ({base.label()}): another seed of it "
               "is no gain")
        return Verdict(top, rule.best_run(top), False, STAYS, why, None, judgement,
                       production=production)
    found = judgement.differences[top.name]
    return Verdict(top, rule.best_run(top), False, STAYS,
                   _judged(top, base, found, judgement, rule), found, judgement,
                   production=production)


def _judged(group: Group, base: Group, found: Difference, judgement: Judgement,
            rule: SelectionRule) -> str:
    """`model gap5k vs gap8k, final_val_acc: +0.30 points, 95% CI [...], n = 5 vs 3; one-sided
    p 0.001 ≤ 0.0125 needed (Holm over 2 groups, look 1): a real gain`."""
    label = f"{contrast(group.config, base.config)}, {rule.metric}"
    if not found.known:
        return (f"{label}: {found.interval_text()}: one seed and no other group with two: "
                "cannot tell")
    looks = judgement.looks
    gain = group.name in judgement.beats
    # Holm's level for this group's place among the p-values (the first place if it failed).
    rank = sorted(d.p_better for d in judgement.differences.values() if d.known).index(
        found.p_better) if gain else 0
    needed = judgement.needed(rank)
    relation = "≤" if gain else ">"
    return (f"{label}: {found.interval_text()}; one-sided p {found.p_better:.3g} {relation} "
            f"{needed:.3g} needed (Holm over the {len(looks.seen)} group(s) judged against "
            f"this production version, look {looks.count}{_round_share(judgement)}): "
            + ("a real gain" if gain else "within noise"))


def _round_share(judgement: Judgement) -> str:
    if judgement.share >= 1:
        return ""
    return f", of which a sequential sweep's round spends {judgement.share:.0%}"


def check_models(verdict: Verdict, mcnemar: McNemar | None) -> Verdict:
    """The verdict once the two models are compared image by image: a model significantly
    worse than production's on the validation images does not move it."""
    if mcnemar is None:
        return verdict
    if verdict.moves and verdict.kind == GAIN and mcnemar.new_is_worse:
        return replace(verdict, moves=False, kind=STAYS, mcnemar=mcnemar, why=(
            f"{verdict.why}, but its run's model is significantly worse than production's "
            f"on the validation images ({mcnemar.sentence()})"))
    return replace(verdict, mcnemar=mcnemar)


def forced(verdict: Verdict) -> Verdict:
    """The verdict under --force: production moves whatever the judgement said."""
    if verdict.moves:
        return verdict
    return replace(verdict, moves=True, kind=FORCED,
                   why=f"--force; without it, it would stay: {verdict.why}")


def sentence(verdict: Verdict, metric: str, model_name: str, version: str) -> str:
    """The verdict in one sentence, as the version's description opens."""
    run = verdict.run
    own = f"{run.name} ({metric} {metric_text(metric, run.metrics[metric])})"
    compared = ""
    if verdict.difference is not None and verdict.difference.known:
        compared = f"; group vs production's: {verdict.difference.interval_text()}"
    counts = ""
    if verdict.mcnemar is not None:
        counts = (f"; image by image on the validation set, {verdict.mcnemar.new_only} only it "
                  f"gets right vs {verdict.mcnemar.old_only} only production's "
                  f"(McNemar p = {verdict.mcnemar.p:.2g}; it was chosen on these images)")
    if verdict.kind == FIRST:
        return f"{model_name} version {version}, {own}, is production: {verdict.why}."
    if verdict.kind == ALREADY:
        return f"{model_name} version {version}, {own}, is production already."
    if verdict.moves:
        return (f"{model_name} version {version}, {own}, replaces {verdict.replaces()} as "
                f"production{compared}{counts}: moved on {verdict.kind}.")
    return (f"{model_name} version {version}, {own}, is registered but not production: "
            f"{verdict.replaces()} stays{compared}{counts}. Why: {verdict.why}. "
            "--force would move it anyway.")
