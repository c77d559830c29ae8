"""Helpers several test modules share; test modules import from here, never from each other.

Importing this module costs only the standard library (conftest.py imports it too): torch, transformers and the
harness are imported inside the helpers that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The recipe the tiny runs of `dualadam-hf train` start from (its model and data replaced by tiny ones).
SMOKE_RECIPE = REPO / "recipes" / "smollm2_math_lora.yaml"


# --- processes ---------------------------------------------------------------------------------------------------


def start_in_own_group(command: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group, so that :func:`end_group` can stop it together
    with everything it started (a launcher's ranks, a compiler's jobs)."""
    return subprocess.Popen(command, start_new_session=True, **popen_kwargs)


def end_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of ``process``'s group, its children included, and reap ``process``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_in_own_group(command: list[str], *, timeout: float, **popen_kwargs: Any) -> int:
    """Run ``command`` to its end and return its exit code; raise subprocess.TimeoutExpired after ``timeout``
    seconds. However it ends (timeout, pytest-timeout, Ctrl-C), no process it started is left behind:
    subprocess.run's timeout would kill the launcher alone and leave its ranks running."""
    process = start_in_own_group(command, **popen_kwargs)
    try:
        return process.wait(timeout=timeout)
    finally:
        end_group(process)


# --- the test suite's own torch extensions ----------------------------------------------------------------------

# DeepSpeed JIT-builds its CPU ops (minutes) into TORCH_EXTENSIONS_DIR. The suite builds them into a folder of its
# own, kept between sessions: the user's ~/.cache/torch_extensions may hold a lock that an interrupted build left,
# on which every rank would wait for good.
TORCH_EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions"
_SESSIONS_FILE = ".test_sessions"
_BUILD_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in each extension's build folder


def claim_extensions_dir(folder: Path) -> Any:
    """Join the test sessions using ``folder`` and remove the build locks none of them can hold any longer.

    Each session holds a shared lock on ``folder/.test_sessions`` until it exits (the kernel drops it however the
    process ends). A session that finds itself alone there removes the build locks it finds: their builds were
    interrupted, and torch would wait on them forever. Returns the open file that holds the lock; keep it open
    (None where the platform has no flock: there the locks are left as they are).
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return None
    sessions = (folder / _SESSIONS_FILE).open("a")
    try:
        fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another session is running: a lock here may be its build in progress
    else:
        for lock in folder.glob(f"*/{_BUILD_LOCK}"):
            lock.unlink(missing_ok=True)
    fcntl.flock(sessions, fcntl.LOCK_SH)
    return sessions


# --- checkpoints and tiny runs ---------------------------------------------------------------------------------


@dataclass
class RecordedArguments:
    """Stands in for the TrainingArguments the Trainer pickles into training_args.bin."""

    fp16: bool = False
    learning_rate: float = 1e-3


def fake_checkpoint(folder: Path, step: int, *, state: bool = True, optimizer: str | None = "ok",
                    global_step: object = None, optimizer_steps: int | None = None,
                    arguments: RecordedArguments | None = None) -> Path:
    """A checkpoint folder as the Trainer writes it (weights, optimizer, then trainer_state.json last).

    ``global_step`` is what trainer_state.json says (default: ``step``); ``optimizer_steps`` the step counters
    of two parameters' optimizer state (the larger of them; default: no state)."""
    import torch

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if arguments is not None:
        torch.save(arguments, path / "training_args.bin")
    if optimizer == "ok":
        counters = {} if optimizer_steps is None else {
            0: {"step": torch.tensor(float(optimizer_steps))}, 1: {"step": torch.tensor(optimizer_steps - 1.0)}}
        torch.save({"state": counters, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}, path / "optimizer.pt")
    elif optimizer == "empty":
        (path / "optimizer.pt").write_bytes(b"")
    elif optimizer == "truncated":
        torch.save({"state": {0: torch.zeros(1000)}, "param_groups": []}, path / "optimizer.pt")
        data = (path / "optimizer.pt").read_bytes()
        (path / "optimizer.pt").write_bytes(data[: len(data) // 2])
    if state:
        recorded = step if global_step is None else global_step
        (path / "trainer_state.json").write_text(json.dumps({"global_step": recorded, "max_steps": 10}))
    return path


def tiny_argv(model_dir: str, data_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE_RECIPE), "--smoke", *tiny_overrides(model_dir, data_dir, out, *extra)]


def tiny_overrides(model_dir: str, data_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--dataset_name", data_dir, "--output_dir", str(out),
            "--accuracy_size", "0", *extra]


def tiny_experiment(model_dir: str, data_dir: str, out: Path, *extra: str):
    from dualadam_hf.experiments.arguments import load_experiment
    from dualadam_hf.experiments.compare import smoke_overrides

    return load_experiment(SMOKE_RECIPE, smoke_overrides() + tiny_overrides(model_dir, data_dir, out, *extra))


# --- the Trainer on the tiny Llama -----------------------------------------------------------------------------


def make_args(output_dir, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", optim="dualadam", optim_args="blend_steps=4",
        seed=0, disable_tqdm=True, use_cpu=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(model_dir, args, **trainer_kwargs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    from dualadam_hf.experiments.tiny import tiny_lm_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return Trainer(
        model=model, args=args, train_dataset=tiny_lm_dataset(tokenizer, 64),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **trainer_kwargs,
    )


def lora_trainer(model_dir, model, args, **kwargs):
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    from dualadam_hf.experiments.tiny import tiny_lm_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Trainer(
        model=model, args=args, train_dataset=tiny_lm_dataset(tokenizer, 64),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **kwargs,
    )


def training_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# --- reports ---------------------------------------------------------------------------------------------------


def parse_table(markdown: str) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{variant: {column header: (mean, std or None)}} from the report's results table ('-' cells left out);
    the runs column is kept as text under "runs"."""
    section = markdown.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        row: dict = {"runs": cells[1]}
        for header, cell in zip(headers[2:], cells[2:], strict=True):
            if cell != "-":
                mean, _, std = cell.split(" (n=")[0].partition(" ± ")
                row[header] = (float(mean), float(std) if std else None)
        table[cells[0]] = row
    return table
