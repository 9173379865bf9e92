"""Where a sequential sweep stands after a round: is the call made, and which groups get more
seeds. `sweep --until-decided` trains, asks this, and trains again; the benchmark
promotion_calibration.py runs the same function on simulated groups.

A round judges the best group (the rule's first) against each other group still in
contention and against production's group. A pair is settled when the best beats the other
beyond noise at the round's share of the error allowance (stats.round_shares), when no
difference as large as `--min-effect` remains (either way between two of the sweep's groups;
against production, no gain that large: production stays either way), or when more seeds, up to
`--max-seeds`, would likely not decide it, planning for about one standard error more than
the difference seen (the validation images' own noise, which seeds do not shrink, can stand
in the way: stats.seeds_to_decide). Groups the best beats can no longer
win and get no more seeds. The call is made when every pair is settled.

Imports neither torch nor MLflow: groups in, a call out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnist_mlflow.promotion import Production, decide
from mnist_mlflow.selection import Group, SelectionRule, contrast
from mnist_mlflow.stats import (
    Difference,
    Looks,
    Pooled,
    Sample,
    difference,
    holm,
    seeds_to_decide,
)

# How a pair stands after a round.
OPEN, BEATEN, BEHIND, EQUAL, UNDECIDABLE = ("open", "beaten", "behind", "equal",
                                            "cannot be decided")
# How the sweep stands: the call made, or more seeds for the groups in contention.
DECIDED, SETTLED, MOST, MORE = ("decided", "settled", "--max-seeds reached", "more seeds")
PRODUCTION = "production"


@dataclass(frozen=True)
class Pair:
    """The best group against another (a group of the sweep, or production's) after a round."""

    other: str  # a group's name, or PRODUCTION
    label: str  # what differs, for people
    difference: Difference
    needed: float  # the one-sided p-value the best needed to beat it this round
    state: str  # OPEN, BEATEN, BEHIND, EQUAL or UNDECIDABLE

    def sentence(self, min_effect: float) -> str:
        found = self.difference
        if not found.known:
            return f"{self.label}: {found.interval_text()}: no seed spread known yet"
        said = {BEATEN: "beats it", BEHIND: "production is better",
                EQUAL: (f"no gain as large as {min_effect:g} points over it"
                        if self.other == PRODUCTION
                        else f"no difference as large as {min_effect:g} points either way"),
                UNDECIDABLE: "more seeds would likely not decide it",
                OPEN: "open: more seeds would likely decide it"}[self.state]
        return (f"{self.label}: {found.interval_text()}; one-sided p {found.p_better:.3g}, "
                f"{self.needed:.3g} needed this round: {said}")


@dataclass(frozen=True)
class RoundCall:
    """After one round: the best group, how it stands against each other, the call (DECIDED,
    SETTLED or MOST: stop; MORE: go on), the groups that get more seeds, and those that can
    no longer win."""

    best: Group
    pairs: tuple[Pair, ...]
    kind: str
    more: tuple[str, ...]
    out: tuple[str, ...]

    @property
    def done(self) -> bool:
        return self.kind != MORE

    def sentence(self, min_effect: float) -> str:
        """What the round found, in one paragraph."""
        lines = [pair.sentence(min_effect) for pair in self.pairs]
        head = {DECIDED: f"decided: {self.best.label()} beats every other",
                SETTLED: f"settled without a sure winner; {self.best.label()} leads",
                MOST: f"--max-seeds reached; {self.best.label()} leads",
                MORE: f"{self.best.label()} leads, not decided yet"}[self.kind]
        return head + (". " + "; ".join(lines) if lines else "") + "."


def call_round(eligible: Sequence[Group], out: set[str] | frozenset[str], rule: SelectionRule,
               pooled: Pooled, production: Production | None, share: float,
               min_effect: float, max_seeds: int) -> RoundCall:
    """The round's call over the sweep's `eligible` groups (in the rule's order; those in
    `out` no longer in contention) and production, spending `share` of this look's
    allowance."""
    contenders = [g for g in eligible if g.name not in out]
    best, others = contenders[0], contenders[1:]
    metric, higher = rule.metric, rule.higher_is_better
    ours = best.sample(metric)
    # The sweep's own groups, judged as a first look against a production would be (Holm).
    level = Looks(count=1).alpha * share
    found = {g.name: difference(ours, g.sample(metric), pooled, higher) for g in others}
    known = sorted((g.name for g in others if found[g.name].known),
                   key=lambda name: found[name].p_better)
    beaten = dict(zip(known, holm([found[name].p_better for name in known], level),
                      strict=True))
    pairs = []
    for group in others:
        name = group.name
        # Holm's level at this pair's place among the p-values (the first place if unknown).
        needed = level / (len(known) - known.index(name) if name in known else max(len(known), 1))
        state = BEATEN if beaten.get(name) else _unless_beaten(
            ours, group.sample(metric), found[name], pooled, needed, min_effect, max_seeds,
            higher)
        pairs.append(Pair(name, contrast(best.config, group.config), found[name], needed,
                          state))
    base = production.group if production is not None else None
    if base is not None and base.name != best.name:
        # As the final compare will judge it: every group of the sweep a challenger.
        judgement = decide(eligible, rule, pooled, production, share).judgement
        judged, needed = judgement.differences[best.name], judgement.needed()
        state = BEATEN if best.name in judgement.beats else _unless_beaten(
            ours, base.sample(metric), judged, pooled, needed, min_effect, max_seeds, higher,
            production=True)
        pairs.append(Pair(PRODUCTION, f"against production ({base.label()})", judged, needed,
                          state))
    out = tuple(p.other for p in pairs if p.state == BEATEN and p.other != PRODUCTION)
    open_pairs = [p for p in pairs if p.state == OPEN]
    if not open_pairs:
        kind = DECIDED if all(p.state == BEATEN for p in pairs) else SETTLED
        return RoundCall(best, tuple(pairs), kind, (), out)
    sizes = {g.name: g.n for g in contenders}
    more = tuple(name for name in [best.name, *(p.other for p in open_pairs
                                                if p.other != PRODUCTION)]
                 if sizes[name] < max_seeds)
    if best.name not in more:  # the best has every seed it may have: nothing can change
        return RoundCall(best, tuple(pairs), MOST, (), out)
    return RoundCall(best, tuple(pairs), MORE, more, out)


def _unless_beaten(ours: Sample, theirs: Sample, found: Difference, pooled: Pooled,
                   needed: float, min_effect: float, max_seeds: int, higher: bool,
                   production: bool = False) -> str:
    """How a pair stands that the best did not beat this round: production ahead beyond
    noise; no difference as large as `min_effect` left (either way between two of the sweep's
    groups, either could be the better; against production, no gain that large: production
    stays either way); beyond what `max_seeds` seeds can likely decide; or open."""
    if not found.known:
        return OPEN
    # The best's gain over the other, and its interval, whichever way the metric goes.
    low, high = (found.low, found.high) if higher else (-found.high, -found.low)
    if production and high < 0:
        return BEHIND
    if high < min_effect and (production or low > -min_effect):
        return EQUAL
    # For a difference halfway between the one seen and the largest the interval allows
    # (against production, the largest gain): about one standard error above what was seen,
    # and never one too small to matter. Planning for the difference seen gives up on a real
    # gain that drew low (the calibration: power 74% at +0.30 where a fixed 5 seeds have
    # 95%); planning for the interval's end trains on where there is nothing to find (1.1 to
    # 1.4 times the seeds of a fixed design).
    seen = abs(found.delta)
    allowed = high if production else max(high, -low)
    plan = seeds_to_decide(ours, theirs, pooled, max((seen + allowed) / 2, min_effect), needed)
    if plan.seeds is None or plan.seeds > max_seeds:
        return UNDECIDABLE
    return OPEN
