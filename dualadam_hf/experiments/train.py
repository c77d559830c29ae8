"""Run one experiment: train with TRL's SFTTrainer (Trainer for classification), then evaluate held-out
loss, exact-match accuracy and, optionally, sharpness, all into the log history (``trainer_state.json``).

The last thing a run writes is ``run_done.json`` (atomically), where ``compare`` reads results, so a run killed
at any moment is finished or resumable. Resuming a finished run trains nothing: it redoes only the evaluation.
A folder that holds a run is never trained into afresh unless ``overwrite_output_dir`` says so, and a resume
that asks for other settings than its checkpoint holds is refused (:func:`.checkpoints.check_resume_settings`).
A disk that fills up (or a folder that stops taking files) ends the run with a one-line RecipeError.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import identity
from .arguments import Experiment, RecipeError
from .checkpoints import (
    TRAINER_STATE,
    TRAINING_ARGS_FILE,
    WALL_TIME,
    WEIGHT_FILES,
    check_resume_inputs,
    check_resume_settings,
    checkpoint_folders,
    folder_lock,
    forget_saved_optimizer,
    optimizer_problem,
    optimizer_start,
    read_json,
    resume_checkpoint,
    resume_kind,
    saved_wall_time,
    wall_time_record,
)
from .data import ALIASES, load_splits
from .models import resolve_model
from .sharpness import SHARPNESS_PREFIX
from .tasks import score_answers
from .trainers import build_trainer, eval_batches
from .watch import DIVERGED_KEY, blend_length_check, divergence_watch, finite_checkpoint_words

PEAK_MEMORY_KEY = "peak_memory_mb"
ACCURACY_KEY = "eval_accuracy"
EVAL_LOSS_KEY = "eval_loss"  # the Trainer's: the held-out loss of each evaluation
WALL_TIME_KEY = "train_wall_time_s"
SEGMENTS_KEY = "train_segments"
DONE_FILE = "run_done.json"
# The keys of DONE_FILE besides DIVERGED_KEY, which the report reads back: the log history, and the last
# evaluation's exact-match result and generated text per scored problem.
DONE_LOG_KEY, DONE_ROWS_KEY, DONE_ANSWERS_KEY = "log_history", "accuracy_rows", "accuracy_answers"
ACCURACY_ROWS_FILE = "accuracy_rows.json"
ACCURACY_ANSWERS_FILE = "accuracy_answers.json"  # the generated text of each scored problem, in row order
RUN_LOCK_FILE = ".train.lock"
# What a run leaves at the top of its folder besides its checkpoints: --overwrite_output_dir removes these (and
# the checkpoints) before training, and nothing else (the folder may hold files of the user's, or of compare).
RUN_FILES = (DONE_FILE, ACCURACY_ROWS_FILE, ACCURACY_ANSWERS_FILE, TRAINER_STATE, TRAINING_ARGS_FILE, *WEIGHT_FILES,
             "config.json", "generation_config.json", "adapter_config.json", identity.MANIFEST_FILE,
             "sharpness.json")  # sharpness_cli.RESULT_FILE (which imports this module): the old model's numbers
_RUN_FOLDERS = re.compile(r"^(tmp-)?checkpoint-\d+$")
_WEIGHT_SHARDS = re.compile(r"^(model|adapter_model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
# The errors of a write that cannot go on: a full disk or quota, a read-only or failing file system.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})
# How torch.save and safetensors word a write that failed (a full disk among them) in their RuntimeErrors: the
# operating system's text, or torch's stream writer failing (its C++ iostream, or a position it did not reach).
TORCH_WRITE_FAILURES = ("No space left on device", "file write failed", "basic_ios::clear", "iostream error",
                        "PytorchStreamWriter", "inline_container.cc")
# How deep below an output folder other runs are looked for (a comparison's grid runs lie 4 levels down), and
# how many folders are looked at at most.
_RUN_SEARCH_DEPTH, _RUN_SEARCH_FOLDERS = 4, 2000


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


_AFTER_A_FAILED_WRITE = ("the run is not marked finished. Make room (or fix the folder), then run the same command "
                         "with --resume_from_checkpoint last: it continues from the last complete checkpoint")


def write_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON into ``path`` whole or not at all: a failed write (a full disk) leaves ``path`` as
    it was, removes its half-written temporary file, and is a one-line RecipeError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RecipeError(f"cannot write {path}: {error.strerror or error}; {_AFTER_A_FAILED_WRITE}") from None


def failed_write(error: BaseException, output_dir: str | os.PathLike) -> RecipeError | None:
    """The one-line RecipeError for an error of a write that cannot go on (:data:`WRITE_ERRNOS`), else None.

    torch.save and safetensors report a full disk in their own words, not as an OSError; those are told by
    :data:`TORCH_WRITE_FAILURES`, and the free space left is said with them."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        reason = f"{error.strerror or error}{where}"
    elif isinstance(error, RuntimeError | OSError) and any(words in str(error) for words in TORCH_WRITE_FAILURES):
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0] + _free_space(output_dir)
    else:
        return None
    return RecipeError(f"cannot write the run's files in {output_dir}: {reason}; {_AFTER_A_FAILED_WRITE}")


def _free_space(folder: str | os.PathLike) -> str:
    """", N bytes free on its disk" for the folder (or the nearest one above it that exists), or ""."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f", {shutil.disk_usage(path).free:,} bytes free on its disk"
    except OSError:
        return ""


def input_folders(experiment: Experiment, model_path: str) -> dict[str, Path]:
    """The local places a run reads from, by what they are: the model's folder, and the data's folder or file.
    A data file stands for itself: an output folder beside it (``data.jsonl`` and ``outputs/`` in one project
    folder) writes nothing over it, one that holds it may."""
    folders = {}
    if Path(model_path).is_dir():
        folders["the model folder"] = Path(model_path)
    name = ALIASES.get(str(experiment.script.dataset_name), str(experiment.script.dataset_name))
    data = Path(name).expanduser()
    if data.is_dir():
        folders["the data folder"] = data
    elif data.is_file():
        folders["the data file"] = data
    return folders


def check_output_apart(output_dir: str | os.PathLike, inputs: dict[str, Path], *, runs_above: bool = True,
                       runs_below: bool = True) -> None:
    """Refuse, before anything loads, an output folder that is, lies inside or contains a folder the run reads
    (``inputs``, by what each is), or lies inside (``runs_above``) or contains (``runs_below``) another run's
    folder: saving the model, or starting over with overwrite_output_dir, would overwrite or delete what it
    reads, or mix two runs in one folder."""
    out = Path(output_dir).resolve()
    fix = "give another output_dir"
    for what, folder in inputs.items():
        folder = folder.resolve()
        relation = ("is" if out == folder else "lies inside" if out.is_relative_to(folder)
                    else "contains" if folder.is_relative_to(out) else None)
        if relation is not None:
            raise RecipeError(f"output_dir {out} {relation} {what} {folder}: a run's model and files would be written "
                              f"among the files it reads (and overwrite_output_dir would delete them); {fix}")
    for above in out.parents if runs_above else ():
        if found := _run_files(above):
            raise RecipeError(f"output_dir {out} lies inside the folder of another run, {above} (it holds "
                              f"{', '.join(found[:3])}): two runs would mix in one folder; {fix}")
    if runs_below and (inner := _run_below(out)) is not None:
        raise RecipeError(f"output_dir {out} contains the folder of another run, {inner}: overwrite_output_dir "
                          f"would not remove it and a reader would mix the two; {fix}")


def _run_below(folder: Path) -> Path | None:
    """A folder below ``folder`` (its own checkpoints aside) that holds a run, looked for a few levels down."""
    waiting, seen = [(child, 1) for child in _subfolders(folder) if not _RUN_FOLDERS.match(child.name)], 0
    while waiting and seen < _RUN_SEARCH_FOLDERS:
        here, depth = waiting.pop()
        seen += 1
        if _run_files(here):
            return here
        if depth < _RUN_SEARCH_DEPTH:
            waiting += [(child, depth + 1) for child in _subfolders(here)]
    return None


def _run_files(folder: Path) -> list[str]:
    """:func:`existing_run` of a folder that may not be readable (then: none)."""
    try:
        return existing_run(folder)
    except OSError:
        return []


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def existing_run(output_dir: str | os.PathLike) -> list[str]:
    """The names that make ``output_dir`` hold a run: its checkpoint folders and ``run_done.json``."""
    folder = Path(output_dir)
    return [p.name for p in checkpoint_folders(folder)] + ([DONE_FILE] if (folder / DONE_FILE).exists() else [])


def clear_earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a run leaves in ``output_dir`` (its checkpoints and :data:`RUN_FILES`, weight shards included);
    return the names removed. Nothing else there is touched, and a link is removed, never followed."""
    folder, removed = Path(output_dir), []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        name = path.name
        if _RUN_FOLDERS.match(name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif name in RUN_FILES or _WEIGHT_SHARDS.match(name) or (_RUN_FOLDERS.match(name) and path.is_symlink()):
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _callbacks(clock: dict[str, Any], accuracy: Any, record: dict[str, Any]) -> list[Any]:
    """The wall clock (training seconds across resumed segments) and the run's manifest ``record``, both
    written into every checkpoint, and, when ``accuracy`` is given, exact match at every evaluation."""
    from transformers import TrainerCallback

    class WallClockCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            clock["stopped"] = _seconds(clock)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_atomically(folder / WALL_TIME, wall_time_record(_seconds(clock), clock["segments"],
                                                                      peak_memory_mb(), clock["optimizer_start"]))
                write_atomically(folder / identity.MANIFEST_FILE, record)

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
    marked diverged (:mod:`.watch`); it is not evaluated and its final weights are not saved (they are not
    finite). A write that fails for want of room ends the run with a one-line RecipeError (:func:`failed_write`)."""
    output_dir = experiment.training.output_dir
    check_output_dir(output_dir)
    model_path = resolve_model(experiment.model.model_name_or_path)
    check_output_apart(output_dir, input_folders(experiment, model_path))
    train_data, heldout = load_splits(experiment)
    inputs = run_inputs(experiment, model_path)
    try:
        if int(os.environ.get("RANK", "0")) != 0:  # the processes of one launch share the folder; the first locks it
            return _run(experiment, model_path, inputs, train_data, heldout, log)
        with folder_lock(output_dir, RUN_LOCK_FILE, "trainer"):
            return _run(experiment, model_path, inputs, train_data, heldout, log)
    except (OSError, RuntimeError) as error:
        if (one_line := failed_write(error, output_dir)) is None:
            raise
        raise one_line from None


def run_inputs(experiment: Experiment, model_path: str) -> dict[str, Any]:
    """The determining part of this run's manifest (:func:`.identity.run_inputs`), the processes of its launch
    included; a file that cannot be read to identify it is a one-line RecipeError."""
    try:
        return identity.run_inputs(experiment, model_path, processes=int(os.environ.get("WORLD_SIZE", "1")))
    except OSError as error:
        raise RecipeError(f"cannot read {error.filename or 'an input file'} to identify the run's inputs: "
                          f"{error.strerror or error}") from None


def _where(experiment: Experiment, model_path: str) -> dict[str, Any]:
    """Where the run read its inputs from and writes its files: provenance, not compared (a moved checkout or
    another cache folder holds the same inputs)."""
    local = lambda path: str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else str(path)
    return {"recipe": local(experiment.path), "model_name_or_path": experiment.model.model_name_or_path,
            "model": local(model_path), "dataset_name": local(experiment.script.dataset_name),
            "output_dir": local(experiment.training.output_dir)}


def choose_checkpoint(experiment: Experiment, log, inputs: dict[str, Any]) -> Path | None:
    """The checkpoint this run continues (None: it starts from the model), after every refusal that keeps a run
    from being replaced or mixed with other settings or inputs (``inputs``: this command's, as
    :func:`run_inputs` gives them); with ``overwrite_output_dir``, the earlier run's files are removed first (by
    the first process of a launch)."""
    args, training = experiment.args, experiment.training
    output, kind = Path(training.output_dir), resume_kind(training.resume_from_checkpoint)
    if args.overwrite_output_dir:
        if kind == "folder":
            raise RecipeError(f"overwrite_output_dir starts {output} over, resume_from_checkpoint "
                              f"{training.resume_from_checkpoint} continues a run: give one of them")
        if int(os.environ.get("RANK", "0")) == 0 and (removed := clear_earlier_run(output)):
            log(f"[train] overwrite_output_dir: removed the earlier run's files from {output}: {', '.join(removed)}")
        return None
    checkpoint = resume_checkpoint(training.resume_from_checkpoint, output,
                                   allow_fresh_optimizer=args.resume_without_optimizer_state, log=log)
    if checkpoint is not None:
        check_resume_settings(checkpoint, training)
        check_resume_inputs(checkpoint, inputs)
        return checkpoint
    start_over = "start over with --overwrite_output_dir true, or give another output_dir"
    if kind is None and (found := existing_run(output)):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RecipeError(f"{output} already holds a run ({shown}): training would start over and replace it. "
                          f"Continue it with --resume_from_checkpoint last, or {start_over}.")
    if kind == "last" and (output / DONE_FILE).is_file():
        done = read_json(output / DONE_FILE)
        diverged = done.get(DIVERGED_KEY) if isinstance(done, dict) else None
        if isinstance(diverged, dict):
            raise RecipeError(f"{output} holds a run that diverged at step {diverged.get('step')} ({DONE_FILE}) and "
                              f"has no finite checkpoint to resume from. To train again, {start_over}.")
        raise RecipeError(f"{output} holds a finished run ({DONE_FILE}) but no checkpoint to resume from "
                          f"(save_strategy: {getattr(training.save_strategy, 'value', training.save_strategy)})"
                          f": training would start over and replace it. To train again, {start_over}.")
    return None


def _optimizer_start(checkpoint: Path | None, state: dict[str, Any]) -> int:
    """The global step at which this segment's optimizer state began, recorded in every checkpoint it saves: a
    fresh optimizer (resume_without_optimizer_state) starts its step counters at the checkpoint's step."""
    if checkpoint is None:
        return 0
    if optimizer_problem(checkpoint) is not None:
        return int(state.get("global_step", 0))
    return optimizer_start(checkpoint)


def _run(experiment: Experiment, model_path: str, inputs: dict[str, Any], train_data: Any, heldout: Any,
         log) -> dict[str, float]:
    """Train (or take a finished checkpoint as it is), evaluate, measure, save; return the logged numbers."""
    args, training = experiment.args, experiment.training
    checkpoint = choose_checkpoint(experiment, log, inputs)
    forget_saved_optimizer()
    record = identity.manifest(inputs, _where(experiment, model_path),
                               identity.read_manifest(checkpoint) if checkpoint else None)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(training.output_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(training.output_dir) / identity.MANIFEST_FILE, record)
    state = (read_json(checkpoint / TRAINER_STATE) or {}) if checkpoint else {}
    finished = _holds_all_training(checkpoint, state, training.max_steps)
    adapter = str(checkpoint) if finished and experiment.model.use_peft else None
    base = str(checkpoint) if finished and adapter is None else model_path
    trainer, tokenizer = build_trainer(experiment, base, train_data, heldout, adapter=adapter)
    offset, segments, earlier_peak = saved_wall_time(checkpoint)
    memory = MemoryPhases(earlier_peak)
    memory.mark("load")
    show_bars = not training.disable_tqdm and trainer.is_local_process_zero()
    clock = {"offset": offset, "segments": segments + 1, "start": time.time(), "stopped": None,
             "optimizer_start": _optimizer_start(checkpoint, state)}
    accuracy, answers = _accuracy_scorer(experiment, heldout, tokenizer, show_bars)
    for callback in _callbacks(clock, accuracy if args.accuracy_during_training else None, record):
        trainer.add_callback(callback)
    watch = divergence_watch(trainer, log)
    blend_length_check(trainer, log)
    if finished:
        _take_finished_run(trainer, checkpoint, clock, log)
    else:
        _train(trainer, checkpoint)
    memory.mark("train")
    final: dict[str, float] = {WALL_TIME_KEY: _seconds(clock), SEGMENTS_KEY: float(clock["segments"])}
    step = trainer.state.global_step
    diverged = watch.mark or next((e[DIVERGED_KEY] for e in trainer.state.log_history if DIVERGED_KEY in e), None)
    correct = None
    if diverged is not None:
        log("[train] a diverged run is not evaluated: its weights are not finite")
    else:
        correct = _evaluate(trainer, accuracy, args.accuracy_during_training, memory, final)
        if args.sharpness:
            final.update(_sharpness_entries(trainer, args.sharpness_settings(seed=training.seed), show_bars, log))
            memory.mark("sharpness")
    # The whole run's peak, training and everything after it (a resumed run: the largest of its segments').
    final.update(memory.numbers())
    if trainer.is_world_process_zero():
        log(f"[train] {memory.summary()}")
    trainer.log(final)
    generated = answers.get(step) if correct is not None else None
    _save_run(trainer, training.output_dir, diverged, correct, generated, memory.peak_phase, record, log)
    numbers = {k: v for e in trainer.state.log_history for k, v in e.items() if isinstance(v, (int, float))}
    return numbers | ({} if diverged is None else {"diverged_at_step": float(diverged["step"])})


def _train(trainer: Any, checkpoint: Path | None) -> None:
    """Train, from ``checkpoint`` if given. An optimizer that refuses the checkpoint's state (its
    ``load_state_dict`` raises ValueError, e.g. a moment of another shape, or damaged) ends the run in one line
    naming the checkpoint, whatever the optimizer's words."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except ValueError as error:
        if checkpoint is None or not _raised_loading_the_optimizer(error):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecipeError(f"cannot resume from {checkpoint}: its optimizer state does not load: {reason}; resume from "
                          "an earlier checkpoint, or start over with --overwrite_output_dir true") from None


def _raised_loading_the_optimizer(error: BaseException) -> bool:
    """Whether ``error`` was raised while the Trainer loaded a checkpoint's optimizer state."""
    import traceback

    # The Trainer's method that loads optimizer.pt and hands it to the optimizer's load_state_dict.
    return any(frame.f_code.co_name == "_load_optimizer_and_scheduler"
               for frame, _ in traceback.walk_tb(error.__traceback__))


def _holds_all_training(checkpoint: Path | None, state: dict[str, Any], max_steps: int) -> bool:
    """Whether the checkpoint (``state``: its trainer state) already holds all the training the arguments ask
    for: ``max_steps`` when set, else the run length the checkpoint recorded."""
    planned = max_steps if max_steps > 0 else state.get("max_steps", math.inf)
    return checkpoint is not None and state.get("global_step", 0) >= planned


def _accuracy_scorer(experiment: Experiment, heldout: Any, tokenizer: Any,
                     show_bars: bool) -> tuple[Callable[[Any, int], list[bool]] | None, dict[int, Any]]:
    """(scorer, answers): exact match on the first ``accuracy_size`` held-out problems (chat tasks only; None
    otherwise), scored once per step, and the generated text of each scored step, filled in as it scores."""
    args = experiment.args
    answers: dict[int, Any] = {}
    if args.task != "sft" or not args.accuracy_size:
        return None, answers
    problems = heldout.select(range(min(args.accuracy_size, len(heldout))))
    scored: dict[int, list[bool]] = {}

    def accuracy(model: Any, step: int) -> list[bool]:
        if step not in scored:
            scored[step], answers[step] = score_answers(
                model, tokenizer, problems, max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
                show_bar=show_bars)
        return scored[step]

    return accuracy, answers


def _take_finished_run(trainer: Any, checkpoint: Path, clock: dict[str, Any], log) -> None:
    """Take a checkpoint that holds all the training as the trained run. Training again would take one more
    step past the end (the Trainer's resume does that); the checkpoint's weights and log are the finished run,
    so only what follows training is redone, and the wall clock stays at the checkpoint's."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
    clock["stopped"], clock["segments"] = clock["offset"], max(clock["segments"] - 1, 1)
    log(f"[train] {checkpoint} finished training at step {trainer.state.global_step}: evaluating it, "
        "training nothing")


def _evaluate(trainer: Any, accuracy: Callable[[Any, int], list[bool]] | None, accuracy_during_training: bool,
              memory: MemoryPhases, final: dict[str, float]) -> list[int] | None:
    """The held-out loss (unless the log has it for the last step) and exact match at the last step. Adds the
    accuracy to ``final`` unless the evaluation callback logged it for that step; returns each problem's score
    (1 right, 0 wrong), or None without an accuracy scorer."""
    step = trainer.state.global_step
    if not any(EVAL_LOSS_KEY in e and e.get("step") == step for e in trainer.state.log_history):
        trainer.evaluate()  # with accuracy_during_training this also scores the accuracy at this step
        memory.mark("evaluate")
    if accuracy is None:
        return None
    correct = [int(r) for r in accuracy(trainer.model, step)]
    memory.mark("accuracy")
    if not (accuracy_during_training and any(ACCURACY_KEY in e and e.get("step") == step
                                             for e in trainer.state.log_history)):
        final[ACCURACY_KEY] = sum(correct) / len(correct)
    return correct


def _sharpness_entries(trainer: Any, settings: Any, show_bars: bool, log) -> dict[str, float]:
    """The trained model's sharpness as log entries (keys under :data:`.sharpness.SHARPNESS_PREFIX`).
    Non-finite numbers (e.g. the standard error of a single probe) are left out: JSON has no NaN."""
    from .sharpness import measure_sharpness

    numbers = measure_sharpness(trainer.model, eval_batches(trainer, settings.batches, settings.batch_size),
                                settings, show_bar=show_bars)
    if not numbers["eigenvalue_converged"]:
        change = numbers["eigenvalue_relative_change"]
        log(f"[train] sharpness: the top eigenvalue {numbers['top_eigenvalue']:.6g} stopped at the cap of "
            f"{settings.max_iters} power iterations (last relative change {change:.2g}, tolerance {settings.tol:g})"
            ": sharpness/eigenvalue_converged is 0; raise sharpness_max_iters for a converged estimate")
    return {f"{SHARPNESS_PREFIX}{k}": float(v) for k, v in numbers.items() if math.isfinite(v)}


def _save_run(trainer: Any, output_dir: str, diverged: dict[str, Any] | None, correct: list[int] | None,
              generated: Any, peak_phase: str, record: dict[str, Any], log) -> None:
    """Save the final weights (only finite ones: a folder a user loads holds finite weights, or none) and the
    trainer state; then, from the first process, the accuracy files, the manifest and, last, :data:`DONE_FILE`,
    whose presence marks the run finished. The manifest, its last segment ended, also closes the log history,
    so every log made of it (a comparison's raw logs) carries it."""
    record = identity.ended(record)
    trainer.state.log_history.append({identity.MANIFEST_KEY: record, "step": trainer.state.global_step})
    if diverged is None:
        trainer.save_model()
    elif trainer.is_world_process_zero():
        log(f"[train] the diverged weights are not saved to {output_dir}: {finite_checkpoint_words(output_dir)}")
    trainer.save_state()
    if trainer.is_world_process_zero():
        output = Path(output_dir)
        if correct is not None:
            write_atomically(output / ACCURACY_ROWS_FILE, correct)
            write_atomically(output / ACCURACY_ANSWERS_FILE, generated)
        write_atomically(output / identity.MANIFEST_FILE, record)
        write_atomically(output / DONE_FILE, {DONE_LOG_KEY: trainer.state.log_history, DONE_ROWS_KEY: correct,
                                              DONE_ANSWERS_KEY: generated, DIVERGED_KEY: diverged,
                                              "peak_memory_phase": peak_phase, identity.MANIFEST_KEY: record})
