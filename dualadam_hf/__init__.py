"""dualadam-hf: the DualAdam optimizer for Hugging Face fine-tuning."""

from ._version import __version__
from .integrations.optim_args import optimizer_cls_and_kwargs
from .integrations.transformers import register
from .optimizer import DualAdam, InvAdam
from .schedule import blend_weight

__all__ = ["DualAdam", "DualAdamCallback", "InvAdam", "__version__", "blend_weight", "optimizer_cls_and_kwargs",
           "register"]


def __getattr__(name: str):
    # DualAdamCallback subclasses transformers.TrainerCallback: import it on first use so that
    # `import dualadam_hf` does not import transformers.
    if name == "DualAdamCallback":
        from .integrations.callbacks import DualAdamCallback

        return DualAdamCallback
    raise AttributeError(f"module 'dualadam_hf' has no attribute {name!r}")
