"""One model and tokenizer loader for training, comparing and measuring sharpness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .arguments import RecipeError
from .smollm2 import resolve_model_path

DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_model(name_or_path: str) -> str:
    """A local folder for a model name (an alias such as smollm2-135m-instruct, a folder, or a hub id)."""
    try:
        return resolve_model_path(str(name_or_path))
    except FileNotFoundError as error:
        raise RecipeError(str(error)) from error


def torch_dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return "auto"
    if not isinstance(dtype := getattr(torch, str(name), None), torch.dtype):
        raise RecipeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return dtype


def load_tokenizer(*places: str) -> Any:
    """The tokenizer of the first folder that has one (an adapter folder may not); pad = eos if unset."""
    from transformers import AutoTokenizer

    errors = []
    for place in places:
        try:
            tokenizer = AutoTokenizer.from_pretrained(place)
        except (OSError, ValueError) as error:
            errors.append(f"{place}: {error}")
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise RecipeError("no tokenizer found in " + "; ".join(errors))


def is_classifier_config(config: dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_model(path: str, *, task: str = "sft", num_labels: int = 2, dtype: str | None = "float32",
               attn_implementation: str | None = None, adapter: str | None = None, trainable: bool = True) -> Any:
    """A causal LM (task sft) or a sequence classifier, optionally with a PEFT adapter folder on top."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)


def adapter_config(folder: str | Path) -> Any | None:
    """The PEFT config of an adapter folder, read by PEFT itself (None if the folder holds no adapter)."""
    if not (Path(folder) / "adapter_config.json").is_file():
        return None
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise RecipeError(f"cannot read the PEFT adapter config in {folder}: {error}") from None
