"""One dataset loader for training, comparing and measuring sharpness.

``dataset_name`` may be:

- ``reasoning-gym:<task>``: problems generated offline (:mod:`dualadam_hf.experiments.tasks`), with
  disjoint ``train``, ``validation`` and ``test`` splits;
- a local ``.jsonl``/``.json`` file, or a folder holding ``<split>.jsonl`` files;
- anything else is a hub dataset id, loaded with ``datasets.load_dataset`` (needs a network).

The held-out split is the one ``dataset_test_split`` names (``compare`` points it at ``validation`` while
it tunes learning rates). A local source without that split holds out rows of its train split instead:
``test`` and ``validation`` are then two disjoint slices, and the train rows are the same for both (also
when the source has one of them and not the other).
Bad files are reported with their name, line and what is wrong, before any model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import tasks
from .arguments import Experiment, RecipeError

# Column sets SFTTrainer understands; prompt/completion gives loss on the completion (answer) only.
SFT_FORMATS = (("prompt", "completion"), ("messages",), ("text",))
# The name the default recipes used for the built-in math problems.
ALIASES = {"reasoning-gym-math": f"{tasks.PREFIX}gsm_symbolic"}


def heldout_rows_needed(experiment: Experiment) -> int | None:
    """Rows the held-out split must give: enough for the eval loss and for the accuracy eval."""
    args = experiment.args
    if args.eval_size is None:
        return None
    return max(args.eval_size, args.accuracy_size)


def _subsample(dataset: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_message_list(value: Any, where: str, column: str) -> None:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: {column!r} must be a non-empty list of messages, got {value!r:.80}")
    for message in value:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise RecipeError(f"{where}: every message in {column!r} needs 'role' and 'content', got {message!r:.80}")


def check_row(row: Any, where: str, task: str) -> None:
    """One row of a local file: the shape SFTTrainer (or the classifier) needs, checked with its place."""
    if not isinstance(row, dict):
        raise RecipeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if task != "sft":
        return  # classification or a raw format (gsm8k): columns are checked per dataset after conversion
    if "messages" in row:
        _check_message_list(row["messages"], where, "messages")
    elif "prompt" in row and "completion" in row:
        for column in ("prompt", "completion"):
            value = row[column]
            if isinstance(value, list):
                _check_message_list(value, where, column)
            elif not isinstance(value, str) or (column == "completion" and not value):
                raise RecipeError(f"{where}: {column!r} must be text or a list of messages, got {value!r:.80}")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise RecipeError(f"{where}: 'text' must be non-empty text, got {row['text']!r:.80}")
    else:
        wanted = " or ".join("+".join(fmt) for fmt in SFT_FORMATS)
        raise RecipeError(f"{where}: a row needs columns {wanted}; it has {sorted(row)}")


def read_rows(file: Path, task: str = "sft") -> list[dict[str, Any]]:
    """The rows of a JSONL file (or a .json array), each checked; errors name the file and line."""
    text = file.read_text(encoding="utf-8")
    rows: list[tuple[str, Any]] = []
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{file}: not valid JSON: {error}") from None
        rows = [(f"{file} row {i}", row) for i, row in enumerate(data, start=1)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{file}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise RecipeError(f"{file}:{number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
    if not rows:
        raise RecipeError(f"{file} holds no rows")
    for where, row in rows:
        check_row(row, where, task)
    return [row for _, row in rows]


def _dataset(file: Path, task: str) -> Any:
    from datasets import Dataset

    rows = read_rows(file, task)
    try:
        return Dataset.from_list(rows)
    except Exception as error:  # arrow cannot unify the rows' types; name the file, not arrow's internals
        raise RecipeError(f"{file}: the rows do not share one layout of columns and types ({error})") from None


def _carve(train: Any, missing: list[str], size: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """(rest of train, {split: slice}): the missing held-out splits as disjoint slices of one shuffle."""
    size = size or max(1, len(train) // 10)
    if len(train) <= len(missing) * size:
        raise RecipeError(
            f"the train split has {len(train)} rows: too few to hold out {size} each for {', '.join(missing)} "
            "(lower eval_size or give <split>.jsonl files)"
        )
    shuffled = train.shuffle(seed=seed)
    slices = {split: shuffled.select(range(k * size, (k + 1) * size)) for k, split in enumerate(missing)}
    # A row repeated in the source must not sit on both sides: train keeps no copy of a held-out row.
    held = {json.dumps(row, sort_keys=True) for row in shuffled.select(range(len(missing) * size))}
    rest = shuffled.select(range(len(missing) * size, len(shuffled)))
    return rest.filter(lambda row: json.dumps(row, sort_keys=True) not in held), slices


def _held_out_names(experiment: Experiment) -> list[str]:
    """The held-out splits a source is asked for: the requested one, the validation split and "test", so the
    carved rows, and with them the train rows, are the same whichever of them a run holds out."""
    return list(dict.fromkeys(["test", experiment.args.dataset_validation_split, experiment.script.dataset_test_split]))


def _load_source(experiment: Experiment) -> tuple[Any, dict[str, Any]]:
    """(train, {held-out split: dataset or None}) straight from the source, before formatting."""
    script, args = experiment.script, experiment.args
    task = args.task if args.dataset_format == "auto" else args.dataset_format
    name, wanted = str(script.dataset_name), _held_out_names(experiment)
    path = Path(name).expanduser()
    if path.is_file():
        return _dataset(path, task), dict.fromkeys(wanted)
    if path.is_dir():
        train_file = _split_file(path, script.dataset_train_split)
        if train_file is None:
            raise RecipeError(f"dataset folder {path} holds no {script.dataset_train_split}.jsonl (or .json)")
        files = {split: _split_file(path, split) for split in wanted}
        return _dataset(train_file, task), {k: _dataset(f, task) if f else None for k, f in files.items()}
    if name.endswith((".json", ".jsonl")) or name.startswith((".", "/", "~")):
        raise RecipeError(f"dataset file not found: {name}")
    from datasets import get_dataset_split_names, load_dataset

    try:
        splits = get_dataset_split_names(name, script.dataset_config)
        train = load_dataset(name, script.dataset_config, split=script.dataset_train_split)
        held = {k: load_dataset(name, script.dataset_config, split=k) if k in splits else None for k in wanted}
    except Exception as error:  # datasets raises many types (connection, not found, config); all are fatal here
        raise RecipeError(
            f"dataset {name!r} (config {script.dataset_config!r}) could not be loaded: {error}. Offline, point "
            f"dataset_name at a local .jsonl file or a generated task such as {tasks.PREFIX}gsm_symbolic."
        ) from error
    return train, held


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_to_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A GSM8K row (question, answer = reasoning + '#### N') in the generated tasks' chat format."""
    match = _GSM8K_FINAL.search(row["answer"])
    if match is None:
        raise RecipeError(f"gsm8k row has no '#### <answer>' line: {row['answer'][-80:]!r}")
    final = match.group(1).replace(",", "").strip()
    # Calculator annotations such as <<48/2=24>> are noise for a chat model.
    reasoning = re.sub(r"<<[^>]*>>", "", row["answer"][: match.start()]).strip()
    return {
        "prompt": tasks.format_prompt(row["question"], worked=True),
        "completion": tasks.format_completion(final, reasoning),
        "answer": final,
    }


def check_columns(dataset: Any, experiment: Experiment, what: str) -> None:
    """Fail with the missing column names (and the ones present) before any training."""
    args = experiment.args
    columns = set(dataset.column_names)
    if args.task == "classification":
        missing = [c for c in (args.text_column, args.label_column) if c not in columns]
        if missing:
            raise RecipeError(
                f"{what} data lacks column(s) {missing} (has {sorted(columns)}); set text_column / label_column"
            )
        labels = set(dataset.unique(args.label_column))
        bad = sorted((x for x in labels if not isinstance(x, int) or not 0 <= x < args.num_labels), key=str)
        if bad:
            raise RecipeError(f"{what} labels {bad[:5]} are not integers in [0, num_labels={args.num_labels})")
        return
    if not any(all(c in columns for c in fmt) for fmt in SFT_FORMATS):
        wanted = " or ".join("+".join(fmt) for fmt in SFT_FORMATS)
        raise RecipeError(f"{what} data needs columns {wanted}; it has {sorted(columns)}")
    if what == "held-out" and args.accuracy_size and not {"prompt", "answer"} <= columns:
        raise RecipeError(
            f"accuracy_size > 0 needs held-out columns 'prompt' and 'answer'; it has {sorted(columns)} "
            "(set accuracy_size: 0 to skip the accuracy eval)"
        )


def _generated(experiment: Experiment, task_name: str, heldout_size: int | None) -> tuple[Any, Any]:
    script, args = experiment.script, experiment.args
    if not args.train_size or heldout_size is None:
        raise RecipeError(f"dataset_name {script.dataset_name} generates data: set train_size and eval_size")
    for split in (script.dataset_train_split, script.dataset_test_split):
        if split not in tasks.SPLITS:
            raise RecipeError(f"generated data has the splits {', '.join(tasks.SPLITS)}; got {split!r}")
    try:
        train = tasks.generated_dataset(task_name, script.dataset_train_split, args.train_size, args.dataset_seed,
                                        script.dataset_config)
        heldout = tasks.generated_dataset(task_name, script.dataset_test_split, heldout_size, args.dataset_seed,
                                          script.dataset_config)
    except ValueError as error:
        raise RecipeError(str(error)) from error
    return train, heldout


def load_splits(experiment: Experiment) -> tuple[Any, Any]:
    """The train and held-out datasets of an experiment, formatted, subsampled and checked."""
    script, args = experiment.script, experiment.args
    heldout_size = heldout_rows_needed(experiment)
    name = ALIASES.get(str(script.dataset_name), str(script.dataset_name))
    if name.startswith(tasks.PREFIX):
        train, heldout = _generated(experiment, name.removeprefix(tasks.PREFIX), heldout_size)
    else:
        train, held = _load_source(experiment)
        if args.dataset_format == "gsm8k":
            for what, dataset in (("train", train), *held.items()):
                if dataset is not None and not {"question", "answer"} <= set(dataset.column_names):
                    raise RecipeError(
                        f"dataset_format gsm8k needs columns 'question' and 'answer'; {what} data has "
                        f"{sorted(dataset.column_names)}"
                    )
            convert = lambda d: None if d is None else d.map(gsm8k_to_chat, remove_columns=d.column_names)
            train, held = convert(train), {k: convert(d) for k, d in held.items()}
        missing = [split for split, dataset in held.items() if dataset is None]
        if missing:
            train, carved = _carve(train, missing, heldout_size, args.dataset_seed)
            held.update(carved)
        heldout = held[script.dataset_test_split]
        train = _subsample(train, args.train_size, args.dataset_seed)
        heldout = _subsample(heldout, heldout_size, args.dataset_seed)
    check_columns(train, experiment, "train")
    check_columns(heldout, experiment, "held-out")
    return train, heldout


def sft_columns(dataset: Any) -> Any:
    """Only the columns SFTTrainer trains on (the ``answer`` column is for the accuracy eval)."""
    keep = {"prompt", "completion", "messages", "text"}
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])
