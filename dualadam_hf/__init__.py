"""dualadam-hf: the DualAdam optimizer for Hugging Face fine-tuning."""

from ._version import __version__

__all__ = ["DualAdam", "DualAdamCallback", "InvAdam", "__version__", "blend_weight", "optimizer_cls_and_kwargs",
           "register"]

# Each public name is imported from its module on first use. `import dualadam_hf` then costs no torch (seconds
# on a busy CPU): the `dualadam-hf` command answers --help without it and sets OMP_WAIT_POLICY before torch
# loads, and DualAdamCallback, a transformers.TrainerCallback, does not pull in transformers.
_HOMES = {
    "DualAdam": ".optimizer",
    "InvAdam": ".optimizer",
    "blend_weight": ".schedule",
    "optimizer_cls_and_kwargs": ".integrations.optim_args",
    "register": ".integrations.transformers",
    "DualAdamCallback": ".integrations.callbacks",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'dualadam_hf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
