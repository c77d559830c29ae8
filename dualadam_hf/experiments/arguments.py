"""An experiment's arguments, parsed the way TRL scripts parse theirs.

A recipe is a flat YAML mapping, as in TRL and the alignment-handbook, read by ``trl.TrlParser`` into
``ScriptArguments`` (data), ``SFTConfig`` (``TrainingArguments`` for ``task: classification``),
``ModelConfig`` (model and LoRA) and :class:`ExperimentArguments`, which holds only what TRL lacks:
sizes, the accuracy evaluation and sharpness. ``--key value`` on the command line wins over the YAML.
A recipe may also hold a ``compare:`` mapping, read by ``dualadam-hf compare`` only.

Every problem is reported before any model is loaded, with the names that would have been valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..sharpness import SharpnessSettings

TASKS = ("sft", "classification")
DATASET_FORMATS = ("auto", "gsm8k")
COMPARE_KEY = "compare"
_SHARPNESS = SharpnessSettings()


class RecipeError(ValueError):
    """A recipe or an override is wrong; the message says what and how to fix it."""


@dataclass
class ExperimentArguments:
    """What an experiment needs beyond TRL's dataclasses: task, sizes, accuracy eval, sharpness, resume."""

    task: str = field(default="sft", metadata={"help": f"One of {TASKS}."})
    num_labels: int = field(default=2, metadata={"help": "Classes, for task: classification."})
    dataset_format: str = field(
        default="auto", metadata={"help": f"One of {DATASET_FORMATS}; gsm8k turns question/answer into chat."}
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated data and of subsampling."})
    dataset_validation_split: str = field(
        default="validation",
        metadata={"help": "The split compare chooses learning rates on (carved from train if the source lacks it)."},
    )
    train_size: int | None = field(default=None, metadata={"help": "Train rows to use (None: all)."})
    eval_size: int | None = field(default=None, metadata={"help": "Held-out rows for the eval loss (None: all)."})
    text_column: str = field(default="text", metadata={"help": "Input text column, for task: classification."})
    label_column: str = field(default="label", metadata={"help": "Integer label column, for classification."})
    accuracy_size: int = field(
        default=0, metadata={"help": "Held-out rows scored by greedy generation (exact match); 0 skips it."}
    )
    accuracy_during_training: bool = field(
        default=False, metadata={"help": "Also score exact match at every evaluation during training."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length for the accuracy eval."})
    generation_batch_size: int = field(default=8, metadata={"help": "Batch size of the accuracy eval."})
    sharpness: bool = field(default=False, metadata={"help": "Measure the sharpness of the final model (slow)."})
    sharpness_batches: int = field(default=_SHARPNESS.batches, metadata={"help": "Held-out batches for sharpness."})
    sharpness_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per sharpness batch (None: per_device_eval_batch_size)."}
    )
    sharpness_max_iters: int = field(default=_SHARPNESS.max_iters, metadata={"help": "Power iterations."})
    sharpness_probes: int = field(default=_SHARPNESS.probes, metadata={"help": "Hutchinson probes for the trace."})
    resume_without_optimizer_state: bool = field(
        default=False,
        metadata={"help": "Allow resuming from a checkpoint that has no optimizer state (the optimizer restarts)."},
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"unknown dataset_format {self.dataset_format!r}; valid: {', '.join(DATASET_FORMATS)}")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null for all rows), got {value}")
        for name in ("accuracy_size",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "generation_batch_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.sharpness_settings(seed=0)  # checks the sharpness keys now, not after training

    def sharpness_settings(self, seed: int) -> SharpnessSettings:
        return SharpnessSettings(batches=self.sharpness_batches, batch_size=self.sharpness_batch_size,
                                 max_iters=self.sharpness_max_iters, probes=self.sharpness_probes, seed=seed)


@dataclass
class Experiment:
    """A parsed recipe: TRL's argument dataclasses, ours, and where they came from."""

    script: Any  # trl.ScriptArguments: dataset_name, dataset_config, dataset_train_split, dataset_test_split
    training: Any  # trl.SFTConfig, or transformers.TrainingArguments for classification
    model: Any  # trl.ModelConfig: model, dtype, LoRA
    args: ExperimentArguments
    path: str
    compare: dict[str, Any]  # the recipe's `compare:` mapping (empty if none)


def config_classes(task: str) -> tuple[type, ...]:
    """The dataclasses TrlParser fills for a task."""
    from trl import ModelConfig, ScriptArguments

    if task == "sft":
        from trl import SFTConfig as TrainerConfig
    else:
        from transformers import TrainingArguments as TrainerConfig
    return ScriptArguments, TrainerConfig, ModelConfig, ExperimentArguments


def field_types(classes: tuple[type, ...]) -> dict[str, Any]:
    """Every init field of the dataclasses with its resolved type hint."""
    types_ = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        types_.update({f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init})
    return types_


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


def _takes_list(hint: Any) -> bool:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return any(typing.get_origin(o) is list or o is list for o in options)


def _as_argument_text(key: str, value: Any, hint: Any, where: str) -> Any:
    """A YAML value in the form argparse converts and checks as it does `--key value`.

    PyYAML types scalars itself and argparse converts only string defaults, so `max_steps: 2.7` would skip
    the int check that `--max_steps 2.7` gets. Scalars become their text; lists stay lists where the field
    takes one; a mapping is kept only for optim_args (joined into "k=v,...") and mapping-typed fields.
    """
    from ..integrations.optim_args import optim_args_text

    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list):
        if not _takes_list(hint):
            raise RecipeError(f"{where}: {key} takes one value, got a list {value}")
        return [str(v) for v in value]
    if isinstance(value, dict):
        if key == "optim_args":
            return optim_args_text(value)
        return value
    raise RecipeError(f"{where}: {key} has an unsupported value {value!r}")


def _unknown_keys_message(where: str, unknown: list[str], valid: list[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    ours = [f.name for f in dataclasses.fields(ExperimentArguments)]
    return (
        f"unknown key(s) {where}: {', '.join(hints)}.\n"
        + textwrap.fill(f"Keys of this toolkit: {', '.join(ours)}.", 120)
        + "\n"
        + textwrap.fill(f"Keys of TRL/transformers: {', '.join(k for k in valid if k not in ours)}.", 120)
    )


def _keys_of(strings: list[str]) -> list[str]:
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")]


def _task_of(data: dict[str, Any], overrides: list[str]) -> str:
    task = data.get("task", "sft")
    for i, token in enumerate(overrides):
        if token == "--task" and i + 1 < len(overrides):
            task = overrides[i + 1]
        elif token.startswith("--task="):
            task = token.split("=", 1)[1]
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return task


def valid_optimizer_names() -> list[str]:
    from dualadam_hf.integrations.transformers import register

    register()  # `optim: dualadam` is valid before any parser is built, hook or not
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def check_optimizer_name(name: str) -> None:
    valid = valid_optimizer_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown optimizer {name!r}{hint}; valid optim names: {', '.join(valid)}")


def _optim_in(data: dict[str, Any], overrides: list[str]) -> str | None:
    optim = data.get("optim")
    for i, token in enumerate(overrides):
        if token == "--optim" and i + 1 < len(overrides):
            optim = overrides[i + 1]
        elif token.startswith("--optim="):
            optim = token.split("=", 1)[1]
    return None if optim is None else str(optim)


def load_experiment(path: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Parse a recipe YAML plus `--key value` overrides with TrlParser; every error is a RecipeError."""
    from trl import TrlParser

    overrides = list(overrides or [])
    data = read_yaml(path)
    compare = data.pop(COMPARE_KEY, None) or {}
    if not isinstance(compare, dict):
        raise RecipeError(f"recipe {path}: {COMPARE_KEY} must be a mapping, got {type(compare).__name__}")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"recipe {path}: env must be a mapping of variable: value")
    for key, value in env.items():  # as TrlParser does for its --config
        os.environ[str(key)] = str(value)
    classes = config_classes(_task_of(data, overrides))
    hints = field_types(classes)
    optim = _optim_in(data, overrides)
    if optim is not None:
        check_optimizer_name(optim)
    where = f"recipe {path}"
    defaults = {k: _as_argument_text(k, v, hints.get(k, Any), where) for k, v in data.items()}
    # allow_abbrev=False: `--max_step` must be an error with a suggestion, not taken as `--max_steps`.
    parser = TrlParser(classes, exit_on_error=False, allow_abbrev=False)
    unknown = _keys_of(parser.set_defaults_with_config(**defaults))
    if unknown:
        raise RecipeError(_unknown_keys_message(f"in {where}", unknown, list(hints)))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from error
    if remaining:
        keys = _keys_of(remaining)
        if not keys:
            raise RecipeError(f"bad override(s) {' '.join(remaining)}: expected --key value")
        raise RecipeError(_unknown_keys_message("on the command line", keys, list(hints)))
    script, training, model, args = parsed
    experiment = Experiment(script=script, training=training, model=model, args=args, path=str(path),
                            compare=compare)
    check_experiment(experiment)
    return experiment


def check_experiment(experiment: Experiment) -> None:
    """Checks that need no model or data: required keys and values that only make sense together."""
    where = f"recipe {experiment.path}"
    if not experiment.model.model_name_or_path:
        raise RecipeError(f"{where} sets no model_name_or_path")
    if not experiment.script.dataset_name:
        raise RecipeError(f"{where} sets no dataset_name")
    training = experiment.training
    if training.max_steps == 0 or training.max_steps < -1:
        raise RecipeError(
            f"{where}: max_steps must be a positive number of optimizer steps (or -1 to train num_train_epochs), "
            f"got {training.max_steps}"
        )
    if training.max_steps == -1 and not training.num_train_epochs > 0:
        raise RecipeError(f"{where}: with max_steps -1, num_train_epochs must be > 0")
    if experiment.args.task == "classification" and experiment.model.use_peft \
            and experiment.model.lora_task_type != "SEQ_CLS":
        raise RecipeError(f"{where}: task classification with LoRA needs lora_task_type: SEQ_CLS")


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
