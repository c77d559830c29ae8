"""Installing dualadam-hf into an environment that already has the newest Hugging Face stack changes none of it.

Users add dualadam-hf to an existing training environment (their own, LLaMA-Factory's, axolotl's). If its
requirements excluded the latest torch/transformers/TRL/PEFT/accelerate/datasets (say an upper cap that a new
release passes), pip would silently downgrade them. This test builds a fresh venv with torch and the newest
releases of the rest, then asks pip what `pip install <repo>` would do (`--dry-run --report`, nothing is
installed) and fails if any of those packages would be installed, i.e. changed.

Needs PyPI: skipped only when the package index cannot be reached. pip's cache is reused between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUARDED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
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


@pytest.mark.slow
def test_install_into_newest_stack_changes_none_of_it(tmp_path):
    reachable, where = _index_reachable()
    if not reachable:
        pytest.skip(f"the package index is unreachable ({where}); this test needs it")
    started = time.monotonic()

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip"]
    # torch first and pinned: an unpinned torch could resolve to a multi-GB CUDA build.
    _run([*pip, "install", "-q", f"torch=={_torch_version()}"])
    # The newest release of each, plus the build backend so the dry run can read the project's metadata offline.
    _run([*pip, "install", "-q", "--upgrade", f"torch=={_torch_version()}", *GUARDED[1:], "pyyaml", "hatchling"])
    before = _freeze(python)
    (tmp_path / "freeze-before.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(before.items())))

    report_path = tmp_path / "report.json"
    _run([*pip, "install", "--dry-run", "--no-build-isolation", "--report", str(report_path), str(REPO)], cwd=tmp_path)
    report = json.loads(report_path.read_text())
    would_install = {_normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}

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
