"""Measure how sharp a trained model's minimum is on fixed evaluation batches, w.r.t. its trainable parameters;
print a table, write sharpness.json into the model folder or --output. docs/flatness.md: the numbers, the cost.

    dualadam-hf sharpness --model outputs/smollm2_chainsum_lora --config recipes/smollm2_chainsum_lora.yaml
    dualadam-hf sharpness --model <model or adapter folder> --data heldout.jsonl
    dualadam-hf sharpness --model <model or adapter folder> --random_batches   # smoke test, no data needed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from transformers import HfArgumentParser

from . import identity
from .arguments import RecipeError, find_recipe, load_experiment
from .checkpoints import WEIGHT_FILES, checkpoint_folders, holds_weights, incomplete_reason, read_json
from .data import jsonl_batches, load_splits, read_rows
from .models import adapter_config, is_classifier_config, load_model, load_tokenizer, resolve_model
from .sharpness import DEFAULT_BATCH_SIZE, SharpnessSettings, is_causal_lm, measure_sharpness
from .train import DONE_FILE
from .trainers import build_trainer, eval_batches
from .watch import DIVERGED_KEY, finite_checkpoint_words

PROG = "dualadam-hf sharpness"
RESULT_FILE = "sharpness.json"
DEFAULT_MAX_LENGTH = 64
HEADLINE = ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst", "sharpness_random")  # printed first
# Keeps the description's example lines and shows each default.
_HELP_FORMAT = type("HelpFormat", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})


class SharpnessError(ValueError):
    """A bad argument or input; the message says what to change."""


@dataclass
class SharpnessCommand:
    """What the command needs besides the measurement settings: the model, the data and where to write."""

    model: str = field(metadata={"help": "A model or PEFT adapter folder, a run folder (its final model, else "
                                         "its newest complete checkpoint-N), or an alias (smollm2-135m-instruct)."})
    config: str | None = field(default=None, metadata={"help": "Recipe: batches of its held-out split, as trained."})
    data: str | None = field(default=None, metadata={"help": 'JSONL of "text", "messages" or "prompt"+"completion"'
                                                             ' rows (a classifier: "text" + integer "label").'})
    random_batches: bool = field(default=False, metadata={"help": "Random tokens: a smoke test, not a real number."})
    max_length: int | None = field(default=None, metadata={
        "help": f"Tokens per row (None: the recipe's max_length with --config, else {DEFAULT_MAX_LENGTH})."})
    base_model: str | None = field(default=None, metadata={"help": "Base of a PEFT adapter (None: as it names)."})
    num_labels: int | None = field(default=None, metadata={"help": "Classes of a classifier adapter (None: its head)."})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float64", "bfloat16"),
                                                     "help": "Second derivatives need float32 or better."})
    device: str = field(default="cpu", metadata={"help": "Torch device, e.g. cpu, cuda, cuda:1."})
    output: str | None = field(default=None, metadata={"help": f"A .json file or a folder for {RESULT_FILE}."})
    quiet: bool = field(default=False, metadata={"help": "No progress lines on stderr."})


def check_command(command: SharpnessCommand) -> tuple[torch.device, Path]:
    """What can be checked before loading: one source of batches, sizes >= 1 (the settings check their own), a
    device that takes an allocation, and where sharpness.json goes (default: the --model folder as given)."""
    given = [name for name in ("config", "data", "random_batches") if getattr(command, name)]
    if not given:
        raise SharpnessError("say where the evaluation batches come from: --config, --data or --random_batches")
    if len(given) > 1:
        raise SharpnessError(f"give only one of --config, --data, --random_batches (got --{', --'.join(given)})")
    for name in ("max_length", "num_labels"):
        if (value := getattr(command, name)) is not None and value < 1:
            raise SharpnessError(f"--{name} must be >= 1, got {value}")
    try:  # a missing CUDA or a typo fails here, in one line
        torch.empty(0, device=(device := torch.device(command.device)))
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SharpnessError(f"--device {command.device!r} is not usable here: {reason}") from None
    if device.type == "meta":  # takes allocations but holds no numbers: every measurement would fail on .item()
        raise SharpnessError("--device meta holds shapes, not numbers: nothing can be measured there (give cpu or "
                             "cuda)")
    out = Path(command.output).expanduser() if command.output is not None else Path(resolve_model(command.model))
    out = out if out.suffix == ".json" and command.output is not None else out / RESULT_FILE
    if not out.parent.is_dir():
        raise SharpnessError(f"--output: folder {out.parent} does not exist (create it, or pick another)")
    if out.is_dir() or (out.exists() and not os.access(out, os.W_OK)):
        raise SharpnessError(f"--output: {out} is {'a folder, not a file' if out.is_dir() else 'not writable'}")
    try:
        tempfile.NamedTemporaryFile(dir=out.parent, prefix=".sharpness-", suffix=".probe").close()
    except OSError as error:
        raise SharpnessError(f"--output: cannot write into {out.parent}: {error}") from None
    return device, out


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """The folder itself if it holds a model, else its one final-model subfolder, else its newest complete
    checkpoint-N (cut-off saves are skipped). An alias names its local copy. The folder of a run marked diverged
    (in its ``run_done.json``) is refused: its weights are not finite."""
    folder = Path(resolve_model(str(name_or_path)))  # a RecipeError if there is none
    if not folder.is_dir():
        raise SharpnessError(f"--model {str(name_or_path)!r} is not a local folder")
    done = read_json(folder / DONE_FILE)
    if isinstance(done, dict) and isinstance(mark := done.get(DIVERGED_KEY), dict):
        # Its final weights, where an older run saved them, are not finite; its checkpoints are another model.
        kept = any(incomplete_reason(checkpoint) is None for checkpoint in checkpoint_folders(folder))
        raise SharpnessError(f"{folder} holds a run marked diverged at step {mark.get('step')} "
                             f"({folder / DONE_FILE}): its weights are not finite, so it has no sharpness; "
                             f"{finite_checkpoint_words(folder)}" + ("; pass that as --model to measure it" if kept
                                                                     else ""))
    if holds_weights(folder):
        return folder
    checkpoints = checkpoint_folders(folder)  # newest first
    finals = [d for d in sorted(folder.iterdir()) if d.is_dir() and d not in checkpoints and holds_weights(d)]
    if len(finals) > 1:
        raise SharpnessError(f"{folder} holds several models: {', '.join(d.name for d in finals)}; pass one as --model")
    if finals:
        return finals[0]
    reasons = {checkpoint: incomplete_reason(checkpoint) for checkpoint in checkpoints}
    if complete := [checkpoint for checkpoint, reason in reasons.items() if reason is None]:
        return complete[0]
    skipped = ", ".join(f"{checkpoint.name} ({reason})" for checkpoint, reason in reasons.items())
    raise SharpnessError(f"no model in {folder}: expected model weights ({' or '.join(WEIGHT_FILES[:2])}, ...) there, "
                         "in one final-model subfolder, or a complete checkpoint-N"
                         f"{f'; skipped incomplete {skipped}' if skipped else ''}")


class ModelSource(NamedTuple):
    """How to load a model folder: a full model, or a PEFT adapter on top of a base model."""

    folder: Path
    path: str  # what from_pretrained loads: the folder itself, or the adapter's base model
    adapter: str | None
    task: str  # "sft" (a causal LM) or "classification"
    num_labels: int
    tokenizer: str  # the folder's own tokenizer (saved with the model), else the base model's


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise SharpnessError(f"cannot read {file} as a JSON object: {error}") from None


def _adapter_num_labels(folder: Path) -> int | None:
    # A classification adapter saves the new head (modules_to_save); its rows are the classes.
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.endswith(".weight") and (".score." in key or ".classifier." in key) and "lora_" not in key:
                    return int(f.get_slice(key).get_shape()[0])
    return None


def model_source(folder: Path, command: SharpnessCommand) -> ModelSource:
    """Read the folder's config files (no weights yet): what to load and which task it is."""
    try:
        adapter = adapter_config(folder)
    except RecipeError as error:
        raise SharpnessError(str(error)) from None
    if adapter is None:
        config = _read_json(folder / "config.json")
        classifier, path, num_labels = is_classifier_config(config), str(folder), len(config.get("id2label") or {})
    else:
        classifier = adapter.task_type == "SEQ_CLS"
        base = command.base_model or adapter.base_model_name_or_path
        if not base:
            raise SharpnessError(f"{folder / 'adapter_config.json'} names no base model; pass --base_model <folder>")
        try:
            path = resolve_model(str(base))
        except RecipeError as error:
            raise SharpnessError(f"base model of {folder}: {error}; pass --base_model <folder>") from None
        num_labels = command.num_labels or _adapter_num_labels(folder) if classifier else 2
    tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else path
    return ModelSource(folder, path, None if adapter is None else str(folder),
                       "classification" if classifier else "sft", num_labels or 2, tokenizer)


def read_jsonl(path: str, source: ModelSource, n_rows: int) -> list[dict[str, Any]]:
    """The first ``n_rows`` rows of a JSONL file, checked by the shared reader (errors name file and line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SharpnessError(f"--data {path!r}: no such file")
    rows = read_rows(file, source.task)[:n_rows]
    for number, row in enumerate(rows if source.task == "classification" else [], 1):
        if not isinstance(row.get("text"), str):
            raise SharpnessError(f'{file} row {number} has no "text" column')
        if type(label := row.get("label")) is not int or not 0 <= label < source.num_labels:
            raise SharpnessError(f'{file} row {number} needs an integer "label" in [0, {source.num_labels}) '
                                 f"for a classifier, got {label!r}")
    return rows


def load_recipe(command: SharpnessCommand, source: ModelSource) -> Any:
    """The recipe's experiment, checked against the model, with --max_length applied (before any loading)."""
    experiment = load_experiment(find_recipe(command.config))
    if (task := experiment.args.task) != source.task:
        holds = "a sequence classifier" if source.task == "classification" else "a causal LM"
        raise SharpnessError(f"recipe {experiment.path} has task {task}, but {source.folder} holds {holds}")
    if command.max_length is not None:
        if task != "sft":
            raise SharpnessError("--max_length applies to sft recipes; a classification recipe keeps its own")
        experiment.training.max_length = command.max_length
    return experiment


def recipe_batches(experiment: Any, model: Any, source: ModelSource, settings: SharpnessSettings) -> tuple[list, int]:
    """The first held-out batches from the trainer's eval dataloader (as training evaluated), and their size."""
    train, heldout = load_splits(experiment)
    # The trainer only collates: a scratch output_dir spares the run folder, one train row the train split.
    with tempfile.TemporaryDirectory(prefix="dualadam-sharpness-") as scratch:
        experiment.training.output_dir = scratch
        trainer, _ = build_trainer(experiment, source.tokenizer, train.select(range(min(1, len(train)))),
                                   heldout, model=model)
        if experiment.args.task == "sft" and len(trainer.eval_dataset) == 0:
            raise SharpnessError(f"no held-out row of {experiment.path} keeps a scored token within max_length "
                                 f"{experiment.training.max_length} (training drops such rows too); raise --max_length")
        batch_size = settings.batch_size or trainer.args.per_device_eval_batch_size
        return eval_batches(trainer, settings.batches, batch_size), batch_size


def sharpness_manifest(source: ModelSource, command: SharpnessCommand, settings: SharpnessSettings,
                       experiment: Any, segment: dict[str, Any]) -> dict[str, Any]:
    """The measurement's manifest (:mod:`.identity`): the measured model's files by content (an adapter's base
    model too), the batches' data (the recipe's data and settings, the --data file's content, or random tokens)
    and the settings; and where it came from, ``segment`` ended now."""
    if experiment is not None:
        data = {**identity.data_identity(experiment), "recipe settings": identity.determining_settings(experiment)}
    elif command.data is not None:
        file = Path(command.data).expanduser()
        data = {"data files": {command.data: identity.file_sha256([file])[file]}}
    else:
        data = {"random batches": {"seed": settings.seed, "max_length": command.max_length or DEFAULT_MAX_LENGTH}}
    inputs = {"model": identity.model_identity(str(source.folder), source.folder), "data": data,
              "settings": {**identity.plain(settings), "dtype": command.dtype, "device": command.device,
                           "max_length": command.max_length}}
    where = {"model": str(source.folder.resolve()), "config": command.config, "data": command.data}
    return identity.ended({"manifest_version": identity.MANIFEST_VERSION, "inputs": inputs, "where": where,
                           "segments": [segment]})


def measure(settings: SharpnessSettings, command: SharpnessCommand) -> tuple[dict[str, Any], Path]:
    """Check the inputs, load, measure; return the record, its manifest included, and where it is to be
    written."""
    segment = identity.new_segment()
    folder = resolve_model_folder(command.model)
    device, out = check_command(command)
    source = model_source(folder, command)
    batch_size, max_length = settings.batch_size or DEFAULT_BATCH_SIZE, command.max_length or DEFAULT_MAX_LENGTH
    # Recipe and data errors come before the model loads.
    experiment = load_recipe(command, source) if command.config else None
    rows = read_jsonl(command.data, source, settings.batches * batch_size) if command.data else None
    # PEFT adapters stay trainable: they are what gets measured.
    model = load_model(source.path, task=source.task, num_labels=source.num_labels, dtype=command.dtype,
                       adapter=source.adapter, trainable=True).to(device)
    if experiment is not None:
        batches, batch_size = recipe_batches(experiment, model, source, settings)
        model.to(device)  # the trainer may have moved it to its own device
        n_rows = sum(len(b["input_ids"]) for b in batches)
        data = f"recipe {experiment.path}: {len(batches)} held-out batches, {n_rows} rows"
    elif rows is not None:
        batches = jsonl_batches(rows, load_tokenizer(source.tokenizer), batch_size=batch_size,
                                classifier=source.task == "classification", max_length=max_length)
        data = f"{command.data}: {len(batches)} batches of up to {batch_size} rows x {max_length} tokens"
    else:
        gen, batches = torch.Generator().manual_seed(settings.seed), []
        for _ in range(settings.batches):  # labels: the tokens for a causal LM, random classes for a classifier
            ids = torch.randint(0, int(model.config.vocab_size), (batch_size, max_length), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            if not is_causal_lm(model):
                batches[-1]["labels"] = torch.randint(0, int(model.config.num_labels), (batch_size,), generator=gen)
        data = f"random tokens: {settings.batches} x {batch_size} x {max_length}, seed {settings.seed}"
    progress = None if command.quiet else (lambda line: print(f"[sharpness] {line}", file=sys.stderr, flush=True))
    results = measure_sharpness(model, batches, settings, progress=progress)
    return {"model": str(folder), "params": settings.params, "data": data,
            "settings": asdict(replace(settings, batch_size=batch_size)), "dtype": command.dtype, "device": str(device),
            "results": {k: float(v) if math.isfinite(v) else None for k, v in results.items()},  # JSON: no NaN
            identity.MANIFEST_KEY: sharpness_manifest(source, command, settings, experiment, segment)}, out


def main(argv: Sequence[str] | None = None) -> int:
    """``dualadam-hf sharpness``: 0 on success, 2 on a bad argument or input (one line on stderr)."""
    parser = HfArgumentParser((SharpnessSettings, SharpnessCommand), prog=PROG, description=__doc__,
                              formatter_class=_HELP_FORMAT, allow_abbrev=False)
    try:  # argparse exits with 2 on a malformed option; SharpnessSettings raises on a bad value
        settings, command, remaining = parser.parse_args_into_dataclasses(
            args=list(sys.argv[1:] if argv is None else argv), return_remaining_strings=True)
        if remaining:
            parser.error(f"unrecognized arguments: {' '.join(remaining)}")
        record, out = measure(settings, command)
        # Printed before writing: minutes of measuring are not lost if the write fails.
        results = record["results"]
        print(f"sharpness of {record['model']} ({record['params']} parameters; {record['data']})")
        for key in [k for k in HEADLINE if k in results] + [k for k in results if k not in HEADLINE]:
            value = "nan" if results[key] is None else format(results[key], ".8g")  # the file keeps all digits
            print(f"  {key:<{max(map(len, results))}}  {value}", flush=True)
        text = json.dumps(record, indent=2) + "\n"
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as error:
            print(f"the record that could not be written:\n{text}", end="", flush=True)
            raise SharpnessError(f"cannot write {out}: {error}") from None
    except (ValueError, OSError) as error:  # SharpnessError, RecipeError, SharpnessSettings, missing files
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
