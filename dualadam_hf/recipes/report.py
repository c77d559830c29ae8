"""The comparison report: a Markdown table (mean ± std over seeds) and loss-curve plots, from the runs' logs.

Every number comes from a run's `trainer_state.json` log history, read back here; nothing is recomputed
from the model, so the report cannot disagree with the logs.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (summary key, log-history key, column header, digits). The last logged value of each key is the run's.
METRICS: tuple[tuple[str, str, str, int], ...] = (
    ("heldout_loss", "eval_loss", "held-out loss", 4),
    ("heldout_accuracy", "eval_accuracy", "held-out accuracy", 3),
    ("final_train_loss", "loss", "final train loss", 4),
    ("wall_time_s", "train_runtime", "train wall time (s)", 1),
    ("peak_memory_mb", "peak_memory_mb", "peak memory (MB)", 0),
    ("sharpness", "sharpness/top_eigenvalue", "sharpness (top Hessian eigenvalue)", 4),
)


def last_logged(log_history: Sequence[dict[str, Any]], key: str) -> float | None:
    """The value of `key` in the last log entry that has it (None if no entry has it)."""
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None


def summarize(log_history: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """One run's table row: the last logged value of each metric."""
    return {name: last_logged(log_history, key) for name, key, _, _ in METRICS}


def curve(log_history: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for every log entry holding `key`; a step logged twice keeps its last value."""
    points = {int(e["step"]): float(e[key]) for e in log_history if key in e and "step" in e}
    return sorted(points.items())


@dataclass
class RunResult:
    optim: str
    seed: int
    log_history: list[dict[str, Any]]
    ok: bool = True
    error: str = ""

    @property
    def summary(self) -> dict[str, float | None]:
        return summarize(self.log_history)

    def to_json(self) -> dict[str, Any]:
        return {
            "optim": self.optim,
            "seed": self.seed,
            "ok": self.ok,
            "error": self.error,
            "summary": self.summary,
            "log_history": self.log_history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(data["optim"], int(data["seed"]), list(data["log_history"]), bool(data["ok"]), data["error"])


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: Sequence[float], digits: int) -> str:
    """`mean ± std` with `digits` decimals (std left out for one run, '-' for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def group_by_optim(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(result.optim, []).append(result)
    return groups


def markdown_table(results: Sequence[RunResult]) -> str:
    """One row per optimizer; columns that no run logged (e.g. sharpness when off) are left out."""
    ok = [r for r in results if r.ok]
    columns = [m for m in METRICS if any(r.summary[m[0]] is not None for r in ok)]
    header = "| optimizer | runs | " + " | ".join(m[2] for m in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for optim, runs in group_by_optim(ok).items():
        cells = [format_cell([r.summary[name] for r in runs], digits) for name, _, _, digits in columns]
        lines.append(f"| {optim} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: Sequence[RunResult], key: str, title: str, path: Path) -> bool:
    """Mean curve per optimizer over its seeds (band: min to max); False if no run logged `key`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for optim, runs in group_by_optim([r for r in results if r.ok]).items():
        curves = [dict(curve(r.log_history, key)) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(v) for v in values]
        marker = "o" if len(steps) < 30 else None
        (line,) = axes.plot(steps, mean, marker=marker, ms=3, label=f"{optim} (n={len(runs)})")
        if len(runs) > 1:
            low, high = [min(v) for v in values], [max(v) for v in values]
            axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        drawn = True
    if drawn:
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(key)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def write_report(
    report_dir: str | Path, results: Sequence[RunResult], *, title: str, notes: Sequence[str] = ()
) -> Path:
    """Write report.md, train_loss.png, eval_loss.png and runs/<optim>-seed<k>.json; return report.md's path."""
    report_dir = Path(report_dir)
    (report_dir / "runs").mkdir(parents=True, exist_ok=True)
    for result in results:
        path = report_dir / "runs" / f"{result.optim}-seed{result.seed}.json"
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    lines = [f"# {title}", "", markdown_table(results), ""]
    lines += [
        "Mean ± sample std over seeds. Held-out loss is the last evaluation on the held-out split (answer tokens",
        "only for chat data); accuracy is exact match of greedy answers on held-out rows; train loss is the last",
        "logged training loss; wall time is the Trainer's `train_runtime` (training and its periodic evaluations);",
        "peak memory is the process peak (RSS on CPU, CUDA allocations on GPU). Raw logs: `runs/*.json`.",
        "",
    ]
    failed = [r for r in results if not r.ok]
    for r in failed:
        lines.append(f"- **failed**: {r.optim} seed {r.seed}: {r.error}")
    lines += [f"- {note}" for note in notes]
    for key, name, caption in (("loss", "train_loss.png", "Train loss"), ("eval_loss", "eval_loss.png", "Eval loss")):
        if plot_curves(results, key, f"{caption} (mean over seeds, band: min-max)", report_dir / name):
            lines += ["", f"![{caption}]({name})"]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
