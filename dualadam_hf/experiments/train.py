"""Run one experiment: train with TRL's SFTTrainer (Trainer for classification), then evaluate held-out
loss, exact-match accuracy and, optionally, sharpness, all into the log history (``trainer_state.json``).

The last thing a run writes is ``run_done.json`` (atomically), where ``compare`` reads results, so a run killed
at any moment is finished or resumable. Resuming a finished run trains nothing: it redoes only the evaluation.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import Experiment, RecipeError
from .checkpoints import TRAINER_STATE, WALL_TIME, folder_lock, read_json, resume_checkpoint, saved_wall_time
from .data import load_splits
from .models import resolve_model
from .tasks import score_answers
from .trainers import build_trainer, eval_batches
from .watch import DIVERGED_KEY, SHARPNESS_PREFIX, blend_length_check, divergence_watch

PEAK_MEMORY_KEY = "peak_memory_mb"
ACCURACY_KEY = "eval_accuracy"
WALL_TIME_KEY = "train_wall_time_s"
SEGMENTS_KEY = "train_segments"
DONE_FILE = "run_done.json"
ACCURACY_ROWS_FILE = "accuracy_rows.json"
ACCURACY_ANSWERS_FILE = "accuracy_answers.json"  # the generated text of each scored problem, in row order
RUN_LOCK_FILE = ".train.lock"


def peak_memory_mb() -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 2**20


class MemoryPhases:
    """The peak memory of a run and the phase that reached it.

    After each phase the process's high-water mark (:func:`peak_memory_mb`, which never falls) is noted, so the
    phase whose mark first equals the final one is where the peak was reached. The kernel's mark is only read,
    never reset, so outside tools (``/usr/bin/time -v``) measure the same peak.
    """

    def __init__(self, earlier_peak: float = 0.0) -> None:
        self.earlier_peak = earlier_peak  # recorded by the earlier segments of a resumed run
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = peak_memory_mb()

    @property
    def peak(self) -> float:
        return max([self.earlier_peak, *self.marks.values()])

    @property
    def peak_phase(self) -> str:
        """The phase that reached the peak ("an earlier segment" when a resumed run's earlier part did)."""
        return next((phase for phase, mark in self.marks.items() if mark >= self.peak), "an earlier segment")

    def numbers(self) -> dict[str, float]:
        """The log entries: the whole run's peak and the high-water mark after each phase."""
        return {PEAK_MEMORY_KEY: self.peak, **{f"{PEAK_MEMORY_KEY}/{k}": v for k, v in self.marks.items()}}

    def summary(self) -> str:
        marks = ", ".join(f"{phase} {mark:,.0f}" for phase, mark in self.marks.items())
        return f"peak memory {self.peak:,.0f} MB, reached in {self.peak_phase} (MB after each phase: {marks})"


def check_output_dir(folder: str | os.PathLike) -> None:
    """Fail before the model loads when the output folder could not be written (creates nothing)."""
    import tempfile

    path = existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"output_dir {path} is not writable: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir {path} is not writable: no write permission on {existing}")
    try:  # root passes os.access everywhere, /proc included: only a real write tells (a nameless file on Linux)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise RecipeError(f"output_dir {path} is not writable: cannot create files in {existing} ({error})") from None


def write_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _callbacks(clock: dict[str, Any], accuracy: Any) -> list[Any]:
    """The wall clock (training seconds across resumed segments, written into every checkpoint) and, when
    ``accuracy`` is given, exact match at every evaluation."""
    from transformers import TrainerCallback

    class WallClockCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            clock["stopped"] = _seconds(clock)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_atomically(folder / WALL_TIME, {"train_seconds": _seconds(clock), "segments": clock["segments"],
                                                      PEAK_MEMORY_KEY: peak_memory_mb()})

    class AccuracyCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            correct = accuracy(model, state.global_step)
            state.log_history.append({ACCURACY_KEY: sum(correct) / len(correct), "step": state.global_step})

    return [WallClockCallback()] + ([AccuracyCallback()] if accuracy else [])


def _seconds(clock: dict[str, Any]) -> float:
    return clock["stopped"] if clock["stopped"] is not None else clock["offset"] + time.time() - clock["start"]


def run(experiment: Experiment, log=print) -> dict[str, float]:
    """Train and evaluate one experiment; return the final numbers (all of them are in the log history).

    One trainer at a time per output folder: a second one (another process on the same folder) is refused with
    a RecipeError naming the first one's pid. A run whose loss becomes non-finite stops there, is finished and
    marked diverged (:mod:`.watch`); it is not evaluated (its weights are not finite)."""
    check_output_dir(experiment.training.output_dir)
    model_path = resolve_model(experiment.model.model_name_or_path)
    train_data, heldout = load_splits(experiment)
    if int(os.environ.get("RANK", "0")) != 0:  # the processes of one launch share the folder; the first locks it
        return _run(experiment, model_path, train_data, heldout, log)
    with folder_lock(experiment.training.output_dir, RUN_LOCK_FILE, "trainer"):
        return _run(experiment, model_path, train_data, heldout, log)


def _run(experiment: Experiment, model_path: str, train_data: Any, heldout: Any, log) -> dict[str, float]:
    args, training = experiment.args, experiment.training
    checkpoint = resume_checkpoint(training.resume_from_checkpoint, training.output_dir,
                                   allow_fresh_optimizer=args.resume_without_optimizer_state, log=log)
    if checkpoint is None and str(training.resume_from_checkpoint).lower() in ("last", "true", "yes") \
            and (Path(training.output_dir) / DONE_FILE).is_file():
        raise RecipeError(f"{training.output_dir} holds a finished run ({DONE_FILE}) but no checkpoint to resume "
                          f"from (save_strategy: {getattr(training.save_strategy, 'value', training.save_strategy)})"
                          ": training would start over and replace it. Give another output_dir, or delete "
                          f"{DONE_FILE} to train again.")
    # Whether the checkpoint already holds all the training the arguments ask for.
    state = (read_json(checkpoint / TRAINER_STATE) or {}) if checkpoint else {}
    planned = training.max_steps if training.max_steps > 0 else state.get("max_steps", math.inf)
    finished = checkpoint is not None and state.get("global_step", 0) >= planned
    adapter = str(checkpoint) if finished and experiment.model.use_peft else None
    base = str(checkpoint) if finished and adapter is None else model_path
    trainer, tokenizer = build_trainer(experiment, base, train_data, heldout, adapter=adapter)
    offset, segments, earlier_peak = saved_wall_time(checkpoint)
    memory = MemoryPhases(earlier_peak)
    memory.mark("load")
    show_bars = not training.disable_tqdm and trainer.is_local_process_zero()
    clock = {"offset": offset, "segments": segments + 1, "start": time.time(), "stopped": None}
    accuracy, scored, answers = None, {}, {}
    if args.task == "sft" and args.accuracy_size:
        rows = heldout.select(range(min(args.accuracy_size, len(heldout))))

        def accuracy(model: Any, step: int) -> list[bool]:  # scored once per step
            if step not in scored:
                scored[step], answers[step] = score_answers(
                    model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
                    show_bar=show_bars)
            return scored[step]
    for callback in _callbacks(clock, accuracy if args.accuracy_during_training else None):
        trainer.add_callback(callback)
    watch = divergence_watch(trainer, log)
    blend_length_check(trainer, log)
    if finished:
        from transformers import TrainerState

        # Training again would take one more step past the end (the Trainer's resume does that); the
        # checkpoint's weights and log are the finished run: only what follows training is redone.
        trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
        clock["stopped"], clock["segments"] = offset, max(segments, 1)
        log(f"[train] {checkpoint} finished training at step {trainer.state.global_step}: evaluating it, "
            "training nothing")
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    memory.mark("train")
    final: dict[str, float] = {WALL_TIME_KEY: _seconds(clock), SEGMENTS_KEY: float(clock["segments"])}
    step = trainer.state.global_step
    diverged = watch.mark or next((e[DIVERGED_KEY] for e in trainer.state.log_history if DIVERGED_KEY in e), None)
    if diverged is not None:
        log("[train] a diverged run is not evaluated: its weights are not finite")
    elif not any("eval_loss" in e and e.get("step") == step for e in trainer.state.log_history):
        trainer.evaluate()  # with accuracy_during_training this also scores the accuracy at this step
        memory.mark("evaluate")
    rows = None if accuracy is None or diverged is not None else [int(r) for r in accuracy(trainer.model, step)]
    if rows is not None:
        memory.mark("accuracy")
    if rows is not None and not (args.accuracy_during_training and any(
            ACCURACY_KEY in e and e.get("step") == step for e in trainer.state.log_history)):
        final[ACCURACY_KEY] = sum(rows) / len(rows)
    if args.sharpness and diverged is None:
        from .sharpness import measure_sharpness

        settings = args.sharpness_settings(seed=training.seed)
        numbers = measure_sharpness(trainer.model, eval_batches(trainer, settings.batches, settings.batch_size),
                                    settings, show_bar=show_bars)
        memory.mark("sharpness")
        if not numbers["eigenvalue_converged"]:
            change = numbers["eigenvalue_relative_change"]
            log(f"[train] sharpness: the top eigenvalue {numbers['top_eigenvalue']:.6g} stopped at the cap of "
                f"{settings.max_iters} power iterations (last relative change {change:.2g}, tolerance {settings.tol:g})"
                ": sharpness/eigenvalue_converged is 0; raise sharpness_max_iters for a converged estimate")
        # Non-finite numbers (e.g. the standard error of a single probe) are left out: JSON has no NaN.
        final.update({f"{SHARPNESS_PREFIX}{k}": float(v) for k, v in numbers.items() if math.isfinite(v)})
    # The whole run's peak, training and everything after it (a resumed run: the largest of its segments').
    final.update(memory.numbers())
    if trainer.is_world_process_zero():
        log(f"[train] {memory.summary()}")
    trainer.log(final)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        output = Path(training.output_dir)
        generated = answers.get(step) if rows is not None else None
        if rows is not None:
            write_atomically(output / ACCURACY_ROWS_FILE, rows)
            write_atomically(output / ACCURACY_ANSWERS_FILE, generated)
        write_atomically(output / DONE_FILE, {"log_history": trainer.state.log_history, "accuracy_rows": rows,
                                              "accuracy_answers": generated, DIVERGED_KEY: diverged,
                                              "peak_memory_phase": memory.peak_phase})
    numbers = {k: v for e in trainer.state.log_history for k, v in e.items() if isinstance(v, (int, float))}
    return numbers | ({} if diverged is None else {"diverged_at_step": float(diverged["step"])})
