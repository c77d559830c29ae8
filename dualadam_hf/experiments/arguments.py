"""An experiment's arguments, parsed the way TRL scripts parse theirs (see docs/recipes.md).

A recipe is a flat YAML mapping of ``key: value``. ``trl.TrlParser`` reads it into TRL's ``ScriptArguments``,
``SFTConfig`` (``TrainingArguments`` for ``task: classification``) and ``ModelConfig``, and into
:class:`ExperimentArguments` for what TRL lacks. A ``--key value`` on the command line wins over the YAML. A
``compare:`` mapping is read by ``dualadam-hf compare`` only.

Every problem is reported before any model loads, with the valid names.
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

from ..integrations.optim_args import boolean_word
from .recipe_file import RecipeError, check_recipe_file
from .sharpness import SharpnessSettings

TASKS = ("sft", "classification")
DATASET_FORMATS = ("auto", "gsm8k")
COMPARE_KEY = "compare"
_SHARPNESS = SharpnessSettings()


def whole_number(value: Any, what: str, minimum: int | None = None) -> int:
    """A YAML or command-line value as a whole number, else a RecipeError naming ``what``.

    ``3`` and ``"3"`` pass; ``2.7`` and ``"two"`` do not. Nor does ``true``: YAML's booleans are ints to Python,
    so without a check of its own it would pass as 1.
    """
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                  text.lstrip("+-").isdigit())):
        raise RecipeError(f"{what} must be a whole number, got {value!r}")
    if minimum is not None and int(text) < minimum:
        raise RecipeError(f"{what} must be >= {minimum}, got {int(text)}")
    return int(text)


def true_or_false(value: Any, what: str) -> bool:
    """A YAML or command-line value as a boolean, else a RecipeError naming ``what``.

    Booleans pass, and so do the words of :data:`~dualadam_hf.integrations.optim_args.BOOLEAN_WORDS` (true/false,
    yes/no, 1/0), as text or as the numbers 1 and 0. The text ``"false"`` is therefore
    False, where Python alone would call it true, as it calls any non-empty string.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and (word := boolean_word(str(value))) is not None:
        return word
    raise RecipeError(f"{what} must be true or false, got {value!r}")


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ExperimentArguments:
    """What an experiment needs beyond TRL's dataclasses: task, sizes, accuracy eval, sharpness, resume."""

    task: str = _field("sft", f"One of {TASKS}.")
    num_labels: int = _field(2, "Classes, for task: classification.")
    dataset_format: str = _field("auto", f"One of {DATASET_FORMATS}; gsm8k turns question/answer into chat.")
    dataset_seed: int = _field(0, "Seed of generated data and of subsampling.")
    dataset_validation_split: str = _field(
        "validation", "The split compare chooses learning rates on (carved from train if the source lacks it).")
    train_size: int | None = _field(None, "Train rows to use (None: all).")
    train_pool_size: int | None = _field(
        None, "A pool of this many train rows, fixed by dataset_seed. Each run draws its train_size rows from it "
        "with its own seed, so the seeds vary the data too. Held-out rows stay fixed and outside the pool. None: "
        "the train_size rows are fixed by dataset_seed.")
    eval_size: int | None = _field(None, "Held-out rows for the eval loss (None: all).")
    text_column: str = _field("text", "Input text column, for task: classification.")
    label_column: str = _field("label", "Integer label column, for classification.")
    accuracy_size: int = _field(0, "Held-out rows scored by greedy generation (exact match); 0 skips it.")
    accuracy_during_training: bool = _field(False, "Also score exact match at every evaluation during training.")
    max_new_tokens: int = _field(256, "Generation length for the accuracy eval.")
    generation_batch_size: int = _field(8, "Batch size of the accuracy eval.")
    sharpness: bool = _field(False, "Measure the sharpness of the final model (slow).")
    sharpness_batches: int = _field(_SHARPNESS.batches, "Held-out batches for sharpness.")
    sharpness_batch_size: int | None = _field(None, "Rows per sharpness batch (None: per_device_eval_batch_size).")
    sharpness_max_iters: int = _field(_SHARPNESS.max_iters, "Power iterations.")
    sharpness_probes: int = _field(_SHARPNESS.probes, "Hutchinson probes for the trace.")
    resume_without_optimizer_state: bool = _field(
        False, "Allow resuming from a checkpoint that has no optimizer state (the optimizer restarts).")
    # The Trainer's name for starting over (transformers 5's TrainingArguments lacks the field); without it,
    # train refuses a folder that holds a run.
    overwrite_output_dir: bool = _field(
        False, "Start over in an output_dir that holds a run: remove its checkpoints, results and model first.")

    def __post_init__(self) -> None:
        for name, valid in (("task", TASKS), ("dataset_format", DATASET_FORMATS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null for all rows), got {getattr(self, name)}")
        for name, low in (("accuracy_size", 0), ("max_new_tokens", 1), ("generation_batch_size", 1),
                          ("num_labels", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        self.sharpness_settings(seed=0)  # checks the sharpness keys now, not after training

    def sharpness_settings(self, seed: int) -> SharpnessSettings:
        """The settings of the sharpness measurement, its random vectors drawn with ``seed``."""
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


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe's mapping; a missing file, bad YAML, a non-mapping, and what :func:`.recipe_file.check_recipe_file`
    refuses (not UTF-8, a key named twice, an empty file) are a RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path} (give --config recipes/<name>.yaml)")
    check_recipe_file(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from error
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of key: value, got {type(data).__name__}")
    return data or {}


def _as_argument_text(key: str, value: Any, hint: Any, where: str) -> Any:
    """A YAML value as the text argparse would get from ``--key value``, so that argparse checks it.

    PyYAML gives scalars types of their own, and argparse converts and checks only defaults given as text:
    ``max_steps: 2.7`` would skip the int check unless it is turned back into text. A list stays a list where
    the field takes one and is an error elsewhere. A mapping is passed on as it is, except ``optim_args``,
    which is joined into the ``"k=v,..."`` text transformers parses.
    """
    from ..integrations.optim_args import optim_args_text

    if value is None or (isinstance(value, dict) and key != "optim_args"):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list):
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        if not any(typing.get_origin(o) is list or o is list for o in (typing.get_args(hint) if union else (hint,))):
            raise RecipeError(f"{where}: {key} takes one value, got a list {value}")
        return [str(v) for v in value]
    if isinstance(value, dict):
        return optim_args_text(value)
    raise RecipeError(f"{where}: {key} has an unsupported value {value!r}")


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_keys_message(where: str, unknown: list[str], valid: list[str]) -> str:
    ours = [f.name for f in dataclasses.fields(ExperimentArguments)]
    hints = ", ".join(f"'{k}'" + _did_you_mean(k, valid) for k in unknown)
    return (f"unknown key(s) {where}: {hints}.\n"
            + textwrap.fill(f"Keys of this toolkit: {', '.join(ours)}.", 120) + "\n"
            + textwrap.fill(f"Keys of TRL/transformers: {', '.join(k for k in valid if k not in ours)}.", 120))


def _keys_of(strings: list[str]) -> list[str]:
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")]


def _value_of(key: str, data: dict[str, Any], overrides: list[str]) -> Any:
    """A key's value after the command line's `--key value` / `--key=value` (before any parsing)."""
    value = data.get(key)
    for i, token in enumerate(overrides):
        if token == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif token.startswith(f"--{key}="):
            value = token.split("=", 1)[1]
    return value


def check_optimizer_name(name: str) -> None:
    """A RecipeError, with the closest valid name, unless ``name`` is one of transformers' ``optim`` names.

    dualadam and invadam are registered first, so they are valid whether or not the import hook has run.
    """
    from dualadam_hf.integrations.transformers import register

    register()  # `optim: dualadam` is valid before any parser is built, hook or not
    from transformers.training_args import OptimizerNames

    valid = [o.value for o in OptimizerNames]
    if name not in valid:
        raise RecipeError(f"unknown optimizer {name!r}{_did_you_mean(name, valid)}; valid optim names: "
                          f"{', '.join(valid)}")


def load_experiment(path: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Parse a recipe YAML plus `--key value` overrides with TrlParser; every error is a RecipeError."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    overrides, data, where = list(overrides or []), read_yaml(path), f"recipe {path}"
    compare = data.pop(COMPARE_KEY, None) or {}
    if not isinstance(compare, dict):
        raise RecipeError(f"{where}: {COMPARE_KEY} must be a mapping, got {type(compare).__name__}")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"{where}: env must be a mapping of variable: value")
    for key, value in env.items():  # as TrlParser does for its --config
        os.environ[str(key)] = str(value)
    task = _value_of("task", {"task": "sft", **data}, overrides)
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if task == "sft":
        from trl import SFTConfig as TrainerConfig
    else:
        from transformers import TrainingArguments as TrainerConfig
    classes = (ScriptArguments, TrainerConfig, ModelConfig, ExperimentArguments)
    hints: dict[str, Any] = {}  # every init field with its resolved type hint
    for cls in classes:
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls) if f.init})
    if (optim := _value_of("optim", data, overrides)) is not None:
        check_optimizer_name(str(optim))
    defaults = {k: _as_argument_text(k, v, hints.get(k, Any), where) for k, v in data.items()}
    # TRL's SFTConfig defaults the deprecated name `gradient_checkpointing` (to True), so transformers warned
    # in every parse of a recipe that names neither: TRL's default, given under the current name, is the same
    # run without the warning. A recipe or override that uses the old name keeps its own warning.
    legacy = next((f.default for f in dataclasses.fields(TrainerConfig) if f.name == "gradient_checkpointing"), None)
    if "activation_checkpointing" in hints and isinstance(legacy, bool) and all(
            _value_of(key, data, overrides) is None for key in ("activation_checkpointing", "gradient_checkpointing")):
        defaults["activation_checkpointing"] = _as_argument_text("activation_checkpointing", legacy, bool, where)
    # allow_abbrev=False: `--max_step` must be an error with a suggestion, not taken as `--max_steps`.
    parser = TrlParser(classes, exit_on_error=False, allow_abbrev=False)
    if unknown := _keys_of(parser.set_defaults_with_config(**defaults)):
        raise RecipeError(_unknown_keys_message(f"in {where}", unknown, list(hints)))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from error
    if remaining:
        if not (keys := _keys_of(remaining)):
            raise RecipeError(f"bad override(s) {' '.join(remaining)}: expected --key value")
        raise RecipeError(_unknown_keys_message("on the command line", keys, list(hints)))
    experiment = Experiment(*parsed, path=str(path), compare=compare)
    check_experiment(experiment)
    return experiment


def check_experiment(experiment: Experiment) -> None:
    """Checks that need no model or data: required keys and values that only make sense together."""
    where, training = f"recipe {experiment.path}", experiment.training
    if not experiment.model.model_name_or_path:
        raise RecipeError(f"{where} sets no model_name_or_path")
    if not experiment.script.dataset_name:
        raise RecipeError(f"{where} sets no dataset_name")
    if training.max_steps == 0 or training.max_steps < -1:
        raise RecipeError(f"{where}: max_steps must be a positive number of optimizer steps (or -1 to train "
                          f"num_train_epochs), got {training.max_steps}")
    if training.max_steps == -1 and not training.num_train_epochs > 0:
        raise RecipeError(f"{where}: with max_steps -1, num_train_epochs must be > 0")
    # Zero would end in a division by zero or an empty batch deep inside the Trainer, after the model loaded.
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_length"):
        value = getattr(training, name, None)
        if value is not None and value < 1:
            raise RecipeError(f"{where}: {name} must be >= 1, got {value}")
    check_optimizer_settings(training, where)
    if experiment.args.task == "classification" and experiment.model.use_peft \
            and experiment.model.lora_task_type != "SEQ_CLS":
        raise RecipeError(f"{where}: task classification with LoRA needs lora_task_type: SEQ_CLS")


def check_optimizer_settings(training: Any, where: str) -> None:
    """A RecipeError, before any model loads, for optimizer settings the optimizer would refuse when training
    starts: the optimizer the Trainer would build is built on a stand-in parameter, with the run's weight
    decay (the Trainer passes it in param groups, which torch's constructors do not check: torch's AdamW would
    train with ``weight_decay: -1``). DualAdam's own settings are checked when the arguments are parsed; an
    optimizer that cannot be built without the model or a missing package is left to the Trainer."""
    import inspect
    import warnings

    import torch
    from transformers import Trainer

    from ..integrations.transformers import register

    register()  # the Trainer builds DualAdam and InvAdam for their names
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training)
        takes_decay = "weight_decay" in inspect.signature(optimizer_cls).parameters
    except Exception:  # noqa: BLE001 - an optimizer this check cannot build: the Trainer reports its own problem
        return
    if takes_decay:
        kwargs = {**kwargs, "weight_decay": training.weight_decay}
    try:
        with warnings.catch_warnings():  # the real construction at train start warns, once
            warnings.simplefilter("ignore")
            optimizer_cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except ValueError as error:
        reason = (str(error).strip().splitlines() or ["invalid settings"])[0]
        optim = getattr(training.optim, "value", training.optim)
        raise RecipeError(f"{where}: --optim {optim}: {reason}") from None
    except Exception:  # noqa: BLE001 - e.g. a fused or 8-bit optimizer that needs an accelerator
        return


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
        f"recipe not found: {name_or_path} (give a path to a YAML file or one of: {', '.join(names) or 'none'})")
