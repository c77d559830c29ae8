"""The blend-weight schedule of DualAdam (DESIGN section 1).

The blend weight ``r`` is the share of the inverse-Adam step in the update. It
starts at 1 - switch_rate, falls linearly by ``switch_rate`` per optimizer step,
and once it drops below ``switch_rate`` the update is plain Adam.
"""

from __future__ import annotations

import math

_TOLERANCE = 1e-12


def blend_weight(step: int | float, switch_rate: float) -> float:
    """Effective weight of the inverse step at optimizer step ``step`` (1-based).

    Returns 0.0 once the blend is spent (``r < switch_rate``), so callers can use
    the value directly: ``u = (1 - r) * mh / d + r * mh * d``.
    """
    r = max(0.0, 1.0 - float(step) * switch_rate)
    # The rule is r >= switch_rate in exact arithmetic; without the tolerance
    # 1 - 4*0.2 rounds just under 0.2 and blend_steps=5 would lose its last step.
    return r if r >= switch_rate - _TOLERANCE else 0.0


def switch_rate_from_steps(blend_steps: int | float) -> float:
    """The switch rate that spends the blend over ``blend_steps`` optimizer steps."""
    if not blend_steps >= 1:
        raise ValueError(f"blend_steps must be >= 1, got {blend_steps!r}")
    return 1.0 / float(blend_steps)


def switch_rate_from_fraction(blend_fraction: float, total_steps: int) -> float:
    """The switch rate that spends the blend over ``blend_fraction`` of ``total_steps``."""
    if not 0.0 < blend_fraction <= 1.0:
        raise ValueError(f"blend_fraction must be in (0, 1], got {blend_fraction!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 to resolve blend_fraction, got {total_steps!r}")
    return switch_rate_from_steps(max(1, math.ceil(blend_fraction * total_steps)))


def last_blend_step(switch_rate: float) -> int:
    """The last step whose update still holds an inverse part (0 if none)."""
    if switch_rate <= 0:
        return math.inf  # type: ignore[return-value]
    # r >= switch_rate  <=>  t <= 1/switch_rate - 1
    t = math.floor((1.0 - switch_rate) / switch_rate + 1e-9)
    while t > 0 and blend_weight(t, switch_rate) == 0.0:
        t -= 1
    while blend_weight(t + 1, switch_rate) > 0.0:
        t += 1
    return max(t, 0)
