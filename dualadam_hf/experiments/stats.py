"""Statistics of a comparison: paired differences over seeds, exact McNemar tests, detectable differences.

Run k of a variant and run k of the baseline share seed k (data order, training subset, LoRA init), so each
metric is compared through the per-seed differences: their mean with a 95% interval by Student's t with n - 1
degrees of freedom, and an exact sign test. Exact-match accuracy also gets, per seed, an exact McNemar test on
the paired answers (which problems each run got right). The seeds are the unit of replication: resampling 3
seeds (a bootstrap) gives intervals several times too narrow, so there is none here.

The smallest difference the seeds could detect is stated too: the true mean difference that a two-sided paired
t test at 5% finds with 80% power, if the differences had the observed standard deviation (from the noncentral
t distribution, not the normal approximation).

Over a suite of tasks, each task's mean difference and its standard error (paired t over its seeds) are pooled by
a random-effects model (:func:`random_effects`): DerSimonian-Laird's tau^2 and I^2, the pooled mean with a
Hartung-Knapp-Sidik-Jonkman t interval on k - 1 degrees of freedom (the normal interval of DerSimonian-Laird covers
far less than 95% with a handful of tasks), and the exact sign test over tasks.

Several tests read together (a family) are each at 5% only after a correction: :func:`holm` adjusts their p-values
so that the chance of any false finding in the family stays at most 5%; :meth:`PairedDifference.interval` at
1 - 0.05/m gives intervals that cover all m true differences at once (Bonferroni).

Interval bounds print rounded outward (:func:`format_number` with ``toward``): a printed interval contains the
computed one, so "excludes 0" and "at most" read off the printed digits stay true.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from scipy import optimize
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the level of every test, after correction within its family
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
    return noncentrality_for_power(n - 1, power=power, alpha=alpha) * sd / math.sqrt(n)


def noncentrality_for_power(dof: int, *, power: float = POWER, alpha: float = ALPHA) -> float:
    """The noncentrality at which a two-sided t test with ``dof`` degrees of freedom at level ``alpha`` rejects
    with probability ``power``: a true effect of this many standard errors is detected that often."""
    critical = float(scipy_stats.t.ppf(1 - alpha / 2, dof))
    high = 1.0
    while _t_test_power(high, dof, critical) < power:  # power grows with the noncentrality: bracket, then solve
        high *= 2
    return optimize.brentq(lambda nc: _t_test_power(nc, dof, critical) - power, 0.0, high, xtol=1e-10)


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences (variant minus baseline) and what they show.

    ``low``/``high`` is the 95% paired-t interval and ``t_p`` the two-sided p of the paired t test; they and the
    detectable difference are None, with the reason in ``no_interval``, for fewer than 2 seeds or differences
    without spread."""

    differences: tuple[float, ...]
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    sign_p: float | None
    detectable: float | None
    no_interval: str = ""
    method: str = "paired t"
    t_p: float | None = None

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def contains_zero(self) -> bool | None:
        return None if self.low is None else self.low <= 0.0 <= self.high

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
        """The two-sided paired-t interval at ``confidence`` (e.g. 1 - 0.05/m for a Bonferroni family of m);
        None where there is no interval."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
        if self.low is None or self.sd is None:
            return None
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2, self.n - 1)) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def detectable_at(self, alpha: float) -> float | None:
        """The true difference a two-sided paired t test at level ``alpha`` (e.g. 0.05/m, a family's corrected
        level) finds with 80% power, from the observed sd; None where there is no interval."""
        if self.low is None or self.sd is None:
            return None
        return min_detectable_difference(self.sd, self.n, alpha=alpha)

    def words(self, metric: str, better: str, digits: int = 4, *, holm_p: float | None = None,
              family: str = "", family_size: int | None = None) -> str:
        """One sentence on what the differences show; ``better`` is "lower" or "higher".

        With ``holm_p`` (the test's p after Holm's correction within ``family``, e.g. "the 6 primary tests") the
        verdict follows that p, not the uncorrected interval; with ``family_size`` m the detectable difference is
        given at the corrected level 0.05/m too."""
        if self.low is None:
            return f"{metric}: {self.no_interval}: no interval and no verdict."
        improved = (self.mean < 0) == (better == "lower")
        sign = "" if self.sign_p is None else f"; sign test p = {self.sign_p:.3g}"
        detectable = (f"detectable with {self.n} seeds at 80% power: "
                      f"±{format_number(self.detectable, digits, sign=False)}")
        if holm_p is not None and family_size:
            at_level = self.detectable_at(ALPHA / family_size)
            detectable += (f" in one test at 5%, ±{format_number(at_level, digits, sign=False)} at the corrected "
                           f"level 0.05/{family_size}")
        if holm_p is not None:
            corrected = f"{metric}: Holm p = {holm_p:.3g} over {family}"
            if holm_p < ALPHA:
                return f"{corrected}: the variant is {'better' if improved else 'worse'}{sign}."
            uncorrected = "" if self.contains_zero else "; uncorrected, the 95% interval excludes 0"
            return f"{corrected}: no difference shown after the correction ({detectable}{uncorrected})."
        if self.contains_zero:
            return f"{metric}: the interval contains 0: no difference shown ({detectable})."
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
    standard_error = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * standard_error
    t_p = float(2 * scipy_stats.t.sf(abs(mean) / standard_error, n - 1))
    return PairedDifference(tuple(values), mean, sd, mean - half, mean + half, sign_p,
                            min_detectable_difference(sd, n), t_p=t_p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family's p-values, in their order: the k-th smallest p (k from 0) is
    multiplied by m - k, never below the adjusted p before it, and capped at 1. An adjusted p below 5% keeps the
    chance of any false finding in the family at most 5%."""
    values = _finite(p_values, "holm") if len(p_values) else []
    if bad := [p for p in values if not 0 <= p <= 1]:
        raise ValueError(f"holm: p-values must lie between 0 and 1, got {bad}")
    adjusted, running = [0.0] * len(values), 0.0
    for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__)):
        running = max(running, min(1.0, (len(values) - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def dersimonian_laird(means: Sequence[float], variances: Sequence[float]) -> tuple[float, float]:
    """Cochran's Q of ``means`` with inverse-variance weights, and the DerSimonian-Laird moment estimate of the
    between-task variance, tau^2 = max(0, (Q - (k - 1)) / (S1 - S2 / S1)) with S1 = sum w, S2 = sum w^2: the
    excess of Q over what within-task noise alone gives, truncated at 0 (a variance)."""
    weights = [1.0 / v for v in variances]
    total = math.fsum(weights)
    fixed = math.fsum(w * m for w, m in zip(weights, means)) / total
    q = math.fsum(w * (m - fixed) ** 2 for w, m in zip(weights, means))
    scale = total - math.fsum(w * w for w in weights) / total
    return q, max(0.0, (q - (len(means) - 1)) / scale) if scale > 0 else 0.0


def i_squared(q: float, k: int) -> float:
    """Higgins and Thompson's I^2 = max(0, (Q - (k - 1)) / Q): the share of the spread of the task effects
    beyond within-task noise (0 when Q is at most its degrees of freedom, and for Q = 0)."""
    return 0.0 if q <= 0 else max(0.0, (q - (k - 1)) / q)


@dataclass(frozen=True)
class Pooled:
    """Per-task mean differences pooled by a random-effects model (tasks are a sample of the tasks there are).

    ``mean`` weights task i by 1 / (se_i^2 + tau2) (DerSimonian-Laird); ``se`` = sqrt(1 / sum of those weights).
    The interval and ``t_p`` are Hartung-Knapp-Sidik-Jonkman's: t with k - 1 degrees of freedom on the standard
    error ``hk_se`` = sqrt(max(1, q_hk) / sum w), where q_hk = sum w_i (d_i - mean)^2 / (k - 1); the max(1, .)
    keeps the interval from being narrower than the model's own standard error allows when the task effects
    happen to agree more closely than their standard errors say they should."""

    means: tuple[float, ...]
    standard_errors: tuple[float, ...]
    q: float
    tau2: float
    i2: float
    mean: float
    se: float
    hk_se: float
    low: float
    high: float
    t_p: float
    sign_p: float | None

    @property
    def k(self) -> int:
        return len(self.means)

    @property
    def detectable(self) -> float:
        """The true pooled difference the 5% test finds with 80% power (:meth:`detectable_at`)."""
        return self.detectable_at(ALPHA)

    @property
    def weights(self) -> tuple[float, ...]:
        """Each task's share of the pooled mean (random-effects weights, summing to 1)."""
        raw = [1.0 / (se * se + self.tau2) for se in self.standard_errors]
        return tuple(w / math.fsum(raw) for w in raw)

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The Hartung-Knapp-Sidik-Jonkman interval at ``confidence`` (e.g. 1 - 0.05/m, Bonferroni over m)."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2, self.k - 1)) * self.hk_se
        return self.mean - half, self.mean + half

    def detectable_at(self, alpha: float) -> float:
        """The true pooled difference the two-sided t test on ``hk_se`` with k - 1 degrees of freedom at level
        ``alpha`` finds with 80% power: noncentrality * hk_se (noncentral t, as for the seeds)."""
        return noncentrality_for_power(self.k - 1, alpha=alpha) * self.hk_se


def random_effects(means: Sequence[float], standard_errors: Sequence[float]) -> Pooled:
    """Pool per-task mean differences ``means`` with their standard errors (paired t over each task's seeds):
    DerSimonian-Laird tau^2, I^2, the random-effects mean with its Hartung-Knapp-Sidik-Jonkman 95% interval and
    t test (k - 1 degrees of freedom), the exact sign test over tasks and the detectable pooled difference.

    Refused (ValueError) for fewer than 2 tasks, where there is nothing to pool and no degree of freedom for
    the spread between tasks, and for a standard error that is not positive: a task without spread over its
    seeds would take all the weight."""
    means, errors = _finite(means, "random_effects means"), _finite(standard_errors, "random_effects standard errors")
    if len(means) != len(errors):
        raise ValueError(f"random_effects: {len(means)} means but {len(errors)} standard errors")
    if len(means) < 2:
        raise ValueError(f"pooling needs at least 2 tasks, got {len(means)}: with one task its own interval is "
                         "the answer")
    if bad := [se for se in errors if se <= 0]:
        raise ValueError(f"random_effects: standard errors must be positive, got {bad}")
    k = len(means)
    q, tau2 = dersimonian_laird(means, [se * se for se in errors])
    weights = [1.0 / (se * se + tau2) for se in errors]
    total = math.fsum(weights)
    mean = math.fsum(w * m for w, m in zip(weights, means)) / total
    q_hk = math.fsum(w * (m - mean) ** 2 for w, m in zip(weights, means)) / (k - 1)
    hk_se = math.sqrt(max(1.0, q_hk) / total)
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, k - 1)) * hk_se
    t_p = float(2 * scipy_stats.t.sf(abs(mean) / hk_se, k - 1))
    return Pooled(tuple(means), tuple(errors), q, tau2, i_squared(q, k), mean, math.sqrt(1.0 / total), hk_se,
                  mean - half, mean + half, t_p, sign_test_p(means))


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


def _rounded(value: float, places: int, toward: str) -> float:
    # Decided on the shortest decimal that reads back as ``value`` (repr): 0.1 stays 0.1 rounded up, where its
    # exact binary value, a hair above, would go to 0.1001.
    rounding = {"down": ROUND_FLOOR, "up": ROUND_CEILING}[toward]
    return float(Decimal(repr(value)).quantize(Decimal(1).scaleb(-places), rounding=rounding))


def format_number(value: float | None, digits: int, *, sign: bool = True, toward: str | None = None) -> str:
    """``value`` with ``digits`` decimals, or in scientific notation when those would show fewer than two
    significant digits of a non-zero value (a difference of 1e-6 must not print as +0.0000).

    ``toward`` "down" or "up" rounds toward -inf or +inf instead of to the nearest: the lower bound of an interval
    down and the upper bound up print an interval that contains the computed one."""
    if value is None:
        return "-"
    if toward not in (None, "down", "up"):
        raise ValueError(f"toward must be 'down', 'up' or None, got {toward!r}")
    plus = "+" if sign else ""
    if value != 0 and abs(value) < 10 ** (1 - digits):
        if toward is not None:
            value = _rounded(value, 2 - Decimal(repr(value)).adjusted(), toward)
        return f"{value:{plus}.2e}"
    if toward is not None:
        value = _rounded(value, digits, toward)
    return f"{value:{plus}.{digits}f}"
