"""The suite report: each pre-specified comparison per task and pooled across tasks, with forest plots.

Every number comes from the tasks' own results (the runs' logs, as each task's report reads them): per task the
paired differences over its seeds (:func:`.report.compare_to`, the same runs and seeds that task's report keeps),
their mean and standard error; across tasks the random-effects pool of :func:`.stats.random_effects`. The
comparisons are the families of :func:`.report.families` over all the suite's variants, each pooled over the
tasks that ran both of its variants; Holm's correction runs within each family, over its comparisons and both
held-out metrics. suite_report.md, then suite_summary.json, then the plots, each file written atomically.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .report import (
    METRICS,
    RunResult,
    _matplotlib_available,
    _replace_atomically,
    _span,
    compare_to,
    families,
    select,
    write_text_atomically,
)
from .stats import ALPHA, PairedDifference, Pooled, format_number, holm, random_effects

REPORT_FILE = "suite_report.md"
SUMMARY_FILE = "suite_summary.json"
# The pooled outcomes: held-out accuracy (the main one) and held-out loss, compare's pre-specified metrics.
POOLED_METRICS = ("heldout_accuracy", "heldout_loss")


@dataclass(frozen=True)
class TaskDifference:
    """One task's paired differences of a comparison (None where no seed paired), and why the task is not pooled
    ("" where it is)."""

    task: str
    diff: PairedDifference | None
    why: str = ""

    @property
    def se(self) -> float | None:
        """The standard error of the task's mean difference, sd / sqrt(n); None without an interval."""
        d = self.diff
        return None if d is None or d.low is None or d.sd is None else d.sd / math.sqrt(d.n)


@dataclass(frozen=True)
class PooledTest:
    """One pre-specified comparison on one metric across the tasks: the per-task differences, their pool (None,
    with the reason in ``no_pool``, where fewer than 2 tasks have a standard error), and its p after Holm's
    correction within the family of ``size`` pooled tests."""

    family: str
    variant: str
    baseline: str
    metric: str  # summary key
    header: str
    better: str
    digits: int
    tasks: tuple[TaskDifference, ...]
    pooled: Pooled | None
    no_pool: str = ""
    holm_p: float | None = None
    size: int = 0

    @property
    def pooled_tasks(self) -> list[TaskDifference]:
        return [t for t in self.tasks if not t.why]

    @property
    def detectable_corrected(self) -> float | None:
        """The pooled difference the test at the family's Bonferroni level 0.05/m finds with 80% power."""
        return None if self.pooled is None or not self.size else self.pooled.detectable_at(ALPHA / self.size)

    @property
    def verdict(self) -> str:
        if self.pooled is None:
            return f"no pooled result: {self.no_pool}"
        if self.holm_p is None or self.holm_p >= ALPHA:
            return "no difference shown"
        return "better" if (self.pooled.mean < 0) == (self.better == "lower") else "worse"


def _metric(key: str) -> tuple[str, int, str]:
    """(header, digits, better) of a summary key."""
    return next((header, digits, better) for name, _, header, digits, better in METRICS if name == key)


def task_difference(task: str, results: Sequence[RunResult], order: Sequence[str], variant: str, baseline: str,
                    metric: str) -> TaskDifference:
    """``variant`` minus ``baseline`` on ``metric`` over one task's kept seeds, as that task's report pairs them."""
    header = _metric(metric)[0]
    selection = select(results, order)
    comparison = next((c for c in compare_to(selection, baseline) if c.variant == variant), None)
    diff = None if comparison is None else next((d for h, d, *_ in comparison.metrics if h == header), None)
    if diff is None:
        return TaskDifference(task, None, "no seed on which both finished with a value")
    if diff.low is None:
        return TaskDifference(task, diff, diff.no_interval)
    return TaskDifference(task, diff)


def pool(tasks: Sequence[TaskDifference]) -> tuple[Pooled | None, str]:
    """The random-effects pool of the tasks with a standard error, or None and why there is none."""
    usable = [t for t in tasks if not t.why]
    if len(usable) < 2:
        have = "no task has" if not usable else f"only {usable[0].task} has"
        return None, f"{have} a standard error over its seeds; pooling needs 2 or more such tasks"
    return random_effects([t.diff.mean for t in usable], [t.se for t in usable]), ""


def pooled_tests(variants: Sequence[Any], results: dict[str, tuple[Sequence[str], Sequence[RunResult]]]
                 ) -> list[PooledTest]:
    """Every pre-specified comparison (the families over all ``variants``) on both held-out metrics, pooled over
    the tasks that ran both of its variants; ``results``: per task, its variants' labels and its runs. Holm's
    correction runs within each family over the tests that have a pooled p."""
    tests = []
    for family in families(variants, variants[0].label) if variants else []:
        rows = []
        for variant, baseline in family.pairs:
            for metric in POOLED_METRICS:
                header, digits, better = _metric(metric)
                per_task = tuple(task_difference(task, runs, order, variant, baseline, metric)
                                 for task, (order, runs) in results.items() if variant in order and baseline in order)
                pooled, why = pool(per_task)
                rows.append(PooledTest(family.name, variant, baseline, metric, header, better, digits, per_task,
                                       pooled, why))
        adjusted = iter(holm([t.pooled.t_p for t in rows if t.pooled is not None]))
        size = sum(t.pooled is not None for t in rows)
        tests += [replace(t, holm_p=next(adjusted) if t.pooled else None, size=size) for t in rows]
    return tests


# --- markdown ------------------------------------------------------------------------------------------------

def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _signs(means: Sequence[float]) -> str:
    return f"{sum(m > 0 for m in means)} +, {sum(m < 0 for m in means)} −"


def forest_file(test: PooledTest) -> str:
    """The forest plot's file of a comparison (both metrics in one figure)."""
    name = f"forest-{test.variant}-vs-{test.baseline}"
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name) + ".png"


def _header(suite: Any, results: dict[str, tuple[Sequence[str], Sequence[RunResult]]]) -> list[str]:
    first = suite.variants[0].label
    lines = [f"# Suite comparison: {suite.config.stem}", "",
             f"Recipe `{suite.config.name}` on {len(suite.tasks)} tasks; overrides "
             f"`{' '.join(suite.overrides) or 'none'}`. Each task is a "
             "comparison of its own, with its own report (linked); this report pools the pre-specified comparisons "
             f"across the tasks: {'; '.join(f'{f.name}, {f.what}' for f in families(suite.variants, first))}. "
             "Differences are paired by seed within a task.", "",
             "| task | data | generator settings | variants | seeds kept | report |", "|---|---|---|---|---|---|"]
    for task, plan in zip(suite.tasks, suite.plans):
        order, runs = results.get(task.label, ([], []))
        kept = sorted({s for group in select(runs, order).runs.values() for s in (r.seed for r in group)})
        lines.append(f"| {task.label} | `{task.dataset_name}` | `{task.dataset_config or 'none'}` | "
                     f"{', '.join(v.label for v in plan.variants)} | {', '.join(map(str, kept)) or 'none'} | "
                     f"[{task.label}/report.md]({task.label}/report.md) |")
    lines += ["", "Variants:", ""]
    for v in suite.variants:
        extra = ", ".join([f"optim_args `{v.optim_args_text}`"] * bool(v.optim_args)
                          + [f"`{k}={val}`" for k, val in v.settings.items()])
        where = "every task" if v.tasks is None else ", ".join(v.tasks)
        lines.append(f"- **{v.label}**: `{v.optim}`" + (f" with {extra}" if extra else "") + f"; on {where}")
    return lines + [""]


METHOD = (
    "Per task: the mean of the per-seed differences d and its standard error s = sd / sqrt(n) (paired t over the "
    "task's n seeds; the 95% interval is the task's own, as in its report). Across the k tasks with a standard "
    "error: a random-effects model, task i's true difference drawn around the pooled one with between-task "
    "variance tau². DerSimonian-Laird: weights w = 1/s², Cochran's Q = Σ w (d − d_w)², tau² = max(0, (Q − (k − 1)) "
    "/ (Σw − Σw²/Σw)), I² = max(0, (Q − (k − 1)) / Q); the pooled mean weights each task by w* = 1/(s² + tau²). "
    "Its 95% interval is Hartung-Knapp-Sidik-Jonkman's: mean ± t(0.975, k − 1) · SE, SE² = max(1, q) / Σw* with "
    "q = Σ w* (d − mean)² / (k − 1), and the t test on the same SE gives p; with few tasks the normal interval "
    "of DerSimonian-Laird alone covers far less than 95%. Sign test: exact binomial on the signs of the task "
    "means. Holm's correction runs within each family (its comparisons × both metrics); the verdict follows the "
    "Holm p. Detectable: the true pooled difference a two-sided t test with k − 1 degrees of freedom finds with "
    "80% power, λ · SE, λ the noncentrality of a noncentral t with that power (at 5%, and at the family's "
    "corrected level 0.05/m). A task without a standard error (one seed, or differences all equal) is shown but "
    "not pooled. The pool estimates the average difference over tasks like these; a task's own interval says "
    "what happened on that task.")


def summary_table(tests: Sequence[PooledTest]) -> list[str]:
    lines = ["| family | comparison | metric | tasks | pooled mean | 95% interval (HKSJ) | tau² | I² | task signs | "
             "sign test p | t test p | Holm p | detectable at 0.05/m | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        d, p = t.digits + 1, t.pooled
        if p is None:
            lines.append(f"| {t.family} | {t.variant} − {t.baseline} | {t.header} | {len(t.pooled_tasks)} | - | - | - "
                         f"| - | - | - | - | - | - | {t.verdict} |")
            continue
        lines.append(f"| {t.family} | {t.variant} − {t.baseline} | {t.header} | {p.k} | {format_number(p.mean, d)} | "
                     f"{_span(p.low, p.high, d)} | {format_number(p.tau2, d + 1, sign=False)} | {p.i2:.0%} | "
                     f"{_signs(p.means)} | {_p(p.sign_p)} | {_p(p.t_p)} | {_p(t.holm_p)} | "
                     f"{format_number(t.detectable_corrected, d, sign=False)} | {t.verdict} |")
    return lines


def comparison_section(tests: Sequence[PooledTest], plotted: bool) -> list[str]:
    """One comparison's tables (one per metric: a row per task, then the pooled row) and its forest plot."""
    first = tests[0]
    lines = [f"## {first.variant} − {first.baseline} ({first.family})", ""]
    for t in tests:
        d, p = t.digits + 1, t.pooled
        weights = dict(zip([x.task for x in t.pooled_tasks], p.weights)) if p else {}
        lines += [f"### {t.header}", "", "| task | seeds | mean difference | 95% interval (paired t) | standard "
                  "error | weight |", "|---|---|---|---|---|---|"]
        for x in t.tasks:
            n = "-" if x.diff is None else str(x.diff.n)
            mean = "-" if x.diff is None else format_number(x.diff.mean, d)
            span = "-" if x.diff is None else _span(x.diff.low, x.diff.high, d)
            weight = f"{weights[x.task]:.0%}" if x.task in weights else f"not pooled: {x.why}"
            lines.append(f"| {x.task} | {n} | {mean} | {span} | {format_number(x.se, d + 1, sign=False)} | {weight} |")
        if p is None:
            lines += ["", f"No pooled result: {t.no_pool}.", ""]
            continue
        lines.append(f"| **pooled** (random effects) | {p.k} tasks | **{format_number(p.mean, d)}** | "
                     f"**{_span(p.low, p.high, d)}** (HKSJ, t with {p.k - 1} df) | "
                     f"{format_number(p.hk_se, d + 1, sign=False)} | 100% |")
        lines += ["", f"tau² = {format_number(p.tau2, d + 1, sign=False)}, I² = {p.i2:.0%} (Q = {p.q:.3g} on {p.k - 1} "
                  f"df); task signs {_signs(p.means)}, sign test p = {_p(p.sign_p)}; t test p = {_p(p.t_p)}, Holm p = "
                  f"{_p(t.holm_p)} over the {t.size} {t.family} test{'s' * (t.size != 1)}: {t.verdict}. Detectable at "
                  f"80% power: ±{format_number(p.detectable, d, sign=False)} at 5%, "
                  f"±{format_number(t.detectable_corrected, d, sign=False)} at 0.05/{t.size}.", ""]
    if plotted:
        lines += [f"![forest plot: {first.variant} − {first.baseline}]({forest_file(first)})", ""]
    return lines


def _grouped(tests: Sequence[PooledTest]) -> list[list[PooledTest]]:
    groups: dict[tuple[str, str, str], list[PooledTest]] = {}
    for t in tests:
        groups.setdefault((t.family, t.variant, t.baseline), []).append(t)
    return list(groups.values())


def _run_notes(results: dict[str, tuple[Sequence[str], Sequence[RunResult]]], seconds: float) -> list[str]:
    lines = []
    for task, (_, runs) in results.items():
        failed = [f"{r.label} seed {r.seed}" for r in runs if not r.ok]
        diverged = [f"{r.label} seed {r.seed}" for r in runs if r.ok and not r.usable]
        for kind, names in (("failed", failed), ("diverged", diverged)):
            if names:
                lines.append(f"- **{task}**: {kind}: {', '.join(names)}; its seed is left out of that task's numbers "
                             "(see its report).")
    return lines + [f"- This invocation: {seconds:.0f} s (finished runs that were reused cost nothing)."]


# --- JSON --------------------------------------------------------------------------------------------------

def _task_json(x: TaskDifference) -> dict[str, Any]:
    d = x.diff
    return {"task": x.task, "pooled": not x.why, "why_not_pooled": x.why or None,
            "n": None if d is None else d.n, "differences": None if d is None else list(d.differences),
            "mean": None if d is None else d.mean, "sd": None if d is None else d.sd, "se": x.se,
            "low": None if d is None else d.low, "high": None if d is None else d.high}


def _pooled_json(t: PooledTest) -> dict[str, Any] | None:
    p = t.pooled
    if p is None:
        return None
    return {"k": p.k, "mean": p.mean, "se": p.se, "hk_se": p.hk_se, "low": p.low, "high": p.high, "q": p.q,
            "tau2": p.tau2, "i2": p.i2, "t_p": p.t_p, "sign_p": p.sign_p, "holm_p": t.holm_p, "family_size": t.size,
            "weights": list(p.weights), "detectable": p.detectable, "detectable_corrected": t.detectable_corrected,
            "verdict": t.verdict}


def summary_json(suite: Any, tests: Sequence[PooledTest]) -> dict[str, Any]:
    return {
        "recipe": suite.config.name,
        "method": {"pooling": "random effects, DerSimonian-Laird tau2",
                   "interval": "Hartung-Knapp-Sidik-Jonkman t, k-1 df, variance factor max(1, q)",
                   "per_task": "paired t over seeds: mean and standard error sd/sqrt(n)",
                   "correction": "Holm within each family", "power": 0.8, "alpha": ALPHA},
        "tasks": [{"label": t.label, "dataset_name": t.dataset_name, "dataset_config": t.dataset_config,
                   "variants": [v.label for v in plan.variants], "seeds": plan.seeds,
                   "report": f"{t.label}/report.md"} for t, plan in zip(suite.tasks, suite.plans)],
        "comparisons": [{"family": t.family, "variant": t.variant, "baseline": t.baseline, "metric": t.metric,
                         "better": t.better, "tasks": [_task_json(x) for x in t.tasks], "pooled": _pooled_json(t),
                         "no_pool": t.no_pool or None} for t in tests],
    }


# --- plots -------------------------------------------------------------------------------------------------

def plot_forest(tests: Sequence[PooledTest], path: Path) -> None:
    """A forest plot per metric of one comparison, side by side: each task's mean difference with its 95%
    interval (marker area by its weight), the pooled mean as a diamond spanning its interval, and 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(t.tasks) for t in tests) + 2
    figure, axes = plt.subplots(1, len(tests), figsize=(5.0 * len(tests), 0.42 * rows + 1.4), squeeze=False)
    try:
        for axes_, t in zip(axes[0], tests):
            _draw_forest(axes_, t)
        figure.suptitle(f"{tests[0].variant} − {tests[0].baseline}: per task and pooled (95% intervals)", fontsize=10)
        figure.tight_layout()
        _replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(figure)


def _draw_forest(axes: Any, t: PooledTest) -> None:
    from matplotlib.patches import Polygon
    from matplotlib.ticker import MaxNLocator

    weights = dict(zip([x.task for x in t.pooled_tasks], t.pooled.weights)) if t.pooled else {}
    labels = []
    for row, x in enumerate(t.tasks):
        y = len(t.tasks) - row
        labels.append((y, f"{x.task} (n={x.diff.n})" if x.diff else x.task))
        if x.diff is None:
            continue
        if x.diff.low is not None:
            axes.plot([x.diff.low, x.diff.high], [y, y], color="tab:blue", lw=1.2)
        size = 20 + 180 * weights.get(x.task, 0.0)
        axes.scatter([x.diff.mean], [y], s=size, marker="s" if x.task in weights else "x", color="tab:blue",
                     zorder=3)
    if t.pooled is not None:
        p = t.pooled
        axes.add_patch(Polygon([(p.low, 0), (p.mean, 0.3), (p.high, 0), (p.mean, -0.3)], closed=True,
                               color="tab:red", alpha=0.8))
        labels.append((0, f"pooled (k={p.k})"))
    axes.axvline(0.0, color="grey", lw=0.8, ls="--")
    axes.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
    axes.set_ylim(-1, len(t.tasks) + 1)
    axes.xaxis.set_major_locator(MaxNLocator(6))  # few ticks: differences print long
    axes.set_xlabel(f"{t.header}: difference ({t.better} is better)", fontsize=9)
    axes.grid(alpha=0.3, axis="x")


# --- the report --------------------------------------------------------------------------------------------

def write_suite_report(suite: Any, task_results: dict[str, Sequence[RunResult]], *, seconds: float = 0.0) -> Path:
    """Write suite_report.md, suite_summary.json and a forest plot per comparison into the suite's folder; return
    the report's path. ``task_results``: each task's runs (by task label), as its comparison returned them."""
    out = Path(suite.output_dir)
    results = {task.label: ([v.label for v in plan.variants], task_results.get(task.label, []))
               for task, plan in zip(suite.tasks, suite.plans)}
    tests = pooled_tests(suite.variants, results)
    groups = _grouped(tests)
    plotting = bool(groups) and _matplotlib_available()
    lines = _header(suite, results) + ["## Method", "", METHOD, ""]
    if tests:
        lines += ["## Pooled comparisons", "", *summary_table(tests), ""]
        for group in groups:
            lines += comparison_section(group, plotting)
    else:
        lines += ["No pre-specified comparison: the suite has a single variant.", ""]
    if groups and not plotting:
        lines += ["(No forest plots: matplotlib is not installed.)", ""]
    lines += _run_notes(results, seconds)
    path = out / REPORT_FILE
    write_text_atomically(path, "\n".join(lines).rstrip() + "\n")
    write_text_atomically(out / SUMMARY_FILE, json.dumps(summary_json(suite, tests), indent=1) + "\n")
    for group in groups if plotting else []:
        try:
            plot_forest(group, out / forest_file(group[0]))
        except OSError as error:  # the tables are saved; a plot is best effort
            print(f"[suite] could not write {out / forest_file(group[0])}: {error.strerror or error}", file=sys.stderr)
    return path
