"""The one `key=value` reader and joiner, the blend rule owned by the optimizer, and warnings said once."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from dualadam_hf.integrations.optim_args import (
    check_training_args,
    join_pairs,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    parse_pairs,
)
from dualadam_hf.optimizer import resolve_blend


def test_pairs_are_read_and_joined_back():
    pairs = parse_pairs(" blend_steps = 5 ,foreach=true,, inverse_scale=auto ", "--optim_args")
    assert pairs == {"blend_steps": "5", "foreach": "true", "inverse_scale": "auto"}
    assert parse_pairs(join_pairs(pairs), "x") == pairs
    assert join_pairs({"foreach": False, "blend_fraction": 0.25}) == "foreach=false,blend_fraction=0.25"
    assert parse_pairs(None, "x") == {} == parse_pairs("", "x")


@pytest.mark.parametrize("text, match", [
    ("a", "dataset_config entry 'a' is not of the form key=value"),
    ("=1", "entry '=1' is not of the form key=value"),
    ("a=", "entry 'a=' is not of the form key=value"),
    ("a=1,a=2", "dataset_config gives 'a' twice"),
])
def test_a_bad_pair_names_the_setting_and_the_entry(text, match):
    with pytest.raises(ValueError, match=match):
        parse_pairs(text, "dataset_config")


def test_the_blend_is_given_one_way_by_the_optimizers_rule():
    message = "give only one of switch_rate, blend_steps, blend_fraction; got switch_rate, blend_steps"
    with pytest.raises(ValueError) as owner:
        resolve_blend(0.1, 4, None)
    with pytest.raises(ValueError) as parsed:
        parse_optim_args("switch_rate=0.1,blend_steps=4")
    assert str(owner.value).lower() == message
    assert str(parsed.value).lower() == f"--optim_args: {message}"


def training_args(optim_args: str) -> SimpleNamespace:
    return SimpleNamespace(optim="dualadam", optim_args=optim_args, learning_rate=1e-3, adam_beta1=0.9,
                           adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0)


def test_checking_the_arguments_leaves_the_optimizers_warnings_to_the_real_optimizer():
    """compare parses every variant and `trl sft` parses twice: a warning of the constructor (here: switch_rate 0
    is InvAdam) must reach the user once, when the optimizer is built for training, not once per parse."""
    args = training_args("switch_rate=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_args(args)
    assert caught == []
    import torch

    cls, kwargs = optimizer_cls_and_kwargs(args)
    with pytest.warns(UserWarning, match="switch_rate=0"):
        cls([torch.zeros(1)], **kwargs)
    with pytest.raises(ValueError, match="--optim dualadam: "):  # errors are still raised at the check
        check_training_args(training_args("switch_rate=2"))


def test_every_named_inverse_scale_of_the_optimizer_is_accepted():
    from dualadam_hf.optimizer import INVERSE_SCALE_NAMES

    for name in INVERSE_SCALE_NAMES:
        assert parse_optim_args(f"inverse_scale={name.upper()}") == {"inverse_scale": name}
    with pytest.raises(ValueError, match="inverse_scale='huge' is malformed"):
        parse_optim_args("inverse_scale=huge")
