"""Parsing `--optim_args` and building DualAdam kwargs from TrainingArguments."""

from types import SimpleNamespace

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam, optimizer_cls_and_kwargs
from dualadam_hf.integrations.optim_args import parse_optim_args, valid_optim_args_keys
from dualadam_hf.integrations.unwrap import find_dualadam


def fake_args(optim="dualadam", optim_args=None, **values):
    settings = dict(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    settings.update(values)
    return SimpleNamespace(optim=optim, optim_args=optim_args, **settings)


def test_parse_typed_values():
    assert parse_optim_args("switch_rate=8e-5") == {"switch_rate": 8e-5}
    assert parse_optim_args(" blend_steps = 5e2 , foreach=false ") == {"blend_steps": 500, "foreach": False}
    assert parse_optim_args("blend_fraction=0.1,fused=True") == {"blend_fraction": 0.1, "fused": True}
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("switch_rate", "not of the form key=value"),
        ("=3", "not of the form key=value"),
        ("blend_steps=", "not of the form key=value"),
        ("lr_ratio=2", "Unknown --optim_args key 'lr_ratio'"),
        ("blend_steps=2.5", "blend_steps='2.5' is malformed"),
        ("switch_rate=fast", "switch_rate='fast' is malformed"),
        ("foreach=maybe", "foreach='maybe' is malformed"),
        ("blend_steps=3,blend_steps=4", "gives 'blend_steps' twice"),
        ("switch_rate=0.1,blend_steps=4", "give only one of switch_rate, blend_steps, blend_fraction"),
    ],
)
def test_bad_optim_args_name_the_problem_and_the_valid_keys(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_optim_args(text)
    if "twice" not in message and "only one" not in message:
        assert ("switch_rate, blend_steps, blend_fraction, inverse_scale, foreach, fused, maximize, state_dtype, "
                "bf16_stochastic_round" in str(error.value))


def test_bf16_stochastic_round_in_optim_args_reaches_the_optimizer():
    from dualadam_hf.integrations.optim_args import optimizer_cls_and_kwargs

    assert parse_optim_args("bf16_stochastic_round=true") == {"bf16_stochastic_round": True}
    for name in ("dualadam", "invadam", "dualadam_8bit"):
        _, kwargs = optimizer_cls_and_kwargs(fake_args(optim=name, optim_args="bf16_stochastic_round=true"))
        assert kwargs["bf16_stochastic_round"] is True
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        parse_optim_args("bf16_stochastic_round=sometimes")


def test_inverse_scale_and_yaml_mappings():
    assert parse_optim_args("inverse_scale=auto,blend_steps=4") == {"inverse_scale": "auto", "blend_steps": 4}
    assert parse_optim_args("inverse_scale=0") == {"inverse_scale": 0.0}
    assert parse_optim_args({"blend_steps": 4, "foreach": False}) == {"blend_steps": 4, "foreach": False}
    assert parse_optim_args({"inverse_scale": "auto"}, "invadam") == {"inverse_scale": "auto"}
    with pytest.raises(ValueError, match="inverse_scale='big' is malformed"):
        parse_optim_args("inverse_scale=big")


def test_invadam_has_no_switch_keys():
    assert "switch_rate" not in valid_optim_args_keys("invadam")
    with pytest.raises(ValueError, match="Unknown --optim_args key 'switch_rate' for --optim invadam"):
        parse_optim_args("switch_rate=0.1", "invadam")


def test_kwargs_come_from_training_arguments_and_optim_args():
    cls, kwargs = optimizer_cls_and_kwargs(fake_args(optim_args="blend_steps=10"))
    assert cls is DualAdam
    assert kwargs == {
        "lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "blend_steps": 10,
    }
    optimizer = cls([torch.zeros(2, requires_grad=True)], **kwargs)
    assert optimizer.param_groups[0]["switch_rate"] == pytest.approx(0.1)


def test_optim_args_of_other_optimizers_are_ignored_and_overrides_win():
    cls, kwargs = optimizer_cls_and_kwargs(fake_args(optim="adamw_torch", optim_args="amsgrad=true"), lr=1.0)
    assert cls is DualAdam and kwargs["lr"] == 1.0 and "amsgrad" not in kwargs
    # An override of the blend length replaces the one from optim_args.
    _, kwargs = optimizer_cls_and_kwargs(fake_args(optim_args="blend_steps=10"), blend_fraction=0.2)
    assert kwargs["blend_fraction"] == 0.2 and "blend_steps" not in kwargs


def test_invadam_name_and_bad_override():
    cls, _ = optimizer_cls_and_kwargs(fake_args(optim="invadam"))
    assert cls is InvAdam
    with pytest.raises(TypeError, match=r"Unknown DualAdam override\(s\) \['momentum'\]; valid: lr, betas"):
        optimizer_cls_and_kwargs(fake_args(), momentum=0.9)


def test_find_dualadam_through_wrappers():
    inner = DualAdam([torch.zeros(1, requires_grad=True)])
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner))
    assert find_dualadam(wrapped) is inner
    assert find_dualadam(SimpleNamespace(base_optimizer=inner)) is inner
    assert find_dualadam(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
    assert find_dualadam(None) is None
    loop = SimpleNamespace()
    loop.optimizer = loop
    assert find_dualadam(loop) is None


def test_state_dtype_in_optim_args_reaches_the_optimizer_and_bad_values_fail_early():
    from dualadam_hf.integrations.optim_args import check_training_args

    cls, kwargs = optimizer_cls_and_kwargs(fake_args(optim_args="state_dtype=bfloat16"))
    p = torch.zeros(4, requires_grad=True)
    optimizer = cls([p], **kwargs)
    p.grad = torch.ones(4)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--optim dualadam: Invalid state_dtype: 'int8'"):
        check_training_args(fake_args(optim_args="state_dtype=int8"))


@pytest.mark.parametrize(("environment", "config", "swaps"), [
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, None, True),  # inline keys: the flag cannot be set
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}, None, False),
    ({}, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, True),
    ({}, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
          "zero_force_ds_cpu_optimizer": False}, False),
    ({}, {"zero_optimization": {"stage": 2}}, False),
])
def test_offload_that_would_swap_in_cpuadam_is_refused_where_the_arguments_are_built(
        tmp_path, monkeypatch, environment, config, swaps):
    """Under DeepSpeed optimizer offload accelerate replaces the optimizer with DeepSpeedCPUAdam unless the
    DeepSpeed config sets "zero_force_ds_cpu_optimizer": false: refused before the model loads (DualAdam's
    callback stops such a run at train begin too, after minutes of loading and building DeepSpeed's CPU Adam)."""
    import json

    from transformers import TrainingArguments

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    if config is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    build = lambda: TrainingArguments(str(tmp_path), optim="dualadam", report_to="none", use_cpu=True)  # noqa: E731
    if swaps:
        with pytest.raises(ValueError, match='DeepSpeedCPUAdam, not DualAdam, .*"zero_force_ds_cpu_optimizer": false'):
            build()
    else:
        build()
