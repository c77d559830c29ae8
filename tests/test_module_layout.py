"""One owner for each fact and no import circles: the startup hook and the package, the recipe modules, the
settings parser the experiments share with the optimizer's integration, and the shared test helpers."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "dualadam_hf"
HOOK = "_dualadam_hf_autoregister"


def imports_of(path: Path) -> set[str]:
    """The modules a file imports, relative imports resolved against its package (``from . import x`` gives
    both the package and ``package.x``)."""
    package = list(path.relative_to(REPO).parent.parts)  # an __init__.py's package is its own folder too
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_never_imports_its_startup_hook_and_the_hook_alone_names_its_opt_out():
    importers = [str(p.relative_to(REPO)) for p in package_files() if HOOK in imports_of(p)]
    assert importers == [], f"the hook imports the package, never the reverse: {importers}"
    hook = sys.modules.get(HOOK) or __import__(HOOK)
    naming = [str(p.relative_to(REPO)) for p in package_files() if hook.OPT_OUT_VARIABLE in p.read_text()]
    assert naming == [], f"{hook.OPT_OUT_VARIABLE} is named in {naming}; it belongs to {HOOK}.py"


def test_the_layout_error_names_the_opt_out_of_the_hook_that_runs(monkeypatch):
    from dualadam_hf.integrations.optim_args import OPTIMIZER_NAMES
    from dualadam_hf.integrations.transformers import TransformersLayoutError, patch_training_args

    monkeypatch.setitem(sys.modules, HOOK, types.SimpleNamespace(OPT_OUT_VARIABLE="HOOK_OFF"))
    with pytest.raises(TransformersLayoutError) as error:
        patch_training_args(types.ModuleType("transformers.training_args"))
    assert "set HOOK_OFF=1 to turn the startup hook off" in str(error.value)
    assert f"--optim {'/'.join(OPTIMIZER_NAMES)} " in str(error.value)  # every name, as registered
    monkeypatch.delitem(sys.modules, HOOK)  # no hook ran in this process: nothing to turn off
    with pytest.raises(TransformersLayoutError) as error:
        patch_training_args(types.ModuleType("transformers.training_args"))
    assert "startup hook" not in str(error.value)


def test_recipe_error_has_one_home_below_the_recipe_parser():
    from dualadam_hf.experiments import RecipeError, arguments, recipe_file

    assert arguments.RecipeError is recipe_file.RecipeError is RecipeError
    assert recipe_file.RecipeError.__module__ == recipe_file.__name__
    own = {name for name in imports_of(PACKAGE / "experiments" / "recipe_file.py") if name.startswith("dualadam_hf")}
    assert own == set(), f"recipe_file.py imports {own}: arguments.py imports it, so it must not import back"


def test_generated_task_settings_parse_without_the_optimizer_integration():
    assert not any(name.startswith("dualadam_hf.integrations") for name in
                   imports_of(PACKAGE / "experiments" / "tasks.py"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from dualadam_hf.experiments.tasks import parse_config
        assert parse_config("items=3, flag=true") == {"items": 3, "flag": True}
        print(sorted(name for name in ("torch", "dualadam_hf.integrations.optim_args") if name in sys.modules))
    """)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_test_modules_share_helpers_only_through_tests_helpers():
    """A test module imported by another runs its imports (and pytest its fixtures) a second time, and its
    helpers change with its tests: shared helpers live in tests/helpers.py."""
    offenders = {}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if found := sorted(name for name in imports_of(path) if name.split(".")[-1].startswith("test_")
                           and name.startswith("tests.") and name.count(".") == 1):
            offenders[path.name] = found
    assert offenders == {}
