"""The DualAdam rule's scalars, written once: the hyperparameter record, the blend schedule and the
coefficients every fast update path folds the bias corrections into.

Per element, for a parameter at its own step ``t`` (1, 2, ... kept in its optimizer state)::

    m  = b1*m + (1-b1)*g            v  = b2*v + (1-b2)*g*g
    mh = m / (1 - b1**t)            d  = sqrt(v / (1 - b2**t)) + eps
    r  = 1 - t*switch_rate  while r >= switch_rate, else 0      (the blend weight)
    u  = (1-r)*mh/d + r*s*mh*d                                  (s = inverse_scale, 1 in the paper)
    p  = p - lr*weight_decay*p ;  p = p - lr*u

``switch_rate = 0`` holds r at 1 forever: that is InvAdam, the inverse rule alone. ``s`` is a research
option beyond the paper (see ``DualAdam``'s ``inverse_scale``); ``s = 0`` turns the blend into a plain
linear learning-rate warmup of Adam over the same steps.

The functions below take Python floats or tensors for ``step`` (and ``lr``), so the eager paths, the
compiled path and the fused kernel's launcher share one piece of code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

# The rule r >= switch_rate is meant in exact arithmetic: with switch_rate = 1/5, 1 - 4*0.2 rounds to
# 0.19999999999999996 and the fifth-step boundary would move by one step. A relative tolerance far above
# the rounding (1e-16) and far below any meaningful difference of rates keeps the intended boundary.
_RTOL = 1e-9


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one update: ``lr`` may be a tensor (as in torch), the rest are plain numbers.
    ``hold_norm`` (``inverse_scale="norm"``): each tensor's inverse scale is set at every step so that the
    inverse part's norm equals the Adam part's (:func:`dualadam_hf.functional.held_norm_scales`).
    ``bf16_stochastic_round``: bf16 parameters are written back from fp32 with stochastic rounding
    (:func:`dualadam_hf.functional.stochastic_round_to_bf16`); other dtypes are unaffected."""

    lr: Any
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    switch_rate: float
    inverse_scale: float = 1.0
    maximize: bool = False
    hold_norm: bool = False
    bf16_stochastic_round: bool = False


@functools.lru_cache(maxsize=256)
def last_blend_step(switch_rate: float) -> float:
    """The last step whose update holds an inverse part: inf when ``switch_rate`` is 0, 0 if none.

    In exact arithmetic r >= switch_rate  <=>  t <= 1/switch_rate - 1, so ``blend_steps = N``
    (switch_rate 1/N) blends steps 1 .. N-1 and step N is plain Adam. Cached: asked for every step.
    """
    if switch_rate <= 0:
        return math.inf

    def blended(t: int) -> bool:
        return 1.0 - t * switch_rate >= switch_rate * (1.0 - _RTOL)

    quotient = (1.0 - switch_rate * (1.0 - _RTOL)) / switch_rate
    if not quotient < 2.0**53:  # a subnormal rate overflows to inf; past 2**53 steps no run gets there
        return math.inf
    t = math.floor(quotient)
    # The division rounds: step to the boundary exactly as blended() evaluates it (a step or two at most;
    # bounded, as for a tiny switch_rate one step no longer changes t * switch_rate).
    for _ in range(4):
        if t > 0 and not blended(t):
            t -= 1
        elif blended(t + 1):
            t += 1
        else:
            break
    return float(max(t, 0))


def blend_weight(step: Any, switch_rate: float) -> Any:
    """The blend weight r at ``step`` (1-based, a number or a tensor): 1 - step*switch_rate while that is at
    least switch_rate (through :func:`last_blend_step`), then 0."""
    # + 0.0: past the blend the product is -0.0 (a negative number times False), shown as "-0" in logs.
    return (1.0 - step * switch_rate) * (step <= last_blend_step(switch_rate)) + 0.0


def bias_corrections(step: Any, hyper: Hyper) -> tuple[Any, Any]:
    """(bc1, c) at ``step``: bc1 = 1 - b1**t divides m into mh, and c = sqrt(1 - b2**t) turns
    den = sqrt(v) + eps*c into the update's d = den/c. ``step`` may be a number or a tensor."""
    return 1.0 - hyper.beta1**step, (1.0 - hyper.beta2**step) ** 0.5


def fold(step: Any, hyper: Hyper, scale: Any = 1.0) -> tuple[Any, Any, Any, Any]:
    """The coefficients of the update in the form the fast paths compute it:

        den = sqrt(v) + eps_c ;   p = decay*p - adam * m/den - inverse * m*den

    With c = sqrt(1 - b2**t) the update's d equals den/c, so
    lr*(1-r)*mh/d = lr*(1-r)*c/bc1 * m/den and lr*r*s*mh*d = lr*r*s/(bc1*c) * m*den: the bias
    corrections become scalars and den is the only temporary. ``scale`` is a per-tensor factor on top of
    ``hyper.inverse_scale`` (the calibrated scale of ``inverse_scale="auto"``). ``step`` and ``scale``
    may be tensors (one entry per parameter tensor); ``step`` must already count the coming update.
    Returns (adam, inverse, eps_c, decay).
    """
    bc1, c = bias_corrections(step, hyper)
    r, lr = blend_weight(step, hyper.switch_rate), hyper.lr
    return (lr * (1.0 - r) * c / bc1, lr * r * (hyper.inverse_scale * scale) / (bc1 * c), hyper.eps * c,
            1.0 - lr * hyper.weight_decay)


def next_moments(m: Any, v: Any, g: Any, beta1: float, beta2: float) -> tuple[Any, Any]:
    """Adam's moment update, out of place: the (m, v) a step with gradient ``g`` leaves. The update and what
    previews it (the held norm reads the moments the coming step will leave) share it."""
    return m.lerp(g, 1.0 - beta1), v * beta2 + (1.0 - beta2) * g * g


def folded_update(p: Any, g: Any, m: Any, v: Any, beta1: float, beta2: float, adam: Any, inverse: Any, eps_c: Any,
                  decay: Any) -> tuple[Any, Any, Any]:
    """One step in the form of :func:`fold`, element-wise and out of place, from its coefficients: the new
    (p, m, v). ``g`` already carries the sign of ``maximize``. The compiled paths write the results back
    themselves (:mod:`dualadam_hf.compiled` in place, :mod:`dualadam_hf.lowbit` into quantized state)."""
    m, v = next_moments(m, v, g, beta1, beta2)
    den = v.sqrt() + eps_c
    return p * decay - adam * (m / den) - inverse * (m * den), m, v


def switch_rate_from_steps(blend_steps: int) -> float:
    """The switch rate 1/N of ``blend_steps = N`` (a positive integer): steps 1 .. N-1 carry the inverse part
    (r = 1 - t/N, down to 1/N) and from step N on the update is plain Adam."""
    # At most 2**53 steps: beyond, 1/N is no longer a rate whose steps float arithmetic can count (and an int
    # past float's range would not convert at all).
    if isinstance(blend_steps, bool) or not isinstance(blend_steps, (int, float)) or not (
            1 <= blend_steps <= 2**53 and float(blend_steps).is_integer()):
        raise ValueError(f"blend_steps must be a whole number of optimizer steps from 1 to 2**53, got {blend_steps!r} "
                         "(for the inverse rule throughout use InvAdam, i.e. switch_rate=0)")
    return 1.0 / int(blend_steps)


def switch_rate_from_fraction(blend_fraction: float, total_steps: int) -> float:
    """The switch rate of ``blend_steps = ceil(blend_fraction * total_steps)`` (see :func:`switch_rate_from_steps`)."""
    if not 0.0 < blend_fraction <= 1.0:
        raise ValueError(f"blend_fraction must be in (0, 1], got {blend_fraction!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 to resolve blend_fraction, got {total_steps!r}")
    return switch_rate_from_steps(max(1, math.ceil(blend_fraction * total_steps)))
