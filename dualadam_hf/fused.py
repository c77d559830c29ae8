"""The fused CUDA path: one single-pass Triton kernel over many tensors (imported lazily: no Triton needed).

Each program updates ``BLOCK`` elements of one tensor, reading p, g, m, v and writing p, m, v once (28 B per
fp32 element); a device table of pointers lets one launch cover every tensor of a dtype combination. The
per-tensor coefficients are :func:`~dualadam_hf.functional.coefficients` (float64 on the device: in float32
1 - 0.999**t is off by 1e-5 at t = 1), so a step never syncs with the host, never recompiles as the blend
changes, and can be captured in a CUDA graph (the pointer tables are cached while tensors stay put).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict, defaultdict

import torch
from torch import Tensor

from .functional import StepTensors, coefficients, foreach, local, prepare
from .schedule import Hyper

__all__ = ["BLOCK", "fused", "fused_supported", "triton_available"]

BLOCK = 4096  # elements per program; 16 per thread with 8 warps
NUM_WARPS = 8
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)

_kernel = None
_tables: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()
_TABLE_CACHE = 16


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def fused_supported(params: list[Tensor]) -> bool:
    """Whether the automatic choice may use the kernel for these parameters."""
    return triton_available() and all(p.is_cuda and p.dtype in PARAM_DTYPES for p in params)


def _get_kernel():
    global _kernel
    if _kernel is None:
        from ._fused_kernel import dualadam_kernel  # imports triton

        _kernel = dualadam_kernel
    return _kernel


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _launch_tables(quads: list[tuple[Tensor, ...]], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(per-program tensor index, pointer table, number of programs), cached by address: while the tensors stay
    put a step makes no host-to-device copy, which CUDA graph capture requires."""
    key = (device,) + tuple(t.data_ptr() for q in quads for t in q) + tuple(q[0].numel() for q in quads)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    chunks = [max(1, math.ceil(q[0].numel() / BLOCK)) for q in quads]
    firsts = [sum(chunks[:k]) for k in range(len(chunks))]
    rows = [[q[k].data_ptr() for q in quads] for k in range(4)] + [[q[0].numel() for q in quads], firsts]
    table = torch.tensor(rows, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(quads), dtype=torch.int32), torch.tensor(chunks))
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
        owner = owner.pin_memory().to(device, non_blocking=True)
    entry = (owner, table, sum(chunks))
    _tables[key] = entry
    if len(_tables) > _TABLE_CACHE:
        _tables.popitem(last=False)
    return entry


def _kernel_takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor) -> bool:
    return (p.dtype in PARAM_DTYPES and g.dtype in PARAM_DTYPES and m.dtype in STATE_DTYPES and v.dtype == m.dtype
            and step.device == p.device and all(t.is_contiguous() and t.device == p.device for t in (p, g, m, v)))


def fused(tensors: StepTensors, hyper: Hyper) -> None:
    """The fused update path; increments the steps, which (with ``scales``) must be on the parameters' device.
    Operands the kernel cannot take (non-contiguous, other dtypes) go through the foreach path. On CPU tensors
    it runs only under ``TRITON_INTERPRET=1`` (the tests)."""
    if not tensors.params:
        return
    buckets: dict[tuple, list] = defaultdict(list)
    rest: list[int] = []
    for i, p, g, m, v in prepare(tensors):
        step = local(tensors.steps[i])
        if _kernel_takes(p, g, m, v, step):
            # Vector accesses need 16-byte aligned bases (views, e.g. flat ZeRO partitions, start anywhere).
            aligned = all(t.data_ptr() % 16 == 0 for t in (p, g, m, v))
            buckets[(p.dtype, g.dtype, m.dtype, p.device, aligned)].append((i, p, g, m, v))
        else:
            rest.append(i)
    # The fallback counts its own steps; every other tensor (kernel or empty) is counted here.
    fallback = set(rest)
    counted = [local(tensors.steps[i]) for i in range(len(tensors.params)) if i not in fallback]
    if counted:
        torch._foreach_add_(counted, 1.0)
    for (p_dtype, g_dtype, s_dtype, device, aligned), items in buckets.items():
        quads = [item[1:] for item in items]
        owner, table, n_programs = _launch_tables(quads, device)
        scales = None if tensors.scales is None else [tensors.scales[item[0]] for item in items]
        coef, decay = coefficients([local(tensors.steps[item[0]]) for item in items], scales, hyper, device)
        coefs = torch.cat([coef, decay.float().expand(len(items), 1)], 1)  # rows: adam, inverse, eps_c, decay
        _get_kernel()[(n_programs,)](
            owner, table, coefs, len(quads), float(hyper.beta1), float(hyper.beta2),
            P_DTYPE=_triton_dtype(p_dtype), G_DTYPE=_triton_dtype(g_dtype), S_DTYPE=_triton_dtype(s_dtype),
            MAXIMIZE=bool(hyper.maximize), BLOCK=BLOCK, num_warps=NUM_WARPS,
            EMULATE_RTNE=os.environ.get("TRITON_INTERPRET", "0") == "1", ALIGNED=aligned,
        )
    if rest:
        foreach(tensors.subset(rest), hyper)
