"""The startup hook is invisible to processes that do not ask for DualAdam, warnings-as-errors included.

Each case runs in a fresh interpreter, the way users meet the hook: `python -W error`, `PYTHONWARNINGS=error`
or pytest's `filterwarnings = error`, on the installed transformers and on stand-in transformers packages whose
layout is either the one the patch knows or one that has moved. Where nothing asks for DualAdam, stderr must be
empty; where `dualadam` is asked for on a moved layout, the answer is one TransformersLayoutError that names the
explicit `optimizer_cls_and_kwargs` path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.standins import KNOWN_TRAINING_ARGS, fake_transformers, run_python

REPO = Path(__file__).resolve().parent.parent


# --- stand-in transformers packages --------------------------------------------------------------------------

# What callbacks.py needs from transformers (TrainerCallback, DefaultFlowCallback).
FAKE_INIT = """
from .trainer_callback import DefaultFlowCallback, TrainerCallback
"""
FAKE_TRAINER_CALLBACK = """
class TrainerCallback:
    pass

class DefaultFlowCallback(TrainerCallback):
    pass
"""

# A Trainer that keeps its optimizers in a handler table (transformers 5.6 and later).
_TRAINER_BASE = """
from transformers.trainer_callback import DefaultFlowCallback
from transformers.training_args import OptimizerNames


class _Callbacks:
    def __init__(self):
        self.callbacks = [DefaultFlowCallback()]


class _TrainerBase:
    def __init__(self, model=None, args=None):
        self.args, self.optimizer, self.optimizer_cls_and_kwargs = args, None, None
        self.callback_handler = _Callbacks()
"""
TABLE_TRAINER = _TRAINER_BASE + """

class OptimizerContext:
    def __init__(self, args, model):
        self.args, self.model = args, model


def _get_adamw(ctx):
    return "AdamW", {"lr": ctx.args.learning_rate}


_OPTIMIZER_HANDLERS = {OptimizerNames.ADAMW_TORCH: _get_adamw}


class Trainer(_TrainerBase):

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        handler = _OPTIMIZER_HANDLERS.get(args.optim)
        if handler is None:
            raise ValueError(f"Trainer cannot instantiate unsupported optimizer: {args.optim}")
        return handler(OptimizerContext(args, model))
"""
# The transformers 5.0 layout: no table, one staticmethod that maps names to classes.
STATICMETHOD_TRAINER = _TRAINER_BASE + """

class Trainer(_TrainerBase):

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        if args.optim == OptimizerNames.ADAMW_TORCH:
            return "AdamW", {"lr": args.learning_rate}
        raise ValueError(f"Trainer cannot instantiate unsupported optimizer: {args.optim}")
"""
# A layout that moved: no handler table, and the factory became an instance method of another name.
MOVED_TRAINER = _TRAINER_BASE + """

class Trainer(_TrainerBase):

    def build_optimizer_spec(self):
        return "AdamW", {"lr": self.args.learning_rate}
"""
# A layout whose names are a plain Enum (not a str Enum), while TrainingArguments still validates in __post_init__.
MOVED_ENUM_TRAINING_ARGS = KNOWN_TRAINING_ARGS.replace("class OptimizerNames(str, enum.Enum):",
                                                       "class OptimizerNames(enum.Enum):")


def stand_in(root: Path, training_args: str, trainer: str) -> str:
    """A stand-in transformers with what callbacks.py needs, the given training_args.py and trainer.py."""
    return fake_transformers(root, __init__=FAKE_INIT, trainer_callback=FAKE_TRAINER_CALLBACK,
                             training_args=training_args, trainer=trainer)


ASK_NOTHING = """
    import transformers.trainer
    from transformers.training_args import TrainingArguments
    TrainingArguments(optim="adamw_torch")
    print("ok")
"""
ASK_DUALADAM_AFTER_TRAINER = """
    import transformers.trainer
    from transformers.training_args import TrainingArguments
    TrainingArguments(optim="dualadam")
"""
ASK_DUALADAM_AT_TRAINER = """
    from transformers.training_args import TrainingArguments
    args = TrainingArguments(optim="dualadam")
    print("arguments built", flush=True)
    from transformers.trainer import Trainer
    Trainer(args=args)
"""
WARNINGS_AS_ERRORS = [(("-W", "error"), {}), ((), {"PYTHONWARNINGS": "error"})]


def assert_one_layout_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode != 0, result.stdout
    assert result.stderr.count("TransformersLayoutError:") == 1, result.stderr
    assert "cannot provide --optim dualadam" in result.stderr, result.stderr
    assert "optimizer_cls_and_kwargs=dualadam_hf.optimizer_cls_and_kwargs(training_args)" in result.stderr
    assert "Warning" not in result.stderr, result.stderr


# --- the layout the patch knows ------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess per case: run in CI, not in the quick loop
@pytest.mark.parametrize("trainer", [TABLE_TRAINER, STATICMETHOD_TRAINER], ids=["handler-table", "staticmethod"])
@pytest.mark.parametrize(("flags", "env"), WARNINGS_AS_ERRORS, ids=["-W error", "PYTHONWARNINGS=error"])
def test_known_layout_is_silent_and_registers(tmp_path, trainer, flags, env):
    root = stand_in(tmp_path, KNOWN_TRAINING_ARGS, trainer)
    result = run_python("""
        from transformers.trainer import Trainer
        from transformers.training_args import TrainingArguments
        TrainingArguments(optim="adamw_torch")
        args = TrainingArguments(optim="dualadam", optim_args="blend_steps=5")
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        print(optimizer_cls.__name__, kwargs["blend_steps"])
    """, *flags, PYTHONPATH=root, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == ["DualAdam", "5"]


# --- layouts that moved --------------------------------------------------------------------------------------

MOVED_LAYOUTS = {
    "trainer-moved": (KNOWN_TRAINING_ARGS, MOVED_TRAINER),
    "enum-moved": (MOVED_ENUM_TRAINING_ARGS, TABLE_TRAINER),
}


@pytest.mark.slow  # a subprocess per case: run in CI, not in the quick loop
@pytest.mark.parametrize("layout", MOVED_LAYOUTS)
@pytest.mark.parametrize(("flags", "env"), WARNINGS_AS_ERRORS, ids=["-W error", "PYTHONWARNINGS=error"])
def test_moved_layout_is_silent_where_nothing_asks(tmp_path, layout, flags, env):
    root = stand_in(tmp_path, *MOVED_LAYOUTS[layout])
    result = run_python(ASK_NOTHING, *flags, PYTHONPATH=root, **env)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("ok\n", "")


@pytest.mark.parametrize("layout", MOVED_LAYOUTS)
def test_moved_layout_gives_one_clear_error_where_dualadam_is_asked_for(tmp_path, layout):
    root = stand_in(tmp_path, *MOVED_LAYOUTS[layout])
    assert_one_layout_error(run_python(ASK_DUALADAM_AFTER_TRAINER, "-W", "error", PYTHONPATH=root))


def test_moved_trainer_errors_at_the_trainer_when_arguments_came_first(tmp_path):
    """Arguments built before transformers.trainer was imported: the Trainer is where the name gets used."""
    root = stand_in(tmp_path, KNOWN_TRAINING_ARGS, MOVED_TRAINER)
    result = run_python(ASK_DUALADAM_AT_TRAINER, "-W", "error", PYTHONPATH=root)
    assert result.stdout == "arguments built\n"
    assert_one_layout_error(result)


def test_unknown_layout_is_left_alone_and_silent(tmp_path):
    """Neither a known TrainingArguments nor a Trainer: nothing to patch, nothing printed."""
    unrecognisable = "class TrainingArguments:\n    def __init__(self, optim):\n        self.optim = optim\n"
    root = stand_in(tmp_path, unrecognisable, "class Helper:\n    pass\n")
    result = run_python("""
        import transformers.trainer, transformers.training_args as module
        arguments = module.TrainingArguments
        print(arguments(optim="adamw_torch").optim, "_dualadam_hf_patched" in vars(arguments))
    """, "-W", "error", PYTHONPATH=root)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("adamw_torch False\n", "")


@pytest.mark.slow  # a subprocess per case: run in CI, not in the quick loop
def test_pytest_filterwarnings_error_collects_a_module_that_imports_transformers(tmp_path):
    """Another project's suite run with `filterwarnings = error` must not fail because dualadam-hf is installed."""
    root = stand_in(tmp_path / "site", KNOWN_TRAINING_ARGS, MOVED_TRAINER)
    (tmp_path / "test_other.py").write_text(textwrap.dedent("""
        import transformers.trainer
        from transformers.training_args import TrainingArguments

        def test_adamw():
            assert TrainingArguments(optim="adamw_torch").optim.value == "adamw_torch"
    """))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "filterwarnings=error",
         "-o", "addopts=", str(tmp_path / "test_other.py")],
        env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "warning" not in result.stdout.lower(), result.stdout


def test_stale_hook_without_the_package_is_silent(tmp_path):
    """dualadam-hf uninstalled but its .pth and hook module left in site-packages: transformers imports quietly."""
    site_dir = tmp_path / "site"
    stand_in(site_dir, KNOWN_TRAINING_ARGS, TABLE_TRAINER)
    for name in ("_dualadam_hf_autoregister.py", "dualadam_hf_autoregister.pth"):
        shutil.copy(REPO / name, site_dir / name)
    # -S: no site-packages, so the only copy of dualadam_hf would be the repository, which cwd keeps off sys.path.
    result = run_python(f"""
        import site, sys
        site.addsitedir({str(site_dir)!r})  # processes the .pth as site-packages would
        assert any(type(f).__name__ == "_TransformersWatcher" for f in sys.meta_path), "the hook did not run"
        from transformers.training_args import OptimizerNames, TrainingArguments
        import transformers.trainer
        print([m.value for m in OptimizerNames], "dualadam_hf" in sys.modules)
    """, "-S", "-W", "error", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("['adamw_torch'] False\n", "")


# --- the installed transformers ------------------------------------------------------------------------------

def test_installed_transformers_with_warnings_as_errors(tmp_path):
    """adamw_torch and dualadam arguments on the installed transformers, whatever its version, under -W error."""
    result = run_python(f"""
        import transformers
        from transformers import TrainingArguments
        args = TrainingArguments({str(tmp_path)!r}, optim="adamw_torch", report_to="none")
        ours = TrainingArguments({str(tmp_path)!r}, optim="dualadam", optim_args="blend_steps=5", report_to="none")
        print(args.optim.value, ours.optim.value)
    """, "-W", "error")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("adamw_torch dualadam\n", "")


@pytest.mark.slow
def test_installed_trainer_with_pythonwarnings_error_and_adamw(tmp_path):
    result = run_python(f"""
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments({str(tmp_path)!r}, optim="adamw_torch", report_to="none")
        print(Trainer.get_optimizer_cls_and_kwargs(args)[0].__name__)
    """, PYTHONWARNINGS="error")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("AdamW\n", "")


@pytest.mark.slow
def test_installed_transformers_trains_dualadam_with_warnings_as_errors(tmp_path):
    """`optim="dualadam"` on the installed transformers, whatever its version: no warning, DualAdam trains."""
    result = run_python(f"""
        import json, pathlib
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
        from dualadam_hf.experiments.tiny import build_tiny_llama, tiny_lm_dataset
        from transformers import AutoModelForCausalLM
        build_tiny_llama({str(tmp_path / "model")!r})
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "model")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
        args = TrainingArguments({str(tmp_path / "out")!r}, optim="dualadam", optim_args="blend_steps=2",
                                 max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to="none",
                                 save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=tiny_lm_dataset(tokenizer),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        from dualadam_hf.integrations.unwrap import find_dualadam
        print(type(find_dualadam(trainer.optimizer)).__name__, "dualadam/blend" in trainer.state.log_history[0])
    """, "-W", "error::UserWarning", "-W", "error::FutureWarning")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["DualAdam", "True"], result.stdout
    assert "dualadam" not in result.stderr.lower(), result.stderr
