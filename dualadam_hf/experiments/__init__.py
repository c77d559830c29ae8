"""Experiments: recipes (one YAML per workload, parsed by TRL's parser), training one recipe, comparing
optimizers on it with paired statistics, and the data and models they use.

    dualadam-hf train --config recipes/<name>.yaml [--key value ...]
    dualadam-hf compare --config recipes/<name>.yaml [--optims ...] [--seeds N] [--lr_grid a,b,c]
"""

from .arguments import Experiment, ExperimentArguments, RecipeError, find_recipe, load_experiment

__all__ = ["Experiment", "ExperimentArguments", "RecipeError", "find_recipe", "load_experiment"]
