"""Statistics of a comparison: paired differences over seeds, exact McNemar tests, detectable differences.

Run k of a variant and run k of the baseline share seed k (data order, training subset, LoRA init), so each
metric is compared through the per-seed differences: their mean with a 95% interval by Student's t with n - 1
degrees of freedom, and an exact sign test. Exact-match accuracy also gets, per seed, an exact McNemar test on
the paired answers (which problems each run got right). The seeds are the unit of replication: resampling 3
seeds (a bootstrap) gives intervals several times too narrow, so there is none here.

The smallest difference the seeds could detect is stated too: the true mean difference that a two-sided paired
t test at 5% finds with 80% power, if the differences had the observed standard deviation (from the noncentral
t distribution, not the normal approximation).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
POWER = 0.80
# Differences whose spread is below this share of their size are equal up to floating-point rounding: a t interval
# of width ~1e-17 around 1e-6 would "exclude 0" from noise alone.
_ROUNDING = 1e-9


def _finite(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what}: need at least one value")
    if bad := [v for v in values if not math.isfinite(v)]:
        raise ValueError(f"{what}: need finite numbers, got {bad} (leave diverged runs out first)")
    return values


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value) of finite numbers."""
    values = _finite(values, "mean_std")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def sign_test_p(differences: Sequence[float]) -> float | None:
    """Two-sided exact sign test: how likely a split of signs at least this uneven is if a positive and a
    negative difference were equally likely. Zero differences carry no sign and are left out; None if all are 0."""
    positive = sum(d > 0 for d in differences)
    signed = positive + sum(d < 0 for d in differences)
    return None if signed == 0 else float(scipy_stats.binomtest(positive, signed, 0.5).pvalue)


def _t_test_power(noncentrality: float, dof: int, critical: float) -> float:
    # P(|T| > critical) for a noncentral t; the lower tail through the mirrored noncentrality, which scipy
    # evaluates without the NaNs its cdf gives far in the tail.
    return float(scipy_stats.nct.sf(critical, dof, noncentrality) + scipy_stats.nct.sf(critical, dof, -noncentrality))


def min_detectable_difference(sd: float, n: int, *, power: float = POWER, alpha: float = 1 - CONFIDENCE) -> float:
    """The true mean difference a two-sided paired t test at level ``alpha`` over ``n`` seeds detects with
    probability ``power`` when the per-seed differences have standard deviation ``sd`` (noncentral t)."""
    if n < 2:
        raise ValueError(f"a paired t test needs at least 2 seeds, got {n}")
    if not (sd > 0 and math.isfinite(sd)):
        raise ValueError(f"sd must be a positive finite number, got {sd}")
    dof, critical = n - 1, float(scipy_stats.t.ppf(1 - alpha / 2, n - 1))
    high = 1.0
    while _t_test_power(high, dof, critical) < power:  # power grows with the noncentrality: bracket, then solve
        high *= 2
    noncentrality = optimize.brentq(lambda nc: _t_test_power(nc, dof, critical) - power, 0.0, high, xtol=1e-10)
    return noncentrality * sd / math.sqrt(n)


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences (variant minus baseline) and what they show.

    ``low``/``high`` is the 95% paired-t interval; it and the detectable difference are None, with the reason in
    ``no_interval``, for fewer than 2 seeds or differences without spread."""

    differences: tuple[float, ...]
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    sign_p: float | None
    detectable: float | None
    no_interval: str = ""
    method: str = "paired t"

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def contains_zero(self) -> bool | None:
        return None if self.low is None else self.low <= 0.0 <= self.high

    def words(self, metric: str, better: str, digits: int = 4) -> str:
        """One sentence on what the differences show; ``better`` is "lower" or "higher"."""
        if self.low is None:
            return f"{metric}: {self.no_interval}: no interval and no verdict."
        if self.contains_zero:
            return (f"{metric}: the interval contains 0: no difference shown (detectable with {self.n} seeds at 80% "
                    f"power: ±{format_number(self.detectable, digits, sign=False)}).")
        improved = (self.mean < 0) == (better == "lower")
        sign = "" if self.sign_p is None else f"; sign test p = {self.sign_p:.3g}"
        return f"{metric}: the interval excludes 0: the variant is {'better' if improved else 'worse'}{sign}."


def paired_difference(differences: Sequence[float]) -> PairedDifference:
    """Mean of the per-seed differences, its two-sided 95% Student-t interval, the sign test and the detectable
    difference. No interval from one seed, or from differences that are all equal (zero variance)."""
    values = _finite(differences, "paired differences")
    n, mean = len(values), statistics.fmean(values)
    sign_p = sign_test_p(values)
    if n < 2:
        return PairedDifference(tuple(values), mean, None, None, None, sign_p, None, "one seed only")
    sd = statistics.stdev(values)
    if sd <= _ROUNDING * max(abs(v) for v in values):
        reason = f"all {n} differences are equal ({mean:+.3g}), so their variance is 0"
        return PairedDifference(tuple(values), mean, sd, None, None, sign_p, None, reason)
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(tuple(values), mean, sd, mean - half, mean + half, sign_p,
                            min_detectable_difference(sd, n))


@dataclass(frozen=True)
class McNemar:
    """An exact McNemar test of two runs scored on the same problems: only the discordant problems count."""

    variant_only: int  # problems the variant answered right and the baseline wrong
    baseline_only: int  # problems the baseline answered right and the variant wrong
    p: float  # two-sided exact p (binomial with probability 1/2 over the discordant problems)


def mcnemar_exact(variant_rows: Sequence[int], baseline_rows: Sequence[int]) -> McNemar:
    """The exact McNemar test of per-problem correctness (1/0 per problem, the same problems in the same order)."""
    if len(variant_rows) != len(baseline_rows) or not variant_rows:
        raise ValueError(f"McNemar needs two runs scored on the same, non-empty list of problems; got "
                         f"{len(variant_rows)} and {len(baseline_rows)} answers")
    if bad := {int(x) for x in (*variant_rows, *baseline_rows)} - {0, 1}:
        raise ValueError(f"McNemar needs 1/0 correctness per problem, got {sorted(bad)}")
    variant_only = sum(1 for a, b in zip(variant_rows, baseline_rows) if int(a) and not int(b))
    baseline_only = sum(1 for a, b in zip(variant_rows, baseline_rows) if int(b) and not int(a))
    discordant = variant_only + baseline_only
    p = 1.0 if discordant == 0 else float(scipy_stats.binomtest(variant_only, discordant, 0.5).pvalue)
    return McNemar(variant_only, baseline_only, p)


def format_number(value: float | None, digits: int, *, sign: bool = True) -> str:
    """``value`` with ``digits`` decimals, or in scientific notation when those would show fewer than two
    significant digits of a non-zero value (a difference of 1e-6 must not print as +0.0000)."""
    if value is None:
        return "-"
    plus = "+" if sign else ""
    if value != 0 and abs(value) < 10 ** (1 - digits):
        return f"{value:{plus}.2e}"
    return f"{value:{plus}.{digits}f}"
