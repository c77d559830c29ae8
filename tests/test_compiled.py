"""The torch.compile CPU path (DualAdam(fused=True) on CPU) and the path selection.

The tests that compile are marked `compile`: a cold compile takes tens of seconds on 2 cores.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam
from tests.reference import ReferenceDualAdam, max_rel_err

# () and (1,) and (0,) go through the eager fallback; the rest through the graph.
SHAPES = [(), (1,), (7,), (5, 3), (4, 6, 2), (0,), (33, 17), (300,), (2, 5), (9, 9), (64,)]
STEPS = 120
SWITCH = 0.02  # blend active through step 49, then Adam


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _run(*, cls=DualAdam, dtype=torch.float32, maximize=False, steps=STEPS, lr_schedule=False, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    half = len(params) // 2
    groups = [{"params": params[:half], "weight_decay": 0.1}, {"params": params[half:], "lr": 3e-3}]
    opt = cls(groups, lr=1e-2, fused=True, maximize=maximize, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)) if lr_schedule else None
    lrs = [1e-2] * half + [3e-3] * (len(params) - half)
    ref = ReferenceDualAdam(params, lrs=list(lrs), weight_decays=[0.1] * half + [0.0] * (len(params) - half),
                            switch_rate=0.0 if cls is InvAdam else kw.get("switch_rate", 0.01), maximize=maximize,
                            inverse_scale=kw.get("inverse_scale", 1.0),
                            round_to=None if dtype == torch.float32 else dtype)
    graphs_after_first = None
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * (0.5 + i) for i, p in enumerate(params)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(dtype)
        opt.step()
        ref.step(grads)
        if sched is not None:
            sched.step()
            ref.lrs = [lr / (k + 2) * (k + 1) for lr in ref.lrs]
        if k == 0:
            graphs_after_first = _unique_graphs()
    return params, ref, opt, _unique_graphs() - graphs_after_first


@pytest.mark.compile
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference_and_never_recompiles_across_the_blend(maximize):
    # The lr changes every step too (a scheduler), as do the step and blend weight.
    params, ref, opt, new_graphs = _run(maximize=maximize, switch_rate=SWITCH, lr_schedule=True)
    assert max_rel_err(params, ref.p) < 1e-5
    assert new_graphs == 0
    assert all(opt.state[p]["step"].item() == STEPS for p in params)


@pytest.mark.compile
def test_calibrated_inverse_scale():
    params, ref, _, new_graphs = _run(switch_rate=SWITCH, inverse_scale="auto", steps=60)
    assert max_rel_err(params, ref.p) < 1e-5
    assert new_graphs == 0


@pytest.mark.compile
def test_norm_held_inverse_scale():
    params, ref, opt, new_graphs = _run(inverse_scale="norm", switch_rate=SWITCH, steps=60)
    assert max_rel_err(params, ref.p) < 1e-5
    assert new_graphs == 0


@pytest.mark.compile
def test_invadam():
    params, ref, _, new_graphs = _run(cls=InvAdam, steps=30)
    assert max_rel_err(params, ref.p) < 1e-5
    assert new_graphs == 0


@pytest.mark.compile
def test_bf16_params():
    params, ref, opt, _ = _run(dtype=torch.bfloat16, switch_rate=SWITCH, steps=60)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert max_rel_err(params, ref.p) < 2e-2


@pytest.mark.compile
def test_new_sizes_do_not_recompile():
    # Sizes are dynamic and not duck-shaped: a second model of other shapes (and
    # equal sizes that later differ) reuses the graph.
    def step_model(shapes):
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = DualAdam(ps, fused=True, switch_rate=SWITCH)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()

    step_model([(16,), (16,), (3, 4)])
    before = _unique_graphs()
    step_model([(16,), (40,), (5, 7), (1000,), (2, 2)] * 3)
    assert _unique_graphs() == before


@pytest.mark.compile
def test_cached_plan_follows_storage_changes_and_dies_with_the_optimizer():
    # The flat aliases of p, m, v are cached across steps (compiled._CompiledBuckets). A
    # `p.data = ...` swap keeps p but moves its storage: a stale alias would go
    # on updating the old storage. Checked against the eager foreach path.
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(16, 4), (32,), (5, 3), (9,)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = DualAdam(params, lr=1e-2, fused=True, switch_rate=SWITCH)
    ref = DualAdam(twins, lr=1e-2, foreach=True, switch_rate=SWITCH)
    for k in range(8):
        for p, t in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)  # new gradient tensors every step
            t.grad = p.grad.clone()
        if k == 3:
            old = params[0].data
            old_values = old.clone()
            params[0].data = old.clone()
            # Same values, column-major: the graph does not take it (the eager fallback does).
            for ps in (params, twins):
                ps[2].data = ps[2].data.t().contiguous().t()
        opt.step()
        ref.step()
        for p, t in zip(params, twins, strict=True):
            torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
    assert torch.equal(old, old_values)
    # The plan keeps no gradient alive (zero_grad(set_to_none=True) must free them).
    grad = weakref.ref(params[0].grad)
    for p in params:
        p.grad = None
    assert grad() is None
    # The plan (and its aliases of the moments) goes with the optimizer state.
    plan = weakref.ref(next(iter(opt._operand_sets.values())).counts.cache["compiled"])
    del opt
    gc.collect()
    assert plan() is None


def test_automatic_path_on_cpu_is_foreach_and_logged_once(caplog):
    model = torch.nn.Linear(4, 3)
    opt = DualAdam(model.parameters())
    with caplog.at_level(logging.INFO, logger="dualadam_hf.optimizer"):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    messages = [r.getMessage() for r in caplog.records if "update path" in r.getMessage()]
    assert len(messages) == 1 and "foreach" in messages[0]


@pytest.mark.compile
def test_fused_true_on_cpu_selects_compiled(caplog):
    p = torch.nn.Parameter(torch.randn(8))
    opt = DualAdam([p], fused=True)
    p.grad = torch.randn(8)
    with caplog.at_level(logging.INFO, logger="dualadam_hf.optimizer"):
        opt.step()
    assert any("compiled" in r.getMessage() for r in caplog.records)
