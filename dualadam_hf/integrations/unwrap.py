"""Find the DualAdam inside optimizer wrappers (accelerate, DeepSpeed, SageMaker MP, ...)."""

from __future__ import annotations

from typing import Any

from ..optimizer import DualAdam

# accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO/FP16 optimizers and smp.DistributedOptimizer keep the
# optimizer they wrap in `.optimizer`; a few wrappers use `.base_optimizer` or `.optim`.
_WRAPPED_ATTRIBUTES = ("optimizer", "base_optimizer", "optim")


def find_dualadam(optimizer: Any) -> DualAdam | None:
    """Return the DualAdam (or InvAdam) at the bottom of a chain of optimizer wrappers, or None if there is none."""
    current = optimizer
    for _ in range(8):  # the bound stops a self-referencing wrapper from looping forever
        if isinstance(current, DualAdam):
            return current
        inner = next((getattr(current, a) for a in _WRAPPED_ATTRIBUTES if getattr(current, a, None) is not None), None)
        if inner is None or inner is current:
            return None
        current = inner
    return None
