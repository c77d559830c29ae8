"""`dualadam-hf compare`: the report's table holds exactly what the runs logged, and the plots exist."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from dualadam_hf.cli import main
from dualadam_hf.recipes.compare import RunSpec, parse_optims, train_command
from dualadam_hf.recipes.config import RecipeError
from dualadam_hf.recipes.report import METRICS, RunResult, markdown_table, write_report

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml"


def parse_table(markdown: str) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{optimizer: {column header: (mean, std or None)}} from the report's Markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        row = {}
        for header, cell in zip(headers[2:], cells[2:], strict=True):
            mean, _, std = cell.partition(" ± ")
            row[header] = (float(mean), float(std) if std else None)
        table[cells[0]] = row
    return table


def assert_cell_matches(cell: tuple[float, float | None], values: list[float], digits: int) -> None:
    tolerance = 0.51 * 10**-digits  # the table rounds to `digits` decimals
    assert cell[0] == pytest.approx(statistics.fmean(values), abs=tolerance)
    if len(values) > 1:
        assert cell[1] == pytest.approx(statistics.stdev(values), abs=tolerance)
    else:
        assert cell[1] is None


def fake_history(rng: random.Random, steps: int = 4) -> list[dict]:
    history = [{"loss": rng.uniform(1, 3), "step": s} for s in range(1, steps + 1)]
    history += [{"eval_loss": rng.uniform(1, 3), "step": s} for s in (2, steps)]
    history.append({"train_runtime": rng.uniform(5, 9), "train_loss": 2.0, "step": steps})
    history.append({"peak_memory_mb": rng.uniform(500, 900), "eval_accuracy": rng.random(), "step": steps})
    return history


def test_report_table_is_mean_and_std_of_the_last_logged_values(tmp_path):
    rng = random.Random(0)
    results = [RunResult(optim, seed, fake_history(rng)) for optim in ("adamw_torch", "dualadam") for seed in (0, 1, 2)]
    results.append(RunResult("dualadam", 3, [], ok=False, error="exit code 1"))
    report = write_report(tmp_path, results, title="t")
    text = report.read_text()
    table = parse_table(text)
    assert set(table) == {"adamw_torch", "dualadam"}
    headers = {name: (key, header, digits) for name, key, header, digits in METRICS}
    assert headers["sharpness"][1] not in table["dualadam"]  # nobody logged sharpness: no column
    for optim, row in table.items():
        runs = [r for r in results if r.optim == optim and r.ok]
        for name in ("heldout_loss", "heldout_accuracy", "final_train_loss", "wall_time_s", "peak_memory_mb"):
            key, header, digits = headers[name]
            last = [[e[key] for e in r.log_history if key in e][-1] for r in runs]
            assert_cell_matches(row[header], last, digits)
    assert "**failed**: dualadam seed 3: exit code 1" in text
    assert (tmp_path / "train_loss.png").stat().st_size > 1000 and (tmp_path / "eval_loss.png").is_file()
    assert "![Train loss](train_loss.png)" in text
    saved = json.loads((tmp_path / "runs" / "dualadam-seed1.json").read_text())
    assert saved["log_history"] == results[4].log_history and saved["summary"] == results[4].summary


def test_single_seed_cells_have_no_std():
    rng = random.Random(1)
    table = parse_table(markdown_table([RunResult("sgd", 0, fake_history(rng))]))
    assert all(std is None for _, std in table["sgd"].values())


def test_optims_are_checked_before_any_run():
    assert parse_optims("adamw_torch, dualadam") == ["adamw_torch", "dualadam"]
    with pytest.raises(RecipeError, match="unknown optimizer 'adamm'"):
        parse_optims("adamw_torch,adamm")
    with pytest.raises(RecipeError, match="twice"):
        parse_optims("dualadam,dualadam")


def test_each_run_gets_its_own_optim_seed_and_folder_after_the_overrides(tmp_path):
    spec = RunSpec("dualadam", 4, tmp_path / "dualadam-seed4")
    command = train_command("r.yaml", spec, ["--max_steps", "3"], sharpness=False, launcher="accelerate launch")
    assert command[:4] == ["accelerate", "launch", "-m", "dualadam_hf.cli"]
    text = " ".join(command)
    assert text.index("--max_steps 3") < text.index("--optim dualadam --seed 4")
    assert f"--output_dir {tmp_path / 'dualadam-seed4'}" in text and "--sharpness false" in text


def test_compare_refuses_overrides_it_sets_itself(tmp_path, capsys):
    code = main(["compare", "--config", str(DEFAULT_RECIPE), "--output_dir", str(tmp_path), "--seed", "3"])
    assert code == 2
    assert "--seed is set by compare for each run" in capsys.readouterr().err


def test_compare_checks_the_model_before_the_first_run(tmp_path, capsys):
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--output_dir", str(tmp_path / "c"),
            "--model_name_or_path", str(tmp_path / "missing")]
    assert main(argv) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    """2 optimizers x 2 seeds of the default recipe (smoke sizes, tiny model, real math data, sharpness on)."""
    out = tmp_path / "compare"
    argv = ["compare", "--config", str(DEFAULT_RECIPE), "--smoke", "--optims", "adamw_torch,dualadam",
            "--seeds", "2", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(": done in ") == 4  # one line per finished run
    text = (out / "report.md").read_text()
    table = parse_table(text)
    assert set(table) == {"adamw_torch", "dualadam"}
    for optim in table:
        states = [json.loads((out / "runs" / f"{optim}-seed{s}" / "trainer_state.json").read_text()) for s in (0, 1)]
        assert all(s["global_step"] == 2 for s in states)
        for _, key, header, digits in METRICS:
            last = [[e[key] for e in s["log_history"] if key in e][-1] for s in states]
            assert_cell_matches(table[optim][header], last, digits)
        raw = json.loads((out / "runs" / f"{optim}-seed1.json").read_text())
        assert raw["log_history"] == states[1]["log_history"]
    assert (out / "train_loss.png").is_file() and (out / "eval_loss.png").is_file()
    # Finished runs are reused, so an interrupted comparison resumes instead of starting over.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already finished") == 4
    # ... but not for a different command, whose results would be mixed up with the old ones.
    assert main(argv + ["--learning_rate", "0.1"]) == 2
    assert "holds a run of a different command" in capsys.readouterr().err
