"""`dualadam-hf compare`: run one recipe for each optimizer x seed, everything else identical, then report.

Each run is its own `dualadam-hf train` process (optionally under a launcher such as `accelerate launch`):
runs cannot leak state into each other, peak memory is per run, and the HF progress bars show as usual. A
finished run's log is kept in `<output_dir>/runs/<optim>-seed<k>/trainer_state.json`; rerunning the same
command skips finished runs, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RecipeError, check_optimizer_name, load_recipe
from .data import load_splits
from .report import RunResult, write_report

# Overrides of --smoke: a few steps on a few rows, to check a recipe end to end in CI.
# The train command of a run, saved in its folder: a rerun reuses the folder only for the same command.
COMMAND_FILE = "compare_command.json"
SMOKE_OVERRIDES = {
    "max_steps": "2",
    "train_size": "16",
    "eval_size": "4",
    "accuracy_size": "2",
    "max_new_tokens": "8",
    "per_device_train_batch_size": "2",
    "per_device_eval_batch_size": "2",
    "gradient_accumulation_steps": "1",
    "eval_steps": "1",
    "logging_steps": "1",
    "save_steps": "2",
    "sharpness_batches": "1",
}


def smoke_overrides() -> list[str]:
    return [token for key, value in SMOKE_OVERRIDES.items() for token in (f"--{key}", value)]


@dataclass
class RunSpec:
    optim: str
    seed: int
    output_dir: Path

    @property
    def name(self) -> str:
        return f"{self.optim}-seed{self.seed}"


def parse_optims(text: str) -> list[str]:
    optims = [name.strip() for name in text.split(",") if name.strip()]
    if not optims:
        raise RecipeError("--optims needs at least one optimizer name, e.g. adamw_torch,dualadam")
    if len(set(optims)) != len(optims):
        raise RecipeError(f"--optims names an optimizer twice: {text}")
    for name in optims:
        check_optimizer_name(name)
    return optims


def train_command(
    config: str, spec: RunSpec, overrides: list[str], *, sharpness: bool, launcher: str | None
) -> list[str]:
    """The `dualadam-hf train` command of one run (overrides first, so the run's own settings win)."""
    prefix = shlex.split(launcher) + ["-m"] if launcher else [sys.executable, "-m"]
    return prefix + [
        "dualadam_hf.cli",
        "train",
        "--config",
        config,
        *overrides,
        "--optim",
        spec.optim,
        "--seed",
        str(spec.seed),
        "--output_dir",
        str(spec.output_dir),
        "--sharpness",
        "true" if sharpness else "false",
        "--resume_from_checkpoint",
        "last",
    ]


def check_reusable(spec: RunSpec, command: list[str], rerun: bool) -> None:
    """A run folder left by a different command (other overrides or recipe) must not be silently reused."""
    saved = spec.output_dir / COMMAND_FILE
    if rerun or not saved.is_file():
        return
    if json.loads(saved.read_text()) != command[command.index("train") :]:
        raise RecipeError(
            f"{spec.output_dir} holds a run of a different command ({saved}); "
            "give another --output_dir, or --rerun to replace it"
        )


def read_log_history(run_dir: Path) -> list[dict] | None:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text(encoding="utf-8"))["log_history"]


def compare(
    config: str,
    optims: list[str],
    seeds: int,
    output_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    sharpness: bool = True,
    launcher: str | None = None,
    rerun: bool = False,
) -> tuple[Path, list[RunResult]]:
    """Run every optimizer x seed and write the report; return (report.md path, results)."""
    from .train import resolve_model

    overrides = list(overrides or [])
    if seeds < 1:
        raise RecipeError(f"--seeds must be >= 1, got {seeds}")
    for flag in ("--optim", "--seed", "--output_dir"):
        if any(token == flag or token.startswith(flag + "=") for token in overrides):
            raise RecipeError(f"{flag} is set by compare for each run; leave it out of the overrides")
    # Check the recipe and the overrides once, before the first run starts.
    recipe = load_recipe(config, [*overrides, "--optim", optims[0]])
    resolve_model(recipe.args)  # a missing model or bad data fails here, not once per run
    load_splits(recipe.args)
    base_seed = recipe.training_args.seed
    output_dir = Path(output_dir)
    specs = [
        RunSpec(optim, base_seed + k, output_dir / "runs" / f"{optim}-seed{base_seed + k}")
        for k in range(seeds)
        for optim in optims
    ]
    results: list[RunResult] = []
    started = time.time()
    commands = [train_command(config, spec, overrides, sharpness=sharpness, launcher=launcher) for spec in specs]
    for spec, command in zip(specs, commands, strict=True):
        check_reusable(spec, command, rerun)
    for index, (spec, command) in enumerate(zip(specs, commands, strict=True), start=1):
        done = None if rerun else read_log_history(spec.output_dir)
        if done is not None:
            print(f"[compare] {index}/{len(specs)} {spec.name}: already finished, reusing its log", flush=True)
            results.append(RunResult(spec.optim, spec.seed, done))
            continue
        if rerun and spec.output_dir.exists():
            shutil.rmtree(spec.output_dir)  # else `--resume_from_checkpoint last` would pick up the old run
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        (spec.output_dir / COMMAND_FILE).write_text(json.dumps(command[command.index("train") :]) + "\n")
        print(f"[compare] {index}/{len(specs)} {spec.name}: {shlex.join(command)}", flush=True)
        run_start = time.time()
        returncode = subprocess.call(command)
        log_history = read_log_history(spec.output_dir)
        if returncode != 0 or log_history is None:
            error = f"exit code {returncode}" + ("" if log_history is not None else ", no trainer_state.json")
            results.append(RunResult(spec.optim, spec.seed, log_history or [], ok=False, error=error))
            print(f"[compare] {index}/{len(specs)} {spec.name}: FAILED ({error})", flush=True)
            continue
        result = RunResult(spec.optim, spec.seed, log_history)
        results.append(result)
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in result.summary.items() if v is not None)
        seconds = time.time() - run_start
        print(f"[compare] {index}/{len(specs)} {spec.name}: done in {seconds:.0f}s: {numbers}", flush=True)
    notes = [
        f"Recipe: `{config}`; overrides: `{' '.join(overrides) or 'none'}`; "
        f"seeds {base_seed}..{base_seed + seeds - 1}.",
        f"Total time of the comparison: {time.time() - started:.0f} s.",
    ]
    report = write_report(output_dir, results, title=f"Optimizer comparison: {Path(config).stem}", notes=notes)
    return report, results
