"""Registration of `--optim dualadam` with transformers: the startup hook, its opt-out, register(), layout errors."""

import types

import pytest
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

import dualadam_hf
from dualadam_hf.integrations import transformers as hooks
from dualadam_hf.integrations.optim_args import OPTIMIZER_NAMES
from dualadam_hf.integrations.transformers import (
    TransformersLayoutError,
    patch_trainer,
    patch_training_args,
)
from tests.standins import KNOWN_TRAINING_ARGS, fake_transformers, run_python


def test_names_are_registered_in_this_process():
    assert "dualadam" in OptimizerNames._value2member_map_ and not hooks._layout_errors
    assert OptimizerNames("dualadam") is OptimizerNames.DUALADAM and OptimizerNames.INVADAM.value == "invadam"
    assert "dualadam" in [member.value for member in OptimizerNames]


def test_argparse_yaml_and_dict_accept_the_names(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "dualadam", "--optim_args", "switch_rate=8e-5", "--report_to",
         "none"]
    )
    assert args.optim == OptimizerNames.DUALADAM and args.optim_args == "switch_rate=8e-5"
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {tmp_path}\noptim: invadam\nreport_to: none\n")
    (args,) = parser.parse_yaml_file(str(config))
    assert args.optim == OptimizerNames.INVADAM


def test_bad_optim_args_fail_when_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match="Unknown --optim_args key 'blend' for --optim dualadam; valid keys: "):
        TrainingArguments(output_dir=str(tmp_path), optim="dualadam", optim_args="blend=3", report_to="none")
    with pytest.raises(ValueError, match="--optim dualadam: Invalid blend_fraction"):
        TrainingArguments(output_dir=str(tmp_path), optim="dualadam", optim_args="blend_fraction=1.5",
                          report_to="none")
    # optim_args of other optimizers are not ours to check.
    TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", optim_args="whatever=1", report_to="none")


def test_empty_optim_args_entries_reach_the_optimizer(tmp_path):
    """A trailing comma passes DualAdam's checks, so transformers' own optim_args parser must not trip on it."""
    from transformers import Trainer

    args = TrainingArguments(str(tmp_path), optim="dualadam", optim_args="blend_steps=5,", report_to="none")
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is dualadam_hf.DualAdam and kwargs["blend_steps"] == 5


def test_register_is_idempotent():
    """With the hook off, register() patches once: a second call adds no member and wraps nothing twice."""
    result = run_python("""
        from transformers import Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames
        import dualadam_hf
        before = len(OptimizerNames)
        dualadam_hf.register()
        state = (len(OptimizerNames), TrainingArguments.__post_init__, Trainer.__init__,
                 Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__)
        dualadam_hf.register()
        again = (len(OptimizerNames), TrainingArguments.__post_init__, Trainer.__init__,
                 Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__)
        wrapped_twice = hasattr(TrainingArguments.__post_init__.__wrapped__, "__wrapped__") or hasattr(
            Trainer.__init__.__wrapped__, "__wrapped__")
        print(state[0] - before, state == again, wrapped_twice, OptimizerNames("dualadam").name)
    """, DUALADAM_HF_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr
    # One member per name: dualadam, invadam, dualadam_8bit, dualadam_4bit.
    assert result.stdout.split() == [str(len(OPTIMIZER_NAMES)), "True", "False", "DUALADAM"]


def test_optimizer_lookup_is_registered_in_the_handler_table_where_there_is_one(tmp_path):
    """transformers with a handler table gets two entries and an untouched get_optimizer_cls_and_kwargs; one
    without it (5.0) gets the staticmethod wrapped."""
    import transformers.trainer as trainer_module
    from transformers import Trainer

    table = getattr(trainer_module, "_OPTIMIZER_HANDLERS", None)
    factory = Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
    if table is not None:
        assert all(name in table for name in OPTIMIZER_NAMES), "the names are not in the handler table"
        assert not hasattr(factory, "__wrapped__"), "the staticmethod is wrapped although the table is there"
    else:
        assert factory.__wrapped__.__module__ == "transformers.trainer"
    args = TrainingArguments(str(tmp_path), optim="invadam", report_to="none")
    optimizer_cls, _ = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is dualadam_hf.InvAdam


def test_moved_internals_raise_a_clear_error():
    bare = types.ModuleType("transformers.training_args")
    with pytest.raises(TransformersLayoutError, match="TrainingArguments has no optim.* DUALADAM_HF_NO_AUTOREGISTER=1"):
        patch_training_args(bare)
    trainer_module = types.ModuleType("transformers.trainer")

    class Trainer:
        def get_optimizer_cls_and_kwargs(self, args):  # an instance method: not the layout we patch
            return None

    trainer_module.Trainer = Trainer
    with pytest.raises(TransformersLayoutError, match="neither the optimizer handler table .* nor the staticmethod"):
        patch_trainer(trainer_module)


def test_startup_hook_imports_nothing_heavy():
    result = run_python("""
        import sys
        print(sorted(m for m in ("torch", "transformers", "dualadam_hf") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


PROBE = """
    import sys
    from transformers.training_args import OptimizerNames, TrainingArguments
    print("dualadam" in OptimizerNames._value2member_map_, "dualadam_hf" in sys.modules)
"""


def test_startup_hook_registers_without_importing_dualadam_hf_in_user_code(tmp_path):
    result = run_python(PROBE, PYTHONPATH=fake_transformers(tmp_path, training_args=KNOWN_TRAINING_ARGS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_opt_out_variable_turns_the_hook_off(tmp_path):
    result = run_python(PROBE, PYTHONPATH=fake_transformers(tmp_path, training_args=KNOWN_TRAINING_ARGS),
                        DUALADAM_HF_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_startup_hook_registers_with_the_real_transformers():
    result = run_python(PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


# A drifted layout: the enum is a plain Enum (not a str Enum) and TrainingArguments has no __post_init__ hook to wrap.
DRIFTED_TRAINING_ARGS = """
import enum

class OptimizerNames(enum.Enum):
    ADAMW_TORCH = "adamw_torch"

class TrainingArguments:
    def __init__(self, optim="adamw_torch"):
        self.optim = OptimizerNames(optim)
"""


def test_hook_leaves_an_unknown_layout_alone_without_a_word(tmp_path):
    """A layout the patch does not know must not change `import transformers` for anyone: no warning, no change."""
    root = fake_transformers(tmp_path, training_args=DRIFTED_TRAINING_ARGS)
    result = run_python("""
        import warnings
        warnings.simplefilter("always")
        from transformers.training_args import OptimizerNames, TrainingArguments
        print([m.value for m in OptimizerNames], TrainingArguments("adamw_torch").optim.value)
        print(hasattr(TrainingArguments, "_dualadam_hf_patched"))
    """, PYTHONPATH=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['adamw_torch']", "adamw_torch", "False"]  # transformers left untouched
    assert result.stderr == ""
    # An explicit patch raises.
    explicit = run_python("""
        import dualadam_hf.integrations.transformers as hook
        import transformers.training_args as module
        hook.patch_training_args(module)
    """, PYTHONPATH=root)
    assert explicit.returncode != 0 and "TransformersLayoutError" in explicit.stderr


def test_hook_keeps_an_unexpected_error_for_those_who_ask(monkeypatch, tmp_path):
    """An error inside a patch is neither raised nor shown at import; it is raised where DualAdam is asked for."""
    import warnings

    from dualadam_hf.integrations import transformers as hook

    def boom(module):
        raise RuntimeError("boom")

    monkeypatch.setitem(hook._PATCHES, "transformers.training_args", boom)
    monkeypatch.setattr(hook, "_layout_errors", {}, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hook.on_module_loaded(types.ModuleType("transformers.training_args"))
    hook._raise_if_unavailable(types.SimpleNamespace(optim="adamw_torch"))  # nothing asked, nothing raised
    with pytest.raises(TransformersLayoutError, match="RuntimeError: boom.*optimizer_cls_and_kwargs"):
        TrainingArguments(str(tmp_path), optim="dualadam", report_to="none")


@pytest.mark.slow
def test_explicit_register_works_with_the_hook_off(tmp_path):
    result = run_python(f"""
        import dualadam_hf
        from transformers.training_args import OptimizerNames
        before = "dualadam" in OptimizerNames._value2member_map_
        dualadam_hf.register()
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments({str(tmp_path)!r}, optim="dualadam", optim_args="blend_steps=5", report_to="none")
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        print(before, optimizer_cls.__name__, kwargs["blend_steps"])
    """, DUALADAM_HF_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "DualAdam", "5"]
