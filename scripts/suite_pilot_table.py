"""The suite's pilot, tabulated from its raw logs: for each candidate task, SmolLM2-135M-Instruct's exact-match
accuracy on 100 validation problems before training (one step at learning rate 0) and after the suite recipe's 48
LoRA steps of AdamW at 3e-4, one seed. Only validation splits are read.

The runs were made by ``scripts/suite_pilot.sh``; their ``run_done.json`` files are kept as
``docs/study/suite/pilot/<task>-<before|after>.json``.

    python scripts/suite_pilot_table.py [docs/study/suite/pilot]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PILOT = Path(__file__).resolve().parents[1] / "docs" / "study" / "suite" / "pilot"


def accuracy(run: dict) -> float:
    rows = run["accuracy_rows"]
    return sum(rows) / len(rows)


def train_losses(run: dict) -> list[float]:
    return [float(entry["loss"]) for entry in run["log_history"] if "loss" in entry]


def rows(folder: Path = PILOT) -> list[dict]:
    """One row per task with both runs: its data, accuracies before and after, and the first and last train loss."""
    found = []
    for before_file in sorted(folder.glob("*-before.json")):
        label = before_file.name.removesuffix("-before.json")
        after_file = folder / f"{label}-after.json"
        if not after_file.exists():
            continue
        before, after = (json.loads(f.read_text()) for f in (before_file, after_file))
        data = after["run_manifest"]["inputs"]["data"]
        losses = train_losses(after)
        found.append({"task": label, "generator": data["data generator"],
                      "settings": data.get("generator settings") or "", "n": len(after["accuracy_rows"]),
                      "before": accuracy(before), "after": accuracy(after), "first_loss": losses[0],
                      "last_loss": losses[-1]})
    return found


def table(found: list[dict]) -> str:
    lines = ["| task | generator settings | validation accuracy before | after 48 steps | train loss, step 1 -> 48 |",
             "|---|---|---|---|---|"]
    for r in found:
        lines.append(f"| {r['task']} | {r['settings'] or '(defaults)'} | {r['before']:.2f} | {r['after']:.2f} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows(Path(sys.argv[1]) if len(sys.argv) > 1 else PILOT)))
