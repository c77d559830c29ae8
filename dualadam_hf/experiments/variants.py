"""Variants of a comparison: the ``NAME`` or ``NAME[key=value,...]`` entries of ``--optims`` (docs/recipes.md).

``NAME`` is a ``TrainingArguments.optim`` name or a preset (:data:`PRESETS`). A key the optimizer takes goes
into its ``optim_args``, ``label`` names the variant, and any other key is a setting of the run
(``warmup_steps``, ...). The recipe's ``optim_args`` reach every DualAdam/InvAdam variant, each taking the
keys it accepts (InvAdam has no blend keys; the variant's keys win); other optimizers get no ``optim_args``.
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


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


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


def parse_variant(entry: str | dict[str, Any], recipe_optim_args: str | None = None) -> Variant:
    """A variant from ``NAME[key=value,...]`` (or the same as a mapping with an ``optim`` key)."""
    if isinstance(entry, dict):
        pairs = {str(k): _text(v) for k, v in entry.items()}
        if (name := pairs.pop("optim", None)) is None:
            raise RecipeError(f"variant {entry!r} needs an 'optim' key")
        text = name
    else:
        if (match := _ENTRY.match(entry)) is None:
            raise RecipeError(f"variant {entry!r} is not NAME or NAME[key=value,...]")
        name, text, pairs = match.group(1), entry.strip(), {}
        for item in filter(str.strip, (match.group(2) or "").split(",")):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise RecipeError(f"variant {entry!r}: {item.strip()!r} is not key=value")
            if key in pairs:
                raise RecipeError(f"variant {entry!r} gives {key!r} twice")
            pairs[key] = value
    label = pairs.pop("label", None)
    preset_args: dict[str, str] = {}
    if name in PRESETS:
        optim, preset_args, preset_label = PRESETS[name]
        label = label or (preset_label if not pairs else text)
    else:
        check_optimizer_name(name)
        optim = name
    valid = valid_optim_args_keys(optim) if optim in OPTIMIZER_NAMES else ()
    optim_args: dict[str, str] = {}
    if optim in OPTIMIZER_NAMES and recipe_optim_args:  # the recipe's optim_args keys that `optim` takes
        try:
            parsed = parse_optim_args(recipe_optim_args, "dualadam")  # the recipe's optim_args are DualAdam's
        except ValueError as error:
            raise RecipeError(f"the recipe's optim_args: {error}") from None
        optim_args = {k: _text(v) for k, v in parsed.items() if k in valid}
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
    if repeated := sorted({label for label in labels if labels.count(label) > 1}):
        raise RecipeError(f"--optims names a variant twice: {', '.join(repeated)} (give each a distinct label=...)")
    if len({v.folder for v in variants}) != len(variants):
        raise RecipeError(f"--optims: labels {labels} map to the same folder names; choose simpler labels")
    return variants
