"""Which checkpoint a run resumes from, and whether it can: nothing lost, nothing silently restarted.

A kill during a save leaves a checkpoint folder without ``trainer_state.json`` (the Trainer writes it
last) or with truncated files. ``last`` takes the newest complete checkpoint and says which incomplete
ones it skipped. A complete checkpoint without optimizer state is refused: resuming from it would restart
the optimizer (for DualAdam: bias correction and the blend) without a word.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from .arguments import RecipeError

TRAINER_STATE = "trainer_state.json"
WALL_TIME = "wall_time.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, newest (largest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_state(folder: Path) -> dict | None:
    """The checkpoint's trainer_state.json, or None if it is missing or cut off."""
    try:
        return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder is not a finished save (None when it is)."""
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}: the save was cut off"
    if read_state(folder) is None:
        return f"{TRAINER_STATE} is truncated"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    return None


def _zip_problem(file: Path) -> str | None:
    # torch.save writes a zip archive; a truncated one has lost its central directory at the end.
    if file.stat().st_size == 0:
        return f"{file} is empty"
    try:
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{file} is truncated or corrupt ({error})"
    return None


def optimizer_problem(folder: Path) -> str | None:
    """Why a checkpoint's optimizer state cannot be resumed (None when it can).

    Accepts torch's ``optimizer.pt``, accelerate's FSDP ``optimizer.bin`` / ``optimizer_0`` and DeepSpeed's
    ``global_step*`` folders.
    """
    if any(folder.glob("global_step*")) or (folder / "optimizer.bin").is_file() or (folder / "optimizer_0").is_dir():
        return None
    file = folder / "optimizer.pt"
    if not file.is_file():
        return f"{folder} has no optimizer state ({file.name} is missing)"
    return _zip_problem(file)


def resume_checkpoint(value: str | bool | None, output_dir: str | Path, *, allow_fresh_optimizer: bool = False,
                      log=print) -> Path | None:
    """The checkpoint to resume from: a folder, or ``last``/``true`` for the newest complete one in output_dir.

    Raises RecipeError when the chosen checkpoint's optimizer state is missing or damaged, unless
    ``allow_fresh_optimizer`` (then it only says so).
    """
    if value is None or value is False or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes"):
        chosen = None
        for folder in checkpoint_folders(output_dir):
            reason = incomplete_reason(folder)
            if reason is None:
                chosen = folder
                break
            log(f"[train] skipping incomplete checkpoint {folder}: {reason}")
        if chosen is None:
            return None
    else:
        chosen = Path(str(value))
        if not chosen.is_dir():
            raise RecipeError(f"resume_from_checkpoint: checkpoint folder not found: {value}")
        reason = incomplete_reason(chosen)
        if reason is not None:
            raise RecipeError(f"resume_from_checkpoint: {chosen} is not a complete checkpoint: {reason}")
    problem = optimizer_problem(chosen)
    if problem is not None:
        if not allow_fresh_optimizer:
            raise RecipeError(
                f"cannot resume from {chosen}: {problem}. Resuming would restart the optimizer (for DualAdam: bias "
                "correction and the blend) from step 1. Set resume_without_optimizer_state: true to accept that."
            )
        log(f"[train] resuming from {chosen} with a fresh optimizer: {problem}")
    return chosen


def saved_wall_time(checkpoint: Path | None) -> tuple[float, int]:
    """(training seconds before this checkpoint, segments) as recorded by the run that saved it."""
    if checkpoint is None:
        return 0.0, 0
    try:
        data = json.loads((checkpoint / WALL_TIME).read_text(encoding="utf-8"))
        return float(data["train_seconds"]), int(data["segments"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, 1  # saved by a run that did not record it: one earlier segment of unknown length
