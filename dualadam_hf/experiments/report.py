"""The comparison report: tables with mean ± std and paired 95% intervals, the learning-rate grid, curves.

Every number is read back from a run's log history (``run_done.json``); nothing is recomputed from the
model, so the report cannot disagree with the logs.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import Interval, mean_std, paired_bootstrap_interval, paired_t_interval

# (summary key, log-history keys (first found wins), column header, digits, better)
METRICS: tuple[tuple[str, tuple[str, ...], str, int, str], ...] = (
    ("heldout_loss", ("eval_loss",), "held-out loss", 4, "lower"),
    ("heldout_accuracy", ("eval_accuracy",), "held-out accuracy", 3, "higher"),
    ("final_train_loss", ("loss",), "final train loss", 4, "lower"),
    ("wall_time_s", ("train_wall_time_s", "train_runtime"), "train wall time (s)", 1, "lower"),
    ("peak_memory_mb", ("peak_memory_mb",), "peak memory (MB)", 0, "lower"),
    ("sharpness", ("sharpness/top_eigenvalue",), "top Hessian eigenvalue", 4, "lower"),
)
SUMMARY_OF = {"eval_loss": "heldout_loss", "eval_accuracy": "heldout_accuracy"}  # select_metric -> summary key
INVERSE_SHARE_KEY = "dualadam/inverse_share"


def last_logged(log_history: Sequence[dict[str, Any]], keys: Sequence[str]) -> float | None:
    """The value of the first of ``keys`` in the last log entry that has it (None if none has it)."""
    return next((float(e[key]) for key in keys for e in reversed(log_history) if key in e), None)


def curve(log_history: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for every log entry holding ``key``; a step logged twice keeps its last value."""
    return sorted({int(e["step"]): float(e[key]) for e in log_history if key in e and "step" in e}.items())


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
    summary: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.summary = {name: last_logged(self.log_history, keys) for name, keys, *_ in METRICS}

    @property
    def segments(self) -> int:
        return int(last_logged(self.log_history, ("train_segments",)) or 1)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "phase": self.phase, "lr": self.lr, "ok": self.ok,
                "error": self.error, "summary": self.summary, "accuracy_rows": self.accuracy_rows,
                "log_history": self.log_history}


def group(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The finished runs by variant, in order of first appearance."""
    groups: dict[str, list[RunResult]] = {}
    for result in (r for r in results if r.ok):
        groups.setdefault(result.label, []).append(result)
    return groups


def format_cell(values: Sequence[float | None], digits: int) -> str:
    """``mean ± std`` with ``digits`` decimals (std left out for one run, '-' for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(results: Sequence[RunResult]) -> str:
    """One row per variant; columns that no run logged (e.g. sharpness when off) are left out."""
    groups = group(results)
    columns = [m for m in METRICS if any(r.summary[m[0]] is not None for runs in groups.values() for r in runs)]
    lines = ["| variant | runs | " + " | ".join(m[2] for m in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for label, runs in groups.items():
        cells = [format_cell([r.summary[name] for r in runs], digits) for name, _, _, digits, _ in columns]
        resumed = sum(r.segments > 1 for r in runs)
        note = f" ({resumed} resumed: wall time summed over segments)" if resumed else ""
        lines.append(f"| {label} | {len(runs)}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def intervals_table(results: Sequence[RunResult]) -> tuple[str, list[str]]:
    """Every variant against the first one, paired by seed: the table and one sentence per interval."""
    groups = group(results)
    labels = list(groups)
    if len(labels) < 2:
        return "", []
    baseline = {r.seed: r for r in groups[labels[0]]}
    rows: list[tuple[str, str, Interval, str, int]] = []  # (variant, metric header, interval, better, digits)
    for label in labels[1:]:
        pairs = [(r, baseline[r.seed]) for r in groups[label] if r.seed in baseline]
        if not pairs:
            continue
        for name, _, header, digits, better in METRICS:
            if name in ("wall_time_s", "peak_memory_mb"):
                continue
            if name == "heldout_accuracy" and all(a.accuracy_rows and b.accuracy_rows for a, b in pairs):
                interval = paired_bootstrap_interval([a.accuracy_rows for a, _ in pairs],
                                                     [b.accuracy_rows for _, b in pairs])
            else:
                diffs = [a.summary[name] - b.summary[name] for a, b in pairs
                         if a.summary[name] is not None and b.summary[name] is not None]
                if not diffs:
                    continue
                interval = paired_t_interval(diffs)
            rows.append((label, header, interval, better, digits))
    if not rows:
        return "", []
    lines = [f"| variant − {labels[0]} | metric | difference | 95% interval | seeds | method |",
             "|---|---|---|---|---|---|"]
    words = []
    for label, header, iv, better, digits in rows:
        d = digits + 1
        span = "-" if iv.low is None else f"[{iv.low:+.{d}f}, {iv.high:+.{d}f}]"
        lines.append(f"| {label} | {header} | {iv.mean:+.{d}f} | {span} | {iv.n} | {iv.method} |")
        words.append(f"{label} − {labels[0]}, " + iv.words(header, better))
    return "\n".join(lines), words


def grid_table(plan: Any, grid_results: Sequence[RunResult]) -> str:
    key = SUMMARY_OF[plan.select_metric]
    lines = ["| variant | " + " | ".join(f"lr {lr:g}" for lr in plan.lr_grid) + " | chosen |",
             "|" + "---|" * (len(plan.lr_grid) + 2)]
    for variant in plan.variants:
        cells = []
        chosen = plan.chosen_lr.get(variant.label)
        for lr in plan.lr_grid:
            run = next((r for r in grid_results if r.label == variant.label and r.lr == lr), None)
            value = None if run is None or not run.ok else run.summary[key]
            text = "failed" if run is not None and not run.ok else ("-" if value is None else f"{value:.4f}")
            cells.append(f"**{text}**" if chosen == lr else text)
        lines.append(f"| {variant.label} | " + " | ".join(cells) + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    return "\n".join(lines)


def plot_curves(results: Sequence[RunResult], key: str, title: str, path: Path, *, log_y: bool = False) -> bool:
    """Mean curve per variant over its seeds (band: min to max); False if fewer than 2 points were logged."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for label, runs in group(results).items():
        curves = [dict(curve(r.log_history, key)) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if len(steps) < 2:
            continue
        values = [[c[s] for c in curves] for s in steps]
        if log_y:  # a share is 0 past the blend (and always without one): a log axis shows the positive part
            steps, values = [s for s, v in zip(steps, values) if min(v) > 0], [v for v in values if min(v) > 0]
            if len(steps) < 2:
                continue
        (line,) = axes.plot(steps, [statistics.fmean(v) for v in values], marker="o" if len(steps) < 30 else None,
                            ms=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                              alpha=0.2)
        drawn = True
    if drawn:
        axes.set(xlabel="optimizer step", ylabel=key, title=title, yscale="log" if log_y else "linear")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


def write_report(plan: Any, results: Sequence[RunResult], grid_results: Sequence[RunResult] = (), *,
                 seconds: float = 0.0) -> Path:
    """Write report.md, the plots and raw/<phase>-<variant>-seed<k>[-lr<lr>].json; return report.md's path."""
    out = Path(plan.output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for r in [*grid_results, *results]:
        name = f"{r.phase}-{r.label}-seed{r.seed}" + ("" if r.lr is None else f"-lr{r.lr:g}")
        (raw / f"{''.join(c if c.isalnum() or c in '._=-' else '_' for c in name)}.json").write_text(
            json.dumps(r.to_json(), indent=1) + "\n", encoding="utf-8")
    lines = [f"# Optimizer comparison: {plan.config.stem}", "",
             "Variants (the first one is the baseline of the paired differences):", ""]
    for v in plan.variants:
        extra = ", ".join([f"optim_args `{v.optim_args_text}`"] * bool(v.optim_args)
                          + [f"`{k}={val}`" for k, val in v.settings.items()])
        lines.append(f"- **{v.label}**: `{v.optim}`" + (f" with {extra}" if extra else ""))
    lines += ["", f"Recipe `{plan.config.name}`; overrides `{' '.join(plan.overrides) or 'none'}`; seeds "
              f"{', '.join(map(str, plan.seeds))}; held-out results on the `{plan.test_split}` split.", ""]
    if plan.lr_grid:
        lines += [f"## Learning rates, chosen on the `{plan.validation_split}` split", "",
                  f"Final {plan.select_metric} of one run per rate (seed {plan.grid_seed}); the chosen rate is "
                  "bold. The test split is not read in this phase.", "", grid_table(plan, grid_results), ""]
    lines += ["## Results", "", results_table(results), "",
              "Mean ± sample std over seeds. Held-out loss is the last evaluation on the held-out split (answer "
              "tokens only for chat data); accuracy is exact match of greedy answers on held-out problems; wall "
              "time is training time, summed over the segments of a resumed run; peak memory is the process "
              "peak (RSS on CPU, CUDA allocations on GPU).", ""]
    table, words = intervals_table(results)
    if table:
        lines += ["## Paired differences", "",
                  "Each variant minus the baseline, paired by seed; 95% intervals (Student's t over the per-seed "
                  "differences; for accuracy a bootstrap over seeds and held-out problems).", "", table, "",
                  *[f"- {w}" for w in words], ""]
    lines += [f"- **failed**: {r.label} seed {r.seed} ({r.phase}): {r.error}"
              for r in [*grid_results, *results] if not r.ok]
    trained = sum(r.summary["wall_time_s"] or 0.0 for r in [*grid_results, *results] if r.ok)
    lines += [f"- Training time of all runs, grid included: {trained:.0f} s; this invocation: {seconds:.0f} s "
              "(finished runs that were reused cost nothing)."]
    plots = (("loss", "train_loss.png", "Train loss", False), ("eval_loss", "eval_loss.png", "Held-out loss", False),
             ("eval_accuracy", "eval_accuracy.png", "Held-out accuracy", False),
             (INVERSE_SHARE_KEY, "inverse_share.png", "Inverse share of the update", True))
    drawn = [f"![{caption}]({name})" for key, name, caption, log_y in plots
             if plot_curves(results, key, f"{caption} (mean over seeds, band: min-max)", out / name, log_y=log_y)]
    lines += [line for image in drawn for line in ("", image)]
    if not drawn and results:
        lines += ["", "(No plots: matplotlib is not installed, or fewer than two points were logged.)"]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
