"""Variants of a comparison: the entries of ``--optims`` or of a recipe's ``compare: optims:`` (docs/recipes.md).

A variant is a mapping: ``optim`` (a ``TrainingArguments.optim`` name or a preset of :data:`PRESETS`), an
optional ``label``, an optional ``seeds`` (this variant's number of seeds, e.g. fewer for a control), in a suite
an optional ``tasks`` (the labels of the suite's tasks it runs on, e.g. a control on a few), and settings. A key
the optimizer takes goes into its ``optim_args``; any other key is a setting of the run (``warmup_steps``, ...).
The command line's ``NAME[key=value,...]`` is the same mapping written on one line (:func:`entry_mapping`), so both
forms give the same variant and the same label.

The recipe's ``optim_args`` reach every DualAdam/InvAdam variant, each taking the keys it accepts (InvAdam has
no blend keys; the variant's keys win); other optimizers get no ``optim_args``. A variant may change only what
:data:`VARIANT_SETTINGS` lists: the optimizer, its schedule and what only affects speed. Anything else may
change the data, the model or the measurement, and the paired differences would then compare runs that
measured different things; it is refused here, before any run, as are the settings compare sets for each run.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..integrations.optim_args import (
    DUALADAM_NAME,
    INVADAM_NAME,
    OPTIMIZER_NAMES,
    join_pairs,
    parse_optim_args,
    parse_pairs,
    valid_optim_args_keys,
)
from ..optimizer import AUTO, BLEND_KEYS, invadam_refusal
from .arguments import RecipeError, check_optimizer_name, whole_number

# name -> (optimizer, optim_args, label). The matched warmup is DualAdam without its inverse part:
# u = (1-r)*mh/d, i.e. AdamW whose learning rate rises linearly from 0 over exactly DualAdam's blend
# (the same switch rate) and then follows the recipe's schedule. A gain of DualAdam over it is the
# inverse term's.
PRESETS: dict[str, tuple[str, dict[str, str], str]] = {
    "matched_warmup": (DUALADAM_NAME, {"inverse_scale": "0"}, "matched-warmup"),
    "dualadam_scaled": (DUALADAM_NAME, {"inverse_scale": AUTO}, "dualadam-scaled"),
}
# Run settings compare gives each run itself (the learning rate from the grid, the split, the seed, ...).
SET_BY_COMPARE = ("optim", "optim_args", "seed", "output_dir", "learning_rate", "dataset_test_split", "sharpness",
                  "resume_from_checkpoint")
# The run settings a variant may change: the optimizer's, its schedule's, and those that only affect speed. Every
# other setting may change the data, the model or the measurement, and must be the same in every run for the
# paired differences to compare like with like (an allow-list: a setting TRL adds later is refused until known).
VARIANT_SETTINGS = {
    "optimizer": ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"),
    "schedule": ("lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio"),
    "speed": ("gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend",
              "torch_compile_mode", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
              "dataloader_prefetch_factor", "torch_empty_cache_steps", "save_steps", "save_total_limit",
              "report_to", "disable_tqdm"),
}
ALLOWED_VARIANT_SETTINGS = frozenset(key for keys in VARIANT_SETTINGS.values() for key in keys)
# Why a setting a variant cannot change matters, for the ones a user is likely to try; the rest get the general
# reason of :func:`_refused_reason`.
_WHAT_IT_CHANGES = {
    "max_length": "cuts the training and held-out rows at another length",
    "max_seq_length": "cuts the training and held-out rows at another length",
    "per_device_eval_batch_size": "changes how the held-out loss is batched and averaged",
    "eval_accumulation_steps": "changes how the held-out loss is gathered",
    "chat_template_path": "changes the text the model trains and is scored on",
    "completion_only_loss": "changes which tokens the loss counts",
    "assistant_only_loss": "changes which tokens the loss counts",
    "packing": "changes how rows are packed into sequences",
    "max_steps": "changes how long the runs train",
    "num_train_epochs": "changes how long the runs train",
    "per_device_train_batch_size": "changes the batch every step is taken on",
    "gradient_accumulation_steps": "changes the batch every step is taken on",
    "logging_steps": "changes what the final train loss is averaged over",
    "accuracy_size": "changes the held-out rows the accuracy is scored on",
    "max_new_tokens": "changes how long the scored answers may be",
    "eval_size": "changes the held-out rows",
    "train_size": "changes the training rows",
    "train_pool_size": "changes the pool the training rows are drawn from",
    "dataset_name": "changes the data",
    "model_name_or_path": "changes the model",
}
_ENTRY = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[(.*)\])?\s*$", re.S)
_NOT_SETTINGS = ("optim", "label", "seeds")  # keys of a variant that are not settings of its runs
TASKS_KEY = "tasks"  # a suite variant's tasks: a YAML list of task labels, kept apart from the text pairs


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison; ``seeds`` is its own number of seeds (None: the comparison's); ``tasks`` the
    labels of the suite tasks it runs on (None: every task, or no suite)."""

    label: str
    optim: str
    optim_args: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    seeds: int | None = None
    tasks: tuple[str, ...] | None = None

    @property
    def optim_args_text(self) -> str:
        return join_pairs(self.optim_args)

    def overrides(self) -> list[str]:
        """The `--key value` arguments of a run of this variant."""
        return ["--optim", self.optim, "--optim_args", self.optim_args_text,
                *(token for key, value in self.settings.items() for token in (f"--{key}", value))]

    @property
    def folder(self) -> str:
        """The label as a folder name."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label).strip("_") or "variant"


def split_entries(text: str) -> list[str]:
    """Comma-separated entries; commas inside [...] belong to the entry."""
    entries, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise RecipeError(f"--optims {text!r}: a ']' without its '['")
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise RecipeError(f"--optims {text!r}: a '[' without its ']'")
    entries.append(current)
    return [e.strip() for e in entries if e.strip()]


def entry_mapping(entry: str | Mapping[str, Any]) -> dict[str, str]:
    """A variant as the mapping form: ``NAME[k=v,...]`` becomes ``{"optim": NAME, "k": "v", ...}``; a mapping
    has its values turned into text (booleans as true/false), as on the command line."""
    if isinstance(entry, Mapping):
        pairs = {str(k): _text(v) for k, v in entry.items()}
        if "optim" not in pairs:
            raise RecipeError(f"variant {dict(entry)!r} needs an 'optim' key")
        return pairs
    if not isinstance(entry, str) or (match := _ENTRY.match(entry)) is None:
        raise RecipeError(f"variant {entry!r} is not NAME or NAME[key=value,...]")
    try:
        pairs = parse_pairs(match.group(2), f"variant {entry.strip()!r}:")
    except ValueError as error:
        raise RecipeError(str(error)) from None
    if "optim" in pairs:
        raise RecipeError(f"variant {entry.strip()!r}: the optimizer is the name before '['; drop optim=")
    return {"optim": match.group(1), **pairs}


def _default_label(pairs: Mapping[str, str]) -> str:
    """``NAME`` (a preset's own label) or ``NAME[k=v,...]`` with the variant's settings, whichever form it came in."""
    name, settings = pairs["optim"], {k: v for k, v in pairs.items() if k not in _NOT_SETTINGS}
    if not settings:
        return PRESETS[name][2] if name in PRESETS else name
    return f"{name}[{join_pairs(settings)}]"


def check_label(label: str, what: str = "variant") -> None:
    """A label names a variant's (or a suite task's, ``what``) folders and raw logs: one path-safe name. A
    RecipeError for one that is empty, ``.`` or ``..`` (a folder of that name would be this folder or the one
    above it), holds a path separator, or a control or line-breaking character (a newline would split the
    report's lines and the log's)."""
    where = f"{what} label {label!r}"
    if not label.strip():
        raise RecipeError(f"{where} is empty; give the {what} a name (label=...)")
    if label.strip() in (".", ".."):
        raise RecipeError(f"{where} would name the folder itself or the one above it; give another label=")
    if separators := sorted({c for c in label if c in "/\\"}):
        raise RecipeError(f"{where} holds the path separator {separators[0]!r}; a label names one folder: give "
                          "another label=")
    if bad := next((c for c in label if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), None):
        raise RecipeError(f"{where} holds the control character {ord(bad):#06x}; give a label of printable text")


def _refused_reason(key: str) -> str:
    """Why a variant may not change ``key``: what the setting changes."""
    if key in _WHAT_IT_CHANGES:
        return _WHAT_IT_CHANGES[key]
    if key.startswith("sharpness"):
        return "changes how the sharpness is measured"
    return "is not an optimizer, schedule or speed setting, so it may change the data, the model or the measurement"


def _refuse_fixed_settings(where: str, settings: Mapping[str, str]) -> None:
    if "optim_args" in settings:
        raise RecipeError(f"{where}: give optimizer settings as keys (e.g. blend_steps=10), not optim_args")
    if fixed := [key for key in settings if key in SET_BY_COMPARE]:
        raise RecipeError(f"{where}: {', '.join(fixed)} is set by compare for each run; a variant cannot change it")
    for key in settings:
        if key not in ALLOWED_VARIANT_SETTINGS:
            close = difflib.get_close_matches(key, sorted(ALLOWED_VARIANT_SETTINGS), n=1, cutoff=0.85)
            raise RecipeError(
                f"{where}: {key} must be the same in every run: it {_refused_reason(key)}, so the runs of a seed "
                "would not measure the same thing" + (f" (did you mean '{close[0]}'?)" if close else "")
                + ". Set it for all runs instead; a variant may change only its optimizer's keys, "
                + ", ".join(VARIANT_SETTINGS["optimizer"] + VARIANT_SETTINGS["schedule"])
                + " and settings that only affect speed (docs/recipes.md, Variants)")


def _recipe_optim_args(optim: str, recipe_optim_args: str | None) -> dict[str, str]:
    """The recipe's optim_args keys that ``optim`` takes (the recipe's optim_args are DualAdam's)."""
    if optim not in OPTIMIZER_NAMES or not recipe_optim_args:
        return {}
    try:
        parse_optim_args(recipe_optim_args, DUALADAM_NAME)
        pairs = parse_pairs(recipe_optim_args, "optim_args")
    except ValueError as error:
        raise RecipeError(f"the recipe's optim_args: {error}") from None
    return {k: v for k, v in pairs.items() if k in valid_optim_args_keys(optim)}


def _task_labels(value: Any, where: str) -> tuple[str, ...]:
    """A suite variant's ``tasks``: one task label or a YAML list of them, each once."""
    items = value if isinstance(value, list) else [value]
    if not items or any(not isinstance(item, str) or not item.strip() for item in items):
        raise RecipeError(f"{where}: tasks must be a task label or a list of them, got {value!r}")
    labels = [item.strip() for item in items]
    if repeated := sorted({label for label in labels if labels.count(label) > 1}):
        raise RecipeError(f"{where}: tasks names {', '.join(repeated)} twice")
    return tuple(labels)


def without_tasks(entry: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """A variant entry without its suite ``tasks`` (the variant as one task's comparison runs it)."""
    return {k: v for k, v in entry.items() if k != TASKS_KEY} if isinstance(entry, Mapping) else entry


def parse_variant(entry: str | Mapping[str, Any], recipe_optim_args: str | None = None) -> Variant:
    """A variant from ``NAME[key=value,...]`` or the same as a mapping with an ``optim`` key (and, in a suite,
    ``tasks``: a list, which the one-line form cannot hold)."""
    has_tasks = isinstance(entry, Mapping) and TASKS_KEY in entry
    pairs = entry_mapping(without_tasks(entry))
    if TASKS_KEY in pairs:
        raise RecipeError(f"variant {entry!r}: tasks= names a suite's tasks and is given in the recipe's compare: "
                          "optims list (tasks: [label, ...]), not on the command line")
    name, label = pairs["optim"], pairs.get("label") or _default_label(pairs)
    check_label(label)
    where = f"variant {label!r}"
    seeds = None if "seeds" not in pairs else whole_number(pairs["seeds"], f"{where}: seeds", minimum=1)
    if name in PRESETS:
        optim, preset_args, _ = PRESETS[name]
    else:
        check_optimizer_name(name)
        optim, preset_args = name, {}
    valid = valid_optim_args_keys(optim) if optim in OPTIMIZER_NAMES else ()
    given = {k: v for k, v in pairs.items() if k not in _NOT_SETTINGS}
    if optim == INVADAM_NAME and (blend := [k for k in given if k in BLEND_KEYS]):
        raise RecipeError(f"{where}: {invadam_refusal(blend, INVADAM_NAME)}")
    own_args = {**preset_args, **{k: v for k, v in given.items() if k in valid}}
    optim_args = _recipe_optim_args(optim, recipe_optim_args)
    if set(own_args) & set(BLEND_KEYS):  # the variant's blend replaces the recipe's, however each is given
        optim_args = {k: v for k, v in optim_args.items() if k not in BLEND_KEYS}
    optim_args.update(own_args)
    settings = {k: v for k, v in given.items() if k not in valid}
    _refuse_fixed_settings(where, settings)
    if optim in OPTIMIZER_NAMES:
        try:  # the same check as the command line's --optim_args
            parse_optim_args(join_pairs(optim_args), optim)
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None
    return Variant(label=label, optim=optim, optim_args=optim_args, settings=settings, seeds=seeds,
                   tasks=_task_labels(entry[TASKS_KEY], where) if has_tasks else None)


def parse_variants(entries: str | list[Any], recipe_optim_args: str | None = None) -> list[Variant]:
    """Variants from ``--optims`` text or a recipe's list; labels must be distinct."""
    if isinstance(entries, str):
        items = split_entries(entries)
    elif isinstance(entries, list):
        items = entries
    else:
        raise RecipeError(f"optims must be text (NAME,NAME[key=value,...]) or a list, got {entries!r}")
    if not items:
        raise RecipeError("--optims needs at least one optimizer name, e.g. adamw_torch,dualadam")
    variants = [parse_variant(item, recipe_optim_args) for item in items]
    labels = [v.label for v in variants]
    if repeated := sorted({label for label in labels if labels.count(label) > 1}):
        raise RecipeError(f"--optims names a variant twice: {', '.join(repeated)} (give each a distinct label=...)")
    if len({v.folder for v in variants}) != len(variants):
        raise RecipeError(f"--optims: labels {labels} map to the same folder names; choose simpler labels")
    return variants
