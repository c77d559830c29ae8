"""DualAdam / InvAdam against the float64 reference, and the optimizer contract."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam, blend_weight, functional
from dualadam_hf.schedule import last_blend_step
from tests.reference import ReferenceDualAdam, max_rel_err

SHAPES = [(), (1,), (7,), (5, 3), (4, 6, 2), (0,), (33, 17)]
STEPS = 300


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def grad_stream(params, steps, seed=1, drop_every=0):
    """Deterministic gradients; with drop_every, parameter 1 gets no grad on some steps."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * (0.5 + i) for i, p in enumerate(params)]
        if drop_every and t % drop_every == 0:
            grads[1] = None
        yield grads


def run_pair(*, foreach, maximize=False, drop_every=0, cls=DualAdam, dtype=torch.float32, **kw):
    params = make_params(dtype=dtype)
    half = len(params) // 2
    groups = [
        {"params": params[:half], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[half:], "lr": 3e-3, "weight_decay": 0.0},
    ]
    lrs = [1e-2] * half + [3e-3] * (len(params) - half)
    wds = [0.1] * half + [0.0] * (len(params) - half)
    opt = cls(groups, foreach=foreach, maximize=maximize, **kw)
    ref = ReferenceDualAdam(
        params, lrs=lrs, weight_decays=wds, maximize=maximize, inverse_scale=kw.get("inverse_scale", 1.0),
        switch_rate=0.0 if cls is InvAdam else kw.get("switch_rate", 0.01),
        round_to=dtype if dtype != torch.float32 else None,
    )
    for grads in grad_stream(params, STEPS, drop_every=drop_every):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
        ref.step(grads)
    return params, ref, opt


@pytest.fixture(params=[True, False], ids=["foreach", "single"])
def foreach(request):
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    # Exercise block splitting and batching in the foreach path on small tensors.
    monkeypatch.setattr(functional, "FOREACH_BLOCK", 64)


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference_fp32(foreach, maximize, small_blocks):
    # switch_rate 0.01: the run crosses into the pure-Adam phase at step 99 of 300.
    params, ref, _ = run_pair(foreach=foreach, maximize=maximize, switch_rate=0.01)
    assert max_rel_err(params, ref.p) < 1e-5


def test_matches_reference_with_missing_grads(foreach, small_blocks):
    # Parameter 1 skips some steps, so parameters sit at different steps (several buckets).
    params, ref, opt = run_pair(foreach=foreach, drop_every=3, switch_rate=0.01)
    assert max_rel_err(params, ref.p) < 1e-5
    steps = [opt.state[p]["step"].item() for p in params]
    assert steps[1] == STEPS - len(range(0, STEPS, 3))
    assert steps[0] == STEPS


def test_invadam_matches_reference(foreach):
    params, ref, _ = run_pair(foreach=foreach, cls=InvAdam)
    assert max_rel_err(params, ref.p) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(foreach, dtype):
    # The update runs in fp32 with fp32 moments, so the only error left is the
    # rounding of the stored parameter: within a few bf16/fp16 ulps of a reference
    # that rounds the same way.
    params, ref, opt = run_pair(foreach=foreach, dtype=dtype, switch_rate=0.01)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params if p.numel())
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert max_rel_err(params, ref.p) < tol


def test_foreach_and_single_tensor_agree(small_blocks):
    a, _, _ = run_pair(foreach=True, switch_rate=0.02)
    b, _, _ = run_pair(foreach=False, switch_rate=0.02)
    for x, y in zip(a, b):
        # Same math, different op order: only fp32 rounding separates them.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-6)


def test_invadam_is_dualadam_with_blend_held_at_one(foreach):
    # switch_rate=0 keeps r = 1 forever: DualAdam then is the inverse rule alone, and says so.
    a, _, _ = run_pair(foreach=foreach, cls=InvAdam)
    with pytest.warns(UserWarning, match="switch_rate=0.*that is InvAdam"):
        b, _, _ = run_pair(foreach=foreach, switch_rate=0.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_blend_weight_schedule():
    assert blend_weight(1, 0.01) == pytest.approx(0.99)
    assert blend_weight(50, 0.01) == pytest.approx(0.5)
    assert blend_weight(99, 0.01) == pytest.approx(0.01)  # last step with an inverse part
    assert blend_weight(100, 0.01) == 0.0
    assert blend_weight(10**6, 0.01) == 0.0
    assert blend_weight(5, 0.0) == 1.0
    # 1 - 4*0.2 rounds below 0.2 in floating point; the rule is exact arithmetic.
    assert blend_weight(4, 0.2) == pytest.approx(0.2)
    assert blend_weight(5, 0.2) == 0.0
    for n in (3, 5, 7, 10, 100, 500):
        assert last_blend_step(1 / n) == n - 1
    # A rate so small that 1/rate overflows (a subnormal) blends for longer than any run.
    assert last_blend_step(5e-324) == last_blend_step(1e-300) == float("inf")
    assert blend_weight(10**9, 5e-324) == 1.0


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.2, 0.3, 1 / 7, 8e-5, 1.0, 0.0])
def test_last_blend_step_agrees_with_the_blend_weight(rate):
    # The oracle decides r >= switch_rate in exact rational arithmetic on the rate as written (its shortest
    # decimal form), independently of the implementation's floating-point tolerance.
    exact = Fraction(repr(rate))
    last = last_blend_step(rate)
    for t in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99, 100, 101, 12499, 12500, 12501]:
        assert (blend_weight(t, rate) > 0) == (t <= last)
        blended = rate == 0 or 1 - t * exact >= exact
        assert blend_weight(t, rate) == pytest.approx(float(1 - t * exact) if blended else 0.0)


def test_blend_weight_works_on_tensors_of_steps():
    steps = torch.arange(1, 12, dtype=torch.float64)
    expected = [blend_weight(float(t), 0.1) for t in steps]
    assert blend_weight(steps, 0.1).tolist() == pytest.approx(expected)


def test_blend_steps_and_fraction():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert DualAdam(p, blend_steps=500).param_groups[0]["switch_rate"] == pytest.approx(1 / 500)
    opt = DualAdam(p, blend_fraction=0.1)
    p[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="set_total_steps"):
        opt.step()
    opt.set_total_steps(1000)
    assert opt.param_groups[0]["switch_rate"] == pytest.approx(1 / 100)
    opt.step()
    assert opt.blend_weight() == pytest.approx(0.99)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.999)), "beta1"),
        (dict(betas=(0.9, -0.1)), "beta2"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(switch_rate=1.5), "switch_rate"),
        (dict(switch_rate=-0.1), "switch_rate"),
        (dict(blend_steps=0), "blend_steps"),
        (dict(blend_steps=2.5), "blend_steps must be a whole number"),
        (dict(blend_steps=float("inf")), "InvAdam"),
        (dict(blend_steps=True), "blend_steps"),
        (dict(inverse_scale=-1.0), "inverse_scale"),
        (dict(inverse_scale="big"), "inverse_scale"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(blend_fraction=0.0), "blend_fraction"),
        (dict(switch_rate=0.1, blend_steps=10), "only one of"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_gradient_is_rejected(foreach):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = DualAdam(emb.parameters(), foreach=foreach)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_state_layout_and_no_counters_outside_state():
    model = torch.nn.Linear(3, 2)
    opt = DualAdam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for p in model.parameters():
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.is_tensor(state["step"]) and state["step"].item() == 1
    assert all("step" not in g for g in opt.param_groups)


def _batches(n=30):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(n)]


def _fresh_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _fit(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def assert_resume_is_bit_identical(make, split: int) -> DualAdam:
    """Train 30 steps in one go, and ``split`` steps + save + load + the rest: the same weights, bit for bit."""
    data = _batches()
    full = _fresh_model()
    _fit(full, make(full.parameters()), data)
    half = _fresh_model()
    opt = make(half.parameters())
    _fit(half, opt, data[:split])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _fresh_model()
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(saved["optim"])
    assert opt2.current_step() == split
    _fit(resumed, opt2, data[split:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    return opt2


def test_state_dict_round_trip_is_bit_identical(foreach):
    # blend_steps=20 puts the save point inside the blend and the tail across the switch.
    opt = assert_resume_is_bit_identical(
        lambda ps: DualAdam(ps, lr=1e-2, weight_decay=0.01, blend_steps=20, foreach=foreach), 15)
    assert opt.current_step() == 30


def test_low_precision_state_survives_reload():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = DualAdam([p])
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    sd = opt.state_dict()
    opt2 = DualAdam([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_state_option(foreach, dtype):
    # bf16 moments halve the state; the math stays fp32, so the run stays close
    # to the fp32 reference (each moment rounded to bf16 after every step).
    params, ref, opt = run_pair(foreach=foreach, dtype=dtype, switch_rate=0.01, state_dtype="bfloat16")
    moments = [opt.state[p][k] for p in params if p.numel() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert max_rel_err(params, ref.p) < 3e-2


def test_bf16_state_survives_reload_and_foreach_matches_single():
    a, _, opt = run_pair(foreach=True, state_dtype=torch.bfloat16)
    b, _, _ = run_pair(foreach=False, state_dtype="bf16")
    assert max_rel_err(a, [x.double() for x in b]) < 1e-5
    opt2 = DualAdam([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                     for g in opt.param_groups], state_dtype="bfloat16")
    opt2.load_state_dict(opt.state_dict())
    for p, state in opt.state.items():
        assert opt2.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt2.state[p]["exp_avg_sq"], state["exp_avg_sq"])


def test_bad_state_dtype_is_named():
    with pytest.raises(ValueError, match="Invalid state_dtype: 'float8'"):
        DualAdam([torch.zeros(1)], state_dtype="float8")


def test_closure_runs_with_grad_enabled(foreach):
    model = torch.nn.Linear(3, 1)
    opt = DualAdam(model.parameters(), foreach=foreach)
    x = torch.randn(5, 3)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and opt.current_step() == 1


def test_grad_scaler_skips_inf_steps_without_advancing_step():
    model = torch.nn.Linear(4, 1)
    opt = DualAdam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.current_step() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.current_step() == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_and_weight_decay_read_from_group_every_step(foreach):
    p = torch.nn.Parameter(torch.ones(4))
    opt = DualAdam([p], lr=0.1, weight_decay=0.5, foreach=foreach)
    p.grad = torch.zeros(4)
    opt.step()  # zero grad: only weight decay moves p
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - 0.1 * 0.5))
    opt.param_groups[0]["lr"] = 0.2
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), (1 - 0.05) * (1 - 0.1)))


def test_subclassable():
    class Tagged(DualAdam):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    p = torch.nn.Parameter(torch.ones(2))
    opt = Tagged([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.calls == 1 and opt.current_step() == 1


def test_trains_a_small_model(foreach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = DualAdam(model.parameters(), lr=1e-2, blend_steps=50, foreach=foreach)
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("kw", [{"foreach": True}, {"fused": True}], ids=["foreach", "compiled"])
def test_adam_phase_is_torch_fused_adamw_on_cpu(kw):
    # With switch_rate=1 the blend weight is 0 from step 1: DualAdam is AdamW, and
    # the CPU paths hand fp32 tensors to torch's fused AdamW kernel (bit-identical).
    a, b = make_params(), make_params()
    dual = DualAdam(a, lr=1e-2, weight_decay=0.1, switch_rate=1.0, **kw)
    adamw = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for grads in grad_stream(a, 5):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        dual.step()
        adamw.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# --- inverse_scale: the paper's rule (1), a given scale, the calibrated scale and 0 (matched warmup) -----


@pytest.mark.parametrize("scale", [0.0, 250.0, "auto"])
def test_inverse_scale_matches_reference(foreach, scale, small_blocks):
    params, ref, _ = run_pair(foreach=foreach, switch_rate=0.01, inverse_scale=scale)
    assert max_rel_err(params, ref.p) < 1e-5


def test_auto_scale_is_calibrated_per_tensor_and_waits_for_a_nonzero_gradient():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = DualAdam([a, b], inverse_scale="auto", blend_steps=10)
    a.grad, b.grad = torch.full((4,), 2.0), torch.zeros(3)  # b's first gradient is 0, as LoRA's A
    opt.step()
    assert opt.state[a]["calibrated_scale"].item() == pytest.approx(1 / (2.0 + 1e-8) ** 2)
    assert opt.state[b]["calibrated_scale"].item() == 0.0  # not calibrated yet
    a.grad, b.grad = torch.full((4,), 2.0), torch.full((3,), 0.5)
    opt.step()
    # b's first non-zero gradient, at its step 2: vh = (1-b2)*0.25 / (1-b2**2), d = sqrt(vh) + eps.
    d = math.sqrt(0.001 * 0.25 / (1 - 0.999**2)) + 1e-8
    assert opt.state[b]["calibrated_scale"].item() == pytest.approx(1 / d**2, rel=1e-6)
    before = opt.state[a]["calibrated_scale"].item()
    a.grad = torch.full((4,), 100.0)
    opt.step()
    assert opt.state[a]["calibrated_scale"].item() == before  # set once


def test_auto_scale_survives_resume_bit_identically(foreach):
    assert_resume_is_bit_identical(
        lambda ps: DualAdam(ps, lr=1e-2, blend_steps=20, inverse_scale="auto", foreach=foreach), 10)


def test_scale_zero_is_adamw_with_a_warmup_matching_the_blend(foreach):
    # inverse_scale=0 leaves (1-r)*mh/d: AdamW whose lr rises as t*switch_rate over the blend.
    a, b = make_params(), make_params()
    n = 8
    dual = DualAdam(a, lr=1e-2, blend_steps=n, inverse_scale=0.0, foreach=foreach)
    adamw = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(adamw, lambda k: min(1.0, (k + 1) / n))
    for grads in grad_stream(a, 20):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        dual.step()
        adamw.step()
        warmup.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_inverse_share_is_read_from_the_state():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = DualAdam([p], blend_steps=4)
    assert opt.inverse_share() == 0.0  # no step yet
    p.grad = torch.tensor([1e-3, -2e-3, 3e-3])
    opt.step()
    r = 0.75
    mh, d = p.grad, p.grad.abs() + 1e-8  # step 1: mh = g, d = |g| + eps
    adam, inverse = ((1 - r) * mh / d).norm(), (r * mh * d).norm()
    assert opt.inverse_share() == pytest.approx(float(inverse / (adam + inverse)), rel=1e-4)
    assert opt.inverse_share() < 1e-2  # tiny gradients: the inverse part is tiny
    scaled = DualAdam([p], blend_steps=4, inverse_scale="auto")
    scaled.step()
    assert scaled.inverse_share() == pytest.approx(0.75, rel=1e-4)  # calibrated: the share is r
    for _ in range(3):
        opt.step()
    assert opt.inverse_share() == 0.0  # step 4: the blend is over


# --- bad input: complex and float64 parameters, other optimizers' states, added groups ------------------


@pytest.mark.parametrize("kw", [{"foreach": True}, {"foreach": False},
                                pytest.param({"fused": True}, marks=pytest.mark.compile)],
                         ids=["foreach", "single", "compiled"])
def test_complex_params_are_updated_as_pairs_of_reals(kw):
    # torch's AdamW treats a complex number as two reals; so does DualAdam, on every path and past the blend.
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64, generator=gen))
    x = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z = DualAdam([z], lr=1e-2, blend_steps=3, **kw)
    opt_x = DualAdam([x], lr=1e-2, blend_steps=3, foreach=False)
    for _ in range(5):
        g = torch.randn(6, dtype=torch.complex64, generator=gen)
        z.grad, x.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_x.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), x.detach(), rtol=1e-6, atol=1e-7)


def test_float64_params_keep_float64_precision_on_the_compiled_path():
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(50, dtype=torch.float64, generator=gen))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt_a, opt_b = DualAdam(a, fused=True), DualAdam(b, foreach=False)
    g = torch.randn(50, dtype=torch.float64, generator=gen)
    a[0].grad, b[0].grad = g, g.clone()
    opt_a.step()
    opt_b.step()
    assert (a[0] - b[0]).abs().max().item() < 1e-14


def test_another_optimizers_state_is_refused_at_load_time():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    for other in (torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        other.step()
        with pytest.raises(ValueError, match="saved by another optimizer"):
            DualAdam(model.parameters()).load_state_dict(other.state_dict())


def test_add_param_group_is_validated_like_the_constructor():
    opt = DualAdam([torch.nn.Parameter(torch.ones(2))])
    for bad, match in (({"lr": -1.0}, "learning rate"), ({"betas": (1.5, 0.9)}, "beta1"),
                       ({"switch_rate": 7.0}, "switch_rate"), ({"inverse_scale": -2}, "inverse_scale")):
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5, "betas": [0.8, 0.99]})
    assert opt.param_groups[1]["betas"] == (0.8, 0.99)


def test_invadam_takes_no_blend_arguments():
    with pytest.raises(TypeError, match="InvAdam holds the blend weight at 1 and takes no blend_steps"):
        InvAdam([torch.nn.Parameter(torch.ones(2))], blend_steps=10)
    opt = InvAdam([torch.nn.Parameter(torch.ones(2))], 1e-2, (0.8, 0.9), inverse_scale="auto")
    assert opt.param_groups[0]["switch_rate"] == 0.0 and opt.blend_weight() == 1.0


def test_calibrated_scale_of_low_precision_params_survives_reload_in_float32():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = DualAdam([p], inverse_scale="auto")
    p.grad = (torch.randn(8) * 0.37).bfloat16()
    opt.step()
    opt2 = DualAdam([p], inverse_scale="auto")
    opt2.load_state_dict(opt.state_dict())
    saved, loaded = opt.state[p]["calibrated_scale"], opt2.state[p]["calibrated_scale"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, saved)


def test_foreach_and_fused_together_are_refused():
    with pytest.raises(ValueError, match="foreach and fused cannot both be True"):
        DualAdam([torch.nn.Parameter(torch.ones(2))], foreach=True, fused=True)


def test_fused_with_parameters_on_several_devices_is_refused_by_name():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))
    opt = DualAdam([a, b], fused=True)
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(RuntimeError, match="fused=True needs all parameters of a group on one CUDA or CPU device"):
        opt.step()


def test_a_state_saved_before_later_group_keys_existed_loads_with_their_defaults():
    # A saved state whose groups lack blend_fraction, inverse_scale and state_dtype: each takes its default, so
    # the checkpoint resumes.
    params = make_params()
    opt = DualAdam(params, lr=1e-2, switch_rate=0.1)
    for grads in grad_stream(params, 3):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as a checkpoint holds it (load_state_dict keeps live tensors)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for group in saved["param_groups"]:
        for key in ("blend_fraction", "inverse_scale", "state_dtype"):
            del group[key]
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = DualAdam(twin_params, lr=1e-2, switch_rate=0.1)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["inverse_scale"] == 1.0 and twin.param_groups[0]["blend_fraction"] is None
    for grads in grad_stream(params, 2, seed=7):
        for p, q, g in zip(params, twin_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_docstring_lists_every_argument_with_its_default():
    import inspect
    import re

    args = inspect.getdoc(DualAdam).split("Args:\n", 1)[1]
    entries = dict(re.findall(r"^    (\w+): (.*?)(?=^    \S|\n\n|\Z)", args, flags=re.M | re.S))
    for name, param in inspect.signature(DualAdam.__init__).parameters.items():
        if name == "self":
            continue
        assert name in entries, f"{name} is not in the Args section"
        if param.default is not inspect.Parameter.empty:
            assert "default" in entries[name], f"{name} does not say its default"


def test_invadam_docstring_lists_its_arguments_with_their_defaults():
    import inspect

    from dualadam_hf.optimizer import BLEND_KEYS, InvAdam

    args = inspect.getdoc(InvAdam).split("Args (each as for :class:`DualAdam`):\n", 1)[1]
    written = {"lr": "1e-3", "betas": "(0.9, 0.999)", "eps": "1e-8", "weight_decay": "0"}
    for name, text in written.items():
        assert inspect.signature(InvAdam.__init__).parameters[name].default == eval(text), name
        entry = args.split(f"\n    {name}: ", 1)[1].split("\n", 1)[0]
        assert f"(default {text})" in entry, name
    keywords = [name for name, p in inspect.signature(DualAdam.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in BLEND_KEYS]
    line = args.split("\n    inverse_scale", 1)[1].split("\n\n", 1)[0]
    assert ", ".join(keywords[1:]) in " ".join(line.split())  # every keyword argument DualAdam has but the blend's
    defaults = [inspect.signature(DualAdam.__init__).parameters[name].default for name in keywords]
    assert f"({', '.join(map(str, defaults))})" in " ".join(line.split())
