"""What a run tells its user: the effective learning rate, the peak memory and the phase that reached it, the
generated answers, progress through every long phase, and a log without lines nobody can act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualadam_hf.experiments import train
from dualadam_hf.experiments.train import ACCURACY_ANSWERS_FILE, ACCURACY_ROWS_FILE, DONE_FILE, MemoryPhases
from dualadam_hf.integrations.callbacks import BLEND_LOG_KEY, EFFECTIVE_LR_LOG_KEY

from .helpers import make_args, make_trainer, training_logs

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml")


def test_the_blend_logs_the_rate_its_adam_part_gets(tiny_model_dir, tmp_path):
    """`learning_rate` is the schedule's rate; during the blend the Adam part gets (1 - r) of it, which is the
    warmup of the matched-warmup variant."""
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path, optim_args="blend_steps=4,inverse_scale=0"))
    trainer.train()
    logs = training_logs(trainer)
    for entry in logs:
        assert entry[EFFECTIVE_LR_LOG_KEY] == pytest.approx(entry["learning_rate"] * (1 - entry[BLEND_LOG_KEY]))
    assert logs[0][EFFECTIVE_LR_LOG_KEY] < logs[0]["learning_rate"]
    assert logs[-1][EFFECTIVE_LR_LOG_KEY] == pytest.approx(logs[-1]["learning_rate"])


def test_the_peak_is_attributed_to_the_phase_that_reached_it(monkeypatch):
    marks = iter([700.0, 2100.0, 2100.0, 2300.0, 2300.0])
    monkeypatch.setattr(train, "peak_memory_mb", lambda: next(marks))
    memory = MemoryPhases()
    for phase in ("load", "train", "evaluate", "accuracy", "sharpness"):
        memory.mark(phase)
    assert memory.peak == 2300.0 and memory.peak_phase == "accuracy"  # the first phase at the final mark
    numbers = memory.numbers()
    assert numbers["peak_memory_mb"] == 2300.0 and numbers["peak_memory_mb/train"] == 2100.0
    assert "reached in accuracy" in memory.summary()
    # A resumed run whose earlier segment needed more says so.
    resumed = MemoryPhases(earlier_peak=5000.0)
    resumed.marks = {"load": 800.0, "train": 1900.0}
    assert resumed.peak == 5000.0 and resumed.peak_phase == "an earlier segment"


def test_dataloaders_do_not_pin_memory_without_an_accelerator(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    from dualadam_hf.experiments import load_experiment
    from dualadam_hf.experiments.data import load_splits
    from dualadam_hf.experiments.trainers import build_trainer, has_accelerator

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {tiny_chat_dataset_dir}\n"
                      f"output_dir: {tmp_path / 'out'}\nbf16: false\nreport_to: none\nmax_steps: 1\n")
    experiment = load_experiment(str(recipe))
    assert experiment.training.dataloader_pin_memory  # the Trainer's default
    trainer, _ = build_trainer(experiment, tiny_model_dir, *load_splits(experiment))
    # Off on a CPU-only machine (torch would warn for every dataloader); kept where it speeds up copies.
    assert trainer.args.dataloader_pin_memory is has_accelerator()
    assert trainer.get_eval_dataloader().pin_memory is has_accelerator()


@pytest.mark.slow
def test_train_shows_its_work_and_keeps_a_clean_log(tiny_model_dir, tmp_path):
    """`dualadam-hf train` as a user runs it: bars for generation and sharpness, the whole run's peak memory
    and its phase, the generated answers beside the scores, and none of the upstream warnings we cause."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dualadam_hf", "train", "--config", RECIPE, "--smoke", "--model_name_or_path",
               tiny_model_dir, "--output_dir", str(out), "--sharpness", "true", "--sharpness_max_iters", "2",
               "--sharpness_probes", "1", "--accuracy_size", "3"]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for shown in ("exact match: generating answers", "sharpness: top eigenvalue (power iteration)",
                  "sharpness: Hessian trace", "sharpness: loss at perturbed weights"):
        assert shown in result.stderr, shown
    for noise in ("pin_memory", "`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated",
                  "Setting accelerator to CPU"):
        assert noise not in result.stderr + result.stdout, noise

    done = json.loads((out / DONE_FILE).read_text())
    answers, rows = done["accuracy_answers"], done["accuracy_rows"]
    assert len(answers) == len(rows) == 3 and all(isinstance(a, str) for a in answers)
    assert json.loads((out / ACCURACY_ANSWERS_FILE).read_text()) == answers
    assert json.loads((out / ACCURACY_ROWS_FILE).read_text()) == rows
    final = next(e for e in done["log_history"] if "peak_memory_mb" in e)
    phases = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("peak_memory_mb/")}
    assert set(phases) >= {"load", "train", "accuracy", "sharpness"}
    assert final["peak_memory_mb"] == max(phases.values())  # the whole run, not training alone
    assert list(phases.values()) == sorted(phases.values())  # high-water marks, in the order of the phases
    assert done["peak_memory_phase"] in phases
    assert f"reached in {done['peak_memory_phase']}" in result.stdout
    assert final["sharpness/eigenvalue_converged"] in (0.0, 1.0)
    if not final["sharpness/eigenvalue_converged"]:
        assert "stopped at the cap of 2 power iterations" in result.stdout
