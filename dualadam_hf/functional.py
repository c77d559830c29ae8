"""The DualAdam update as pure functions over lists of tensors; no Optimizer plumbing.

Every update path (:data:`UPDATE_PATHS`: single, foreach, compiled, fused) has one signature,
``path(tensors: StepTensors, hyper: Hyper) -> None``: it increments each tensor's step and applies the rule
of :mod:`dualadam_hf.schedule` in place. Low-precision parameters (and bf16 moments) are worked on in fp32
and written back. Helpers that several paths use (:func:`local`, :func:`prepare`, :func:`coefficients`)
are public on purpose.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .schedule import Hyper, blend_weight, fold

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Elements per block in the foreach path. The step is memory bound: working on
# blocks whose five operands (p, g, m, v and one temporary) fit in L2 turns the
# dozen element-wise passes into about one trip to DRAM per operand, and keeps
# the temporary memory at one block instead of one copy of the model.
FOREACH_BLOCK = 1 << 18


class StepTensors(NamedTuple):
    """The operands of one update: aligned lists, one entry per parameter tensor.

    ``steps`` are float32 0-d tensors counting the updates taken so far. ``scales`` are the
    per-tensor inverse scales of ``inverse_scale="auto"`` (0-d tensors, 0 until calibrated), or None.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: Sequence[Tensor]
    scales: Sequence[Tensor] | None = None

    def subset(self, indices: Sequence[int]) -> StepTensors:
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]
        return StepTensors(*(pick(xs) for xs in self))


UpdatePath = Callable[[StepTensors, Hyper], None]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): the update is element-wise and p, g, m, v share one placement,
    so working on local shards is exact and avoids DTensor dispatch on every op. Plain tensors pass through."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def grad_like_param(p: Tensor, g: Tensor) -> Tensor:
    """The local gradient, redistributed first if its DTensor placement differs from the parameter's."""
    placements = getattr(p, "placements", None)
    if placements is not None and getattr(g, "placements", placements) != placements:
        g = g.redistribute(p.device_mesh, placements)
    return local(g)


def prepare(tensors: StepTensors) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
    """(index, p, g, m, v) as local tensors, skipping empty ones (their steps still count)."""
    for i, (p, g) in enumerate(zip(tensors.params, tensors.grads)):
        pl = local(p)
        if pl.numel():
            yield i, pl, grad_like_param(p, g), local(tensors.exp_avgs[i]), local(tensors.exp_avg_sqs[i])


def scales_of(tensors: StepTensors) -> list[float]:
    """Per-tensor factors on ``hyper.inverse_scale`` as numbers (all 1 without calibrated scales)."""
    if tensors.scales is None:
        return [1.0] * len(tensors.params)
    return [float(s) for s in tensors.scales]


def _fp32(xs: list[Tensor]) -> list[Tensor]:
    return [x.float() for x in xs]


def single_tensor(tensors: StepTensors, hyper: Hyper) -> None:
    """The plain path: one parameter at a time, written to read like the formulas."""
    lr, b1, b2 = float(hyper.lr), hyper.beta1, hyper.beta2
    for step in tensors.steps:
        step += 1
    scales = scales_of(tensors)
    for i, p, g, m, v in prepare(tensors):
        t = float(tensors.steps[i])
        r = blend_weight(t, hyper.switch_rate)
        work = p.float() if p.dtype in LOW_PRECISION else p
        m_in, v_in = m, v
        if m.dtype in LOW_PRECISION:
            m, v = m.float(), v.float()
        g = g.to(m.dtype)
        if hyper.maximize:
            g = -g
        if hyper.weight_decay != 0:
            work.mul_(1.0 - lr * hyper.weight_decay)
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        mh = m / (1.0 - b1**t)
        d = (v / (1.0 - b2**t)).sqrt_().add_(hyper.eps)
        u = mh / d
        if r > 0.0:
            u.mul_(1.0 - r).add_(mh * d, alpha=r * hyper.inverse_scale * scales[i])
        work.add_(u, alpha=-lr)
        if work is not p:
            p.copy_(work)
        if m is not m_in:
            m_in.copy_(m)
            v_in.copy_(v)


def _blocks(items: list[tuple], block: int) -> Iterator[list[tuple]]:
    """Batches of (p, g, m, v, coefficients) of about ``block`` elements: large contiguous tensors cut into
    views, small ones gathered so each foreach call does a useful amount of work."""
    batch, size = [], 0
    for p, g, m, v, coef in items:
        if all(t.is_contiguous() for t in (p, g, m, v)) and p.numel() > block:
            views = [(*quad, coef) for quad in zip(*(t.view(-1).split(block) for t in (p, g, m, v)), strict=True)]
        else:
            views = [(p, g, m, v, coef)]
        for item in views:
            batch.append(item)
            size += item[0].numel()
            if size >= block:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _foreach_block(batch: list[tuple], hyper: Hyper, decay: float) -> None:
    """The folded update (see :func:`~dualadam_hf.schedule.fold`) on one block of fp32 work lists."""
    p, g, m, v, coefs = (list(x) for x in zip(*batch, strict=True))
    adam, inverse, eps_c = ([c[k] for c in coefs] for k in range(3))
    if hyper.maximize:
        g = torch._foreach_neg(g)
    if decay != 1.0:
        torch._foreach_mul_(p, decay)
    torch._foreach_lerp_(m, g, 1.0 - hyper.beta1)
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_addcmul_(v, g, g, 1.0 - hyper.beta2)
    den = torch._foreach_sqrt(v)
    torch._foreach_add_(den, eps_c)
    torch._foreach_addcdiv_(p, m, den, [-a for a in adam])
    if any(inverse):
        torch._foreach_addcmul_(p, m, den, [-x for x in inverse])


def _takes_adamw_fused(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor) -> bool:
    return (p.device.type == "cpu" and step.device.type == "cpu" and p.dtype == g.dtype == m.dtype == v.dtype
            and all(t.is_contiguous() and t.device == p.device for t in (p, g, m, v)))


def _adamw_fused(items: list[tuple], hyper: Hyper, lr: float) -> None:
    """Past the blend the update is exactly AdamW's: torch's fused CPU kernel does it in one pass per element,
    3-4x faster than a dozen foreach passes (items: p, g, m, v and the already counted step, one dtype)."""
    p, g, m, v, steps = (list(x) for x in zip(*items, strict=True))
    torch._fused_adamw_(p, g, m, v, [], steps, lr=lr, beta1=hyper.beta1, beta2=hyper.beta2,
                        weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=hyper.maximize)


def foreach(tensors: StepTensors, hyper: Hyper, block: int | None = None) -> None:
    """The multi-tensor path: foreach ops over L2-sized blocks with per-tensor coefficients.

    Parameters may sit at different steps (missing gradients): each tensor gets its own folded
    coefficients. Past the blend, CPU tensors of one dtype take torch's fused AdamW kernel.
    A tensor ``lr`` is read once on the host.
    """
    if not tensors.params:
        return
    lr = float(hyper.lr)
    hyper = dataclasses.replace(hyper, lr=lr)
    block = block or FOREACH_BLOCK
    torch._foreach_add_(list(tensors.steps), 1.0)
    scales = scales_of(tensors)
    decay = 1.0 - lr * hyper.weight_decay
    adamw: dict[torch.dtype, list] = defaultdict(list)
    buckets: dict[tuple, list] = defaultdict(list)
    for i, p, g, m, v in prepare(tensors):
        step = local(tensors.steps[i])
        t = float(step)
        adam, inverse, eps_c, _ = fold(t, hyper, scales[i])
        if blend_weight(t, hyper.switch_rate) == 0.0 and _takes_adamw_fused(p, g, m, v, step):
            adamw[p.dtype].append((p, g, m, v, step))
        else:
            buckets[(p.dtype, g.dtype, m.dtype)].append((p, g, m, v, (adam, inverse, eps_c)))
    for items in adamw.values():
        _adamw_fused(items, hyper, lr)
    for (p_dtype, g_dtype, s_dtype), items in buckets.items():
        for batch in _blocks(items, block):
            p, g, m, v, coefs = (list(x) for x in zip(*batch, strict=True))
            work = _fp32(p) if p_dtype in LOW_PRECISION else p
            m_work, v_work = (_fp32(m), _fp32(v)) if s_dtype in LOW_PRECISION else (m, v)
            g_work = _fp32(g) if g_dtype != m_work[0].dtype else g
            _foreach_block(list(zip(work, g_work, m_work, v_work, coefs, strict=True)), hyper, decay)
            if work is not p:
                torch._foreach_copy_(p, work)
            if m_work is not m:
                torch._foreach_copy_(m, m_work)
                torch._foreach_copy_(v, v_work)


def coefficients(steps: Sequence[Tensor], scales: Sequence[Tensor] | None, hyper: Hyper, device: torch.device,
                 size: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`~dualadam_hf.schedule.fold` on the device for the single-pass paths, from already counted steps:
    ([size, 3] float32 rows (adam, inverse, eps_c), decay as a 0-d float64 tensor). Rows past ``len(steps)``
    (padding) get step 1 and scale 0. Float64 on the device: no host sync, nothing for a compiler to guard."""
    size = size or len(steps)
    t = torch.ones(size, dtype=torch.float64, device=device)
    t[: len(steps)] = torch.stack(list(steps))
    scale: Any = 1.0
    if scales is not None:
        scale = torch.zeros(size, dtype=torch.float64, device=device)
        scale[: len(steps)] = torch.stack(list(scales)).to(device)
    lr = hyper.lr.to(device, torch.float64) if isinstance(hyper.lr, Tensor) else hyper.lr
    adam, inverse, eps_c, decay = fold(t, dataclasses.replace(hyper, lr=lr), scale)
    return torch.stack([adam, inverse, eps_c], 1).float(), torch.as_tensor(decay, dtype=torch.float64, device=device)


# The compiled and fused paths import torch.compile's machinery or triton on first use only.
UPDATE_PATHS: dict[str, str] = {"single": "dualadam_hf.functional:single_tensor",
                                "foreach": "dualadam_hf.functional:foreach",
                                "compiled": "dualadam_hf.compiled:compiled", "fused": "dualadam_hf.fused:fused"}


def update_path(name: str) -> UpdatePath:
    """The update function registered under ``name`` (see :data:`UPDATE_PATHS`)."""
    if name not in UPDATE_PATHS:
        raise ValueError(f"unknown update path {name!r}; one of {', '.join(UPDATE_PATHS)}")
    module, _, attribute = UPDATE_PATHS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def update(tensors: StepTensors, hyper: Hyper, path: str = "foreach") -> None:
    """Apply one DualAdam update with the named path."""
    update_path(path)(tensors, hyper)


def _mh_d(m: Tensor, v: Tensor, t: float, hyper: Hyper) -> tuple[Tensor, Tensor]:
    """Adam's bias-corrected mh and d = sqrt(v_hat) + eps, in fp32, from moments that count step ``t``."""
    return m.float() / (1.0 - hyper.beta1**t), (v.float() / (1.0 - hyper.beta2**t)).sqrt_().add_(hyper.eps)


def update_norms(tensors: StepTensors, hyper: Hyper) -> tuple[float, float]:
    """Squared norms of the Adam part (1-r)*mh/d and the inverse part r*s*mh*d of the latest update, read from
    the state it left behind (costs nothing unless called; ``grads`` are not used); local elements only."""
    adam_sq = inverse_sq = 0.0
    scales = scales_of(tensors)
    for i, (m, v) in enumerate(zip(tensors.exp_avgs, tensors.exp_avg_sqs)):
        t = float(local(tensors.steps[i]))
        if t < 1 or local(m).numel() == 0:
            continue
        r = blend_weight(t, hyper.switch_rate)
        mh, d = _mh_d(local(m), local(v), t, hyper)
        adam_sq += (1.0 - r) ** 2 * float((mh / d).square().sum())
        if r > 0.0:
            inverse_sq += (r * hyper.inverse_scale * scales[i]) ** 2 * float((mh * d).square().sum())
    return adam_sq, inverse_sq


def inverse_share(adam_sq: float, inverse_sq: float) -> float:
    """||inverse part|| / (||Adam part|| + ||inverse part||) from squared norms (0 when both are 0)."""
    a, b = math.sqrt(adam_sq), math.sqrt(inverse_sq)
    return b / (a + b) if a + b > 0 else 0.0


def calibrated_scale(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, hyper: Hyper) -> Tensor | None:
    """||mh/d|| / ||mh*d|| over a tensor for its coming update at ``step`` (None while its gradient is 0): the
    scale of ``inverse_scale="auto"``, with which the inverse share of that update is r whatever the gradients'
    units. Taken at a tensor's first non-zero gradient (LoRA's A gets exactly 0 at first, while B is 0) and
    kept. For a DTensor the norms run over the whole tensor (a collective)."""
    g = grad.detach().float()
    mh, d = _mh_d(exp_avg.detach().float() * hyper.beta1 + g * (1.0 - hyper.beta1),
                  exp_avg_sq.detach().float() * hyper.beta2 + g.square() * (1.0 - hyper.beta2), step, hyper)
    # Both reductions run on every rank (collectives on a DTensor) before anything is decided.
    adam_sq, inverse_sq = (full(x) for x in ((mh / d).square().sum(), (mh * d).square().sum()))
    if not float(inverse_sq) > 0.0:
        return None
    return (adam_sq / inverse_sq).sqrt().reshape(()).to(device="cpu", dtype=torch.float32)


def full(t: Tensor) -> Tensor:
    """The whole value of a DTensor (a collective); plain tensors pass through."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t
