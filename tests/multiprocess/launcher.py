"""The launcher of the multi-process tests: one short Trainer job (tests/multiprocess/train_lm.py) through
``accelerate launch`` with two CPU processes and gloo, on the shipped CPU configs, and the one-process run on the
same global batch that the launches are compared with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import run_in_own_group

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CPU_CONFIGS = REPO / "accelerate_configs" / "cpu"
SCRIPT = HERE / "train_lm.py"
FSDP_SHIM = REPO / "scripts" / "run_fsdp_on_cpu.py"

MAX_STEPS = 5
SAVE_AT = 3
PER_RANK_BATCH = 2
WORLD = 2
# blend_steps=4: the inverse-Adam part is live in steps 1-3 and spent from step 4,
# so the run covers both phases and a resume at step 3 must carry the per-parameter
# step counters across the switch (a restarted counter would replay the blend).
OPTIM_ARGS = "blend_steps=4"
LAUNCH_TIMEOUT_S = 900

# Final parameters vs the single-process run: float32 gradients are summed in a
# different order across ranks (observed differences ~1e-6), while the run moves
# parameters by ~3e-2. 2e-5 absolute sits well between the two.
MATCH_ATOL = 2e-5
# Resumed vs uninterrupted run of the same engine: the same computation replayed,
# bit-identical in practice; a small margin for reduction-order noise.
RESUME_ATOL = 1e-6


@dataclass(frozen=True)
class Engine:
    config: str  # shipped file under accelerate_configs/cpu/
    sharded: bool  # optimizer state split across ranks
    zero: bool = False  # a DeepSpeed ZeRO engine
    fsdp: bool = False
    offload: bool = False

    @property
    def script_flags(self) -> list[str]:
        """What the training script needs to put its processes on the CPU (as in the config's header)."""
        if self.zero:
            return ["--ddp_backend", "gloo"]
        return [] if self.fsdp else ["--use_cpu"]  # FSDP2: the shim gives accelerate a gloo group


ENGINES = {
    "ddp": Engine("multi_cpu.yaml", sharded=False),
    "zero1": Engine("deepspeed_zero1.yaml", sharded=True, zero=True),
    "zero2": Engine("deepspeed_zero2.yaml", sharded=True, zero=True),
    "zero3": Engine("deepspeed_zero3.yaml", sharded=True, zero=True),
    "zero3_offload": Engine("deepspeed_zero3_offload.yaml", sharded=True, zero=True, offload=True),
    "fsdp2": Engine("fsdp2.yaml", sharded=True, fsdp=True),
}


def launch_config(engine: Engine, out_dir: Path, *, keep_ds_cpu_optimizer: bool = True) -> Path:
    """The shipped CPU config; a temporary copy only where the test needs a change.

    The configs with inline DeepSpeed settings, DDP and FSDP2 are launched as
    shipped. The offload config points to a JSON file; the copy of that file
    sets small ZeRO-3 sub-groups (and, for the guard test, drops
    ``zero_force_ds_cpu_optimizer``).
    """
    shipped = CPU_CONFIGS / engine.config
    config = yaml.safe_load(shipped.read_text())
    ds = config.get("deepspeed_config", {})
    if "deepspeed_config_file" not in ds:
        return shipped
    ds_json = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
    # Small sub-groups: ZeRO-3 then calls DualAdam.step() several times per
    # optimizer step, which is what a per-optimizer step counter gets wrong.
    ds_json["zero_optimization"]["sub_group_size"] = 4096
    if not keep_ds_cpu_optimizer:
        ds_json.pop("zero_force_ds_cpu_optimizer")  # let accelerate swap in DeepSpeedCPUAdam
    suffix = "" if keep_ds_cpu_optimizer else "_swapped"
    path = out_dir / f"ds_{engine.config}{suffix}.json"
    path.write_text(json.dumps(ds_json))
    ds["deepspeed_config_file"] = str(path)
    path = out_dir / f"cpu{suffix}_{engine.config}"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # CPU processes and gloo even on a machine with GPUs: these tests prove the wiring, not speed.
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)  # the startup hook is what makes --optim dualadam work
    return env


def script_args(model_dir: str, out: Path, batch: int, optim_args: str = OPTIM_ARGS) -> list[str]:
    return [
        "--model_path", model_dir, "--output_dir", str(out), "--report_dir", str(out / "report"),
        "--optim", "dualadam", "--optim_args", optim_args,
        "--learning_rate", "1e-2", "--weight_decay", "0.1", "--lr_scheduler_type", "constant",
        "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", str(batch),
        "--train_sampling_strategy", "sequential", "--seed", "0",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
    ]


def run(cmd: list[str], env: dict[str, str], log: Path, *, check: bool = True) -> int:
    """Run one launch to its end; a launch that outlives LAUNCH_TIMEOUT_S fails with its log, its ranks ended."""
    with log.open("w") as f:
        try:
            code = run_in_own_group(cmd, timeout=LAUNCH_TIMEOUT_S, cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            code = None
    if code is None or (check and code != 0):
        outcome = f"ran past {LAUNCH_TIMEOUT_S} s and was stopped" if code is None else f"exited with {code}"
        pytest.fail(f"{' '.join(cmd[:6])} ... {outcome}; log tail:\n{log.read_text()[-6000:]}")
    return code


def launch(name: str, model_dir: str, work: Path, out: Path, extra: list[str], *, config: Path | None = None,
           check: bool = True, optim_args: str = OPTIM_ARGS) -> int:
    engine = ENGINES[name]
    config = config or launch_config(engine, work)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port())]
    if engine.fsdp:
        cmd.append(str(FSDP_SHIM))
    cmd.append(str(SCRIPT))
    cmd += script_args(model_dir, out, PER_RANK_BATCH, optim_args) + engine.script_flags
    return run(cmd + extra, base_env(), out.with_suffix(".log"), check=check)


def read_reports(out: Path) -> list[dict]:
    return [json.loads((out / "report" / f"rank{r}.json").read_text()) for r in range(WORLD)]


def single_process_run(model_dir: str, out: Path, optim_args: str = OPTIM_ARGS, extra: Sequence[str] = ()) -> Path:
    """The reference a launch is compared with: one process whose per-device batch is the launches' global batch."""
    cmd = [sys.executable, str(SCRIPT)] + script_args(model_dir, out, PER_RANK_BATCH * WORLD, optim_args) + [*extra]
    run(cmd + ["--use_cpu", "--save_strategy", "no"], base_env(), out.with_suffix(".log"))
    return out


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))
