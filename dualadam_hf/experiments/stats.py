"""Statistics for a comparison: mean and std over seeds, paired differences with 95% intervals.

Run k of a variant and of the baseline share their seed (data order, LoRA init), so differences are paired:
Student's t over the per-seed differences, or for exact-match accuracy a bootstrap over seeds and held-out
problems, which also covers the noise of which problems happen to be in the test set.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t (0.975) for 1..30 degrees of freedom; the normal 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    if dof < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class Interval:
    """A paired difference (variant minus baseline) with its 95% interval; low/high None for one seed."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str

    @property
    def contains_zero(self) -> bool | None:
        return None if self.low is None else self.low <= 0.0 <= self.high

    def words(self, metric: str, better: str) -> str:
        """One sentence saying what the interval shows; ``better`` is "lower" or "higher"."""
        if self.low is None:
            return f"{metric}: one seed only, no interval."
        if self.contains_zero:
            return f"{metric}: the interval contains 0, so no difference is shown at this power."
        improved = (self.mean < 0) == (better == "lower")
        return f"{metric}: the interval excludes 0; the variant is {'better' if improved else 'worse'}."


def paired_t_interval(differences: Sequence[float]) -> Interval:
    """Mean of per-seed differences with a two-sided 95% Student-t interval."""
    n, mean = len(differences), statistics.fmean(differences)
    if n < 2:
        return Interval(mean, None, None, n, "paired t")
    half = t_quantile_975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "paired t")


def paired_bootstrap_interval(variant: Sequence[Sequence[int]], baseline: Sequence[Sequence[int]], *,
                              resamples: int = 2000, seed: int = 0) -> Interval:
    """Difference of exact-match accuracy with a 95% percentile interval from a two-level bootstrap.

    ``variant[k][i]`` and ``baseline[k][i]`` are 1 when the run of seed k answered problem i correctly. Each
    resample draws seeds, then for each seed problems (the same for both), with replacement."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError("need the same, non-zero number of seeds for the variant and the baseline")
    if any(len(a) != len(b) or not a for a, b in zip(variant, baseline)):
        raise ValueError("each seed's runs must be scored on the same, non-empty list of problems")
    diffs = [[x - y for x, y in zip(a, b)] for a, b in zip(variant, baseline)]
    rng = random.Random(seed)
    estimates = []
    for _ in range(resamples):
        seeds = [diffs[rng.randrange(len(diffs))] for _ in diffs]
        estimates.append(statistics.fmean(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for d in seeds))
    estimates.sort()
    return Interval(statistics.fmean(statistics.fmean(d) for d in diffs), estimates[int(0.025 * (resamples - 1))],
                    estimates[int(math.ceil(0.975 * (resamples - 1)))], len(diffs), "bootstrap over seeds and problems")
