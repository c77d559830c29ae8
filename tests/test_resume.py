"""Nothing lost under interruption: which checkpoint a run resumes from, refused resumes, finished runs.

The unit tests build checkpoint folders by hand as a kill would leave them; the slow ones train a tiny
model, damage or interrupt the run, and resume it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments.checkpoints import OPTIMIZER_START_KEY, resume_checkpoint, saved_wall_time
from tests.helpers import RecordedArguments, fake_checkpoint

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml"


def test_last_takes_the_newest_complete_checkpoint_and_says_which_it_skipped(tmp_path):
    good = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 100)  # numeric order, not text order: 100 > 20
    fake_checkpoint(tmp_path, 150, state=False, optimizer="truncated")  # killed while saving
    cut = fake_checkpoint(tmp_path, 120)
    (cut / "trainer_state.json").write_text('{"global_st')  # state file cut off
    said = []
    assert resume_checkpoint("last", tmp_path, log=said.append) == tmp_path / "checkpoint-100"
    assert said == [f"[train] skipping incomplete checkpoint {tmp_path / 'checkpoint-150'}: no trainer_state.json: "
                    "the save was cut off",
                    f"[train] skipping incomplete checkpoint {tmp_path / 'checkpoint-120'}: trainer_state.json is "
                    "truncated"]
    assert resume_checkpoint(str(good), tmp_path) == good
    assert resume_checkpoint("last", tmp_path / "empty") is None and resume_checkpoint(None, tmp_path) is None
    with pytest.raises(RecipeError, match="is not a complete checkpoint: no trainer_state.json"):
        resume_checkpoint(str(tmp_path / "checkpoint-150"), tmp_path)
    with pytest.raises(RecipeError, match="checkpoint folder not found"):
        resume_checkpoint(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize("damage, match", [
    (None, r"has no optimizer state \(optimizer.pt is missing\)"),
    ("empty", r"optimizer.pt is empty"),
    ("truncated", r"optimizer.pt is truncated or corrupt"),
])
def test_a_checkpoint_without_usable_optimizer_state_is_refused_unless_allowed(tmp_path, damage, match):
    fake_checkpoint(tmp_path, 65, optimizer=damage)
    with pytest.raises(RecipeError, match=match + r".*restart the optimizer.*resume_without_optimizer_state"):
        resume_checkpoint("last", tmp_path)
    said = []
    chosen = resume_checkpoint("last", tmp_path, allow_fresh_optimizer=True, log=said.append)
    assert chosen == tmp_path / "checkpoint-65" and "with a fresh optimizer" in said[0]


def test_deepspeed_and_fsdp_optimizer_layouts_are_accepted(tmp_path):
    for step, extra in ((1, "global_step1"), (2, "optimizer_0")):
        path = fake_checkpoint(tmp_path / extra, step, optimizer=None)
        # Without optimizer.pt and without the engine's layout the checkpoint holds no optimizer state...
        with pytest.raises(RecipeError, match="restart the optimizer"):
            resume_checkpoint(str(path), tmp_path / extra)
        # ... and the engine's own folder is what makes it resumable.
        (path / extra).mkdir()
        assert resume_checkpoint(str(path), tmp_path / extra) == path


@pytest.mark.parametrize("global_step, match", [
    (1000, r"global_step is 1000, but the folder checkpoint-8 was saved at step 8"),
    (-5, r"global_step must be a whole number >= 0, got -5"),
    ("abc", r"global_step must be a whole number >= 0, got 'abc'"),
    (None, r"global_step must be a whole number >= 0, got None"),
    (True, r"global_step must be a whole number >= 0, got True"),
])
def test_a_step_count_its_checkpoint_does_not_agree_with_is_refused(tmp_path, global_step, match):
    # Trusted, 1000 would take the run as finished and evaluate the step-8 weights as step 1000; -5 would train
    # 25 steps of a 12-step run; "abc" would end in a TypeError deep inside the Trainer.
    fake_checkpoint(tmp_path, 8, global_step=global_step, optimizer_steps=8)
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text(json.dumps({"global_step": global_step}))
    for value in ("last", str(tmp_path / "checkpoint-8")):
        with pytest.raises(RecipeError, match=rf"^cannot resume from {tmp_path}/checkpoint-8: "
                                              rf"{tmp_path}/checkpoint-8/trainer_state.json: {match}$"):
            resume_checkpoint(value, tmp_path)


def test_a_run_length_that_is_not_a_number_is_refused(tmp_path):
    path = fake_checkpoint(tmp_path, 8)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 8, "max_steps": "12"}))
    with pytest.raises(RecipeError, match=r"trainer_state.json: max_steps must be a whole number, got '12'$"):
        resume_checkpoint("last", tmp_path)


def test_a_step_count_the_optimizer_did_not_take_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 12, optimizer_steps=8)
    with pytest.raises(RecipeError, match=r"trainer_state.json: global_step is 12, but .*checkpoint-12/optimizer.pt "
                                          r"has taken 8 optimizer steps \(expected 12\)$"):
        resume_checkpoint("last", tmp_path)
    renamed = tmp_path / "renamed"  # folder name and state agree, the optimizer does not
    fake_checkpoint(renamed, 1000, optimizer_steps=8)
    with pytest.raises(RecipeError, match=r"has taken 8 optimizer steps \(expected 1000\)"):
        resume_checkpoint("last", renamed)
    ahead = tmp_path / "ahead"
    fake_checkpoint(ahead, 4, optimizer_steps=6)
    with pytest.raises(RecipeError, match=r"has taken 6 optimizer steps \(expected 4\)"):
        resume_checkpoint("last", ahead)
    agreeing = tmp_path / "agreeing"
    assert resume_checkpoint("last", agreeing) is None
    fake_checkpoint(agreeing, 12, optimizer_steps=12)
    assert resume_checkpoint("last", agreeing) == agreeing / "checkpoint-12"


def test_fewer_optimizer_steps_are_expected_after_a_fresh_optimizer_and_under_fp16(tmp_path):
    # Resumed at step 4 with a fresh optimizer (resume_without_optimizer_state): its counters start over there.
    restarted = fake_checkpoint(tmp_path / "restarted", 6, optimizer_steps=2)
    (restarted / "wall_time.json").write_text(json.dumps({"train_seconds": 1.0, "segments": 2,
                                                          OPTIMIZER_START_KEY: 4}))
    assert resume_checkpoint("last", tmp_path / "restarted") == restarted
    (restarted / "wall_time.json").write_text(json.dumps({OPTIMIZER_START_KEY: 3}))
    with pytest.raises(RecipeError, match=r"has taken 2 optimizer steps since step 3 \(expected 3\)"):
        resume_checkpoint("last", tmp_path / "restarted")
    # fp16's loss scaler skips the steps whose gradients overflow; it never takes more.
    fp16 = fake_checkpoint(tmp_path / "fp16", 6, optimizer_steps=5, arguments=RecordedArguments(fp16=True))
    assert resume_checkpoint("last", tmp_path / "fp16") == fp16
    fake_checkpoint(tmp_path / "fp32", 6, optimizer_steps=5, arguments=RecordedArguments(fp16=False))
    with pytest.raises(RecipeError, match=r"has taken 5 optimizer steps \(expected 6\)"):
        resume_checkpoint("last", tmp_path / "fp32")


def test_wall_time_of_earlier_segments(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    assert saved_wall_time(None) == (0.0, 0, 0.0)
    assert saved_wall_time(path) == (0.0, 1, 0.0)  # written by a run that did not record it
    (path / "wall_time.json").write_text(json.dumps({"train_seconds": 4.5, "segments": 2}))
    assert saved_wall_time(path) == (4.5, 2, 0.0)  # a run that recorded no peak memory
    (path / "wall_time.json").write_text(json.dumps({"train_seconds": 4.5, "segments": 2, "peak_memory_mb": 812.5}))
    assert saved_wall_time(path) == (4.5, 2, 812.5)


def train_argv(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dualadam_hf", "train", "--config", str(DEFAULT_RECIPE), "--smoke",
            "--model_name_or_path", model_dir, "--output_dir", str(out), "--save_steps", "2",
            "--save_total_limit", "5", "--accuracy_size", "0", "--eval_steps", "2", *extra]


def run_train(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.slow
def test_runs_damaged_or_killed_at_any_moment_resume_to_the_same_model(tiny_model_dir, tmp_path):
    reference = tmp_path / "reference"
    run_train(train_argv(tiny_model_dir, reference, "--max_steps", "6"))
    state = json.loads((reference / "trainer_state.json").read_text())
    assert state["global_step"] == 6

    # Killed while writing checkpoint-6: no trainer_state.json and a truncated optimizer.pt.
    damaged = tmp_path / "damaged"
    run_train(train_argv(tiny_model_dir, damaged, "--max_steps", "6"))
    (damaged / "checkpoint-6" / "trainer_state.json").unlink()
    optimizer = damaged / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    (damaged / "run_done.json").unlink()
    result = run_train(train_argv(tiny_model_dir, damaged, "--max_steps", "6", "--resume_from_checkpoint", "last"))
    assert "skipping incomplete checkpoint" in result.stdout and "checkpoint-6" in result.stdout
    for name, tensor in adapter(reference).items():
        torch.testing.assert_close(adapter(damaged)[name], tensor, rtol=0, atol=1e-6)
    history = json.loads((damaged / "run_done.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    segments = [e["train_segments"] for e in history if "train_segments" in e]
    assert segments == [2.0]  # the report sums the wall time of both segments and says so

    # A finished run resumed again trains nothing and keeps its model; its peak memory stays the largest
    # of its segments' (here a made-up peak recorded by the checkpoint, far above anything measured).
    before = adapter(damaged)
    recorded = damaged / "checkpoint-6" / "wall_time.json"
    recorded.write_text(json.dumps({**json.loads(recorded.read_text()), "peak_memory_mb": 1e7}))
    result = run_train(train_argv(tiny_model_dir, damaged, "--max_steps", "6", "--resume_from_checkpoint", "last"))
    assert "finished training at step 6: evaluating it, training nothing" in result.stdout
    assert not (damaged / "checkpoint-7").exists()
    assert all(torch.equal(adapter(damaged)[k], v) for k, v in before.items())
    history = json.loads((damaged / "run_done.json").read_text())["log_history"]
    assert [e["peak_memory_mb"] for e in history if "peak_memory_mb" in e] == [1e7]

    # Killed (SIGKILL) in the middle of training, then resumed.
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(train_argv(tiny_model_dir, killed, "--max_steps", "6"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    run_train(train_argv(tiny_model_dir, killed, "--max_steps", "6", "--resume_from_checkpoint", "last"))
    for name, tensor in adapter(reference).items():
        torch.testing.assert_close(adapter(killed)[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resuming_without_optimizer_state_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_train(train_argv(tiny_model_dir, out, "--max_steps", "6"))
    shutil.rmtree(out / "checkpoint-6")  # killed after checkpoint-4 ...
    (out / "run_done.json").unlink()
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # ... which lost its optimizer state
    argv = train_argv(tiny_model_dir, out, "--max_steps", "6", "--resume_from_checkpoint", "last")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 2 and "optimizer.pt is missing" in refused.stderr
    allowed = run_train(argv + ["--resume_without_optimizer_state", "true"])
    assert "with a fresh optimizer" in allowed.stdout
    # The checkpoint saved after the restart says where its optimizer began, so its step counters (2, not 6)
    # agree with its step count and it resumes like any other.
    assert json.loads((out / "checkpoint-6" / "wall_time.json").read_text())[OPTIMIZER_START_KEY] == 4
    again = run_train(argv)
    assert "finished training at step 6: evaluating it, training nothing" in again.stdout


def test_a_checkpoint_cut_off_before_its_manifest_is_passed_over_for_the_one_before(tmp_path):
    """The Trainer's save ends with trainer_state.json and the run's manifest follows it: a kill in between leaves
    a checkpoint that looks whole to the Trainer but cannot be checked, so ``last`` takes the one before it."""
    from dualadam_hf.experiments import identity

    (tmp_path / identity.MANIFEST_FILE).write_text(json.dumps({"inputs": {}}))  # the run has a manifest
    earlier = fake_checkpoint(tmp_path, 2)
    (earlier / identity.MANIFEST_FILE).write_text(json.dumps({"inputs": {}}))
    fake_checkpoint(tmp_path, 4)  # cut off after trainer_state.json
    said = []
    assert resume_checkpoint("last", tmp_path, log=said.append) == earlier
    assert any("checkpoint-4" in line and f"no {identity.MANIFEST_FILE}: the save was cut off" in line
               for line in said), said
