"""Replay the blend of the low-bit study's low-bit runs to log the inverse share of the step each update took.

The study's runs logged, for 8-bit and 4-bit state, an inverse share read from the moments as they were stored
after the step (quantized again), not from the fp32 moments the update used. This replays steps 1-12 of each
of those runs with the current code, which logs the share of the step taken, and writes the per-step logs to
``docs/study/lowbit/replay/``, with a check that the replay trained as the study did: its loss at every
replayed step is compared with the study's raw log.

Why 12 steps reproduce the first 12 of the study's 48: the blend is 12 steps either way (``blend_fraction=0.25``
of 48 there, ``blend_steps=12`` here: the same switch rate, 1/12), the learning rate is constant, and the data
order of the first epoch (16 steps) depends on the seed alone; evaluation and checkpoints are left out, as they
do not touch the training steps.

    python scripts/replay_lowbit_inverse_share.py            # runs what is missing, then prints the table

About 3 minutes per run on 2 idle CPU cores (model load, the optimizer step's compile, 12 steps), 10 runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2_chainsum_lowbit_full.yaml"
RAW = ROOT / "docs" / "study" / "lowbit" / "raw"
OUT = ROOT / "docs" / "study" / "lowbit" / "replay"
WORK = ROOT / "outputs" / "lowbit_replay"
STEPS = 12
VARIANTS = {"dualadam_8bit": "blend_steps=12", "dualadam_4bit": "blend_steps=12,block_size=128"}
SEEDS = range(5)
SHARE, BLEND = "dualadam/inverse_share", "dualadam/blend"


def replay(label: str, seed: int) -> Path:
    """The replay's log file, running the replay first if it is missing."""
    log = OUT / f"replay-{label}-seed{seed}.json"
    if log.exists():
        return log
    folder = WORK / f"{label}-seed{seed}"
    command = [sys.executable, "-m", "dualadam_hf", "train", "--config", str(RECIPE), "--optim", label,
               "--optim_args", VARIANTS[label], "--max_steps", str(STEPS), "--eval_strategy", "no",
               "--accuracy_size", "0", "--accuracy_during_training", "false", "--save_strategy", "no",
               "--sharpness", "false", "--seed", str(seed), "--output_dir", str(folder), "--dataset_test_split",
               "test", "--overwrite_output_dir", "true"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    done = json.loads((folder / "run_done.json").read_text())
    steps = [e for e in done["log_history"] if "loss" in e and e.get("step", 0) <= STEPS]
    OUT.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps({"label": label, "seed": seed, "command": command[1:], "log_history": steps},
                              indent=1) + "\n")
    return log


def study_losses(label: str, seed: int) -> dict[int, float]:
    done = json.loads((RAW / f"final-{label}-seed{seed}.json").read_text())
    return {e["step"]: e["loss"] for e in done["log_history"] if "loss" in e and e["step"] <= STEPS}


def summary() -> list[str]:
    """The report's inverse-share columns for the replayed runs, and how far each replay's losses are from the
    study's."""
    lines = ["| variant | runs | first step: r | first step: share | last blended step | its r | its share | "
             "share / r over the blend | largest loss difference from the study, steps 1-12 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in VARIANTS:
        firsts, lasts, ratios, gaps, last_step, first_r, last_r = [], [], [], [], 0, 0.0, 0.0
        for seed in SEEDS:
            history = json.loads((OUT / f"replay-{label}-seed{seed}.json").read_text())["log_history"]
            blended = [e for e in history if e[BLEND] > 0]
            firsts.append(blended[0][SHARE])
            first_r = blended[0][BLEND]
            lasts.append(blended[-1][SHARE])
            last_step, last_r = blended[-1]["step"], blended[-1][BLEND]
            ratios += [e[SHARE] / e[BLEND] for e in blended]
            study = study_losses(label, seed)
            gaps.append(max(abs(e["loss"] - study[e["step"]]) for e in history))
        span = lambda xs: f"{min(xs):.3g} to {max(xs):.3g}"
        lines.append(f"| {label} | {len(SEEDS)} | {first_r:.3f} | {span(firsts)} | {last_step} | {last_r:.3f} | "
                     f"{span(lasts)} | {span(ratios)} | {max(gaps):.3g} |")
    return lines


def main() -> None:
    for label in VARIANTS:
        for seed in SEEDS:
            replay(label, seed)
    print("\n".join(summary()))


if __name__ == "__main__":
    main()
