"""The DualAdam update as pure functions over lists of tensors; no Optimizer plumbing.

Each update path here has one signature, ``path(tensors: StepTensors, hyper: Hyper) -> None``: it counts
one step for every tensor and applies the rule of :mod:`dualadam_hf.schedule` in place. Low-precision
parameters (and bf16 moments) are worked on in fp32 and written back. Which path runs is decided in one
place, :func:`dualadam_hf.update.update`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .schedule import Hyper, bias_corrections, blend_weight, fold

# One tensor's [||m/den||, ||m*den||] of the moments the coming update will leave, from (m, v, the fp32 gradient,
# eps*c, hyper): how a path whose moments foreach ops cannot read (low-bit state) takes part in the held norm.
OneTensorNorms = Callable[[Tensor, Tensor, Tensor, float, Hyper], Tensor]

LOW_PRECISION = (torch.float16, torch.bfloat16)
# 0xFFFF0000 as an int32: keeps an fp32 bit pattern's sign, exponent and top 7 mantissa bits (a bf16).
_BF16_HIGH_BITS = -(1 << 16)

# Elements per block in the foreach path on CPU. The step is memory bound: working on blocks whose five
# operands (p, g, m, v and one temporary) fit in L2 turns the dozen element-wise passes into about one
# trip to DRAM per operand. On a GPU each foreach call is a kernel launch and the caches are no help, so
# there one call per op per dtype group covers every tensor (as torch's multi-tensor Adam does).
FOREACH_BLOCK = 1 << 18
# Elements per batch of the norm passes off the CPU (held_norm_scales here, the inverse share in diagnostics):
# few launches, while their fp32 temporaries (den and two products, 12 B per element: 384 MB) stay bounded
# whatever the model's size.
NORM_BATCH = 1 << 25


class StepCounts(NamedTuple):
    """What the optimizer knows about the step counters without reading them from the device.

    ``vector`` holds every tensor's step, in the order of the lists (each ``steps[i]`` is ``vector[i]``),
    so one ``add_`` counts a step for all and the coefficients come from it in a few launches (None for a
    part of the tensors: their steps are then counted one by one).
    ``lowest``/``highest`` are the smallest and largest step before the coming update. ``cache`` is where
    the update paths keep what they derive from tensors that stay put (launch tables, dtype groups); it
    lives as long as the optimizer's cached operands for these tensors.
    """

    vector: Tensor | None
    lowest: int
    highest: int
    cache: dict[str, Any]


class StepTensors(NamedTuple):
    """The operands of one update: aligned lists, one entry per parameter tensor.

    ``steps`` are float32 0-d tensors counting the updates taken so far. ``scales`` are the
    per-tensor inverse scales of ``inverse_scale="auto"`` (0-d tensors, 0 until calibrated), or None.
    ``counts`` is given by the optimizer (see :class:`StepCounts`); callers of the bare functions may omit it.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: Sequence[Tensor]
    scales: Sequence[Tensor] | None = None
    counts: StepCounts | None = None

    def subset(self, indices: Sequence[int]) -> StepTensors:
        """The tensors at ``indices`` (without ``counts``, which describe the whole set)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]
        return StepTensors(*(pick(xs) for xs in self[:6]))


def count_step(tensors: StepTensors) -> None:
    """Add one to every tensor's step: one launch with a step vector, one foreach call without."""
    if tensors.counts is not None and tensors.counts.vector is not None:
        tensors.counts.vector.add_(1.0)
    elif tensors.steps:
        torch._foreach_add_([local(s) for s in tensors.steps], 1.0)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): the update is element-wise and p, g, m, v share one placement,
    so working on local shards is exact and avoids DTensor dispatch on every op. Plain tensors pass through."""
    # Looked up on the class: for plain tensors that costs no AttributeError (this runs per tensor per step).
    if getattr(type(t), "to_local", None) is None:
        return t
    # The shard itself, without to_local()'s autograd Function (tens of microseconds per call).
    shard = getattr(t, "_local_tensor", None)
    return shard if shard is not None else t.to_local()


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


def held_norm_scales(tensors: StepTensors, hyper: Hyper, block: int | None = None,
                     one_tensor: OneTensorNorms | None = None) -> list[Tensor]:
    """Per tensor, the scale that puts the coming update's inverse direction at its Adam direction's norm
    (``inverse_scale="norm"``): ||mh/d|| / ||mh*d|| from the moments this step will leave, so the update is
    (1-r)*a + r*b with |a| = |b|. 0 where the inverse direction is 0 (then so is Adam's).

    With c = sqrt(1 - b2**t) and den = sqrt(v) + eps*c the ratio is c**2 * ||m/den|| / ||m*den||. Read before
    the update (steps not yet counted), in fp32, over batches of whole tensors of about ``block`` elements (the
    temporaries stay small), with one read of the host at the end. Every tensor takes part, empty shards
    included, so that for DTensor parameters (FSDP2) the squared norms can be summed over the mesh first: the
    scale is then the whole tensor's (replicated elements count on both sides alike). ``one_tensor`` computes
    a tensor's pair of norms where the batch cannot read the moments (low-bit state: quantized)."""
    n = len(tensors.params)
    steps = [t + 1.0 for t in _host_steps(tensors, counted=False)]
    c = [bias_corrections(t, hyper)[1] for t in steps]
    on_cpu = local(tensors.params[0]).device.type == "cpu"
    limit = block or (FOREACH_BLOCK if on_cpu else NORM_BATCH)
    parts, batch, size = [], [], 0
    for i in range(n):
        batch.append(i)
        size += local(tensors.params[i]).numel()
        if size >= limit or i == n - 1:
            parts.append(_held_norm_squares(tensors, hyper, batch, [hyper.eps * c[k] for k in batch], one_tensor))
            batch, size = [], 0
    squares = torch.cat(parts, 1)
    group = shard_group(tensors.params)
    if group is not None:
        torch.distributed.all_reduce(squares, group=group)
    adam, inverse = squares.sqrt().tolist()
    return [torch.tensor(ck * ck * a / b if b > 0.0 else 0.0, dtype=torch.float32)
            for a, b, ck in zip(adam, inverse, c)]


def _held_norm_squares(tensors: StepTensors, hyper: Hyper, batch: list[int], eps_c: list[float],
                       one_tensor: OneTensorNorms | None) -> Tensor:
    """[2, len(batch)] squared norms of m/den and m*den with the moments the coming update will leave."""
    g = [grad_like_param(tensors.params[i], tensors.grads[i]).float() for i in batch]
    if hyper.maximize:
        g = torch._foreach_neg(g)
    if one_tensor is not None:
        pairs = [one_tensor(tensors.exp_avgs[i], tensors.exp_avg_sqs[i], gi, e, hyper)
                 for i, gi, e in zip(batch, g, eps_c)]
        return torch.stack(pairs, 1).double().square()
    m = torch._foreach_lerp([local(tensors.exp_avgs[i]).float() for i in batch], g, 1.0 - hyper.beta1)
    v = torch._foreach_mul([local(tensors.exp_avg_sqs[i]).float() for i in batch], hyper.beta2)
    torch._foreach_addcmul_(v, g, g, 1.0 - hyper.beta2)
    den = torch._foreach_sqrt(v)
    torch._foreach_add_(den, eps_c)
    norms = [torch._foreach_norm(torch._foreach_div(m, den)), torch._foreach_norm(torch._foreach_mul(m, den))]
    return torch.stack([torch.stack(x).double() for x in norms]).square()


def shard_group(params: Sequence[Tensor]) -> Any:
    """The process group of the parameters' device mesh when they are DTensors (FSDP2), else None."""
    mesh = getattr(params[0], "device_mesh", None) if params else None
    if mesh is None:
        return None
    if mesh.ndim != 1:
        raise NotImplementedError("inverse_scale='norm' needs the norms of whole tensors: DTensor parameters on "
                                  f"a {mesh.ndim}-D device mesh are not supported (FSDP2's 1-D mesh is)")
    return mesh.get_group()


def _fp32(xs: list[Tensor]) -> list[Tensor]:
    return [x.float() for x in xs]


def stochastic_round_to_bf16(x: Tensor) -> Tensor:
    """``x`` (fp32) rounded to bf16 up or down at random, with the expected value of the result equal to ``x``.

    Uniform random bits are added to the 16 low bits of the fp32 pattern, then those bits are dropped: the
    pattern carries into the next bf16 with probability (low bits) / 2**16, which within a binade is the
    distance to the lower bf16 over the spacing. Round-to-nearest would drop every update smaller than half
    a bf16 ulp of the weight; this keeps them on average. The noise comes from torch's generator (seeded by
    ``torch.manual_seed``); plain torch ops, so it also runs inside ``torch.compile``. inf stays inf and
    arithmetic (quiet) NaNs stay NaN; a finite value within half an ulp of the bf16 maximum may round to inf.
    """
    bits = x.float().view(torch.int32)
    noise = torch.randint_like(bits, 1 << 16)
    # Two's complement addition is the unsigned one: for negative values the carry also raises the magnitude.
    return ((bits + noise) & _BF16_HIGH_BITS).view(torch.float32).to(torch.bfloat16)


def write_param(p: Tensor, work: Tensor, stochastic_round: bool) -> None:
    """Store the fp32 result ``work`` into the parameter ``p``: the one place every path decides how. bf16
    parameters with ``stochastic_round`` (``bf16_stochastic_round``) are rounded up or down at random
    (unbiased); others by ``copy_`` (round to nearest). Plain torch ops, so it also runs inside
    ``torch.compile`` (there ``p.dtype`` is static)."""
    if stochastic_round and p.dtype == torch.bfloat16:
        p.copy_(stochastic_round_to_bf16(work))
    else:
        p.copy_(work)


def single_tensor(tensors: StepTensors, hyper: Hyper) -> None:
    """The plain path: one parameter at a time, written to read like the formulas."""
    lr, b1, b2 = float(hyper.lr), hyper.beta1, hyper.beta2
    count_step(tensors)
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
            write_param(p, work, hyper.bf16_stochastic_round)
        if m is not m_in:
            m_in.copy_(m)
            v_in.copy_(v)


def _blocks(items: list[tuple], block: int | None) -> Iterator[list[tuple]]:
    """Batches of (p, g, m, v, coefficients) of about ``block`` elements: large contiguous tensors cut into
    views, small ones gathered so each foreach call does a useful amount of work. ``block=None``: one batch."""
    if block is None:
        yield items
        return
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


def _scalar_or_list(values: list[float]) -> float | list[float]:
    # One scalar when every tensor shares it: a scalar foreach overload, no per-tensor list to build.
    first = values[0]
    return first if all(x == first for x in values) else values


def _negated(values: list[float]) -> float | list[float]:
    out = _scalar_or_list(values)
    return -out if isinstance(out, float) else [-x for x in out]


def takes_adamw_fused(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor) -> bool:
    """Whether torch's fused AdamW kernel can update this tensor: one dtype for p, g, m, v (it keeps no fp32
    moments for low-precision params), contiguous, and the step on the parameters' device."""
    return (p.device.type in ("cpu", "cuda") and p.dtype == g.dtype == m.dtype == v.dtype
            and step.device == p.device and all(t.is_contiguous() and t.device == p.device for t in (p, g, m, v)))


def adamw_fused(tensors: StepTensors, hyper: Hyper) -> None:
    """Past the blend the update is exactly AdamW's: torch's fused kernel does it in one pass per element
    (CPU and CUDA), with the step counters already counted by the caller. Every tensor must pass
    :func:`takes_adamw_fused`; they may mix devices and dtypes (one call per group of both)."""
    cache = tensors.counts.cache if tensors.counts is not None else {}
    groups = cache.get("adamw-groups")
    if groups is None:  # (device, indices) per device and dtype, kept while the tensors stay put
        by_key: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(tensors.params):
            by_key[(p.device, p.dtype)].append(i)
        groups = cache["adamw-groups"] = [(key[0], indices) for key, indices in by_key.items()]
    for device, indices in groups:
        p, g, m, v, steps = ([local(xs[i]) for i in indices] for xs in tensors[:5])
        lr = hyper.lr
        if isinstance(lr, Tensor) and lr.device != device:
            lr = lr.to(device)
        torch._fused_adamw_(p, g, m, v, [], steps, lr=lr, beta1=hyper.beta1, beta2=hyper.beta2,
                            weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=hyper.maximize)


def foreach(tensors: StepTensors, hyper: Hyper, block: int | None = None) -> None:
    """The multi-tensor path: foreach ops with per-tensor coefficients, over L2-sized blocks on CPU and one
    call per op per dtype group elsewhere.

    Parameters may sit at different steps (missing gradients): each tensor gets its own folded coefficients,
    computed once per distinct step. A tensor ``lr`` is read once on the host.
    """
    if not tensors.params:
        return
    lr = float(hyper.lr)
    hyper = dataclasses.replace(hyper, lr=lr)
    count_step(tensors)
    scales = scales_of(tensors)
    decay = 1.0 - lr * hyper.weight_decay
    steps = _host_steps(tensors)
    folded: dict[tuple[float, float], tuple] = {}
    buckets: dict[tuple, list] = defaultdict(list)
    for i, p, g, m, v in prepare(tensors):
        key = (steps[i], scales[i])
        if key not in folded:
            folded[key] = fold(steps[i], hyper, scales[i])[:3]
        buckets[(p.dtype, g.dtype, m.dtype, p.device.type == "cpu")].append((p, g, m, v, folded[key]))
    for (p_dtype, g_dtype, s_dtype, on_cpu), items in buckets.items():
        for batch in _blocks(items, (block or FOREACH_BLOCK) if on_cpu else None):
            p, g, m, v, coefs = (list(x) for x in zip(*batch, strict=True))
            work = _fp32(p) if p_dtype in LOW_PRECISION else p
            m_work, v_work = (_fp32(m), _fp32(v)) if s_dtype in LOW_PRECISION else (m, v)
            g_work = _fp32(g) if g_dtype != m_work[0].dtype else g
            _foreach_update(work, g_work, m_work, v_work, coefs, hyper, decay)
            if work is not p and hyper.bf16_stochastic_round and p_dtype == torch.bfloat16:
                for p_k, w_k in zip(p, work):  # bit operations have no foreach form
                    write_param(p_k, w_k, True)
            elif work is not p:
                torch._foreach_copy_(p, work)
            if m_work is not m:
                torch._foreach_copy_(m, m_work)
                torch._foreach_copy_(v, v_work)


def _foreach_update(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], coefs: list[tuple],
                    hyper: Hyper, decay: float) -> None:
    """The folded update (see :func:`~dualadam_hf.schedule.fold`) on fp32 work lists; a coefficient entry is
    (adam, inverse, eps_c)."""
    adam, inverse, eps_c = ([cf[k] for cf in coefs] for k in range(3))
    if hyper.maximize:
        g = torch._foreach_neg(g)
    if decay != 1.0:
        torch._foreach_mul_(p, decay)
    torch._foreach_lerp_(m, g, 1.0 - hyper.beta1)
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_addcmul_(v, g, g, 1.0 - hyper.beta2)
    den = torch._foreach_sqrt(v)
    torch._foreach_add_(den, _scalar_or_list(eps_c))
    torch._foreach_addcdiv_(p, m, den, _negated(adam))
    if any(inverse):
        torch._foreach_addcmul_(p, m, den, _negated(inverse))


def _host_steps(tensors: StepTensors, counted: bool = True) -> list[float]:
    """Every tensor's step as numbers (``counted``: after this update's count): from the counts when all share
    one step, else one read of the step vector or of each step tensor."""
    counts = tensors.counts
    if counts is not None and counts.lowest == counts.highest:
        return [float(counts.lowest + counted)] * len(tensors.steps)
    if counts is not None and counts.vector is not None:
        return counts.vector.tolist()
    return [float(local(s)) for s in tensors.steps]


def coefficients(steps: Sequence[Tensor] | Tensor, scales: Sequence[Tensor] | None, hyper: Hyper,
                 device: torch.device, size: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`~dualadam_hf.schedule.fold` on the device for the single-pass paths, from already counted steps
    (a list of 0-d tensors, or a step vector used as it is): ([size, 3] float32 rows (adam, inverse, eps_c),
    decay as a 0-d float64 tensor). Rows past ``len(steps)`` (padding) get step 1 and scale 0. Float64 on the
    device: no host sync, nothing for a compiler to guard."""
    n = len(steps)
    size = size or n
    if isinstance(steps, Tensor) and size == n:
        t = steps.to(device, torch.float64)
    else:
        t = torch.ones(size, dtype=torch.float64, device=device)
        t[:n] = steps.to(device) if isinstance(steps, Tensor) else torch.stack(list(steps))
    scale: Any = 1.0
    if scales is not None:
        scale = torch.zeros(size, dtype=torch.float64, device=device)
        scale[:n] = torch.stack(list(scales)).to(device)
    lr = hyper.lr.to(device, torch.float64) if isinstance(hyper.lr, Tensor) else hyper.lr
    adam, inverse, eps_c, decay = fold(t, dataclasses.replace(hyper, lr=lr), scale)
    return torch.stack([adam, inverse, eps_c], 1).float(), torch.as_tensor(decay, dtype=torch.float64, device=device)
