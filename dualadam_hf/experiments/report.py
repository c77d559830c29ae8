"""The comparison report: mean ± std per variant, paired differences with 95% intervals, the learning-rate grid,
per-seed McNemar tests for accuracy, and curves.

Every number is read back from a run's log history (``run_done.json``); nothing is recomputed from the
model, so the report cannot disagree with the logs. A run that failed or diverged is named and kept out of every
mean and interval, and so is its seed for the other variants: all variants are compared on the same seeds. A
blend that did not end inside a variant's runs (recorded by training) is said next to the variant.
The report is written before the plots, each file atomically, so a full disk never leaves half a report.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..integrations.log_keys import BLEND_LOG_KEY
from ..integrations.log_keys import INVERSE_SHARE_LOG_KEY as INVERSE_SHARE_KEY
from .sharpness import SHARPNESS_PREFIX
from .stats import (
    ALPHA,
    McNemar,
    PairedDifference,
    format_number,
    holm,
    mcnemar_exact,
    mean_std,
    paired_difference,
)
from .train import (
    ACCURACY_KEY,
    DONE_ANSWERS_KEY,
    DONE_LOG_KEY,
    DONE_ROWS_KEY,
    EVAL_LOSS_KEY,
    PEAK_MEMORY_KEY,
    SEGMENTS_KEY,
    WALL_TIME_KEY,
)
from .watch import BLEND_UNFINISHED_KEY, DIVERGED_KEY

# (summary key, log-history keys (first found wins), column header, digits, better)
METRICS: tuple[tuple[str, tuple[str, ...], str, int, str], ...] = (
    ("heldout_loss", (EVAL_LOSS_KEY,), "held-out loss", 4, "lower"),
    ("heldout_accuracy", (ACCURACY_KEY,), "held-out accuracy", 3, "higher"),
    ("final_train_loss", ("loss",), "final train loss", 4, "lower"),
    ("wall_time_s", (WALL_TIME_KEY, "train_runtime"), "train wall time (s)", 1, "lower"),
    # train.py logs the peak in MiB (2**20 bytes: ru_maxrss's KiB / 1024, CUDA bytes / 2**20) under a key named _mb.
    ("peak_memory_mb", (PEAK_MEMORY_KEY,), "peak memory (MiB)", 0, "lower"),
    ("sharpness", (f"{SHARPNESS_PREFIX}top_eigenvalue",), "top Hessian eigenvalue", 4, "lower"),
)
CONVERGED_KEY = f"{SHARPNESS_PREFIX}eigenvalue_converged"  # 0: the eigenvalue estimate stopped at the cap
ITERATIONS_KEY = f"{SHARPNESS_PREFIX}eigenvalue_iterations"
# The outcomes a pre-specified comparison is judged on (summary keys); train loss and sharpness are exploratory.
FAMILY_METRICS = ("heldout_loss", "heldout_accuracy")
# Costs, not outcomes: shared cores make wall time noisy, so they get no paired differences.
RESOURCE_METRICS = ("wall_time_s", "peak_memory_mb")
SUMMARY_OF = {EVAL_LOSS_KEY: "heldout_loss", ACCURACY_KEY: "heldout_accuracy"}  # select_metric -> summary key
# Log-history keys whose non-finite value means the run diverged (transformers logs a NaN loss as 0, but not
# the gradient norm or the held-out loss).
_WATCHED = ("loss", "grad_norm", EVAL_LOSS_KEY, "train_loss")
# (log-history key, file, caption, log y axis)
PLOTS = (("loss", "train_loss.png", "Train loss", False), (EVAL_LOSS_KEY, "eval_loss.png", "Held-out loss", False),
         (ACCURACY_KEY, "eval_accuracy.png", "Held-out accuracy", False),
         (INVERSE_SHARE_KEY, "inverse_share.png", "Inverse share of the update", True))


def last_logged(log_history: Sequence[dict[str, Any]], keys: Sequence[str]) -> float | None:
    """The value of the first of ``keys`` in the last log entry that has it (None if none has it)."""
    return next((float(e[key]) for key in keys for e in reversed(log_history) if key in e), None)


def curve(log_history: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for every log entry holding ``key``; a step logged twice keeps its last value."""
    return sorted({int(e["step"]): float(e[key]) for e in log_history if key in e and "step" in e}.items())


def _describe_mark(mark: Any) -> str | None:
    """What a divergence mark says: {"step": N, "what": "loss"} (or the step alone) as "non-finite loss at step N"."""
    value = mark.get("step") if isinstance(mark, dict) else mark
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    what = mark.get("what", "loss") if isinstance(mark, dict) else "loss"
    return f"non-finite {what} at step {int(value)}"


def _describe_blend(mark: Any) -> str | None:
    """What an unfinished-blend record of training says, e.g. "blend not over at the last step: r = 0.52 at step
    48 of a 100-step blend" (None for a record it cannot read)."""
    try:
        blend_steps, last_step, r = int(mark["blend_steps"]), int(mark["max_steps"]), float(mark["last_blend"])
    except (KeyError, TypeError, ValueError):
        return None
    text = f"blend not over at the last step: r = {r:.2f} at step {last_step} of a {blend_steps}-step blend"
    scale = mark.get("inverse_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 0:  # the matched warmup
        text += f" (the warmup reached {1 - r:.2f} of the learning rate)"
    return text


@dataclass
class RunResult:
    label: str
    seed: int
    log_history: list[dict[str, Any]]
    ok: bool = True
    error: str = ""
    phase: str = "final"
    lr: float | None = None
    accuracy_rows: list[int] | None = None
    accuracy_answers: list[str] | None = None  # the generated text of each scored problem, in row order
    diverged: dict[str, Any] | None = None  # run_done.json's mark, e.g. {"step": 14}
    blend_unfinished: dict[str, Any] | None = None  # run_done.json's record of a blend longer than the run
    summary: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.summary = {name: last_logged(self.log_history, keys) for name, keys, *_ in METRICS}

    @classmethod
    def from_done(cls, label: str, seed: int, done: dict[str, Any], *, phase: str = "final",
                  lr: float | None = None) -> RunResult:
        """A finished run from the contents of its ``run_done.json``."""
        return cls(label, seed, list(done.get(DONE_LOG_KEY) or []), phase=phase, lr=lr,
                   accuracy_rows=done.get(DONE_ROWS_KEY), accuracy_answers=done.get(DONE_ANSWERS_KEY),
                   diverged=done.get(DIVERGED_KEY),
                   blend_unfinished=done.get(BLEND_UNFINISHED_KEY))

    @property
    def segments(self) -> int:
        return int(last_logged(self.log_history, (SEGMENTS_KEY,)) or 1)

    @property
    def evaluated_without_training(self) -> bool:
        """Its last process resumed from a checkpoint that had finished training and trained nothing: train's
        wall time is logged, the Trainer's ``train_runtime`` (logged whenever it trains) is not."""
        keys = {key for entry in self.log_history for key in entry}
        return WALL_TIME_KEY in keys and "train_runtime" not in keys

    @property
    def divergence(self) -> str | None:
        """Why this finished run counts as diverged (None if it did not): marked so by training, or a
        non-finite loss, gradient norm or summary number."""
        marks = [self.diverged] * (self.diverged is not None) + [e[DIVERGED_KEY] for e in self.log_history
                                                                 if DIVERGED_KEY in e]
        if marks:
            said = next((text for text in map(_describe_mark, marks) if text is not None), None)
            return "marked diverged by training" + ("" if said is None else f" ({said})")
        for entry in self.log_history:
            bad = [k for k in _WATCHED if isinstance(entry.get(k), (int, float)) and not math.isfinite(entry[k])]
            if bad:
                return f"non-finite {', '.join(bad)} at step {entry.get('step', '?')}"
        if bad := [name for name, value in self.summary.items() if value is not None and not math.isfinite(value)]:
            return f"non-finite {', '.join(bad)}"
        return None

    @property
    def unfinished_blend(self) -> str | None:
        """What training recorded when the blend did not end inside the run (None if it did, or nothing says)."""
        marks = [self.blend_unfinished] + [e[BLEND_UNFINISHED_KEY] for e in self.log_history
                                           if BLEND_UNFINISHED_KEY in e]
        return next((text for text in map(_describe_blend, marks) if text is not None), None)

    @property
    def usable(self) -> bool:
        """Finished without diverging: its numbers may enter means and intervals."""
        return self.ok and self.divergence is None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "phase": self.phase, "lr": self.lr, "ok": self.ok,
                "error": self.error, "diverged": self.divergence, "summary": self.summary,
                "accuracy_rows": self.accuracy_rows, "accuracy_answers": self.accuracy_answers,
                "blend_unfinished": self.blend_unfinished,
                "log_history": self.log_history}


@dataclass
class Selection:
    """Which runs the numbers come from. ``runs``: per variant (every variant seen, in order of appearance) its
    usable runs on the kept seeds; ``dropped``: seeds left out of every variant, with the reason."""

    runs: dict[str, list[RunResult]]
    planned: dict[str, list[RunResult]]
    dropped: dict[int, str]

    @property
    def seeds(self) -> dict[str, list[int]]:
        return {label: [r.seed for r in runs] for label, runs in self.runs.items()}


def _problem(run: RunResult) -> str:
    return f"{run.label} {'failed' if not run.ok else 'diverged'}"


def select(results: Sequence[RunResult], order: Sequence[str] = ()) -> Selection:
    """Per variant (those in ``order`` first), the usable runs on seeds where no variant's run failed or diverged
    (a variant left with no usable run at all is out of the comparison and drops no seed: it would otherwise leave
    nothing to compare)."""
    planned: dict[str, list[RunResult]] = {label: [] for label in order}
    for result in results:
        planned.setdefault(result.label, []).append(result)
    alive = {label for label, runs in planned.items() if any(r.usable for r in runs)}
    dropped: dict[int, str] = {}
    for label in (label for label in planned if label in alive):
        for run in planned[label]:
            if not run.usable:
                dropped[run.seed] = ", ".join(filter(None, (dropped.get(run.seed), _problem(run))))
    runs = {label: [r for r in group if r.usable and r.seed not in dropped] for label, group in planned.items()
            if group}
    planned = {label: group for label, group in planned.items() if group}
    return Selection(runs, planned, dict(sorted(dropped.items())))


def format_cell(values: Sequence[float | None], digits: int, runs: int | None = None) -> str:
    """``mean ± std`` with ``digits`` decimals (std left out for one value, '-' for none); ``(n=k)`` when only k
    of the ``runs`` logged the metric."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" (n={len(values)})" if runs is not None and len(values) < runs else "")


def _runs_cell(label: str, selection: Selection) -> str:
    runs, planned = selection.runs[label], selection.planned[label]
    notes = []
    for kind, test in (("failed", lambda r: not r.ok), ("diverged", lambda r: r.ok and not r.usable)):
        if seeds := [r.seed for r in planned if test(r)]:
            notes.append(f"{kind}: seed {', '.join(map(str, seeds))}")
    if left := [r.seed for r in planned if r.usable and r.seed in selection.dropped]:
        notes.append(f"left out: seed {', '.join(map(str, left))}")
    if resumed := sum(r.segments > 1 for r in runs):
        notes.append(f"{resumed} resumed: wall time summed over segments")
    return f"{len(runs)}" + (f" ({'; '.join(notes)})" if notes else "")


def results_table(results: Sequence[RunResult], order: Sequence[str] = ()) -> str:
    """One row per variant over its kept runs; columns that no run logged (e.g. sharpness when off) are left out."""
    selection = select(results, order)
    groups = selection.runs
    columns = [m for m in METRICS if any(r.summary[m[0]] is not None for runs in groups.values() for r in runs)]
    header = ["variant", "runs", *(m[2] for m in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in groups.items():
        cells = [format_cell([r.summary[name] for r in runs], digits, len(runs)) for name, _, _, digits, _ in columns]
        lines.append("| " + " | ".join([label, _runs_cell(label, selection), *cells]) + " |")
    return "\n".join(lines)


def lost_words(runs: Sequence[RunResult], unit: str) -> str:
    """What became of a variant none of whose ``runs`` is usable, per ``unit`` ("seed", "rate"): "failed at
    every seed", "diverged at every rate", or both; a failed run is never called diverged."""
    kinds = list(dict.fromkeys("failed" if not r.ok else "diverged" for r in runs if not r.usable))
    if not kinds:
        return f"logged no value at any {unit}"
    return f"{' or '.join(kinds)} at every {unit}"


@dataclass
class Comparison:
    """One variant against one baseline over their shared kept seeds."""

    variant: str
    baseline: str
    metrics: list[tuple[str, PairedDifference, str, int]]  # (metric header, differences, better, digits)
    mcnemar: list[tuple[int, McNemar | None]]  # per seed; None when the runs were scored on different problems
    seeds: tuple[int, ...] = ()  # the seeds paired
    # per seed, as mcnemar: the problems whose generated answer texts differ (None without both runs' answer texts)
    differing: dict[int, int | None] = field(default_factory=dict)


def compare_to(selection: Selection, baseline: str, skip: Sequence[str] = ()) -> list[Comparison]:
    """Every other variant (but those in ``skip``) minus ``baseline``, paired by seed, metric by metric."""
    base = {r.seed: r for r in selection.runs.get(baseline, [])}
    comparisons = []
    for label, runs in selection.runs.items():
        pairs = [(r, base[r.seed]) for r in runs if r.seed in base]
        if label == baseline or label in skip or not pairs:
            continue
        metrics = []
        for name, _, header, digits, better in METRICS:
            diffs = [a.summary[name] - b.summary[name] for a, b in pairs
                     if name not in RESOURCE_METRICS and a.summary[name] is not None and b.summary[name] is not None]
            if diffs:
                metrics.append((header, paired_difference(diffs), better, digits))
        tests, differing = [], {}
        for a, b in pairs:
            if a.accuracy_rows and b.accuracy_rows:
                same = len(a.accuracy_rows) == len(b.accuracy_rows)
                tests.append((a.seed, mcnemar_exact(a.accuracy_rows, b.accuracy_rows) if same else None))
                differing[a.seed] = differing_answers(a, b) if same else None
        comparisons.append(Comparison(label, baseline, metrics, tests, tuple(a.seed for a, _ in pairs), differing))
    return comparisons


def differing_answers(a: RunResult, b: RunResult) -> int | None:
    """How many scored problems the two runs answered with different text (None unless both logged every
    answer's text for the same problems). It counts the problems both got wrong with different answers too, so
    it is at least McNemar's discordant count (the problems only one of the two got right)."""
    if not a.accuracy_answers or not b.accuracy_answers or len(a.accuracy_answers) != len(b.accuracy_answers):
        return None
    return sum(x != y for x, y in zip(a.accuracy_answers, b.accuracy_answers))


def _inverse_scale(variant: Any) -> float | None:
    """A variant's inverse_scale as a number (1, the paper's, when unset; None for "norm" or "auto")."""
    try:
        return float(variant.optim_args.get("inverse_scale", "1"))
    except ValueError:
        return None


def matched_warmups(variants: Sequence[Any]) -> dict[str, str]:
    """{matched warmup: its blend}, by label. A matched warmup is a variant with inverse_scale 0 (DualAdam without
    its inverse part); its blend is the variant with the same optimizer, settings and other optim_args and the
    paper's inverse part (inverse_scale 1): the difference of the two is the inverse term's effect."""
    def others(v: Any) -> dict[str, str]:
        return {k: value for k, value in v.optim_args.items() if k != "inverse_scale"}

    pairs = {}
    for warmup in (v for v in variants if _inverse_scale(v) == 0):
        blend = next((v for v in variants if v.optim == warmup.optim and _inverse_scale(v) == 1
                      and others(v) == others(warmup) and v.settings == warmup.settings), None)
        if blend is not None:
            pairs[warmup.label] = blend.label
    return pairs


@dataclass(frozen=True)
class Family:
    """Comparisons fixed before the runs and corrected together: ``pairs`` of (variant, baseline), each judged
    on the held-out outcomes (:data:`FAMILY_METRICS`)."""

    name: str
    what: str
    pairs: tuple[tuple[str, str], ...]


# optim_args that only lay out quantized state (a full-precision optimizer has no such state to lay out)
LOW_BIT_ONLY_ARGS = frozenset({"block_size"})


def low_bit_twins(variants: Sequence[Any]) -> dict[str, str]:
    """{low-bit variant: its full-precision twin}, by label. A low-bit variant's optimizer name ends in
    ``_8bit`` or ``_4bit`` (``dualadam_8bit``, ``adamw_torch_8bit``); its twin is the variant of the name without
    that ending, with the same settings and optim_args (but those that only lay out the quantized state, such as
    ``block_size``): the difference of the two is what the quantized state costs."""
    def shared(v: Any) -> dict[str, str]:
        return {k: value for k, value in v.optim_args.items() if k not in LOW_BIT_ONLY_ARGS}

    pairs = {}
    for low in variants:
        full = re.sub(r"_[48]bit$", "", low.optim)
        if full == low.optim:
            continue
        twin = next((v for v in variants if v.optim == full and not set(v.optim_args) & LOW_BIT_ONLY_ARGS
                     and shared(v) == shared(low) and v.settings == low.settings), None)
        if twin is not None:
            pairs[low.label] = twin.label
    return pairs


def families(variants: Sequence[Any], first: str) -> list[Family]:
    """The pre-specified families: "primary", every variant but the matched warmups and the low-bit variants
    against ``first`` (the comparison's baseline); "control", each matched warmup against its blend; "low-bit",
    each low-bit variant against its full-precision twin. Any other pair is exploratory."""
    warmups, twins = matched_warmups(variants), low_bit_twins(variants)
    primary = tuple((v.label, first) for v in variants
                    if v.label != first and v.label not in warmups and v.label not in twins)
    found = [Family("primary", f"every variant but the matched warmups and the low-bit ones against {first}"
                    if twins else f"every variant but the matched warmups against {first}", primary),
             Family("control", "each matched warmup against its blend (the same optimizer without its inverse "
                    "part): whether the inverse term changed anything", tuple(warmups.items())),
             Family("low-bit", "each low-bit variant against its full-precision twin (the same optimizer and "
                    "settings with 32-bit state): what the quantized state costs", tuple(twins.items()))]
    return [family for family in found if family.pairs]


@dataclass(frozen=True)
class FamilyTest:
    """One pre-specified test: its paired differences, its p after Holm's correction within the family of
    ``size`` tests (None without a test), and the family-wise (Bonferroni) interval."""

    family: str
    variant: str
    baseline: str
    metric: str
    better: str
    digits: int
    diff: PairedDifference
    holm_p: float | None
    size: int
    joint: tuple[float, float] | None

    @property
    def detectable(self) -> float | None:
        """The true difference a test at the family's Bonferroni level 0.05/m (Holm's strictest step) finds with
        80% power, from the observed sd of the differences."""
        return None if self.holm_p is None else self.diff.detectable_at(ALPHA / self.size)

    @property
    def verdict(self) -> str:
        if self.holm_p is None:
            return f"no test: {self.diff.no_interval or 'no p-value'}"
        if self.holm_p >= ALPHA:
            return "no difference shown"
        return "better" if (self.diff.mean < 0) == (self.better == "lower") else "worse"


def family_tests(selection: Selection, found: Sequence[Family]) -> list[FamilyTest]:
    """Each family's paired t tests on :data:`FAMILY_METRICS`, Holm-corrected within the family (tests without a
    p-value, e.g. from differences that are all equal, are named and not counted)."""
    headers = {header for name, _, header, *_ in METRICS if name in FAMILY_METRICS}
    tests = []
    for family in found:
        rows = []
        for variant, baseline in family.pairs:
            if not selection.runs.get(baseline):
                continue
            comparison = next((c for c in compare_to(selection, baseline) if c.variant == variant), None)
            rows += [(variant, baseline, *metric) for metric in (comparison.metrics if comparison else [])
                     if metric[0] in headers]
        adjusted = iter(holm([diff.t_p for *_, diff, _, _ in rows if diff.t_p is not None]))
        size = sum(diff.t_p is not None for *_, diff, _, _ in rows)
        for variant, baseline, header, diff, better, digits in rows:
            holm_p = None if diff.t_p is None else next(adjusted)
            joint = None if holm_p is None else diff.interval(1 - ALPHA / size)
            tests.append(FamilyTest(family.name, variant, baseline, header, better, digits, diff, holm_p, size, joint))
    return tests


def _span(low: float | None, high: float | None, digits: int) -> str:
    """An interval, its bounds rounded outward."""
    if low is None or high is None:
        return "-"
    return f"[{format_number(low, digits, toward='down')}, {format_number(high, digits, toward='up')}]"


def prespecified_section(found: Sequence[Family], tests: Sequence[FamilyTest]) -> list[str]:
    """The pre-specified families, their tests with raw and Holm-corrected p and family-wise intervals."""
    if not tests:
        return []
    lines = ["## Pre-specified comparisons", "",
             "The comparisons the plan fixes before any run, in families. Within a family the two-sided paired t "
             "tests over the per-seed differences are corrected together by Holm's method, so that the chance of "
             "any false finding in the family stays at most 5%; their verdicts, here and in the sections below, "
             "follow the corrected p. Every other pair, and every other metric, is exploratory: its 95% interval "
             "and verdict are not corrected.", ""]
    for family in found:
        mine = [t for t in tests if t.family == family.name]
        untested = [f"{t.variant} − {t.baseline} {t.metric}" for t in mine if t.holm_p is None]
        pairs = ", ".join(f"{variant} − {baseline}" for variant, baseline in family.pairs)
        lines.append(f"- **{family.name}**: {family.what} ({pairs}), on "
                     f"{' and '.join(header for name, _, header, *_ in METRICS if name in FAMILY_METRICS)}: "
                     f"{len(mine) - len(untested)} tests" + (f"; no test for {', '.join(untested)}" * bool(untested))
                     + ".")
    lines += ["", "Family-wise interval: the paired t interval at 1 − 0.05/m for a family of m tests (Bonferroni): "
              "the m intervals cover their true differences all at once with probability at least 95%. It is "
              "wider than Holm's test needs, so it can reach past 0 beside a Holm p below 0.05. Interval bounds "
              "are rounded outward. Detectable at 0.05/m: the true difference a two-sided paired t test at level "
              "0.05/m (Holm's strictest step) finds with 80% power, given the observed sd of the differences "
              "(noncentral t): the size of effect the corrected test can be relied on to find.", "",
              "| family | comparison | metric | mean | 95% interval | t test p | Holm p | family-wise interval | "
              "detectable at 0.05/m | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        d = t.digits + 1
        p, corrected = (("-", "-") if t.holm_p is None else (f"{t.diff.t_p:.3g}", f"{t.holm_p:.3g}"))
        joint = "-" if t.joint is None else _span(*t.joint, d)
        detectable = format_number(t.detectable, d, sign=False)
        lines.append(f"| {t.family} | {t.variant} − {t.baseline} | {t.metric} | {format_number(t.diff.mean, d)} | "
                     f"{_span(t.diff.low, t.diff.high, d)} | {p} | {corrected} | {joint} | {detectable} | "
                     f"{t.verdict} |")
    return lines + [""]


def exhausted_estimates(selection: Selection) -> tuple[list[RunResult], list[RunResult]]:
    """The top-eigenvalue estimates that used every allowed power iteration: (stopped at the cap without
    converging, met the tolerance only at the last allowed iteration). The cap is the iteration count of a capped
    estimate (every run of a comparison has the same); with none capped it is not known, and none is counted."""
    runs = [r for group in selection.runs.values() for r in group]
    capped = [r for r in runs if last_logged(r.log_history, (CONVERGED_KEY,)) == 0]
    caps = [n for r in capped if (n := last_logged(r.log_history, (ITERATIONS_KEY,))) is not None]
    at_last = [r for r in runs if caps and last_logged(r.log_history, (CONVERGED_KEY,)) == 1
               and last_logged(r.log_history, (ITERATIONS_KEY,)) == max(caps)]
    return capped, at_last


def differences_section(selection: Selection, baseline: str, skip: Sequence[str] = (),
                        tests: Sequence[FamilyTest] | None = None) -> list[str]:
    """The paired-differences section against one baseline (lines of markdown); variants in ``skip`` (earlier
    baselines, whose differences to this one were given there with the opposite sign) are left out. With
    ``tests`` (the pre-specified ones), their verdicts follow the Holm-corrected p and every other difference is
    marked exploratory."""
    if baseline not in selection.runs:
        return [f"## Paired differences against {baseline}", "",
                f"No paired differences: {baseline} is not a variant of this comparison.", ""]
    if not selection.runs[baseline]:
        why = (lost_words(selection.planned[baseline], "seed") if not any(r.usable for r in selection.planned[baseline])
               else "kept no seed")
        return [f"## Paired differences against {baseline}", "", f"No paired differences: {baseline} {why}.", ""]
    comparisons = compare_to(selection, baseline, skip)
    if not comparisons:
        return []
    lines = [f"## Paired differences against {baseline}", "",
             f"Each variant minus {baseline} on the same seed. 95% interval: Student's t over the per-seed "
             "differences (n - 1 degrees of freedom). Sign test: exact two-sided binomial test on the signs of the "
             "differences (zeros left out). Detectable: the true difference a two-sided paired t test at 5% finds "
             "with 80% power, given the observed sd of the differences and the number of seeds (noncentral t). "
             "No interval from one seed or from differences that are all equal. Interval bounds are rounded "
             "outward." + (" Verdicts of the pre-specified tests follow their Holm-corrected p (Pre-specified "
                           "comparisons); the others are exploratory, uncorrected." if tests is not None else ""), "",
             f"| variant − {baseline} | metric | per-seed differences | mean | 95% interval | sign test p | "
             "detectable (80% power) |", "|---|---|---|---|---|---|---|"]
    planned = {(t.variant, t.baseline, t.metric): t for t in tests or ()}
    rough = {(r.label, r.seed) for runs in exhausted_estimates(selection) for r in runs}
    sharpness = next(header for name, _, header, *_ in METRICS if name == "sharpness")
    words = []
    for c in comparisons:
        for header, diff, better, digits in c.metrics:
            d = digits + 1
            each = ", ".join(format_number(x, d) for x in diff.differences)
            sign_p = "-" if diff.sign_p is None else f"{diff.sign_p:.3g}"
            detectable = format_number(diff.detectable, d, sign=False)
            lines.append(f"| {c.variant} | {header} | {each} | {format_number(diff.mean, d)} | "
                         f"{_span(diff.low, diff.high, d)} | {sign_p} | {detectable} |")
            test = planned.get((c.variant, baseline, header))
            name = header if test is not None or tests is None else f"{header} (exploratory)"
            used_all = sum((label, seed) in rough for seed in c.seeds for label in (c.variant, baseline))
            if header == sharpness and used_all:
                said = (f"{name}: {used_all} of its {2 * len(c.seeds)} estimates used every allowed power "
                        "iteration: too coarse to compare, no verdict.")
            elif test is not None:
                family = f"the {test.size} {test.family} test" + "s" * (test.size != 1)
                said = diff.words(name, better, d, holm_p=test.holm_p, family=family, family_size=test.size)
            else:
                said = diff.words(name, better, d)
            words.append(f"- {c.variant} − {baseline}, {said}")
    lines += ["", *words, ""]
    tests = [(c.variant, seed, test) for c in comparisons for seed, test in c.mcnemar]
    if tests:
        differing = {(c.variant, seed): n for c in comparisons for seed, n in c.differing.items()}
        lines += [f"Held-out accuracy per seed, exact McNemar test against {baseline} (the problems only one of the "
                  "two runs answered right, the discordant pairs the test counts; p is two-sided). Answers that "
                  "differ: the problems on which the two runs' generated answers differ as text, those both got "
                  "wrong with different answers included ('-' where the logs hold no answer text).", "",
                  f"| variant | seed | right only for the variant | right only for {baseline} | McNemar p | "
                  "answers that differ |", "|---|---|---|---|---|---|"]
        for variant, seed, test in tests:
            n = differing.get((variant, seed))
            cells = ("scored on different problems", "-", "-", "-") if test is None else (
                str(test.variant_only), str(test.baseline_only), f"{test.p:.3g}", "-" if n is None else str(n))
            lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _grid_cell(runs: Sequence[RunResult], key: str) -> str:
    if not runs:
        return "-"
    if all(not r.ok for r in runs):
        return "failed"
    values = [r.summary[key] for r in runs if r.usable and r.summary[key] is not None]
    if not values:  # a run that failed is never called diverged
        return " and ".join(dict.fromkeys("failed" if not r.ok else "diverged" if not r.usable else "no value"
                                          for r in runs))
    text = f"{statistics.fmean(values):.4f}"
    return text if len(values) == len(runs) else f"{text} ({len(runs) - len(values)} of {len(runs)} lost)"


def rate_texts(rates: Sequence[float]) -> dict[float, str]:
    """Each rate written with the fewest significant digits, 6 or more (as ``:g``), that tell all ``rates`` apart:
    1e-3 and 1.0000001e-3 are two rates and must not read as one. 17 digits always do."""
    distinct = sorted(set(rates))
    for digits in range(6, 18):
        texts = {rate: f"{rate:.{digits}g}" for rate in distinct}
        if len(set(texts.values())) == len(distinct):
            return texts
    return {rate: repr(rate) for rate in distinct}


def rate_scores(runs: Sequence[RunResult], rates: Sequence[float], key: str) -> dict[float, float]:
    """The mean final ``key`` over a variant's grid ``runs`` at each rate where every run finished with a finite
    value; a rate with a failed, diverged or non-finite run is left out: it is not safe at that rate."""
    scores = {}
    for lr in rates:
        at_rate = [r for r in runs if r.lr == lr]
        values = [r.summary.get(key) for r in at_rate if r.usable]
        if at_rate and len(values) == len(at_rate) and all(v is not None and math.isfinite(v) for v in values):
            scores[lr] = sum(values) / len(values)
    return scores


def _chosen_cell(plan: Any, runs: Sequence[RunResult], names: dict[float, str], key: str) -> str:
    """The chosen rate, with the rates it tied with; or why none was chosen."""
    chosen = plan.chosen_lr.get(runs[0].label) if runs else None
    if chosen is None:
        return f"none: {lost_words(runs, 'rate')}" if runs else "-"
    scores = rate_scores(runs, plan.lr_grid, key)
    ties = [names[lr] for lr in plan.lr_grid if lr != chosen and lr in scores and scores[lr] == scores.get(chosen)]
    shown = names.get(chosen, repr(chosen))
    if not ties:
        return shown
    every = "every rate ties" if len(ties) == len(plan.lr_grid) - 1 else f"tied with {', '.join(ties)}"
    return f"{shown} ({every}: the smallest is chosen)"


def grid_table(plan: Any, grid_results: Sequence[RunResult]) -> str:
    """Final validation metric per variant and rate (the mean over grid seeds); the chosen rate in bold, with the
    rates it tied with, or why a variant has none."""
    key = SUMMARY_OF[plan.select_metric]
    names = rate_texts(plan.lr_grid)
    lines = ["| variant | " + " | ".join(f"lr {names[lr]}" for lr in plan.lr_grid) + " | chosen |",
             "|" + "---|" * (len(plan.lr_grid) + 2)]
    for variant in plan.variants:
        cells = []
        chosen = plan.chosen_lr.get(variant.label)
        for lr in plan.lr_grid:
            text = _grid_cell([r for r in grid_results if r.label == variant.label and r.lr == lr], key)
            cells.append(f"**{text}**" if chosen == lr else text)
        shown = _chosen_cell(plan, [r for r in grid_results if r.label == variant.label], names, key)
        lines.append(f"| {variant.label} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines)


def curves_by_variant(groups: dict[str, list[RunResult]], key: str, log_y: bool = False
                      ) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Per variant, the steps every one of its runs logged ``key`` at and the values there (positive steps only on
    a log axis); variants with fewer than 2 such steps are left out."""
    out = {}
    for label, runs in groups.items():
        curves = [dict(curve(r.log_history, key)) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        values = [[c[s] for c in curves] for s in steps]
        if log_y:  # a share is 0 past the blend (and always without one): a log axis shows the positive part
            steps, values = [s for s, v in zip(steps, values) if min(v) > 0], [v for v in values if min(v) > 0]
        if len(steps) >= 2:
            out[label] = (steps, values)
    return out


def why_no_curve(groups: dict[str, list[RunResult]], key: str, caption: str, log_y: bool = False) -> str | None:
    """Why a logged quantity gets no curve (None when nothing logged it: nothing to explain)."""
    steps = sorted({s for runs in groups.values() for r in runs for s, _ in curve(r.log_history, key)})
    if not steps:
        return None
    if len(steps) == 1:
        return f"{caption}: no curve, it was logged at one step only ({steps[0]})."
    return (f"{caption}: no curve, no variant logged it at 2 or more steps shared by all its runs"
            + (" with a value above 0 (the log axis)." if log_y else "."))


def _replace_atomically(path: Path, write) -> None:
    """Call ``write(temporary path)``, then move the result over ``path``: a crash or a full disk leaves the old
    file (or none), never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:  # a write error names no file: name the one being replaced, not the temporary one
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def plot_curves(curves: dict[str, tuple[list[int], list[list[float]]]], key: str, title: str, path: Path, *,
                log_y: bool = False, runs: dict[str, int] | None = None) -> None:
    """Mean curve per variant over its seeds (band: min to max), written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    try:
        for label, (steps, values) in curves.items():
            n = len(values[0])
            (line,) = axes.plot(steps, [statistics.fmean(v) for v in values], marker="o" if len(steps) < 30 else None,
                                ms=3, label=f"{label} (n={n})")
            if n > 1:
                axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                                  alpha=0.2)
        axes.set(xlabel="optimizer step", ylabel=key, title=title, yscale="log" if log_y else "linear")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        _replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(figure)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _blend_notes(label: str, runs: Sequence[RunResult]) -> str:
    """What training recorded about the variant's blend outlasting its runs, each distinct record once."""
    return "; ".join(dict.fromkeys(text for r in runs if r.label == label and (text := r.unfinished_blend)))


def _header(plan: Any, baselines: list[str], runs: Sequence[RunResult]) -> list[str]:
    """Title, the variants (with their own seeds where they differ from the comparison's, and a blend that did
    not end inside their runs), the recipe, overrides and seeds."""
    lines = [f"# Optimizer comparison: {plan.config.stem}", "",
             f"Variants (paired differences against {' and '.join(baselines)}):", ""]
    own_seeds = {v.label: plan.seeds_of(v) for v in plan.variants if list(plan.seeds_of(v)) != list(plan.seeds)}
    for v in plan.variants:
        extra = ", ".join([f"optim_args `{v.optim_args_text}`"] * bool(v.optim_args)
                          + [f"`{k}={val}`" for k, val in v.settings.items()])
        line = f"- **{v.label}**: `{v.optim}`" + (f" with {extra}" if extra else "")
        if v.label in own_seeds:
            line += f"; its own seeds {', '.join(map(str, own_seeds[v.label]))}"
        if blend := _blend_notes(v.label, runs):
            line += f" — {blend}"
        lines.append(line)
    if len(own_seeds) == len(plan.variants):
        seeds = "seeds as listed with each variant"
    else:
        seeds = f"seeds {', '.join(map(str, plan.seeds))}" + (" (variants with their own: as listed)" * bool(own_seeds))
    return lines + ["", f"Recipe `{plan.config.name}`; overrides `{' '.join(plan.overrides) or 'none'}`; {seeds}; "
                    f"held-out results on the `{plan.test_split}` split.", ""]


def _seeds_words(label: str, seeds: Sequence[int], selection: Selection) -> str:
    """A variant's kept seeds; for none, why: its runs failed or diverged, or its seeds were left out."""
    if seeds:
        return ", ".join(map(str, seeds))
    planned = selection.planned.get(label, [])
    return "none kept" if any(r.usable for r in planned) else lost_words(planned, "seed")


def _results_section(results: Sequence[RunResult], selection: Selection,
                     no_rate: dict[str, str] | None = None) -> list[str]:
    """The results table and its notes; ``no_rate``: the variants the grid gave no rate, with what their grid
    runs did (they ran no seeds)."""
    lines = ["## Results", "", results_table(results, list(selection.planned)), "",
             "Mean ± sample std over seeds. Held-out loss is the last evaluation on the held-out split (answer "
             "tokens only for chat data); accuracy is exact match of greedy answers on held-out problems; wall "
             "time is training time, summed over the segments of a resumed run; peak memory is the process "
             "peak in MiB (2^20 bytes): the resident set size on CPU, CUDA allocations on GPU. Wall time counts "
             "whatever else the machine ran at the same time: it is what these runs cost, not a measurement of the "
             "optimizers' speed.", ""]
    lines += [f"{label} ran no seeds: it {words} of the learning-rate grid, so it has no row here and no paired "
              "differences." for label, words in (no_rate or {}).items()] + [""] * bool(no_rate)
    if selection.dropped:
        kept = sorted({s for seeds in selection.seeds.values() for s in seeds})
        lines += [f"Seed {', '.join(map(str, selection.dropped))} left out of every variant's numbers ("
                  + "; ".join(f"seed {s}: {why}" for s, why in selection.dropped.items())
                  + f"), so that all variants are compared on the same seeds ({', '.join(map(str, kept)) or 'none'}).",
                  ""]
    if resumed := [f"{r.label} seed {r.seed}" for runs in selection.runs.values() for r in runs
                   if r.evaluated_without_training]:
        lines += [f"Evaluated from a finished checkpoint: {', '.join(resumed)}. Each was resumed after its training "
                  "had ended, and that last process trained nothing (no `train_runtime` in its log): its wall time "
                  "is the one its checkpoint recorded, its peak memory the larger of the checkpoint's record "
                  "(training) and the resumed process's own peak, and its `peak_memory_mb/train` is the resumed "
                  "process's, not a training peak.", ""]
    capped, at_last = exhausted_estimates(selection)
    if capped:
        estimates = sum(r.summary["sharpness"] is not None for runs in selection.runs.values() for r in runs)
        cap = last_logged(capped[0].log_history, (ITERATIONS_KEY,))
        more = "" if not at_last else (
            f", and {len(at_last)} more met the tolerance only at that last allowed iteration ("
            + ", ".join(f"{r.label} seed {r.seed}" for r in at_last) + f"; `{ITERATIONS_KEY}` {cap:g})")
        lines += [f"Top Hessian eigenvalue: {len(capped)} of {estimates} estimates stopped at the cap of power "
                  f"iterations without converging ({', '.join(f'{r.label} seed {r.seed}' for r in capped)}; "
                  f"`{CONVERGED_KEY}` 0 in their logs){more}: every one of them used all the iterations allowed, "
                  "so read them, and the means and differences that include them, as too coarse to compare the "
                  "variants (raise `sharpness_max_iters`).", ""]
    if len({tuple(seeds) for seeds in selection.seeds.values()}) > 1:
        lines += ["Variants ran different seeds: " + "; ".join(
            f"{label} {_seeds_words(label, seeds, selection)}" for label, seeds in selection.seeds.items())
            + ". Each paired difference uses the seeds both of its variants have.", ""]
    return lines


def blended_steps(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, r, inverse share) of every logged step whose blend weight r was above 0."""
    shares = dict(curve(log_history, INVERSE_SHARE_KEY))
    return [(step, r, shares[step]) for step, r in curve(log_history, BLEND_LOG_KEY) if r > 0 and step in shares]


def _spread(values: Sequence[float], show: Callable[[float], str] | None = None) -> str:
    """min to max, once if they print the same. Numbers without ``show`` print with 3 digits, the min rounded
    down and the max up, so the printed range holds every value ("at most" the printed max is true); once, to
    the nearest, when both ends round to the same."""
    if show is not None:
        low, high = show(min(values)), show(max(values))
        return low if low == high else f"{low} to {high}"
    low, high = (format_number(v, 3, sign=False) for v in (min(values), max(values)))
    if low == high:
        return low
    return (f"{format_number(min(values), 3, sign=False, toward='down')} to "
            f"{format_number(max(values), 3, sign=False, toward='up')}")


def inverse_share_section(selection: Selection) -> list[str]:
    """How large the inverse part was, per variant with a blend: the share at the first and at the last blended
    step, and share / r over the blend (1 when the inverse part acts at strength r), min to max over seeds."""
    rows = []
    for label, runs in selection.runs.items():
        steps = [s for s in (blended_steps(r.log_history) for r in runs) if s]
        if not steps:
            continue
        first, last = [s[0] for s in steps], [s[-1] for s in steps]
        cells = [label, str(len(steps)), *(_spread([row[k] for row in first]) for k in (1, 2)),
                 _spread([row[0] for row in last], str), *(_spread([row[k] for row in last]) for k in (1, 2)),
                 _spread([share / r for s in steps for _, r, share in s])]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## Inverse share of the update", "",
            f"From `{INVERSE_SHARE_KEY}` and `{BLEND_LOG_KEY}` (r) in the logs: the inverse part's share of the "
            "step's norm (0: Adam's step alone; r: both parts in the proportion the blend weight says), at the "
            "first and the last logged step with r > 0, and share / r over all of those steps. Each cell: min to "
            "max over the runs, the min rounded down and the max up.", "",
            "| variant | runs | first step: r | first step: share | last blended step | its r | its share "
            "| share / r over the blend |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def _run_notes(results: Sequence[RunResult], grid_results: Sequence[RunResult], seconds: float) -> list[str]:
    everything = [*grid_results, *results]
    names = rate_texts([r.lr for r in everything if r.lr is not None])
    lines = [f"- **failed**: {r.label} seed {r.seed} ({r.phase}): {r.error}" for r in everything if not r.ok]
    lines += [f"- **diverged**: {r.label} seed {r.seed} ({r.phase}" + ("" if r.lr is None else f", lr {names[r.lr]}")
              + f"): {r.divergence}; left out of the means and intervals" for r in everything if r.ok and not r.usable]
    trained = sum(r.summary["wall_time_s"] or 0.0 for r in everything
                  if r.ok and r.summary["wall_time_s"] is not None and math.isfinite(r.summary["wall_time_s"]))
    scope = "all runs, grid included" if grid_results else "all runs"
    return lines + [f"- Training time of {scope}: {trained:.0f} s; this invocation: {seconds:.0f} s "
                    "(finished runs that were reused cost nothing)."]


def raw_file_name(run: RunResult) -> str:
    """``<phase>-<variant>-seed<k>[-lr<rate>].json``, the rate written in full (repr, as the run folders): rates
    equal to 6 significant digits get files of their own."""
    name = f"{run.phase}-{run.label}-seed{run.seed}" + ("" if run.lr is None else f"-lr{run.lr!r}")
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name) + ".json"


def _save_raw(raw: Path, runs: Sequence[RunResult]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for r in runs:
        write_text_atomically(raw / raw_file_name(r), json.dumps(r.to_json(), indent=1) + "\n")


def load_raw(folder: str | os.PathLike) -> tuple[list[RunResult], list[RunResult]]:
    """(final runs, grid runs) from a report's raw/*.json files, e.g. to rewrite a report without training.

    Files are read by their content, whatever their name, so a folder may hold one run (phase, variant, seed
    and rate) in two files, e.g. under a shortened rate (``-lr{rate:g}``) and under :func:`raw_file_name`'s
    name: the file with that name wins, and the run is read once."""
    runs: dict[tuple[str, str, int, float | None], RunResult] = {}
    for file in sorted(Path(folder).glob("*.json")):
        try:
            run = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not a readable raw log ({error}); it was cut off or damaged") from None
        result = RunResult(run["label"], run["seed"], run["log_history"], ok=run["ok"], error=run["error"],
                           phase=run["phase"], lr=run["lr"], accuracy_rows=run["accuracy_rows"],
                           accuracy_answers=run.get("accuracy_answers"), blend_unfinished=run.get("blend_unfinished"))
        key = (result.phase, result.label, result.seed, result.lr)
        if key not in runs or file.name == raw_file_name(result):
            runs[key] = result
    final = [r for r in runs.values() if r.phase != "grid"]
    return final, [r for r in runs.values() if r.phase == "grid"]


def write_report(plan: Any, results: Sequence[RunResult], grid_results: Sequence[RunResult] = (), *,
                 seconds: float = 0.0, baselines: Sequence[str] = ()) -> Path:
    """Write raw/<phase>-<variant>-seed<k>[-lr<lr>].json, then report.md, then the plots; return report.md's path.

    ``plan`` is compare's plan (its variants, ``seeds`` and ``seeds_of``, ``lr_grid``, ``grid_seeds``,
    ``chosen_lr``, splits, ...). Paired differences are against the first variant and against each variant
    ``baselines`` names, in that order (a pair is given once, under the earlier baseline). A plot that cannot
    be written is reported on stderr and in report.md; the tables are already saved."""
    out = Path(plan.output_dir)
    _save_raw(out / "raw", [*grid_results, *results])
    selection = select(results, [v.label for v in plan.variants])
    first = plan.variants[0].label if plan.variants else next(iter(selection.runs), "")
    baselines = list(dict.fromkeys(b for b in (first, *baselines) if b))
    lines = _header(plan, baselines, [*grid_results, *results])
    if plan.lr_grid:
        grid_seeds = ", ".join(map(str, plan.grid_seeds))
        lines += [f"## Learning rates, chosen on the `{plan.validation_split}` split", "",
                  f"Final {plan.select_metric} per rate (mean over the grid runs of seed {grid_seeds}); the "
                  "chosen rate is bold. The test split is not read in this phase.", "", grid_table(plan, grid_results),
                  ""]
    # A variant the grid gave no rate ran no seeds: the grid table shows why, the results say it once.
    no_rate = {v.label: lost_words(runs, "rate") for v in plan.variants if plan.lr_grid and v.label not in
               plan.chosen_lr and (runs := [r for r in grid_results if r.label == v.label])}
    lines += _results_section(results, selection, no_rate)
    lines += inverse_share_section(selection)
    found = families(plan.variants, baselines[0]) if baselines else []
    tests = family_tests(selection, found)
    lines += prespecified_section(found, tests)
    for k, name in enumerate(baselines):
        if name in no_rate:
            lines += [f"## Paired differences against {name}", "",
                      f"No paired differences: {name} {no_rate[name]} of the learning-rate grid and ran no seeds.", ""]
            continue
        lines += differences_section(selection, name, baselines[:k], tests)
    lines += _run_notes(results, grid_results, seconds)
    planned = []  # (key, file, caption, log_y, curves)
    for key, name, caption, log_y in PLOTS:
        curves = curves_by_variant(selection.runs, key, log_y)
        if curves:
            planned.append((key, name, caption, log_y, curves))
        elif reason := why_no_curve(selection.runs, key, caption, log_y):
            lines.append(f"- {reason}")
    if planned and not _matplotlib_available():
        lines += ["", "(No plots: matplotlib is not installed.)"]
        planned = []
    lines += [line for _, name, caption, *_ in planned for line in ("", f"![{caption}]({name})")]
    path = out / "report.md"
    write_text_atomically(path, "\n".join(lines).rstrip() + "\n")
    failed = []
    for key, name, caption, log_y, curves in planned:
        try:
            plot_curves(curves, key, f"{caption} (mean over seeds, band: min-max)", out / name, log_y=log_y)
        except OSError as error:
            failed.append((name, caption, error))
            print(f"[report] could not write {out / name}: {error.strerror or error}", file=sys.stderr)
    if failed:  # best effort: if even this fails, the report written above stays as it is
        text = "\n".join(lines)
        for name, caption, error in failed:
            text = text.replace(f"![{caption}]({name})",
                                f"({caption}: {name} could not be written: {error.strerror or error})")
        try:
            write_text_atomically(path, text.rstrip() + "\n")
        except OSError:
            pass
    return path
