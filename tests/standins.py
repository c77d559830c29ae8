"""Fresh interpreters and stand-in `transformers` packages, for tests of what the startup hook does at import.

The hook acts when a process imports transformers, so these tests run their code in a new interpreter, on the
installed transformers or on a small package written under a temporary folder and put first on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

# The layout the patch knows: a str Enum of names and a dataclass with optim/optim_args and __post_init__.
KNOWN_TRAINING_ARGS = """
import dataclasses
import enum

class OptimizerNames(str, enum.Enum):
    ADAMW_TORCH = "adamw_torch"

@dataclasses.dataclass
class TrainingArguments:
    output_dir: str = "out"
    optim: str = "adamw_torch"
    optim_args: str = None
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        self.optim = OptimizerNames(self.optim)
"""


# transformers imports torchao wherever it is installed (through peft and its quantizers, hook or not), and on a
# build without torchao's CUDA extensions that import logs these lines in every process: noise of the environment,
# not of the hook, so the tests of what the hook prints leave them out.
_TORCHAO_IMPORT_LINES = re.compile(
    r"^(Failed to load \S*torchao\S*: .*|Skipping import of cpp extensions .*"
    r"|W\d{4} [\d:.]+ \d+ torch/utils/_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass .*)\n", re.MULTILINE)


def run_python(code: str, *flags: str, cwd: Path | None = None, **env_overrides: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter, offline, with the hook on (unless DUALADAM_HF_NO_AUTOREGISTER is given)
    and no inherited PYTHONWARNINGS (unless given). stderr comes without the lines torchao's import logs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_overrides}
    for name in ("DUALADAM_HF_NO_AUTOREGISTER", "PYTHONWARNINGS"):
        if name not in env_overrides:
            env.pop(name, None)
    result = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=cwd)
    result.stderr = _TORCHAO_IMPORT_LINES.sub("", result.stderr)
    return result


def fake_transformers(root: Path, **modules: str) -> str:
    """Write a stand-in `transformers` package under root, one `<name>.py` per keyword (`__init__` empty unless
    given), and return root, for PYTHONPATH."""
    package = root / "transformers"
    package.mkdir(parents=True)
    for name, source in {"__init__": "", **modules}.items():
        (package / f"{name}.py").write_text(source)
    return str(root)
