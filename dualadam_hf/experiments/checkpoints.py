"""Which checkpoint a run resumes from, and whether it can: nothing lost, nothing silently restarted.

A kill during a save leaves a folder without ``trainer_state.json`` (the Trainer writes it last) or with
truncated files: ``last`` takes the newest complete checkpoint and says which it skipped. A checkpoint without
optimizer state is refused: resuming would restart the optimizer (DualAdam's bias correction and blend) silently.
So is one whose step count disagrees with its folder name or its optimizer (the Trainer trusts the number, and
would take the run as finished, or train past its end), and a resume that asks for other settings than the
checkpoint holds (the Trainer would continue with the checkpoint's optimizer settings without a word).

transformers is imported inside the functions that need it: the comparison imports this module for
:func:`read_json` and :func:`folder_lock`, and should not wait for transformers to load.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..integrations.optim_args import BOOLEAN_WORDS
from . import identity
from .arguments import RecipeError

if TYPE_CHECKING:
    from transformers import TrainerState

TRAINER_STATE = "trainer_state.json"  # the name the Trainer saves its state under
OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's optimizer state outside DeepSpeed and FSDP
TRAINING_ARGS_FILE = "training_args.bin"  # the Trainer's arguments, pickled by torch.save
WALL_TIME = "wall_time.json"
# The key of wall_time.json that holds the global step at which the optimizer state began: 0, or the step of a
# resume that accepted a fresh optimizer (resume_without_optimizer_state), whose step counters start over there.
OPTIMIZER_START_KEY = "optimizer_started_at_step"
# Its other keys: the training seconds before the checkpoint, the processes (segments) they took and their peak
# memory in MB (wall_time_record writes them, saved_wall_time reads them).
_SECONDS_KEY, _SEGMENTS_KEY, _PEAK_MEMORY_KEY = "train_seconds", "segments", "peak_memory_mb"
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
    if (folder.parent / identity.MANIFEST_FILE).is_file() and identity.read_manifest(folder) is None:
        # A run that has a manifest writes it into each checkpoint right after the Trainer's own files (the
        # Trainer's save ends with trainer_state.json): one without it was cut off in between.
        return f"no {identity.MANIFEST_FILE}: the save was cut off"
    return None


def optimizer_problem(folder: Path) -> str | None:
    """Why a checkpoint's optimizer state cannot be resumed (None when it can): torch's ``optimizer.pt``,
    accelerate's FSDP ``optimizer.bin`` / ``optimizer_0`` or DeepSpeed's ``global_step*`` folders."""
    if any(folder.glob("global_step*")) or (folder / "optimizer.bin").is_file() or (folder / "optimizer_0").is_dir():
        return None
    file = folder / OPTIMIZER_FILE
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


def resume_kind(value: str | bool | None) -> str | None:
    """What ``resume_from_checkpoint`` asks: None (no resume), ``"last"`` (the newest complete checkpoint in
    output_dir) or ``"folder"`` (the checkpoint folder it names)."""
    text = str(value)
    word = None if text.isdigit() else BOOLEAN_WORDS.get(text.lower())  # digits name a folder (BOOLEAN_WORDS)
    if value is None or value is False or text == "" or word is False:
        return None
    return "last" if value is True or text.lower() == "last" or word else "folder"


def resume_checkpoint(value: str | bool | None, output_dir: str | Path, *, allow_fresh_optimizer: bool = False,
                      log=print) -> Path | None:
    """The checkpoint to resume from: a folder, or ``last``/``true`` for the newest complete one in output_dir.
    A RecipeError when its optimizer state is missing or damaged, unless ``allow_fresh_optimizer`` (then a log),
    and when its step count is not one the checkpoint agrees with (:func:`step_problem`)."""
    if (kind := resume_kind(value)) is None:
        return None
    if kind == "last":
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
    if (fresh := optimizer_problem(chosen)) is not None:
        if not allow_fresh_optimizer:
            raise RecipeError(f"cannot resume from {chosen}: {fresh}. Resuming would restart the optimizer (for "
                              "DualAdam: bias correction and the blend) from step 1. Set "
                              "resume_without_optimizer_state: true to accept that.")
        log(f"[train] resuming from {chosen} with a fresh optimizer: {fresh}")
    if (problem := step_problem(chosen, with_optimizer=fresh is None)) is not None:
        raise RecipeError(f"cannot resume from {chosen}: {problem}")
    saved = saved_optimizer(chosen) if fresh is None else None
    if saved is not None and (problem := dualadam_state_problem(saved)) is not None:
        raise RecipeError(f"cannot resume from {chosen}: {chosen / OPTIMIZER_FILE}: {problem}; resume from an "
                          "earlier checkpoint, or start over with --overwrite_output_dir true")
    return chosen


def checkpoint_number(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder (None for a folder named otherwise)."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


# The optimizer state last read, by its file's (path, size, times, inode): the checks of one resume read it once.
_SAVED_OPTIMIZER: dict[tuple[str, int, int, int, int], dict[str, Any]] = {}


def saved_optimizer(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's ``optimizer.pt`` (None without one: DeepSpeed and FSDP save theirs elsewhere).

    Memory-mapped: only the small pickled part (groups, which states exist, the tensors' shapes) is read; the
    moments' values stay on disk unless something reads them, and the checks before the Trainer starts read
    only the step counters. Read once while the file stays the same, however many checks ask. A file torch
    cannot read as an optimizer state is a RecipeError (the Trainer would fail on it when it resumes)."""
    import torch

    file = folder / OPTIMIZER_FILE
    if not file.is_file():
        return None
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key in _SAVED_OPTIMIZER:
        return _SAVED_OPTIMIZER[key]
    _know_quantized_state()
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, ValueError) as error:
        raise RecipeError(f"{file} is not an optimizer state torch can read ({_first_line(error)})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise RecipeError(f"{file} is not an optimizer state: expected the state and param_groups of "
                          "Optimizer.state_dict()")
    _SAVED_OPTIMIZER.clear()  # one at a time: a memory map of a large file is not kept for nothing
    _SAVED_OPTIMIZER[key] = saved
    return saved


def forget_saved_optimizer() -> None:
    """Let go of the optimizer state :func:`saved_optimizer` keeps (and its memory map), once the checks that
    read it are done."""
    _SAVED_OPTIMIZER.clear()


def _know_quantized_state() -> None:
    """Let ``weights_only`` loading read low-bit DualAdam state (``state_bits``): torchao registers its quantized
    tensor classes as safe globals when they are imported. Without torchao there is no such state to read."""
    try:
        from ..lowbit import state_types

        state_types()
    except ImportError:
        pass


def dualadam_state_problem(saved: dict[str, Any]) -> str | None:
    """What DualAdam's ``load_state_dict`` would refuse in a saved DualAdam/InvAdam state and can be told from
    its pickled part, found before the Trainer starts (None for a sound one, or another optimizer's): a group
    setting the constructor refuses, or a step counter that is not a whole number >= 0. The moments' values are
    not read here (for a large model, gigabytes the Trainer reads again): ``load_state_dict`` checks them, and
    the run says what it refuses in one line."""
    from ..optimizer import check_group, saved_by_dualadam, step_problem

    if not saved_by_dualadam(saved):
        return None
    for index, group in enumerate(saved["param_groups"]):
        settings = {**group, "betas": tuple(group["betas"]) if isinstance(group.get("betas"), list) else
                    group.get("betas")}
        try:
            check_group(settings)
        except (ValueError, KeyError, ImportError) as error:
            return f"param group {index}: {_first_line(error)}"
    for pid, entry in saved["state"].items():
        if isinstance(entry, dict) and "step" in entry and (problem := step_problem(entry["step"])) is not None:
            return f"the state of parameter {pid} is damaged ({problem})"
    return None


def optimizer_steps(saved: dict[str, Any]) -> int | None:
    """The optimizer steps a saved state has taken: the largest per-parameter ``step`` counter (None when its
    optimizer keeps none, or has taken no step)."""
    steps = [float(entry["step"]) for entry in saved["state"].values() if isinstance(entry, dict) and "step" in entry]
    return int(max(steps)) if steps else None


class _Pickled:
    """An object of any class in a pickle, kept as plain data: its class is never imported and no code of it
    runs. An enum member arrives as its value in ``args``, a dataclass as its fields in ``state``."""

    def __new__(cls, *args: Any) -> _Pickled:  # pickle makes most objects by __new__ alone
        made = super().__new__(cls)
        made.args, made.state = args, {}
        return made

    def __init__(self, *args: Any) -> None:  # an enum member is made by calling its class with its value
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def plain(self) -> Any:
        return self.args[0] if len(self.args) == 1 and not self.state else self


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return type(name, (_Pickled,), {})

    def persistent_load(self, pid: Any) -> None:  # tensors: the arguments hold none that matter here
        return None


def saved_training_arguments(folder: Path) -> dict[str, Any] | None:
    """The fields of the TrainingArguments/SFTConfig the Trainer pickled into ``training_args.bin`` (None when
    there is no such file, or it is not one). Read without unpickling any class: a checkpoint folder may come
    from anywhere, and loading a pickle runs whatever code it names."""
    file = folder / TRAINING_ARGS_FILE
    try:
        with zipfile.ZipFile(file) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            loaded = _DataOnly(io.BytesIO(archive.read(name))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError):
        return None
    state = loaded.state if isinstance(loaded, _Pickled) else None
    if isinstance(state, tuple) and state and isinstance(state[0], dict):  # (__dict__, slots)
        state = state[0]
    return {key: _plain(value) for key, value in state.items()} if isinstance(state, dict) else None


def _plain(value: Any) -> Any:
    """A value as compared between a checkpoint and a command: enums by their value, lists as tuples."""
    value = value.plain() if isinstance(value, _Pickled) else getattr(value, "value", value)
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def optimizer_start(checkpoint: Path | None) -> int:
    """The global step at which the checkpoint's optimizer state began (:data:`OPTIMIZER_START_KEY`; 0 when
    the run did not record one: its optimizer ran from the start)."""
    data = read_json(checkpoint / WALL_TIME) if checkpoint is not None else None
    value = data.get(OPTIMIZER_START_KEY, 0) if isinstance(data, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def step_problem(folder: Path, with_optimizer: bool = True) -> str | None:
    """Why a complete checkpoint's ``global_step`` cannot be trusted (None when it can).

    It must be a whole number >= 0, the N of the folder's name ``checkpoint-N``, and the number of optimizer steps
    ``optimizer.pt`` has taken (one per global step, gradient accumulation or not), counted from where the
    optimizer state began (:func:`optimizer_start`). Under fp16 the loss scaler skips the steps whose gradients
    overflow: there the optimizer may have taken fewer."""
    file = folder / TRAINER_STATE
    data = read_json(file)
    step = data.get("global_step") if isinstance(data, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"{file}: global_step must be a whole number >= 0, got {step!r}"
    planned = data.get("max_steps", 0)
    if isinstance(planned, bool) or not isinstance(planned, int):  # the Trainer compares it with the step count
        return f"{file}: max_steps must be a whole number, got {planned!r}"
    if (number := checkpoint_number(folder)) is not None and step != number:
        return f"{file}: global_step is {step}, but the folder {folder.name} was saved at step {number}"
    saved = saved_optimizer(folder) if with_optimizer else None
    taken = None if saved is None else optimizer_steps(saved)
    if taken is None:
        return None
    expected = step - optimizer_start(folder)
    fp16 = bool((saved_training_arguments(folder) or {}).get("fp16"))
    if taken > expected or (taken < expected and not fp16):
        return (f"{file}: global_step is {step}, but {folder / OPTIMIZER_FILE} has taken {taken} optimizer steps"
                + (f" since step {step - expected}" if expected != step else "") + f" (expected {expected})")
    return None


# The arguments a checkpoint fixes. A resume continues with the checkpoint's optimizer state (its settings
# included), scheduler, RNG state and position in the data, so another value asked on resume would be dropped
# without a word, or mixed with the checkpoint's into a run neither value describes.
FIXED_ARGUMENTS = ("optim", "optim_args", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                   "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                   "max_steps", "num_train_epochs", "seed", "per_device_train_batch_size",
                   "gradient_accumulation_steps")
# The optimizer's param-group settings a checkpoint fixes (torch's load_state_dict takes the saved ones), with
# the argument each comes from: a difference already named there is not named twice.
FIXED_GROUP_SETTINGS = {"lr": "learning_rate", "betas": "adam_beta", "eps": "adam_epsilon",
                        "weight_decay": "weight_decay", "switch_rate": "optim_args", "blend_fraction": "optim_args",
                        "inverse_scale": "optim_args"}


def _same(saved: Any, asked: Any) -> bool:
    if isinstance(saved, int | float) and isinstance(asked, int | float) \
            and not isinstance(saved, bool) and not isinstance(asked, bool):
        return math.isclose(saved, asked, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(saved, tuple) and isinstance(asked, tuple):
        return len(saved) == len(asked) and all(_same(s, a) for s, a in zip(saved, asked, strict=True))
    return saved == asked


def _optim_args_pairs(text: Any) -> Any:
    from ..integrations.optim_args import parse_pairs

    try:
        return parse_pairs(text, "optim_args") if isinstance(text, str | type(None)) else text
    except ValueError:
        return text


def _asked_group_settings(training: Any) -> dict[str, Any] | None:
    """The param-group settings the optimizer this command asks for starts with (None when it cannot be built
    without the model; the Trainer then reports its own problem)."""
    import torch

    from ..integrations.transformers import register

    register()  # the Trainer builds DualAdam and InvAdam for their names
    from transformers import Trainer

    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training)
        with warnings.catch_warnings():  # the real construction at train start warns, once
            warnings.simplefilter("ignore")
            return dict(optimizer_cls([torch.zeros(1, requires_grad=True)], **kwargs).defaults)
    except Exception:  # noqa: BLE001 - an optimizer that needs the model, or other arguments than these
        return None


def setting_changes(checkpoint: Path, training: Any) -> list[str]:
    """The settings the checkpoint fixes that differ from what ``training`` (this command's arguments) asks,
    each as ``"name: checkpoint X, asked Y"``: :data:`FIXED_ARGUMENTS` as the Trainer recorded them in
    ``training_args.bin``, and the optimizer's param-group settings in ``optimizer.pt``. A group's learning rate
    is compared at its start (``initial_lr``, which a scheduler keeps; ``lr`` is where the schedule is)."""
    from ..schedule import switch_rate_from_fraction

    changes: list[str] = []
    recorded = saved_training_arguments(checkpoint) or {}
    asked_max_steps = getattr(training, "max_steps", -1)
    for name in FIXED_ARGUMENTS:
        if name not in recorded or not hasattr(training, name):
            continue
        if name == "num_train_epochs" and asked_max_steps > 0:
            continue  # max_steps rules: the number of epochs changes nothing
        saved, asked = recorded[name], _plain(getattr(training, name))
        same = (_optim_args_pairs(saved) == _optim_args_pairs(asked)) if name == "optim_args" else _same(saved, asked)
        if not same:
            changes.append(f"{name}: checkpoint {saved!r}, asked {asked!r}")
    optimizer = saved_optimizer(checkpoint)
    asked_group = _asked_group_settings(training) if optimizer is not None else None
    if optimizer is None or asked_group is None or any(change.startswith("optim:") for change in changes):
        return changes
    named = {change.split(":", 1)[0] for change in changes}
    weight_decays = {0.0, float(training.weight_decay)}  # the Trainer exempts biases and norms from decay
    for index, group in enumerate(optimizer["param_groups"]):
        for key, argument in FIXED_GROUP_SETTINGS.items():
            if key not in group or key not in asked_group or any(n.startswith(argument) for n in named):
                continue
            saved = _plain(group.get("initial_lr", group["lr"]) if key == "lr" else group[key])
            asked = _plain(asked_group[key])
            if key == "switch_rate" and asked_group.get("blend_fraction") is not None:
                if asked_max_steps <= 0:
                    continue  # resolved at train start from the run length the epochs give
                asked = switch_rate_from_fraction(asked_group["blend_fraction"], asked_max_steps)
            if key == "weight_decay":
                if any(_same(saved, decay) for decay in weight_decays):
                    continue
                asked = float(training.weight_decay)
            if not _same(saved, asked):
                changes.append(f"{OPTIMIZER_FILE} param group {index} {key}: checkpoint {saved!r}, asked {asked!r}")
                named.add(argument)
    return changes


def check_resume_inputs(checkpoint: Path, inputs: dict[str, Any]) -> None:
    """A RecipeError unless the checkpoint's manifest records the inputs this command asks for (``inputs``, as
    :func:`.identity.run_inputs` gives them), naming each difference; also when it records none (saved by an
    earlier version, or by another program): whether the model, the data or a setting changed cannot be told."""
    start_over = "start over with --overwrite_output_dir true, or give another output_dir"
    saved = identity.read_manifest(checkpoint)
    if saved is None:
        raise RecipeError(f"cannot resume from {checkpoint}: it holds no {identity.MANIFEST_FILE} (saved by an earlier "
                          "version of dualadam-hf, or by another program), so whether this command's model, data "
                          f"and settings are the run's cannot be told; {start_over}")
    if changes := identity.differences(saved["inputs"], inputs):
        raise RecipeError(f"cannot resume from {checkpoint}: the run was started with other inputs: "
                          f"{', '.join(changes)}; ask for the run's inputs to continue it, or {start_over}")


def check_resume_settings(checkpoint: Path, training: Any) -> None:
    """A RecipeError naming each setting this command asks for that the checkpoint fixes otherwise
    (:func:`setting_changes`)."""
    if changes := setting_changes(checkpoint, training):
        raise RecipeError(f"cannot resume from {checkpoint}: this command asks for other settings than the run "
                          f"it continues ({'; '.join(changes)}); resuming would keep the checkpoint's optimizer, "
                          "schedule and data order. Ask for the checkpoint's values to continue it, or start over "
                          "with --overwrite_output_dir true (or another output_dir).")


def wall_time_record(seconds: float, segments: int, peak_memory_mb: float, optimizer_start: int) -> dict[str, Any]:
    """The contents of a checkpoint's :data:`WALL_TIME` file, as :func:`saved_wall_time` and
    :func:`optimizer_start` read them."""
    return {_SECONDS_KEY: seconds, _SEGMENTS_KEY: segments, _PEAK_MEMORY_KEY: peak_memory_mb,
            OPTIMIZER_START_KEY: optimizer_start}


def saved_wall_time(checkpoint: Path | None) -> tuple[float, int, float]:
    """(training seconds before this checkpoint, segments, peak memory in MB, 0 if not recorded) as recorded
    by the run that saved it."""
    if checkpoint is None:
        return 0.0, 0, 0.0
    data = read_json(checkpoint / WALL_TIME)
    try:
        return float(data[_SECONDS_KEY]), int(data[_SEGMENTS_KEY]), float(data.get(_PEAK_MEMORY_KEY, 0.0))
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
