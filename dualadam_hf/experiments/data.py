"""One dataset loader for training, comparing and measuring sharpness (docs/recipes.md, "Data").

``dataset_name`` says where the rows come from: a generated task (``reasoning-gym:<task>``, see :mod:`.tasks`),
a local ``.jsonl`` or ``.json`` file, a folder of ``<split>.jsonl`` files, or else a dataset id on the hub. A bad
file is reported with its name, line and problem.

The held-out split is ``dataset_test_split``. A local source that lacks it holds out slices of its train split
instead, and the slices of two held-out splits never overlap.

``dataset_seed`` fixes the held-out rows, so every run of a comparison is scored on the same rows. It fixes the
train rows too, unless ``train_pool_size`` is set. Then it fixes a pool of that many train rows, and each run
draws its ``train_size`` rows from the pool with its own ``seed``. That way the seeds of a comparison vary the
training data as well as the initialisation.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from . import tasks
from .arguments import Experiment, RecipeError

# Column sets SFTTrainer understands; prompt/completion gives loss on the completion (answer) only.
SFT_FORMATS = (("prompt", "completion"), ("messages",), ("text",))
_SFT_WANTED = " or ".join("+".join(fmt) for fmt in SFT_FORMATS)
# The name the default recipes used for the built-in math problems.
ALIASES = {"reasoning-gym-math": f"{tasks.PREFIX}gsm_symbolic"}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


_WARNED: set[str] = set()  # what this process has warned about: a plan loads the same data more than once


def warn_once(message: str) -> None:
    """A UserWarning, given once per process whatever the warning filters say."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _subsample(dataset: Any, size: int | None, seed: int) -> Any:
    return dataset if size is None or size >= len(dataset) else dataset.shuffle(seed=seed).select(range(size))


def _warn_if_short(dataset: Any, size: int | None, setting: str, what: str) -> None:
    """Say when a size asks for more rows than the source has: the run takes them all, not the number asked."""
    if size is not None and size > len(dataset):
        warn_once(f"{setting} is {size} but the {what} has only {len(dataset)} rows: every run uses those "
                  f"{len(dataset)}")


def _check_pool(experiment: Experiment) -> None:
    args = experiment.args
    if args.train_pool_size is None:
        return
    if args.train_size is None:
        raise RecipeError(f"train_pool_size {args.train_pool_size} needs train_size: how many rows each run draws "
                          "from the pool")
    if args.train_pool_size < args.train_size:
        raise RecipeError(f"train_pool_size ({args.train_pool_size}) must be at least train_size ({args.train_size})")


def _train_rows(pool: Any, experiment: Experiment) -> Any:
    """The rows a run trains on.

    Without ``train_pool_size`` they are the rows as given. With it, ``pool`` is the shared pool and the run draws
    ``train_size`` rows from it with its own seed, so two seeds train on different subsets of one pool.
    """
    args = experiment.args
    if args.train_pool_size is None:
        return pool
    if len(pool) < args.train_pool_size:
        raise RecipeError(f"train_pool_size is {args.train_pool_size} but the train data has only {len(pool)} rows "
                          "once the held-out rows are taken out")
    return pool.shuffle(seed=experiment.training.seed).select(range(args.train_size))


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
        raise RecipeError(f"{where}: a row needs columns {_SFT_WANTED}; it has {sorted(row)}")


def read_rows(file: Path, task: str = "sft") -> list[dict[str, Any]]:
    """The rows of a JSONL file (or a .json array), each checked; errors name the file and line."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:  # JSON is UTF-8: name the line a Latin-1 or binary file breaks on
        line = data.count(b"\n", 0, error.start) + 1
        raise RecipeError(f"{file}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                          "save the file as UTF-8") from None
    rows: list[tuple[str, Any]] = []
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = [(f"{file} row {i}", row) for i, row in enumerate(json.loads(text), start=1)]
        except json.JSONDecodeError as error:
            raise RecipeError(f"{file}: not valid JSON: {error}") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                if line.strip():
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
    """Held-out splits cut out of the train rows, for a local source that lacks them.

    Returns the train rows left over and one slice per split in ``missing``, each of ``size`` rows (a tenth of
    the rows when size is None). The slices come from one shuffle fixed by ``seed``: they never overlap, and
    every run holds out the same rows. A row the source repeats leaves train entirely when one copy is held
    out, so that the held-out loss never scores a row the model trained on.
    """
    size = size or max(1, len(train) // 10)
    if len(train) <= len(missing) * size:
        raise RecipeError(f"the train split has {len(train)} rows: too few to hold out {size} each for "
                          f"{', '.join(missing)} (lower eval_size or give <split>.jsonl files)")
    shuffled = train.shuffle(seed=seed)
    slices = {split: shuffled.select(range(k * size, (k + 1) * size)) for k, split in enumerate(missing)}
    # A row repeated in the source must not sit on both sides: train keeps no copy of a held-out row.
    held = {json.dumps(row, sort_keys=True) for row in shuffled.select(range(len(missing) * size))}
    rest = shuffled.select(range(len(missing) * size, len(shuffled)))
    rest = rest.filter(lambda row: json.dumps(row, sort_keys=True) not in held)
    if len(rest) == 0:
        raise RecipeError("no train rows are left once the held-out rows and their repeats are taken out")
    return rest, slices


def _heldout_splits(experiment: Experiment) -> list[str]:
    """The held-out splits a local or hub source is read for: "test", the validation split and the requested one."""
    args, script = experiment.args, experiment.script
    return list(dict.fromkeys(["test", args.dataset_validation_split, script.dataset_test_split]))


def _split_files(folder: Path, splits: list[str]) -> dict[str, Path | None]:
    """Each split's ``<split>.jsonl`` (or ``.json``) in a dataset folder, None where the folder has neither."""
    return {split: next((f for f in (folder / f"{split}.jsonl", folder / f"{split}.json") if f.is_file()), None)
            for split in splits}


def local_data_files(experiment: Experiment) -> tuple[dict[str, Path], list[str]]:
    """The local files a run of ``experiment`` reads, each under the name the recipe gives it (a file, or the
    folder joined with the file's name), and the held-out splits it carves out of the train rows.

    A folder's split file that appears or goes changes which rows are carved out of train, so the carved splits
    belong with the files in a run's identity; the files of held-out splits the run does not read do not.
    Generated and hub data: no files (generated rows follow from the recipe and the seed).
    """
    script = experiment.script
    name = ALIASES.get(str(script.dataset_name), str(script.dataset_name))
    wanted = _heldout_splits(experiment)
    path = Path(name).expanduser()
    if name.startswith(tasks.PREFIX) or not path.exists():
        return {}, []
    if path.is_file():
        return {name: path}, wanted
    files = _split_files(path, [script.dataset_train_split, *wanted])
    read = [script.dataset_train_split, script.dataset_test_split]
    return ({str(Path(name) / file.name): file for split, file in files.items() if split in read and file},
            [split for split in wanted if files[split] is None])


def _load_source(experiment: Experiment) -> tuple[Any, dict[str, Any]]:
    """A local or hub source's train rows, and for each held-out split a loader, or None if the source lacks it.

    The held-out mapping always covers the same splits: "test", the validation split and the requested split.
    Splits the source lacks are then carved out of train the same way whichever of them a run holds out, so
    the train rows are the same too. Only the requested split is ever loaded.
    """
    script, args = experiment.script, experiment.args
    task = args.task if args.dataset_format == "auto" else args.dataset_format
    name = str(script.dataset_name)
    wanted = _heldout_splits(experiment)
    path = Path(name).expanduser()
    if path.is_file():
        return _dataset(path, task), dict.fromkeys(wanted)
    if path.is_dir():
        files = _split_files(path, [script.dataset_train_split, *wanted])
        if files[script.dataset_train_split] is None:
            raise RecipeError(f"dataset folder {path} holds no {script.dataset_train_split}.jsonl (or .json)")
        return _dataset(files[script.dataset_train_split], task), {
            split: (lambda f=files[split]: _dataset(f, task)) if files[split] else None for split in wanted}
    if name.endswith((".json", ".jsonl")) or name.startswith((".", "/", "~")):
        raise RecipeError(f"dataset file not found: {name}")
    from datasets import get_dataset_split_names, load_dataset

    def hub(split: str | None = None) -> Any:
        try:
            if split is None:
                return get_dataset_split_names(name, script.dataset_config)
            return load_dataset(name, script.dataset_config, split=split)
        except Exception as error:  # datasets raises many types (connection, not found, config): all fatal here
            raise RecipeError(f"dataset {name!r} (config {script.dataset_config!r}) could not be loaded: {error}. "
                              "Offline, point dataset_name at a local .jsonl file or a generated task such as "
                              f"{tasks.PREFIX}gsm_symbolic.") from error

    splits = hub()
    return hub(script.dataset_train_split), {k: (lambda k=k: hub(k)) if k in splits else None for k in wanted}


def gsm8k_to_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A GSM8K row (question, answer = reasoning + '#### N') in the generated tasks' chat format."""
    match = _GSM8K_FINAL.search(row["answer"])
    if match is None:
        raise RecipeError(f"gsm8k row has no '#### <answer>' line: {row['answer'][-80:]!r}")
    final = match.group(1).replace(",", "").strip()
    # Calculator annotations such as <<48/2=24>> are noise for a chat model.
    reasoning = re.sub(r"<<[^>]*>>", "", row["answer"][: match.start()]).strip()
    return {"prompt": tasks.format_prompt(row["question"], worked=True),
            "completion": tasks.format_completion(final, reasoning), "answer": final}


def check_columns(dataset: Any, experiment: Experiment, what: str) -> None:
    """Fail with the missing column names (and the ones present) before any training."""
    args, columns = experiment.args, set(dataset.column_names)
    if args.task == "classification":
        if missing := [c for c in (args.text_column, args.label_column) if c not in columns]:
            raise RecipeError(
                f"{what} data lacks column(s) {missing} (has {sorted(columns)}); set text_column / label_column")
        labels = set(dataset.unique(args.label_column))
        if bad := sorted((x for x in labels if not isinstance(x, int) or not 0 <= x < args.num_labels), key=str):
            raise RecipeError(f"{what} labels {bad[:5]} are not integers in [0, num_labels={args.num_labels})")
    elif not any(all(c in columns for c in fmt) for fmt in SFT_FORMATS):
        raise RecipeError(f"{what} data needs columns {_SFT_WANTED}; it has {sorted(columns)}")
    elif what == "held-out" and args.accuracy_size and not {"prompt", "answer"} <= columns:
        raise RecipeError(f"accuracy_size > 0 needs held-out columns 'prompt' and 'answer'; it has {sorted(columns)} "
                          "(set accuracy_size: 0 to skip the accuracy eval)")


def load_splits(experiment: Experiment) -> tuple[Any, Any]:
    """The train and held-out datasets of an experiment, formatted, subsampled and checked."""
    script, args = experiment.script, experiment.args
    # Held-out rows: enough for the eval loss and for the accuracy eval.
    heldout_size = None if args.eval_size is None else max(args.eval_size, args.accuracy_size)
    _check_pool(experiment)
    # The train rows every run shares (fixed by dataset_seed): the pool when there is one.
    shared_size = args.train_pool_size or args.train_size
    name = ALIASES.get(str(script.dataset_name), str(script.dataset_name))
    if name.startswith(tasks.PREFIX):
        if not args.train_size or heldout_size is None:
            raise RecipeError(f"dataset_name {script.dataset_name} generates data: set train_size and eval_size")
        for split in (script.dataset_train_split, script.dataset_test_split):
            if split not in tasks.SPLITS:
                raise RecipeError(f"generated data has the splits {', '.join(tasks.SPLITS)}; got {split!r}")
        task = name.removeprefix(tasks.PREFIX)
        try:
            train, heldout = (tasks.generated_dataset(task, split, size, args.dataset_seed, script.dataset_config)
                              for split, size in ((script.dataset_train_split, shared_size),
                                                  (script.dataset_test_split, heldout_size)))
        except ValueError as error:
            raise RecipeError(str(error)) from error
    else:
        train, held = _load_source(experiment)
        missing = [split for split, loader in held.items() if loader is None]
        requested = script.dataset_test_split
        heldout = None if requested in missing else held[requested]()
        if args.dataset_format == "gsm8k":
            for what, dataset in (("train", train), ("held-out", heldout)):
                if dataset is not None and not {"question", "answer"} <= set(dataset.column_names):
                    raise RecipeError(f"dataset_format gsm8k needs columns 'question' and 'answer'; {what} data "
                                      f"has {sorted(dataset.column_names)}")
            convert = lambda d: None if d is None else d.map(gsm8k_to_chat, remove_columns=d.column_names)
            train, heldout = convert(train), convert(heldout)
        if missing:
            train, carved = _carve(train, missing, heldout_size, args.dataset_seed)
            heldout = carved.get(requested, heldout)
        if args.train_pool_size is None:  # a pool too large for the data is an error of _train_rows
            _warn_if_short(train, args.train_size, "train_size", "train data (once the held-out rows are out)")
        setting = "eval_size" if heldout_size == args.eval_size else "accuracy_size"
        _warn_if_short(heldout, heldout_size, setting, f"held-out split {requested!r}")
        train = _subsample(train, shared_size, args.dataset_seed)
        heldout = _subsample(heldout, heldout_size, args.dataset_seed)
    train = _train_rows(train, experiment)
    check_columns(train, experiment, "train")
    check_columns(heldout, experiment, "held-out")
    return train, heldout


def _token_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """A row's tokens: a chat row through the tokenizer's chat template, text (or prompt + completion) as is."""
    if "messages" in row or isinstance(row.get("prompt"), list):
        messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        # The chat template writes the special tokens itself: encoding its text must not add them again.
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    return tokenizer(row["text"] if "text" in row else row["prompt"] + row["completion"])["input_ids"]


def jsonl_batches(rows: list[dict[str, Any]], tokenizer: Any, *, classifier: bool, batch_size: int,
                  max_length: int) -> list[dict[str, Any]]:
    """Rows of a data file as model batches, for a loss over every token (the sharpness command's --data).

    Each row is encoded as training encodes its format and cut to ``max_length`` tokens. transformers' padding
    collator pads each batch and turns a classifier's ``label`` into ``labels``.

    The rows stay a Python list rather than a ``datasets.Dataset``. One file may mix row formats (text in one
    row, messages in the next), and a Dataset's single table of columns cannot hold such rows.
    """
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    encoded = [{"input_ids": _token_ids(row, tokenizer)[:max_length], **({"label": row["label"]} if classifier else {})}
               for row in rows]
    return [dict(collate(encoded[start:start + batch_size])) for start in range(0, len(encoded), batch_size)]


def sft_columns(dataset: Any) -> Any:
    """Only the columns SFTTrainer trains on (the ``answer`` column is for the accuracy eval)."""
    keep = {"prompt", "completion", "messages", "text"}
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])
