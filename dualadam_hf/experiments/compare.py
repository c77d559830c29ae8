"""`dualadam-hf compare`: run one recipe for each variant x seed, everything else identical, then report.

Protocol in docs/recipes.md: an optional learning-rate grid chosen on the validation split, then every seed on
the test split, paired by seed. Each run is its own ``dualadam-hf train`` process (so runs cannot leak state),
read back only from its ``run_done.json``: rerunning reuses finished runs and resumes the others.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .arguments import RecipeError, load_experiment
from .checkpoints import read_json
from .data import load_splits
from .models import resolve_model
from .report import SUMMARY_OF, RunResult, write_report
from .train import DONE_FILE
from .variants import Variant, parse_variants

COMMAND_FILE = "compare_command.json"
DEFAULT_OPTIMS = "adamw_torch,dualadam"
SELECT_METRICS = {"eval_loss": "lower", "eval_accuracy": "higher"}
COMPARE_KEYS = ("optims", "seeds", "lr_grid", "select_metric", "grid_seed", "sharpness")
# Overrides of --smoke: a few steps on a few rows, to check a recipe end to end in CI.
SMOKE_OVERRIDES = {
    "max_steps": "2", "train_size": "16", "eval_size": "4", "accuracy_size": "2", "max_new_tokens": "8",
    "per_device_train_batch_size": "2", "per_device_eval_batch_size": "2", "gradient_accumulation_steps": "1",
    "eval_steps": "1", "logging_steps": "1", "save_steps": "2", "sharpness_batches": "1",
}
_SET_BY_COMPARE = ("--optim", "--optim_args", "--seed", "--output_dir", "--dataset_test_split", "--learning_rate")


def smoke_overrides() -> list[str]:
    return [token for key, value in SMOKE_OVERRIDES.items() for token in (f"--{key}", value)]


@dataclass
class Plan:
    """What a comparison runs: variants, seeds, the learning-rate grid and where results go."""

    config: Path
    variants: list[Variant]
    seeds: list[int]
    lr_grid: list[float]
    grid_seed: int
    select_metric: str
    output_dir: Path
    overrides: list[str]
    sharpness: bool
    test_split: str
    validation_split: str
    chosen_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSpec:
    variant: Variant
    seed: int
    output_dir: Path
    phase: str  # "grid" or "final"
    lr: float | None = None  # None: the recipe's learning rate


def make_plan(config: str | Path, *, optims: str | None = None, seeds: int | None = None,
              lr_grid: str | None = None, select_metric: str | None = None, output_dir: str | Path | None = None,
              overrides: list[str] | None = None, sharpness: bool = True, smoke: bool = False) -> Plan:
    """Read the recipe's ``compare:`` settings, apply the command line's, and check everything once."""
    overrides = list(overrides or [])
    for flag in _SET_BY_COMPARE:
        if any(token == flag or token.startswith(flag + "=") for token in overrides):
            raise RecipeError(f"{flag} is set by compare for each run; leave it out of the overrides")
    config = Path(config).resolve()
    base = load_experiment(config, overrides)
    settings = dict(base.compare)
    if unknown := sorted(set(settings) - set(COMPARE_KEYS)):
        raise RecipeError(f"recipe {config}: unknown compare key(s) {unknown}; valid: {', '.join(COMPARE_KEYS)}")
    variants = parse_variants(optims if optims is not None else settings.get("optims", DEFAULT_OPTIMS),
                              base.training.optim_args)
    n_seeds = seeds if seeds is not None else int(settings.get("seeds", 1))
    if n_seeds < 1:
        raise RecipeError(f"--seeds must be >= 1, got {n_seeds}")
    lr_text = lr_grid if lr_grid is not None else settings.get("lr_grid")
    try:
        grid = [float(x) for x in (lr_text.split(",") if isinstance(lr_text, str) else lr_text or []) if str(x).strip()]
    except ValueError as error:
        raise RecipeError(f"lr_grid must be numbers, got {lr_text!r}") from error
    if any(not (x > 0 and math.isfinite(x)) for x in grid):
        raise RecipeError(f"lr_grid must be positive numbers, got {lr_text!r}")
    metric = select_metric or settings.get("select_metric", "eval_loss")
    if metric not in SELECT_METRICS:
        raise RecipeError(f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {metric!r}")
    if metric == "eval_accuracy" and not base.args.accuracy_size:
        raise RecipeError("select_metric eval_accuracy needs accuracy_size > 0")
    base_seed = base.training.seed
    plan = Plan(
        config=config, variants=variants, seeds=[base_seed + k for k in range(n_seeds)], lr_grid=grid,
        grid_seed=int(settings.get("grid_seed", base_seed + 1000)), select_metric=metric,
        output_dir=Path(output_dir or Path("compare") / (config.stem + ("-smoke" if smoke else ""))).resolve(),
        overrides=overrides, sharpness=bool(settings.get("sharpness", True)) and sharpness,
        test_split=base.script.dataset_test_split, validation_split=base.args.dataset_validation_split,
    )
    if grid and plan.test_split == plan.validation_split:
        raise RecipeError(f"dataset_test_split is {plan.test_split!r}: the learning-rate grid chooses on "
                          f"{plan.validation_split!r}, so the test split must be another one")
    # Every variant's run must parse, and the model and data must be there, before the first run starts.
    for variant in variants:
        load_experiment(config, [*overrides, *variant.overrides()])
    resolve_model(base.model.model_name_or_path)
    load_splits(base)
    if grid:
        load_splits(load_experiment(config, [*overrides, "--dataset_test_split", plan.validation_split]))
    return plan


def train_command(plan: Plan, spec: RunSpec, launcher: str | None) -> list[str]:
    """The `dualadam-hf train` command of one run (the run's own settings after the shared overrides)."""
    prefix = shlex.split(launcher) + ["-m"] if launcher else [sys.executable, "-m"]
    grid = spec.phase == "grid"
    lr = [] if spec.lr is None else ["--learning_rate", repr(spec.lr)]
    # A grid run only needs the final value of the metric it is chosen on.
    only_final = ["--eval_strategy", "no"] if grid else []
    if grid and plan.select_metric == "eval_loss":
        only_final += ["--accuracy_size", "0", "--accuracy_during_training", "false"]
    return prefix + [
        "dualadam_hf", "train", "--config", str(plan.config), *plan.overrides, *spec.variant.overrides(), *lr,
        *only_final, "--seed", str(spec.seed), "--output_dir", str(spec.output_dir), "--dataset_test_split",
        plan.validation_split if grid else plan.test_split,
        "--sharpness", "true" if plan.sharpness and not grid else "false", "--resume_from_checkpoint", "last",
    ]


class Interrupted(Exception):
    """compare received SIGINT/SIGTERM; the running child was stopped and waited for."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_child(command: list[str]) -> int:
    """Run one training process to its end; a SIGINT/SIGTERM to compare is passed on to it and waited for.
    In its own session, a Ctrl-C in the terminal reaches it once (through compare), and it never outlives compare.
    """
    child = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    return code


def _execute(plan: Plan, specs: list[RunSpec], launcher: str | None, rerun: bool, log) -> list[RunResult]:
    commands = [train_command(plan, spec, launcher) for spec in specs]
    # A run folder left by a different command (other overrides or recipe) must not be silently reused.
    for spec, command in zip(specs, commands, strict=True):
        saved = spec.output_dir / COMMAND_FILE
        if not rerun and saved.is_file() and json.loads(saved.read_text()) != command[command.index("train"):]:
            raise RecipeError(f"{spec.output_dir} holds a run of a different command ({saved}); "
                              "give another --output_dir, or --rerun to replace it")
    results = []
    for index, (spec, command) in enumerate(zip(specs, commands, strict=True), start=1):
        lr = "" if spec.lr is None else f" lr={spec.lr:g}"
        where = f"[compare] {spec.phase} {index}/{len(specs)} {spec.variant.label} seed {spec.seed}{lr} ({spec.phase})"
        done = None if rerun else read_json(spec.output_dir / DONE_FILE)
        if done is None:
            if rerun and spec.output_dir.exists():
                shutil.rmtree(spec.output_dir)  # else `--resume_from_checkpoint last` would pick up the old run
            spec.output_dir.mkdir(parents=True, exist_ok=True)
            (spec.output_dir / COMMAND_FILE).write_text(json.dumps(command[command.index("train"):]) + "\n")
            log(f"{where}: {shlex.join(command)}")
            started = time.time()
            code = run_child(command)
            done = read_json(spec.output_dir / DONE_FILE)
            if code != 0 or done is None:
                error = f"exit code {code}" + ("" if done is not None else f", no {DONE_FILE}")
                log(f"{where}: FAILED ({error})")
                results.append(RunResult(spec.variant.label, spec.seed, [], ok=False, error=error, phase=spec.phase,
                                         lr=spec.lr))
                continue
            log(f"{where}: done in {time.time() - started:.0f}s")
        else:
            log(f"{where}: already finished, reusing its log")
        results.append(RunResult(spec.variant.label, spec.seed, done["log_history"], phase=spec.phase, lr=spec.lr,
                                 accuracy_rows=done.get("accuracy_rows")))
    return results


def choose_rates(plan: Plan, grid_results: list[RunResult]) -> dict[str, float]:
    """Per variant, the grid rate with the best final validation metric (failed or diverged runs lose)."""
    sign = 1 if SELECT_METRICS[plan.select_metric] == "lower" else -1
    chosen = {}
    for variant in plan.variants:
        values = [(r.summary.get(SUMMARY_OF[plan.select_metric]), r.lr) for r in grid_results
                  if r.label == variant.label and r.ok]
        scored = [(sign * value, lr) for value, lr in values if value is not None and math.isfinite(value)]
        if not scored:
            raise RecipeError(f"no grid run of {variant.label} finished with a finite {plan.select_metric}")
        chosen[variant.label] = min(scored)[1]
    return chosen


def compare(plan: Plan, *, launcher: str | None = None, rerun: bool = False, log=print) -> tuple[Path, list]:
    """Run the plan and write the report; return (report.md path, results of the seed runs)."""
    started = time.time()
    runs = plan.output_dir / "runs"
    grid_results: list[RunResult] = []
    if plan.lr_grid:
        specs = [RunSpec(v, plan.grid_seed, runs / "grid" / v.folder / f"lr{lr:g}", "grid", lr)
                 for v in plan.variants for lr in plan.lr_grid]
        grid_results = _execute(plan, specs, launcher, rerun, log)
        plan.chosen_lr = choose_rates(plan, grid_results)
        log("[compare] chosen learning rates (on the validation split): "
            + ", ".join(f"{k}={v:g}" for k, v in plan.chosen_lr.items()))
    specs = [RunSpec(v, seed, runs / f"{v.folder}-seed{seed}", "final", plan.chosen_lr.get(v.label))
             for seed in plan.seeds for v in plan.variants]
    results = _execute(plan, specs, launcher, rerun, log)
    return write_report(plan, results, grid_results, seconds=time.time() - started), results


def run_compare(config: str, *, optims: str | None, seeds: int | None, lr_grid: str | None,
                select_metric: str | None, output_dir: str | None, overrides: list[str], sharpness: bool,
                smoke: bool, launcher: str | None, rerun: bool) -> int:
    """The `compare` subcommand: exit 0 when every run finished, 1 if some failed, 128+n on signal n."""
    plan = make_plan(config, optims=optims, seeds=seeds, lr_grid=lr_grid, select_metric=select_metric,
                     output_dir=output_dir, overrides=(smoke_overrides() if smoke else []) + overrides,
                     sharpness=sharpness, smoke=smoke)
    try:
        report, results = compare(plan, launcher=launcher, rerun=rerun)
    except Interrupted as stop:
        print(f"[compare] interrupted by {stop}; the running child was stopped. Rerun the same command to "
              "continue where it stopped.", file=sys.stderr)
        return 128 + stop.signum
    print(f"[compare] report: {report}")
    return 0 if all(r.ok for r in results) else 1
