"""The README's main job, for real: `dualadam-hf compare` on SmolLM2 from the wheel, offline, smoke size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_compare_runs_offline_with_the_readme_command(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "dualadam_hf.cli", "compare", "--config", "recipes/smollm2_math_lora.yaml",
           "--optims", "adamw_torch,dualadam", "--seeds", "1", "--smoke", "--no-sharpness",
           "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| adamw_torch |" in report and "| dualadam |" in report
    for optim in ("adamw_torch", "dualadam"):
        state = json.loads((out / "runs" / f"{optim}-seed0" / "trainer_state.json").read_text())
        losses = [e["loss"] for e in state["log_history"] if "loss" in e]
        assert losses and all(loss == loss and loss < 10 for loss in losses)  # finite, a real LM loss
    dual = json.loads((out / "runs" / "dualadam-seed0" / "trainer_state.json").read_text())
    assert any("dualadam/blend" in e for e in dual["log_history"])
    assert (out / "train_loss.png").is_file() and (out / "eval_loss.png").is_file()
