"""`dualadam-hf compare`: variants, the learning-rate grid, resume and signals (the report: test_report.py)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments import compare as compare_module
from dualadam_hf.experiments.cli import main
from dualadam_hf.experiments.compare import RunSpec, choose_rates, make_plan, train_command
from dualadam_hf.experiments.report import RunResult
from dualadam_hf.experiments.variants import parse_variant, parse_variants, split_entries
from tests.helpers import parse_table

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml"


@pytest.fixture(autouse=True)
def ctrl_c_stops_pytest(monkeypatch):
    """compare, run in this process, takes a Ctrl-C itself: it passes SIGINT on to the run that trains and
    returns 130 (raises Interrupted where a test calls its parts), which a test reports as one failure while
    pytest goes on to the next. Raised again as the KeyboardInterrupt it was, it stops pytest."""
    run_child, run_compare = compare_module.run_child, compare_module.run_compare

    def run_child_or_stop(command: list[str]) -> int:
        try:
            return run_child(command)
        except compare_module.Interrupted as stop:
            if stop.signum == signal.SIGINT:
                raise KeyboardInterrupt from stop
            raise

    def run_compare_or_stop(*args, **kwargs) -> int:
        code = run_compare(*args, **kwargs)
        if code == 128 + signal.SIGINT:
            raise KeyboardInterrupt
        return code

    monkeypatch.setattr(compare_module, "run_child", run_child_or_stop)
    monkeypatch.setattr(compare_module, "run_compare", run_compare_or_stop)


def test_ctrl_c_while_a_run_trains_stops_pytest(tiny_model_dir, tmp_path, monkeypatch):
    # In place of training, the run sends the Ctrl-C itself: SIGINT to this process, which compare passes back.
    ctrl_c = "import os, signal, time; time.sleep(0.5); os.kill(os.getppid(), signal.SIGINT); time.sleep(60)"
    run_child = compare_module.run_child  # as the fixture leaves it
    monkeypatch.setattr(compare_module, "run_child", lambda command: run_child([sys.executable, "-c", ctrl_c]))
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--smoke", "--optims", "adamw_torch", "--output_dir",
            str(tmp_path / "c"), "--model_name_or_path", tiny_model_dir, "--no-sharpness"]
    with pytest.raises(KeyboardInterrupt):
        main(argv)


class FakePlan:
    def __init__(self, out: Path, variants=("adamw_torch", "dualadam")):
        self.output_dir, self.config = out, Path("recipe.yaml")
        self.variants = parse_variants(",".join(variants))
        self.seeds, self.overrides, self.test_split = [0, 1, 2], [], "test"
        self.lr_grid, self.chosen_lr, self.select_metric, self.grid_seed = [], {}, "eval_loss", 1000
        self.validation_split = "validation"


# --- variants ------------------------------------------------------------------------------------


def test_variant_syntax_presets_and_labels():
    assert split_entries("adamw_torch, dualadam[blend_steps=10,inverse_scale=auto],matched_warmup") == [
        "adamw_torch", "dualadam[blend_steps=10,inverse_scale=auto]", "matched_warmup"]
    warm = parse_variant("adamw_torch[warmup_steps=10,label=adamw-warmup]")
    assert (warm.label, warm.optim, warm.optim_args, warm.settings) == (
        "adamw-warmup", "adamw_torch", {}, {"warmup_steps": "10"})
    assert warm.overrides() == ["--optim", "adamw_torch", "--optim_args", "", "--warmup_steps", "10"]
    matched = parse_variant("matched_warmup", "blend_steps=8,foreach=false")
    assert (matched.label, matched.optim) == ("matched-warmup", "dualadam")
    assert matched.optim_args == {"blend_steps": "8", "foreach": "false", "inverse_scale": "0"}
    scaled = parse_variant("dualadam[inverse_scale=auto,blend_fraction=0.2]", "blend_steps=8")
    assert scaled.optim_args == {"blend_fraction": "0.2", "inverse_scale": "auto"}  # the variant's blend wins
    # The recipe's optim_args reach InvAdam without the blend keys it does not take.
    assert parse_variant("invadam", "blend_fraction=0.5,foreach=true").optim_args == {"foreach": "true"}
    assert parse_variant({"optim": "dualadam", "label": "d", "blend_steps": 4}).optim_args == {"blend_steps": "4"}


@pytest.mark.parametrize("text, match", [
    ("adamw_torch,adamm", "unknown optimizer 'adamm'"),
    ("dualadam,dualadam", "names a variant twice: dualadam"),
    ("dualadam[blend_steps=4", "a '\\[' without its '\\]'"),
    ("dualadam[blend_steps]", "'blend_steps' is not of the form key=value"),
    ("dualadam[inverse_scale=huge]", "inverse_scale"),
    ("invadam[blend_steps=4]", "invadam"),
    ("dualadam[seed=3]", "seed is set by compare"),
    ("", "at least one optimizer"),
])
def test_bad_variants_are_named(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_variants(text)


@pytest.mark.parametrize("entry", ["dualadam[train_pool_size=64]", {"optim": "dualadam", "train_pool_size": 64}])
def test_a_variant_cannot_draw_its_train_rows_from_another_pool(entry):
    # The pool the train rows of a seed are drawn from must be the same for every variant of that seed.
    with pytest.raises(RecipeError, match="train_pool_size must be the same in every run"):
        parse_variants([entry])


# --- plan, commands, learning-rate choice --------------------------------------------------------


def test_commands_paths_and_splits(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(DEFAULT_RECIPE.read_text())
    common = dict(optims="adamw_torch,matched_warmup", lr_grid="1e-3,3e-3", smoke=True,
                  overrides=[*compare_module.smoke_overrides(), "--model_name_or_path", tiny_model_dir])
    relative = make_plan("r.yaml", output_dir="out", **common)
    absolute = make_plan(tmp_path / "r.yaml", output_dir=tmp_path / "out", **common)
    assert relative.output_dir == absolute.output_dir == (tmp_path / "out")
    same = RunSpec(relative.variants[0], 0, relative.output_dir / "f", "final")
    assert train_command(relative, same, None) == train_command(absolute, same, None)  # one run folder, reused
    spec = RunSpec(relative.variants[1], 1000, relative.output_dir / "g", "grid", 1e-3)
    command = train_command(relative, spec, "accelerate launch")
    assert command[:4] == ["accelerate", "launch", "-m", "dualadam_hf"]
    text = " ".join(command)
    assert text.index("--max_steps 2") < text.index("--optim dualadam --optim_args")
    assert "inverse_scale=0" in text and "--learning_rate 0.001" in text and "--seed 1000" in text
    assert "--dataset_test_split validation" in text and "--sharpness false" in text
    final = train_command(relative, RunSpec(relative.variants[0], 0, relative.output_dir / "f", "final"), None)
    assert "--dataset_test_split test" in " ".join(final) and "--learning_rate" not in final


def test_the_grid_chooses_the_best_validation_result_and_failed_runs_lose(tmp_path):
    plan = FakePlan(tmp_path)
    plan.lr_grid = [1e-3, 3e-3]
    results = [RunResult("adamw_torch", 9, [{"eval_loss": 1.0, "step": 1}], phase="grid", lr=1e-3),
               RunResult("adamw_torch", 9, [{"eval_loss": 0.5, "step": 1}], phase="grid", lr=3e-3),
               RunResult("dualadam", 9, [{"eval_loss": 0.7, "step": 1}], phase="grid", lr=1e-3),
               RunResult("dualadam", 9, [], ok=False, error="diverged", phase="grid", lr=3e-3)]
    assert choose_rates(plan, results) == {"adamw_torch": 3e-3, "dualadam": 1e-3}
    assert choose_rates(plan, results[:2] + results[3:]) == {"adamw_torch": 3e-3}  # dualadam: no safe rate


def test_compare_refuses_overrides_it_sets_itself(tmp_path, capsys):
    for flag in ("--seed", "--learning_rate", "--dataset_test_split"):
        code = main(["compare", "--config", str(DEFAULT_RECIPE), "--output_dir", str(tmp_path), flag, "3"])
        assert code == 2
        assert f"{flag} is set by compare for each run" in capsys.readouterr().err


def test_compare_checks_the_model_before_the_first_run(tmp_path, capsys):
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--output_dir", str(tmp_path / "c"),
            "--model_name_or_path", str(tmp_path / "missing")]
    assert main(argv) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --- end to end ----------------------------------------------------------------------------------


def write_split_folder(folder: Path, sizes: dict[str, int]) -> Path:
    from dualadam_hf.experiments.tiny import tiny_arithmetic_pairs

    folder.mkdir(parents=True, exist_ok=True)
    pairs = iter(tiny_arithmetic_pairs(sum(sizes.values()) * 3, seed=7))
    seen = set()
    for split, n in sizes.items():
        with (folder / f"{split}.jsonl").open("w") as f:
            written = 0
            for question, answer in pairs:
                if question in seen:
                    continue
                seen.add(question)
                f.write(json.dumps({"prompt": [{"role": "user", "content": question}],
                                    "completion": [{"role": "assistant", "content": answer}],
                                    "answer": answer.split("=")[-1].strip()}) + "\n")
                written += 1
                if written == n:
                    break
    return folder


@pytest.mark.slow
def test_grid_never_reads_the_test_split_and_seeds_are_paired(tiny_model_dir, tmp_path, capsys):
    data = write_split_folder(tmp_path / "data", {"train": 32, "validation": 8, "test": 8})
    out = tmp_path / "cmp"
    overrides = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--eval_size", "8",
                 "--accuracy_size", "4"]
    plan = make_plan(DEFAULT_RECIPE, optims="adamw_torch,matched_warmup", seeds=2, lr_grid="1e-3,3e-2",
                     output_dir=out, overrides=compare_module.smoke_overrides() + overrides, smoke=True,
                     sharpness=False)
    # Poison the test split: a grid run that read it would fail on its first line.
    test_file = data / "test.jsonl"
    good = test_file.read_text()
    test_file.write_text("this is not json\n")
    specs = [RunSpec(v, plan.grid_seed, compare_module.grid_folder(plan, v, lr, plan.grid_seed), "grid", lr)
             for v in plan.variants for lr in plan.lr_grid]
    grid = compare_module._execute(plan, specs, None, False, print)
    assert all(r.ok for r in grid), [r.error for r in grid]
    chosen = choose_rates(plan, grid)
    test_file.write_text(good)
    report, results = compare_module.compare(plan)  # reuses the grid runs, then runs the seeds
    assert plan.chosen_lr == chosen and all(r.ok for r in results)
    assert capsys.readouterr().out.count("already finished") == len(specs)
    text = report.read_text()
    assert "## Learning rates, chosen on the `validation` split" in text and "**" in text
    assert "matched-warmup − adamw_torch" in text
    for result in results:
        key = json.loads((out / "runs" / f"{[v for v in plan.variants if v.label == result.label][0].folder}"
                                       f"-seed{result.seed}" / compare_module.COMMAND_FILE).read_text())
        command = key["command"]
        assert command[command.index("--learning_rate") + 1] == repr(chosen[result.label])
        assert result.accuracy_rows is not None and len(result.accuracy_rows) == 4
    assert sorted({r.seed for r in results}) == [0, 1]


@pytest.mark.slow
def test_interrupted_comparison_resumes_without_training_finished_runs_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--smoke", "--optims",
            "adamw_torch,dualadam[blend_steps=2,label=dual2]", "--seeds", "2", "--output_dir", str(out),
            "--model_name_or_path", tiny_model_dir, "--no-sharpness"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": done in ") == 4
    table = parse_table((out / "report.md").read_text())
    assert set(table) == {"adamw_torch", "dual2"}
    # Every raw log carries its run's manifest: the model's and the data's identity, the code, the times.
    for raw in sorted((out / "raw").glob("*.json")):
        manifest = json.loads(raw.read_text())["log_history"][-1]["run_manifest"]
        assert manifest["inputs"]["model"]["model weights"] and manifest["inputs"]["data"]["generator version"]
        assert manifest["segments"][-1]["ended"] and manifest["segments"][-1]["dualadam_hf"]["version"]
    # A kill during the post-training evaluation leaves the run trained but without its record.
    (out / "runs" / "dual2-seed1" / "run_done.json").unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 3 and printed.count(": done in ") == 1
    state = json.loads((out / "runs" / "dual2-seed1" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (out / "runs" / "dual2-seed1" / "checkpoint-3").exists()
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]  # nothing trained again
    assert any("eval_loss" in e for e in state["log_history"])  # the evaluation was redone
    # A different command must not reuse these folders.
    assert main(argv + ["--max_steps", "3"]) == 2
    assert "holds a run whose train command differs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_grid_rate_that_diverges_is_marked_loses_and_the_report_is_written(tiny_model_dir, tmp_path, capsys):
    """lr 1e4 overflows the tiny model within a few steps: that grid run is finished and marked diverged, the
    grid chooses the other rate, and compare exits 0 with its report."""
    out = tmp_path / "compare"
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--smoke", "--optims", "adamw_torch", "--lr_grid",
            "1e-3,1e4", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir, "--no-sharpness",
            "--max_steps", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("(DIVERGED: non-finite") == 1 and "chosen learning rates" in printed
    assert "adamw_torch=0.001" in printed
    text = (out / "report.md").read_text()
    assert "diverged" in text
    assert parse_table(text)["adamw_torch"]
