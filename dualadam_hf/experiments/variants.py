"""Variants of a comparison: an optimizer name with its own settings and label.

An entry of ``--optims`` (or of a recipe's ``compare: optims:`` list) is ``NAME`` or
``NAME[key=value,key=value,...]``:

- ``NAME`` is an optimizer name of ``TrainingArguments.optim`` (``adamw_torch``, ``dualadam``, ...) or a
  preset (:data:`PRESETS`);
- a key the optimizer takes in ``optim_args`` goes there (for dualadam: ``blend_steps``,
  ``inverse_scale``, ...), ``label`` names the variant in tables and plots, and any other key is a
  setting of the run (``warmup_steps``, ``lr_scheduler_type``, ``learning_rate``, ...).

Examples: ``adamw_torch``, ``adamw_torch[warmup_steps=10,label=adamw-warmup10]``,
``dualadam[blend_steps=10]``, ``matched_warmup``, ``dualadam[inverse_scale=auto,label=scaled]``.

The recipe's own ``optim_args`` reach every DualAdam/InvAdam variant, each taking the keys it accepts
(InvAdam has no blend keys); the variant's keys win. Other optimizers get no ``optim_args``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..integrations.optim_args import OPTIMIZER_NAMES, SWITCH_KEYS, parse_optim_args, valid_optim_args_keys
from .arguments import RecipeError, check_optimizer_name

# name -> (optimizer, optim_args, label). The matched warmup is DualAdam without its inverse part:
# u = (1-r)*mh/d, i.e. AdamW whose learning rate rises linearly from 0 over exactly DualAdam's blend
# (the same switch rate) and then follows the recipe's schedule. A gain of DualAdam over it is the
# inverse term's.
PRESETS: dict[str, tuple[str, dict[str, str], str]] = {
    "matched_warmup": ("dualadam", {"inverse_scale": "0"}, "matched-warmup"),
    "dualadam_scaled": ("dualadam", {"inverse_scale": "auto"}, "dualadam-scaled"),
}
_ENTRY = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[(.*)\])?\s*$", re.S)


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison."""

    label: str
    optim: str
    optim_args: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def optim_args_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.optim_args.items())

    def overrides(self) -> list[str]:
        """The `--key value` arguments of a run of this variant."""
        tokens = ["--optim", self.optim, "--optim_args", self.optim_args_text]
        for key, value in self.settings.items():
            tokens += [f"--{key}", value]
        return tokens

    @property
    def folder(self) -> str:
        """The label as a folder name."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label).strip("_") or "variant"


def split_entries(text: str) -> list[str]:
    """Comma-separated entries; commas inside [...] belong to the entry."""
    entries, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise RecipeError(f"--optims {text!r}: a ']' without its '['")
        if char == "," and depth == 0:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise RecipeError(f"--optims {text!r}: a '[' without its ']'")
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _pairs(body: str, entry: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in body.split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise RecipeError(f"variant {entry!r}: {item.strip()!r} is not key=value")
        if key in pairs:
            raise RecipeError(f"variant {entry!r} gives {key!r} twice")
        pairs[key] = value
    return pairs


def _recipe_args_for(optim: str, recipe_optim_args: str | None) -> dict[str, str]:
    """The recipe's optim_args keys that ``optim`` takes, as text."""
    if optim not in OPTIMIZER_NAMES or not recipe_optim_args:
        return {}
    parsed = parse_optim_args(recipe_optim_args, "dualadam")  # the recipe's optim_args are DualAdam's
    valid = valid_optim_args_keys(optim)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in parsed.items() if k in valid}


def parse_variant(entry: str | dict[str, Any], recipe_optim_args: str | None = None) -> Variant:
    """A variant from ``NAME[key=value,...]`` (or the same as a mapping with an ``optim`` key)."""
    if isinstance(entry, dict):
        pairs = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in entry.items()}
        name = pairs.pop("optim", None)
        if name is None:
            raise RecipeError(f"variant {entry!r} needs an 'optim' key")
        text = name
    else:
        match = _ENTRY.match(entry)
        if match is None:
            raise RecipeError(f"variant {entry!r} is not NAME or NAME[key=value,...]")
        name, text = match.group(1), entry.strip()
        pairs = _pairs(match.group(2) or "", entry)
    label = pairs.pop("label", None)
    preset_args: dict[str, str] = {}
    if name in PRESETS:
        optim, preset_args, preset_label = PRESETS[name]
        label = label or (preset_label if not pairs else text)
    else:
        check_optimizer_name(name)
        optim = name
    try:
        optim_args = _recipe_args_for(optim, recipe_optim_args)
    except ValueError as error:
        raise RecipeError(f"the recipe's optim_args: {error}") from None
    valid = valid_optim_args_keys(optim) if optim in OPTIMIZER_NAMES else ()
    if optim == "invadam" and set(pairs) & set(SWITCH_KEYS):
        raise RecipeError(f"variant {text!r}: invadam holds the blend weight at 1 and takes no "
                          f"{', '.join(sorted(set(pairs) & set(SWITCH_KEYS)))}")
    given = {**preset_args, **{k: v for k, v in pairs.items() if k in valid}}
    if set(given) & set(SWITCH_KEYS):
        optim_args = {k: v for k, v in optim_args.items() if k not in SWITCH_KEYS}
    optim_args.update(given)
    if "optim_args" in pairs:
        raise RecipeError(f"variant {text!r}: give optimizer settings as keys (e.g. blend_steps=10), not optim_args")
    settings = {k: v for k, v in pairs.items() if k not in valid}
    if optim in OPTIMIZER_NAMES:
        try:
            parse_optim_args(",".join(f"{k}={v}" for k, v in optim_args.items()), optim)  # checks the values now
        except ValueError as error:
            raise RecipeError(f"variant {text!r}: {error}") from None
    for key in ("optim", "seed", "output_dir"):
        if key in settings:
            raise RecipeError(f"variant {text!r}: {key} is set by compare for each run")
    return Variant(label=label or text, optim=optim, optim_args=optim_args, settings=settings)


def parse_variants(entries: str | list[Any], recipe_optim_args: str | None = None) -> list[Variant]:
    """Variants from ``--optims`` text or a recipe's list; labels must be distinct."""
    items = split_entries(entries) if isinstance(entries, str) else list(entries)
    if not items:
        raise RecipeError("--optims needs at least one optimizer name, e.g. adamw_torch,dualadam")
    variants = [parse_variant(item, recipe_optim_args) for item in items]
    labels = [v.label for v in variants]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise RecipeError(f"--optims names a variant twice: {', '.join(repeated)} (give each a distinct label=...)")
    folders = [v.folder for v in variants]
    if len(set(folders)) != len(folders):
        raise RecipeError(f"--optims: labels {labels} map to the same folder names; choose simpler labels")
    return variants
