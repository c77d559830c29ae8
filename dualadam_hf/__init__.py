"""dualadam-hf: the DualAdam optimizer for Hugging Face fine-tuning."""

from ._version import __version__
from .optimizer import DualAdam, InvAdam
from .schedule import blend_weight

__all__ = ["DualAdam", "InvAdam", "__version__", "blend_weight"]
