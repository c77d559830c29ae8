"""Teach transformers the optimizer names `dualadam`, `invadam`, `dualadam_8bit` and `dualadam_4bit`
(`--optim dualadam`); see docs/usage.md.

The startup hook (`_dualadam_hf_autoregister`) calls `on_module_loaded` once transformers.training_args or
transformers.trainer has imported; `register()` does the same explicitly. What is patched, attribute by
attribute (docs/usage.md lists the same):

- `OptimizerNames`: one member per name (`DUALADAM`, `INVADAM`, `DUALADAM_8BIT`, `DUALADAM_4BIT`), so that argparse,
  YAML and `TrainingArguments` accept the names;
- `TrainingArguments.__post_init__`: wrapped, to check the DualAdam settings while the arguments are parsed;
- the optimizer lookup: one entry per name in the Trainer's handler table (`transformers.trainer_optimizer.
  _OPTIMIZER_HANDLERS`) where transformers has one, else (transformers before that table, 5.0 included) a wrapper
  around the staticmethod `Trainer.get_optimizer_cls_and_kwargs`;
- `Trainer.__init__`: wrapped, to attach DualAdamCallback when DualAdam trains.

Each patch checks the layout it relies on before it changes anything. The hook never warns and never raises:
a process that does not ask for DualAdam must not notice the package, even with warnings turned into errors. A
layout that moved is remembered instead, and raised as one TransformersLayoutError where one of these names
is asked for (TrainingArguments.__post_init__, Trainer.__init__) or by an explicit `register()`.
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .optim_args import OPTIMIZER_NAMES, check_training_args, optim_args_text, optimizer_name

# The startup hook, run from its .pth at interpreter start. It owns the name of its opt-out variable and imports
# this module to patch; this module never imports it back, and reads the name from the hook only where the hook
# has run (else there is nothing to turn off).
HOOK_MODULE = "_dualadam_hf_autoregister"
_PATCHED_MARK = "_dualadam_hf_patched"
_HANDLER_TABLE = "_OPTIMIZER_HANDLERS"
EXPLICIT_PATH = (
    "pass the optimizer explicitly: Trainer(..., optimizer_cls_and_kwargs="
    "dualadam_hf.optimizer_cls_and_kwargs(training_args)) with a TrainingArguments.optim that transformers knows"
)


class TransformersLayoutError(RuntimeError):
    """The installed transformers no longer has the internals that `--optim dualadam` registration relies on."""


# What could not be patched, by module name: raised where DualAdam is asked for, never at import.
_layout_errors: dict[str, TransformersLayoutError] = {}


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _hook_opt_out() -> str:
    """How to turn the running startup hook off, or "" where it has not run."""
    variable = getattr(sys.modules.get(HOOK_MODULE), "OPT_OUT_VARIABLE", None)
    return f" (and set {variable}=1 to turn the startup hook off)" if isinstance(variable, str) else ""


def _layout_error(what: str) -> TransformersLayoutError:
    return TransformersLayoutError(
        f"dualadam-hf cannot provide --optim {'/'.join(OPTIMIZER_NAMES)} with transformers "
        f"{_transformers_version()}: {what}. Install a transformers release it works with (docs/frameworks.md), or "
        f"{EXPLICIT_PATH}{_hook_opt_out()}."
    )


def _raise_if_unavailable(training_args: Any) -> None:
    """Raise the remembered layout error if these arguments ask for one of DualAdam's names and a patch failed."""
    name = optimizer_name(training_args)
    if name in OPTIMIZER_NAMES and _layout_errors:
        raise next(iter(_layout_errors.values()))


def _check_training_arguments(module: ModuleType) -> type:
    training_arguments = getattr(module, "TrainingArguments", None)
    fields = getattr(training_arguments, "__dataclass_fields__", {})
    if "optim" not in fields or "optim_args" not in fields or not hasattr(training_arguments, "__post_init__"):
        raise _layout_error(f"{module.__name__}.TrainingArguments has no optim/optim_args fields or __post_init__")
    return training_arguments


def _check_optimizer_names(module: ModuleType) -> type[enum.Enum]:
    names = getattr(module, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, enum.Enum) and issubclass(names, str)):
        raise _layout_error(f"{module.__name__}.OptimizerNames is missing or is no longer a str Enum")
    for attribute in ("_member_names_", "_member_map_", "_value2member_map_"):
        if not hasattr(names, attribute):
            raise _layout_error(f"the OptimizerNames enum has no {attribute} (changed enum internals)")
    return names


def _add_names(names: type[enum.Enum]) -> None:
    for value in OPTIMIZER_NAMES:
        if value in names._value2member_map_:
            continue
        name = value.upper()  # DUALADAM, INVADAM, DUALADAM_8BIT, DUALADAM_4BIT
        # Built by hand (an Enum cannot be extended) so that lookup, iteration and `OptimizerNames(value)` see it.
        member = str.__new__(names, value)
        member._name_, member._value_, member.__objclass__ = name, value, names
        member._sort_order_ = len(names._member_names_)
        names._member_names_.append(name)
        names._member_map_[name] = names._value2member_map_[value] = member
        # EnumType.__setattr__ refuses to touch member names; type.__setattr__ makes `OptimizerNames.DUALADAM` work.
        type.__setattr__(names, name, member)


def _wrap_post_init(training_arguments: type) -> None:
    original_post_init = training_arguments.__post_init__

    @functools.wraps(original_post_init)
    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
        _raise_if_unavailable(self)  # before transformers' own check turns a moved layout into "not a valid choice"
        if isinstance(self.optim_args, Mapping):
            # A YAML config (`trl sft --config`, HfArgumentParser.parse_yaml_file) may give a mapping.
            if optimizer_name(self) not in OPTIMIZER_NAMES:
                raise ValueError(
                    f"optim_args is a mapping ({dict(self.optim_args)}); transformers takes it as one string "
                    f"'k=v,k2=v2' for --optim {optimizer_name(self)}"
                )
            self.optim_args = optim_args_text(self.optim_args)
        original_post_init(self, *args, **kwargs)
        if optimizer_name(self) in OPTIMIZER_NAMES:
            check_training_args(self)
            if isinstance(self.optim_args, str):
                # Empty entries ("blend_steps=5,") are fine for DualAdam's parser but not for the one transformers
                # runs on optim_args before it looks up the handler.
                self.optim_args = ",".join(entry for entry in self.optim_args.split(",") if entry.strip())

    training_arguments.__post_init__ = __post_init__
    setattr(training_arguments, _PATCHED_MARK, True)


def patch_training_args(module: ModuleType) -> None:
    """Add the names of OPTIMIZER_NAMES (dualadam, invadam, dualadam_8bit, dualadam_4bit) to OptimizerNames
    (argparse choices, validation of `optim`) and check the DualAdam settings in TrainingArguments.__post_init__,
    so that a bad value fails while arguments are parsed.

    Where TrainingArguments is as expected but the enum moved, __post_init__ is still wrapped, so that asking
    for `dualadam` gives the layout error instead of transformers' "not a valid OptimizerNames".
    """
    training_arguments = _check_training_arguments(module)
    if not getattr(training_arguments, _PATCHED_MARK, False):
        _wrap_post_init(training_arguments)
    _add_names(_check_optimizer_names(module))


def _handler_table(module: ModuleType, factory: Any) -> dict | None:
    """The Trainer's table of optimizer handlers, if `get_optimizer_cls_and_kwargs` looks its handler up there."""
    table = getattr(module, _HANDLER_TABLE, None)
    function = getattr(factory, "__func__", None)
    if not isinstance(table, dict) or function is None:
        return None
    uses_table = _HANDLER_TABLE in function.__code__.co_names and function.__globals__ is vars(module)
    return table if uses_table else None


def _dualadam_handler(context: Any) -> tuple[Any, Any]:
    """Handler of the Trainer's table: its context carries the TrainingArguments as `args`."""
    from .optim_args import optimizer_cls_and_kwargs

    return optimizer_cls_and_kwargs(context.args)


def _register_handlers(table: dict) -> None:
    names = getattr(sys.modules.get("transformers.training_args"), "OptimizerNames", None)
    for value in OPTIMIZER_NAMES:
        # The member and its plain value hash and compare alike (str Enum); use the member where there is one.
        key = names._value2member_map_.get(value, value) if names is not None else value
        table.setdefault(key, _dualadam_handler)


def _wrap_factory(trainer_cls: type, factory: staticmethod) -> None:
    from .optim_args import optimizer_cls_and_kwargs

    original_get = factory.__func__

    @functools.wraps(original_get)
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if optimizer_name(args) in OPTIMIZER_NAMES:
            return optimizer_cls_and_kwargs(args)
        return original_get(args, model)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _wrap_init(trainer_cls: type) -> None:
    from .callbacks import attach_callback

    original_init = trainer_cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _raise_if_unavailable(self.args)
        attach_callback(self)

    trainer_cls.__init__ = __init__
    setattr(trainer_cls, _PATCHED_MARK, True)


def patch_trainer(module: ModuleType) -> None:
    """Make Trainer build DualAdam/InvAdam for those names and attach DualAdamCallback when DualAdam is used.

    The names go into the Trainer's handler table where there is one; otherwise the staticmethod
    `get_optimizer_cls_and_kwargs` (the documented override point) is wrapped. `Trainer.__init__` is wrapped in
    both cases, for the callback, and also where the optimizer lookup moved, so that asking for DualAdam fails
    there with the layout error.
    """
    trainer_cls = getattr(module, "Trainer", None)
    if not isinstance(trainer_cls, type):
        raise _layout_error(f"{module.__name__} has no Trainer class")
    factory = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    table = _handler_table(module, factory)
    if table is not None:
        _register_handlers(table)
    if getattr(trainer_cls, _PATCHED_MARK, False):
        return
    if table is None and isinstance(factory, staticmethod):
        _wrap_factory(trainer_cls, factory)
    _wrap_init(trainer_cls)
    if table is None and not isinstance(factory, staticmethod):
        raise _layout_error(
            f"{module.__name__} has neither the optimizer handler table {_HANDLER_TABLE} nor the staticmethod "
            "Trainer.get_optimizer_cls_and_kwargs"
        )


_PATCHES = {"transformers.training_args": patch_training_args, "transformers.trainer": patch_trainer}


def on_module_loaded(module: ModuleType) -> None:
    """Patch a watched transformers module right after it has imported (called by the startup hook).

    Never raises and never warns: a failure to register must not change anything for processes that do not
    use DualAdam. It is remembered and raised where DualAdam is asked for.
    """
    patch = _PATCHES.get(module.__name__)
    if patch is None:
        return
    try:
        patch(module)
    except Exception as error:  # noqa: BLE001 (whatever moved, the import of transformers must go on)
        if not isinstance(error, TransformersLayoutError):
            error = _layout_error(f"patching {module.__name__} failed with {type(error).__name__}: {error}")
        _layout_errors[module.__name__] = error
    else:
        _layout_errors.pop(module.__name__, None)


def register() -> None:
    """Register `--optim dualadam` and the other names of OPTIMIZER_NAMES with transformers now; needed only where
    the startup hook is turned off (by its opt-out variable, docs/usage.md) or cannot run. Call it before building
    any argument parser or TrainingArguments; calling it again is harmless. Raises TransformersLayoutError if the
    installed transformers has moved."""
    import transformers.trainer
    import transformers.training_args

    for module in (transformers.training_args, transformers.trainer):
        _PATCHES[module.__name__](module)
        _layout_errors.pop(module.__name__, None)


