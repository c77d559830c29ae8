"""The suite's pilot, as docs/study/suite.md publishes it: its table is rebuilt from the kept raw logs, and the
logs show the runs read validation splits only, with the settings the page states."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PILOT = ROOT / "docs" / "study" / "suite" / "pilot"


def _table_script():
    spec = importlib.util.spec_from_file_location("suite_pilot_table", ROOT / "scripts" / "suite_pilot_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_pilot_table_is_rebuilt_from_the_raw_logs():
    script = _table_script()
    rows = script.rows(PILOT)
    assert len(rows) >= 6
    assert script.table(rows) in (ROOT / "docs" / "study" / "suite.md").read_text()


def test_the_pilot_read_validation_splits_only_with_the_stated_settings():
    runs = sorted(PILOT.glob("*.json"))
    assert runs
    for path in runs:
        run = json.loads(path.read_text())
        settings = run["run_manifest"]["inputs"]["settings"]
        assert settings["dataset_test_split"] == "validation", path.name
        assert len(run["accuracy_rows"]) == settings["accuracy_size"] == 100, path.name
        assert settings["optim"] == "adamw_torch" and settings["use_peft"], path.name
        before = path.name.endswith("-before.json")
        assert (settings["max_steps"], settings["learning_rate"]) == ((1, 0.0) if before else (48, 3e-4)), path.name


def test_the_suite_recipe_runs_the_six_tasks_the_pilot_moved_most():
    """The recipe's tasks, data settings included, are the pilot's six largest gains in validation accuracy."""
    import yaml

    rows = _table_script().rows(PILOT)
    chosen = sorted(rows, key=lambda r: r["after"] - r["before"], reverse=True)[:6]
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2_suite_lora.yaml").read_text())
    tasks = {(t["dataset_name"], t.get("dataset_config") or "") for t in recipe["compare"]["tasks"]}
    assert tasks == {(r["generator"], r["settings"]) for r in chosen}
