"""The compiled CPU path: ``torch.compile`` over fixed-size buckets of tensors (issue 6).

Meant for CPU training and for DeepSpeed optimizer offload, where the step runs
on CPU. Design, chosen so that one compilation serves the whole run:

- The per-tensor coefficients (bias corrections, blend weight, lr) are
  computed from the step tensors in float64 by a few vectorized eager ops per
  step and enter the graph as a float32 tensor, so neither the blend schedule
  nor an lr scheduler changes anything Dynamo guards on. (Computed inside the
  graph, inductor inlined them, two pow per 16 elements, into the element loop.)
- Every tensor enters as a flat 1-D alias with a dynamic size, and every call
  takes exactly ``BUCKET`` quads (p, g, m, v); the last bucket is padded with
  tiny scratch tensors. Duck shaping is off during the call, so two sizes that
  happen to be equal on the first step are not assumed equal later.
- The boundary of the blend (``r >= switch_rate``) is a comparison of the
  integer-valued step with :func:`last_active_step`, computed on the host with
  the schedule's own arithmetic, so it cannot flip on rounding or FMA.
- Past the blend the update is AdamW's and goes to torch's fused AdamW kernel
  through the foreach path (:func:`_blend_is_over`).
- Every loop is parallel (``cpp.dynamic_threads``): inductor otherwise picks
  serial loops from the first call's sizes, see :func:`_get_compiled`.
- The routing and the flat aliases of p, m, v are built once and cached across
  steps (:class:`_Plan`); a step re-checks their addresses and layouts and
  flattens only the gradients.
- Cold compile is about 41 s on a 2-core CPU (BUCKET 32), independent of the
  number of tensors; the inductor cache makes later runs start in seconds.

Tensors the graph does not take (non-contiguous, fewer than 2 elements, which
dynamic shapes would specialize on) go through the eager foreach path.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as shape_config
from torch import Tensor

from . import functional
from .schedule import blend_weight, last_blend_step

__all__ = ["BUCKET", "compiled_dualadam", "hyper_vector", "last_active_step"]

# Quads per compiled call. Each call costs ~0.1 ms (guards, wrapper) plus one
# OpenMP thread wake-up, so fewer calls are faster; the one-time compile grows
# with BUCKET (measured cold, 200 tensors, 2 cores: 8 -> 26 s, 16 -> 30 s,
# 32 -> 41 s on idle cores). 32 put the step at 1.00-1.06x AdamW(fused=True)
# where 16 gave 1.04-1.14x (benchmarks/optimizer_step.py, README).
BUCKET = 32

_compiled_fn = None
_scratch: dict[tuple, tuple[Tensor, ...]] = {}


@functools.lru_cache(maxsize=64)
def last_active_step(switch_rate: float, inverse_only: bool = False) -> float:
    """The last step with a non-zero blend weight (inf if the blend never ends).

    ``blend_weight(t) > 0`` exactly when ``t <= last_active_step(...)``, checked
    against the schedule itself rather than re-derived. Cached: a pure function of
    the hyperparameters, asked for on every step (twice on the compiled path).
    """
    if inverse_only or switch_rate <= 0:
        return math.inf
    t = last_blend_step(switch_rate)
    while blend_weight(t + 1, switch_rate) > 0:
        t += 1
    while t > 0 and blend_weight(t, switch_rate) == 0:
        t -= 1
    return float(t)


def hyper_vector(
    *, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    switch_rate: float, inverse_only: bool, device: torch.device | str = "cpu",
) -> Tensor:
    """The float64 vector [lr, beta1, beta2, eps, weight_decay, switch_rate, last_active_step]."""
    sr = 0.0 if inverse_only else float(switch_rate)
    last = last_active_step(switch_rate, inverse_only)
    if isinstance(lr, Tensor):
        rest = torch.tensor([beta1, beta2, eps, weight_decay, sr, last], dtype=torch.float64, device=lr.device)
        return torch.cat([lr.detach().reshape(1).to(torch.float64), rest]).to(device)
    return torch.tensor([float(lr), beta1, beta2, eps, weight_decay, sr, last], dtype=torch.float64, device=device)


def _coefficients(t: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor update coefficients from the steps ``t`` (float64), eagerly and vectorized.

    Computed outside the graph: inductor would otherwise inline these scalar
    float64 ops (two pow per 16 elements) into the element loop.
    Returns ([n, 3] float32: adam, inv, eps*c) and (float32 [decay, 1-b1, b2, 1-b2]).
    """
    lr, b1, b2, eps, wd, sr, last = hp.unbind()
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    r = torch.where(t <= last, (1 - t * sr).clamp_min(0), 0)
    # d = sqrt(v/bc2) + eps = den / c with c = sqrt(bc2) and den = sqrt(v) + eps*c,
    # so mh/d = (c/bc1) * m/den and mh*d = m*den / (bc1*c).
    c = bc2.sqrt()
    per_tensor = torch.stack([lr * (1 - r) * c / bc1, lr * r / (bc1 * c), eps * c], 1).float()
    shared = torch.stack([1 - lr * wd, 1 - b1, b2, 1 - b2]).float()
    return per_tensor, shared


def _update(ps, gs, ms, vs, coef, shared, maximize: bool):
    """DualAdam on BUCKET flat quads, one fused loop each (DESIGN section 1)."""
    decay, w1, b2, w2 = shared.unbind()
    for k, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs, strict=True)):
        adam, inv, eps_c = coef[k].unbind()
        gf = -g.float() if maximize else g.float()
        m.copy_(m + w1 * (gf - m))
        v.copy_(v * b2 + w2 * gf * gf)
        den = v.sqrt() + eps_c
        p.copy_(p.float() * decay - adam * (m / den) - inv * (m * den))


def _get_compiled():
    global _compiled_fn
    if _compiled_fn is None:
        # size_asserts: the wrapper would check every input size in Python on every call.
        # cpp.dynamic_threads: inductor decides per loop whether to parallelize it from
        # the size hints of the *first* call (serial below 2 * 512 elements per thread),
        # and a graph with dynamic sizes is then reused for every size. A first call on
        # small tensors (or padding), or an inductor cache entry written by one, left
        # loops serial for good: the step ran on one core, ~1.8x AdamW(fused=True) on 2
        # cores. With it every loop is an OpenMP work-sharing loop in one parallel region
        # per call (one thread wake-up per call; small loops only add a barrier).
        _compiled_fn = torch.compile(_update, dynamic=True, fullgraph=True,
                                     options={"size_asserts": False, "cpp.dynamic_threads": True})
    return _compiled_fn


def _scratch_quad(key: tuple, index: int) -> tuple[Tensor, ...]:
    """Distinct tiny tensors that pad the last bucket (distinct: Dynamo guards on aliasing)."""
    k = key + (index,)
    if k not in _scratch:
        p_dtype, g_dtype, s_dtype, device = key
        _scratch[k] = (
            torch.zeros(2, dtype=p_dtype, device=device), torch.zeros(2, dtype=g_dtype, device=device),
            torch.zeros(2, dtype=s_dtype, device=device), torch.zeros(2, dtype=s_dtype, device=device),
        )
    return _scratch[k]


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of ``t`` that is not a view and does not require grad.

    Dynamo guards on requires_grad (the padding never requires it) and on the
    base of a view (the base's rank would then be part of the guard, and a
    model with other shapes would recompile); the last detach() drops the base.
    A 1-D tensor needs only the detach (~0.5 us against ~2.5 us).
    """
    if t.dim() == 1:
        return t.detach()
    return t.detach().view(-1).detach()


def _takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    return p.numel() >= 2 and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()


def _signature(*lists: Sequence[Tensor]) -> list[tuple]:
    """What a flat alias of each tensor depends on.

    The cached aliases keep their storage alive, so no other tensor can have the
    same address: same address, shape, strides and dtype means the same memory
    in the same layout (this catches ``p.data = ...`` too, which keeps ``p``).
    """
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for ts in lists for t in ts]


class _Plan:
    """One call's routing: buckets of flat aliases of p, m, v with their padding, and the fallbacks.

    Building it (``_prepare``, the routing, flattening p, m and v) cost ~2-3 ms
    per step for the 122 tensors of benchmarks/optimizer_step.py, 5-8% of the
    step (benchmarks/NOTES_compiled.md). An optimizer
    passes the same p, m, v every step, so a plan of plain tensors is cached and
    a step then only checks their signature and flattens the gradients, which
    may be new tensors every step (and are not kept, so set_to_none frees them).
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, state_steps):
        prepared = functional._prepare(params, grads, exp_avgs, exp_avg_sqs)
        kept = {quad[0] for quad in prepared}
        self.empty = [i for i in range(len(params)) if i not in kept]
        self.rest: list[int] = []
        groups: dict[tuple, list] = defaultdict(list)
        for i, p, g, m, v in prepared:
            if _takes(p, g, m, v):
                groups[(p.dtype, g.dtype, m.dtype, p.device)].append((i, p, m, v))
            else:
                self.rest.append(i)
        # DTensor shards are new objects every step: such a plan is rebuilt each step.
        self.plain = all(p is params[i] and m is exp_avgs[i] and v is exp_avg_sqs[i]
                         for i, p, _, m, v in prepared)
        self.plain = self.plain and all(functional._local(s) is s for s in state_steps)
        # Per dtype/device key: (key, indices, chunks); a chunk is (indices, P, G padding, M, V).
        # Steps are looked up per call, not kept: the plan must not keep them alive (see _plans).
        self.buckets = []
        for key, items in groups.items():
            chunks = []
            for c in range(0, len(items), BUCKET):
                chunk = items[c:c + BUCKET]
                pad = [_scratch_quad(key, j) for j in range(BUCKET - len(chunk))]
                # item is (i, p, m, v); a padding quad is (p, g, m, v).
                P, M, V = ([_flat(item[k]) for item in chunk] + [q[k_pad] for q in pad]
                           for k, k_pad in ((1, 0), (2, 2), (3, 3)))
                chunks.append(([item[0] for item in chunk], P, [q[1] for q in pad], M, V))
            self.buckets.append((key, [item[0] for item in items], chunks))
        self.bucketed = [i for _, _, chunks in self.buckets for chunk in chunks for i in chunk[0]]
        self.grad_signature = self._grad_signature(grads)
        self.signature = _signature(params, exp_avgs, exp_avg_sqs) if self.plain else None

    def _grad_signature(self, grads) -> list[tuple]:
        return [(grads[i].dtype, grads[i].is_contiguous()) for i in self.bucketed]

    def matches(self, params, grads, exp_avgs, exp_avg_sqs) -> bool:
        return (self.signature == _signature(params, exp_avgs, exp_avg_sqs)
                and self.grad_signature == self._grad_signature(grads))

    def run(self, params, grads, state_steps, *, maximize: bool, **hyper) -> None:
        fn = _get_compiled()
        for key, indices, chunks in self.buckets:
            hp = hyper_vector(**hyper, device=key[3])
            steps = [state_steps[i] for i in indices] if self.plain else [
                functional._local(state_steps[i]) for i in indices]
            torch._foreach_add_(steps, 1.0)
            t = torch.ones(len(chunks) * BUCKET, dtype=torch.float64, device=key[3])
            t[: len(steps)] = torch.stack(steps)
            coef, shared = _coefficients(t, hp)
            for (idx, P, G_pad, M, V), rows in zip(chunks, coef.view(-1, BUCKET, 3).unbind(0), strict=True):
                gs = (grads[i] for i in idx) if self.plain else (
                    functional._grad_like_param(params[i], grads[i]) for i in idx)
                # rows.detach() drops the view's base (coef), whose shape Dynamo would guard on.
                fn(P, [_flat(g) for g in gs] + G_pad, M, V, rows.detach(), shared, maximize)


# Cached plans, keyed by the ids of the step tensors (one optimizer state entry
# each). A weakref callback on every step tensor drops the plan when any of them
# dies (optimizer deleted, state reloaded), so its aliases never outlive the
# state, and an id is never reused while its plan is cached.
# At most _MAX_PLANS are kept (oldest dropped): each pattern of missing gradients
# is its own key, and ZeRO-3 steps each sub-group separately.
_plans: dict[tuple[int, ...], tuple[_Plan, list]] = {}
_MAX_PLANS = 64


def _plan_for(params, grads, exp_avgs, exp_avg_sqs, state_steps) -> _Plan:
    key = tuple(map(id, state_steps))
    cached = _plans.get(key)
    if cached is not None and cached[0].matches(params, grads, exp_avgs, exp_avg_sqs):
        return cached[0]
    plan = _Plan(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if plan.plain:
        def drop(_ref, key=key):
            _plans.pop(key, None)

        _plans[key] = (plan, [weakref.ref(s, drop) for s in state_steps])
        while len(_plans) > _MAX_PLANS:
            _plans.pop(next(iter(_plans)))
    return plan


def _blend_is_over(state_steps: Sequence[Tensor], switch_rate: float, inverse_only: bool) -> bool:
    """Whether the coming step of every tensor has blend weight 0 (reads CPU step tensors only)."""
    last = last_active_step(switch_rate, inverse_only)
    if math.isinf(last):
        return False
    steps = [functional._local(s) for s in state_steps]
    if any(s.device.type != "cpu" for s in steps):
        return False
    return min(float(s) for s in steps) >= last


def compiled_dualadam(
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
    """Same contract as :func:`dualadam_hf.functional.dualadam_foreach`; increments the steps."""
    if not params:
        return
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 switch_rate=switch_rate, inverse_only=inverse_only, maximize=maximize)
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if _blend_is_over(state_steps, switch_rate, inverse_only):
        # Past the blend the update is AdamW's: the foreach path hands it to torch's
        # fused AdamW kernel, which is a little faster than this graph.
        functional.dualadam_foreach_subset(range(len(params)), *tensors, **hyper)
        return
    plan = _plan_for(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if plan.empty:
        # Empty shards still count a step, as on the other paths.
        torch._foreach_add_([state_steps[i] for i in plan.empty], 1.0)
    if plan.buckets:
        # Duck shaping would guard sizes that are equal on the first step as equal
        # forever. Set directly: config.patch() costs ~0.1 ms per call.
        duck = shape_config.use_duck_shape
        shape_config.use_duck_shape = False
        try:
            plan.run(params, grads, state_steps, **hyper)
        finally:
            shape_config.use_duck_shape = duck
    if plan.rest:
        functional.dualadam_foreach_subset(plan.rest, *tensors, **hyper)
