"""The compiled CPU path: ``torch.compile`` over fixed-size buckets of tensors (``fused=True`` on CPU).

For CPU training and DeepSpeed optimizer offload. One compilation serves the whole run:

- The per-tensor coefficients (:func:`dualadam_hf.schedule.fold` on a float64 vector of steps) enter the
  graph as a tensor, so neither the blend nor an lr scheduler changes anything Dynamo guards on. (Computed
  inside the graph, inductor inlined two pow per 16 elements into the element loop.)
- Every tensor enters as a flat 1-D alias with a dynamic size, every call takes exactly ``BUCKET`` quads
  (p, g, m, v; the last bucket padded with scratch tensors), and duck shaping is off during the call, so
  sizes equal on the first step are not assumed equal later.
- Past the blend the dispatcher (``dualadam_hf.update``) hands the update to torch's fused AdamW kernel.
- The routing and the flat aliases are cached across steps (:class:`_CompiledBuckets`).

Cold compile: about 42 s on 2 idle cores, whatever the number of tensors; the inductor cache makes later
processes start in seconds (docs/performance.md has the measurements behind these choices).
Non-contiguous, float64 and 0/1-element tensors (dynamic shapes specialize on those sizes) are left to the
caller (the eager foreach path); the graph computes in float32.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as shape_config
from torch import Tensor

from .functional import StepTensors, coefficients, grad_like_param, local, prepare, write_param
from .schedule import Hyper, folded_update

__all__ = ["BUCKET", "compiled"]

# Quads per compiled call: each call costs ~0.1 ms plus one OpenMP wake-up, and the one-time compile grows
# with BUCKET (cold, 200 tensors, 2 cores under a load of about 1: 8 -> 26 s, 16 -> 30 s, 32 -> 48 s; 32 on idle
# cores: about 42 s); 32 put the step at 1.00-1.06x AdamW(fused=True) where 16 gave 1.04-1.14x
# (benchmarks/optimizer_step.py, docs/performance.md).
BUCKET = 32
GRAPH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_compiled_fn = None
_scratch: dict[tuple, tuple[Tensor, ...]] = {}


def _update(ps, gs, ms, vs, coef, shared, maximize: bool, stochastic: bool = False):
    """:func:`~dualadam_hf.schedule.folded_update` on BUCKET flat quads, written back in place, one fused loop
    each. ``shared`` holds (decay, beta1, beta2) as tensors, so that no setting is baked into the graph.
    ``stochastic``: the parameters (bf16) are written with stochastic rounding (see
    :func:`~dualadam_hf.functional.write_param`)."""
    decay, beta1, beta2 = shared.unbind()
    for k, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs, strict=True)):
        adam, inverse, eps_c = coef[k].unbind()
        gf = -g.float() if maximize else g.float()
        new, m_new, v_new = folded_update(p.float(), gf, m.float(), v.float(), beta1, beta2, adam, inverse, eps_c,
                                          decay)
        m.copy_(m_new)
        v.copy_(v_new)
        write_param(p, new, stochastic)


def _get_compiled():
    global _compiled_fn
    if _compiled_fn is None:
        # size_asserts: the wrapper would check every input size in Python on every call.
        # cpp.dynamic_threads: inductor picks serial or parallel per loop from the *first* call's sizes and
        # reuses the dynamic graph for every size, so a first call on small tensors left every loop serial
        # (one core, ~1.8x AdamW(fused=True)); with it every loop is parallel, one region per call.
        _compiled_fn = torch.compile(_update, dynamic=True, fullgraph=True,
                                     options={"size_asserts": False, "cpp.dynamic_threads": True})
    return _compiled_fn


def _scratch_quad(key: tuple, index: int) -> tuple[Tensor, ...]:
    """Distinct tiny tensors that pad the last bucket (distinct: Dynamo guards on aliasing)."""
    p_dtype, g_dtype, s_dtype, device = key
    if key + (index,) not in _scratch:
        _scratch[key + (index,)] = tuple(torch.zeros(2, dtype=d, device=device)
                                         for d in (p_dtype, g_dtype, s_dtype, s_dtype))
    return _scratch[key + (index,)]


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of ``t`` that is not a view and does not require grad: Dynamo guards on requires_grad
    (the padding never requires it) and on a view's base (its rank would enter the guard)."""
    if t.dim() == 1:
        return t.detach()
    return t.detach().view(-1).detach()


def _takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    return (p.numel() >= 2 and p.dtype in GRAPH_DTYPES and m.dtype in GRAPH_DTYPES
            and all(t.is_contiguous() for t in (p, g, m, v)))


def _signature(*lists: Sequence[Tensor]) -> list[tuple]:
    """What a flat alias of each tensor depends on. The cached aliases keep their storage alive, so the
    same address, shape, strides and dtype mean the same memory (``p.data = ...`` changes the address)."""
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for ts in lists for t in ts]


class _CompiledBuckets:
    """How one call routes its tensors to the compiled graph.

    It holds the buckets of flat aliases of p, m, v with their padding, and the indices left to the caller.
    Building it takes about 2 ms of a 40 ms step for 122 tensors (docs/performance.md), and an optimizer
    passes the same p, m, v every step, so it is kept in the optimizer's cache for these tensors. A step
    checks their signature and flattens only the gradients, which are new tensors every step (not kept:
    set_to_none frees them).
    """

    def __init__(self, tensors: StepTensors):
        prepared = list(prepare(tensors))
        kept = {quad[0] for quad in prepared}
        self.empty = [i for i in range(len(tensors.params)) if i not in kept]
        self.rest: list[int] = []
        groups: dict[tuple, list] = defaultdict(list)
        for i, p, g, m, v in prepared:
            if _takes(p, g, m, v):
                groups[(p.dtype, g.dtype, m.dtype, p.device)].append((i, p, m, v))
            else:
                self.rest.append(i)
        # DTensor shards are new objects every step: such buckets are rebuilt each step.
        self.plain = all(p is tensors.params[i] and m is tensors.exp_avgs[i] and v is tensors.exp_avg_sqs[i]
                         for i, p, _, m, v in prepared)
        self.plain = self.plain and all(local(s) is s for s in tensors.steps)
        # Per dtype/device key: (key, indices, chunks); a chunk is (indices, P, G padding, M, V).
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
        self.signature = self._signature(tensors) if self.plain else None

    def _signature(self, tensors: StepTensors) -> list[tuple]:
        grads = [(tensors.grads[i].dtype, tensors.grads[i].is_contiguous()) for i in self.bucketed]
        return _signature(tensors.params, tensors.exp_avgs, tensors.exp_avg_sqs) + grads

    def matches(self, tensors: StepTensors) -> bool:
        return self.signature == self._signature(tensors)

    def run(self, tensors: StepTensors, hyper: Hyper) -> None:
        fn = _get_compiled()
        for key, indices, chunks in self.buckets:
            device = key[3]
            # Only bf16 buckets take the rounding: one more graph for them, none for the other dtypes.
            stochastic = hyper.bf16_stochastic_round and key[0] == torch.bfloat16
            steps = [local(tensors.steps[i]) for i in indices]
            torch._foreach_add_(steps, 1.0)
            scales = None if tensors.scales is None else [tensors.scales[i] for i in indices]
            coef, decay = coefficients(steps, scales, hyper, device, len(chunks) * BUCKET)
            shared = torch.stack([decay, *torch.tensor([hyper.beta1, hyper.beta2], dtype=torch.float64,
                                                       device=device)]).float()
            for (idx, P, G_pad, M, V), rows in zip(chunks, coef.view(-1, BUCKET, 3).unbind(0), strict=True):
                gs = (tensors.grads[i] for i in idx) if self.plain else (
                    grad_like_param(tensors.params[i], tensors.grads[i]) for i in idx)
                # rows.detach() drops the view's base (coef), whose shape Dynamo would guard on.
                fn(P, [_flat(g) for g in gs] + G_pad, M, V, rows.detach(), shared, hyper.maximize, stochastic)


def _buckets_for(tensors: StepTensors) -> _CompiledBuckets:
    """The buckets kept in the optimizer's cache for these tensors (they die with the optimizer's group
    operands, which are dropped when a parameter or a state tensor moves); rebuilt when the gradients' dtypes
    or layout change."""
    cache = tensors.counts.cache if tensors.counts is not None else None
    routing = None if cache is None else cache.get("compiled")
    if routing is not None and routing.matches(tensors):
        return routing
    routing = _CompiledBuckets(tensors)
    if cache is not None and routing.plain:
        cache["compiled"] = routing
    return routing


def compiled(tensors: StepTensors, hyper: Hyper) -> list[int]:
    """The compiled update of every tensor the graph takes; returns the indices of those it left (see the
    module's notes), whose steps it did not count."""
    if not tensors.params:
        return []
    routing = _buckets_for(tensors)
    if routing.empty:
        # Empty shards still count a step, as on the other paths.
        torch._foreach_add_([local(tensors.steps[i]) for i in routing.empty], 1.0)
    if routing.buckets:
        # Duck shaping would guard sizes that are equal on the first step as equal
        # forever. Set directly: config.patch() costs ~0.1 ms per call.
        duck = shape_config.use_duck_shape
        shape_config.use_duck_shape = False
        try:
            routing.run(tensors, hyper)
        finally:
            shape_config.use_duck_shape = duck
    return routing.rest
