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
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..integrations.log_keys import BLEND_LOG_KEY
from ..integrations.log_keys import INVERSE_SHARE_LOG_KEY as INVERSE_SHARE_KEY
from .stats import McNemar, PairedDifference, format_number, mcnemar_exact, mean_std, paired_difference
from .watch import BLEND_UNFINISHED_KEY, DIVERGED_KEY, SHARPNESS_PREFIX

# (summary key, log-history keys (first found wins), column header, digits, better)
METRICS: tuple[tuple[str, tuple[str, ...], str, int, str], ...] = (
    ("heldout_loss", ("eval_loss",), "held-out loss", 4, "lower"),
    ("heldout_accuracy", ("eval_accuracy",), "held-out accuracy", 3, "higher"),
    ("final_train_loss", ("loss",), "final train loss", 4, "lower"),
    ("wall_time_s", ("train_wall_time_s", "train_runtime"), "train wall time (s)", 1, "lower"),
    ("peak_memory_mb", ("peak_memory_mb",), "peak memory (MB)", 0, "lower"),
    ("sharpness", (f"{SHARPNESS_PREFIX}top_eigenvalue",), "top Hessian eigenvalue", 4, "lower"),
)
CONVERGED_KEY = f"{SHARPNESS_PREFIX}eigenvalue_converged"  # 0: the eigenvalue estimate stopped at the cap
# Costs, not outcomes: shared cores make wall time noisy, so they get no paired differences.
RESOURCE_METRICS = ("wall_time_s", "peak_memory_mb")
SUMMARY_OF = {"eval_loss": "heldout_loss", "eval_accuracy": "heldout_accuracy"}  # select_metric -> summary key
# Log-history keys whose non-finite value means the run diverged (transformers logs a NaN loss as 0, but not
# the gradient norm or the held-out loss).
_WATCHED = ("loss", "grad_norm", "eval_loss", "train_loss")
# (log-history key, file, caption, log y axis)
PLOTS = (("loss", "train_loss.png", "Train loss", False), ("eval_loss", "eval_loss.png", "Held-out loss", False),
         ("eval_accuracy", "eval_accuracy.png", "Held-out accuracy", False),
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
        return cls(label, seed, list(done.get("log_history") or []), phase=phase, lr=lr,
                   accuracy_rows=done.get("accuracy_rows"), accuracy_answers=done.get("accuracy_answers"),
                   diverged=done.get(DIVERGED_KEY),
                   blend_unfinished=done.get(BLEND_UNFINISHED_KEY))

    @property
    def segments(self) -> int:
        return int(last_logged(self.log_history, ("train_segments",)) or 1)

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


def group(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The runs that enter the numbers, by variant (see :func:`select`)."""
    return select(results).runs


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
    lines = ["| variant | runs | " + " | ".join(m[2] for m in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for label, runs in groups.items():
        cells = [format_cell([r.summary[name] for r in runs], digits, len(runs)) for name, _, _, digits, _ in columns]
        lines.append(f"| {label} | {_runs_cell(label, selection)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Comparison:
    """One variant against one baseline over their shared kept seeds."""

    variant: str
    baseline: str
    metrics: list[tuple[str, PairedDifference, str, int]]  # (metric header, differences, better, digits)
    mcnemar: list[tuple[int, McNemar | None]]  # per seed; None when the runs were scored on different problems


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
        tests = []
        for a, b in pairs:
            if a.accuracy_rows and b.accuracy_rows:
                same = len(a.accuracy_rows) == len(b.accuracy_rows)
                tests.append((a.seed, mcnemar_exact(a.accuracy_rows, b.accuracy_rows) if same else None))
        comparisons.append(Comparison(label, baseline, metrics, tests))
    return comparisons


def differences_section(selection: Selection, baseline: str, skip: Sequence[str] = ()) -> list[str]:
    """The paired-differences section against one baseline (lines of markdown); variants in ``skip`` (earlier
    baselines, whose differences to this one were given there with the opposite sign) are left out."""
    if baseline not in selection.runs:
        return [f"## Paired differences against {baseline}", "",
                f"No paired differences: {baseline} is not a variant of this comparison.", ""]
    if not selection.runs[baseline]:
        return [f"## Paired differences against {baseline}", "",
                f"No paired differences: no run of {baseline} finished without diverging.", ""]
    comparisons = compare_to(selection, baseline, skip)
    if not comparisons:
        return []
    lines = [f"## Paired differences against {baseline}", "",
             f"Each variant minus {baseline} on the same seed. 95% interval: Student's t over the per-seed "
             "differences (n - 1 degrees of freedom). Sign test: exact two-sided binomial test on the signs of the "
             "differences (zeros left out). Detectable: the true difference a two-sided paired t test at 5% finds "
             "with 80% power, given the observed sd of the differences and the number of seeds (noncentral t). "
             "No interval from one seed or from differences that are all equal.", "",
             f"| variant − {baseline} | metric | per-seed differences | mean | 95% interval | sign test p | "
             "detectable (80% power) |", "|---|---|---|---|---|---|---|"]
    words = []
    for c in comparisons:
        for header, diff, better, digits in c.metrics:
            d = digits + 1
            span = "-" if diff.low is None else f"[{format_number(diff.low, d)}, {format_number(diff.high, d)}]"
            each = ", ".join(format_number(x, d) for x in diff.differences)
            sign_p = "-" if diff.sign_p is None else f"{diff.sign_p:.3g}"
            lines.append(f"| {c.variant} | {header} | {each} | {format_number(diff.mean, d)} | {span} | {sign_p} | "
                         f"{format_number(diff.detectable, d, sign=False)} |")
            words.append(f"- {c.variant} − {baseline}, " + diff.words(header, better, d))
    lines += ["", *words, ""]
    tests = [(c.variant, seed, test) for c in comparisons for seed, test in c.mcnemar]
    if tests:
        lines += [f"Held-out accuracy per seed, exact McNemar test against {baseline} (the problems only one of the "
                  "two runs answered right; p is two-sided).", "",
                  f"| variant | seed | right only for the variant | right only for {baseline} | McNemar p |",
                  "|---|---|---|---|---|"]
        for variant, seed, test in tests:
            cells = ("scored on different problems", "-", "-") if test is None else (
                str(test.variant_only), str(test.baseline_only), f"{test.p:.3g}")
            lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _grid_cell(runs: Sequence[RunResult], key: str) -> str:
    if not runs:
        return "-"
    if all(not r.ok for r in runs):
        return "failed"
    values = [r.summary[key] for r in runs if r.usable and r.summary[key] is not None]
    if not values:
        return "diverged" if any(r.ok for r in runs) else "failed"
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


def grid_table(plan: Any, grid_results: Sequence[RunResult]) -> str:
    """Final validation metric per variant and rate (the mean over grid seeds); the chosen rate in bold."""
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
        shown = "-" if chosen is None else names.get(chosen, repr(chosen))
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


def _results_section(results: Sequence[RunResult], selection: Selection) -> list[str]:
    lines = ["## Results", "", results_table(results, list(selection.planned)), "",
             "Mean ± sample std over seeds. Held-out loss is the last evaluation on the held-out split (answer "
             "tokens only for chat data); accuracy is exact match of greedy answers on held-out problems; wall "
             "time is training time, summed over the segments of a resumed run; peak memory is the process "
             "peak (RSS on CPU, CUDA allocations on GPU).", ""]
    if selection.dropped:
        kept = sorted({s for seeds in selection.seeds.values() for s in seeds})
        lines += [f"Seed {', '.join(map(str, selection.dropped))} left out of every variant's numbers ("
                  + "; ".join(f"seed {s}: {why}" for s, why in selection.dropped.items())
                  + f"), so that all variants are compared on the same seeds ({', '.join(map(str, kept)) or 'none'}).",
                  ""]
    if capped := [f"{r.label} seed {r.seed}" for runs in selection.runs.values() for r in runs
                  if last_logged(r.log_history, (CONVERGED_KEY,)) == 0]:
        estimates = sum(r.summary["sharpness"] is not None for runs in selection.runs.values() for r in runs)
        lines += [f"Top Hessian eigenvalue: {len(capped)} of {estimates} estimates stopped at the cap of power "
                  f"iterations without converging ({', '.join(capped)}; `{CONVERGED_KEY}` 0 in their logs): read "
                  "them, and the means and differences that include them, as rough.", ""]
    if len({tuple(seeds) for seeds in selection.seeds.values()}) > 1:
        lines += ["Variants ran different seeds: " + "; ".join(
            f"{label} {', '.join(map(str, seeds)) or 'none'}" for label, seeds in selection.seeds.items())
            + ". Each paired difference uses the seeds both of its variants have.", ""]
    return lines


def blended_steps(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, r, inverse share) of every logged step whose blend weight r was above 0."""
    shares = dict(curve(log_history, INVERSE_SHARE_KEY))
    return [(step, r, shares[step]) for step, r in curve(log_history, BLEND_LOG_KEY) if r > 0 and step in shares]


def _spread(values: Sequence[float], show: Callable[[float], str] = lambda v: format_number(v, 3, sign=False)) -> str:
    """min to max, once if they print the same."""
    low, high = show(min(values)), show(max(values))
    return low if low == high else f"{low} to {high}"


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
            "max over the runs.", "",
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

    Files are read by their content, whatever their name. A folder written before rates were named in full
    (``-lr{rate:g}``) may hold a run under that old name next to the same run (phase, variant, seed and rate)
    under its current name: the current file wins, and the run is read once."""
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
    lines += _results_section(results, selection)
    lines += inverse_share_section(selection)
    for k, name in enumerate(baselines):
        lines += differences_section(selection, name, baselines[:k])
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
            print(f"[report] could not write {out / name}: {error}", file=sys.stderr)
    if failed:  # best effort: if even this fails, the report written above stays as it is
        text = "\n".join(lines)
        for name, caption, error in failed:
            text = text.replace(f"![{caption}]({name})", f"({caption}: {name} could not be written: {error})")
        try:
            write_text_atomically(path, text.rstrip() + "\n")
        except OSError:
            pass
    return path
