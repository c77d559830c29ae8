"""The dispatcher and the cached plan: which code updates which tensors, and what a step does on the host.

GPU costs are proven here without a GPU: launches are counted on the meta device (a foreach call off the
CPU is a kernel launch), and the triton path's host work is run on CPU tensors with the kernel stubbed.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dualadam_hf import DualAdam, InvAdam, functional
from dualadam_hf import fused as fused_module
from dualadam_hf import optimizer as optimizer_module
from dualadam_hf.functional import StepTensors
from dualadam_hf.schedule import Hyper
from dualadam_hf.update import update
from tests.reference import ReferenceDualAdam, max_rel_err


class OpLog(TorchDispatchMode):
    """Every aten op a block of code runs, with the longest tensor list among its arguments."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        lists = [len(a) for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        self.ops.append((str(func), max(lists, default=0)))
        return func(*args, **(kwargs or {}))


def _params(n, size, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, generator=gen).to(device)) for _ in range(n)]


def _give_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def _steady_state_ops(opt, params):
    opt.step()  # builds the plan
    with OpLog() as log:
        opt.step()
    return log.ops


# --- foreach: one call per op per dtype group off the CPU -------------------------------------------------


@pytest.mark.parametrize("n", [8, 40])
def test_foreach_off_the_cpu_is_one_call_per_op_whatever_the_sizes(n):
    params = [torch.nn.Parameter(torch.empty(1 << 20, device="meta")) for _ in range(n)]
    opt = DualAdam(params, foreach=True, skip_nonfinite=False)  # the gradient check is counted on its own below
    for p in params:
        p.grad = torch.empty_like(p)
    foreach_calls = [op for op, _ in _steady_state_ops(opt, params) if "_foreach_" in op]
    # decay is 1 here; lerp, mul, addcmul, sqrt, add, addcdiv, addcmul: one call each for all tensors.
    assert len(foreach_calls) == 7, foreach_calls


def test_the_gradient_check_is_one_norm_call_and_one_host_read_whatever_the_number_of_tensors():
    added = {}
    for n in (8, 40):
        params = _params(n, 64)
        _give_grads(params)
        checked = [op for op, _ in _steady_state_ops(DualAdam(params, foreach=True), params)]
        unchecked = [op for op, _ in _steady_state_ops(DualAdam(params, foreach=True, skip_nonfinite=False), params)]
        added[n] = list(checked)
        for op in unchecked:
            added[n].remove(op)
    assert [op for op in added[8] if "_foreach_" in op] == ["aten._foreach_norm.Scalar"], added
    assert added[8] == added[40], added  # the norms, their stack and isfinite: not one op per tensor


def test_foreach_still_works_in_l2_sized_blocks_on_cpu(monkeypatch):
    monkeypatch.setattr(functional, "FOREACH_BLOCK", 1024)
    params = _params(2, 8 * 1024)
    opt = DualAdam(params, foreach=True)
    _give_grads(params)
    calls = [op for op, _ in _steady_state_ops(opt, params) if "_foreach_sqrt" in op]
    assert len(calls) == 16  # 2 x 8 blocks of 1024 elements


# --- the triton path's host work: built once, a few launches per dtype group ----------------------------


class _StubKernel:
    """Stands in for the Triton kernel: records launches, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


@pytest.fixture
def stubbed_fused(monkeypatch):
    kernel = _StubKernel()
    monkeypatch.setattr(fused_module, "_kernel", kernel)
    monkeypatch.setattr(optimizer_module, "choose_path", lambda params, foreach, fused, state_bits: "triton")
    return kernel


@pytest.mark.parametrize("phase", ["blend", "adam"])
def test_fused_step_work_does_not_grow_with_the_number_of_tensors(stubbed_fused, monkeypatch, phase):
    checks = []
    real_takes = fused_module._kernel_takes
    monkeypatch.setattr(fused_module, "_kernel_takes", lambda *a: checks.append(1) or real_takes(*a))
    counts = {}
    for n in (10, 100):
        params = _params(n, 64)
        opt = DualAdam(params, blend_steps=1000 if phase == "blend" else 1, skip_nonfinite=False)
        _give_grads(params)
        ops = _steady_state_ops(opt, params)
        checks.clear()
        opt.step()
        assert checks == []  # the per-tensor checks of p, m, v are not redone
        # No op but the kernel takes a list of the tensors (no stack of step tensors, no per-tensor count)...
        assert max(length for op, length in ops if "_fused_adamw_" not in op) <= 3, ops
        counts[n] = len(ops)
    # ... and the number of ops a step runs does not depend on how many tensors there are.
    assert counts[10] == counts[100], counts


def test_fused_path_hands_the_adam_phase_to_torch_fused_adamw(stubbed_fused):
    # switch_rate=1: plain Adam from step 1. The result is torch's AdamW(fused=True), bit for bit.
    a, b = _params(5, 33), _params(5, 33)
    dual = DualAdam(a, lr=1e-2, weight_decay=0.1, switch_rate=1.0)
    adamw = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for seed in range(4):
        _give_grads(a, seed)
        _give_grads(b, seed)
        dual.step()
        adamw.step()
    assert stubbed_fused.launches == 0
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_the_step_vector_is_viewed_by_every_state_and_survives_a_round_trip():
    params = _params(3, 7)
    opt = DualAdam(params, blend_steps=10)
    for _ in range(3):
        _give_grads(params)
        opt.step()
    steps = [opt.state[p]["step"] for p in params]
    assert steps[0]._base is not None and all(s._base is steps[0]._base for s in steps)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = DualAdam(_params(3, 7), blend_steps=10)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert [float(twin.state[p]["step"]) for p in twin.param_groups[0]["params"]] == [3.0] * 3


@pytest.mark.parametrize("change", ["param data", "moment replaced", "state reset", "new state dict",
                                    "steps written"])
def test_the_plan_follows_what_moved(change):
    params = _params(2, 9)
    ref = ReferenceDualAdam(params, lrs=[1e-2] * 2, weight_decays=[0.0] * 2, switch_rate=0.1)
    opt = DualAdam(params, lr=1e-2, switch_rate=0.1)
    gen = torch.Generator().manual_seed(5)
    for k in range(6):
        grads = [torch.randn(9, generator=gen) for _ in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        if k == 2:
            if change == "param data":
                params[0].data = params[0].data.clone()
            elif change == "moment replaced":
                opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].clone()
            elif change == "state reset":
                opt.state[params[1]] = {}
                ref.m[1].zero_(), ref.v[1].zero_()
                ref.t[1] = 0
            elif change == "steps written":  # in place, as a benchmark setting a phase does
                for p in params:
                    opt.state[p]["step"].fill_(40)
                ref.t = [40, 40]
            else:
                opt.load_state_dict(opt.state_dict())
    assert max_rel_err(params, ref.p) < 1e-5


# --- inverse_scale="norm": the inverse part held at the Adam part's norm -------------------------------


def _norm_run(drop=True, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(), (5,), (0,), (7, 3), (40,)]]
    opt = DualAdam(params, lr=1e-2, weight_decay=0.1, switch_rate=0.05, inverse_scale="norm", **kw)
    ref = ReferenceDualAdam(params, lrs=[1e-2] * 5, weight_decays=[0.1] * 5, switch_rate=0.05, inverse_scale="norm")
    shares = []
    for k in range(30):
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
        grads[3] = None if drop and k % 4 == 0 else grads[3]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        shares.append(opt.inverse_share())
    return params, ref, opt, shares


@pytest.mark.parametrize("kw", [{"foreach": True}, {"foreach": False}], ids=["foreach", "single"])
def test_norm_held_inverse_part_matches_reference(kw):
    params, ref, opt, _ = _norm_run(**kw)
    assert max_rel_err(params, ref.p) < 1e-5
    # The inverse part's share of the update is r by construction (all tensors at one step), then 0.
    _, _, _, shares = _norm_run(drop=False, **kw)
    for k, share in enumerate(shares[:18]):
        assert share == pytest.approx(1 - (k + 1) * 0.05, rel=1e-4), k
    assert shares[-1] == 0.0


def test_norm_held_inverse_part_resumes_bit_identically():
    a, _, opt_a, _ = _norm_run()
    gen = torch.Generator().manual_seed(0)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = DualAdam(b, lr=1e-2, weight_decay=0.1, switch_rate=0.05, inverse_scale="norm")
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_norm_held_scales_do_not_depend_on_the_block_size():
    params = _params(3, 300)
    _give_grads(params)
    tensors = StepTensors(params, [p.grad for p in params], [torch.zeros_like(p) for p in params],
                          [torch.zeros_like(p) for p in params], [torch.tensor(3.0) for _ in params])
    hyper = Hyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, switch_rate=0.01)
    whole = functional.held_norm_scales(tensors, hyper)
    blocked = functional.held_norm_scales(tensors, hyper, block=7)
    assert [float(x) for x in whole] == pytest.approx([float(x) for x in blocked], rel=1e-6)


# --- diagnostics: one pass, whatever the number of tensors ---------------------------------------------


def test_inverse_share_runs_the_same_ops_for_10_or_100_tensors():
    counts = {}
    for n in (10, 100):
        params = _params(n, 16)
        opt = DualAdam(params, blend_steps=50)
        _give_grads(params)
        opt.step()
        with OpLog() as log:
            share = opt.inverse_share()
        assert 0.0 < share < 1.0
        counts[n] = len(log.ops)
    assert counts[10] == counts[100], counts


# --- the dispatcher's inputs and the optimizer's checks ------------------------------------------------


def test_unknown_path_is_named():
    p = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown update path 'turbo'"):
        update(StepTensors([p], [p], [p], [p], [torch.tensor(0.0)]), Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, 0.01),
               "turbo")


@pytest.mark.parametrize("blend", [{"blend_steps": 20}, {"blend_fraction": 0.5}, {"switch_rate": 0.05}])
def test_added_param_groups_take_the_blend_as_the_constructor_does(blend):
    opt = DualAdam(_params(1, 3), blend_steps=10)
    opt.add_param_group({"params": _params(1, 3), **blend})
    group = opt.param_groups[1]
    assert group["switch_rate"] == {"blend_steps": 0.05, "switch_rate": 0.05}.get(next(iter(blend)))
    assert group["blend_fraction"] == blend.get("blend_fraction")
    with pytest.raises(ValueError, match="only one of"):
        opt.add_param_group({"params": _params(1, 3), "blend_steps": 5, "switch_rate": 0.1})


def test_invadam_with_a_zero_scale_warns_that_it_updates_nothing():
    with pytest.warns(UserWarning, match="updates nothing"):
        InvAdam(_params(1, 3), inverse_scale=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InvAdam(_params(1, 3))


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.update(step=torch.tensor(-0.4375)), "step .* is not a whole number"),
    (lambda s: s.update(step=torch.tensor(2.5)), "step .* is not a whole number"),
    (lambda s: s["exp_avg"].__setitem__(0, float("nan")), "exp_avg holds non-finite"),
    (lambda s: s["exp_avg_sq"].__setitem__(0, -1.0), "exp_avg_sq holds negative"),
])
def test_a_damaged_but_loadable_state_is_refused(damage, match):
    params = _params(1, 4)
    opt = DualAdam(params)
    _give_grads(params)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0] = {k: v.clone() for k, v in saved["state"][0].items()}
    damage(saved["state"][0])
    with pytest.raises(ValueError, match=match):
        DualAdam(_params(1, 4)).load_state_dict(saved)
