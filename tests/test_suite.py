"""`dualadam-hf compare` over a suite of tasks: the tasks' plans, bad entries, the pooled report, end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments import compare as compare_module
from dualadam_hf.experiments.cli import main
from dualadam_hf.experiments.report import RunResult, load_raw
from dualadam_hf.experiments.stats import paired_difference, random_effects
from dualadam_hf.experiments.suite import Task, default_task_label, parse_tasks, plan_suite
from dualadam_hf.experiments.suite_report import (
    REPORT_FILE,
    SUMMARY_FILE,
    forest_file,
    pooled_tests,
    write_suite_report,
)
from dualadam_hf.experiments.variants import parse_variants

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_chainsum_lora.yaml"
TASKS = """
  tasks:
    - dataset_name: reasoning-gym:chain_sum
      dataset_config: min_terms=2,max_terms=2,min_digits=1,max_digits=1
      label: sums
    - dataset_name: reasoning-gym:simple_equations
"""


def write_suite(folder: Path, compare_block: str) -> Path:
    """The default recipe with ``compare_block`` in place of its own compare: block."""
    text = RECIPE.read_text().split("\ncompare:", 1)[0]
    path = folder / "suite.yaml"
    path.write_text(f"{text}\ncompare:{compare_block}", encoding="utf-8")
    return path


# --- tasks and plans --------------------------------------------------------------------------------------

def test_task_labels_default_to_the_data_s_short_name():
    assert default_task_label("reasoning-gym:chain_sum") == "chain_sum"
    assert default_task_label("data/sums.jsonl") == "sums" and default_task_label("openai/gsm8k") == "gsm8k"
    tasks = parse_tasks([{"dataset_name": "reasoning-gym:gcd"}, {"dataset_name": "reasoning-gym:gcd",
                                                                  "dataset_config": "min_value=1", "label": "gcd2"}],
                        "here")
    assert tasks == [Task("gcd", "reasoning-gym:gcd"), Task("gcd2", "reasoning-gym:gcd", "min_value=1")]
    # Without settings of its own a task clears the recipe's, which belong to the recipe's dataset_name.
    assert tasks[0].overrides("min_terms=2") == ["--dataset_name", "reasoning-gym:gcd", "--dataset_config", ""]
    assert tasks[0].overrides(None) == ["--dataset_name", "reasoning-gym:gcd"]
    assert tasks[1].overrides(None)[-2:] == ["--dataset_config", "min_value=1"]


@pytest.mark.parametrize("block, match", [
    ("\n  tasks:\n    - {datset_name: reasoning-gym:gcd}\n", r"task 1: unknown key\(s\) \['datset_name'\]; a task "
                                                              "takes dataset_name, dataset_config, label"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd}\n    - {label: other}\n", "task 2 needs a dataset_name"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd, label: a}\n"
     "    - {dataset_name: reasoning-gym:lcm, label: a}\n", "tasks 1 and 2 have the same label 'a'"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd}\n    - {dataset_name: reasoning-gym:gcd}\n",
     "tasks 1 and 2 have the same label 'gcd'"),
    ("\n  tasks: []\n", "tasks must be a non-empty list"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd, label: a/b}\n", "task label 'a/b' holds the path separator"),
    (TASKS + "  optims:\n    - adamw_torch\n    - {optim: matched_warmup, tasks: [sums, gcd]}\n",
     "variant 'matched-warmup' names the task 'gcd', which is not a task of this suite"),
    (TASKS + "  optims:\n    - {optim: adamw_torch, tasks: [sums]}\n    - dualadam\n",
     "variant 'adamw_torch' is a baseline .* so it runs on every task"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd}\n    - {dataset_name: reasoning-gym:no_such_task}\n",
     "task 'no_such_task' \\(reasoning-gym:no_such_task\\): .*not registered"),
    ("\n  tasks:\n    - {dataset_name: reasoning-gym:gcd, dataset_config: bogus=1}\n",
     "task 'gcd' .*unexpected keyword argument 'bogus'"),
])
def test_a_bad_suite_entry_fails_in_one_line_before_anything_trains(tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                                    block, match):
    def no_training(command):
        raise AssertionError("a run started")

    monkeypatch.setattr(compare_module, "run_child", no_training)
    out = tmp_path / "out"
    code = main(["compare", "--config", str(write_suite(tmp_path, block)), "--smoke", "--output_dir", str(out),
                 "--model_name_or_path", tiny_model_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dualadam-hf compare: error: ")
    assert re.search(match, err[0]), err[0]
    assert not out.exists()


def test_a_variant_limited_to_tasks_is_planned_on_those_only(tmp_path, tiny_model_dir):
    block = TASKS + "  optims:\n    - adamw_torch\n    - dualadam\n    - {optim: matched_warmup, tasks: [sums]}\n"
    suite = plan_suite(write_suite(tmp_path, block), output_dir=tmp_path / "out", smoke=True, sharpness=False,
                       overrides=[*compare_module.smoke_overrides(), "--model_name_or_path", tiny_model_dir])
    assert [t.label for t in suite.tasks] == ["sums", "simple_equations"]
    assert [[v.label for v in p.variants] for p in suite.plans] == [
        ["adamw_torch", "dualadam", "matched-warmup"], ["adamw_torch", "dualadam"]]
    assert [p.output_dir for p in suite.plans] == [tmp_path / "out" / "sums", tmp_path / "out" / "simple_equations"]
    assert suite.plans[1].overrides[-4:] == ["--dataset_name", "reasoning-gym:simple_equations", "--dataset_config", ""]
    # Each task's runs get their own data in their train command (and so in their reuse key).
    spec = compare_module.RunSpec(suite.plans[0].variants[2], 0, tmp_path / "run", "final")
    command = compare_module.train_command(suite.plans[0], spec, None)
    assert command[command.index("--dataset_config") + 1] == "min_terms=2,max_terms=2,min_digits=1,max_digits=1"
    with pytest.raises(RecipeError, match="--dataset_name is set by each task"):
        plan_suite(write_suite(tmp_path, block), overrides=["--dataset_name", "x"])
    # A plain comparison refuses a variant limited to tasks: it has none.
    with pytest.raises(RecipeError, match="names tasks, which only a suite has"):
        compare_module.make_plan(RECIPE, optims=[{"optim": "dualadam", "tasks": ["sums"]}])


# --- the pooled report from known results -------------------------------------------------------------------

def _run(label: str, seed: int, loss: float, accuracy: float) -> RunResult:
    return RunResult(label, seed, [{"step": 2, "eval_loss": loss, "eval_accuracy": accuracy}])


class FakeSuite:
    def __init__(self, out: Path, variants, tasks):
        self.output_dir, self.config, self.overrides = out, Path("suite.yaml"), []
        self.variants = variants
        self.tasks = [Task(label, f"reasoning-gym:{label}") for label in tasks]
        self.plans = [type("Plan", (), {"variants": [v for v in variants if v.tasks is None or t in v.tasks],
                                         "seeds": [0, 1, 2]})() for t in tasks]


def test_the_suite_report_pools_each_comparison_over_the_tasks_that_ran_it(tmp_path):
    variants = parse_variants(["adamw_torch", "dualadam", {"optim": "matched_warmup", "tasks": ["a", "b"]}])
    # Per task and seed: (dualadam - adamw, warmup - dualadam) in loss; accuracy differences all 0 on task c.
    shifts = {"a": [(-0.10, 0.01), (-0.20, 0.02), (-0.15, 0.00)], "b": [(0.05, 0.03), (-0.05, -0.01), (0.0, 0.01)],
              "c": [(-0.30, None), (-0.25, None), (-0.20, None)]}
    results = {}
    for task, rows in shifts.items():
        runs = []
        for seed, (dual, warm) in enumerate(rows):
            runs += [_run("adamw_torch", seed, 1.0 + seed, 0.5), _run("dualadam", seed, 1.0 + seed + dual,
                                                                      0.5 + (0 if task == "c" else dual / 10))]
            if warm is not None:
                runs.append(_run("matched-warmup", seed, 1.0 + seed + dual + warm, 0.5))
        results[task] = runs
    suite = FakeSuite(tmp_path, variants, list(shifts))
    report = write_suite_report(suite, results)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    found = {(c["family"], c["variant"], c["metric"]): c for c in summary["comparisons"]}
    assert set(found) == {("primary", "dualadam", m) for m in ("heldout_accuracy", "heldout_loss")} | {
        ("control", "matched-warmup", m) for m in ("heldout_accuracy", "heldout_loss")}
    loss = found[("primary", "dualadam", "heldout_loss")]
    diffs = {task: [dual for dual, _ in rows] for task, rows in shifts.items()}
    by_hand = [paired_difference(d) for d in diffs.values()]
    pooled = random_effects([d.mean for d in by_hand], [d.sd / math.sqrt(d.n) for d in by_hand])
    assert [t["task"] for t in loss["tasks"]] == ["a", "b", "c"]
    assert [t["mean"] for t in loss["tasks"]] == pytest.approx([d.mean for d in by_hand])
    assert (loss["pooled"]["mean"], loss["pooled"]["low"], loss["pooled"]["high"], loss["pooled"]["tau2"]) == \
        pytest.approx((pooled.mean, pooled.low, pooled.high, pooled.tau2))
    # The control ran on a and b only; task c has no accuracy spread (all differences 0) and is not pooled.
    control = found[("control", "matched-warmup", "heldout_loss")]
    assert [t["task"] for t in control["tasks"]] == ["a", "b"] and control["pooled"]["k"] == 2
    accuracy = found[("primary", "dualadam", "heldout_accuracy")]
    assert [t["pooled"] for t in accuracy["tasks"]] == [True, True, False]
    assert "variance is 0" in accuracy["tasks"][2]["why_not_pooled"] and accuracy["pooled"]["k"] == 2
    # Holm runs within each family over its pooled tests: two in the primary family.
    tests = [t for t in pooled_tests(variants, {task: ([v.label for v in p.variants], results[task])
                                                for task, p in zip(shifts, suite.plans)}) if t.family == "primary"]
    ps = sorted(t.pooled.t_p for t in tests)
    assert sorted(t.holm_p for t in tests) == pytest.approx([2 * ps[0], max(2 * ps[0], ps[1])])
    assert loss["pooled"]["holm_p"] in [pytest.approx(t.holm_p) for t in tests]
    text = report.read_text()
    assert "## dualadam − adamw_torch (primary)" in text and "## matched-warmup − dualadam (control)" in text
    assert "| **pooled** (random effects) | 3 tasks |" in text and "not pooled: all 3 differences are equal" in text
    assert "[c/report.md](c/report.md)" in text and "| c | `reasoning-gym:c` | `none` | adamw_torch, dualadam |" in text
    assert "- **matched-warmup**: `dualadam` with optim_args `inverse_scale=0`; on a, b" in text
    for test in tests:
        assert (tmp_path / forest_file(test)).stat().st_size > 1000
        assert f"]({forest_file(test)})" in text


def test_one_task_is_reported_but_not_pooled(tmp_path):
    variants = parse_variants("adamw_torch,dualadam")
    runs = [r for seed in range(3) for r in (_run("adamw_torch", seed, 1.0, 0.5), _run("dualadam", seed, 1.1 - seed
                                                                                       / 20, 0.5))]
    write_suite_report(FakeSuite(tmp_path, variants, ["only"]), {"only": runs})
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    loss = next(c for c in summary["comparisons"] if c["metric"] == "heldout_loss")
    assert loss["pooled"] is None and "only only has a standard error" in loss["no_pool"]
    assert "No pooled result: only only has a standard error" in (tmp_path / REPORT_FILE).read_text()


# --- end to end on tiny tasks -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_suite_runs_every_task_pools_them_and_reuses_everything(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "suite"
    # A blend over both steps: the recipe's blend_fraction of 2 steps would be no blend, DualAdam then AdamW exactly.
    block = TASKS + "  optims: [adamw_torch, {optim: dualadam, blend_steps: 2, label: dual2}]\n  seeds: 2\n"
    argv = ["compare", "--config", str(write_suite(tmp_path, block)), "--smoke", "--no-sharpness", "--output_dir",
            str(out), "--model_name_or_path", tiny_model_dir]
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": done in ") == 8
    for task in ("sums", "simple_equations"):
        assert (out / task / "report.md").is_file() and len(list((out / task / "raw").glob("*.json"))) == 4
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for comparison in summary["comparisons"]:
        per_task = []
        for row in comparison["tasks"]:
            final, _ = load_raw(out / row["task"] / "raw")
            runs = {(r.label, r.seed): r.summary[comparison["metric"]] for r in final}
            diffs = [runs[(comparison["variant"], seed)] - runs[(comparison["baseline"], seed)] for seed in (0, 1)]
            per_task.append(paired_difference(diffs))
            assert row["differences"] == pytest.approx(diffs) and row["mean"] == pytest.approx(per_task[-1].mean)
        if comparison["pooled"] is None:  # accuracy of 2 scored rows: the seeds' differences may all be equal
            assert any(d.low is None for d in per_task)
            continue
        pooled = random_effects([d.mean for d in per_task], [d.sd / math.sqrt(d.n) for d in per_task])
        for key in ("mean", "low", "high", "tau2", "i2", "t_p", "detectable"):
            assert comparison["pooled"][key] == pytest.approx(getattr(pooled, key)), key
    assert any(c["pooled"] for c in summary["comparisons"] if c["metric"] == "heldout_loss")
    text = (out / REPORT_FILE).read_text()
    assert "## dual2 − adamw_torch (primary)" in text and (out / "forest-dual2-vs-adamw_torch.png").is_file()

    # Rerun: every run is reused, nothing trains, and the report says the same.
    def no_training(command):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "run_child", no_training)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already finished, reusing its log") == 8
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
