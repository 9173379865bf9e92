"""Statistics of groups of runs: intervals that count seeds and images, whether a challenger
beats production, McNemar's test of two models, and the error allowance (alpha spending) of
repeated looks.

Every run of a comparison is scored on the same images, so its accuracy varies for two
reasons: the seed (initialization, data order, augmentation, dropout) and which images
happened to be drawn into the validation or test set. A group is a crossed design, seeds ×
images, with one 0/1 answer per cell (the per-image records). The variance of a group's mean
accuracy, M = mean over images i of a_i (a_i: image i's accuracy over the group's seeds), is

    Var(M) = S²/n  +  [var_i(a_i) − R/n]₊ / N

S² is the variance of the seeds' accuracies (it holds the seed effect and the seed × image
noise), R the seed × image residual mean square of the two-way table, n seeds, N images. The
second term is the image-sampling part: the spread of per-image accuracy, less the share of
it that seed noise already explains. A difference of two groups on the same images is paired
per image, a_i − b_i, so images that both get right or both get wrong cancel. Intervals use
Student's t with Welch–Satterthwaite degrees of freedom (scipy.stats).

Imports neither torch nor MLflow: numbers and arrays in, numbers and sentences out.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
# The probability of a false promotion allowed over every look at one production version;
# look t spends FAMILY_ALPHA / 2**t, so that all looks together spend at most this.
FAMILY_ALPHA = 0.05
METHOD = ("95% intervals count seeds and images: the variance of a group mean over seeds × "
          "images (the seeds' spread, plus the per-image spread paired across groups, less "
          "the seed noise it repeats), Student's t with Welch–Satterthwaite df; one-seed "
          "groups use the seed variance pooled over the groups with two or more")


def _t_quantile(df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


@dataclass(frozen=True)
class Summary:
    """n, mean, sample sd, min and max of one metric over a group's seeds."""

    n: int
    mean: float
    sd: float  # nan for one value
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarize")
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(len(values), statistics.fmean(values), sd, min(values), max(values))

    def format(self, digits: int = 2) -> str:
        """`99.21 ± 0.05 (n = 5, 99.15-99.27)`, or the one value with `n = 1`."""
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n = 1)"
        return (f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n = {self.n}, "
                f"{self.min:.{digits}f}–{self.max:.{digits}f})")


class Sample:
    """One group's accuracies (percent) on one set of images: a value per seed and, where
    recorded, each seed's right/wrong per image (`correct`: seeds × images, bool).

    With records the seeds' accuracies are computed from them (exact), and `key` names the
    images they score (records pair only with records of the same images); without, `values`
    are used and the image term is binomial over `images` images, or absent (`images` 0: a
    metric that is no accuracy, like a loss)."""

    def __init__(self, values: Sequence[float], correct: np.ndarray | None = None,
                 images: int = 0, key: str = "") -> None:
        if correct is not None:
            correct = np.asarray(correct, dtype=bool)
            if correct.ndim != 2 or len(correct) != len(values) or correct.shape[1] < 2:
                raise ValueError(f"records of shape {correct.shape} for {len(values)} seeds")
            values = (100.0 * correct.mean(axis=1)).tolist()
            images = correct.shape[1]
        if not values:
            raise ValueError("a sample needs at least one value")
        self.values = tuple(float(v) for v in values)
        self.n = len(self.values)
        self.images = images
        self.key = key if correct is not None else ""
        self.mean = statistics.fmean(self.values)
        self.seed_var = statistics.variance(self.values) if self.n > 1 else math.nan
        self.per_image: np.ndarray | None = None
        self.residual = math.nan  # seed × image mean square, percent²
        if correct is not None:
            cells = 100.0 * correct.astype(np.float64)
            self.per_image = cells.mean(axis=0)
            if self.n > 1:
                residuals = (cells - self.per_image - cells.mean(axis=1, keepdims=True)
                             + self.mean)
                self.residual = float((residuals ** 2).sum()
                                      / ((self.n - 1) * (self.images - 1)))

    @property
    def recorded(self) -> bool:
        return self.per_image is not None

    def binomial(self) -> float:
        """The variance of an accuracy on `images` images drawn at random, percent² (0 when
        the metric is not an accuracy over images)."""
        if not self.images:
            return 0.0
        p = min(max(self.mean / 100, 0.0), 1.0)
        return 1e4 * p * (1 - p) / self.images


@dataclass(frozen=True)
class Pooled:
    """The seed variance and the seed × image residual, pooled over the groups with two or
    more seeds (each weighted by its degrees of freedom): what a one-seed group borrows."""

    seed_var: float = math.nan
    seed_df: int = 0
    residual: float = math.nan
    residual_df: int = 0

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Pooled:
        seeds = [(s.seed_var, s.n - 1) for s in samples if s.n > 1]
        residuals = [(s.residual, (s.n - 1) * (s.images - 1)) for s in samples
                     if s.n > 1 and s.recorded]
        seed_df = sum(df for _, df in seeds)
        residual_df = sum(df for _, df in residuals)
        return cls(sum(v * df for v, df in seeds) / seed_df if seed_df else math.nan, seed_df,
                   sum(v * df for v, df in residuals) / residual_df if residual_df else math.nan,
                   residual_df)


Term = tuple[float, float]  # (variance, degrees of freedom)


def _residual(sample: Sample, pooled: Pooled) -> Term | None:
    if sample.n > 1 and sample.recorded:
        return sample.residual, (sample.n - 1) * (sample.images - 1)
    if pooled.residual_df and sample.recorded:
        return pooled.residual, pooled.residual_df
    return None


# A seed term: (variance of the group mean, degrees of freedom, where the variance comes
# from: OWN seeds, the POOLED estimate, or the pooled estimate BORROWED by a one-seed group).
# Terms from one estimate are no independent estimates: in a difference they are added into
# one term before Welch–Satterthwaite. Both sides on the pooled estimate: one estimate, its
# degrees of freedom. A one-seed group borrows an estimate made of the other side's seeds:
# one term with the smaller degrees of freedom, or it would be credited with more certainty
# than the pooled estimate carries (4 seeds' worth read as 5.5 against a five-seed group).
OWN, POOLED, BORROWED = "own", "pooled", "borrowed"
SeedTerm = tuple[float, float, str]


def _seed_term(sample: Sample, pooled: Pooled) -> SeedTerm | None:
    """The seeds' share of the variance of the group mean; None when no group has two seeds.

    The larger of the group's own seed variance and the pooled one (a recipe may spread
    more than the others, never less than they say). Where no seed spread shows at all
    (seeds that tie on their totals), what the seed × image noise implies (R/N) stands in:
    seeds that disagree on images do not make a zero-width interval. Only then: real seeds
    spread less than independent per-image noise would (a model's error count is steadier
    than its choice of errors), so R/N overstates their variance."""
    candidates: list[SeedTerm] = []
    if sample.n > 1:
        candidates.append((sample.seed_var, sample.n - 1, OWN))
    if pooled.seed_df:
        candidates.append((pooled.seed_var, pooled.seed_df,
                           POOLED if sample.n > 1 else BORROWED))
    if not candidates:
        return None
    # On a tie the pooled estimate: the group's own is then all it is made of.
    variance, df, source = max(candidates, key=lambda c: (c[0], c[2] != OWN))
    residual = _residual(sample, pooled)
    if variance == 0 and residual is not None:
        variance, df = residual[0] / sample.images, residual[1]
        source = OWN if sample.n > 1 and sample.recorded else BORROWED
    return variance / sample.n, df, source


def _independent(terms: Sequence[SeedTerm]) -> list[Term]:
    """Seed terms as Welch–Satterthwaite terms, those from one estimate added into one
    (see SeedTerm)."""
    sources = {source for _, _, source in terms}
    if len(terms) > 1 and (BORROWED in sources or sources == {POOLED}):
        return [(sum(v for v, _, _ in terms), min(df for _, df, _ in terms))]
    return [(variance, df) for variance, df, _ in terms]


def _image_term(spread: float, samples: Sequence[Sample], pooled: Pooled, images: int) -> Term:
    """The image-sampling share: per-image spread less the seed noise it repeats."""
    repeated = 0.0
    for sample in samples:
        residual = _residual(sample, pooled)
        repeated += 0.0 if residual is None else residual[0] / sample.n
    return max(spread - repeated, 0.0) / images, images - 1


def _satterthwaite(terms: Sequence[Term]) -> tuple[float, float]:
    """(total variance, Welch–Satterthwaite degrees of freedom)."""
    total = sum(v for v, _ in terms)
    denominator = sum(v * v / df for v, df in terms if v > 0 and df > 0)
    return total, (total * total / denominator if denominator else math.inf)


@dataclass(frozen=True)
class Interval:
    """A group's mean with its 95% interval over seeds and images (None: cannot tell)."""

    n: int
    mean: float
    low: float | None
    high: float | None

    def format(self, digits: int = 2) -> str:
        """`99.21 (95% CI 99.05–99.37, n = 5)`, or the mean and why there is no interval."""
        if self.low is None:
            return f"{self.mean:.{digits}f} (one seed, no other group with two: no interval)"
        return (f"{self.mean:.{digits}f} (95% CI {self.low:.{digits}f}–{self.high:.{digits}f}, "
                f"n = {self.n})")


def interval(sample: Sample, pooled: Pooled) -> Interval:
    """The 95% interval of a group's mean accuracy: what its recipe scores on new seeds and
    new images of the same kind."""
    seeds = _seed_term(sample, pooled)
    if seeds is None:
        return Interval(sample.n, sample.mean, None, None)
    if sample.recorded:
        images = _image_term(float(np.var(sample.per_image, ddof=1)), [sample], pooled,
                             sample.images)
    else:
        images = (sample.binomial(), math.inf)
    variance, df = _satterthwaite([*_independent([seeds]), images])
    half = _t_quantile(df) * math.sqrt(variance)
    low, high = sample.mean - half, sample.mean + half
    if sample.images:  # an accuracy: the interval ends where accuracy does
        low, high = max(low, 0.0), min(high, 100.0)
    return Interval(sample.n, sample.mean, low, high)


@dataclass(frozen=True)
class Difference:
    """Mean of A minus mean of B with its 95% interval over seeds and images, and the
    one-sided p-value that A is better (lower for losses, higher for accuracies)."""

    delta: float
    low: float | None
    high: float | None
    n_a: int
    n_b: int
    p_better: float = math.nan
    paired: bool = True

    @property
    def known(self) -> bool:
        return self.low is not None

    @property
    def real(self) -> bool:
        """The interval excludes zero: a difference seeds and images do not explain, at 95%."""
        return self.known and (self.low > 0 or self.high < 0)

    def above_zero(self, higher_is_better: bool = True) -> bool:
        """A is better than B at 95%: the whole interval lies on A's side of zero."""
        if not self.known:
            return False
        return self.low > 0 if higher_is_better else self.high < 0

    def surest_gain(self, higher_is_better: bool = True) -> float:
        """The gain of A over B at the worse end of its interval."""
        return self.low if higher_is_better else -self.high

    def verdict(self) -> str:
        if not self.known:
            return "one seed: cannot tell"
        return "real at 95%" if self.real else "within noise"

    def interval_text(self, unit: str = "points", digits: int = 2) -> str:
        """`+0.04 points, 95% CI [-0.09, +0.17], n = 5 vs 5`."""
        counts = f"n = {self.n_a} vs {self.n_b}"
        if not self.known:
            return f"{self.delta:+.{digits}f} {unit}, {counts}"
        return (f"{self.delta:+.{digits}f} {unit}, 95% CI [{self.low:+.{digits}f}, "
                f"{self.high:+.{digits}f}], {counts}")

    def sentence(self, label: str, unit: str = "points", digits: int = 2) -> str:
        """`dropout 0.05 vs 0: +0.04 points, 95% CI [-0.09, +0.17], n = 5 vs 5: within
        noise`; without an interval when no seed variance is known."""
        unpaired = "" if self.paired else " (images unpaired: no per-image records)"
        return f"{label}: {self.interval_text(unit, digits)}: {self.verdict()}{unpaired}"


def difference(a: Sample, b: Sample, pooled: Pooled,
               higher_is_better: bool = True) -> Difference:
    """mean(A) − mean(B) with its 95% interval; paired per image where both have aligned
    records, else with binomial image terms for each side (wider: nothing cancels)."""
    delta = a.mean - b.mean
    seeds_a, seeds_b = _seed_term(a, pooled), _seed_term(b, pooled)
    if seeds_a is None or seeds_b is None:
        return Difference(delta, None, None, a.n, b.n)
    paired = a.recorded and b.recorded and a.key == b.key
    if paired:
        spread = float(np.var(a.per_image - b.per_image, ddof=1))
        images = [_image_term(spread, [a, b], pooled, a.images)]
    else:
        images = [(a.binomial(), math.inf), (b.binomial(), math.inf)]
    variance, df = _satterthwaite([*_independent([seeds_a, seeds_b]), *images])
    if variance == 0:  # every seed of both answered every image alike
        return Difference(delta, delta, delta, a.n, b.n, 1.0 if delta == 0 else 0.0, paired)
    from scipy import stats

    se = math.sqrt(variance)
    half = _t_quantile(df) * se
    toward = delta if higher_is_better else -delta
    p_better = float(stats.t.sf(toward / se, df))
    return Difference(delta, delta - half, delta + half, a.n, b.n, p_better, paired)


def holm(p_values: Sequence[float], alpha: float, family: int | None = None) -> list[bool]:
    """Holm's step-down test: which hypotheses are rejected at family-wise level `alpha`.

    `family` counts hypotheses not passed here too (all the groups this production version
    has been judged against); they can only make the test stricter."""
    size = max(family or 0, len(p_values))
    rejected = [False] * len(p_values)
    order = sorted(range(len(p_values)), key=lambda i: (not p_values[i] <= 1, p_values[i]))
    for rank, index in enumerate(order):  # smallest first; a NaN (no test) last
        if not p_values[index] <= alpha / (size - rank):
            break
        rejected[index] = True
    return rejected


@dataclass(frozen=True)
class McNemar:
    """Two models on the same images: how many only the new one gets right, how many only
    the old one, and the exact two-sided p-value that they are equally good."""

    new_only: int
    old_only: int
    p: float

    @property
    def new_is_worse(self) -> bool:
        return self.old_only > self.new_only and self.p < 1 - CONFIDENCE

    def sentence(self) -> str:
        return (f"McNemar: {self.new_only} images only the new model gets right, "
                f"{self.old_only} only production's, exact p = {self.p:.3g}")


def mcnemar(new_correct: np.ndarray, old_correct: np.ndarray) -> McNemar:
    """Exact McNemar test: a binomial test on the images where exactly one model is right."""
    from scipy import stats

    new_only = int(np.sum(new_correct & ~old_correct))
    old_only = int(np.sum(old_correct & ~new_correct))
    discordant = new_only + old_only
    p = float(stats.binomtest(new_only, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemar(new_only, old_only, p)


def fingerprint(*parts: object) -> str:
    """8 hex digits naming one piece of evidence (a group, its seeds, what it was judged
    against): equal evidence, equal fingerprint."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Looks:
    """Every judgement of challengers against one production version spends part of
    FAMILY_ALPHA: `count` looks so far, over the groups in `seen` (fingerprints).

    A look that brings evidence not seen before is a new look, at level FAMILY_ALPHA/2**t
    over every group seen so far (Holm); the same evidence again is judged as before.
    So a false promotion happens with probability at most FAMILY_ALPHA, however many
    groups arrive and however often `compare` runs."""

    count: int = 0
    seen: frozenset[str] = frozenset()

    def after(self, evidence: Sequence[str]) -> Looks:
        """The looks once `evidence` (fingerprints of the groups judged now) is judged."""
        if self.count and set(evidence) <= self.seen:
            return self
        return Looks(self.count + 1, self.seen | set(evidence))

    @property
    def alpha(self) -> float:
        """What this look may spend: FAMILY_ALPHA / 2**count."""
        return FAMILY_ALPHA * 0.5 ** max(self.count, 1)


@dataclass(frozen=True)
class Judgement:
    """Challengers against production: each one's difference, and those that beat it with
    the family-wise error of this look controlled (Holm)."""

    differences: Mapping[str, Difference]
    beats: tuple[str, ...]
    looks: Looks
    share: float = 1.0  # of this look's allowance: a round of a sequential sweep spends part

    def needed(self, rank: int = 0) -> float:
        """The one-sided p-value the best challenger needed at this look."""
        return self.looks.alpha * self.share / (max(len(self.looks.seen), 1) - rank)


def judge(production: Sample, challengers: Mapping[str, Sample], pooled: Pooled,
          looks: Looks, higher_is_better: bool = True, share: float = 1.0) -> Judgement:
    """Which challengers beat production at this look (`share` of its allowance); `looks`
    is after this look."""
    differences = {name: difference(sample, production, pooled, higher_is_better)
                   for name, sample in challengers.items()}
    names = [name for name, d in differences.items() if d.known]
    rejected = holm([differences[name].p_better for name in names], looks.alpha * share,
                    len(looks.seen))
    return Judgement(differences, tuple(n for n, r in zip(names, rejected, strict=True) if r),
                     looks, share)


def round_seeds(first: int, per_round: int, most: int) -> list[int]:
    """Seeds per group after each round of a sequential sweep: `first`, then `per_round` more
    a round, the last round cut to `most`. [3, 5, 7, 9, 10] for 3, 2, 10."""
    seeds = [min(first, most)]
    while seeds[-1] < most:
        seeds.append(min(seeds[-1] + per_round, most))
    return seeds


def round_shares(seeds: Sequence[int]) -> list[float]:
    """The share of a look's error allowance each round may spend, for rounds ending at
    `seeds` seeds per group (round_seeds); they add up to 1.

    Lan and DeMets' Pocock-type spending, alpha·ln(1 + (e − 1)·t) by the information t =
    seeds / most: an early round spends a large share (a clear gain is called after the
    first round, as a fixed design of that many seeds would call it), and the later rounds
    still have enough to find a smaller one. Each round tests at its own share, so however
    the rounds go (and whichever round the sweep stops at), every round together spends at
    most the look's allowance: the union bound, which needs nothing of how the rounds'
    numbers correlate."""
    spent = [math.log1p((math.e - 1) * n / seeds[-1]) for n in seeds]
    return [now - before for before, now in zip([0.0, *spent], spent, strict=False)]


# How sure a planned experiment should be of finding a difference that is there.
POWER = 0.80


@dataclass(frozen=True)
class SeedsNeeded:
    """Seeds per group that would likely decide A against B: for a difference `effect`,
    with POWER at one-sided level `alpha`. `seeds` None: more seeds cannot decide it (the
    images' own noise, which seeds do not shrink, is too large), or cannot say (`why`)."""

    effect: float
    seeds: int | None
    floor: float  # the standard error no number of seeds goes below (points)
    why: str = ""


def seeds_to_decide(a: Sample, b: Sample, pooled: Pooled, effect: float, alpha: float
                    ) -> SeedsNeeded:
    """Seeds per group (both alike) at which a difference of `effect` points would be found
    beyond noise with POWER, at one-sided level `alpha`.

    The variance of the difference with n seeds each is (S²_A + S²_B)/n + I: the seeds'
    share shrinks with n, the image share I does not (every seed answers the same fixed
    images). So a difference smaller than (z_alpha + z_power)·√I is beyond any number of
    seeds: only more images would show it. Normal quantiles: a plan, not a test."""
    from scipy import stats

    seeds_a, seeds_b = _seed_term(a, pooled), _seed_term(b, pooled)
    if seeds_a is None or seeds_b is None:
        return SeedsNeeded(effect, None, math.nan, "no group has two seeds, so the seed "
                                                   "spread is unknown: train a second seed")
    seed_var = seeds_a[0] * a.n + seeds_b[0] * b.n  # per seed, both groups
    if a.recorded and b.recorded and a.key == b.key:
        image = _image_term(float(np.var(a.per_image - b.per_image, ddof=1)), [a, b], pooled,
                            a.images)[0]
    else:
        image = a.binomial() + b.binomial()
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(POWER)
    room = (abs(effect) / z) ** 2 - image
    floor = math.sqrt(image)
    if effect == 0 or room <= 0:
        return SeedsNeeded(effect, None, floor)
    return SeedsNeeded(effect, max(2, math.ceil(seed_var / room)), floor)
