"""The ``dualadam-hf`` command: train a recipe, compare optimizers on it, measure sharpness.

    dualadam-hf train --config recipes/smollm2_math_lora.yaml [--key value ...]
    dualadam-hf compare --config recipes/smollm2_math_lora.yaml --optims adamw_torch,dualadam --seeds 2
    dualadam-hf sharpness --help

Any `--key value` after the known options overrides the recipe (a recipe key or a TrainingArguments /
SFTConfig field). Under several processes: `accelerate launch --config_file accelerate_configs/<name>.yaml
-m dualadam_hf.cli train --config ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ._version import __version__

DEFAULT_RECIPE = "recipes/smollm2_math_lora.yaml"
DEFAULT_OPTIMS = "adamw_torch,dualadam"


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        allow_abbrev=False,  # else `--optim x` would be taken as `--optims x`, `--seed` as `--seeds`
        help="fine-tune with one recipe",
        description="Fine-tune with one recipe; `--key value` after the options overrides the recipe.",
        epilog="example: dualadam-hf train --config recipes/smollm2_math_lora.yaml --optim dualadam --max_steps 10",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/<name>.yaml)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few rows (CI check of a recipe)")


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        allow_abbrev=False,  # else `--optim x` would be taken as `--optims x`, `--seed` as `--seeds`
        help="run a recipe for each optimizer x seed and write a report",
        description="Run a recipe for each optimizer x seed, everything else identical, and write "
        "report.md (table), train_loss.png / eval_loss.png and runs/*.json into --output_dir. "
        "`--key value` after the options overrides the recipe for every run.",
    )
    parser.add_argument("--config", default=DEFAULT_RECIPE, help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    parser.add_argument("--optims", default=DEFAULT_OPTIMS, help=f"comma-separated optim names ({DEFAULT_OPTIMS})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per optimizer: recipe seed, seed+1, ... (1)")
    parser.add_argument("--output_dir", default=None, help="report folder (default: compare/<recipe name>)")
    parser.add_argument(
        "--no-sharpness", dest="sharpness", action="store_false", help="skip the sharpness column (saves time)"
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few rows (CI check end to end)")
    parser.add_argument(
        "--launcher", default=None, help='run each run under a launcher, e.g. "accelerate launch --config_file ..."'
    )
    parser.add_argument("--rerun", action="store_true", help="rerun runs that already finished in --output_dir")


def _add_sharpness(subparsers: argparse._SubParsersAction) -> None:
    try:
        sharpness_cli = importlib.import_module("dualadam_hf.sharpness_cli")
    except ModuleNotFoundError as error:  # written separately; the other subcommands work without it
        if error.name != "dualadam_hf.sharpness_cli":
            raise
        return

    parser = subparsers.add_parser(
        "sharpness",
        allow_abbrev=False,
        help="measure the sharpness of a trained model",
        description=sharpness_cli.__doc__,
    )
    sharpness_cli.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualadam-hf",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dualadam-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command")
    _add_train(subparsers)
    _add_compare(subparsers)
    _add_sharpness(subparsers)
    return parser


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .recipes.compare import smoke_overrides
    from .recipes.config import find_recipe, load_recipe
    from .recipes.train import run

    recipe = load_recipe(find_recipe(args.config), (smoke_overrides() if args.smoke else []) + overrides)
    numbers = run(recipe)
    print(f"[train] done: {recipe.training_args.output_dir}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
    return 0


def _compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from .recipes.compare import compare, parse_optims, smoke_overrides
    from .recipes.config import find_recipe

    config = str(find_recipe(args.config))
    output_dir = args.output_dir or str(Path("compare") / (Path(config).stem + ("-smoke" if args.smoke else "")))
    report, results = compare(
        config,
        parse_optims(args.optims),
        args.seeds,
        output_dir,
        (smoke_overrides() if args.smoke else []) + overrides,
        sharpness=args.sharpness,
        launcher=args.launcher,
        rerun=args.rerun,
    )
    print(f"[compare] report: {report}")
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    from .recipes.config import RecipeError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 0
    if args.command == "sharpness":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from . import sharpness_cli

        return sharpness_cli.run(args)
    try:
        return (_train if args.command == "train" else _compare)(args, extra)
    except RecipeError as error:
        print(f"dualadam-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
