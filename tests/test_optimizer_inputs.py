"""What the optimizer accepts: hyperparameters, added groups and loaded states are checked where they enter,
with one-line errors that name the setting, never a failure at the first step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam
from dualadam_hf.integrations.optim_args import parse_optim_args
from dualadam_hf.optimizer import mismatched_state


def _params(n=2, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n)]


def _stepped(cls=DualAdam, steps=2, **kwargs):
    """An optimizer over two groups of one parameter each, after a few steps, and its state dict."""
    params = _params()
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, copy.deepcopy(opt.state_dict())


def _twin(cls=DualAdam, **kwargs):
    params = _params()
    return cls([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], **kwargs)


# --- hyperparameters: numbers where numbers belong ------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=("0.9", 0.999)), r"betas must be two numbers"),
    (dict(betas=(0.9, None)), r"betas must be two numbers"),
    (dict(betas=(0.9, False)), r"betas must be two numbers"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), r"lr must be a number or a one-element tensor"),
    (dict(lr=True), r"Invalid learning rate: True .*not a bool"),
    (dict(lr="1e-3"), r"Invalid learning rate: '1e-3'"),
    (dict(weight_decay=True), r"Invalid weight_decay: True .*not a bool"),
    (dict(eps=True), r"Invalid eps: True .*not a bool"),
    (dict(eps="1e-8"), r"Invalid eps: '1e-8'"),
    (dict(switch_rate=True), r"Invalid switch_rate: True"),
    (dict(blend_fraction=True), r"Invalid blend_fraction: True"),
    (dict(switch_rate="0.1"), r"Invalid switch_rate: '0.1'"),
    (dict(inverse_scale=None), r"Invalid inverse_scale: None"),
])
def test_settings_of_the_wrong_kind_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match) as raised:
        DualAdam(_params(1), **kwargs)
    assert "\n" not in str(raised.value)
    opt = DualAdam(_params(1))
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _params(1, seed=3), **kwargs})
    assert len(opt.param_groups) == 1


def test_a_one_element_lr_tensor_is_a_learning_rate():
    p = _params(1)
    opt = DualAdam(p, lr=torch.tensor([0.5]), weight_decay=0.0)
    p[0].grad = torch.ones(4)
    before = p[0].detach().clone()
    opt.step()
    assert not torch.equal(before, p[0])


# --- loaded states: group settings, moments and steps ----------------------------------------------------


@pytest.mark.parametrize("key, value, match", [
    ("eps", -1e-3, r"Invalid eps: -0.001"),
    ("betas", (1.5, 0.999), r"Invalid beta1: 1.5"),
    ("betas", ("0.9", 0.999), r"betas must be two numbers"),
    ("switch_rate", 2.0, r"Invalid switch_rate: 2.0"),
    ("lr", True, r"Invalid learning rate: True"),
    ("inverse_scale", "big", r"Invalid inverse_scale: 'big'"),
    ("state_dtype", "float8", r"Invalid state_dtype: 'float8'"),
])
def test_loaded_group_settings_are_checked_as_the_constructor_checks_them(key, value, match):
    opt, saved = _stepped()
    saved["param_groups"][1][key] = value
    twin = _twin()
    with pytest.raises(ValueError, match=r"^DualAdam.load_state_dict: param group 1 of this state: " + match) as raised:
        twin.load_state_dict(saved)
    assert "\n" not in str(raised.value)
    assert twin.param_groups[1][key] == twin.defaults[key] or key == "lr"  # nothing was loaded
    assert len(twin.state) == 0


def test_loading_switch_rate_zero_into_a_blending_dualadam_is_refused():
    # A state that brings in switch_rate=0 would turn the blend into InvAdam: a setting nobody chose here.
    _, saved = _stepped(switch_rate=0.1)
    saved["param_groups"][0]["switch_rate"] = 0.0
    with pytest.raises(ValueError, match=r"param group 0 of this state: .*switch_rate 0.0 saved, 0.1 here"):
        _twin(switch_rate=0.1).load_state_dict(saved)
    _, own = _stepped(switch_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _twin(switch_rate=0.1).load_state_dict(own)


def test_invadam_refuses_a_state_that_blends():
    _, saved = _stepped(DualAdam, switch_rate=0.1)
    with pytest.raises(ValueError, match=r"InvAdam.load_state_dict: param group 0 of this state: "
                                         r".*switch_rate 0.1 saved, 0.0 here"):
        _twin(InvAdam).load_state_dict(saved)
    _, own = _stepped(InvAdam)
    _twin(InvAdam).load_state_dict(own)


@pytest.mark.parametrize("damage, match", [
    (lambda s: s.update(exp_avg=torch.zeros(5)), r"exp_avg has shape \(5,\), its parameter \(4,\)"),
    (lambda s: s.update(exp_avg_sq=torch.zeros(2, 2)), r"exp_avg_sq has shape \(2, 2\), its parameter \(4,\)"),
    (lambda s: s.update(exp_avg_sq=torch.zeros(4, dtype=torch.int64)), r"exp_avg_sq is torch.int64"),
])
def test_a_moment_that_does_not_fit_its_parameter_is_refused_at_load(damage, match):
    _, saved = _stepped()
    damage(saved["state"][1])
    with pytest.raises(ValueError, match=r"DualAdam.load_state_dict: the state of parameter 1 does not fit it \("
                                         + match):
        _twin().load_state_dict(saved)


def test_a_moment_held_in_a_tensor_subclass_is_compared_by_shape_alone():
    # Quantized moments are tensor subclasses that keep the parameter's shape, whatever they store.
    class Packed(torch.Tensor):
        pass

    p = torch.nn.Parameter(torch.ones(4))
    packed = torch.zeros(4, dtype=torch.uint8).as_subclass(Packed)
    assert mismatched_state({"step": torch.tensor(1.0), "exp_avg": packed, "exp_avg_sq": packed}, p) is None
    plain = torch.zeros(4, dtype=torch.uint8)
    assert "is torch.uint8" in mismatched_state({"step": 1, "exp_avg": plain, "exp_avg_sq": plain}, p)
    wrong = torch.zeros(3, dtype=torch.uint8).as_subclass(Packed)
    assert "shape (3,)" in mismatched_state({"step": 1, "exp_avg": wrong, "exp_avg_sq": wrong}, p)


@pytest.mark.parametrize("group_kwargs", [{}, {"fused": True}], ids=["default", "fused"])
def test_a_step_saved_as_a_number_loads_as_the_float32_counter(group_kwargs):
    opt, saved = _stepped(steps=3)
    for state in saved["state"].values():
        state["step"] = int(state["step"])
    twin = _twin(**group_kwargs)
    twin.load_state_dict(saved)
    for state in twin.state.values():
        step = state["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.dim() == 0 and step.item() == 3
    assert all(isinstance(s["step"], int) for s in saved["state"].values())  # the caller's dict is left as given
    if not group_kwargs:  # the same run continues as from the tensor counter
        params, twin_params = [p for g in opt.param_groups for p in g["params"]], [
            p for g in twin.param_groups for p in g["params"]]
        for p, q in zip(params, twin_params):
            q.data.copy_(p.detach())
        for _ in range(2):
            for p, q in zip(params, twin_params):
                p.grad, q.grad = torch.ones(4), torch.ones(4)
            opt.step()
            twin.step()
        assert twin.current_step() == 5
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


# --- InvAdam: the blend is not its to take, in any form --------------------------------------------------


@pytest.mark.parametrize("blend", [{"blend_steps": 100}, {"switch_rate": 0.01}, {"blend_fraction": 0.5}])
def test_invadam_refuses_blend_keys_in_added_groups_as_in_the_constructor(blend):
    key = next(iter(blend))
    opt = InvAdam(_params(1))
    with pytest.raises(TypeError) as from_group:
        opt.add_param_group({"params": _params(1, seed=3), **blend})
    with pytest.raises(TypeError) as from_constructor:
        InvAdam(_params(1), **blend)
    assert str(from_group.value) == str(from_constructor.value) == (
        f"InvAdam holds the blend weight at 1 and takes no {key}")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["switch_rate"] == 0.0
    with pytest.raises(TypeError, match=f"InvAdam holds the blend weight at 1 and takes no {key}"):
        InvAdam([{"params": _params(1), **blend}])


def test_invadam_takes_a_group_copied_from_its_own():
    opt = InvAdam(_params(1))
    opt.add_param_group({**opt.param_groups[0], "params": _params(1, seed=3)})
    assert opt.param_groups[1]["switch_rate"] == 0.0 and opt.blend_weight(1) == 1.0


def test_the_command_line_names_invadams_reason_for_refusing_a_blend():
    with pytest.raises(ValueError, match=r"Unknown --optim_args key 'blend_steps' for --optim invadam "
                                         r"\(InvAdam holds the blend weight at 1 and takes no blend_steps\)"):
        parse_optim_args("blend_steps=4", "invadam")


def test_an_invadam_group_with_a_zero_scale_warns_that_it_updates_nothing():
    opt = InvAdam(_params(1))
    with pytest.warns(UserWarning, match=r"InvAdam\(inverse_scale=0\) updates nothing") as record:
        opt.add_param_group({"params": _params(1, seed=3), "inverse_scale": 0})
    assert record[0].filename == __file__  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": _params(1, seed=4), "inverse_scale": 2.0})
        DualAdam(_params(1)).add_param_group({"params": _params(1, seed=3), "inverse_scale": 0})
    with pytest.warns(UserWarning, match="updates nothing") as record:
        InvAdam(_params(1), inverse_scale=0)
    assert len(record) == 1  # the defaults' scale is the constructor's to warn about, not each group's


def test_a_dualadam_group_with_switch_rate_zero_warns_that_it_is_invadam():
    opt = DualAdam(_params(1))
    with pytest.warns(UserWarning, match=r"A DualAdam param group with switch_rate=0 .*that is InvAdam") as record:
        opt.add_param_group({"params": _params(1, seed=3), "switch_rate": 0})
    assert len(record) == 1 and record[0].filename == __file__
    with pytest.warns(UserWarning, match=r"DualAdam\(switch_rate=0\)") as record:
        DualAdam(_params(1), switch_rate=0)
    assert len(record) == 1


# --- a group's own blend wins over the defaults' -----------------------------------------------------------


@pytest.mark.parametrize("defaults, own, rate_before, rate_after", [
    ({"blend_fraction": 0.5}, {"switch_rate": 0.01}, 0.01, 0.01),
    ({"blend_fraction": 0.5}, {"blend_steps": 10}, 0.1, 0.1),
    ({"switch_rate": 0.05}, {"blend_fraction": 0.5}, None, 0.02),
    ({"blend_steps": 20}, {"blend_fraction": 0.1}, None, 0.1),
])
def test_a_groups_own_blend_wins_over_the_defaults(defaults, own, rate_before, rate_after):
    for added in (False, True):
        a, b = _params(1), _params(1, seed=3)
        if added:
            opt = DualAdam(a, **defaults)
            opt.add_param_group({"params": b, **own})
        else:
            opt = DualAdam([{"params": a}, {"params": b, **own}], **defaults)
        group = opt.param_groups[1]
        assert group["switch_rate"] == rate_before
        assert group["blend_fraction"] == own.get("blend_fraction")
        opt.set_total_steps(100)
        assert group["switch_rate"] == pytest.approx(rate_after)
        expected_first = {"blend_fraction": 0.02, "switch_rate": 0.05, "blend_steps": 0.05}[next(iter(defaults))]
        assert opt.param_groups[0]["switch_rate"] == pytest.approx(expected_first)


# --- diagnostics read the steps from the device once ------------------------------------------------------


@pytest.fixture
def host_reads(monkeypatch):
    """Counts reads of a tensor's value into Python (each one a device sync on a GPU)."""
    count = {"reads": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def test_logging_the_blend_reads_the_steps_once(host_reads):
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(6)]
    opt = DualAdam([{"params": params[:4]}, {"params": params[4:]}], blend_steps=10)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    params[5].grad = None
    opt.step()
    host_reads["reads"] = 0
    assert opt.current_step() == 2
    assert host_reads["reads"] == 1
    host_reads["reads"] = 0
    assert opt.blend_weight(0) == pytest.approx(0.8)
    assert opt.blend_weight(1) == pytest.approx(0.8)
    assert host_reads["reads"] == 2
    assert DualAdam(params).current_step() == 0 and DualAdam(params).blend_weight() == pytest.approx(0.99)
