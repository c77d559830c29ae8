"""A recipe's data: the train split and the held-out split, as `datasets.Dataset`s, with their columns checked.

Data sources, by `dataset_name`:
- `reasoning-gym-math`: GSM8K-style problems generated offline (dualadam_hf.recipes.math_data); the train
  and held-out rows come from disjoint seeds.
- a local `.jsonl`/`.json` file, or a folder holding `<split>.jsonl` files;
- anything else is a hub dataset id, loaded with `datasets.load_dataset` (needs a network).
A source without the held-out split gives up `eval_size` rows of its train split instead (never reused).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .config import BUILTIN_MATH_DATASET, RecipeArguments, RecipeError

# Column sets SFTTrainer understands; prompt/completion gives loss on the completion (answer) only.
SFT_FORMATS = (("prompt", "completion"), ("messages",), ("text",))


def heldout_rows_needed(args: RecipeArguments) -> int | None:
    """Rows the held-out split must give: enough for the eval loss and for the accuracy eval."""
    if args.eval_size is None:
        return None
    return max(args.eval_size, args.accuracy_size)


def _subsample(dataset: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def _local_files(path: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json"):
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _load_json(file: Path) -> Any:
    from datasets import load_dataset

    return load_dataset("json", data_files=str(file), split="train")


def _load_source(args: RecipeArguments) -> tuple[Any, Any | None]:
    """(train, held-out or None) straight from the source, before formatting and subsampling."""
    name = str(args.dataset_name)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_json(path), None
    if path.is_dir():
        train_file = _local_files(path, args.dataset_train_split)
        if train_file is None:
            raise RecipeError(f"dataset folder {path} holds no {args.dataset_train_split}.jsonl (or .json)")
        test_file = _local_files(path, args.dataset_test_split)
        return _load_json(train_file), (_load_json(test_file) if test_file else None)
    if name.endswith((".json", ".jsonl")) or name.startswith((".", "/", "~")):
        raise RecipeError(f"dataset file not found: {name}")
    from datasets import get_dataset_split_names, load_dataset

    try:
        splits = get_dataset_split_names(name, args.dataset_config)
        train = load_dataset(name, args.dataset_config, split=args.dataset_train_split)
        test = load_dataset(name, args.dataset_config, split=args.dataset_test_split) if (
            args.dataset_test_split in splits
        ) else None
    except Exception as error:  # datasets raises many types (connection, not found, config); all are fatal here
        raise RecipeError(
            f"dataset {name!r} (config {args.dataset_config!r}) could not be loaded: {error}. Offline, point "
            f"dataset_name at a local .jsonl file or use {BUILTIN_MATH_DATASET}."
        ) from error
    return train, test


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_to_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A GSM8K row (question, answer = reasoning + '#### N') in the built-in math data's chat format."""
    from .math_data import format_completion, format_prompt

    match = _GSM8K_FINAL.search(row["answer"])
    if match is None:
        raise RecipeError(f"gsm8k row has no '#### <answer>' line: {row['answer'][-80:]!r}")
    final = match.group(1).replace(",", "").strip()
    # Calculator annotations such as <<48/2=24>> are noise for a chat model.
    reasoning = re.sub(r"<<[^>]*>>", "", row["answer"][: match.start()]).strip()
    return {
        "prompt": format_prompt(row["question"]),
        "completion": format_completion(reasoning, final),
        "answer": final,
    }


def check_columns(dataset: Any, args: RecipeArguments, what: str) -> None:
    """Fail with the missing column names (and the ones present) before any training."""
    columns = set(dataset.column_names)
    if args.task == "classification":
        missing = [c for c in (args.text_column, args.label_column) if c not in columns]
        if missing:
            raise RecipeError(
                f"{what} data lacks column(s) {missing} (has {sorted(columns)}); set text_column / label_column"
            )
        labels = set(dataset.unique(args.label_column))
        bad = sorted(x for x in labels if not isinstance(x, int) or not 0 <= x < args.num_labels)
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


def load_splits(args: RecipeArguments) -> tuple[Any, Any]:
    """The train and held-out datasets of a recipe, formatted, subsampled and checked."""
    heldout_size = heldout_rows_needed(args)
    if args.dataset_name == BUILTIN_MATH_DATASET:
        from .math_data import math_dataset

        if heldout_size is None:
            raise RecipeError(f"dataset_name {BUILTIN_MATH_DATASET} generates data: set eval_size")
        train = math_dataset("train", args.train_size, args.dataset_seed)
        heldout = math_dataset("eval", heldout_size, args.dataset_seed)
    else:
        train, heldout = _load_source(args)
        if args.dataset_format == "gsm8k":
            for what, dataset in (("train", train), ("held-out", heldout)):
                if dataset is not None and not {"question", "answer"} <= set(dataset.column_names):
                    raise RecipeError(
                        f"dataset_format gsm8k needs columns 'question' and 'answer'; {what} data has "
                        f"{sorted(dataset.column_names)}"
                    )
            train = train.map(gsm8k_to_chat, remove_columns=train.column_names)
            if heldout is not None:
                heldout = heldout.map(gsm8k_to_chat, remove_columns=heldout.column_names)
        if heldout is None:
            if len(train) < 2:
                raise RecipeError(f"dataset {args.dataset_name} has {len(train)} row(s): too few to hold some out")
            size = heldout_size or max(1, len(train) // 10)
            if size >= len(train):
                raise RecipeError(f"eval_size {size} leaves no train rows in {args.dataset_name} ({len(train)} rows)")
            split = train.train_test_split(test_size=size, seed=args.dataset_seed)
            train, heldout = split["train"], split["test"]
        train = _subsample(train, args.train_size, args.dataset_seed)
        heldout = _subsample(heldout, heldout_size, args.dataset_seed)
    check_columns(train, args, "train")
    check_columns(heldout, args, "held-out")
    return train, heldout
