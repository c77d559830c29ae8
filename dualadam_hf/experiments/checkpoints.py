"""Which checkpoint a run resumes from, and whether it can: nothing lost, nothing silently restarted.

A kill during a save leaves a folder without ``trainer_state.json`` (the Trainer writes it last) or with
truncated files: ``last`` takes the newest complete checkpoint and says which it skipped. A checkpoint without
optimizer state is refused: resuming would restart the optimizer (DualAdam's bias correction and blend) silently.

transformers is imported inside the functions that need it: the comparison imports this module for
:func:`read_json` and :func:`folder_lock`, and should not wait for transformers to load.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arguments import RecipeError

if TYPE_CHECKING:
    from transformers import TrainerState

TRAINER_STATE = "trainer_state.json"  # the name the Trainer saves its state under
WALL_TIME = "wall_time.json"
# The files a saved model or adapter keeps its weights in: one of them makes a folder hold a model.
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")
# The Trainer's checkpoint folder names, as its get_last_checkpoint matches them.
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, newest (largest N) first.

    The newest is the one ``transformers.trainer_utils.get_last_checkpoint`` picks. That function gives the
    newest alone, whatever its state; the whole list lets a caller pass over a save that was cut off.
    """
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_json(file: Path) -> Any:
    """A JSON file's content, or None if it is missing or cut off (being written when the run was killed)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: cut off inside the JSON or inside a UTF-8 character
        return None


def load_trainer_state(folder: Path) -> TrainerState | None:
    """A checkpoint's trainer state, read as the Trainer reads it when it resumes (``TrainerState.load_from_json``).

    None when the file is missing or cut off: the run was killed while saving. A whole file that is not a state
    this transformers version reads is a RecipeError. Passing over it would pass over a finished save, and the
    Trainer would fail on it anyway when it resumes.
    """
    from transformers import TrainerState

    file = folder / TRAINER_STATE
    try:
        return TrainerState.load_from_json(str(file))
    except (OSError, ValueError):
        return None
    except TypeError as error:  # valid JSON, but not the fields of TrainerState (a list, or unknown keys)
        raise RecipeError(f"{file} is not a trainer state this transformers version reads ({error}); was it "
                          "saved by another version of transformers?") from None


def holds_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model or adapter weights (one of :data:`WEIGHT_FILES`)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder is not a finished save (None when it is)."""
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}: the save was cut off"
    if load_trainer_state(folder) is None:
        return f"{TRAINER_STATE} is truncated"
    if not holds_weights(folder):
        return "no model weights"
    return None


def optimizer_problem(folder: Path) -> str | None:
    """Why a checkpoint's optimizer state cannot be resumed (None when it can): torch's ``optimizer.pt``,
    accelerate's FSDP ``optimizer.bin`` / ``optimizer_0`` or DeepSpeed's ``global_step*`` folders."""
    if any(folder.glob("global_step*")) or (folder / "optimizer.bin").is_file() or (folder / "optimizer_0").is_dir():
        return None
    file = folder / "optimizer.pt"
    if not file.is_file():
        return f"{folder} has no optimizer state ({file.name} is missing)"
    if file.stat().st_size == 0:
        return f"{file} is empty"
    try:  # torch.save writes a zip archive; a truncated one has lost its central directory at the end
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{file} is truncated or corrupt ({error})"
    return None


def resume_checkpoint(value: str | bool | None, output_dir: str | Path, *, allow_fresh_optimizer: bool = False,
                      log=print) -> Path | None:
    """The checkpoint to resume from: a folder, or ``last``/``true`` for the newest complete one in output_dir.
    A RecipeError when its optimizer state is missing or damaged, unless ``allow_fresh_optimizer`` (then a log)."""
    if value is None or value is False or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes"):
        for chosen in checkpoint_folders(output_dir):
            if (reason := incomplete_reason(chosen)) is None:
                break
            log(f"[train] skipping incomplete checkpoint {chosen}: {reason}")
        else:
            return None
    else:
        chosen = Path(str(value))
        if not chosen.is_dir():
            raise RecipeError(f"resume_from_checkpoint: checkpoint folder not found: {value}")
        if (reason := incomplete_reason(chosen)) is not None:
            raise RecipeError(f"resume_from_checkpoint: {chosen} is not a complete checkpoint: {reason}")
    if (problem := optimizer_problem(chosen)) is not None:
        if not allow_fresh_optimizer:
            raise RecipeError(f"cannot resume from {chosen}: {problem}. Resuming would restart the optimizer (for "
                              "DualAdam: bias correction and the blend) from step 1. Set "
                              "resume_without_optimizer_state: true to accept that.")
        log(f"[train] resuming from {chosen} with a fresh optimizer: {problem}")
    return chosen


def saved_wall_time(checkpoint: Path | None) -> tuple[float, int, float]:
    """(training seconds before this checkpoint, segments, peak memory in MB, 0 if not recorded) as recorded
    by the run that saved it."""
    if checkpoint is None:
        return 0.0, 0, 0.0
    data = read_json(checkpoint / WALL_TIME)
    try:
        return float(data["train_seconds"]), int(data["segments"]), float(data.get("peak_memory_mb", 0.0))
    except (ValueError, KeyError, TypeError):  # None (no file), or a file without these numbers
        return 0.0, 1, 0.0  # saved by a run that did not record it: one earlier segment of unknown length


@contextlib.contextmanager
def folder_lock(folder: str | Path, lock_name: str, holder: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (an flock on ``folder/lock_name``, created with the folder) while the
    block runs; when another process holds it, a RecipeError naming that ``holder`` and its pid.

    The kernel drops the lock when its holder dies, however it dies (kill -9 included), so a stale lock file
    never blocks anyone; the file itself stays (removing it could race with the next holder)."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            raise RecipeError(f"another {holder} (pid {pid}) is running in {folder}; wait for it to end, or stop it "
                              "first (two at once would overwrite each other's checkpoints)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
