"""bf16 stochastic rounding (``bf16_stochastic_round=True``): unbiased on every update path that writes bf16
parameters, keeps updates that round-to-nearest drops, and changes nothing when off or for other dtypes.

The statistical checks compare a mean of N independent roundings with the fp32 value: each rounding is one of
the two bf16 neighbours, an ulp apart, so its standard deviation is at most ulp/2 and the mean's at most
ulp / (2 sqrt(N)); the bounds are 5 of those (a false failure about once in 1.7 million runs).
The Triton path runs on CPU in the Triton interpreter, as in tests/test_fused.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam
from dualadam_hf import fused as fused_module
from dualadam_hf.functional import StepCounts, StepTensors, stochastic_round_to_bf16
from dualadam_hf.schedule import Hyper
from dualadam_hf.update import update

N = 1 << 13
SIGMAS = 5.0


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |x| (normal numbers: 8 significant bits), in float64."""
    return torch.exp2(torch.floor(torch.log2(x.double().abs())) - 7)


def _mean_bound(x: torch.Tensor, n: int) -> torch.Tensor:
    return SIGMAS * _ulp(x) / (2 * math.sqrt(n))


@pytest.fixture(scope="module")
def interpreted_kernel():
    """The Triton kernel under TRITON_INTERPRET=1 (read when a kernel is decorated), put back afterwards.

    The kernel draws its noise with triton.language's random functions, themselves jit functions: decorated
    when triton was first imported, compiled ones if the variable was not set then (inductor imports triton
    early), and the interpreter cannot call those. They are wrapped for the interpreter while these tests run.
    """
    pytest.importorskip("triton", reason="triton is not installed")
    import triton.language as tl
    import triton.language.random as random_module
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for name, fn in list(vars(random_module).items()):
            if isinstance(fn, JITFunction):
                interpreted = InterpretedFunction(fn.fn)
                mp.setattr(random_module, name, interpreted)
                if getattr(tl, name, None) is fn:
                    mp.setattr(tl, name, interpreted)
        import dualadam_hf._fused_kernel as kernel_module

        kernel_module = importlib.reload(kernel_module)
        mp.setattr(fused_module, "_kernel", kernel_module.dualadam_kernel)
        mp.setattr(fused_module, "BLOCK", 1 << 15)  # one program per tensor here: the interpreter pays per program
        yield
    importlib.reload(kernel_module)  # compiled kernels again for whatever runs next


# --- the rounding function --------------------------------------------------------------------------------


def test_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(12, generator=gen) * 10.0 ** torch.arange(-6, 6).float(),
                   torch.tensor([1.0 + 2**-10, -(1.0 + 2**-10), 2.0 - 2**-10, 1e-30, -3e30])])
    draws = stochastic_round_to_bf16(x[:, None].expand(-1, 1 << 14).contiguous())
    assert draws.dtype == torch.bfloat16
    values = draws.double()
    low, high = values.min(1).values, values.max(1).values
    xd = x.double()
    # Only the two bf16 neighbours of x (the one above 2 - 2**-10 is 2.0, in the next binade).
    assert bool((low <= xd).all() and (xd <= high).all() and (high - low <= _ulp(x) * 1.0001).all())
    assert all(len(row.unique()) <= 2 for row in values)
    err = (values.mean(1) - xd).abs()
    assert bool((err <= _mean_bound(x, values.shape[1])).all()), (err / _ulp(x)).tolist()
    # Round-to-nearest puts 1 + 2**-10 (1/8 ulp above 1) at 1.0 every time: well outside the bound.
    assert abs(x[12].to(torch.bfloat16).double() - xd[12]) > 3 * _mean_bound(x[12], values.shape[1])


def test_bf16_values_and_specials_pass_through_unchanged():
    gen = torch.Generator().manual_seed(1)
    exact = (torch.randn(4096, generator=gen) * 100).to(torch.bfloat16)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf], dtype=torch.bfloat16)
    for x in (exact, specials):
        for _ in range(3):
            assert torch.equal(stochastic_round_to_bf16(x.float()), x)
    assert torch.isnan(stochastic_round_to_bf16(torch.full((64,), math.nan))).all()


# --- the update paths ---------------------------------------------------------------------------------------

# Starting values, gradients (constant: m/sqrt(v) stays 1, so each step moves p by lr) and the path options.
STARTS = (1.0, -3.0, 0.0625)
GRADS = (1.0, -1.0, 1.0)
OPTIMIZER_PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "compiled": {"fused": True}}


@pytest.fixture(params=["single", "foreach", pytest.param("compiled", marks=pytest.mark.compile), "triton"])
def path(request) -> str:
    if request.param == "triton":
        request.getfixturevalue("interpreted_kernel")
    return request.param


def _start(dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, n] parameters (a row per starting value) and their gradient."""
    p = torch.tensor(STARTS).repeat_interleave(n).view(3, n).to(dtype)
    g = torch.tensor(GRADS).repeat_interleave(n).view(3, n).to(dtype)
    return p, g


def _run(path: str, *, dtype: torch.dtype, steps: int, lr: float, flag: bool, n: int = N, **kw) -> torch.Tensor:
    """The parameters after ``steps`` updates on ``path``, no weight decay; ``kw`` goes to DualAdam."""
    p, g = _start(dtype, n)
    if path == "triton":  # the optimizer picks this path on CUDA only: the dispatcher, as the optimizer calls it
        m, v = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
        step, cache = torch.tensor(0.0), {}
        hyper = Hyper(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, switch_rate=0.01,
                      bf16_stochastic_round=flag)
        for k in range(steps):
            update(StepTensors([p], [g], [m], [v], [step], None, StepCounts(None, k, k, cache)), hyper, "triton")
        return p
    param = torch.nn.Parameter(p)
    opt = DualAdam([param], lr=lr, bf16_stochastic_round=flag, **OPTIMIZER_PATHS[path], **kw)
    for _ in range(steps):
        param.grad = g.clone()
        opt.step()
    return param.detach()


def test_one_step_is_unbiased(path):
    lr = 1e-3  # at 1.0: a quarter of a bf16 ulp below; round-to-nearest would give 1.0
    exact = _run(path, dtype=torch.float32, steps=1, lr=lr, flag=True)
    rounded = _run(path, dtype=torch.bfloat16, steps=1, lr=lr, flag=True)
    nearest = _run(path, dtype=torch.bfloat16, steps=1, lr=lr, flag=False)
    assert rounded.dtype == torch.bfloat16
    target = exact[:, 0].double()
    assert bool((exact == exact[:, :1]).all())  # one fp32 value per row
    err = (rounded.double().mean(1) - target).abs()
    bound = _mean_bound(target, N)
    assert bool((err <= bound).all()), (err / _ulp(target)).tolist()
    assert (nearest.double().mean(1) - target).abs()[0] > 3 * bound[0]


def test_updates_below_half_an_ulp_are_kept(path):
    # bf16 weights at 1.0 moved by 1e-4 per step, 200 steps: each step is 1/39 of a bf16 ulp at 1.0 (2**-8).
    steps, lr, n = 200, 1e-4, 1 << 12
    exact = _run(path, dtype=torch.float32, steps=steps, lr=lr, flag=True, n=n)
    nearest = _run(path, dtype=torch.bfloat16, steps=steps, lr=lr, flag=False, n=n)
    rounded = _run(path, dtype=torch.bfloat16, steps=steps, lr=lr, flag=True, n=n)
    assert bool((nearest[0] == 1.0).all())  # round-to-nearest loses every update
    moved = 1.0 - exact[0, 0].item()
    assert 0.019 < moved < 0.021
    # Each step's rounding error has mean 0 and sd <= ulp/2 and the errors add up as a martingale: after
    # `steps` the sd of one weight is at most sqrt(steps) * ulp/2 (ulp 2**-8 below 1), of the mean of n weights
    # that over sqrt(n).
    sd = math.sqrt(steps) * 2**-8 / 2 / math.sqrt(n)
    assert abs((1.0 - rounded[0].double().mean().item()) - moved) < SIGMAS * sd
    assert SIGMAS * sd < moved / 4


def test_other_dtypes_are_untouched_and_no_random_numbers_are_drawn(path):
    # fp32 and fp16 parameters: the flag changes no bit; with the flag off nothing draws from torch's
    # generator either (a user's later random numbers stay as they were).
    for dtype, flag in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        state = torch.get_rng_state()
        on = _run(path, dtype=dtype, steps=3, lr=1e-3, flag=flag, n=64)
        assert torch.equal(torch.get_rng_state(), state), dtype
        off = _run(path, dtype=dtype, steps=3, lr=1e-3, flag=False, n=64)
        assert torch.equal(on, off), dtype


def test_flag_off_rounds_to_nearest(path):
    # One step from bf16-exact values is the fp32 step rounded to nearest, as without the option.
    exact = _run(path, dtype=torch.float32, steps=1, lr=3e-3, flag=False, n=64)
    nearest = _run(path, dtype=torch.bfloat16, steps=1, lr=3e-3, flag=False, n=64)
    assert torch.equal(nearest, exact.to(torch.bfloat16))


def test_fused_kernel_draws_new_noise_every_step(interpreted_kernel):
    # The same update twice on the cached launch tables: the seed on the device advances, so the roundings
    # differ (with one seed they would repeat bit for bit).
    p0, g = _start(torch.bfloat16, 1 << 11)
    p, m, v = p0.clone(), torch.zeros_like(p0, dtype=torch.float32), torch.zeros_like(p0, dtype=torch.float32)
    step, cache = torch.tensor(0.0), {}
    hyper = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, switch_rate=0.01,
                  bf16_stochastic_round=True)
    results = []
    for _ in range(2):
        p.copy_(p0), m.zero_(), v.zero_(), step.zero_()
        update(StepTensors([p], [g], [m], [v], [step], None, StepCounts(None, 0, 0, cache)), hyper, "triton")
        results.append(p.clone())
    assert cache["triton-layout"].seeds is not None
    assert not torch.equal(*results)


def test_past_the_blend_bf16_moments_are_not_handed_to_fused_adamw():
    # With bf16 moments, bf16 parameters past the blend would go to torch's fused AdamW, which rounds to
    # nearest: with the option they stay on the chosen path and are rounded stochastically.
    lr = 1e-3
    exact = _run("foreach", dtype=torch.float32, steps=1, lr=lr, flag=True, blend_steps=1)
    nearest = _run("foreach", dtype=torch.bfloat16, steps=1, lr=lr, flag=False, blend_steps=1,
                   state_dtype="bfloat16")
    rounded = _run("foreach", dtype=torch.bfloat16, steps=1, lr=lr, flag=True, blend_steps=1,
                   state_dtype="bfloat16")
    assert bool((nearest[0] == 1.0).all())
    target = exact[:, 0].double()
    assert bool(((rounded.double().mean(1) - target).abs() <= _mean_bound(target, N)).all())


# --- the option ---------------------------------------------------------------------------------------------


def test_the_option_is_per_group_and_survives_a_state_dict_round_trip():
    a, b = (torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16)) for _ in range(2))
    opt = DualAdam([{"params": [a], "bf16_stochastic_round": True}, {"params": [b]}], lr=1e-3)
    assert [group["bf16_stochastic_round"] for group in opt.param_groups] == [True, False]
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    assert bool((b == 1.0).all())
    assert abs(a.double().mean().item() - (1 - 1e-3)) < _mean_bound(torch.tensor(0.999), N).item()
    again = DualAdam([{"params": [a], "bf16_stochastic_round": True}, {"params": [b]}], lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert [group["bf16_stochastic_round"] for group in again.param_groups] == [True, False]
    with pytest.raises(ValueError, match="bf16_stochastic_round True saved, False here"):
        DualAdam([{"params": [a]}, {"params": [b]}], lr=1e-3).load_state_dict(opt.state_dict())
    assert InvAdam([a], bf16_stochastic_round=True).param_groups[0]["bf16_stochastic_round"] is True


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_values_are_refused(value):
    with pytest.raises(ValueError, match=f"Invalid bf16_stochastic_round: {value!r} \\(must be True or False\\)"):
        DualAdam([torch.zeros(2)], bf16_stochastic_round=value)
    with pytest.raises(ValueError, match="Invalid bf16_stochastic_round"):
        InvAdam([torch.zeros(2)], bf16_stochastic_round=value)
    opt = DualAdam([torch.zeros(2)])
    with pytest.raises(ValueError, match="Invalid bf16_stochastic_round"):
        opt.add_param_group({"params": [torch.zeros(3)], "bf16_stochastic_round": value})
    assert len(opt.param_groups) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_cuda(monkeypatch):
    # The kernel compiled by Triton (the path DualAdam takes on CUDA by default), with its own generator.
    pytest.importorskip("triton", reason="triton is not installed")
    import dualadam_hf._fused_kernel as kernel_module

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused_module, "_kernel", importlib.reload(kernel_module).dualadam_kernel)
    steps, lr, n = 200, 1e-4, 1 << 16
    after = {}
    for dtype, flag in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        param = torch.nn.Parameter(torch.ones(n, dtype=dtype, device="cuda"))
        opt = DualAdam([param], lr=lr, bf16_stochastic_round=flag)
        for _ in range(steps):
            param.grad = torch.ones_like(param)
            opt.step()
        assert next(iter(opt._operand_sets.values())).path == "triton"
        after[dtype, flag] = param.detach().double().cpu()
    assert bool((after[torch.bfloat16, False] == 1.0).all())
    moved = 1.0 - after[torch.float32, False][0].item()
    sd = math.sqrt(steps) * 2**-8 / 2 / math.sqrt(n)
    assert abs((1.0 - after[torch.bfloat16, True].mean().item()) - moved) < SIGMAS * sd
