"""The comparison report: tables read back from the logs, diverged and failed runs, pairing by seed, paired
differences against one or two baselines, McNemar per seed, and files that a full disk cannot leave half-written."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

from dualadam_hf.experiments.report import RunResult, load_raw, results_table, write_report
from dualadam_hf.experiments.variants import parse_variants
from tests.helpers import parse_table

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study"  # the published study (v2): report.md, raw/
STUDY_RAW = STUDY / "v1" / "raw"  # the first study's raw logs
RECIPE_V2 = ROOT / "recipes" / "smollm2_chainsum_study_v2.yaml"
LOWBIT = STUDY / "lowbit"  # the low-bit study: report.md, raw/
RECIPE_LOWBIT = ROOT / "recipes" / "smollm2_chainsum_lowbit_full.yaml"


def assert_cell_matches(cell: tuple[float, float | None], values: list[float], digits: int) -> None:
    tolerance = 0.51 * 10**-digits  # the table rounds to `digits` decimals
    assert cell[0] == pytest.approx(statistics.fmean(values), abs=tolerance)
    if len(values) > 1:
        assert cell[1] == pytest.approx(statistics.stdev(values), abs=tolerance)
    else:
        assert cell[1] is None


def fake_history(rng: random.Random, steps: int = 4, eval_steps: tuple[int, ...] | None = None) -> list[dict]:
    history = [{"loss": rng.uniform(1, 3), "grad_norm": rng.uniform(0.5, 2), "dualadam/inverse_share":
                rng.uniform(1e-5, 1e-3), "step": s} for s in range(1, steps + 1)]
    history += [{"eval_loss": rng.uniform(1, 3), "step": s} for s in (eval_steps or (2, steps))]
    history.append({"train_runtime": rng.uniform(5, 9), "train_loss": 2.0, "step": steps})
    history.append({"peak_memory_mb": rng.uniform(500, 900), "eval_accuracy": rng.random(),
                    "train_wall_time_s": rng.uniform(5, 9), "step": steps})
    return history


def with_final(history: list[dict], **values: float) -> list[dict]:
    """The history with a last entry overriding summary numbers (e.g. eval_loss, eval_accuracy)."""
    return [*history, {**values, "step": history[-1]["step"]}]


class FakePlan:
    def __init__(self, out: Path, variants=("adamw_torch", "dualadam"), seeds=(0, 1, 2)):
        self.output_dir, self.config = out, Path("recipe.yaml")
        self.variants = parse_variants(",".join(variants))
        self.seeds, self.overrides, self.test_split = list(seeds), [], "test"
        self.lr_grid, self.chosen_lr, self.select_metric, self.grid_seeds = [], {}, "eval_loss", [1000]
        self.validation_split = "validation"

    def seeds_of(self, variant) -> list[int]:
        return self.seeds if variant.seeds is None else [self.seeds[0] + k for k in range(variant.seeds)]


def differences_rows(text: str, baseline: str = "adamw_torch") -> dict[tuple[str, str], list[str]]:
    """{(variant, metric): cells} of the paired-differences table against ``baseline``."""
    section = text.split(f"## Paired differences against {baseline}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "McNemar" not in section.split(
        line)[0][-200:]]
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7:
            table[(cells[0], cells[1])] = cells[2:]
    return table


def test_report_table_is_mean_and_std_of_the_last_logged_values(tmp_path):
    rng = random.Random(0)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam") for seed in (0, 1, 2)]
    results.append(RunResult("dualadam", 3, [], ok=False, error="exit code 1"))
    text = write_report(FakePlan(tmp_path), results).read_text()
    table = parse_table(text)
    assert set(table) == {"adamw_torch", "dualadam"}
    # What each column shows, written out here: the log key it reads, its header and its digits.
    headers = {"heldout_loss": (("eval_loss",), "held-out loss", 4),
               "heldout_accuracy": (("eval_accuracy",), "held-out accuracy", 3),
               "final_train_loss": (("loss",), "final train loss", 4),
               "wall_time_s": (("train_wall_time_s",), "train wall time (s)", 1),
               "peak_memory_mb": (("peak_memory_mb",), "peak memory (MiB)", 0)}
    assert "top Hessian eigenvalue" not in text  # nobody logged sharpness: no column
    for label, row in table.items():
        runs = [r for r in results if r.label == label and r.ok]
        for name in ("heldout_loss", "heldout_accuracy", "final_train_loss", "wall_time_s", "peak_memory_mb"):
            keys, header, digits = headers[name]
            last = [[e[keys[0]] for e in r.log_history if keys[0] in e][-1] for r in runs]
            assert_cell_matches(row[header], last, digits)
    assert "**failed**: dualadam seed 3 (final): exit code 1" in text
    # The cost of the whole comparison: the train wall time of every finished run (not of this invocation).
    trained = sum([e["train_wall_time_s"] for e in r.log_history if "train_wall_time_s" in e][-1]
                  for r in results if r.ok)
    assert f"Training time of all runs: {trained:.0f} s" in text
    assert "grid included" not in text  # no grid ran
    assert "## Paired differences against adamw_torch" in text and "dualadam − adamw_torch" in text
    for name in ("train_loss.png", "eval_loss.png", "inverse_share.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"({name})" in text
    saved = json.loads((tmp_path / "raw" / "final-dualadam-seed1.json").read_text())
    assert saved["log_history"] == results[4].log_history and saved["summary"] == results[4].summary


def test_single_seed_cells_have_no_std():
    table = parse_table("## Results\n" + results_table([RunResult("sgd", 0, fake_history(random.Random(1)))]))
    assert all(std is None for key, (_, std) in ((k, v) for k, v in table["sgd"].items() if k != "runs"))


def test_report_without_matplotlib_still_writes_the_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rng = random.Random(2)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam") for seed in (0, 1)]
    text = write_report(FakePlan(tmp_path), results).read_text()
    assert "## Results" in text and "No plots: matplotlib is not installed" in text


def test_a_diverged_run_is_marked_kept_out_and_does_not_stop_the_report(tmp_path):
    rng = random.Random(3)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam") for seed in (0, 1, 2)]
    # dualadam seed 1 blew up: inf held-out loss, NaN gradient norm (transformers logs the NaN loss as 0).
    blown = fake_history(rng)
    blown[2]["grad_norm"] = math.nan
    results[4] = RunResult("dualadam", 1, with_final(blown, eval_loss=math.inf))
    text = write_report(FakePlan(tmp_path), results).read_text()
    assert "**diverged**: dualadam seed 1 (final): non-finite grad_norm at step 3" in text
    table = parse_table(text)
    # Seed 1 is out of both variants, and the runs column counts what the means hold.
    assert table["dualadam"]["runs"] == "2 (diverged: seed 1)"
    assert table["adamw_torch"]["runs"] == "2 (left out: seed 1)"
    for label in ("adamw_torch", "dualadam"):
        kept = [r for r in results if r.label == label and r.seed != 1]
        assert_cell_matches(table[label]["held-out loss"], [r.summary["heldout_loss"] for r in kept], 4)
    assert "Seed 1 left out of every variant's numbers (seed 1: dualadam diverged)" in text
    rows = differences_rows(text)
    assert rows[("dualadam", "held-out loss")][0].count(",") == 1  # two per-seed differences
    saved = json.loads((tmp_path / "raw" / "final-dualadam-seed1.json").read_text())
    assert saved["diverged"].startswith("non-finite grad_norm")


def test_a_run_marked_diverged_by_training_is_kept_out(tmp_path):
    rng = random.Random(4)
    done = {"log_history": fake_history(rng), "accuracy_rows": None, "diverged": {"step": 3}}
    marked = RunResult.from_done("dualadam", 0, done)
    assert marked.divergence == "marked diverged by training (non-finite loss at step 3)" and not marked.usable
    grad = RunResult.from_done("dualadam", 0, {**done, "diverged": {"step": 5, "what": "grad_norm"}})
    assert grad.divergence == "marked diverged by training (non-finite grad_norm at step 5)"
    in_history = RunResult("dualadam", 0, [*fake_history(rng), {"diverged": {"step": 2}, "step": 2}])
    assert "step 2" in in_history.divergence
    results = [RunResult("adamw_torch", s, fake_history(rng)) for s in (0, 1)] + [
        RunResult.from_done("dualadam", 0, done), RunResult("dualadam", 1, fake_history(rng))]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert "**diverged**: dualadam seed 0 (final): marked diverged by training (non-finite loss at step 3)" in text
    assert parse_table(text)["dualadam"]["runs"] == "1 (diverged: seed 0)"


def test_a_variant_that_diverged_in_every_seed_leaves_the_others_compared(tmp_path):
    rng = random.Random(5)
    nan = [{**e, "grad_norm": math.nan} if "grad_norm" in e else e for e in fake_history(rng)]
    results = [RunResult("adamw_torch", s, fake_history(rng)) for s in (0, 1)] + [
        RunResult("dualadam", s, nan) for s in (0, 1)]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    table = parse_table(text)
    assert table["adamw_torch"]["runs"] == "2" and "held-out loss" in table["adamw_torch"]
    assert table["dualadam"]["runs"] == "0 (diverged: seed 0, 1)" and "held-out loss" not in table["dualadam"]
    assert "## Paired differences against" not in text
    assert text.count("**diverged**: dualadam") == 2


def test_no_verdict_from_one_seed_nor_from_equal_differences(tmp_path):
    rng = random.Random(6)
    one = [RunResult("adamw_torch", 0, with_final(fake_history(rng), eval_accuracy=0.25)),
           RunResult("dualadam", 0, with_final(fake_history(rng), eval_accuracy=0.5))]
    text = write_report(FakePlan(tmp_path / "one", seeds=(0,)), one).read_text()
    assert "held-out accuracy: one seed only: no interval and no verdict" in text
    assert "excludes 0" not in text and "better" not in text and "worse" not in text
    equal = []
    for seed in (0, 1, 2):
        base = 0.3 + 0.1 * seed
        equal += [RunResult("adamw_torch", seed, with_final(fake_history(rng), eval_loss=base)),
                  RunResult("dualadam", seed, with_final(fake_history(rng), eval_loss=base + 1e-6))]
    text = write_report(FakePlan(tmp_path / "equal"), equal).read_text()
    assert "held-out loss: all 3 differences are equal (+1e-06), so their variance is 0: no interval" in text
    assert rows_mean(text, "held-out loss") == "+1.00e-06"
    assert "held-out loss: the interval excludes 0" not in text


def rows_mean(text: str, metric: str) -> str:
    return differences_rows(text)[("dualadam", metric)][1]


def test_a_failed_seed_is_left_out_of_every_variant(tmp_path):
    rng = random.Random(7)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam", "invadam")
               for seed in (0, 1, 2)]
    results[5] = RunResult("dualadam", 2, [], ok=False, error="exit code 1")
    text = write_report(FakePlan(tmp_path, ("adamw_torch", "dualadam", "invadam")), results).read_text()
    table = parse_table(text)
    assert table["invadam"]["runs"] == "2 (left out: seed 2)" and table["dualadam"]["runs"] == "2 (failed: seed 2)"
    kept = [r.summary["heldout_loss"] for r in results if r.label == "invadam" and r.seed != 2]
    assert_cell_matches(table["invadam"]["held-out loss"], kept, 4)
    assert "all variants are compared on the same seeds (0, 1)" in text
    pairs = [(a, b) for a in results for b in results if a.label == "invadam" and b.label == "adamw_torch"
             and a.seed == b.seed and a.seed != 2]
    expected = [a.summary["heldout_loss"] - b.summary["heldout_loss"] for a, b in pairs]
    cells = differences_rows(text)[("invadam", "held-out loss")]
    assert [float(x) for x in cells[0].split(", ")] == pytest.approx(expected, abs=1e-5)


def test_variants_with_different_seed_counts_pair_on_the_seeds_both_have(tmp_path):
    rng = random.Random(8)
    results = [RunResult("adamw_torch", s, fake_history(rng)) for s in range(4)] + [
        RunResult("dualadam", s, fake_history(rng)) for s in range(2)]
    text = write_report(FakePlan(tmp_path, seeds=range(4)), results).read_text()
    assert "Variants ran different seeds: adamw_torch 0, 1, 2, 3; dualadam 0, 1." in text
    assert differences_rows(text)[("dualadam", "held-out loss")][0].count(",") == 1


def test_differences_against_a_named_baseline_as_well(tmp_path):
    rng = random.Random(9)
    labels = ("adamw_torch", "matched_warmup", "dualadam")
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "matched-warmup", "dualadam")
               for seed in (0, 1, 2)]
    text = write_report(FakePlan(tmp_path, labels), results, baselines=["matched-warmup"]).read_text()
    assert "paired differences against adamw_torch and matched-warmup" in text
    against = differences_rows(text, "matched-warmup")
    assert ("dualadam", "held-out loss") in against
    assert ("adamw_torch", "held-out loss") not in against  # given against adamw_torch already, with the other sign
    expected = [a.summary["heldout_loss"] - b.summary["heldout_loss"] for a in results for b in results
                if a.label == "dualadam" and b.label == "matched-warmup" and a.seed == b.seed]
    assert [float(x) for x in against[("dualadam", "held-out loss")][0].split(", ")] == pytest.approx(expected,
                                                                                                    abs=1e-5)
    missing = write_report(FakePlan(tmp_path / "m", labels), results, baselines=["adamw"]).read_text()
    assert "No paired differences: adamw is not a variant of this comparison" in missing


def test_differences_against_several_named_baselines_each_pair_once(tmp_path):
    """Each control against its own twin: a section per baseline, in order, a pair given once."""
    rng = random.Random(19)
    labels = ("adamw_torch", "matched_warmup", "dualadam", "invadam")
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "matched-warmup", "dualadam",
                                                                       "invadam") for seed in (0, 1, 2)]
    text = write_report(FakePlan(tmp_path, labels), results, baselines=["matched-warmup", "dualadam"]).read_text()
    assert "paired differences against adamw_torch and matched-warmup and dualadam" in text
    assert text.index("## Paired differences against matched-warmup") < text.index(
        "## Paired differences against dualadam")
    against = {variant for variant, _ in differences_rows(text, "dualadam")}
    assert against == {"invadam"}  # adamw_torch and matched-warmup were paired with dualadam already
    assert {variant for variant, _ in differences_rows(text, "matched-warmup")} == {"dualadam", "invadam"}


def test_accuracy_gets_an_exact_mcnemar_test_per_seed(tmp_path):
    rng = random.Random(10)
    results = []
    for seed in (0, 1):
        # The variant alone right on 8 problems, the baseline alone on 2 (then 1 and 6), 10 right for both.
        alone, base_alone = ((8, 2), (1, 6))[seed]
        variant = [1] * 10 + [1] * alone + [0] * base_alone + [0] * 5
        baseline = [1] * 10 + [0] * alone + [1] * base_alone + [0] * 5
        for label, rows in (("adamw_torch", baseline), ("dualadam", variant)):
            history = with_final(fake_history(rng), eval_accuracy=sum(rows) / len(rows))
            results.append(RunResult(label, seed, history, accuracy_rows=rows))
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert "| dualadam | 0 | 8 | 2 | 0.109 | - |" in text  # 2 * (1 + 10 + 45) / 1024; no answer text logged
    assert "| dualadam | 1 | 1 | 6 | 0.125 | - |" in text  # 2 * (1 + 7) / 128


def test_the_mcnemar_table_counts_the_answers_that_differ_apart_from_the_discordant_problems(tmp_path):
    """Two runs wrong on one problem with different answers, and both right with different text, differ there
    without being discordant: the report says both counts."""
    rng = random.Random(24)
    answers = {"adamw_torch": ["12", "-3", "7", "40", "5"], "dualadam": ["12", "-4", "7 ", "41", "6"]}
    rows = {"adamw_torch": [1, 0, 1, 1, 0], "dualadam": [1, 0, 1, 0, 1]}
    results = [RunResult.from_done(label, 0, {"log_history": with_final(fake_history(rng), eval_accuracy=0.6),
                                              "accuracy_rows": rows[label], "accuracy_answers": answers[label]})
               for label in answers]
    text = write_report(FakePlan(tmp_path, seeds=(0,)), results).read_text()
    assert mcnemar_rows(text, "adamw_torch", "dualadam") == [["1", "1", "1", "4"]]


def test_one_evaluation_point_draws_no_held_out_curve_and_says_why(tmp_path):
    rng = random.Random(11)
    results = [RunResult(label, seed, fake_history(rng, eval_steps=(4,))) for label in ("adamw_torch", "dualadam")
               for seed in (0, 1)]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert "Held-out loss: no curve, it was logged at one step only (4)." in text
    assert not (tmp_path / "eval_loss.png").exists() and (tmp_path / "train_loss.png").is_file()


def test_a_full_disk_while_plotting_leaves_the_report_and_no_empty_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"")  # what a full disk leaves: the file opened, nothing written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    rng = random.Random(12)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam") for seed in (0, 1)]
    path = write_report(FakePlan(tmp_path, seeds=(0, 1)), results)
    text = path.read_text()
    assert "## Results" in text and "## Paired differences against adamw_torch" in text
    assert "train_loss.png could not be written" in text and "![Train loss]" not in text
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def test_the_grid_footer_only_when_a_grid_ran(tmp_path):
    rng = random.Random(13)
    plan = FakePlan(tmp_path, seeds=(0,))
    plan.lr_grid, plan.chosen_lr = [1e-3, 3e-3], {"adamw_torch": 1e-3, "dualadam": 1e-3}
    grid = [RunResult(label, 1000, fake_history(rng), phase="grid", lr=lr) for label in ("adamw_torch", "dualadam")
            for lr in (1e-3, 3e-3)]
    grid[3] = RunResult("dualadam", 1000, with_final(fake_history(rng), eval_loss=math.nan), phase="grid", lr=3e-3)
    results = [RunResult(label, 0, fake_history(rng)) for label in ("adamw_torch", "dualadam")]
    text = write_report(plan, results, grid).read_text()
    assert "Training time of all runs, grid included:" in text
    assert "| dualadam | " in text and "| diverged | 0.001 |" in text


def test_the_cpu_study_recomputed_from_its_raw_logs(tmp_path):
    """The published v1 logs give the paired-t intervals computed by hand from the raw logs."""
    results, grid = load_raw(STUDY_RAW)
    assert len(results) == 12 and len(grid) == 12 and all(r.phase == "grid" for r in grid)
    labels = ("adamw_torch", "matched_warmup", "dualadam", "dualadam_scaled")
    text = write_report(FakePlan(tmp_path, labels), results).read_text()
    rows = differences_rows(text)
    warmup = rows[("matched-warmup", "held-out accuracy")]
    assert warmup[1:3] == ["-0.0120", "[-0.0725, +0.0485]"]  # [-0.07243, +0.04843], rounded outward
    scaled = rows[("dualadam-scaled", "held-out accuracy")]
    assert scaled[1] == "-0.1893" and scaled[2].startswith("[-0.69") and scaled[3] == "0.25"
    # A primary test (against the first variant, on a held-out outcome): its verdict follows Holm's p.
    assert ("dualadam-scaled − adamw_torch, held-out accuracy: Holm p = " in text
            and "over the 4 primary tests: no difference shown after the correction" in text)
    # 3 of 3 seeds worse held-out loss for the warmup (and for DualAdam, the same model).
    assert all(x.startswith("+") for x in rows[("matched-warmup", "held-out loss")][0].split(", "))
    # The 4 eigenvalue estimates that stopped at the iteration cap in the raw logs are flagged, and only those.
    assert ("Top Hessian eigenvalue: 4 of 12 estimates stopped at the cap of power iterations without converging "
            "(adamw_torch seed 1, adamw_torch seed 2, dualadam-scaled seed 0, dualadam-scaled seed 2;") in text



def test_the_training_side_does_not_import_the_report():
    """watch.py owns the keys train records and the report reads: training never loads the report (nor scipy
    through its statistics), and the report's import of watch is no circle."""
    import subprocess

    probe = ("import sys; import dualadam_hf.experiments.watch; "
             "print(sorted(m for m in sys.modules if m == 'scipy' or m.endswith('experiments.report')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def variant_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- **{label}**:"))


def test_a_blend_that_outlasts_the_runs_is_said_once_next_to_its_variant(tmp_path):
    rng = random.Random(14)
    mark = {"blend_steps": 100, "max_steps": 48, "last_blend": 0.52, "inverse_scale": 1.0}
    warmup = {**mark, "inverse_scale": 0.0}
    results = [RunResult("adamw_torch", s, fake_history(rng)) for s in (0, 1)]
    # Recorded in run_done.json (one run) or in the log history (the other): either way the same note.
    results.append(RunResult.from_done("dualadam", 0, {"log_history": fake_history(rng), "blend_unfinished": mark}))
    results.append(RunResult("dualadam", 1, [{"blend_unfinished": mark, "step": 0}, *fake_history(rng)]))
    results += [RunResult("matched-warmup", s, [{"blend_unfinished": warmup, "step": 0}, *fake_history(rng)])
                for s in (0, 1)]
    plan = FakePlan(tmp_path, ("adamw_torch", "dualadam", "matched_warmup"), seeds=(0, 1))
    text = write_report(plan, results).read_text()
    note = "blend not over at the last step: r = 0.52 at step 48 of a 100-step blend"
    assert variant_line(text, "dualadam").endswith(f"— {note}") and text.count(note) == 2
    assert variant_line(text, "matched-warmup").endswith(f"— {note} (the warmup reached 0.48 of the learning rate)")
    assert "blend" not in variant_line(text, "adamw_torch")
    # The record travels with the raw logs, so a report rewritten from them says the same.
    final, _ = load_raw(tmp_path / "raw")
    plan.output_dir = tmp_path / "again"
    assert write_report(plan, final).read_text().count(note) == 2


def test_the_raw_logs_keep_each_scored_problems_answer_text(tmp_path):
    """A reviewer can tell "the same answers" from "the same correctness" from the published logs alone."""
    rng = random.Random(17)
    answers = {"adamw_torch": ["12", "-3", "7 "], "dualadam": ["12", "-4", "7"]}
    results = [RunResult.from_done(label, 0, {"log_history": fake_history(rng), "accuracy_rows": [1, 0, 1],
                                              "accuracy_answers": text}) for label, text in answers.items()]
    write_report(FakePlan(tmp_path, ("adamw_torch", "dualadam"), seeds=(0,)), results)
    saved = json.loads((tmp_path / "raw" / "final-dualadam-seed0.json").read_text())
    assert saved["accuracy_answers"] == ["12", "-4", "7"] and saved["accuracy_rows"] == [1, 0, 1]
    final, _ = load_raw(tmp_path / "raw")
    assert {r.label: r.accuracy_answers for r in final} == answers


def test_grid_rates_equal_to_6_digits_keep_their_own_files_and_columns(tmp_path):
    rng = random.Random(15)
    rates = [1e-3, 1e-3 * (1 + 1e-9), 1.2345678e-4]  # the first two are equal to 9 significant digits
    plan = FakePlan(tmp_path, seeds=(0,))
    plan.lr_grid, plan.chosen_lr = rates, {"adamw_torch": rates[1], "dualadam": rates[2]}
    grid = [RunResult(label, 1000, with_final(fake_history(rng), eval_loss=1 + k), phase="grid", lr=lr)
            for label in ("adamw_torch", "dualadam") for k, lr in enumerate(rates)]
    results = [RunResult(label, 0, fake_history(rng)) for label in ("adamw_torch", "dualadam")]
    text = write_report(plan, results, grid).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant | lr "))
    assert header == "| variant | lr 0.001 | lr 0.001000000001 | lr 0.00012345678 | chosen |"
    assert "| adamw_torch | 1.0000 | **2.0000** | 3.0000 | 0.001000000001 |" in text
    assert "| dualadam | 1.0000 | 2.0000 | **3.0000** | 0.00012345678 |" in text
    raw = tmp_path / "raw"
    assert len(list(raw.glob("grid-*.json"))) == 6
    assert (raw / f"grid-dualadam-seed1000-lr{rates[1]!r}.json").is_file()
    _, loaded = load_raw(raw)
    assert sorted((r.label, r.lr, r.summary["heldout_loss"]) for r in loaded) == sorted(
        (r.label, r.lr, r.summary["heldout_loss"]) for r in grid)
    # Files are read by content: a run under a shortened rate (rate:g) is read, and a run saved under both that
    # name and raw_file_name's is read once, from the latter.
    (raw / "grid-dualadam-seed1000-lr0.000123457.json").write_text(
        (raw / "grid-dualadam-seed1000-lr0.00012345678.json").read_text())
    old_name = raw / "grid-adamw_torch-seed1000-lr0.000123457.json"
    (raw / "grid-adamw_torch-seed1000-lr0.00012345678.json").rename(old_name)
    _, loaded = load_raw(raw)
    assert sorted((r.label, r.lr) for r in loaded) == sorted((r.label, r.lr) for r in grid)


def test_variants_with_their_own_seeds_are_shown_with_them(tmp_path):
    from dualadam_hf.experiments.compare import Plan

    rng = random.Random(16)
    variants = parse_variants([{"optim": "adamw_torch"}, {"optim": "dualadam", "seeds": 1},
                               {"optim": "invadam", "seeds": 3}])
    plan = Plan(config=Path("recipe.yaml"), variants=variants, seeds=[5, 6, 7], lr_grid=[], grid_seeds=[1000],
                select_metric="eval_loss", output_dir=tmp_path, overrides=[], sharpness=False, test_split="test",
                validation_split="validation", baselines=["adamw_torch"], recipe_digest="")
    results = [RunResult(v.label, s, fake_history(rng)) for v in variants for s in plan.seeds_of(v)]
    text = write_report(plan, results).read_text()
    assert variant_line(text, "dualadam") == "- **dualadam**: `dualadam`; its own seeds 5"
    assert variant_line(text, "adamw_torch") == "- **adamw_torch**: `adamw_torch`"
    assert variant_line(text, "invadam") == "- **invadam**: `invadam`"  # 3 seeds from 5: the comparison's own
    assert "; seeds 5, 6, 7 (variants with their own: as listed);" in text
    plan.variants = parse_variants([{"optim": "adamw_torch", "seeds": 2}, {"optim": "dualadam", "seeds": 1}])
    text = write_report(plan, [r for r in results if r.label != "invadam"]).read_text()
    assert variant_line(text, "adamw_torch").endswith("; its own seeds 5, 6") and "; seeds as listed with each" in text


def test_a_cut_off_raw_log_is_named(tmp_path):
    from dualadam_hf.experiments.report import load_raw

    (tmp_path / "final-adamw_torch-seed0.json").write_text('{"label": "adamw_torch", "seed": 0, "log_hist')
    with pytest.raises(ValueError, match="final-adamw_torch-seed0.json is not a readable raw log"):
        load_raw(tmp_path)


def share_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Inverse share of the update", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def blended_history(shares: list[float], blend_steps: int, steps: int = 6) -> list[dict]:
    """A log history whose r falls by 1/blend_steps per step, with the given share at each blended step."""
    history = []
    for step in range(1, steps + 1):
        r = max(0.0, 1 - step / blend_steps)
        history.append({"loss": 1.0, "dualadam/blend": r, "dualadam/inverse_share": shares[step - 1] if r else 0.0,
                        "step": step})
    return history + [{"eval_loss": 1.0, "step": steps}]


def test_the_inverse_share_table_says_how_large_the_inverse_part_was(tmp_path):
    """Held at strength r reads 1 in the last column, the paper's rule at LLM scale far below, no blend no row;
    steps after the blend (r = 0) are not counted."""
    held = [1 - s / 4 for s in range(1, 4)]  # share == r at steps 1-3, the blend over at step 4
    results = [RunResult("adamw_torch", s, [{"loss": 1.0, "step": 1}, {"eval_loss": 1.0, "step": 1}]) for s in (0, 1)]
    results += [RunResult("dualadam-norm", s, blended_history(held, 4)) for s in (0, 1)]
    results += [RunResult("dualadam", s, blended_history([3e-5 * (s + 1), 1e-6, 2e-7], 4)) for s in (0, 1)]
    plan = FakePlan(tmp_path, ("adamw_torch", "dualadam", "dualadam[inverse_scale=norm,label=dualadam-norm]"),
                    seeds=(0, 1))
    rows = share_rows(write_report(plan, results).read_text())
    assert "adamw_torch" not in rows
    assert rows["dualadam-norm"] == ["2", "0.750", "0.750", "3", "0.250", "0.250", "1.000"]
    runs, r1, share1, last, r_last, share_last, ratio = rows["dualadam"]
    assert (r1, share1, last, share_last) == ("0.750", "3.00e-05 to 6.00e-05", "3", "2.00e-07")
    assert ratio == f"{2e-7 / 0.25:.2e} to {6e-5 / 0.75:.2e}"


def test_the_inverse_share_of_the_first_study_from_its_raw_logs(tmp_path):
    """The figures docs/study/v1.md gives for the inverse part's size come out of the report's table."""
    results, _ = load_raw(STUDY_RAW)
    labels = ("adamw_torch", "matched_warmup", "dualadam", "dualadam_scaled")
    rows = share_rows(write_report(FakePlan(tmp_path, labels), results).read_text())
    # min rounded down, max up: the printed range holds every run's share
    assert rows["dualadam"][2] == "4.85e-05 to 6.21e-05" and rows["dualadam"][5] == "2.44e-07 to 2.73e-07"
    assert rows["matched-warmup"][-1] == "0.000"
    # the calibrated "auto" scale: the share started at r, then drifted to 12 times r
    assert rows["dualadam-scaled"][2] == "0.917" and rows["dualadam-scaled"][-1] == "0.999 to 11.811"


def mcnemar_rows(text: str, baseline: str, variant: str) -> list[list[str]]:
    """Per seed, in order: [right only for the variant, right only for the baseline, McNemar p, answers that differ]
    of ``variant`` in the McNemar table against ``baseline``."""
    section = text.split(f"## Paired differences against {baseline}", 1)[1].split("\n## ", 1)[0]
    table = section.split("McNemar p | answers that differ |", 1)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return [cells[2:] for cells in rows if cells[0] == variant]


def prespecified_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(comparison, metric): [family, mean, 95% interval, t p, Holm p, family-wise interval, detectable at 0.05/m,
    verdict]}."""
    section = text.split("## Pre-specified comparisons", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return {(cells[1], cells[2]): [cells[0], *cells[3:]] for cells in rows[1:]}


def without_timing(text: str) -> list[str]:
    """The report's lines less the one that says how long this invocation took."""
    return [line for line in text.splitlines() if not line.startswith("- Training time of all runs")]


def test_the_published_study_is_what_its_raw_logs_give(tmp_path):
    """docs/study/report.md is rewritten, table for table, from docs/study/raw and the recipe's plan: the grid
    chooses the published rates, and every paired interval, McNemar test and share cited in the docs follows."""
    from dualadam_hf.experiments.compare import choose_rates, make_plan

    results, grid = load_raw(STUDY / "raw")
    assert len(grid) == 48 and len(results) == 46
    plan = make_plan(RECIPE_V2, output_dir=tmp_path)
    plan.chosen_lr = choose_rates(plan, grid)
    text = write_report(plan, results, grid, baselines=plan.baselines).read_text()
    assert without_timing(text) == without_timing((STUDY / "report.md").read_text())
    # The figures docs/study.md and the README cite.
    rows = differences_rows(text)
    assert rows[("dualadam", "held-out accuracy")][1:3] == ["-0.0264", "[-0.0474, -0.0054]"]
    assert rows[("dualadam-paper-rate", "held-out accuracy")][1:3] == ["-0.0712", "[-0.1059, -0.0365]"]
    assert rows[("dualadam-norm", "held-out accuracy")][1:4] == ["-0.0072", "[-0.0211, +0.0067]", "1"]
    assert rows[("dualadam", "held-out loss")][1:3] == ["+0.01403", "[-0.01427, +0.04232]"]
    assert rows[("dualadam-paper-rate", "held-out loss")][1:3] == ["+0.07131", "[+0.04374, +0.09889]"]
    assert rows[("dualadam-norm", "held-out loss")][1:3] == ["+0.00909", "[-0.01913, +0.03731]"]
    warmup = differences_rows(text, "dualadam")[("matched-warmup", "held-out accuracy")]
    assert warmup[0] == "+0.0000, +0.0000, +0.0000"
    shares = share_rows(text)
    assert shares["dualadam"][2] == "4.88e-05 to 7.04e-05" and shares["dualadam"][5] == "2.27e-07 to 2.75e-07"
    assert shares["dualadam-paper-rate"][2] == "4.39e-04 to 6.33e-04"
    assert shares["dualadam-paper-rate"][3:6] == ["48", "0.520", "1.08e-06 to 1.41e-06"]
    # The six primary tests, Holm-corrected: only the paper rate's two survive.
    planned = prespecified_rows(text)
    assert planned[("dualadam − adamw_torch", "held-out accuracy")] == [
        "primary", "-0.0264", "[-0.0474, -0.0054]", "0.0191", "0.0763", "[-0.0576, +0.0048]", "0.0402",
        "no difference shown"]
    assert [planned[("dualadam-paper-rate − adamw_torch", m)][4:] for m in ("held-out loss", "held-out accuracy")] == [
        ["0.00146", "[+0.03031, +0.11232]", "0.05285", "worse"], ["0.00605", "[-0.1228, -0.0196]", "0.0665", "worse"]]
    # The blends and their matched warmups gave the same answer text to every problem in seeds 0-2.
    for blend, warmup in (("dualadam", "matched-warmup"), ("dualadam-paper-rate", "matched-warmup-paper-rate")):
        assert [row[2:] for row in mcnemar_rows(text, blend, warmup)] == [["1", "0"]] * 3
    assert [row[-1] for row in planned.values() if row[0] == "primary"].count("no difference shown") == 4
    assert "- **primary**: every variant but the matched warmups against adamw_torch" in text
    # The run resumed after training, and the estimates that used every allowed power iteration.
    assert "Evaluated from a finished checkpoint: dualadam-paper-rate seed 5. " in text
    assert "25 of 46 estimates stopped at the cap" in text and "and 8 more met the tolerance only at that" in text


def test_the_published_first_study_is_what_its_raw_logs_give(tmp_path):
    """docs/study/v1/report.md is rewritten from its raw logs, its recipe's plan and its second baseline, the
    matched warmup (the command docs/study/v1.md gives)."""
    from dualadam_hf.experiments.compare import choose_rates, make_plan

    results, grid = load_raw(STUDY_RAW)
    plan = make_plan(ROOT / "recipes" / "smollm2_chainsum_study.yaml", output_dir=tmp_path)
    plan.chosen_lr = choose_rates(plan, grid)
    text = write_report(plan, results, grid, baselines=["matched-warmup"]).read_text()
    assert without_timing(text) == without_timing((STUDY / "v1" / "report.md").read_text())
    assert "| adamw_torch | 3 | 0.5273 ± 0.0093 | 0.473 ± 0.022 | 0.3611 ± 0.0767 |" in text
    assert differences_rows(text)[("dualadam", "held-out accuracy")][1:3] == ["-0.0120", "[-0.0725, +0.0485]"]
    assert [row[2:] for row in mcnemar_rows(text, "matched-warmup", "dualadam")] == [["1", "-"]] * 3


def test_the_published_lowbit_study_is_what_its_raw_logs_give(tmp_path):
    """docs/study/lowbit/report.md is rewritten from its raw logs and the recipe's plan, and the figures
    docs/study/lowbit.md cites come out of it."""
    from dualadam_hf.experiments.compare import make_plan

    results, grid = load_raw(LOWBIT / "raw")
    assert not grid and len(results) == 25 and all(r.ok for r in results)
    plan = make_plan(RECIPE_LOWBIT, output_dir=tmp_path)
    text = write_report(plan, results, baselines=plan.baselines).read_text()
    assert without_timing(text) == without_timing((LOWBIT / "report.md").read_text())
    planned = prespecified_rows(text)
    assert {key for key, row in planned.items() if row[0] == "low-bit"} == {
        (f"{low} − {twin}", metric) for low, twin in (("dualadam_8bit", "dualadam"), ("dualadam_4bit", "dualadam"),
                                                      ("adamw_torch_8bit", "adamw_torch"))
        for metric in ("held-out loss", "held-out accuracy")}
    assert all(row[-1] == "no difference shown" for row in planned.values())
    twin = differences_rows(text, "dualadam")
    assert twin[("dualadam_8bit", "held-out accuracy")][1:3] == ["-0.0032", "[-0.0106, +0.0042]"]
    assert twin[("dualadam_8bit", "held-out loss")][1:3] == ["+0.00442", "[-0.00392, +0.01275]"]
    assert twin[("dualadam_4bit", "held-out accuracy")][1:3] == ["+0.0240", "[-0.0161, +0.0641]"]
    assert twin[("dualadam_4bit", "held-out loss")][1:3] == ["-0.06259", "[-0.13049, +0.00530]"]
    assert [twin[(v, m)][-1] for v in ("dualadam_8bit", "dualadam_4bit") for m in ("held-out loss", "held-out accuracy")
            ] == ["0.01129", "0.0100", "0.09197", "0.0542"]
    adamw = differences_rows(text)[("adamw_torch_8bit", "held-out accuracy")]
    assert adamw[1:3] == ["-8.00e-04", "[-0.0050, +0.0034]"] and adamw[-1] == "0.0056"
    assert planned[("dualadam − adamw_torch", "held-out accuracy")][3:] == [
        "0.0446", "0.0892", "[-0.0655, +0.0063]", "0.0470", "no difference shown"]
    # What the 6 corrected low-bit tests can resolve (80% power at 0.05/6), beside the uncorrected 0.0100 / 0.01129.
    assert [planned[("dualadam_8bit − dualadam", m)][-2] for m in ("held-out accuracy", "held-out loss")] == [
        "0.0164", "0.01851"]
    # Per seed, McNemar's discordant problems and the problems whose answer texts differ: not the same count.
    eight, four = (mcnemar_rows(text, "dualadam", v) for v in ("dualadam_8bit", "dualadam_4bit"))
    assert [int(r[0]) + int(r[1]) for r in eight] == [3, 3, 2, 3, 3] and [r[3] for r in eight] == [
        "5", "10", "6", "11", "5"]
    assert [int(r[0]) + int(r[1]) for r in four] == [39, 51, 34, 51, 35] and [r[3] for r in four] == [
        "105", "124", "140", "109", "117"]
    peaks = {variant: row["peak memory (MiB)"][0] for variant, row in parse_table(text).items()}
    assert peaks == {"adamw_torch": 3536, "dualadam": 3552, "dualadam_8bit": 2856, "dualadam_4bit": 2982,
                     "adamw_torch_8bit": 3236}


def outcome_history(rng: random.Random, loss: float, accuracy: float, **extra: float) -> list[dict]:
    return with_final(fake_history(rng), eval_loss=loss, eval_accuracy=accuracy, **extra)


def test_pre_specified_families_are_holm_corrected_and_the_verdicts_follow(tmp_path):
    """Primary: every variant but the matched warmups against the first, on held-out loss and accuracy; control:
    each matched warmup against its blend. A primary difference whose 95% interval excludes 0 is no finding when
    its Holm p is above 0.05; other pairs and metrics are marked exploratory."""
    from dualadam_hf.experiments.report import families

    labels = ("adamw_torch", "dualadam", "dualadam[switch_rate=0.01,label=dualadam-paper-rate]", "matched_warmup",
              "dualadam[inverse_scale=norm,label=dualadam-norm]")
    plan = FakePlan(tmp_path, labels, seeds=range(6))
    found = {f.name: f.pairs for f in families(plan.variants, "adamw_torch")}
    assert found == {"primary": (("dualadam", "adamw_torch"), ("dualadam-paper-rate", "adamw_torch"),
                                 ("dualadam-norm", "adamw_torch")),
                     "control": (("matched-warmup", "dualadam"),)}
    rng = random.Random(21)
    # dualadam - adamw_torch in accuracy: mean -0.02, sd 0.0141 over 6 seeds: paired t p = 0.018, the 3rd smallest
    # of the 6 primary p-values, so Holm multiplies it by 4: 0.072.
    drop = [-0.02, -0.03, -0.01, -0.04, -0.02, 0.0]
    results = []
    for seed in range(6):
        base = 0.5 + 0.01 * seed
        loss = {label: 1 + rng.uniform(0, 0.1) for label in ("adamw_torch", "dualadam", "dualadam-norm")}
        results += [RunResult("adamw_torch", seed, outcome_history(rng, loss["adamw_torch"], base)),
                    RunResult("dualadam", seed, outcome_history(rng, loss["dualadam"], base + drop[seed])),
                    RunResult("dualadam-paper-rate", seed, outcome_history(rng, 2 + rng.uniform(0, 0.01),
                                                                           base - 0.2 + rng.uniform(0, 0.01))),
                    RunResult("matched-warmup", seed, outcome_history(rng, loss["dualadam"] + rng.uniform(0, 1e-6),
                                                                      base + drop[seed])),
                    RunResult("dualadam-norm", seed, outcome_history(rng, loss["dualadam-norm"],
                                                                     base + rng.uniform(-0.01, 0.01)))]
    text = write_report(plan, results).read_text()
    planned = prespecified_rows(text)
    accuracy = planned[("dualadam − adamw_torch", "held-out accuracy")]
    p = scipy_t_p(drop)
    assert accuracy[3] == f"{p:.3g}" and float(accuracy[4]) == pytest.approx(4 * p, rel=1e-3)
    assert accuracy[-1] == "no difference shown"
    low, high = (float(x) for x in accuracy[2].strip("[]").split(", "))
    assert high < 0  # the uncorrected interval excludes 0
    assert [row[-1] for key, row in planned.items() if key[0].startswith("dualadam-paper-rate")] == ["worse", "worse"]
    assert planned[("matched-warmup − dualadam", "held-out accuracy")][-1].startswith("no test: all 6 differences")
    assert ("- dualadam − adamw_torch, held-out accuracy: Holm p = " in text
            and "over the 6 primary tests: no difference shown after the correction" in text)
    assert "- dualadam − adamw_torch, final train loss (exploratory): " in text
    assert "- matched-warmup − adamw_torch, held-out accuracy (exploratory): " in text
    # The control pair has its own family (here its one test with a p), whether or not a section prints the pair.
    assert planned[("matched-warmup − dualadam", "held-out loss")][0] == "control"
    assert "- **control**: each matched warmup against its blend" in text and "(matched-warmup − dualadam)" in text


def scipy_t_p(differences: list[float]) -> float:
    from scipy import stats as scipy_stats

    return float(scipy_stats.ttest_1samp(differences, 0.0).pvalue)


def sharpness_entry(iterations: int, converged: int) -> dict:
    return {"sharpness/top_eigenvalue": 10.0 + iterations + converged, "sharpness/eigenvalue_iterations": iterations,
            "sharpness/eigenvalue_converged": converged, "step": 4}


def test_estimates_that_used_every_allowed_iteration_are_flagged_and_not_compared(tmp_path):
    rng = random.Random(22)
    marks = {("adamw_torch", 0): (8, 0), ("adamw_torch", 1): (8, 1), ("dualadam", 0): (5, 1), ("dualadam", 1): (8, 1)}
    results = [RunResult(label, seed, [*fake_history(rng), sharpness_entry(*mark)]) for (label, seed), mark in
               marks.items()]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert ("Top Hessian eigenvalue: 1 of 4 estimates stopped at the cap of power iterations without converging "
            "(adamw_torch seed 0; `sharpness/eigenvalue_converged` 0 in their logs), and 2 more met the tolerance "
            "only at that last allowed iteration (adamw_torch seed 1, dualadam seed 1; "
            "`sharpness/eigenvalue_iterations` 8)") in text
    assert ("- dualadam − adamw_torch, top Hessian eigenvalue (exploratory): 3 of its 4 estimates used every "
            "allowed power iteration: too coarse to compare, no verdict.") in text
    # With no estimate at the cap the cap is not known: nothing is flagged.
    results = [RunResult(label, seed, [*fake_history(rng), sharpness_entry(8, 1)]) for label, seed in marks]
    assert "Top Hessian eigenvalue:" not in write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()


def test_a_run_evaluated_from_its_finished_checkpoint_is_said_and_wall_time_is_no_speed(tmp_path):
    """A run resumed after its training had ended trains nothing in its last process: no train_runtime entry,
    its peak memory partly the checkpoint's record. The report names it beside the memory and time columns."""
    rng = random.Random(23)
    results = [RunResult(label, seed, fake_history(rng)) for label in ("adamw_torch", "dualadam") for seed in (0, 1)]
    results[3] = RunResult("dualadam", 1, [e for e in fake_history(rng) if "train_runtime" not in e])
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert "Evaluated from a finished checkpoint: dualadam seed 1. Each was resumed after its training" in text
    assert text.count("Evaluated from a finished checkpoint") == 1
    assert "not a measurement of the optimizers' speed" in text


def test_an_all_failed_report_has_one_column_per_separator_and_never_calls_a_failure_diverged(tmp_path):
    results = [RunResult(label, seed, [], ok=False, error="exit code 1") for label in ("adamw_torch", "dualadam")
               for seed in (0, 1)]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    table = [line for line in text.split("## Results", 1)[1].splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table  # header, separator and rows: as many columns
    assert "No paired differences: adamw_torch failed at every seed." in text
    assert "diverg" not in text.split("## Paired differences", 1)[1].split("- **failed**", 1)[0]


def test_a_variant_that_diverged_at_every_seed_is_said_so_not_seeds_none(tmp_path):
    rng = random.Random(21)
    nan = [{**e, "grad_norm": math.nan} if "grad_norm" in e else e for e in fake_history(rng)]
    results = [RunResult("adamw_torch", s, fake_history(rng)) for s in (0, 1)] + [
        RunResult("dualadam", s, nan) for s in (0, 1)]
    text = write_report(FakePlan(tmp_path, seeds=(0, 1)), results).read_text()
    assert "Variants ran different seeds: adamw_torch 0, 1; dualadam diverged at every seed." in text
    assert "none" not in text.split("Variants ran different seeds", 1)[1].split("\n", 1)[0]


def test_the_grid_says_when_rates_tie_and_which_variant_had_no_safe_rate(tmp_path):
    plan = FakePlan(tmp_path, ("adamw_torch", "dualadam", "invadam"), seeds=(0,))
    plan.lr_grid, plan.chosen_lr = [1e-3, 3e-3], {"adamw_torch": 1e-3, "dualadam": 1e-3}
    flat = [{"loss": 1.0, "step": 1}, {"eval_loss": 0.5, "step": 1}]
    grid = [RunResult("adamw_torch", 1000, flat, phase="grid", lr=lr) for lr in plan.lr_grid]  # every rate ties
    grid += [RunResult("dualadam", 1000, with_final(flat, eval_loss=0.5 + lr), phase="grid", lr=lr)
             for lr in plan.lr_grid]
    grid += [RunResult("invadam", 1000, flat, phase="grid", lr=1e-3, diverged={"step": 1}),
             RunResult("invadam", 1000, [], ok=False, error="exit code 1", phase="grid", lr=3e-3)]
    results = [RunResult(label, 0, flat) for label in ("adamw_torch", "dualadam")]
    text = write_report(plan, results, grid).read_text()
    assert "| adamw_torch | **0.5000** | 0.5000 | 0.001 (every rate ties: the smallest is chosen) |" in text
    assert "| dualadam | **0.5010** | 0.5030 | 0.001 |" in text
    assert "| invadam | diverged | failed | none: diverged or failed at every rate |" in text
    assert "invadam ran no seeds: it diverged or failed at every rate of the learning-rate grid" in text


def test_a_full_disk_while_writing_the_report_names_the_report_and_keeps_the_old_one(tmp_path, monkeypatch):
    from dualadam_hf.experiments import report

    rng = random.Random(22)
    results = [RunResult(label, 0, fake_history(rng)) for label in ("adamw_torch", "dualadam")]
    (tmp_path / "report.md").write_text("the previous report\n")
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == ".report.md.tmp":
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError) as error:
        report.write_report(FakePlan(tmp_path, seeds=(0,)), results)
    assert (error.value.filename, error.value.strerror) == (str(tmp_path / "report.md"), "No space left on device")
    assert (tmp_path / "report.md").read_text() == "the previous report\n"


def test_each_low_bit_variant_is_tested_against_its_full_precision_twin(tmp_path):
    """Low-bit: dualadam_8bit/4bit against dualadam and adamw_torch_8bit against adamw_torch, with the same
    optim_args; a low-bit variant without such a twin is compared with the baseline as any other variant."""
    from dualadam_hf.experiments.report import families

    labels = ("adamw_torch", "dualadam[blend_fraction=0.25,label=dual]", "dualadam_8bit[blend_fraction=0.25,label=d8]",
              "dualadam_4bit[blend_fraction=0.25,block_size=128,label=d4]", "adamw_torch_8bit",
              "dualadam_4bit[blend_fraction=0.5,label=odd]")
    plan = FakePlan(tmp_path, labels, seeds=range(3))
    found = {f.name: f.pairs for f in families(plan.variants, "adamw_torch")}
    # block_size lays out the quantized state only: d4 is still dual's twin.
    assert found == {"primary": (("dual", "adamw_torch"), ("odd", "adamw_torch")),
                     "low-bit": (("d8", "dual"), ("d4", "dual"), ("adamw_torch_8bit", "adamw_torch"))}
