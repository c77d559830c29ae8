"""An optimizer state that refuses what it cannot honour: a checkpoint's settings, kind of state or gaps are never
adopted silently, flags are flags, and a non-finite gradient never poisons the moments."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam, lowbit

BIG = (64, 128)  # quantized at 8 and 4 bits (whole blocks, at least MIN_QUANTIZED elements)


@pytest.fixture
def eager_step(monkeypatch):
    """The low-bit step uncompiled: the same per-tensor functions, without tens of seconds of compiling."""
    monkeypatch.setattr(lowbit, "_compile_once", lambda fn: fn)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*BIG)), torch.nn.Parameter(torch.randn(10))]


def _trained(steps: int = 2, **options) -> tuple[list[torch.nn.Parameter], DualAdam]:
    params = _params()
    opt = DualAdam(params, lr=1e-2, blend_steps=10, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _refused(opt: DualAdam, state: dict, *words: str) -> str:
    with pytest.raises(ValueError) as caught:
        opt.load_state_dict(state)
    message = str(caught.value)
    assert message.startswith("DualAdam.load_state_dict:") and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# -- settings a checkpoint was saved under --------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "named"), [
    ("maximize", True, "maximize"),
    ("betas", (0.9, 0.99), "betas"),
    ("eps", 1e-6, "eps"),
    ("weight_decay", 0.1, "weight_decay"),
    ("inverse_scale", 0.5, "inverse_scale"),
    ("state_dtype", "bfloat16", "state_dtype"),
    ("switch_rate", 0.5, "switch_rate"),
    ("bf16_stochastic_round", True, "bf16_stochastic_round"),
])
def test_a_setting_changed_in_the_checkpoint_is_refused_not_adopted(key, value, named):
    params, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][key] = value
    fresh = DualAdam(params, lr=1e-2, blend_steps=10)
    _refused(fresh, saved, named, "saved", "here")
    assert fresh.param_groups[0][key] != value  # nothing was loaded


def test_a_blend_fraction_differing_from_the_constructed_one_is_refused():
    params = _params()
    opt = DualAdam(params, blend_fraction=0.1)
    opt.set_total_steps(100)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    _refused(DualAdam(params, blend_fraction=0.2), opt.state_dict(), "blend_fraction 0.1 saved, 0.2 here")
    DualAdam(params, blend_fraction=0.1).load_state_dict(opt.state_dict())  # unresolved here, resolved there


def _scheduled(lr: float = 1e-2) -> tuple[list[torch.nn.Parameter], DualAdam, torch.optim.lr_scheduler.LambdaLR]:
    params = _params()
    opt = DualAdam(params, lr=lr, blend_steps=10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10)
    return params, opt, schedule


def test_a_learning_rate_above_its_schedules_initial_one_is_refused():
    params, opt, schedule = _scheduled()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    schedule.step()
    saved = copy.deepcopy(opt.state_dict())
    _, fresh, _ = _scheduled()
    fresh.load_state_dict(copy.deepcopy(saved))  # the schedule's own rate loads
    saved["param_groups"][0]["lr"] = 100.0  # initial_lr untouched
    _, fresh, _ = _scheduled()
    _refused(fresh, saved, "learning rate 100 is above its schedule's initial 0.01")


def test_another_initial_learning_rate_is_refused():
    params, opt, schedule = _scheduled(lr=1e-2)
    _, other, _ = _scheduled(lr=3e-2)
    _refused(other, opt.state_dict(), "learning rate 0.01 saved, 0.03 here")


def test_a_flag_of_another_type_in_the_checkpoint_is_refused():
    params, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["maximize"] = "yes"
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), saved, "Invalid maximize: 'yes'")


def test_an_invadam_state_into_dualadam_and_back_is_refused():
    params = _params()
    inv = InvAdam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    inv.step()
    _refused(DualAdam(params), inv.state_dict(), "switch_rate 0.0 saved, 0.01 here")
    dual = DualAdam(params)
    dual.step()
    with pytest.raises(ValueError, match="switch_rate 0.01 saved, 0.0 here"):
        InvAdam(params).load_state_dict(dual.state_dict())


# -- the state's shape: groups, parameters, missing states ---------------------------------------------------

def test_a_deleted_parameter_state_is_refused():
    params, opt = _trained()
    saved = opt.state_dict()
    del saved["state"][1]
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), saved, "recorded state for 2 parameters, but 1")


def test_a_parameter_that_never_had_a_gradient_has_no_state_and_loads():
    params = _params()
    opt = DualAdam(params, lr=1e-2)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    fresh = DualAdam(params, lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert not fresh.state[params[1]] and float(fresh.state[params[0]]["step"]) == 1.0


def test_a_dropped_group_or_a_shortened_parameter_list_is_refused_in_one_line():
    params, opt = _trained()
    two = DualAdam([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2, blend_steps=10)
    _refused(two, opt.state_dict(), "1 param group(s), this optimizer 2")
    shorter = opt.state_dict()
    shorter["param_groups"][0]["params"] = shorter["param_groups"][0]["params"][:1]
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), shorter, "has 1 parameters, this optimizer's 2")


def test_a_two_element_step_is_refused():
    params, opt = _trained()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor([2.0, 2.0])
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), saved, "state of parameter 0", "step")


# -- the kind of state ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("saved_bits", "wanted_bits"), [(None, 8), (8, None), (8, 4), (4, None)])
def test_a_state_of_another_kind_is_refused_not_kept(eager_step, saved_bits, wanted_bits):
    params, opt = _trained(state_bits=saved_bits)
    fresh = DualAdam(params, lr=1e-2, blend_steps=10, state_bits=wanted_bits)
    _refused(fresh, opt.state_dict(), "state_bits", "not converted")


def test_quantized_moments_in_an_fp32_group_are_refused(eager_step):
    params, opt = _trained(state_bits=8)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["state_bits"] = None  # the group says fp32, the moments are 8-bit
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), saved, "it holds 8-bit moments")
    saved = opt.state_dict()
    fp32 = DualAdam(params, lr=1e-2, blend_steps=10)
    for p in params:
        p.grad = torch.ones_like(p)
    fp32.step()
    mixed = fp32.state_dict()
    mixed["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"]
    _refused(DualAdam(params, lr=1e-2, blend_steps=10), mixed, "exp_avg: it holds 8-bit moments where this "
             "optimizer keeps full-precision moments")


@pytest.mark.parametrize("part", ["scale", "qmap", "codes"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_moments_with_short_parts_are_refused_in_one_line(eager_step, part, bits):
    params, opt = _trained(state_bits=bits)
    saved = opt.state_dict()
    moment = saved["state"][0]["exp_avg_sq"]
    setattr(moment, part, getattr(moment, part)[:-1])
    _refused(DualAdam(params, lr=1e-2, blend_steps=10, state_bits=bits), saved, "quantized parts do not fit")


# -- flags and numbers at construction --------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    (dict(maximize="no"), "Invalid maximize: 'no'"),
    (dict(maximize=1), "Invalid maximize: 1"),
    (dict(foreach="yes"), "Invalid foreach: 'yes' \\(must be None, True or False\\)"),
    (dict(fused="yes"), "Invalid fused: 'yes'"),
    (dict(bf16_stochastic_round=1), "Invalid bf16_stochastic_round: 1"),
    (dict(skip_nonfinite="no"), "Invalid skip_nonfinite: 'no'"),
    (dict(state_bits=8.0), "Invalid state_bits: 8.0"),
    (dict(lr=1e300), "Invalid learning rate: 1e\\+300"),
    (dict(eps=math.inf), "Invalid eps: inf"),
    (dict(weight_decay=1e30), "Invalid weight_decay: 1e\\+30"),
    (dict(blend_steps=10**400), "blend_steps must be a whole number of optimizer steps from 1 to 2\\*\\*53"),
])
def test_bad_flags_and_numbers_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        DualAdam([torch.nn.Parameter(torch.zeros(2))], **options)


def test_maximize_no_used_to_maximize():
    # The slip the flag check exists for: a truthy string turned minimization into ascent.
    with pytest.raises(ValueError):
        DualAdam([torch.nn.Parameter(torch.ones(1))], maximize="no")


# -- non-finite gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(foreach=False), dict(foreach=True), dict(state_bits=8),
                                     dict(state_bits=4), dict(inverse_scale="norm"), dict(inverse_scale="auto")])
def test_a_non_finite_gradient_skips_that_tensors_step_and_keeps_its_state(eager_step, options):
    params, opt = _trained(**options)
    before = [p.detach().clone() for p in params]
    state = {pid: {key: lowbit.dense(value).clone() for key, value in saved.items()}
             for pid, saved in opt.state_dict()["state"].items()}
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[3, 5] = math.nan
    params[1].grad = torch.randn_like(params[1])
    with pytest.warns(RuntimeWarning, match=r"param group 0, parameter 0 \(shape \(64, 128\)\) holds NaN or inf"):
        opt.step()
    assert torch.equal(params[0], before[0]) and not torch.equal(params[1], before[1])
    kept = opt.state_dict()["state"][0]
    assert float(kept["step"]) == float(state[0]["step"]) == 2.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(lowbit.dense(kept[key]), state[0][key])
    assert float(opt.state[params[1]]["step"]) == 3.0
    assert opt.nonfinite_skips == 1
    params[0].grad = torch.full_like(params[0], math.inf)
    params[1].grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once; counted after that
        opt.step()
    assert opt.nonfinite_skips == 2
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(bool(torch.isfinite(lowbit.dense(opt.state[p][k])).all()) for p in params
               for k in ("exp_avg", "exp_avg_sq"))
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_skip_nonfinite_false_applies_the_step_as_torch_does():
    params, opt = _trained(skip_nonfinite=False)
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[0, 0] = math.nan
    opt.step()
    assert math.isnan(params[0].detach()[0, 0].item()) and opt.nonfinite_skips == 0
