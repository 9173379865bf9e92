"""Statistics over seeds: a group's summary, the interval of its mean, and whether two groups
really differ (Welch's t interval). scipy does the arithmetic; this module says what it means.

Imports neither torch nor MLflow: pure numbers in, numbers and sentences out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


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

    def mean_interval(self) -> tuple[float, float] | None:
        """The 95% t interval of the mean (what this recipe scores on average); None for n < 2."""
        if self.n < 2:
            return None
        from scipy import stats

        if self.sd == 0:
            return self.mean, self.mean
        low, high = stats.t.interval(CONFIDENCE, self.n - 1, loc=self.mean,
                                     scale=self.sd / math.sqrt(self.n))
        return float(low), float(high)

    def format(self, digits: int = 2) -> str:
        """`99.21 ± 0.05 (n = 5, 99.15-99.27)`, or the one value with `n = 1`."""
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n = 1)"
        return (f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n = {self.n}, "
                f"{self.min:.{digits}f}–{self.max:.{digits}f})")

    def format_interval(self, digits: int = 2) -> str:
        """`99.21 ± 0.06 (95% CI, n = 5)`: the mean and the half-width of its interval."""
        interval = self.mean_interval()
        if interval is None:
            return f"{self.mean:.{digits}f} (one seed: no interval)"
        return (f"{self.mean:.{digits}f} ± {(interval[1] - interval[0]) / 2:.{digits}f} "
                f"(95% CI, n = {self.n})")


@dataclass(frozen=True)
class Difference:
    """Mean of A minus mean of B, with Welch's 95% interval when both have 2+ values."""

    delta: float
    low: float | None
    high: float | None
    n_a: int
    n_b: int

    @property
    def known(self) -> bool:
        return self.low is not None

    @property
    def real(self) -> bool:
        """The interval excludes zero: a difference seed noise does not explain, at 95%."""
        return self.known and (self.low > 0 or self.high < 0)

    def above_zero(self, higher_is_better: bool = True) -> bool:
        """A is better than B at 95%: the whole interval lies on A's side of zero."""
        if not self.known:
            return False
        return self.low > 0 if higher_is_better else self.high < 0

    def verdict(self) -> str:
        if not self.known:
            return "one seed: cannot tell"
        return "real at 95%" if self.real else "within seed noise"

    def sentence(self, label: str, unit: str = "points", digits: int = 2) -> str:
        """`dropout 0.05 vs 0: +0.04 points, 95% CI [-0.09, +0.17], n = 5 vs 5: within seed
        noise`; without an interval when a side has one run."""
        counts = f"n = {self.n_a} vs {self.n_b}"
        if not self.known:
            return f"{label}: {self.delta:+.{digits}f} {unit}, {counts}: {self.verdict()}"
        return (f"{label}: {self.delta:+.{digits}f} {unit}, 95% CI [{self.low:+.{digits}f}, "
                f"{self.high:+.{digits}f}], {counts}: {self.verdict()}")


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """mean(a) - mean(b) and its 95% Welch interval (no interval when a side has < 2 values)."""
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(delta, None, None, len(a), len(b))
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        # No spread on either side (scipy answers nan): the difference is exactly this.
        return Difference(delta, delta, delta, len(a), len(b))
    from scipy import stats

    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(CONFIDENCE)
    return Difference(delta, float(interval.low), float(interval.high), len(a), len(b))
