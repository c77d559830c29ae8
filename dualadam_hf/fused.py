"""The Triton path (``fused=True`` on CUDA, and the default there): one single-pass Triton kernel over many
tensors (imported lazily: no Triton needed).

Each program updates ``BLOCK`` elements of one tensor, reading p, g, m, v and writing p, m, v once (28 B per
fp32 element); a device table of pointers lets one launch cover every tensor of a dtype combination. The
per-tensor coefficients are :func:`~dualadam_hf.functional.coefficients` (float64 on the device: in float32
1 - 0.999**t is off by 1e-5 at t = 1), so a step never syncs with the host, never recompiles as the blend
changes, and can be captured in a CUDA graph.

Host work per step is what a GPU step waits on, so what stays put between steps is built once and kept in
the optimizer's cache for these tensors (``StepCounts.cache``): the dtype groups, the checks of p, m, v and
the device table of their pointers. A step checks the gradients (new tensors each step), rewrites the
table's gradient row only when their addresses moved, counts the steps with one ``add_`` on the step
vector, computes every tensor's coefficients in a few launches and launches the kernel once per group.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .functional import StepTensors, coefficients, count_step, local
from .schedule import Hyper

__all__ = ["BLOCK", "triton_available", "triton_supported", "triton_update"]

# Elements per program. A sweep on an H200 (benchmarks/fused_block_sweep.py, fp32, 238M elements) reached
# 62% of copy bandwidth with 2048 and 8 warps against 43% with 4096.
BLOCK = 2048
NUM_WARPS = 8
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)

_kernel = None


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_supported(params: list[Tensor]) -> bool:
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


def _kernel_takes(p: Tensor, m: Tensor, v: Tensor, device: torch.device) -> bool:
    return (p.dtype in PARAM_DTYPES and m.dtype in STATE_DTYPES and v.dtype == m.dtype
            and all(t.is_contiguous() and t.device == device for t in (p, m, v)))


class _Group:
    """The tensors of one dtype combination: indices, static table rows and the device table."""

    def __init__(self, indices: list[int], quads: list[tuple[Tensor, ...]], device: torch.device):
        self.indices = indices
        self.p_dtype, self.g_dtype, self.s_dtype = quads[0][0].dtype, quads[0][1].dtype, quads[0][2].dtype
        # Vector accesses need 16-byte aligned bases (views, e.g. flat ZeRO partitions, start anywhere).
        self.aligned = all(t.data_ptr() % 16 == 0 for q in quads for t in (q[0], q[2], q[3]))
        self.wide = any(q[0].numel() >= 2**31 - BLOCK for q in quads)  # int64 offsets only where needed
        chunks = [max(1, math.ceil(q[0].numel() / BLOCK)) for q in quads]
        firsts = [sum(chunks[:k]) for k in range(len(chunks))]
        rows = [[q[k].data_ptr() for q in quads] for k in range(4)]
        rows += [[q[0].numel() for q in quads], firsts, indices]
        self.grad_ptrs = tuple(rows[1])
        self.table = _to_device(torch.tensor(rows, dtype=torch.int64), device)
        self.owner = _to_device(torch.repeat_interleave(torch.arange(len(quads), dtype=torch.int32),
                                                        torch.tensor(chunks)), device)
        self.n_programs = sum(chunks)

    def point_at(self, grads: list[Tensor]) -> None:
        """Point the table's gradient row at this step's gradients (a copy only when they moved)."""
        ptrs = tuple(g.data_ptr() for g in grads)
        if ptrs != self.grad_ptrs:
            self.table[1].copy_(torch.tensor(ptrs, dtype=torch.int64), non_blocking=True)
            self.grad_ptrs = ptrs


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class _Layout:
    """What the kernel needs that stays put while p, m, v do: groups by dtype, and the tensors it leaves to
    the caller (non-contiguous, other dtypes or devices). Empty tensors are neither: only their steps count."""

    def __init__(self, tensors: StepTensors):
        self.device = local(tensors.params[0]).device
        by_dtype: dict[tuple, list] = defaultdict(list)
        self.rest: list[int] = []
        for i, (p, g, m, v) in enumerate(zip(*(map(local, xs) for xs in tensors[:4]))):
            if p.numel() == 0:
                continue
            if _kernel_takes(p, m, v, self.device) and g.dtype in PARAM_DTYPES:
                by_dtype[(p.dtype, g.dtype, m.dtype)].append((i, (p, g, m, v)))
            else:
                self.rest.append(i)
        self.groups = [_Group([i for i, _ in items], [q for _, q in items], self.device)
                       for items in by_dtype.values()]
        self.seeds: Tensor | None = None

    def next_seeds(self) -> Tensor:
        """One seed per group for this step's stochastic rounding, on the device. Drawn once from torch's
        generator (only when rounding stochastically: with it off the generator is not touched) and advanced
        by one on the device every step, so steps differ with no host work, also in a captured CUDA graph."""
        if self.seeds is None:
            self.seeds = torch.randint(0, 1 << 62, (len(self.groups),), dtype=torch.int64).to(self.device)
        else:
            self.seeds.add_(1)
        return self.seeds


def _layout(tensors: StepTensors) -> _Layout:
    """The cached layout; the optimizer drops its cache whenever a p, m or v moved or was replaced."""
    cache: dict[str, Any] | None = tensors.counts.cache if tensors.counts is not None else None
    layout = None if cache is None else cache.get("triton-layout")
    if layout is None:
        layout = _Layout(tensors)
        if cache is not None:
            cache["triton-layout"] = layout
    return layout


def triton_update(tensors: StepTensors, hyper: Hyper) -> list[int]:
    """The Triton update of every tensor the kernel takes; returns the indices of those it left (non-contiguous
    or other dtypes), whose steps it did not count. Steps (and ``scales``) must be on the parameters'
    device. On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (the tests)."""
    if not tensors.params:
        return []
    layout = _layout(tensors)
    if layout.rest:
        left = set(layout.rest)
        count_step(tensors.subset([i for i in range(len(tensors.steps)) if i not in left]))
    else:
        count_step(tensors)
    if not layout.groups:
        return layout.rest
    vector = None if tensors.counts is None else tensors.counts.vector
    steps = vector if vector is not None else [local(s) for s in tensors.steps]
    coef, decay = coefficients(steps, tensors.scales, hyper, layout.device)
    decay = decay.float().reshape(1)
    kernel = _get_kernel()
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    rounding = hyper.bf16_stochastic_round and any(group.p_dtype == torch.bfloat16 for group in layout.groups)
    seeds = layout.next_seeds() if rounding else None
    for k, group in enumerate(layout.groups):
        stochastic = rounding and group.p_dtype == torch.bfloat16
        grads = [local(tensors.grads[i]) for i in group.indices]
        if any(g.dtype != group.g_dtype or not g.is_contiguous() for g in grads):
            grads = [g.to(group.g_dtype).contiguous() for g in grads]
        group.point_at(grads)
        aligned = group.aligned and all(ptr % 16 == 0 for ptr in group.grad_ptrs)
        kernel[(group.n_programs,)](
            group.owner, group.table, coef, decay, len(group.indices), float(hyper.beta1), float(hyper.beta2),
            seeds[k:] if stochastic else decay,  # a pointer the kernel reads only when rounding stochastically
            P_DTYPE=_triton_dtype(group.p_dtype), G_DTYPE=_triton_dtype(group.g_dtype),
            S_DTYPE=_triton_dtype(group.s_dtype), MAXIMIZE=bool(hyper.maximize), BLOCK=BLOCK, num_warps=NUM_WARPS,
            EMULATE_RTNE=interpreted, ALIGNED=aligned, WIDE=group.wide, STOCHASTIC=stochastic,
        )
    return layout.rest
