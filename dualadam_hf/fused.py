"""The fused CUDA path: one single-pass Triton kernel over many tensors (issue 6).

Each program updates ``BLOCK`` elements of one tensor: it reads p, g, m, v once
and writes p, m, v once (28 bytes per fp32 element). Tensors are found through
a small device table of pointers, so one launch covers every tensor of a dtype
combination. The step, and the lr when it is a tensor, are read on the device
and the bias corrections and blend weight are computed there, so a step never
syncs with the host, never recompiles as the blend changes, and can be captured
in a CUDA graph (the tables are cached while the tensors keep their addresses).

The per-tensor scalars are computed in float64 inside the kernel: in float32,
1 - 0.999**t alone is off by 1e-5 relative at t = 1. The end of the blend is the
comparison ``step <= last_active_step`` against a bound computed on the host
with the schedule's own arithmetic, so rounding or FMA contraction cannot move it.

Triton is imported lazily: the package imports and runs without it.
"""

import math
import os
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from . import functional
from .compiled import last_active_step

__all__ = ["BLOCK", "fused_dualadam", "fused_supported", "triton_available"]

BLOCK = 4096  # elements per program; 16 per thread with 8 warps
NUM_WARPS = 8
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)

_kernel = None
_tables: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()
_TABLE_CACHE = 16


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_supported(params: Sequence[Tensor]) -> bool:
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
    """(per-program tensor index, pointer table, number of programs), cached by address.

    Reusing the tables while the tensors stay where they are keeps the step free
    of host-to-device copies, which CUDA graph capture requires.
    """
    key = (device,) + tuple(t.data_ptr() for q in quads for t in q) + tuple(q[0].numel() for q in quads)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    chunks = [max(1, math.ceil(q[0].numel() / BLOCK)) for q in quads]
    firsts = [0]
    for n in chunks[:-1]:
        firsts.append(firsts[-1] + n)
    rows = [[q[k].data_ptr() for q in quads] for k in range(5)]
    rows += [[q[0].numel() for q in quads], firsts]
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
    return (
        p.dtype in PARAM_DTYPES and g.dtype in PARAM_DTYPES and m.dtype in STATE_DTYPES
        and v.dtype == m.dtype and step.dtype == torch.float32 and step.device == p.device
        and all(t.is_contiguous() and t.device == p.device for t in (g, m, v))
        and p.is_contiguous()
    )


def fused_dualadam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    switch_rate: float,
    inverse_only: bool = False,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`dualadam_hf.functional.dualadam_foreach`; increments the steps.

    ``state_steps`` must be float32 tensors on the parameters' device (the
    optimizer moves them there). Moments may be float32 or bfloat16. Operands the
    kernel cannot take (non-contiguous, other dtypes) go through the foreach path.
    A tensor ``lr`` is read on the device. Runs on CPU tensors only under
    ``TRITON_INTERPRET=1`` (the tests use that).
    """
    if not params:
        return
    prepared = functional._prepare(params, grads, exp_avgs, exp_avg_sqs)
    buckets: dict[tuple, list] = defaultdict(list)
    rest: list[int] = []
    for i, p, g, m, v in prepared:
        step = functional._local(state_steps[i])
        if _kernel_takes(p, g, m, v, step):
            # Vector accesses need 16-byte aligned bases (views, e.g. flat ZeRO
            # partitions, may start anywhere).
            aligned = all(t.data_ptr() % 16 == 0 for t in (p, g, m, v))
            buckets[(p.dtype, g.dtype, m.dtype, p.device, aligned)].append((p, g, m, v, step))
        else:
            rest.append(i)
    taken = [quad[-1] for quads in buckets.values() for quad in quads]
    others = [state_steps[i] for i in sorted(set(range(len(params))) - {q[0] for q in prepared})]
    if taken or others:
        torch._foreach_add_(taken + others, 1.0)  # the kernel reads the incremented step
    if buckets:
        kernel = _get_kernel()
        sr = 0.0 if inverse_only else float(switch_rate)
        last = last_active_step(switch_rate, inverse_only)
        log_b1 = math.log(beta1) if beta1 > 0 else -math.inf
        log_b2 = math.log(beta2) if beta2 > 0 else -math.inf
    for (p_dtype, g_dtype, s_dtype, device, aligned), quads in buckets.items():
        owner, table, n_programs = _launch_tables(quads, device)
        lr_tensor = isinstance(lr, Tensor)
        if lr_tensor and lr.device != device:
            lr_tensor, lr_value = False, float(lr)  # a CPU lr: read once, as the foreach path does
        else:
            lr_value = 0.0 if lr_tensor else float(lr)
        kernel[(n_programs,)](
            owner, table, len(quads), lr if lr_tensor else table, lr_value,
            float(beta1), float(beta2), log_b1, log_b2, float(eps), float(weight_decay), sr, last,
            P_DTYPE=_triton_dtype(p_dtype), G_DTYPE=_triton_dtype(g_dtype), S_DTYPE=_triton_dtype(s_dtype),
            LR_FROM_PTR=lr_tensor, MAXIMIZE=bool(maximize), BLOCK=BLOCK, num_warps=NUM_WARPS,
            EMULATE_RTNE=os.environ.get("TRITON_INTERPRET", "0") == "1", ALIGNED=aligned,
        )
    if rest:
        functional.dualadam_foreach_subset(
            rest, params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, switch_rate=switch_rate, inverse_only=inverse_only, maximize=maximize,
        )
