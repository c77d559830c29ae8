"""Run one recipe: load the model and data, train with TRL's SFTTrainer (or Trainer for classification), then
evaluate held-out loss, exact-match accuracy and (optionally) sharpness.

Every number the run produces goes into the trainer's log history, which `trainer.save_state()` writes to
`<output_dir>/trainer_state.json`; `dualadam-hf compare` reads its table from there.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from typing import Any

from .config import Recipe, RecipeArguments, RecipeError
from .data import load_splits

PEAK_MEMORY_KEY = "peak_memory_mb"
ACCURACY_KEY = "eval_accuracy"
SHARPNESS_PREFIX = "sharpness/"


def resolve_model(args: RecipeArguments) -> str:
    from .smollm2 import resolve_model_path

    try:
        return resolve_model_path(str(args.model_name_or_path))
    except FileNotFoundError as error:
        raise RecipeError(str(error)) from error


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RecipeError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return dtype


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args: RecipeArguments, model_path: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": torch_dtype(args.dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.task == "classification":
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=args.num_labels, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def lora_config(args: RecipeArguments) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        task_type="SEQ_CLS" if args.task == "classification" else "CAUSAL_LM",
    )


def peak_memory_mb() -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 2**20


def resume_checkpoint(training_args: Any) -> str | None:
    """`resume_from_checkpoint: last` (or true) picks the newest checkpoint in output_dir, if there is one."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes"):
        from transformers.trainer_utils import get_last_checkpoint

        folder = training_args.output_dir
        return get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if not os.path.isdir(value):
        raise RecipeError(f"resume_from_checkpoint: checkpoint folder not found: {value}")
    return str(value)


def _sft_columns(dataset: Any) -> Any:
    """Keep only the columns SFTTrainer trains on (the `answer` column is for the accuracy eval)."""
    keep = {"prompt", "completion", "messages", "text"}
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])


def _tokenize_classification(dataset: Any, tokenizer: Any, args: RecipeArguments, max_length: int) -> Any:
    def encode(batch: dict[str, list]) -> dict[str, Any]:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[args.label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def _accuracy_metric(eval_prediction: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_trainer(recipe: Recipe) -> tuple[Any, Any, Any]:
    """(trainer, tokenizer, held-out dataset), with every input checked before the model is loaded."""
    args, training_args = recipe.args, recipe.training_args
    model_path = resolve_model(args)
    train_data, heldout = load_splits(args)
    eval_data = heldout if args.eval_size is None else heldout.select(range(min(args.eval_size, len(heldout))))

    from transformers import set_seed

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_path)
    model = load_model(args, model_path)
    if args.task == "classification":
        from peft import get_peft_model
        from transformers import DataCollatorWithPadding, Trainer

        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if args.use_peft:
            model = get_peft_model(model, lora_config(args))
        max_length = min(getattr(tokenizer, "model_max_length", 512), 512)
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=_tokenize_classification(train_data, tokenizer, args, max_length),
            eval_dataset=_tokenize_classification(eval_data, tokenizer, args, max_length),
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=_accuracy_metric,
        )
    else:
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=_sft_columns(train_data),
            eval_dataset=_sft_columns(eval_data),
            processing_class=tokenizer,
            peft_config=lora_config(args) if args.use_peft else None,
        )
    return trainer, tokenizer, heldout


def _evaluated_at_last_step(trainer: Any) -> bool:
    return any("eval_loss" in e and e.get("step") == trainer.state.global_step for e in trainer.state.log_history)


def run(recipe: Recipe) -> dict[str, float]:
    """Train and evaluate one recipe; return the final numbers (all of them are in the log history too)."""
    args, training_args = recipe.args, recipe.training_args
    trainer, tokenizer, heldout = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    final: dict[str, float] = {PEAK_MEMORY_KEY: peak_memory_mb()}
    if not _evaluated_at_last_step(trainer):
        trainer.evaluate()
    if args.task == "sft" and args.accuracy_size:
        from .math_data import exact_match_accuracy

        rows = heldout.select(range(min(args.accuracy_size, len(heldout))))
        final[ACCURACY_KEY] = exact_match_accuracy(
            trainer.model,
            tokenizer,
            rows,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size,
        )
    if args.sharpness:
        from ..sharpness import measure_sharpness

        batches = eval_batches(recipe, tokenizer, args.sharpness_batches, heldout, args.sharpness_batch_size)
        numbers = measure_sharpness(
            trainer.model,
            batches,
            seed=training_args.seed,
            max_iters=args.sharpness_max_iters,
            probes=args.sharpness_probes,
        )
        # Non-finite numbers (e.g. the standard error of a single probe) are left out: JSON has no NaN.
        final.update({f"{SHARPNESS_PREFIX}{k}": float(v) for k, v in numbers.items() if math.isfinite(v)})
    trainer.log(final)
    trainer.save_model()
    trainer.save_state()
    return {k: v for e in trainer.state.log_history for k, v in e.items() if isinstance(v, (int, float))}


def eval_batches(
    recipe: Recipe, tokenizer: Any, n_batches: int, heldout: Any | None = None, batch_size: int | None = None
) -> list[dict[str, Any]]:
    """`n_batches` fixed, padded batches of held-out rows (the first rows; `batch_size` rows each, default the
    eval batch size), with loss labels.

    For prompt/completion chat rows only the completion is labelled, as in training; other formats label
    every token. The same recipe always gives the same batches, so sharpness compares across runs.
    """
    import torch

    args, training_args = recipe.args, recipe.training_args
    if n_batches < 1:
        raise RecipeError(f"n_batches must be >= 1, got {n_batches}")
    if heldout is None:
        _, heldout = load_splits(args)
    batch_size = batch_size or training_args.per_device_eval_batch_size
    rows = heldout.select(range(min(len(heldout), n_batches * batch_size)))
    max_length = getattr(training_args, "max_length", None) or 512
    examples: list[tuple[list[int], list[int]]] = []
    for row in rows:
        if args.task == "classification":
            ids = tokenizer(row[args.text_column], truncation=True, max_length=max_length)["input_ids"]
            examples.append((ids, [int(row[args.label_column])]))
            continue
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):  # conversational
                prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            else:
                prompt_text, full_text = prompt, prompt + completion
            prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][:max_length]
            labels = [-100] * min(prompt_len, len(ids)) + ids[prompt_len:]
        else:
            text = row["text"] if "text" in row else tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
            labels = list(ids)
        examples.append((ids, labels))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        if args.task == "classification":
            labels = torch.tensor([lab[0] for _, lab in chunk])
        else:
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches
