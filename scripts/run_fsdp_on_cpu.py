"""Run a training script under ``accelerate launch`` with FSDP on CPU processes (no GPU needed).

accelerate (1.15) turns on FSDP only when the process group belongs to an
accelerator: its ``AcceleratorState`` switches MULTI_GPU/XPU/... to FSDP, never
MULTI_CPU. torch's FSDP2 itself runs on CPU with gloo, so this wrapper reports a
gloo "multi-device" group to accelerate and pins the device to the CPU
(``ACCELERATE_TORCH_DEVICE=cpu``); everything else, including the FSDP2 wrapping,
checkpointing and the Trainer, is unchanged. Put it between the config and the
script (or ``-m module``), from the repository root:

    accelerate launch --config_file accelerate_configs/cpu/fsdp2.yaml \\
        scripts/run_fsdp_on_cpu.py train.py --optim dualadam ...
    accelerate launch --config_file accelerate_configs/cpu/fsdp2.yaml \\
        scripts/run_fsdp_on_cpu.py -m some.module ...
"""

from __future__ import annotations

import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _prepare_backend_cpu(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if kind == DistributedType.NO and launched and not torch.cuda.is_available():
        return "gloo", DistributedType.MULTI_GPU
    return found, kind


def main() -> None:
    if torch.cuda.is_available():
        raise SystemExit("run_fsdp_on_cpu.py is for machines without a GPU: launch accelerate_configs/fsdp2.yaml "
                         "instead, or hide the GPUs (CUDA_VISIBLE_DEVICES=)")
    device = os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    if device != "cpu":
        raise SystemExit(f"run_fsdp_on_cpu.py runs on the CPU, but ACCELERATE_TORCH_DEVICE={device}")
    if len(sys.argv) < 2 or sys.argv[1] == "-m" and len(sys.argv) < 3:
        raise SystemExit("usage: run_fsdp_on_cpu.py SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    PartialState._prepare_backend = _prepare_backend_cpu
    # sys.path[0] as `python SCRIPT` / `python -m MODULE` would set it (it is this file's folder now).
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module] + sys.argv[3:]
        sys.path[0] = os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
