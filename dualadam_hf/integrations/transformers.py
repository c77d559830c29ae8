"""Teach transformers the optimizer names `dualadam` and `invadam` (`--optim dualadam`); see docs/usage.md.

The startup hook (`_dualadam_hf_autoregister`) calls `on_module_loaded` once a patched module has imported;
`register()` patches explicitly. Each patch checks the layout it relies on before it changes anything. If
transformers has moved it, the hook warns once (DualAdamRegistrationWarning) and leaves transformers untouched,
so scripts that do not use DualAdam keep working; only an explicit `register()` raises TransformersLayoutError.
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

from .optim_args import OPTIMIZER_NAMES, check_training_args, optim_args_text, optimizer_name

# The transformers releases the patch was tested against (docs/frameworks.md). Installing does not cap
# transformers: outside this range the hook warns once and works wherever the layout is still there.
TESTED_TRANSFORMERS = ">=5.0,<5.25"
OPT_OUT_VARIABLE = "DUALADAM_HF_NO_AUTOREGISTER"
_PATCHED_MARK = "_dualadam_hf_patched"
EXPLICIT_PATH = (
    "pass the optimizer explicitly: Trainer(..., optimizer_cls_and_kwargs="
    "dualadam_hf.optimizer_cls_and_kwargs(training_args)) with a TrainingArguments.optim that transformers knows"
)


class TransformersLayoutError(RuntimeError):
    """The installed transformers no longer has the internals that `--optim dualadam` registration relies on."""


class DualAdamRegistrationWarning(UserWarning):
    """The startup hook could not register `--optim dualadam`; transformers was left as it is."""


def _transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _layout_error(what: str) -> TransformersLayoutError:
    return TransformersLayoutError(
        f"dualadam-hf cannot register --optim dualadam with transformers {_transformers_version() or 'unknown'}: "
        f"{what}. It was tested with transformers{TESTED_TRANSFORMERS}; install such a release, or {EXPLICIT_PATH} "
        f"(and set {OPT_OUT_VARIABLE}=1 to silence the startup hook)."
    )


def patch_training_args(module: ModuleType) -> None:
    """Add dualadam/invadam to OptimizerNames (argparse choices, validation of `optim`) and check the DualAdam
    settings in TrainingArguments.__post_init__, so that a bad value fails while arguments are parsed."""
    names = getattr(module, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, enum.Enum) and issubclass(names, str)):
        raise _layout_error(f"{module.__name__}.OptimizerNames is missing or is no longer a str Enum")
    for attribute in ("_member_names_", "_member_map_", "_value2member_map_"):
        if not hasattr(names, attribute):
            raise _layout_error(f"the OptimizerNames enum has no {attribute} (changed enum internals)")
    training_arguments = getattr(module, "TrainingArguments", None)
    fields = getattr(training_arguments, "__dataclass_fields__", {})
    if "optim" not in fields or "optim_args" not in fields or not hasattr(training_arguments, "__post_init__"):
        raise _layout_error(f"{module.__name__}.TrainingArguments has no optim/optim_args fields or __post_init__")
    if getattr(training_arguments, _PATCHED_MARK, False):
        return
    from packaging.specifiers import SpecifierSet

    version = _transformers_version()
    if version and version not in SpecifierSet(TESTED_TRANSFORMERS, prereleases=True):
        warnings.warn(
            f"dualadam-hf was tested with transformers{TESTED_TRANSFORMERS}, found {version}; "
            f"--optim dualadam is registered because the layout it needs is there. If it misbehaves, {EXPLICIT_PATH}.",
            DualAdamRegistrationWarning, stacklevel=2,
        )
    for value in OPTIMIZER_NAMES:
        if value in names._value2member_map_:
            continue
        name = value.upper()  # DUALADAM, INVADAM
        # Built by hand (an Enum cannot be extended) so that lookup, iteration and `OptimizerNames(value)` see it.
        member = str.__new__(names, value)
        member._name_, member._value_, member.__objclass__ = name, value, names
        member._sort_order_ = len(names._member_names_)
        names._member_names_.append(name)
        names._member_map_[name] = names._value2member_map_[value] = member
        # EnumType.__setattr__ refuses to touch member names; type.__setattr__ makes `OptimizerNames.DUALADAM` work.
        type.__setattr__(names, name, member)

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
    """Make Trainer build DualAdam/InvAdam for those names (in get_optimizer_cls_and_kwargs, the documented
    override point) and attach DualAdamCallback when DualAdam is used."""
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        raise _layout_error(f"{module.__name__} has no Trainer class")
    original_factory = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(original_factory, staticmethod):
        raise _layout_error("Trainer.get_optimizer_cls_and_kwargs is missing or is no longer a staticmethod")
    if getattr(trainer_cls, _PATCHED_MARK, False):
        return
    from .callbacks import attach_callback
    from .optim_args import optimizer_cls_and_kwargs

    original_get, original_init = original_factory.__func__, trainer_cls.__init__

    @functools.wraps(original_get)
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if optimizer_name(args) in OPTIMIZER_NAMES:
            return optimizer_cls_and_kwargs(args)
        return original_get(args, model)

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        attach_callback(self)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    trainer_cls.__init__ = __init__
    setattr(trainer_cls, _PATCHED_MARK, True)


_PATCHES = {"transformers.training_args": patch_training_args, "transformers.trainer": patch_trainer}
_warned: set[str] = set()


def on_module_loaded(module: ModuleType) -> None:
    """Patch a watched transformers module right after it has imported (called by the startup hook).

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
    """Register `--optim dualadam`/`invadam` with transformers now; needed only where the startup hook is off
    (DUALADAM_HF_NO_AUTOREGISTER=1) or cannot run. Call it before building any argument parser or TrainingArguments;
    calling it again is harmless."""
    import transformers.trainer
    import transformers.training_args

    patch_training_args(transformers.training_args)
    patch_trainer(transformers.trainer)


def is_registered() -> bool:
    """Whether transformers already knows `--optim dualadam` in this process (never imports transformers)."""
    names = getattr(sys.modules.get("transformers.training_args"), "OptimizerNames", None)
    return names is not None and "dualadam" in getattr(names, "_value2member_map_", {})
