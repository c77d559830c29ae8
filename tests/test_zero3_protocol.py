"""DualAdam driven the way DeepSpeed ZeRO-3 drives a client optimizer, in one process (fast).

ZeRO-3 (stage3.py ``_optimizer_step``) puts one sub-group's flat fp32 partition in
``param_groups[g]["params"]``, calls ``step()``, then empties the list again, once
per sub-group and optimizer step. The real engine is exercised by tests/multiprocess/test_engines.py;
this pins the two properties that protocol can break cheaply.
"""

from __future__ import annotations

import torch

from dualadam_hf import DualAdam
from dualadam_hf.schedule import blend_weight


def zero3_like_steps(optimizer: DualAdam, partitions: list[torch.Tensor], steps: int) -> None:
    group = optimizer.param_groups[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for flat in partitions:
            flat.grad = torch.randn(flat.shape, generator=gen)
            group["params"] = [flat]
            optimizer.step()
            group["params"] = []


def test_per_subgroup_steps_do_not_over_count() -> None:
    partitions = [torch.zeros(n) for n in (7, 64, 1)]
    optimizer = DualAdam([torch.zeros(1)], lr=1e-2, blend_steps=4)
    zero3_like_steps(optimizer, partitions, steps=3)
    assert [float(optimizer.state[p]["step"]) for p in partitions] == [3.0, 3.0, 3.0]


def test_blend_weight_with_emptied_param_groups() -> None:
    partitions = [torch.zeros(8), torch.zeros(3)]
    optimizer = DualAdam([torch.zeros(1)], lr=1e-2, blend_steps=4)
    for done in (1, 2, 3, 4):
        zero3_like_steps(optimizer, partitions, steps=1)
        assert optimizer.param_groups[0]["params"] == []
        # The blend of the step just taken, not of step 1 (what an empty group would suggest).
        assert optimizer.blend_weight(0) == blend_weight(done, 0.25)
