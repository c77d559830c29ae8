"""Side by side with pytorch_optimizer's DualAdam, an independent implementation."""

from __future__ import annotations

import pytest
import torch

from dualadam_hf import DualAdam

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_same_trajectory_as_pytorch_optimizer(foreach, weight_decay):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
    twin.load_state_dict(net.state_dict())
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, switch_rate=0.02)
    ours = DualAdam(net.parameters(), foreach=foreach, **kw)
    peer = pytorch_optimizer.DualAdam(twin.parameters(), weight_decouple=True, foreach=foreach, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(120):  # crosses the switch at step 49
        x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        for model, opt in ((net, ours), (twin, peer)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
