"""`dualadam-hf compare` over a suite of tasks: one recipe, compared on each task, then pooled across tasks.

A recipe whose ``compare:`` block holds ``tasks:`` (docs/recipes.md, "A suite of tasks") is a suite: every task
replaces the recipe's ``dataset_name`` and ``dataset_config`` with its own, and everything else is the recipe's.
Each task is an ordinary comparison (:func:`.compare.make_plan`, :func:`.compare.compare`) in its own subfolder
of the output folder, with its own report, its runs reused or resumed as any comparison's; the suite then pools
each pre-specified comparison across the tasks (:mod:`.suite_report`). All tasks are planned, and so checked,
before the first run starts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..integrations.names import DEFAULT_OPTIMS
from .arguments import COMPARE_KEY, RecipeError, load_experiment, read_yaml
from .checkpoints import folder_lock
from .compare import LOCK_FILE, TASKS_KEY, Plan, checked_settings, compare, make_plan
from .report import RunResult
from .suite_report import write_suite_report
from .variants import Variant, check_label, parse_variants, split_entries, without_tasks

TASK_KEYS = ("dataset_name", "dataset_config", "label")
# The task decides the data; the overrides may not (each task's would be replaced without a word).
DATA_KEYS = ("dataset_name", "dataset_config")


@dataclass(frozen=True)
class Task:
    """One task of a suite: its data (``dataset_name``, generator settings ``dataset_config``) and the label that
    names its folder, rows and plots."""

    label: str
    dataset_name: str
    dataset_config: str | None = None

    def overrides(self, recipe_config: str | None) -> list[str]:
        """The `--key value` arguments that put this task's data in place of the recipe's. Without settings of its
        own the task runs with none: the recipe's ``dataset_config`` belongs to the recipe's ``dataset_name``."""
        given = ["--dataset_name", self.dataset_name]
        if self.dataset_config is not None or recipe_config:
            given += ["--dataset_config", self.dataset_config or ""]
        return given


@dataclass
class Suite:
    """A planned suite: its tasks in order, each with the plan of its comparison, and every variant (with the
    tasks it is limited to)."""

    config: Path
    output_dir: Path
    tasks: list[Task]
    plans: list[Plan]
    variants: list[Variant]
    baselines: list[str]
    overrides: list[str]  # the command line's, shared by every task (each task adds its data)


def default_task_label(dataset_name: str) -> str:
    """A short label from the data's name: the task of ``reasoning-gym:<task>``, else the last part of a path or
    hub id without a .jsonl/.json ending."""
    name = dataset_name.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    for ending in (".jsonl", ".json"):
        name = name.removesuffix(ending)
    return name


def _task(entry: Any, where: str) -> Task:
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{where} must be a mapping of {', '.join(TASK_KEYS)}, got {entry!r}")
    if unknown := sorted(str(key) for key in entry if key not in TASK_KEYS):
        raise RecipeError(f"{where}: unknown key(s) {unknown}; a task takes {', '.join(TASK_KEYS)}")
    name = entry.get("dataset_name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{where} needs a dataset_name (e.g. reasoning-gym:chain_sum), got {name!r}")
    settings = entry.get("dataset_config")
    if settings is not None and not isinstance(settings, str):
        raise RecipeError(f"{where}: dataset_config must be text (key=value,...), got {settings!r}")
    label = entry.get("label", default_task_label(name.strip()))
    if not isinstance(label, str):
        raise RecipeError(f"{where}: label must be text, got {label!r}")
    check_label(label.strip(), "task")
    return Task(label.strip(), name.strip(), settings)


def parse_tasks(value: Any, where: str) -> list[Task]:
    """The suite's tasks from the recipe's ``compare: tasks:`` list; every entry checked, labels distinct."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: {TASKS_KEY} must be a non-empty list of tasks, each a mapping with a "
                          f"dataset_name (and optionally dataset_config and label), got {value!r}")
    tasks = [_task(entry, f"{where}: task {index}") for index, entry in enumerate(value, start=1)]
    labels = [t.label for t in tasks]
    if repeated := next((label for label in labels if labels.count(label) > 1), None):
        places = [str(index) for index, label in enumerate(labels, start=1) if label == repeated]
        raise RecipeError(f"{where}: tasks {' and '.join(places)} have the same label {repeated!r}; give each task "
                          "a distinct label")
    if len({label.lower() for label in labels}) < len(labels):  # one folder each, on case-blind file systems too
        raise RecipeError(f"{where}: task labels {labels} differ only in case; give each a distinct label")
    return tasks


def _entries(optims: Any) -> list[Any]:
    return split_entries(optims) if isinstance(optims, str) else list(optims)


def _check_variant_tasks(variants: list[Variant], tasks: list[Task], baselines: list[str], where: str) -> None:
    """A variant's ``tasks`` must name tasks of the suite; a baseline runs on every task (each comparison needs
    it)."""
    labels = [t.label for t in tasks]
    for variant in variants:
        if variant.tasks is None:
            continue
        if variant.label in baselines:
            raise RecipeError(f"{where}: variant {variant.label!r} is a baseline (the first variant, or named in "
                              "baseline:), so it runs on every task; remove its tasks:")
        if missing := [label for label in variant.tasks if label not in labels]:
            raise RecipeError(f"{where}: variant {variant.label!r} names the task {missing[0]!r}, which is not a task "
                              f"of this suite; tasks: {', '.join(labels)}")


def plan_suite(config: str | Path, *, optims: Any = None, seeds: Any = None, lr_grid: Any = None,
               select_metric: str | None = None, output_dir: str | Path | None = None,
               overrides: list[str] | None = None, sharpness: bool = True, smoke: bool = False,
               baseline: str | None = None, grid_seeds: Any = None) -> Suite:
    """Read the suite's tasks and plan each task's comparison (every check of every task before any run)."""
    config, overrides = Path(config).resolve(), list(overrides or [])
    where = f"recipe {config.name}, {COMPARE_KEY}"
    block = read_yaml(config).get(COMPARE_KEY)
    tasks = parse_tasks(block.get(TASKS_KEY) if isinstance(block, dict) else None, where)
    if given := [key for key in DATA_KEYS
                 if any(token == f"--{key}" or token.startswith(f"--{key}=") for token in overrides)]:
        raise RecipeError(f"--{given[0]} is set by each task of the suite ({where}: {TASKS_KEY}); leave it out of the "
                          "overrides")
    base = load_experiment(config, overrides)
    settings = checked_settings(base.compare, {"optims": optims, "baseline": baseline}, config)
    entries = _entries(settings.get("optims", DEFAULT_OPTIMS))
    variants = parse_variants(entries, base.training.optim_args)
    baselines = list(dict.fromkeys([variants[0].label, *settings.get("baseline", [])]))
    _check_variant_tasks(variants, tasks, baselines, where)
    out = Path(output_dir or Path("compare") / (config.stem + ("-smoke" if smoke else ""))).resolve()
    plans = []
    for task in tasks:
        mine = [without_tasks(entry) for entry, variant in zip(entries, variants)
                if variant.tasks is None or task.label in variant.tasks]
        try:
            plans.append(make_plan(config, optims=mine, seeds=seeds, lr_grid=lr_grid, select_metric=select_metric,
                                   output_dir=out / task.label,
                                   overrides=[*overrides, *task.overrides(base.script.dataset_config)],
                                   sharpness=sharpness, smoke=smoke, baseline=baseline, grid_seeds=grid_seeds))
        except RecipeError as error:
            raise RecipeError(f"task {task.label!r} ({task.dataset_name}): {error}") from None
    return Suite(config, out, tasks, plans, variants, baselines, overrides)


def run_suite(suite: Suite, *, launcher: str | None = None, rerun: bool = False,
              log=print) -> tuple[Path, dict[str, list[RunResult]]]:
    """Compare every task in turn (finished runs reused, interrupted ones resumed), then write the suite report;
    return its path and each task's results. One suite or comparison at a time per output folder."""
    with folder_lock(suite.output_dir, LOCK_FILE, "compare"):
        started = time.time()
        results: dict[str, list[RunResult]] = {}
        for index, (task, plan) in enumerate(zip(suite.tasks, suite.plans), start=1):
            log(f"[suite] task {index}/{len(suite.tasks)} {task.label} ({task.dataset_name}): {plan.output_dir}")
            _, results[task.label] = compare(plan, launcher=launcher, rerun=rerun, log=log)
        return write_suite_report(suite, results, seconds=time.time() - started), results


def run_suite_and_say(suite: Suite, launcher: str | None, rerun: bool) -> int:
    """Run the suite; say where its report is, or in one line which file could not be written. Exit 0 when every
    run of every task finished, else 1."""
    try:
        report, results = run_suite(suite, launcher=launcher, rerun=rerun)
    except OSError as error:
        print(f"[compare] error: could not write {error.filename or 'a file'}: {error.strerror or error}. A file "
              "being replaced keeps its previous content; finished runs are kept, and rerunning the same command "
              "reuses them.", file=sys.stderr)
        return 1
    print(f"[compare] suite report: {report}")
    return 0 if all(r.ok for runs in results.values() for r in runs) else 1
