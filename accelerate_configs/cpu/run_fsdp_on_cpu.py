"""Run a training script under ``accelerate launch`` with FSDP on CPU processes (tests only).

accelerate 1.15 only turns on FSDP when the process group belongs to an
accelerator (its ``AcceleratorState`` switches MULTI_GPU/XPU/... to FSDP, never
MULTI_CPU). torch's FSDP2 itself runs on CPU with gloo, so for the CPU tests
this shim reports a gloo "multi-device" group and pins the device to CPU
(``ACCELERATE_TORCH_DEVICE=cpu``); everything else, including the FSDP2 wrapping,
checkpointing and the Trainer, is unchanged. Usage:

    ACCELERATE_TORCH_DEVICE=cpu accelerate launch --config_file fsdp2_cpu.yaml \
        tests/multiprocess/run_fsdp_on_cpu.py tests/multiprocess/train_lm.py <script args>
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
    if os.environ.get("ACCELERATE_TORCH_DEVICE") != "cpu":
        raise SystemExit("run_fsdp_on_cpu.py needs ACCELERATE_TORCH_DEVICE=cpu")
    PartialState._prepare_backend = _prepare_backend_cpu
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
