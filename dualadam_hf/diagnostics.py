"""What an update did, read back from the optimizer state: the norms of its Adam and inverse parts and the
inverse part's share of the update.

They read moments and steps only (no gradients, nothing written), so they cost nothing unless called.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .functional import NORM_BATCH, local
from .schedule import Hyper, blend_weight, fold


def update_norms(exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
                 hyper: Hyper, scales: Sequence[Tensor] | None = None,
                 one_tensor: Callable[[Tensor, Tensor, float], Tensor] | None = None) -> tuple[float, float]:
    """Squared norms of the Adam part (1-r)*mh/d and the inverse part r*s*mh*d of the latest update, over
    this process's elements (local shards), from the moments and steps it left behind.

    One pass of foreach ops per (device, dtype) group and two reads of the host (the steps, the norms): with
    den = sqrt(v) + eps*c and c = sqrt(1 - b2**t), mh/d = (c/bc1) * m/den and mh*d = m*den / (bc1*c), so per
    tensor the two norms are those of m/den and m*den times scalars. With ``hyper.hold_norm`` the inverse
    direction had the Adam direction's norm by construction, so no second norm is needed. ``one_tensor(m, v,
    eps*c)`` computes one tensor's [||m/den||, ||m*den||] instead of the foreach batches, for moments those
    cannot read (low-bit state: quantized). The scalars are :func:`~dualadam_hf.schedule.fold`'s, at lr 1."""
    if not steps:
        return 0.0, 0.0
    step_values = _numbers(steps)
    scale_values = [1.0] * len(steps) if scales is None else _numbers(scales)
    unit = replace(hyper, lr=1.0)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for m, v, t, scale in zip(exp_avgs, exp_avg_sqs, step_values, scale_values):
        m, v = local(m), local(v)
        if t < 1 or m.numel() == 0:
            continue
        r = float(blend_weight(t, hyper.switch_rate))
        # fold's own coefficients at lr 1: its Adam coefficient at r = 0 (switch rate 1 ends the blend before
        # step 1) is ||mh/d|| per ||m/den||, its inverse one ||r*s*mh*d|| per ||m*den||.
        direction, _, _, _ = fold(t, replace(unit, switch_rate=1.0))
        _, inverse, eps_c, _ = fold(t, unit, scale)
        # (||mh/d|| per ||m/den||, the inverse coefficient or None when the norm was held, r, eps*c)
        groups[(m.device, m.dtype)].append((m, v, float(direction), None if hyper.hold_norm else float(inverse),
                                            r, float(eps_c)))
    adam_sq = inverse_sq = 0.0
    for items in groups.values():
        if one_tensor is not None:
            norms = [torch.stack([one_tensor(x[0], x[1], x[5]) for x in items], 1)]
        else:
            norms = [_batch_norms(batch) for batch in _batches(items)]
        values = torch.cat(norms, 1).double().tolist()
        for k, (_, _, a, b, r, _) in enumerate(items):
            direction = a * values[0][k]  # ||mh/d||
            adam_sq += ((1.0 - r) * direction) ** 2
            inverse = r * direction if b is None else (b * values[1][k] if b else 0.0)
            inverse_sq += inverse**2
    return adam_sq, inverse_sq




def _batch_norms(batch: list[tuple]) -> Tensor:
    """[2, len(batch)]: ||m/den|| and ||m*den|| of each tensor (the second 0 where no inverse part is needed)."""
    m, v, b = [x[0] for x in batch], [x[1] for x in batch], [x[3] for x in batch]
    if m[0].dtype != torch.float32:
        m, v = [x.float() for x in m], [x.float() for x in v]
    den = torch._foreach_sqrt(v)
    torch._foreach_add_(den, [x[5] for x in batch])
    adam = torch.stack(torch._foreach_norm(torch._foreach_div(m, den)))
    inverse = torch.stack(torch._foreach_norm(torch._foreach_mul(m, den))) if any(b) else adam * 0
    return torch.stack([adam, inverse])


def _batches(items: list[tuple]) -> list[list[tuple]]:
    batches, size = [[]], 0
    for item in items:
        if batches[-1] and size + item[0].numel() > NORM_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item[0].numel()
    return batches


def _numbers(tensors: Sequence[Tensor]) -> list[float]:
    """0-d tensors as numbers, in one read of the host when they share a device (steps live in one vector)."""
    tensors = [local(t) for t in tensors]
    if len({t.device for t in tensors}) == 1:
        return torch.stack(tensors).tolist()
    return [float(t) for t in tensors]


def inverse_share(adam_sq: float, inverse_sq: float) -> float:
    """||inverse part|| / (||Adam part|| + ||inverse part||) from squared norms (0 when both are 0)."""
    a, b = math.sqrt(adam_sq), math.sqrt(inverse_sq)
    return b / (a + b) if a + b > 0 else 0.0
