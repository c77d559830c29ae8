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
    cmd = [sys.executable, "-m", "dualadam_hf", "compare", "--config", "recipes/smollm2_chainsum_lora.yaml",
           "--smoke", "--no-sharpness", "--output_dir", str(out)]
    assert "dualadam-hf compare --config recipes/smollm2_chainsum_lora.yaml" in (ROOT / "README.md").read_text()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "report.md").read_text()
    for label in ("adamw_torch", "matched-warmup", "dualadam"):
        assert f"| {label} |" in report
        record = json.loads((out / "runs" / f"{label}-seed0" / "run_done.json").read_text())
        losses = [e["loss"] for e in record["log_history"] if "loss" in e]
        assert losses and all(loss == loss and loss < 10 for loss in losses)  # finite, a real LM loss
        assert len(record["accuracy_rows"]) == 2  # the smoke size's held-out problems, scored one by one
    dual = json.loads((out / "runs" / "dualadam-seed0" / "run_done.json").read_text())["log_history"]
    assert any("dualadam/inverse_share" in e for e in dual)
    assert (out / "train_loss.png").is_file() and "## Paired differences" in report
