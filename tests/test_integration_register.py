"""Registration of `--optim dualadam` with transformers: the startup hook, its opt-out, register(), layout errors."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

import dualadam_hf
from dualadam_hf.integrations.transformers import (
    TransformersLayoutError,
    is_registered,
    patch_trainer,
    patch_training_args,
)


def run_python(code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_overrides}
    if "DUALADAM_HF_NO_AUTOREGISTER" not in env_overrides:
        env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_names_are_registered_in_this_process():
    assert is_registered()
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


def test_register_is_idempotent():
    members = len(OptimizerNames)
    dualadam_hf.register()
    dualadam_hf.register()
    assert len(OptimizerNames) == members


def test_moved_internals_raise_a_clear_error():
    bare = types.ModuleType("transformers.training_args")
    with pytest.raises(TransformersLayoutError, match="OptimizerNames is missing .* DUALADAM_HF_NO_AUTOREGISTER=1"):
        patch_training_args(bare)
    trainer_module = types.ModuleType("transformers.trainer")

    class Trainer:
        def get_optimizer_cls_and_kwargs(self, args):  # an instance method: not the layout we patch
            return None

    trainer_module.Trainer = Trainer
    with pytest.raises(TransformersLayoutError, match="no longer a staticmethod"):
        patch_trainer(trainer_module)


def test_startup_hook_imports_nothing_heavy():
    result = run_python("""
        import sys
        print(sorted(m for m in ("torch", "transformers", "dualadam_hf") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# A stand-in transformers with the layout the patch relies on: importing it is quick, unlike the real one.
FAKE_TRAINING_ARGS = """
import dataclasses
import enum

class OptimizerNames(str, enum.Enum):
    ADAMW_TORCH = "adamw_torch"

@dataclasses.dataclass
class TrainingArguments:
    optim: str = "adamw_torch"
    optim_args: str = None

    def __post_init__(self):
        self.optim = OptimizerNames(self.optim)
"""

PROBE = """
    import sys
    from transformers.training_args import OptimizerNames, TrainingArguments
    print("dualadam" in OptimizerNames._value2member_map_, "dualadam_hf" in sys.modules)
"""


def fake_transformers(root, training_args_source: str) -> str:
    package = root / "transformers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "training_args.py").write_text(training_args_source)
    return str(root)


def test_startup_hook_registers_without_importing_dualadam_hf_in_user_code(tmp_path):
    result = run_python(PROBE, PYTHONPATH=fake_transformers(tmp_path, FAKE_TRAINING_ARGS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_opt_out_variable_turns_the_hook_off(tmp_path):
    result = run_python(PROBE, PYTHONPATH=fake_transformers(tmp_path, FAKE_TRAINING_ARGS),
                        DUALADAM_HF_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_startup_hook_registers_with_the_real_transformers():
    result = run_python(PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


# A drifted layout: the enum is no longer a str Enum and post-init moved away.
DRIFTED_TRAINING_ARGS = """
import enum

class OptimizerNames(enum.Enum):
    ADAMW_TORCH = "adamw_torch"

class TrainingArguments:
    def __init__(self, optim="adamw_torch"):
        self.optim = OptimizerNames(optim)
"""


def test_hook_fails_soft_when_transformers_has_moved_internals(tmp_path):
    """A layout the patch does not know must not break `import transformers` for anyone: one warning, no change."""
    root = fake_transformers(tmp_path, DRIFTED_TRAINING_ARGS)
    result = run_python("""
        import warnings
        warnings.simplefilter("always")
        from transformers.training_args import OptimizerNames, TrainingArguments
        import transformers.training_args as module
        print([m.value for m in OptimizerNames], TrainingArguments("adamw_torch").optim.value)
        print(hasattr(TrainingArguments, "_dualadam_hf_patched"))
    """, PYTHONPATH=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['adamw_torch']", "adamw_torch", "False"]  # transformers left untouched
    assert result.stderr.count("DualAdamRegistrationWarning") == 1
    assert "cannot register --optim dualadam" in result.stderr and "optimizer_cls_and_kwargs" in result.stderr
    # Only an explicit register() raises.
    explicit = run_python("""
        import dualadam_hf.integrations.transformers as hook
        import transformers.training_args as module
        hook.patch_training_args(module)
    """, PYTHONPATH=root)
    assert explicit.returncode != 0 and "TransformersLayoutError" in explicit.stderr


def test_hook_survives_an_unexpected_error_in_the_patch(monkeypatch):
    from dualadam_hf.integrations import transformers as hook

    def boom(module):
        raise RuntimeError("boom")

    monkeypatch.setitem(hook._PATCHES, "transformers.training_args", boom)
    with pytest.warns(hook.DualAdamRegistrationWarning, match="RuntimeError: boom"):
        hook.on_module_loaded(types.ModuleType("transformers.training_args"))


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
