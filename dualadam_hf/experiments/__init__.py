"""The experiment harness (installed with ``dualadam-hf[experiments]``): recipes (one YAML per workload,
parsed by TRL's parser), training one recipe, comparing optimizers on it with paired statistics, sharpness,
the ``dualadam-hf`` command and the tiny models the tests use.

    dualadam-hf train --config recipes/<name>.yaml [--key value ...]
    dualadam-hf compare --config recipes/<name>.yaml [--optims ...] [--seeds N] [--lr_grid a,b,c]

Nothing is imported eagerly, so the command can say which extra is missing instead of failing on an import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Experiment", "ExperimentArguments", "RecipeError", "find_recipe", "load_experiment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import arguments

        return getattr(arguments, name)
    raise AttributeError(f"module 'dualadam_hf.experiments' has no attribute {name!r}")
