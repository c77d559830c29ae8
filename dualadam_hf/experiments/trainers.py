"""Building the trainer of one experiment (TRL's SFTTrainer for chat data, Trainer for classification) and
reading its held-out batches: shared by training runs and the sharpness command."""

from __future__ import annotations

import os
import re
import warnings
from itertools import islice
from typing import Any

from .arguments import Experiment, RecipeError
from .data import sft_columns
from .models import load_model, load_tokenizer

# Upstream deprecations a user of our commands cannot act on: TRL's SFTConfig sets `gradient_checkpointing` (which
# transformers 5 renamed `activation_checkpointing`) whatever the recipe says, and TRL and PEFT call
# `is_gradient_checkpointing`.
UPSTREAM_DEPRECATIONS = (r"`gradient_checkpointing` is deprecated", r"`is_gradient_checkpointing` is deprecated")
# Tokens per classification example at most: the encoders these tasks fine-tune (BERT and its kin) have 512
# positions, and a tokenizer without a limit of its own reports a huge model_max_length.
CLASSIFICATION_MAX_TOKENS = 512


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (memory pinning and DeepSpeed's kernels need one)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def quiet_upstream_logs() -> None:
    """Keep the log of the ``dualadam-hf`` commands to lines a user can act on (called by the commands only,
    never on import, so a script that imports the package keeps every warning).

    Filters the warnings of :data:`UPSTREAM_DEPRECATIONS`. On a machine without an accelerator it also tells
    DeepSpeed so (``DS_ACCELERATOR=cpu``, unless set): accelerate imports DeepSpeed, when installed, on every
    model save, and DeepSpeed would otherwise warn in every process that it detected no accelerator and chose
    the CPU. Where torchao is installed, transformers imports it, which logs "Failed to load ... .so" on builds
    without its CUDA extensions and a torch deprecation notice: those loggers keep their errors only.
    """
    import logging

    from ..lowbit import IMPORT_NOISE_LOGGERS

    for message in UPSTREAM_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "DS_ACCELERATOR" not in os.environ and not has_accelerator():
        os.environ["DS_ACCELERATOR"] = "cpu"


def build_trainer(experiment: Experiment, model_path: str, train_data: Any, heldout: Any, *,
                  adapter: str | None = None, model: Any = None) -> tuple[Any, Any]:
    """(trainer, tokenizer). ``adapter`` loads a PEFT adapter folder onto the base model instead of a new
    LoRA; ``model`` is used as it is (sharpness of a saved model)."""
    from transformers import set_seed

    args, training, model_args = experiment.args, experiment.training, experiment.model
    eval_data = heldout if args.eval_size is None else heldout.select(range(min(args.eval_size, len(heldout))))
    if training.dataloader_pin_memory and (training.use_cpu or not has_accelerator()):
        # Pinned memory only speeds copies to an accelerator; without one torch warns for every dataloader.
        training.dataloader_pin_memory = False
    set_seed(training.seed)
    tokenizer = load_tokenizer(model_path)
    peft_config = None
    if model_args.use_peft and adapter is None and model is None:
        from trl import get_peft_config

        peft_config = get_peft_config(model_args)
        target = peft_config.target_modules
        if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
            # TRL's ModelConfig turns a one-element list into a string, which PEFT reads as a regex over
            # full module paths (matching nothing); a plain name means that module.
            peft_config.target_modules = {target}
    if model is None:
        model = load_model(model_path, task=args.task, num_labels=args.num_labels, dtype=model_args.dtype,
                           attn_implementation=model_args.attn_implementation, adapter=adapter)
    if args.task != "classification":
        from trl import SFTTrainer

        return SFTTrainer(model=model, args=training, train_dataset=sft_columns(train_data),
                          eval_dataset=sft_columns(eval_data), processing_class=tokenizer,
                          peft_config=peft_config), tokenizer
    import numpy as np
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    max_length = min(getattr(tokenizer, "model_max_length", CLASSIFICATION_MAX_TOKENS), CLASSIFICATION_MAX_TOKENS)

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return {**tokenizer(batch[args.text_column], truncation=True, max_length=max_length),
                "labels": batch[args.label_column]}

    def accuracy(prediction: Any) -> dict[str, float]:
        logits, labels = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    train_data, eval_data = (data.map(encode, batched=True, remove_columns=data.column_names)
                             for data in (train_data, eval_data))
    return Trainer(model=model, args=training, processing_class=tokenizer, compute_metrics=accuracy,
                   data_collator=DataCollatorWithPadding(tokenizer), train_dataset=train_data,
                   eval_dataset=eval_data), tokenizer


def eval_batches(trainer: Any, n_batches: int, batch_size: int | None = None) -> list[dict[str, Any]]:
    """The first ``n_batches`` batches of the trainer's eval dataloader: the held-out rows tokenized and
    collated exactly as for the eval loss (for chat data, labels on the answer only)."""
    old = trainer.args.per_device_eval_batch_size
    if batch_size:
        trainer.args.per_device_eval_batch_size = batch_size
    try:
        loader = trainer.get_eval_dataloader()
    finally:
        trainer.args.per_device_eval_batch_size = old
    if not (batches := [dict(batch) for batch in islice(loader, n_batches)]):
        raise RecipeError("the held-out split gave no batch for sharpness")
    return batches
