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
- Cold compile is about 47 s on a 2-core CPU (BUCKET 8), independent of the
  number of tensors; the inductor cache makes later runs start in seconds.

Tensors the graph does not take (non-contiguous, fewer than 2 elements, which
dynamic shapes would specialize on) go through the eager foreach path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as shape_config
from torch import Tensor

from . import functional
from .schedule import blend_weight, last_blend_step

__all__ = ["BUCKET", "compiled_dualadam", "hyper_vector", "last_active_step"]

# Quads per compiled call. Larger buckets cut per-call overhead on small tensors
# but make the one-time compile longer (the graph holds BUCKET loops).
BUCKET = 8

_compiled_fn = None
_scratch: dict[tuple, tuple[Tensor, ...]] = {}


def last_active_step(switch_rate: float, inverse_only: bool = False) -> float:
    """The last step with a non-zero blend weight (inf if the blend never ends).

    ``blend_weight(t) > 0`` exactly when ``t <= last_active_step(...)``, checked
    against the schedule itself rather than re-derived.
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
        _compiled_fn = torch.compile(_update, dynamic=True, fullgraph=True, options={"size_asserts": False})
    return _compiled_fn


def _scratch_quad(key: tuple, index: int) -> tuple[Tensor, ...]:
    """Distinct tiny tensors that pad the last bucket (distinct: Dynamo guards on aliasing)."""
    k = key + (index,)
    if k not in _scratch:
        p_dtype, g_dtype, s_dtype, device = key
        _scratch[k] = (
            torch.zeros(2, dtype=p_dtype, device=device), torch.zeros(2, dtype=g_dtype, device=device),
            torch.zeros(2, dtype=s_dtype, device=device), torch.zeros(2, dtype=s_dtype, device=device),
            torch.zeros((), dtype=torch.float32, device=device),
        )
    return _scratch[k]


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of ``t`` that is not a view and does not require grad.

    Dynamo guards on requires_grad (the padding never requires it) and on the
    base of a view (the base's rank would then be part of the guard, and a
    model with other shapes would recompile); the last detach() drops the base.
    """
    return t.detach().view(-1).detach()


def _takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    return p.numel() >= 2 and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()


def _run_buckets(buckets: dict[tuple, list], *, maximize: bool, **hyper) -> None:
    fn = _get_compiled()
    for key, quads in buckets.items():
        hp = hyper_vector(**hyper, device=key[3])
        steps = [q[4] for q in quads]
        torch._foreach_add_(steps, 1.0)
        n_chunks = -(-len(quads) // BUCKET)
        t = torch.ones(n_chunks * BUCKET, dtype=torch.float64, device=key[3])
        t[: len(quads)] = torch.stack(steps)
        coef, shared = _coefficients(t, hp)
        for c, rows in enumerate(coef.view(n_chunks, BUCKET, 3).unbind(0)):
            chunk = quads[c * BUCKET:(c + 1) * BUCKET]
            chunk += [_scratch_quad(key, j) for j in range(BUCKET - len(chunk))]
            p, g, m, v = ([q[i] for q in chunk] for i in range(4))
            # detach() drops the view's base, whose shape Dynamo would guard on.
            fn(p, g, m, v, rows.detach(), shared, maximize)


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
    prepared = functional._prepare(params, grads, exp_avgs, exp_avg_sqs)
    buckets: dict[tuple, list] = defaultdict(list)
    rest: list[int] = []
    for i, p, g, m, v in prepared:
        step = functional._local(state_steps[i])
        if _takes(p, g, m, v):
            buckets[(p.dtype, g.dtype, m.dtype, p.device)].append((*map(_flat, (p, g, m, v)), step))
        else:
            rest.append(i)
    empty = sorted(set(range(len(params))) - {quad[0] for quad in prepared})
    if empty:
        # Empty shards still count a step, as on the other paths.
        torch._foreach_add_([state_steps[i] for i in empty], 1.0)
    if buckets:
        # Duck shaping would guard sizes that are equal on the first step as equal
        # forever. Set directly: config.patch() costs ~0.1 ms per call.
        duck = shape_config.use_duck_shape
        shape_config.use_duck_shape = False
        try:
            _run_buckets(buckets, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         switch_rate=switch_rate, inverse_only=inverse_only, maximize=maximize)
        finally:
            shape_config.use_duck_shape = duck
    if rest:
        functional.dualadam_foreach(
            [params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
            [exp_avg_sqs[i] for i in rest], [state_steps[i] for i in rest],
            lr=float(lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            switch_rate=switch_rate, inverse_only=inverse_only, maximize=maximize,
        )
