"""`dualadam-hf compare`: run one recipe for each variant x seed, everything else identical, then report.

Protocol in docs/recipes.md: an optional learning-rate grid chosen on the validation split, then every seed on
the test split, paired by seed. Each run is its own ``dualadam-hf train`` process (so runs cannot leak state),
read back only from its ``run_done.json``: rerunning reuses finished runs and resumes the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..integrations.names import DEFAULT_OPTIMS
from . import identity
from .arguments import COMPARE_KEY, RecipeError, load_experiment, read_yaml, true_or_false, whole_number
from .checkpoints import folder_lock, read_json
from .data import load_splits, local_data_files
from .models import resolve_model
from .report import SUMMARY_OF, RunResult, rate_scores, raw_file_name, write_report
from .train import ACCURACY_KEY, DONE_FILE, EVAL_LOSS_KEY, check_output_apart, check_output_dir, input_folders
from .variants import SET_BY_COMPARE, Variant, parse_variants
from .watch import DIVERGED_KEY

COMMAND_FILE = "compare_command.json"  # a run folder's reuse key; also marks the folder as made by compare
LOCK_FILE = ".compare.lock"
SELECT_METRICS = {EVAL_LOSS_KEY: "lower", ACCURACY_KEY: "higher"}
COMPARE_KEYS = ("optims", "seeds", "lr_grid", "grid_seeds", "select_metric", "grid_seed", "sharpness", "baseline",
                "tasks")
TASKS_KEY = "tasks"  # a suite: the recipe run on each of these tasks, then pooled (dualadam_hf.experiments.suite)
# The learning-rate grid's first seed (unless the recipe sets grid_seed) is the recipe's seed plus this: the reported
# runs take the recipe's seed and the ones after it, so the grid chooses the rate on runs of its own, not on the
# runs it is then judged by (a comparison would need this many seeds for the two to meet).
GRID_SEED_OFFSET = 1000
# Overrides of --smoke: a few steps on a few rows, to check a recipe end to end in CI.
SMOKE_OVERRIDES = {
    "max_steps": "2", "train_size": "16", "eval_size": "4", "accuracy_size": "2", "max_new_tokens": "8",
    "per_device_train_batch_size": "2", "per_device_eval_batch_size": "2", "gradient_accumulation_steps": "1",
    "eval_steps": "1", "logging_steps": "1", "save_steps": "2", "sharpness_batches": "1",
}


def smoke_overrides() -> list[str]:
    return [token for key, value in SMOKE_OVERRIDES.items() for token in (f"--{key}", value)]


@dataclass
class Plan:
    """What a comparison runs: variants, seeds, the learning-rate grid and where results go.

    ``seeds`` are the seeds of a variant without a ``seeds`` count of its own (:meth:`seeds_of`);
    ``grid_seeds`` those of every grid point. ``recipe_digest`` is part of each run's reuse key, and so are the
    content of the local data files ``data_files`` names per held-out split (with the splits carved from train)
    and the run's inputs (its manifest's: the model at ``model_path``, the data, the resolved settings)."""

    config: Path
    variants: list[Variant]
    seeds: list[int]
    lr_grid: list[float]
    grid_seeds: list[int]
    select_metric: str
    output_dir: Path
    overrides: list[str]
    sharpness: bool
    test_split: str
    validation_split: str
    baselines: list[str]  # the paired differences are against each, the first variant always among them
    recipe_digest: str
    chosen_lr: dict[str, float] = field(default_factory=dict)
    data_files: dict[str, tuple[dict[str, Path], list[str]]] = field(default_factory=dict)
    model_path: str = ""  # the local folder (or hub id) the recipe's model resolves to

    @property
    def grid_seed(self) -> int:
        return self.grid_seeds[0]

    def seeds_of(self, variant: Variant) -> list[int]:
        """A variant's seeds: its own count of them from the first seed, else the comparison's."""
        return self.seeds if variant.seeds is None else [self.seeds[0] + k for k in range(variant.seeds)]


@dataclass
class RunSpec:
    variant: Variant
    seed: int
    output_dir: Path
    phase: str  # "grid" or "final"
    lr: float | None = None  # None: the recipe's learning rate


def _listed(value: Any) -> list[Any]:
    """The items of a compare setting given as "a,b" (command line), a YAML list, or one YAML value."""
    return value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]


def _lr_grid(value: Any, where: str) -> list[float]:
    """Learning rates from "3e-4,1e-3" (command line), a YAML list, or one YAML number; positive, distinct."""
    grid = []
    for item in _listed(value):
        if isinstance(item, str) and not item.strip():
            continue
        try:
            if isinstance(item, bool):
                raise ValueError
            rate = float(item)
        except (TypeError, ValueError):
            raise RecipeError(f"{where} must be learning rates (numbers), got {item!r} in {value!r}") from None
        if not (rate > 0 and math.isfinite(rate)):
            raise RecipeError(f"{where} must be positive numbers, got {item!r}")
        if rate in grid:
            raise RecipeError(f"{where} gives the rate {rate!r} twice ({value!r})")
        grid.append(rate)
    return grid


def checked_settings(recipe: dict[str, Any], command_line: dict[str, Any], config: Path) -> dict[str, Any]:
    """The ``compare:`` settings, the command line's winning over the recipe's, each checked and typed the same
    way whichever it came from (YAML types or command-line text); unset keys are left out."""
    if unknown := sorted(set(recipe) - set(COMPARE_KEYS)):
        raise RecipeError(f"recipe {config}: unknown compare key(s) {unknown}; valid: {', '.join(COMPARE_KEYS)}")
    checks: dict[str, Callable[[Any, str], Any]] = {
        "optims": lambda v, w: v if isinstance(v, (str, list)) else _refuse(w, v, "text or a list of variants"),
        "seeds": lambda v, w: whole_number(v, w, minimum=1),
        "grid_seeds": lambda v, w: whole_number(v, w, minimum=1),
        "grid_seed": lambda v, w: whole_number(v, w, minimum=0),
        "lr_grid": _lr_grid,
        "select_metric": lambda v, w: v if isinstance(v, str) and v in SELECT_METRICS else _refuse(
            w, v, " or ".join(SELECT_METRICS)),
        "sharpness": true_or_false,
        "baseline": _labels,
    }
    settings = {}
    for key, check in checks.items():
        if command_line.get(key) is not None:
            settings[key] = check(command_line[key], f"--{key}")
        elif recipe.get(key) is not None:
            settings[key] = check(recipe[key], f"recipe {config.name}, compare: {key}")
    return settings


def _labels(value: Any, where: str) -> list[str]:
    """Variant labels from "dualadam,dualadam-paper-rate" (command line), a YAML list, or one label."""
    labels: list[str] = []
    for item in _listed(value):
        if not isinstance(item, str) or not item.strip():
            _refuse(where, value, "a variant's label or a list of them")
        if item.strip() in labels:
            raise RecipeError(f"{where} names {item.strip()!r} twice ({value!r})")
        labels.append(item.strip())
    return labels


def _refuse(where: str, value: Any, expected: str) -> Any:
    raise RecipeError(f"{where} must be {expected}, got {value!r}")


def recipe_digest(config: Path) -> str:
    """A digest of what the recipe gives every run: its mapping without the ``compare:`` block (comments and
    layout do not count; a changed value does)."""
    data = {k: v for k, v in read_yaml(config).items() if k != COMPARE_KEY}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def make_plan(config: str | Path, *, optims: str | None = None, seeds: Any = None, lr_grid: str | None = None,
              select_metric: str | None = None, output_dir: str | Path | None = None,
              overrides: list[str] | None = None, sharpness: bool = True, smoke: bool = False,
              baseline: str | None = None, grid_seeds: Any = None) -> Plan:
    """Read the recipe's ``compare:`` settings, apply the command line's, and check everything once."""
    overrides = list(overrides or [])
    for key in SET_BY_COMPARE:
        if any(token == f"--{key}" or token.startswith(f"--{key}=") for token in overrides):
            raise RecipeError(f"--{key} is set by compare for each run; leave it out of the overrides")
    config = Path(config).resolve()
    base = load_experiment(config, overrides)
    settings = checked_settings(base.compare, {"optims": optims, "seeds": seeds, "lr_grid": lr_grid,
                                               "select_metric": select_metric, "baseline": baseline,
                                               "grid_seeds": grid_seeds}, config)
    variants = parse_variants(settings.get("optims", DEFAULT_OPTIMS), base.training.optim_args)
    if restricted := [v.label for v in variants if v.tasks is not None]:
        raise RecipeError(f"variant {restricted[0]!r} names tasks, which only a suite has (a recipe whose compare: "
                          f"holds a {TASKS_KEY}: list); remove its tasks:")
    metric = settings.get("select_metric", EVAL_LOSS_KEY)
    if metric == ACCURACY_KEY and not base.args.accuracy_size:
        raise RecipeError(f"select_metric {ACCURACY_KEY} needs accuracy_size > 0")
    labels = [v.label for v in variants]
    if missing := [b for b in settings.get("baseline", []) if b not in labels]:
        raise RecipeError(f"baseline {missing[0]!r} is not a variant of this comparison; variants: "
                          f"{', '.join(labels)}")
    base_seed, grid_seed = base.training.seed, settings.get("grid_seed", base.training.seed + GRID_SEED_OFFSET)
    plan = Plan(
        config=config, variants=variants, seeds=[base_seed + k for k in range(settings.get("seeds", 1))],
        lr_grid=settings.get("lr_grid", []), grid_seeds=[grid_seed + k for k in range(settings.get("grid_seeds", 1))],
        select_metric=metric,
        output_dir=Path(output_dir or Path("compare") / (config.stem + ("-smoke" if smoke else ""))).resolve(),
        overrides=overrides, sharpness=settings.get("sharpness", True) and sharpness,
        test_split=base.script.dataset_test_split, validation_split=base.args.dataset_validation_split,
        baselines=list(dict.fromkeys([labels[0], *settings.get("baseline", [])])),
        recipe_digest=recipe_digest(config),
    )
    if plan.lr_grid and plan.test_split == plan.validation_split:
        raise RecipeError(f"dataset_test_split is {plan.test_split!r}: the learning-rate grid chooses on "
                          f"{plan.validation_split!r}, so the test split must be another one")
    check_output_dir(plan.output_dir)
    check_run_names(plan)
    # Every variant's run must parse, and the model and data must be there, before the first run starts.
    for variant in variants:
        try:
            load_experiment(config, [*overrides, *variant.overrides()])
        except RecipeError as error:
            raise RecipeError(f"variant {variant.label!r}: {error}") from None
    plan.model_path = resolve_model(base.model.model_name_or_path)
    # The report and the runs go where nothing the runs read lies (the runs' own folders are checked by each).
    check_output_apart(plan.output_dir, input_folders(base, plan.model_path), runs_below=False)
    load_splits(base)
    plan.data_files[plan.test_split] = local_data_files(base)
    if plan.lr_grid:
        validation = load_experiment(config, [*overrides, "--dataset_test_split", plan.validation_split])
        load_splits(validation)
        plan.data_files[plan.validation_split] = local_data_files(validation)
    return plan


def _name_limit(folder: Path) -> int:
    """The file system's longest name, in bytes, where ``folder`` is (or would be): 255 where it cannot say."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_run_names(plan: Plan) -> None:
    """Every folder and file name a variant's runs and raw logs get must fit the file system, checked before the
    first run: a label too long for it would otherwise fail after hours of runs."""
    limit = _name_limit(plan.output_dir)
    for variant in plan.variants:
        names = [variant.folder]
        for seed in plan.seeds_of(variant):
            names += [f"{variant.folder}-seed{seed}", raw_file_name(RunResult(variant.label, seed, []))]
        for lr in plan.lr_grid:
            for seed in plan.grid_seeds:
                grid_run = RunResult(variant.label, seed, [], phase="grid", lr=lr)
                names += [f"lr{lr!r}-seed{seed}", raw_file_name(grid_run)]
        # Files are written under a temporary name (".<name>.tmp") first and then moved.
        longest = max((f".{name}.tmp" for name in names), key=lambda name: len(os.fsencode(name)))
        if len(os.fsencode(longest)) > limit:
            label = variant.label if len(variant.label) <= 60 else variant.label[:57] + "..."
            raise RecipeError(f"variant label {label!r} ({len(variant.label)} characters) is too long: a file of its "
                              f"runs would get a name of {len(os.fsencode(longest))} bytes, over the file system's "
                              f"limit of {limit} bytes per name; give the variant a shorter label=")


def train_command(plan: Plan, spec: RunSpec, launcher: str | None) -> list[str]:
    """The `dualadam-hf train` command of one run (the run's own settings after the shared overrides)."""
    prefix = shlex.split(launcher) + ["-m"] if launcher else [sys.executable, "-m"]
    grid = spec.phase == "grid"
    lr = [] if spec.lr is None else ["--learning_rate", repr(spec.lr)]
    # A grid run only needs the final value of the metric it is chosen on.
    only_final = ["--eval_strategy", "no"] if grid else []
    if grid and plan.select_metric == EVAL_LOSS_KEY:
        only_final += ["--accuracy_size", "0", "--accuracy_during_training", "false"]
    return prefix + [
        "dualadam_hf", "train", "--config", str(plan.config), *plan.overrides, *spec.variant.overrides(), *lr,
        *only_final, "--seed", str(spec.seed), "--output_dir", str(spec.output_dir), "--dataset_test_split",
        plan.validation_split if grid else plan.test_split,
        "--sharpness", "true" if plan.sharpness and not grid else "false", "--resume_from_checkpoint", "last",
    ]


def check_launcher(launcher: str | None) -> None:
    """A ``--launcher`` must split into a command that exists, before any run starts."""
    if launcher is None:
        return
    try:
        words = shlex.split(launcher)
    except ValueError as error:
        raise RecipeError(f"--launcher {launcher!r} is not a valid command line: {error}") from None
    if not words:
        raise RecipeError("--launcher is empty; leave it out to run each run with this Python")
    if shutil.which(words[0]) is None:
        raise RecipeError(f"--launcher {launcher!r}: no program {words[0]!r} on PATH (e.g. \"accelerate launch "
                          "--config_file accelerate_configs/<name>.yaml\")")


class Interrupted(Exception):
    """compare received SIGINT/SIGTERM/SIGHUP: while a run trained (``during_run``: the child was stopped and
    waited for), or outside one (planning, between runs, writing the report)."""

    def __init__(self, signum: int, during_run: bool = True) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.during_run = signum, during_run


def _interrupted_outside_a_run(signum: int, _frame: Any) -> None:
    raise Interrupted(signum, during_run=False)


@contextlib.contextmanager
def signals_end_in_one_line() -> Iterator[None]:
    """While compare runs, a SIGINT/SIGTERM/SIGHUP outside a run raises :class:`Interrupted` (which compare
    reports in one line) rather than a KeyboardInterrupt's traceback or a silent death; :func:`run_child` passes
    those that come while a run trains on to it. Only the main thread may set handlers: elsewhere, as it was."""
    try:
        previous = {s: signal.signal(s, _interrupted_outside_a_run) for s in FORWARDED_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when compare dies, however it dies (kill -9
    included): the child must never go on training into a folder that a rerun will resume. SIGTERM, not
    SIGKILL, so that a launcher (accelerate, torchrun) stops its own workers too."""

    def arrange() -> None:
        # A shell starts a background job (`compare ... &`, nohup) with SIGINT ignored, and a Python child would
        # inherit that and never stop for the SIGINT compare passes on: the child starts with the default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # compare died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def run_child(command: list[str]) -> int:
    """Run one training process to its end. A SIGINT/SIGTERM/SIGHUP to compare is passed on to it and waited
    for; if compare dies without a chance to pass anything on (kill -9), the kernel stops the child. In its own
    session, a Ctrl-C in the terminal reaches it once (through compare)."""
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    return code


# Paths a reuse key leaves out: the recipe's content is in the key (recipe_sha256) and the key lies in the run
# folder it describes, so a study's folder moved with its checkout (another clone, another machine) resumes.
# The data files are in the key by the names the recipe gives them, with their size and content.
PATHS_LEFT_OUT = {"--config": "<recipe>", "--output_dir": "<run folder>"}


def _without_paths(command: list[str]) -> list[str]:
    """The train command with the recipe's path and the run folder replaced by placeholders. Both sides of a
    comparison go through it, so a saved key that holds these paths in full matches a key with placeholders."""
    return [PATHS_LEFT_OUT.get(command[i - 1], word) if i else word for i, word in enumerate(command)]


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size and sha256, hashed once while its size, times and inode stay the same
    (:func:`.identity.file_sha256`, whose cache outlives the process)."""
    return {"bytes": path.stat().st_size, "sha256": identity.file_sha256([path])[path]}


def data_key(plan: Plan, split: str) -> dict[str, Any] | None:
    """The content of the local data files a run holding out ``split`` reads, and the splits it carves from
    train; None for data with no local file (generated from the recipe and seed, or from the hub)."""
    files, carved = plan.data_files.get(split, ({}, []))
    if not files:
        return None
    try:
        return {"files": {name: file_digest(path) for name, path in files.items()}, "carved": list(carved)}
    except OSError as error:
        raise RecipeError(f"data file {error.filename or ''} cannot be read ({error.strerror or error})") from None


def run_key(plan: Plan, command: list[str], launcher: str | None) -> dict[str, Any]:
    """What a run's result depends on: its train command (overrides, variant settings, learning rate, seed,
    split), the recipe's content, the content of the local data files it reads, the launcher (e.g. the number
    of processes) and the inputs its manifest will record (:func:`run_inputs`)."""
    key = {"command": _without_paths(command[command.index("train"):]), "recipe_sha256": plan.recipe_digest,
           "launcher": launcher, "inputs": run_inputs(plan, command)}
    last = len(command) - 1 - command[::-1].index("--dataset_test_split")  # the split compare gives the run
    if (data := data_key(plan, command[last + 1])) is not None:
        key["data"] = data
    return key


def run_inputs(plan: Plan, command: list[str]) -> dict[str, Any]:
    """The inputs of the run ``command`` starts, as its manifest will record them (the model's files by content,
    the data, every resolved setting; the launcher stands for the number of processes): the command's
    arguments parsed as the run will parse them."""
    experiment = load_experiment(plan.config, command[command.index("--config") + 2:])
    try:
        return identity.run_inputs(experiment, plan.model_path)
    except OSError as error:
        raise RecipeError(f"cannot read {error.filename or 'an input file'} to identify the runs' inputs: "
                          f"{error.strerror or error}") from None


def _data_problem(saved: Any, wanted: Any) -> str | None:
    """How the data a run folder's key records differs from ``wanted`` (None when it does not)."""
    if saved == wanted:
        return None
    if wanted is not None and saved is None:
        return (f"was recorded without the content of its data files, so it cannot be told whether "
                f"{', '.join(wanted['files'])} changed since it ran (reusing it could mix results on different data)")
    saved_files = saved.get("files", {}) if isinstance(saved, dict) else {}
    wanted_files = wanted.get("files", {}) if isinstance(wanted, dict) else {}
    names = [name for name in dict.fromkeys([*wanted_files, *saved_files])
             if saved_files.get(name) != wanted_files.get(name)]
    notes = [f"data file {name} " + ("was not there when it ran" if name not in saved_files else
                                     "is gone" if name not in wanted_files else "changed since it ran")
             for name in names]
    if not notes:
        return ("held out other rows carved from the train data: a split file of the data folder was added or "
                "removed since it ran (reusing it would mix results on different data)")
    return f"read other data: {'; '.join(notes)} (reusing it would mix results on different data)"


def _key_problem(folder: Path, key: dict[str, Any]) -> str | None:
    """Why a run folder cannot be reused or resumed for ``key`` (None when it can, or when it is new)."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    saved = read_json(folder / COMMAND_FILE)
    if saved is None:
        return f"{folder} exists but was not made by compare (no readable {COMMAND_FILE})"
    if not isinstance(saved, dict):
        return f"{folder} holds a run of an older version that did not record the recipe's content"
    if isinstance(saved.get("command"), list):
        saved = {**saved, "command": _without_paths(saved["command"])}
    differs = [what for part, what in (("command", "train command"), ("recipe_sha256", "recipe content"),
                                       ("launcher", "launcher")) if saved.get(part) != key[part]]
    if differs:
        return (f"{folder} holds a run whose {' and '.join(differs)} differ{'s' * (len(differs) == 1)} from this "
                "comparison's (reusing it would mix results of different settings)")
    if problem := _data_problem(saved.get("data"), key.get("data")):
        return f"{folder} holds a run that {problem}"
    if not isinstance(saved.get("inputs"), dict):
        return (f"{folder} holds a run recorded without a manifest of its inputs (by an earlier version of "
                "dualadam-hf), so whether its model, tokenizer or settings changed since it ran cannot be told")
    if changes := identity.differences(saved["inputs"], key["inputs"]):
        return (f"{folder} holds a run made from other inputs: {', '.join(changes)} (reusing it would mix results "
                "of different inputs)")
    return None


def remove_run_folder(folder: Path, runs_root: Path) -> None:
    """Delete a run folder for --rerun: only a folder under ``runs_root`` that compare made (it holds
    COMMAND_FILE), never a link, the root itself or anything outside it."""
    folder, root = Path(folder), Path(runs_root).resolve()
    if folder.is_symlink() or not folder.resolve().is_relative_to(root) or folder.resolve() == root:
        raise RecipeError(f"--rerun: refusing to delete {folder}: not a run folder under {root}")
    if not (folder / COMMAND_FILE).is_file():
        raise RecipeError(f"--rerun: refusing to delete {folder}: compare did not make it (no {COMMAND_FILE})")
    shutil.rmtree(folder)


def _execute(plan: Plan, specs: list[RunSpec], launcher: str | None, rerun: bool, log) -> list[RunResult]:
    commands = [train_command(plan, spec, launcher) for spec in specs]
    keys = [run_key(plan, command, launcher) for command in commands]
    # A run folder left by something else (another recipe content, command or launcher) must not be reused or
    # resumed: its results would be mixed with this comparison's. Checked for every run before the first starts.
    for spec, key in zip(specs, keys, strict=True):
        problem = _key_problem(spec.output_dir, key)
        if problem and not (rerun and (spec.output_dir / COMMAND_FILE).is_file()):
            raise RecipeError(f"{problem}; give another --output_dir" + (", or --rerun to replace it" if (
                spec.output_dir / COMMAND_FILE).is_file() else ""))
    results = []
    for index, (spec, command, key) in enumerate(zip(specs, commands, keys, strict=True), start=1):
        lr = "" if spec.lr is None else f" lr={spec.lr!r}"
        where = f"[compare] {spec.phase} {index}/{len(specs)} {spec.variant.label} seed {spec.seed}{lr}"
        done = None if rerun else read_json(spec.output_dir / DONE_FILE)
        if done is None:
            if rerun and spec.output_dir.exists():
                # else `--resume_from_checkpoint last` would continue the run being replaced
                remove_run_folder(spec.output_dir, plan.output_dir / "runs")
            spec.output_dir.mkdir(parents=True, exist_ok=True)
            (spec.output_dir / COMMAND_FILE).write_text(json.dumps(key) + "\n")
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
            log(f"{where}: done in {time.time() - started:.0f}s" + _diverged_words(done))
        else:
            log(f"{where}: already finished, reusing its log" + _diverged_words(done))
        results.append(RunResult.from_done(spec.variant.label, spec.seed, done, phase=spec.phase, lr=spec.lr))
    return results


def _diverged_words(done: dict[str, Any]) -> str:
    diverged = done.get(DIVERGED_KEY)
    return "" if not diverged else f" (DIVERGED: non-finite {diverged['what']} at step {diverged['step']})"


def choose_rates(plan: Plan, grid_results: list[RunResult]) -> dict[str, float]:
    """Per variant, the grid rate with the best mean final validation metric over the grid seeds (of rates that
    tie, the smallest; the report says so). A rate with a failed, diverged or non-finite run among its seeds
    loses: it is not safe at that rate. A variant with no such rate at all is left out of the result."""
    sign = 1 if SELECT_METRICS[plan.select_metric] == "lower" else -1
    chosen = {}
    for variant in plan.variants:
        scores = rate_scores([r for r in grid_results if r.label == variant.label], plan.lr_grid,
                             SUMMARY_OF[plan.select_metric])
        if scores:
            chosen[variant.label] = min((sign * score, lr) for lr, score in scores.items())[1]
    return chosen


def grid_folder(plan: Plan, variant: Variant, lr: float, seed: int) -> Path:
    """A grid run's folder; the rate is written in full (repr), so rates that differ only past the 6th digit
    get folders of their own."""
    return plan.output_dir / "runs" / "grid" / variant.folder / f"lr{lr!r}-seed{seed}"


def compare(plan: Plan, *, launcher: str | None = None, rerun: bool = False, log=print) -> tuple[Path, list]:
    """Run the plan and write the report; return (report.md path, results of the seed runs). One compare at a
    time per output folder: a second one is refused (a RecipeError naming the first one's pid)."""
    with folder_lock(plan.output_dir, LOCK_FILE, "compare"):
        started = time.time()
        grid_results: list[RunResult] = []
        if plan.lr_grid:
            specs = [RunSpec(v, seed, grid_folder(plan, v, lr, seed), "grid", lr)
                     for v in plan.variants for lr in plan.lr_grid for seed in plan.grid_seeds]
            grid_results = _execute(plan, specs, launcher, rerun, log)
            plan.chosen_lr = choose_rates(plan, grid_results)
            log("[compare] chosen learning rates (on the validation split): "
                + (", ".join(f"{k}={v!r}" for k, v in plan.chosen_lr.items()) or "none"))
            for variant in (v for v in plan.variants if v.label not in plan.chosen_lr):
                log(f"[compare] {variant.label}: no grid rate finished with a finite {plan.select_metric} on every "
                    "grid seed; it runs no seeds and the report says so")
        running = [v for v in plan.variants if not plan.lr_grid or v.label in plan.chosen_lr]
        seeds = sorted({seed for v in running for seed in plan.seeds_of(v)})
        specs = [RunSpec(v, seed, plan.output_dir / "runs" / f"{v.folder}-seed{seed}", "final",
                         plan.chosen_lr.get(v.label)) for seed in seeds for v in running
                 if seed in plan.seeds_of(v)]
        results = _execute(plan, specs, launcher, rerun, log)
        return write_report(plan, results, grid_results, seconds=time.time() - started,
                            baselines=plan.baselines), results


def run_compare(config: str, *, optims: str | None, seeds: Any, lr_grid: str | None, select_metric: str | None,
                output_dir: str | None, overrides: list[str], sharpness: bool, smoke: bool, launcher: str | None,
                rerun: bool, baseline: str | None = None, grid_seeds: Any = None) -> int:
    """The `compare` subcommand: exit 0 when every run finished, 1 if some failed, 128+n on signal n. A recipe
    whose ``compare:`` holds ``tasks:`` is a suite: each task is compared as here, then pooled."""
    check_launcher(launcher)
    try:
        with signals_end_in_one_line():
            if is_suite(config):
                from .suite import plan_suite, run_suite_and_say

                suite = plan_suite(config, optims=optims, seeds=seeds, lr_grid=lr_grid, select_metric=select_metric,
                                   output_dir=output_dir, overrides=(smoke_overrides() if smoke else []) + overrides,
                                   sharpness=sharpness, smoke=smoke, baseline=baseline, grid_seeds=grid_seeds)
                return run_suite_and_say(suite, launcher, rerun)
            plan = make_plan(config, optims=optims, seeds=seeds, lr_grid=lr_grid, select_metric=select_metric,
                             output_dir=output_dir, overrides=(smoke_overrides() if smoke else []) + overrides,
                             sharpness=sharpness, smoke=smoke, baseline=baseline, grid_seeds=grid_seeds)
            return _compare_and_say(plan, launcher, rerun)
    except Interrupted as stop:
        where = "; the running child was stopped" if stop.during_run else " outside a run"
        print(f"[compare] interrupted by {stop}{where}. Rerun the same command to continue where it stopped: "
              "finished runs are reused, and a report being replaced keeps its previous content.", file=sys.stderr)
        return 128 + stop.signum


def is_suite(config: str | Path) -> bool:
    """Whether the recipe's ``compare:`` block lists tasks (a suite); a recipe that cannot be read is left to the
    plan, which names the problem."""
    try:
        block = read_yaml(config).get(COMPARE_KEY)
    except RecipeError:
        return False
    return isinstance(block, dict) and TASKS_KEY in block


def _compare_and_say(plan: Plan, launcher: str | None, rerun: bool) -> int:
    """Run the plan; say where the report is, or in one line which file could not be written."""
    try:
        report, results = compare(plan, launcher=launcher, rerun=rerun)
    except OSError as error:  # e.g. a full disk: the file and the reason, not a traceback
        print(f"[compare] error: could not write {error.filename or 'a file'}: {error.strerror or error}. A file "
              "being replaced keeps its previous content; finished runs are kept, and rerunning the same command "
              "reuses them.", file=sys.stderr)
        return 1
    print(f"[compare] report: {report}")
    return 0 if all(r.ok for r in results) else 1
