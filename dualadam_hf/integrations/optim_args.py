"""From TrainingArguments to DualAdam/InvAdam constructor arguments (no transformers import needed).

`--optim_args` arrives as one string "k=v,k2=v2" (or, from a YAML config, a mapping); it is parsed into typed
values, with errors that list the valid keys.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ..keyvalue import join_pairs, parse_pairs
from ..optimizer import BLEND_KEYS, INVERSE_SCALE_NAMES, DualAdam, InvAdam, invadam_refusal, resolve_blend
from .names import DUALADAM_NAME, INVADAM_NAME, OPTIMIZER_NAMES, STATE_BITS_OF_NAME

OPTIMIZER_CLASSES: dict[str, type[DualAdam]] = {DUALADAM_NAME: DualAdam, INVADAM_NAME: InvAdam,
                                                **dict.fromkeys(STATE_BITS_OF_NAME, DualAdam)}
# Hyperparameters that TrainingArguments carries itself (learning_rate, adam_beta1, ...).
_TRAINING_ARGUMENT_KEYS = ("lr", "betas", "eps", "weight_decay")


# The words a boolean setting may be written as, in any case: in optim_args, recipes and on the command line
# (arguments.true_or_false). Two readers take fewer on purpose: resume_from_checkpoint reads the digits as the
# name of a checkpoint folder, like any other text that is no word, and a dataset generator setting
# (tasks.parse_config) keeps "yes"/"no" as text, which a setting may be. The startup hook
# (_dualadam_hf_autoregister) reads its opt-out variable without importing the package, so it keeps its own words.
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def boolean_word(raw: str) -> bool | None:
    """The boolean that ``raw`` names (:data:`BOOLEAN_WORDS`, any case, spaces around ignored); None for other text."""
    return BOOLEAN_WORDS.get(raw.strip().lower())


def _parse_bool(raw: str) -> bool:
    if (value := boolean_word(raw)) is None:
        raise ValueError("expected true or false")
    return value


def _parse_whole_number(raw: str) -> int:
    value = float(raw)  # accepts "500" and "5e2"
    if not value.is_integer():
        raise ValueError("expected a whole number")
    return int(value)


# The blend keys are the optimizer's (BLEND_KEYS, in its order: switch_rate, blend_steps, blend_fraction).
_BLEND_PARSERS: dict[str, Callable[[str], Any]] = dict(zip(BLEND_KEYS, (float, _parse_whole_number, float),
                                                           strict=True))
_COMMON_KEYS: dict[str, Callable[[str], Any]] = {
    "inverse_scale": lambda raw: raw.strip().lower() if raw.strip().lower() in INVERSE_SCALE_NAMES else float(raw),
    "foreach": _parse_bool, "fused": _parse_bool, "maximize": _parse_bool, "state_dtype": str,
    "bf16_stochastic_round": _parse_bool,
}
_OPTIM_ARGS_PARSERS: dict[str, dict[str, Callable[[str], Any]]] = {
    DUALADAM_NAME: {**_BLEND_PARSERS, **_COMMON_KEYS},
    INVADAM_NAME: dict(_COMMON_KEYS),  # InvAdam holds the blend at 1: no blend keys
    # The name sets state_bits; the rest is DualAdam's.
    **dict.fromkeys(STATE_BITS_OF_NAME, {**_BLEND_PARSERS, **_COMMON_KEYS, "block_size": _parse_whole_number}),
}
# Keys an explicit caller of optimizer_cls_and_kwargs may override beyond --optim_args (what a name implies).
_OVERRIDE_ONLY_KEYS = ("state_bits",)


def optimizer_name(training_args: Any) -> str:
    """The plain string value of `training_args.optim` (an OptimizerNames member or a str)."""
    optim = getattr(training_args, "optim", None)
    return str(getattr(optim, "value", optim))


def valid_optim_args_keys(name: str = DUALADAM_NAME) -> tuple[str, ...]:
    """Keys accepted in `--optim_args` for `--optim <name>`."""
    if name not in _OPTIM_ARGS_PARSERS:
        raise ValueError(f"Unknown DualAdam optimizer name {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return tuple(_OPTIM_ARGS_PARSERS[name])


def optim_args_text(value: str | Mapping[str, Any] | None) -> str | None:
    """`optim_args` as the "k=v,k2=v2" string transformers expects; a YAML mapping is joined into one."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"optim_args must be a string 'k=v,k2=v2' or a mapping, got {type(value).__name__}")
    return join_pairs(value)


def parse_optim_args(text: str | Mapping[str, Any] | None, name: str = DUALADAM_NAME) -> dict[str, Any]:
    """Parse `--optim_args "switch_rate=8e-5,foreach=true"` (or a mapping) into kwargs for `--optim <name>`."""
    valid_keys = ", ".join(valid_optim_args_keys(name))
    parsers, parsed = _OPTIM_ARGS_PARSERS[name], {}
    try:
        pairs = parse_pairs(optim_args_text(text), "--optim_args")
    except ValueError as error:
        raise ValueError(f"{error} (e.g. --optim_args \"blend_fraction=0.1\"); valid keys for --optim {name}: "
                         f"{valid_keys}") from None
    for key, raw in pairs.items():
        if key not in parsers:
            reason = f" ({invadam_refusal([key])})" if name == INVADAM_NAME and key in BLEND_KEYS else ""
            raise ValueError(f"Unknown --optim_args key {key!r} for --optim {name}{reason}; valid keys: {valid_keys}")
        try:
            parsed[key] = parsers[key](raw)
        except ValueError as error:
            raise ValueError(f"--optim_args {key}={raw!r} is malformed ({error}); valid keys: {valid_keys}") from None
    try:  # the optimizer owns the rule that the blend is given one way only
        resolve_blend(*(parsed.get(key) for key in BLEND_KEYS))
    except ValueError as error:
        message = str(error)
        raise ValueError(f"--optim_args: {message[:1].lower()}{message[1:]}") from None
    return parsed


def optimizer_cls_and_kwargs(training_args: Any, **overrides: Any) -> tuple[type[DualAdam], dict[str, Any]]:
    """`(DualAdam or InvAdam, kwargs)` built from TrainingArguments, for `Trainer(optimizer_cls_and_kwargs=...)`.

    lr, betas, eps and weight_decay come from learning_rate, adam_beta1/adam_beta2, adam_epsilon and
    weight_decay. `optim_args` are parsed only when `training_args.optim` is one of DualAdam's names (otherwise
    they belong to another optimizer); dualadam_8bit/dualadam_4bit set `state_bits`; `overrides` win over all,
    e.g. `blend_fraction=0.1` or `state_bits=8`. InvAdam is chosen only for `optim` invadam.
    """
    name = optimizer_name(training_args)
    kwargs: dict[str, Any] = {
        "lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon, "weight_decay": training_args.weight_decay,
    }
    if name in OPTIMIZER_NAMES:
        kwargs.update(parse_optim_args(getattr(training_args, "optim_args", None), name))
        if name in STATE_BITS_OF_NAME:
            kwargs["state_bits"] = STATE_BITS_OF_NAME[name]
    else:
        name = DUALADAM_NAME
    allowed = _TRAINING_ARGUMENT_KEYS + valid_optim_args_keys(name) + _OVERRIDE_ONLY_KEYS
    if unknown := sorted(set(overrides) - set(allowed)):
        raise TypeError(
            f"Unknown {OPTIMIZER_CLASSES[name].__name__} override(s) {unknown}; valid: {', '.join(allowed)}"
        )
    if set(overrides) & set(BLEND_KEYS):
        # An override of the blend length replaces the one from optim_args instead of clashing with it.
        for key in BLEND_KEYS:
            kwargs.pop(key, None)
    kwargs.update(overrides)
    return OPTIMIZER_CLASSES[name], kwargs


def sharded_engine(training_args: Any) -> str | None:
    """The engine that will shard the optimizer state, as TrainingArguments or `accelerate launch` (through its
    environment, set before the script starts) say: "DeepSpeed", "FSDP" or None."""
    if getattr(training_args, "deepspeed", None) or BOOLEAN_WORDS.get(
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower()):
        return "DeepSpeed"
    if getattr(training_args, "fsdp", None) or BOOLEAN_WORDS.get(os.environ.get("ACCELERATE_USE_FSDP", "").lower()):
        return "FSDP"
    return None


def fsdp_version(training_args: Any) -> int:
    """The FSDP version of a run that FSDP shards: TrainingArguments' ``fsdp_config`` says it where ``--fsdp`` is
    given (transformers' default: 2), else `accelerate launch`'s environment (``FSDP_VERSION``, accelerate's
    default: 1)."""
    if getattr(training_args, "fsdp", None):
        return int((getattr(training_args, "fsdp_config", None) or {}).get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1"))


# Why quantized moments do not run under a sharding engine; refused where the arguments are built, before the model
# loads (minutes for a large model) rather than at train begin or the first step. FSDP2 runs them (on each rank's
# shard, see dualadam_hf.lowbit).
_LOW_BIT_OBSTACLES = {
    "DeepSpeed": "ZeRO hands the optimizer flat partitions of many tensors, so quantization blocks would straddle "
                 "tensors, a partition that is no whole number of blocks would keep fp32 moments without a word, "
                 "and DeepSpeed's universal checkpoints read exp_avg and exp_avg_sq as plain tensors",
    "FSDP1": "FSDP1 hands the optimizer flat parameters that join many tensors, so quantization blocks would "
             "straddle tensors, and its optimizer state dict unflattens the moments as plain tensors",
}


def _low_bit_obstacle(training_args: Any) -> str | None:
    """The engine that will shard this run if it cannot run quantized moments ("DeepSpeed", "FSDP1"), else None."""
    engine = sharded_engine(training_args)
    if engine == "FSDP":
        return "FSDP1" if fsdp_version(training_args) == 1 else None
    return engine


def deepspeed_config(training_args: Any) -> dict[str, Any] | None:
    """The DeepSpeed config a run will use, where it can be read before the model loads: TrainingArguments'
    ``deepspeed`` (a dict or a JSON file), else the JSON file `accelerate launch` names in its environment; None
    where there is none (or accelerate builds it from its own config's inline keys, see
    :func:`offload_swaps_the_optimizer`)."""
    import json

    given = getattr(training_args, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(given, dict):
        return given
    if isinstance(given, str) and given.strip() and os.path.isfile(given):
        with open(given, encoding="utf-8") as file:
            found = json.load(file)
        return found if isinstance(found, dict) else None
    return None


def offload_swaps_the_optimizer(training_args: Any) -> bool:
    """Whether accelerate will replace the Trainer's optimizer with DeepSpeedCPUAdam: DeepSpeed optimizer offload
    without ``"zero_force_ds_cpu_optimizer": false`` (DeepSpeed's default is true). An accelerate config with
    inline DeepSpeed keys cannot set that flag, so its optimizer offload always swaps."""
    if sharded_engine(training_args) != "DeepSpeed":
        return False
    config = deepspeed_config(training_args)
    if config is None:
        device = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
        return device.lower() not in ("", "none")
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() != "none" and config.get("zero_force_ds_cpu_optimizer",
                                                                              True) is not False


def check_training_args(training_args: Any) -> None:
    """Fail at argument-parsing time, not at the first step, when the DualAdam settings are invalid or their kind
    of state cannot run under the configured engine."""
    import torch

    optimizer_cls, kwargs = optimizer_cls_and_kwargs(training_args)
    if offload_swaps_the_optimizer(training_args):
        raise ValueError(f"--optim {optimizer_name(training_args)} under DeepSpeed optimizer offload: accelerate would "
                         "train with DeepSpeedCPUAdam, not DualAdam, because the DeepSpeed config does not set "
                         '"zero_force_ds_cpu_optimizer": false. Set it in the DeepSpeed JSON file (an accelerate '
                         "config's inline deepspeed keys cannot; name the file with deepspeed_config_file, as "
                         "accelerate_configs/deepspeed_zero3_offload.yaml does).")
    if kwargs.get("state_bits") is not None and (engine := _low_bit_obstacle(training_args)):
        raise ValueError(f"--optim {optimizer_name(training_args)} keeps {kwargs['state_bits']}-bit optimizer state, "
                         f"which does not run under {engine}: {_LOW_BIT_OBSTACLES[engine]}. Use DDP or FSDP2 "
                         f"(fsdp_version: 2) for low-bit state, or --optim dualadam under {engine}.")
    # Building the optimizer over one dummy tensor runs every check of the constructor. Its warnings (e.g. an
    # update with no inverse part) are left to the real construction at train start, so that each reaches the
    # user once, not once per argument parse (compare parses every variant; `trl sft` parses in two processes).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer_cls([torch.zeros(1)], **kwargs)
    except (ValueError, ImportError) as error:  # ImportError: low-bit state without torchao
        raise ValueError(f"--optim {optimizer_name(training_args)}: {error}") from None
