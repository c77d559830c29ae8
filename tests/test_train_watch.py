"""`dualadam-hf train` loses nothing: a diverged run says so and is marked, a blend longer than the run is
announced, one trainer per run folder, a finished run is never silently retrained, accuracy during training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam
from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments.cli import main
from dualadam_hf.experiments.train import DONE_FILE, RUN_LOCK_FILE, check_output_dir, run
from dualadam_hf.experiments.watch import BLEND_UNFINISHED_KEY, divergence_watch, unfinished_blend
from tests.helpers import SMOKE_RECIPE, tiny_argv, tiny_experiment

# --- divergence ----------------------------------------------------------------------------------


class FakeTrainer:
    """What divergence_watch touches of a Trainer: training_step, state, args.output_dir, add_callback."""

    def __init__(self, losses, output_dir: Path | None = None):
        self.losses, self.callbacks = iter(losses), []
        self.state = SimpleNamespace(global_step=0, log_history=[])
        self.args = SimpleNamespace(output_dir=str(output_dir or Path("no-such-run-folder")))

    def training_step(self, model, inputs, num_items_in_batch=None):
        return torch.tensor(next(self.losses))

    def add_callback(self, callback):
        self.callbacks.append(callback)


def control():
    return SimpleNamespace(should_training_stop=False, should_save=True, should_evaluate=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_first_non_finite_loss_stops_training_and_is_recorded_with_its_step(bad, tmp_path):
    said = []
    trainer = FakeTrainer([2.0, 1.5, bad, 1.0], tmp_path)
    watch = divergence_watch(trainer, said.append)
    args = SimpleNamespace(device=torch.device("cpu"))
    for _ in range(3):
        trainer.training_step(None, None)
        trainer.state.global_step += 1
        flow = control()
        watch.on_step_end(args, trainer.state, flow)
        if trainer.state.global_step < 3:
            assert not flow.should_training_stop and watch.mark is None
    assert flow.should_training_stop and not flow.should_save and not flow.should_evaluate
    assert watch.mark == {"step": 3, "what": "loss"}
    assert trainer.state.log_history == [{"diverged": {"step": 3, "what": "loss"}, "step": 3}]
    assert "the training loss became non-finite at step 3" in said[0]
    # It names the finite checkpoint it keeps, and says so when there is none.
    assert "(it saved no checkpoint before diverging, so it keeps no finite weights)" in said[0]


def test_a_non_finite_gradient_norm_in_the_log_stops_training():
    trainer = FakeTrainer([])
    watch = divergence_watch(trainer, print)
    trainer.state.global_step = 5
    flow = control()
    watch.on_log(None, trainer.state, flow, logs={"loss": 0.0, "grad_norm": math.nan})
    assert flow.should_training_stop and watch.mark == {"step": 5, "what": "grad_norm"}
    watch.on_log(None, trainer.state, control(), logs={"grad_norm": math.nan})
    assert len(trainer.state.log_history) == 1  # recorded once


def test_an_overflow_the_fp16_loss_scaler_skipped_is_not_divergence():
    trainer = FakeTrainer([])
    trainer.accelerator = SimpleNamespace(optimizer_step_was_skipped=True)
    watch = divergence_watch(trainer, print)
    flow = control()
    watch.on_log(None, trainer.state, flow, logs={"loss": 2.0, "grad_norm": math.inf})
    assert not flow.should_training_stop and watch.mark is None
    trainer.accelerator.optimizer_step_was_skipped = False
    watch.on_log(None, trainer.state, flow, logs={"loss": 2.0, "grad_norm": math.inf})
    assert flow.should_training_stop and watch.mark["what"] == "grad_norm"


@pytest.mark.slow
def test_a_diverged_run_says_where_and_is_finished_and_marked(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, capfd):
    """At learning rate 1e4 the tiny model's numbers overflow within a few steps: transformers alone logs
    "loss=0" and exits 0 saying nothing; the run must stop there, say so, and mark its record."""
    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--optim", "adamw_torch", "--optim_args",
                                "", "--learning_rate", "1e4", "--max_steps", "8", "--sharpness", "true")]
    assert main(argv) == 0
    printed = capfd.readouterr().out
    done = json.loads((out / DONE_FILE).read_text())
    step = done["diverged"]["step"]
    assert done["diverged"]["what"] in ("loss", "grad_norm") and 1 <= step < 8
    assert f"became non-finite at step {step}; training stops here" in printed
    assert f"finished, DIVERGED at step {step}" in printed
    history = done["log_history"]
    assert {"diverged": done["diverged"], "step": step} in history
    assert max(e["step"] for e in history if "loss" in e) == step  # nothing trained past it
    assert not any(k.startswith("sharpness/") for e in history for k in e)  # a NaN model is not measured
    assert not (out / f"checkpoint-{step}").exists()  # the last checkpoint is a finite one
    # Nor is a final model saved where a user would load it: its weights are not finite.
    assert not any((out / name).exists() for name in ("adapter_model.safetensors", "model.safetensors"))
    assert f"the diverged weights are not saved to {out}" in printed


# --- a blend longer than the run -----------------------------------------------------------------


def test_a_blend_that_outlasts_the_run_is_found():
    params = [torch.nn.Parameter(torch.zeros(2))]
    found = unfinished_blend(DualAdam(params), max_steps=20)  # the default switch_rate 0.01: 100 steps
    assert found == {"blend_steps": 100, "max_steps": 20, "last_blend": pytest.approx(0.8), "inverse_scale": 1.0}
    assert unfinished_blend(DualAdam(params, blend_steps=20), max_steps=20) is None  # step 20 is plain Adam
    assert unfinished_blend(DualAdam(params, blend_steps=21), max_steps=20)["last_blend"] == pytest.approx(1 / 21)
    assert unfinished_blend(InvAdam(params), max_steps=20) is None  # never ends, by design
    assert unfinished_blend(torch.optim.AdamW(params), max_steps=20) is None


@pytest.mark.slow
def test_a_blend_longer_than_the_run_is_announced_and_recorded(tiny_model_dir, tiny_chat_dataset_dir, tmp_path,
                                                                capfd):
    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--optim_args", "inverse_scale=0",
                                "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5")]
    assert main(argv) == 0
    printed = capfd.readouterr().out
    assert "the blend lasts 100 optimizer steps but the run has 3" in printed
    assert "the matched warmup never reaches the full learning rate (it ends at 0.03 of it)" in printed
    marks = [e[BLEND_UNFINISHED_KEY] for e in json.loads((out / DONE_FILE).read_text())["log_history"]
             if BLEND_UNFINISHED_KEY in e]
    assert marks == [{"blend_steps": 100, "max_steps": 3, "last_blend": pytest.approx(0.97), "inverse_scale": 0.0}]
    # Killed after checkpoint-2, then resumed: announced again, recorded once.
    shutil.rmtree(out / "checkpoint-3")
    (out / DONE_FILE).unlink()
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 0
    assert "the blend lasts 100 optimizer steps but the run has 3" in capfd.readouterr().out
    history = json.loads((out / DONE_FILE).read_text())["log_history"]
    assert sum(BLEND_UNFINISHED_KEY in e for e in history) == 1


# --- one trainer per folder; a finished run is not retrained silently; unwritable output ----------


HOLD_LOCK = """
import sys, time
from dualadam_hf.experiments.checkpoints import folder_lock
with folder_lock(sys.argv[1], sys.argv[2], "trainer"):
    print("locked", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def another_process_holding_the_run_lock(out: Path):
    """A process that holds ``out``'s trainer lock until the block ends; yields it."""
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), RUN_LOCK_FILE], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        yield first
    finally:
        first.kill()
        first.wait()


def test_a_second_trainer_on_a_run_folder_is_refused(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    out = tmp_path / "run"
    with another_process_holding_the_run_lock(out) as first:
        experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out)
        with pytest.raises(RecipeError, match=f"another trainer \\(pid {first.pid}\\) is running in {out}"):
            run(experiment)
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK_FILE]  # nothing written


@pytest.mark.slow  # trains in a subprocess
def test_a_second_trainer_exits_non_zero_with_the_message(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    out = tmp_path / "run"
    with another_process_holding_the_run_lock(out) as first:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        second = subprocess.run([sys.executable, "-m", "dualadam_hf", "train",
                                 *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out)],
                                capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 2 and f"another trainer (pid {first.pid})" in second.stderr


def test_resuming_a_finished_run_without_checkpoints_is_refused(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    """save_strategy: no leaves no checkpoint: `--resume_from_checkpoint last` would retrain from scratch and
    replace the finished run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / DONE_FILE).write_text(json.dumps({"log_history": [{"eval_loss": 1.0, "step": 2}]}))
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out, "--save_strategy", "no",
                                 "--resume_from_checkpoint", "last")
    with pytest.raises(RecipeError, match=r"holds a finished run \(run_done.json\) but no checkpoint to resume from "
                                          r"\(save_strategy: no\)"):
        run(experiment)
    assert json.loads((out / DONE_FILE).read_text())["log_history"] == [{"eval_loss": 1.0, "step": 2}]


def test_an_output_dir_nobody_can_write_is_refused_even_for_root():
    # Root passes os.access everywhere; /proc takes no new files from anyone.
    with pytest.raises(RecipeError, match="output_dir /proc/dualadam-test/out is not writable"):
        check_output_dir("/proc/dualadam-test/out")


# --- accuracy during training, end to end --------------------------------------------------------


@pytest.mark.slow
def test_accuracy_during_training_scores_every_evaluation_once(tiny_model_dir, tmp_path):
    from dualadam_hf.experiments.tiny import tiny_arithmetic_pairs

    data = tmp_path / "data"
    data.mkdir()
    with (data / "train.jsonl").open("w") as rows:  # prompt + completion + answer: what exact match scores
        for question, answer in tiny_arithmetic_pairs(40, seed=3):
            rows.write(json.dumps({"prompt": [{"role": "user", "content": question}],
                                   "completion": [{"role": "assistant", "content": answer}],
                                   "answer": answer.split("=")[-1].strip()}) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(SMOKE_RECIPE), "--smoke", "--model_name_or_path", tiny_model_dir, "--dataset_name",
            str(data), "--output_dir", str(out), "--accuracy_size", "4", "--accuracy_during_training", "true",
            "--eval_steps", "1", "--max_steps", "3"]
    assert main(argv) == 0
    done = json.loads((out / DONE_FILE).read_text())
    history = done["log_history"]
    accuracy = {e["step"]: e["eval_accuracy"] for e in history if "eval_accuracy" in e}
    evaluated = sorted({e["step"] for e in history if "eval_loss" in e})
    assert sorted(accuracy) == evaluated == [1, 2, 3]  # one score per evaluation, the final one included
    assert sum("eval_accuracy" in e for e in history) == 3  # the final step is not scored twice
    rows = done["accuracy_rows"]
    assert len(rows) == 4 and set(rows) <= {0, 1} and accuracy[3] == sum(rows) / 4
