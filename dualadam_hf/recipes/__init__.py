"""Recipes: one YAML per workload (model, data, LoRA or full, TrainingArguments, evaluation), run by
`dualadam-hf train` and compared across optimizers by `dualadam-hf compare`."""

from __future__ import annotations

from typing import Any

from .config import Recipe, RecipeArguments, RecipeError, find_recipe, load_recipe


def load_eval_batches(
    config_path: str, tokenizer: Any, n_batches: int, overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """`n_batches` fixed held-out batches of a recipe (padded tensors with `labels`), e.g. for sharpness."""
    from .train import eval_batches

    return eval_batches(load_recipe(find_recipe(config_path), overrides), tokenizer, n_batches)


__all__ = ["Recipe", "RecipeArguments", "RecipeError", "find_recipe", "load_eval_batches", "load_recipe"]
