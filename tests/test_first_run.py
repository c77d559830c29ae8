"""A first run from a fresh clone explains itself: the README's code runs as pasted, the command answers --help
without the heavy stack, sets OMP_WAIT_POLICY before torch loads, says what a long first step does, and the
suite keeps its builds and processes to itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    TORCH_EXTENSIONS_DIR,
    claim_extensions_dir,
    end_group,
    run_in_own_group,
    start_in_own_group,
)

README = (REPO / "README.md").read_text()
HEAVY = ("torch", "transformers", "trl", "datasets", "peft")


def readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def python(code: str, *, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


# --- the README ----------------------------------------------------------------------------------------------


def test_the_readme_optimizer_example_runs_as_pasted(tmp_path):
    (code,) = re.findall(r"```python\n(.*?)```", readme_section("The optimizer"), re.S)[:1]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"step \d+: loss \d+\.\d+\n", result.stdout), result.stdout


def test_the_readme_says_where_the_cpu_build_of_torch_comes_from():
    section = readme_section("Two commands")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in section
    assert "on idle cores" in section and "several-fold when other jobs share the cores" in section


# --- the command -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "allowed"), [
    (["--help"], ()), ([], ()), (["--version"], ()), (["train", "--help"], ()), (["compare", "--help"], ()),
])
def test_usage_loads_no_heavy_library(argv, allowed):
    result = python(f"""
        import json, sys
        from dualadam_hf.experiments.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dualadam-hf") or result.stdout.startswith("dualadam-hf "), result.stdout
    assert set(json.loads(result.stdout.splitlines()[-1])) <= set(allowed)


def test_the_command_sets_omp_wait_policy_before_torch_loads_and_says_so():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the value torch's import finds is what counts."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = python("""
        import importlib.abc, os, sys

        found = []

        class TorchImport(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not found:
                    found.append(os.environ.get("OMP_WAIT_POLICY"))

        sys.meta_path.insert(0, TorchImport())
        from dualadam_hf.experiments.cli import main  # as the console script does

        code = main(["train", "--config", "no-such-recipe.yaml"])
        import torch  # noqa: F401 (if the command had not loaded it)
        print(code, found[0])
    """, env=env)
    assert result.stdout.split() == ["2", "PASSIVE"], result.stdout + result.stderr
    assert len([line for line in result.stderr.splitlines() if "OMP_WAIT_POLICY=PASSIVE" in line]) == 1, result.stderr


def test_a_wait_policy_the_user_chose_is_kept_without_a_word(monkeypatch, capsys, tmp_path):
    from dualadam_hf.experiments.cli import main

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_WAIT_POLICY" not in capsys.readouterr().err


def test_the_first_use_of_smollm2_says_what_it_converts_before_it_starts(tmp_path, monkeypatch, capsys):
    from dualadam_hf.experiments import smollm2

    printed_before = []

    def convert(gguf_dir: Path, out_dir: Path) -> None:
        printed_before.append(capsys.readouterr().err)
        (out_dir / "config.json").write_text("{}")
        (out_dir / smollm2._MARKER).write_text("{}")

    monkeypatch.setattr(smollm2, "_gguf_folder", lambda: tmp_path)
    monkeypatch.setattr(smollm2, "_convert", convert)
    folder = smollm2.smollm2_path(str(tmp_path / "cache"))
    (line,) = printed_before[0].splitlines()
    assert "converting SmolLM2-135M-Instruct" in line and "about 2 minutes" in line, line
    assert smollm2.smollm2_path(str(tmp_path / "cache")) == folder  # converted: found, without a word
    assert capsys.readouterr().err == ""


def test_a_recipe_that_names_no_checkpointing_parses_without_a_deprecation_warning():
    """TRL's SFTConfig defaults the deprecated `gradient_checkpointing`; the harness gives TRL's default under
    the current name, so a recipe that names neither gets the same run and no FutureWarning."""
    from dualadam_hf.experiments.arguments import load_experiment

    recipe = REPO / "recipes" / "smollm2_chainsum_lora.yaml"
    assert "checkpointing" not in recipe.read_text()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        training = load_experiment(recipe).training
    assert training.activation_checkpointing is True and training.gradient_checkpointing is True
    # The old name, written by the user, is theirs to change: its warning stays, and so does its value.
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):
        training = load_experiment(recipe, ["--gradient_checkpointing", "false"]).training
    assert training.activation_checkpointing is False


# --- the test suite's own builds and processes ----------------------------------------------------------------


def test_the_suite_builds_torch_extensions_in_a_folder_of_its_own():
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    assert folder is not None, "tests/conftest.py sets TORCH_EXTENSIONS_DIR"
    if folder != str(TORCH_EXTENSIONS_DIR):
        pytest.skip(f"TORCH_EXTENSIONS_DIR={folder} was set before the session: the user's choice")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(TORCH_EXTENSIONS_DIR)], cwd=REPO)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{TORCH_EXTENSIONS_DIR} is not ignored by git"


HOLD_SESSION = """
import sys, time
from pathlib import Path
from tests.helpers import claim_extensions_dir
claim = claim_extensions_dir(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(120)
"""


def test_a_build_lock_is_removed_only_where_no_other_session_can_hold_it(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    other = subprocess.Popen([sys.executable, "-c", HOLD_SESSION, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline() == "holding\n"
        lock.parent.mkdir()
        lock.touch()  # another session's build in progress
        claim_extensions_dir(tmp_path).close()
        assert lock.exists()
    finally:
        other.kill()
        other.wait()
    # That session is gone: its build can no longer be running, and torch would wait on its lock for good.
    claim_extensions_dir(tmp_path).close()
    assert not lock.exists()


LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(rank.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


def alive(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` still runs ``within`` seconds from now (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_launch_that_ends_leaves_none_of_its_processes(tmp_path):
    output = tmp_path / "launcher.out"
    with output.open("w") as out:
        assert run_in_own_group([sys.executable, "-c", LAUNCHER, "0"], timeout=120, stdout=out) == 0
    assert not alive(int(output.read_text()))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_launch_stopped_early_takes_its_processes_with_it():
    launcher = start_in_own_group([sys.executable, "-c", LAUNCHER, "120"], stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    end_group(launcher)
    assert not alive(rank)
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_own_group([sys.executable, "-c", "import time; time.sleep(120)"], timeout=1)
