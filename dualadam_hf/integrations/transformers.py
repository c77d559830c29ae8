"""Teach transformers the optimizer names `dualadam` and `invadam` (`--optim dualadam`).

Three small patches, each applied once the module it touches has been imported (the startup hook in
`_dualadam_hf_autoregister` calls `on_module_loaded`; `register()` does it explicitly):

- `transformers.training_args`: add DUALADAM/INVADAM to the `OptimizerNames` enum, which HfArgumentParser turns
  into argparse choices and `TrainingArguments.__post_init__` uses to validate `optim`; and check the DualAdam
  settings (`optim_args`, betas, ...) in `__post_init__`, so a bad value fails while arguments are parsed.
- `transformers.trainer`: `Trainer.get_optimizer_cls_and_kwargs` (the documented override point) returns
  DualAdam/InvAdam for those names, and `Trainer.__init__` attaches DualAdamCallback when DualAdam is used.

Each patch checks the layout it relies on before it changes anything. If transformers has moved any of it,
the startup hook warns once (DualAdamRegistrationWarning) and leaves transformers untouched, so scripts that
do not use DualAdam keep working; only an explicit `register()` raises TransformersLayoutError.
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .optim_args import (
    DUALADAM_NAME,
    INVADAM_NAME,
    OPTIMIZER_NAMES,
    check_training_args,
    optim_args_text,
    optimizer_name,
)

# The transformers releases the patch was tested against (docs/frameworks.md). Installing does not cap
# transformers: outside this range the hook warns once and works wherever the layout is still there.
TESTED_TRANSFORMERS = ">=5.0,<5.25"
OPT_OUT_VARIABLE = "DUALADAM_HF_NO_AUTOREGISTER"
_ENUM_MEMBERS = {"DUALADAM": DUALADAM_NAME, "INVADAM": INVADAM_NAME}
_PATCHED_MARK = "_dualadam_hf_patched"


class TransformersLayoutError(RuntimeError):
    """The installed transformers no longer has the internals that `--optim dualadam` registration relies on."""


class DualAdamRegistrationWarning(UserWarning):
    """The startup hook could not register `--optim dualadam`; transformers was left as it is."""


EXPLICIT_PATH = (
    "pass the optimizer explicitly: Trainer(..., optimizer_cls_and_kwargs="
    "dualadam_hf.optimizer_cls_and_kwargs(training_args)) with a TrainingArguments.optim that transformers knows"
)


def _layout_error(what: str) -> TransformersLayoutError:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return TransformersLayoutError(
        f"dualadam-hf cannot register --optim dualadam with transformers {version}: {what}. "
        f"It was tested with transformers{TESTED_TRANSFORMERS}; install such a release, or {EXPLICIT_PATH} "
        f"(and set {OPT_OUT_VARIABLE}=1 to silence the startup hook)."
    )


def _warn_if_untested_version() -> None:
    from packaging.specifiers import SpecifierSet

    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    if version not in SpecifierSet(TESTED_TRANSFORMERS, prereleases=True):
        warnings.warn(
            f"dualadam-hf was tested with transformers{TESTED_TRANSFORMERS}, found {version}; "
            f"--optim dualadam is registered because the layout it needs is there. If it misbehaves, {EXPLICIT_PATH}.",
            DualAdamRegistrationWarning,
            stacklevel=3,
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> None:
    """Add a member to an existing str Enum, so that lookup, iteration and `Enum(value)` all see it."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    # EnumType.__setattr__ refuses to touch member names; type.__setattr__ makes `OptimizerNames.DUALADAM` work.
    type.__setattr__(enum_cls, name, member)


def patch_training_args(module: ModuleType) -> None:
    """Add dualadam/invadam to OptimizerNames and validate DualAdam settings in TrainingArguments.__post_init__."""
    optimizer_names = getattr(module, "OptimizerNames", None)
    if not (isinstance(optimizer_names, type) and issubclass(optimizer_names, enum.Enum)
            and issubclass(optimizer_names, str)):
        raise _layout_error(f"{module.__name__}.OptimizerNames is missing or is no longer a str Enum")
    for attribute in ("_member_names_", "_member_map_", "_value2member_map_"):
        if not hasattr(optimizer_names, attribute):
            raise _layout_error(f"the OptimizerNames enum has no {attribute} (changed enum internals)")
    training_arguments = getattr(module, "TrainingArguments", None)
    fields = getattr(training_arguments, "__dataclass_fields__", {})
    if "optim" not in fields or "optim_args" not in fields or not hasattr(training_arguments, "__post_init__"):
        raise _layout_error(f"{module.__name__}.TrainingArguments has no optim/optim_args fields or __post_init__")

    if getattr(training_arguments, _PATCHED_MARK, False):
        return
    _warn_if_untested_version()
    for name, value in _ENUM_MEMBERS.items():
        _add_enum_member(optimizer_names, name, value)

    original_post_init = training_arguments.__post_init__

    @functools.wraps(original_post_init)
    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
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

    training_arguments.__post_init__ = __post_init__
    setattr(training_arguments, _PATCHED_MARK, True)


def patch_trainer(module: ModuleType) -> None:
    """Make Trainer build DualAdam/InvAdam for those names and attach DualAdamCallback when DualAdam is used."""
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        raise _layout_error(f"{module.__name__} has no Trainer class")
    original_factory = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(original_factory, staticmethod):
        raise _layout_error("Trainer.get_optimizer_cls_and_kwargs is missing or is no longer a staticmethod")
    if getattr(trainer_cls, _PATCHED_MARK, False):
        return

    from .callbacks import attach_callback, wants_dualadam
    from .optim_args import optimizer_cls_and_kwargs

    original_get = original_factory.__func__

    @functools.wraps(original_get)
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if optimizer_name(args) in OPTIMIZER_NAMES:
            return optimizer_cls_and_kwargs(args)
        return original_get(args, model)

    original_init = trainer_cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if wants_dualadam(self):
            attach_callback(self)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    trainer_cls.__init__ = __init__
    setattr(trainer_cls, _PATCHED_MARK, True)


_PATCHES = {"transformers.training_args": patch_training_args, "transformers.trainer": patch_trainer}


_warned: set[str] = set()


def on_module_loaded(module: ModuleType) -> None:
    """Called by the startup hook right after a watched transformers module has finished importing.

    Never raises: a failure to register must not break `import transformers` for scripts that do not use
    DualAdam. It warns once per process and leaves the module as it was.
    """
    patch = _PATCHES.get(module.__name__)
    if patch is None:
        return
    try:
        patch(module)
    except Exception as error:  # noqa: BLE001 (whatever moved, the import of transformers must go on)
        message = str(error) if isinstance(error, TransformersLayoutError) else (
            f"dualadam-hf could not register --optim dualadam ({type(error).__name__}: {error}); {EXPLICIT_PATH}"
        )
        if message not in _warned:
            _warned.add(message)
            warnings.warn(f"{message} transformers was left unchanged.", DualAdamRegistrationWarning, stacklevel=2)


def register() -> None:
    """Register `--optim dualadam`/`invadam` with transformers now (imports transformers).

    Needed only where the startup hook is off (DUALADAM_HF_NO_AUTOREGISTER=1) or cannot run; call it before any
    argument parser or TrainingArguments is built. Calling it again is harmless.
    """
    import transformers.trainer
    import transformers.training_args

    patch_training_args(transformers.training_args)
    patch_trainer(transformers.trainer)


def is_registered() -> bool:
    """Whether transformers already knows `--optim dualadam` in this process (never imports transformers)."""
    training_args = sys.modules.get("transformers.training_args")
    names = getattr(training_args, "OptimizerNames", None)
    return names is not None and DUALADAM_NAME in getattr(names, "_value2member_map_", {})
