"""The comparison's statistics, checked against published values and hand computations, not against themselves."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dualadam_hf.experiments.stats import (
    dersimonian_laird,
    format_number,
    holm,
    i_squared,
    mcnemar_exact,
    mean_std,
    min_detectable_difference,
    paired_difference,
    random_effects,
    sign_test_p,
)

# Student's sleep data (Cushny and Peebles, as analysed by "Student" in 1908): extra hours of sleep with drug 2
# minus drug 1 for 10 patients. R's `t.test(extra ~ group, data = sleep, paired = TRUE)` prints the 95% interval
# -2.4598858 -0.7001142 for drug 1 minus drug 2.
SLEEP_DIFFERENCES = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_paired_t_interval_on_the_sleep_data_matches_the_published_interval():
    diff = paired_difference(SLEEP_DIFFERENCES)
    assert diff.mean == pytest.approx(1.58)
    assert (diff.low, diff.high) == pytest.approx((0.7001142, 2.4598858), abs=1e-7)
    assert diff.n == 10 and diff.contains_zero is False and diff.method == "paired t"
    assert "excludes 0: the variant is worse" in diff.words("loss", "lower")
    assert "the variant is better" in diff.words("accuracy", "higher")


def test_three_seeds_use_t_with_two_degrees_of_freedom():
    # The CPU study's accuracy, matched warmup minus AdamW per seed: 116-122, 116-112, 114-121 of 250 problems.
    diffs = [(116 - 122) / 250, (116 - 112) / 250, (114 - 121) / 250]
    diff = paired_difference(diffs)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2) from a printed table, 3 decimals
    assert diff.mean == pytest.approx(-0.012)
    assert (diff.low, diff.high) == pytest.approx((mean - half, mean + half), abs=2e-5)
    assert (diff.low, diff.high) == pytest.approx((-0.072, 0.048), abs=5e-4)
    assert diff.contains_zero and "contains 0" in diff.words("held-out accuracy", "higher")


def test_no_normal_fallback_past_thirty_degrees_of_freedom():
    rng = np.random.default_rng(0)
    diffs = list(rng.normal(0.1, 1.0, size=32))  # 31 degrees of freedom: t(0.975, 31) = 2.040 in printed tables
    diff = paired_difference(diffs)
    half = (diff.high - diff.low) / 2
    assert half / (np.std(diffs, ddof=1) / math.sqrt(32)) == pytest.approx(2.040, abs=5e-4)


@pytest.mark.parametrize("diffs, reason", [
    ([0.25], "one seed only"),
    ([1e-6, 1e-6, 1e-6], "variance is 0"),
    # Equal up to rounding: what a constant shift of 1e-6 looks like after subtracting floats.
    ([(0.5 + 1e-6) - 0.5, (0.3 + 1e-6) - 0.3, (0.7 + 1e-6) - 0.7], "variance is 0"),
])
def test_no_interval_and_no_verdict_from_one_seed_or_zero_variance(diffs, reason):
    diff = paired_difference(diffs)
    assert diff.low is None and diff.high is None and diff.detectable is None and diff.contains_zero is None
    words = diff.words("held-out accuracy", "higher")
    assert reason in words and "no verdict" in words
    assert "excludes" not in words and "better" not in words and "worse" not in words


def test_sign_test_is_the_binomial_tail_by_hand():
    # Sleep data: 9 positive differences and one zero; the zero carries no sign, so 9 of 9: p = 2 * 0.5**9.
    assert sign_test_p(SLEEP_DIFFERENCES) == pytest.approx(2 * 0.5**9)
    assert sign_test_p([-1.0, -2.0, -0.5]) == pytest.approx(0.25)  # 3 of 3 seeds: the smallest p 3 seeds allow
    # 8 of 10 positive: 2 * P(X <= 2), X ~ Binomial(10, 1/2).
    assert sign_test_p([1.0] * 8 + [-1.0] * 2) == pytest.approx(2 * (1 + 10 + 45) / 2**10)
    assert sign_test_p([0.0, 0.0]) is None


def _rows(both: int, variant_only: int, baseline_only: int, neither: int) -> tuple[list[int], list[int]]:
    variant = [1] * both + [1] * variant_only + [0] * baseline_only + [0] * neither
    baseline = [1] * both + [0] * variant_only + [1] * baseline_only + [0] * neither
    return variant, baseline


def test_exact_mcnemar_is_the_binomial_over_discordant_problems():
    test = mcnemar_exact(*_rows(both=100, variant_only=8, baseline_only=2, neither=140))
    assert (test.variant_only, test.baseline_only) == (8, 2)
    # Two-sided exact p: 2 * P(X <= 2), X ~ Binomial(10, 1/2), by hand.
    assert test.p == pytest.approx(2 * sum(math.comb(10, k) for k in range(3)) / 2**10)
    # 1 against 6 discordant: 2 * P(X <= 1), X ~ Binomial(7, 1/2).
    assert mcnemar_exact(*_rows(5, 1, 6, 3)).p == pytest.approx(2 * (1 + 7) / 2**7)
    assert mcnemar_exact(*_rows(5, 4, 4, 3)).p == 1.0  # balanced
    assert mcnemar_exact(*_rows(5, 0, 0, 3)).p == 1.0  # no discordant problem: nothing to test


@pytest.mark.parametrize("variant, baseline, match", [
    ([1, 0], [1], "same, non-empty list of problems"),
    ([], [], "same, non-empty list of problems"),
    ([1, 2], [1, 0], "1/0 correctness"),
])
def test_mcnemar_refuses_mismatched_answers(variant, baseline, match):
    with pytest.raises(ValueError, match=match):
        mcnemar_exact(variant, baseline)


def test_detectable_difference_has_80_percent_power_in_a_simulation():
    n, sd = 5, 2.0
    delta = min_detectable_difference(sd, n)
    rng = np.random.default_rng(1)
    samples = rng.normal(delta, sd, size=(20000, n))
    p = scipy_stats.ttest_1samp(samples, 0.0, axis=1).pvalue
    power = float(np.mean(p < 0.05))
    assert power == pytest.approx(0.80, abs=0.012)  # 4 standard errors of a 20000-draw proportion


def test_the_detectable_difference_at_a_corrected_level_has_80_percent_power_there():
    # The low-bit study's 8-bit DualAdam minus fp32 DualAdam in accuracy, 5 seeds, one of 6 corrected tests.
    diff = paired_difference([-0.004, -0.004, 0.0, 0.004, -0.012])
    assert diff.detectable_at(0.05) == pytest.approx(diff.detectable)
    corrected = diff.detectable_at(0.05 / 6)
    assert corrected == pytest.approx(0.01637, abs=1e-5) and corrected > diff.detectable
    rng = np.random.default_rng(2)
    p = scipy_stats.ttest_1samp(rng.normal(corrected, diff.sd, size=(20000, 5)), 0.0, axis=1).pvalue
    assert float(np.mean(p < 0.05 / 6)) == pytest.approx(0.80, abs=0.012)
    words = diff.words("held-out accuracy", "higher", holm_p=0.883, family="the 6 low-bit tests", family_size=6)
    assert "±0.0100 in one test at 5%, ±0.0164 at the corrected level 0.05/6" in words
    assert paired_difference([0.25]).detectable_at(0.01) is None


def test_detectable_difference_known_values():
    # Many seeds: the normal approximation (z(0.975) + z(0.80)) * sd / sqrt(n) = 2.8016 * sd / sqrt(n).
    assert min_detectable_difference(1.0, 5000) * math.sqrt(5000) == pytest.approx(1.95996 + 0.84162, abs=2e-3)
    # With the sd of paired accuracy differences seen on SmolLM2 LoRA (2.4 points): more than the normal
    # approximation with the t quantile (7.1 points at 3 seeds), and close to it at 10 and 20 seeds.
    assert min_detectable_difference(2.4, 3) == pytest.approx(7.83, abs=0.01)
    assert min_detectable_difference(2.4, 10) == pytest.approx(2.39, abs=0.01)
    assert min_detectable_difference(2.4, 20) == pytest.approx(1.59, abs=0.01)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        min_detectable_difference(1.0, 1)
    with pytest.raises(ValueError, match="positive finite"):
        min_detectable_difference(0.0, 3)


def test_non_finite_numbers_are_refused_with_a_clear_error():
    for function in (mean_std, paired_difference):
        with pytest.raises(ValueError, match="finite numbers"):
            function([1.0, math.inf])
        with pytest.raises(ValueError, match="finite numbers"):
            function([math.nan, 1.0, 2.0])
    assert mean_std([2.0]) == (2.0, None)


def test_small_numbers_do_not_print_as_zero():
    assert format_number(1e-6, 4) == "+1.00e-06"
    assert format_number(-1.25e-5, 5) == "-1.25e-05"  # not -0.00001: two significant digits at least
    assert format_number(1.5e-4, 4, sign=False) == "1.50e-04"
    assert format_number(-0.0123, 3) == "-0.012"
    assert format_number(0.0, 3) == "+0.000"
    assert format_number(None, 3) == "-"


def test_holm_adjusts_a_family_of_p_values_step_down():
    # By hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 gives 0.02, 0.03, 0.06, 0.04; the last may not fall
    # below the one before it (0.06). Returned in the order given.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 2 * 0.5 = 1, capped; 0.6 may not fall below it
    assert holm([0.02]) == [0.02] and holm([]) == []
    # The study's six primary tests: the third smallest (0.0191) times 4.
    adjusted = holm([0.291, 0.0191, 0.000243, 0.00121, 0.485, 0.271])
    assert adjusted[1] == pytest.approx(4 * 0.0191) and adjusted[2] == pytest.approx(6 * 0.000243)
    assert adjusted[4] == adjusted[5] == adjusted[0] == pytest.approx(3 * 0.271)
    with pytest.raises(ValueError, match="between 0 and 1"):
        holm([0.2, 1.5])
    with pytest.raises(ValueError, match="finite numbers"):
        holm([math.nan])


def test_paired_t_p_and_a_wider_interval_on_the_sleep_data():
    diff = paired_difference(SLEEP_DIFFERENCES)
    # R's paired t.test on the sleep data: t = -4.0621, df = 9, p-value = 0.002833.
    assert diff.t_p == pytest.approx(0.002833, abs=5e-7)
    low, high = diff.interval(1 - 0.05 / 6)  # Bonferroni over 6 tests: t(1 - 0.05/12, 9) = 3.3642
    half = 3.3642 * statistics.stdev(SLEEP_DIFFERENCES) / math.sqrt(10)
    assert (low, high) == pytest.approx((1.58 - half, 1.58 + half), abs=2e-4)
    assert diff.interval() == pytest.approx((diff.low, diff.high))
    assert paired_difference([0.25]).t_p is None and paired_difference([0.25]).interval() is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        diff.interval(1.5)


def test_the_verdict_follows_the_corrected_p_when_there_is_one():
    # The study's 12-step blend against AdamW in accuracy: its 95% interval excludes 0, its Holm p does not pass.
    diff = paired_difference([0.012, -0.052, -0.008, -0.060, -0.064, -0.012, -0.016, 0.012, -0.056, -0.020])
    assert not diff.contains_zero and diff.t_p == pytest.approx(0.0191, abs=1e-4)
    words = diff.words("held-out accuracy", "higher", holm_p=0.0763, family="the 6 primary tests")
    assert "Holm p = 0.0763 over the 6 primary tests: no difference shown after the correction" in words
    assert "uncorrected, the 95% interval excludes 0" in words and "worse" not in words
    assert "the variant is worse" in diff.words("held-out accuracy", "higher", holm_p=0.01, family="6 tests")
    assert "the interval excludes 0: the variant is worse" in diff.words("held-out accuracy", "higher")


def test_interval_bounds_round_outward():
    # The study's upper bound -0.005450910 prints -0.0055 to the nearest, -0.0054 rounded up.
    assert format_number(-0.005450910, 4) == "-0.0055"
    assert format_number(-0.005450910, 4, toward="up") == "-0.0054"
    assert format_number(-0.047349090, 4, toward="down") == "-0.0474"
    assert format_number(7.0312e-05, 3, sign=False, toward="up") == "7.04e-05"  # "at most 7.04e-05"
    assert format_number(-2.5379e-04, 4, toward="up") == "-2.53e-04"
    assert format_number(9.996e-05, 3, sign=False, toward="up") == "1.00e-04"
    # A value already on the grid stays put (decided on 0.1, not on its binary value a hair above).
    assert format_number(0.1, 4, toward="up") == "+0.1000" and format_number(0.1, 4, toward="down") == "+0.1000"
    with pytest.raises(ValueError, match="toward"):
        format_number(0.1, 4, toward="out")


# --- pooling over tasks ----------------------------------------------------------------------------

# The BCG vaccine trials (Colditz et al. 1994), the example of metafor's documentation: per trial, vaccinated
# (tuberculosis, none) and unvaccinated (tuberculosis, none). Log relative risks and their variances as
# `escalc("RR")` computes them; `rma(yi, vi, method = "DL")` prints Q(df = 12) = 152.2330, tau^2 = 0.3088,
# I^2 = 92.12%, estimate -0.7141 with se 0.1787 and 95% interval [-1.0644, -0.3638] (normal); with
# `test = "knha"`, se 0.1807, p 0.0019 and the interval [-1.1078, -0.3204] (t with 12 degrees of freedom).
BCG = [(4, 119, 11, 128), (6, 300, 29, 274), (3, 228, 11, 209), (62, 13536, 248, 12619), (33, 5036, 47, 5761),
       (180, 1361, 372, 1079), (8, 2537, 10, 619), (505, 87886, 499, 87892), (29, 7470, 45, 7232),
       (17, 1699, 65, 1600), (186, 50448, 141, 27197), (5, 2493, 3, 2338), (27, 16886, 29, 17825)]


def _bcg() -> tuple[list[float], list[float]]:
    means = [math.log((a / (a + b)) / (c / (c + d))) for a, b, c, d in BCG]
    variances = [1 / a - 1 / (a + b) + 1 / c - 1 / (c + d) for a, b, c, d in BCG]
    return means, [math.sqrt(v) for v in variances]


def test_random_effects_on_the_bcg_trials_matches_the_published_analysis():
    pooled = random_effects(*_bcg())
    assert pooled.k == 13 and pooled.q == pytest.approx(152.2330, abs=5e-5)
    assert pooled.tau2 == pytest.approx(0.3088, abs=5e-5) and pooled.i2 == pytest.approx(0.9212, abs=5e-5)
    assert pooled.mean == pytest.approx(-0.7141, abs=5e-5) and pooled.se == pytest.approx(0.1787, abs=5e-5)
    z = scipy_stats.norm.ppf(0.975)
    assert (pooled.mean - z * pooled.se, pooled.mean + z * pooled.se) == pytest.approx((-1.0644, -0.3638), abs=5e-5)
    assert pooled.hk_se == pytest.approx(0.1807, abs=5e-5) and pooled.t_p == pytest.approx(0.0019, abs=5e-5)
    assert (pooled.low, pooled.high) == pytest.approx((-1.1078, -0.3204), abs=5e-5)
    assert pooled.contains_zero is False and sum(pooled.weights) == pytest.approx(1.0)
    assert pooled.sign_p == pytest.approx(sign_test_p(_bcg()[0]))


def test_random_effects_by_hand_on_three_tasks():
    # d = 1, 2, 4 with se 1 each. Equal weights 1: fixed mean 7/3, Q = (16 + 1 + 25) / 9 = 42/9 on 2 degrees of
    # freedom, S1 - S2/S1 = 3 - 1 = 2, so tau^2 = (42/9 - 2) / 2 = 4/3 and I^2 = (42/9 - 2) / (42/9) = 4/7.
    # Random-effects weights 1 / (1 + 4/3) = 3/7 each: mean 7/3, se = sqrt(7/9). The HKSJ factor
    # q_hk = (3/7)(42/9) / 2 = 1 exactly, so hk_se = se and the interval is 7/3 -+ t(0.975, 2) sqrt(7/9),
    # t(0.975, 2) = 4.3027 (printed tables).
    pooled = random_effects([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    assert pooled.q == pytest.approx(42 / 9) and pooled.tau2 == pytest.approx(4 / 3)
    assert pooled.i2 == pytest.approx(4 / 7) and pooled.mean == pytest.approx(7 / 3)
    assert pooled.se == pytest.approx(math.sqrt(7 / 9)) and pooled.hk_se == pytest.approx(math.sqrt(7 / 9))
    half = 4.3027 * math.sqrt(7 / 9)
    assert (pooled.low, pooled.high) == pytest.approx((7 / 3 - half, 7 / 3 + half), abs=1e-4)
    assert pooled.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert pooled.sign_p == pytest.approx(0.25)  # 3 of 3 positive: the smallest p 3 tasks allow


def test_tau2_is_truncated_at_zero_and_the_interval_keeps_the_model_standard_error():
    # d = 0.9, 1.0, 1.1 with se 1: Q = 0.02 is far below its 2 degrees of freedom, so tau^2 = 0 and I^2 = 0.
    # The weights stay 1: mean 1, se = sqrt(1/3). q_hk = 0.02 / 2 would shrink the interval tenfold; max(1, q_hk)
    # keeps it at t(0.975, 2) * sqrt(1/3).
    assert dersimonian_laird([0.9, 1.0, 1.1], [1.0, 1.0, 1.0]) == pytest.approx((0.02, 0.0))
    pooled = random_effects([0.9, 1.0, 1.1], [1.0, 1.0, 1.0])
    assert pooled.tau2 == 0.0 and pooled.i2 == 0.0 and pooled.mean == pytest.approx(1.0)
    assert pooled.hk_se == pytest.approx(math.sqrt(1 / 3)) == pooled.se
    assert pooled.high - pooled.low == pytest.approx(2 * 4.3027 * math.sqrt(1 / 3), abs=1e-4)


def test_identical_effects_have_no_heterogeneity_and_a_finite_interval():
    pooled = random_effects([0.02] * 4, [0.01, 0.02, 0.01, 0.02])
    assert pooled.q == pytest.approx(0.0, abs=1e-20) and pooled.tau2 == 0.0 and pooled.i2 == 0.0
    assert pooled.mean == pytest.approx(0.02)
    # Inverse-variance weights 1e4, 2500, 1e4, 2500: se = 1 / sqrt(25000); t(0.975, 3) = 3.1824.
    assert pooled.hk_se == pytest.approx(1 / math.sqrt(25000))
    assert pooled.high - pooled.low == pytest.approx(2 * 3.1824 / math.sqrt(25000), abs=1e-5)
    assert pooled.weights == pytest.approx((0.4, 0.1, 0.4, 0.1))
    assert i_squared(0.0, 4) == 0.0 and i_squared(6.0, 4) == pytest.approx(0.5)


def test_two_tasks_give_an_answer_on_one_degree_of_freedom_and_one_task_is_refused():
    pooled = random_effects([1.0, 3.0], [0.5, 0.5])
    # Q = 2 * (1 / 0.25) = 8 on 1 df; S1 - S2/S1 = 8 - 32/8 = 4: tau^2 = (8 - 1) / 4 = 1.75. Weights 1/2 each:
    # mean 2, q_hk = 0.5 * 2 / 1 = 1, hk_se = sqrt(1 / 1) = 1; t(0.975, 1) = 12.706.
    assert pooled.tau2 == pytest.approx(1.75) and pooled.mean == pytest.approx(2.0)
    assert (pooled.low, pooled.high) == pytest.approx((2 - 12.706, 2 + 12.706), abs=1e-3)
    assert pooled.sign_p == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 tasks, got 1"):
        random_effects([1.0], [0.5])
    with pytest.raises(ValueError, match="standard errors must be positive"):
        random_effects([1.0, 2.0], [0.5, 0.0])
    with pytest.raises(ValueError, match="2 means but 3 standard errors"):
        random_effects([1.0, 2.0], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="finite numbers"):
        random_effects([1.0, math.nan], [0.5, 0.5])


def test_pooled_detectable_difference_has_80_percent_power_in_a_simulation():
    # Four tasks, within-task standard errors 0.5, 1, 1, 2 and between-task sd 0.7: simulate the whole analysis
    # (task effects, estimated tau^2, the HKSJ test) at the detectable difference the design gives.
    errors = [0.5, 1.0, 1.0, 2.0]
    design = random_effects([0.0, 0.3, -0.2, 0.5], errors)
    rng = np.random.default_rng(3)
    tau = 0.7
    weights = [1 / (se * se + tau * tau) for se in errors]
    se = math.sqrt(1 / sum(weights))
    delta = design.detectable_at(0.05) / design.hk_se * se  # the noncentrality times the true standard error
    found = 0
    for _ in range(4000):
        effects = delta + rng.normal(0, tau, 4) + rng.normal(0, errors)
        found += random_effects(list(effects), errors).t_p < 0.05
    # The estimated weights make HKSJ slightly conservative: the power stays near 80%, not above it.
    assert 0.72 < found / 4000 < 0.84
    assert design.detectable == pytest.approx(design.detectable_at(0.05))
    assert design.detectable_at(0.05 / 4) > design.detectable
