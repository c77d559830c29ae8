"""Measure how sharp a trained model's minimum is: the top Hessian eigenvalue, the Hessian trace and the
epsilon-sharpness of the loss on fixed evaluation batches, w.r.t. the trainable parameters (the adapters of
a LoRA run). Prints a table and writes sharpness.json into the model folder (or --output).

    dualadam-hf sharpness --model outputs/smollm2_math_lora --config recipes/smollm2_math_lora.yaml
    dualadam-hf sharpness --model <model or adapter folder> --data heldout.jsonl
    dualadam-hf sharpness --model <model or adapter folder> --random_batches   # smoke test, no data needed

Every option also takes dashes (--max-iters = --max_iters). Slow on CPU: every Hessian-vector product
costs about three forward passes; on a busy machine set OMP_WAIT_POLICY=PASSIVE. docs/flatness.md says
what each number means and what it costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sharpness import DEFAULT_BATCH_SIZE, SharpnessSettings, is_causal_lm, measure_sharpness
from .arguments import RecipeError

PROG = "dualadam-hf sharpness"
RESULT_FILE = "sharpness.json"
MODEL_FILES = ("config.json", "adapter_config.json")
DTYPE_CHOICES = ("float32", "float64", "bfloat16")
DEFAULT_MAX_LENGTH = 64
# Numbers shown first, in this order; the rest of measure_sharpness's keys follow.
HEADLINE = ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst", "sharpness_random")


class SharpnessError(ValueError):
    """A bad argument or input; the message says what to change."""


@dataclass
class SharpnessCommand:
    """What the command needs besides the measurement settings: the model, the data and where to write."""

    model: str = field(metadata={"help": "A saved model or PEFT adapter folder, a run folder (its final model, "
                                         "else its newest complete checkpoint-N), or an alias such as "
                                         "smollm2-135m-instruct."})
    config: str | None = field(default=None, metadata={
        "help": "Recipe YAML (or name): the batches come from its held-out split, collated as in training."})
    data: str | None = field(default=None, metadata={
        "help": 'JSONL file: "text", "messages" or "prompt"+"completion" rows ("text" + integer "label" for a '
                "classifier); every token is scored."})
    random_batches: bool = field(default=False, metadata={
        "help": "Random token batches: a smoke test of the machinery, not a meaningful number."})
    max_length: int | None = field(default=None, metadata={
        "help": f"Tokens per row (None: the recipe's max_length with --config, else {DEFAULT_MAX_LENGTH})."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model of a PEFT adapter (None: the adapter's base_model_name_or_path)."})
    num_labels: int | None = field(default=None, metadata={
        "help": "Classes of a sequence-classification adapter (None: read from its weights)."})
    dtype: str = field(default="float32", metadata={
        "choices": DTYPE_CHOICES, "help": "Dtype to measure in; second derivatives need float32 or better."})
    device: str = field(default="cpu", metadata={"help": "Torch device, e.g. cpu, cuda, cuda:1."})
    output: str | None = field(default=None, metadata={
        "help": f"A .json file or an existing folder for {RESULT_FILE} (None: the --model folder)."})
    quiet: bool = field(default=False, metadata={"help": "No progress lines on stderr."})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples of the description on their lines and shows each default."""


def build_parser() -> Any:
    """The HfArgumentParser of ``dualadam-hf sharpness``: SharpnessSettings, then SharpnessCommand."""
    from transformers import HfArgumentParser

    return HfArgumentParser((SharpnessSettings, SharpnessCommand), prog=PROG, description=__doc__,
                            formatter_class=_HelpFormatter, allow_abbrev=False)


def parse(argv: Sequence[str] | None = None) -> tuple[SharpnessSettings, SharpnessCommand]:
    """(settings, command) from the command line. argparse exits with 2 on a malformed option; a value the
    settings reject (e.g. --rho 0) raises ValueError from SharpnessSettings."""
    parser = build_parser()
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv), return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    settings, command = parsed
    return settings, command


# --------------------------------------------------------------------------- #
# Checks made before anything is loaded
# --------------------------------------------------------------------------- #


def check_command(command: SharpnessCommand) -> None:
    """Exactly one source of batches, and sizes that make sense (the settings check their own)."""
    given = [name for name, value in (("--config", command.config), ("--data", command.data),
                                      ("--random_batches", command.random_batches)) if value]
    if not given:
        raise SharpnessError("say where the evaluation batches come from: --config, --data or --random_batches")
    if len(given) > 1:
        raise SharpnessError(f"give only one of --config, --data, --random_batches (got {', '.join(given)})")
    for name in ("max_length", "num_labels"):
        value = getattr(command, name)
        if value is not None and value < 1:
            raise SharpnessError(f"--{name} must be >= 1, got {value}")


def check_device(name: str) -> Any:
    """The torch device, after one allocation on it: a missing CUDA or a typo fails here, in one line."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SharpnessError(f"--device {name!r} is not usable here: {reason}") from None
    return device


def _has_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def local_folder(name_or_path: str | Path) -> Path:
    """The folder --model names: an existing folder, or an alias's local copy (else a RecipeError)."""
    from .models import resolve_model

    folder = Path(resolve_model(str(name_or_path)))
    if not folder.is_dir():
        raise SharpnessError(f"--model {str(name_or_path)!r} is not a local folder")
    return folder


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """The folder holding the model: the path itself, else the one final model inside it, else its newest
    complete checkpoint-N (one with trainer_state.json and weights; cut-off saves are skipped)."""
    from .checkpoints import checkpoint_folders, incomplete_reason

    folder = local_folder(name_or_path)
    if _has_model(folder):
        return folder
    checkpoints = checkpoint_folders(folder)
    finals = [d for d in sorted(folder.iterdir()) if d.is_dir() and d not in checkpoints and _has_model(d)]
    if len(finals) == 1:
        return finals[0]
    if len(finals) > 1:
        raise SharpnessError(f"{folder} holds several models ({', '.join(d.name for d in finals)}); "
                             "pass one of them as --model")
    skipped = []
    for checkpoint in checkpoints:  # newest first
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint
        skipped.append(f"{checkpoint.name} ({reason})")
    raise SharpnessError(
        f"no model in {folder}: expected {' or '.join(MODEL_FILES)} there, in one final-model subfolder, or a "
        "complete checkpoint-N" + (f"; skipped incomplete {', '.join(skipped)}" if skipped else "")
    )


def output_path(command: SharpnessCommand) -> Path:
    """Where sharpness.json goes (default: the --model folder, e.g. the run folder); its folder must exist
    and take a file. Checked before measuring."""
    if command.output is None:
        out = local_folder(command.model) / RESULT_FILE
    else:
        given = Path(command.output).expanduser()
        out = given if given.suffix == ".json" else given / RESULT_FILE
    if not out.parent.is_dir():
        raise SharpnessError(f"--output: folder {out.parent} does not exist (create it, or pick another)")
    if out.is_dir():
        raise SharpnessError(f"--output: {out} is a folder, not a file")
    if out.exists() and not os.access(out, os.W_OK):
        raise SharpnessError(f"--output: {out} is not writable")
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".sharpness-", suffix=".probe"):
            pass
    except OSError as error:
        raise SharpnessError(f"--output: cannot write into {out.parent}: {error}") from None
    return out


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


@dataclass
class ModelSource:
    """How to load a model folder: a full model, or a PEFT adapter on top of a base model."""

    folder: Path
    path: str  # what from_pretrained loads: the folder itself, or the adapter's base model
    adapter: str | None
    task: str  # "sft" (a causal LM) or "classification"
    num_labels: int

    @property
    def tokenizer_folder(self) -> str:
        """The folder's own tokenizer (saved with the model), else the base model's (adapter folders)."""
        return str(self.folder) if (self.folder / "tokenizer_config.json").is_file() else self.path


def _adapter_num_labels(folder: Path) -> int | None:
    # A classification adapter saves the new head (modules_to_save); its rows are the classes.
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if key.endswith(".weight") and re.search(r"\.(score|classifier)\.", key) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SharpnessError(f"cannot read {file}: {error}") from None
    if not isinstance(data, dict):
        raise SharpnessError(f"{file} is not a JSON object")
    return data


def model_source(folder: Path, command: SharpnessCommand) -> ModelSource:
    """Read the folder's config files (no weights yet): what to load and which task it is."""
    from .models import adapter_base, is_classifier_config, resolve_model

    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        config = _read_json(folder / "config.json")
        classifier = is_classifier_config(config)
        num_labels = len(config.get("id2label") or {}) or 2
        return ModelSource(folder, str(folder), None, "classification" if classifier else "sft", num_labels)
    task_type = _read_json(adapter_config).get("task_type")
    base = command.base_model or adapter_base(folder)
    if not base:
        raise SharpnessError(f"{adapter_config} names no base model; pass --base_model <folder>")
    try:
        base_path = resolve_model(str(base))
    except RecipeError as error:
        raise SharpnessError(f"base model of {folder}: {error}; pass --base_model <folder>") from None
    classifier = task_type == "SEQ_CLS"
    num_labels = (command.num_labels or _adapter_num_labels(folder) or 2) if classifier else 2
    return ModelSource(folder, base_path, str(folder), "classification" if classifier else "sft", num_labels)


def load(source: ModelSource, command: SharpnessCommand, device: Any) -> Any:
    """The model, through the shared loader; PEFT adapters stay trainable (that is what gets measured)."""
    from .models import load_model

    model = load_model(source.path, task=source.task, num_labels=source.num_labels, dtype=command.dtype,
                       adapter=source.adapter, trainable=True)
    return model.to(device)


# --------------------------------------------------------------------------- #
# Evaluation batches
# --------------------------------------------------------------------------- #


def random_batches(model: Any, n_batches: int, batch_size: int, length: int, seed: int) -> list[dict[str, Any]]:
    """Seeded random token batches (labels: the tokens for a causal LM, random classes for a classifier)."""
    import torch

    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not is_causal_lm(model):
            batch["labels"] = torch.randint(0, int(model.config.num_labels), (batch_size,), generator=gen)
        batches.append(batch)
    return batches


def read_jsonl(path: str, source: ModelSource, n_rows: int) -> list[dict[str, Any]]:
    """The first ``n_rows`` rows of a JSONL file, checked by the shared reader (errors name file and line)."""
    from .data import read_rows

    file = Path(path).expanduser()
    if not file.is_file():
        raise SharpnessError(f"--data {path!r}: no such file")
    rows = read_rows(file, source.task)[:n_rows]
    if source.task == "classification":
        for number, row in enumerate(rows, 1):
            if not isinstance(row.get("text"), str):
                raise SharpnessError(f'{file} row {number} has no "text" column')
            label = row.get("label")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < source.num_labels:
                raise SharpnessError(f'{file} row {number} needs an integer "label" in [0, {source.num_labels}) '
                                     f"for a classifier, got {label!r}")
    return rows


def _row_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """One row's token ids: chat rows through the chat template, plain text as the tokenizer encodes it."""
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and isinstance(row["prompt"], list):
        messages = row["prompt"] + row["completion"]
    else:
        text = row["text"] if "text" in row else row["prompt"] + row["completion"]
        return tokenizer(text)["input_ids"]
    # The template writes the special tokens itself; encoding its text must not add them again.
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def jsonl_batches(rows: list[dict[str, Any]], tokenizer: Any, *, classifier: bool, batch_size: int,
                  max_length: int) -> list[dict[str, Any]]:
    """Rows tokenized, cut to ``max_length`` tokens and padded per batch (the loss then covers every token)."""
    import torch

    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = [_row_ids(row, tokenizer)[:max_length] for row in chunk]
        batch = dict(tokenizer.pad({"input_ids": ids}, return_tensors="pt"))
        if classifier:
            batch["labels"] = torch.tensor([row["label"] for row in chunk])
        batches.append(batch)
    return batches


def load_recipe(command: SharpnessCommand, source: ModelSource) -> Any:
    """The recipe's experiment, checked against the model, with --max_length applied (before any loading)."""
    from .arguments import find_recipe, load_experiment

    experiment = load_experiment(find_recipe(command.config))
    task = experiment.args.task
    if task != source.task:
        holds = "a sequence classifier" if source.task == "classification" else "a causal LM"
        raise SharpnessError(f"recipe {experiment.path} has task {task}, but {source.folder} holds {holds}")
    if command.max_length is not None:
        if task != "sft":
            raise SharpnessError("--max_length applies to sft recipes; a classification recipe keeps its own")
        experiment.training.max_length = command.max_length
    return experiment


def recipe_batches(experiment: Any, model: Any, source: ModelSource,
                   settings: SharpnessSettings) -> tuple[list[dict[str, Any]], int]:
    """The first batches of the recipe's held-out split, from the trainer's eval dataloader: tokenized,
    truncated and collated exactly as training evaluated them. Returns (batches, rows per batch)."""
    from .data import load_splits
    from .train import build_trainer, eval_batches

    train, heldout = load_splits(experiment)
    # The trainer only collates here: it gets a scratch output_dir (it creates one) so the recipe's run
    # folder is left alone, and one train row (it must have some) so the train split is not tokenized.
    with tempfile.TemporaryDirectory(prefix="dualadam-sharpness-") as scratch:
        experiment.training.output_dir = scratch
        trainer, _ = build_trainer(experiment, source.tokenizer_folder, train.select(range(min(1, len(train)))),
                                   heldout, model=model)
        if experiment.args.task == "sft" and len(trainer.eval_dataset) == 0:
            raise SharpnessError(
                f"no held-out row of {experiment.path} keeps a scored token within max_length "
                f"{experiment.training.max_length} (training drops such rows too); raise --max_length")
        batch_size = settings.batch_size or trainer.args.per_device_eval_batch_size
        return eval_batches(trainer, settings.batches, batch_size), batch_size


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def format_value(value: float) -> str:
    """How a number is printed (8 significant digits; sharpness.json keeps full precision)."""
    return "nan" if math.isnan(value) else f"{value:.8g}"


def format_table(results: dict[str, float]) -> str:
    keys = [k for k in HEADLINE if k in results] + [k for k in results if k not in HEADLINE]
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k:<{width}}  {format_value(results[k])}" for k in keys)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value  # strict JSON has no NaN


def measure(settings: SharpnessSettings, command: SharpnessCommand) -> tuple[dict[str, Any], Path]:
    """Check the inputs, load, measure; return the record and where it is to be written."""
    check_command(command)
    device = check_device(command.device)
    folder = resolve_model_folder(command.model)
    out = output_path(command)
    source = model_source(folder, command)
    batch_size = settings.batch_size or DEFAULT_BATCH_SIZE
    max_length = command.max_length or DEFAULT_MAX_LENGTH
    # Recipe and data errors come before the model loads.
    experiment = load_recipe(command, source) if command.config else None
    rows = read_jsonl(command.data, source, settings.batches * batch_size) if command.data else None
    model = load(source, command, device)
    if experiment is not None:
        batches, batch_size = recipe_batches(experiment, model, source, settings)
        model.to(device)  # the trainer may have moved it to its own device
        n_rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        data = f"recipe {experiment.path}: {len(batches)} held-out batches, {n_rows} rows"
    elif rows is not None:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(source.tokenizer_folder)
        batches = jsonl_batches(rows, tokenizer, classifier=source.task == "classification", batch_size=batch_size,
                                max_length=max_length)
        data = f"{command.data}: {len(batches)} batches of up to {batch_size} rows x {max_length} tokens"
    else:
        batches = random_batches(model, settings.batches, batch_size, max_length, settings.seed)
        data = f"random tokens: {settings.batches} x {batch_size} x {max_length}, seed {settings.seed}"
    progress = None if command.quiet else (lambda line: print(f"[sharpness] {line}", file=sys.stderr, flush=True))
    results = measure_sharpness(model, batches, settings, progress=progress)
    record = {
        "model": str(folder),
        "params": settings.params,
        "data": data,
        "settings": dataclasses.asdict(dataclasses.replace(settings, batch_size=batch_size)),
        "dtype": command.dtype,
        "device": str(device),
        "results": {k: _json_number(float(v)) for k, v in results.items()},
    }
    return record, out


def _error(message: object) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``dualadam-hf sharpness``: 0 on success, 2 on a bad argument or input (message on stderr)."""
    try:
        settings, command = parse(argv)
        record, out = measure(settings, command)
    except (ValueError, OSError) as error:  # SharpnessError, RecipeError, SharpnessSettings, missing files
        return _error(error)
    # Printed before writing: minutes of measuring are not lost if the write fails.
    results = {k: (math.nan if v is None else v) for k, v in record["results"].items()}
    print(f"sharpness of {record['model']} ({record['params']} parameters; {record['data']})")
    print(format_table(results), flush=True)
    text = json.dumps(record, indent=2) + "\n"
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        print(f"the record that could not be written:\n{text}", end="", flush=True)
        return _error(f"cannot write {out}: {error}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
