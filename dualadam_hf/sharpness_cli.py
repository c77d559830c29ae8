"""Measure how sharp a trained model's minimum is: the top Hessian eigenvalue, the Hessian trace and
the epsilon-sharpness of the loss on fixed evaluation batches, w.r.t. the trainable parameters (the
adapters of a LoRA run). Prints a table and writes sharpness.json into the model folder (or --output).

    dualadam-hf sharpness --model runs/smollm2-dualadam --config recipes/smollm2_math_lora.yaml
    dualadam-hf sharpness --model <checkpoint folder> --data heldout.jsonl
    dualadam-hf sharpness --model <checkpoint folder> --random-batches   # smoke test, no data needed

Slow on CPU: every Hessian-vector product costs about three forward passes. On a busy machine set
OMP_WAIT_POLICY=PASSIVE. See docs/readme/sharpness.md for what each number means and what it costs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

RESULT_FILE = "sharpness.json"
MODEL_FILES = ("config.json", "adapter_config.json")
# Numbers shown first, in this order; the rest of measure_sharpness's keys follow.
HEADLINE = ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst", "sharpness_random")
DEFAULT_BATCH_SIZE = 2
DEFAULT_MAX_LENGTH = 64


class SharpnessError(ValueError):
    """A bad argument or input; the message says what to change."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dualadam-hf sharpness`` to ``parser``."""
    from .sharpness import PARAM_CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples in __doc__ on their lines
    parser.add_argument("--model", required=True,
                        help="a saved model or PEFT adapter folder, or a run folder (its final model, else its "
                        "last checkpoint-N)")
    source = parser.add_argument_group("evaluation data (one of)")
    source.add_argument("--config", help="recipe YAML: its held-out split gives the batches (as in training)")
    source.add_argument("--data", help='JSONL file with a "text" or "messages" column ("label" for classifiers)')
    source.add_argument("--random-batches", "--random_batches", action="store_true",
                        help="random token batches (a smoke test of the machinery, not a meaningful number)")
    parser.add_argument("--batches", type=int, default=2, help="evaluation batches (default 2)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=None,
                        help=f"rows per batch (default {DEFAULT_BATCH_SIZE}; with --config: the recipe's "
                        "per_device_eval_batch_size)")
    parser.add_argument("--max-length", "--max_length", type=int, default=None,
                        help=f"tokens per row (default {DEFAULT_MAX_LENGTH}; with --config: the recipe's max_length)")
    parser.add_argument("--params", choices=PARAM_CHOICES, default="trainable",
                        help="which weights: trainable (default; a PEFT model's adapters), lora, or all")
    parser.add_argument("--max-iters", "--max_iters", type=int, default=20, help="power iterations (default 20)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative eigenvalue tolerance (default 1e-3)")
    parser.add_argument("--probes", type=int, default=10, help="Hutchinson probes for the trace (default 10)")
    parser.add_argument("--rho", type=float, default=1e-3,
                        help="gradient-step radius relative to ||theta||, for sharpness_worst (default 1e-3)")
    parser.add_argument("--rho-random", "--rho_random", type=float, default=0.05,
                        help="random-direction radius relative to ||theta||, for sharpness_random (default 0.05)")
    parser.add_argument("--seeds", type=int, default=3, help="random directions for sharpness_random (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random vector (default 0)")
    parser.add_argument("--max-graph-tokens", "--max_graph_tokens", type=int, default=512,
                        help="most input tokens whose double-backward graphs are in memory at once (default 512; "
                        "about 12 MB each for SmolLM2-135M); beyond it products rebuild graphs, ~2x slower")
    parser.add_argument("--base-model", "--base_model",
                        help="base model of a PEFT adapter (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--num-labels", "--num_labels", type=int,
                        help="classes of a sequence-classification adapter (default: read from its weights)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"),
                        help="dtype to measure in (default float32; second derivatives need the precision)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--output", help=f"file or folder for {RESULT_FILE} (default: the --model folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# --------------------------------------------------------------------------- #
# Finding and loading the model
# --------------------------------------------------------------------------- #


def _has_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def resolve_model_folder(path: str | Path) -> Path:
    """The folder holding the model: ``path`` itself, else the final model or last checkpoint inside it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SharpnessError(f"--model {str(path)!r} is not a folder")
    if _has_model(folder):
        return folder
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _has_model(d)]
    checkpoints = [d for d in subdirs if re.fullmatch(r"checkpoint-\d+", d.name)]
    finals = [d for d in subdirs if d not in checkpoints]
    if len(finals) == 1:
        return finals[0]
    if len(finals) > 1:
        names = ", ".join(d.name for d in finals)
        raise SharpnessError(f"{folder} holds several models ({names}); pass one of them as --model")
    if checkpoints:
        return max(checkpoints, key=lambda d: int(d.name.split("-")[1]))
    raise SharpnessError(
        f"no model in {folder}: expected {' or '.join(MODEL_FILES)} there, in a checkpoint-N subfolder, "
        "or in one final-model subfolder"
    )


def _is_classifier_config(config: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _adapter_num_labels(folder: Path) -> int | None:
    # A classification adapter saves the new head (modules_to_save); its rows are the classes.
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if key.endswith(".weight") and re.search(r"\.(score|classifier)\.", key) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _resolve_base(name: str) -> str:
    try:
        from .recipes.smollm2 import resolve_model_path
    except ImportError:  # the recipes module is optional here
        return name
    try:
        return resolve_model_path(name)
    except FileNotFoundError as error:
        raise SharpnessError(f"{error}; pass --base-model <folder>") from error


def load_model(folder: Path, args: argparse.Namespace) -> tuple[Any, str]:
    """The model in ``folder`` (a full model, or base + PEFT adapter) and where its tokenizer may live."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, args.dtype)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        config = json.loads((folder / "config.json").read_text())
        cls = AutoModelForSequenceClassification if _is_classifier_config(config) else AutoModelForCausalLM
        return cls.from_pretrained(str(folder), dtype=dtype).to(args.device), str(folder)

    from peft import PeftModel

    adapter = json.loads(adapter_config.read_text())
    base_name = args.base_model or adapter.get("base_model_name_or_path")
    if not base_name:
        raise SharpnessError(f"{adapter_config} names no base model; pass --base-model <folder>")
    base_path = _resolve_base(str(base_name))
    if adapter.get("task_type") == "SEQ_CLS":
        num_labels = args.num_labels or _adapter_num_labels(folder)
        kwargs = {"num_labels": num_labels} if num_labels else {}
        base = AutoModelForSequenceClassification.from_pretrained(base_path, dtype=dtype, **kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    # is_trainable: the adapters keep requires_grad, which is what "trainable parameters" means.
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    return model.to(args.device), base_path


def load_tokenizer(*places: str) -> Any:
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
    raise SharpnessError("no tokenizer found (" + "; ".join(errors) + "); use --random-batches or save one")


# --------------------------------------------------------------------------- #
# Evaluation batches
# --------------------------------------------------------------------------- #


def random_batches(model: Any, n_batches: int, batch_size: int, length: int, seed: int) -> list[dict[str, Any]]:
    """Seeded random token batches (labels: the tokens for a causal LM, random classes for a classifier)."""
    import torch

    from .sharpness import is_causal_lm

    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not is_causal_lm(model):
            batch["labels"] = torch.randint(0, int(model.config.num_labels), (batch_size,), generator=gen)
        batches.append(batch)
    return batches


def jsonl_batches(path: str, tokenizer: Any, *, classifier: bool, n_batches: int, batch_size: int,
                  max_length: int) -> list[dict[str, Any]]:
    """The first ``n_batches * batch_size`` rows of a JSONL file, tokenized and padded, with labels."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise SharpnessError(f"--data {path!r} is not a file")
    rows = []
    with file.open() as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SharpnessError(f"{path}:{number}: not JSON ({error})") from error
            if len(rows) == n_batches * batch_size:
                break
    if not rows:
        raise SharpnessError(f"{path} has no rows")
    texts = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and not classifier:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            need = '"text"' if classifier else '"text" or "messages"'
            raise SharpnessError(f"{path} row {number} has no {need} column")
        if classifier and not isinstance(row.get("label"), int):
            raise SharpnessError(f'{path} row {number} needs an integer "label" for a classifier')
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if classifier:
            batch["labels"] = torch.tensor([r["label"] for r in rows[start:start + batch_size]])
        batches.append(batch)
    return batches


def _recipe_batches(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    try:
        from .recipes import load_eval_batches
    except ImportError as error:
        raise SharpnessError(f"--config needs dualadam_hf.recipes.load_eval_batches ({error}); "
                             "use --data or --random-batches") from error
    # Held-out rows are costly here (each row is a graph of hundreds of tokens): let the command line
    # shrink the recipe's eval batch and row length.
    overrides = []
    if args.batch_size is not None:
        overrides += ["--per_device_eval_batch_size", str(args.batch_size)]
    if args.max_length is not None:
        overrides += ["--max_length", str(args.max_length)]
    return load_eval_batches(args.config, tokenizer, args.batches, overrides or None)


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def _check_args(args: argparse.Namespace) -> None:
    sources = [name for name, given in (("--config", args.config), ("--data", args.data),
                                        ("--random-batches", args.random_batches)) if given]
    if not sources:
        raise SharpnessError("say where the evaluation batches come from: --config, --data or --random-batches")
    if len(sources) > 1:
        raise SharpnessError(f"give only one of --config, --data, --random-batches (got {', '.join(sources)})")
    for name in ("batches", "batch_size", "max_length", "max_iters", "probes", "seeds", "max_graph_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SharpnessError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.tol > 0:
        raise SharpnessError(f"--tol must be > 0, got {args.tol}")
    for name in ("rho", "rho_random"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            raise SharpnessError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def format_value(value: float) -> str:
    """How a number is printed (8 significant digits; sharpness.json keeps full precision)."""
    return "nan" if math.isnan(value) else f"{value:.8g}"


def format_table(results: dict[str, float]) -> str:
    keys = [k for k in HEADLINE if k in results] + [k for k in results if k not in HEADLINE]
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k:<{width}}  {format_value(results[k])}" for k in keys)


def _output_path(args: argparse.Namespace) -> Path:
    if args.output:
        out = Path(args.output)
        return out if out.suffix == ".json" else out / RESULT_FILE
    return Path(args.model) / RESULT_FILE


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value  # strict JSON has no NaN


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Load, measure, write; return the record written and its path."""
    from .sharpness import is_causal_lm, measure_sharpness

    _check_args(args)
    folder = resolve_model_folder(args.model)
    model, base_path = load_model(folder, args)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    max_length = args.max_length or DEFAULT_MAX_LENGTH
    if args.random_batches:
        batches = random_batches(model, args.batches, batch_size, max_length, args.seed)
        data = f"random tokens: {args.batches} x {batch_size} x {max_length}, seed {args.seed}"
    else:
        tokenizer = load_tokenizer(*dict.fromkeys([str(folder), base_path]))
        if args.config:
            batches = _recipe_batches(args, tokenizer)
            rows = sum(int(b["input_ids"].shape[0]) for b in batches)
            data = f"recipe {args.config}: {len(batches)} held-out batches, {rows} rows"
        else:
            batches = jsonl_batches(args.data, tokenizer, classifier=not is_causal_lm(model), n_batches=args.batches,
                                    batch_size=batch_size, max_length=max_length)
            data = f"{args.data}: {len(batches)} batches of up to {batch_size} rows"
    progress = None if args.quiet else (lambda line: print(f"[sharpness] {line}", file=sys.stderr, flush=True))
    results = measure_sharpness(
        model, batches, seed=args.seed, max_iters=args.max_iters, tol=args.tol, probes=args.probes, rho=args.rho,
        rho_random=args.rho_random, seeds=args.seeds, params=args.params,
        max_graph_tokens=args.max_graph_tokens, progress=progress,
    )
    record = {
        "model": str(folder),
        "params": args.params,
        "data": data,
        "settings": {k: getattr(args, k) for k in ("max_iters", "tol", "probes", "rho", "rho_random", "seeds", "seed",
                                                   "max_graph_tokens", "dtype", "device")},
        "results": {k: _json_number(float(v)) for k, v in results.items()},
    }
    out = _output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record, out


def run(args: argparse.Namespace) -> int:
    """Entry point of ``dualadam-hf sharpness``: 0 on success, 2 on a bad argument or input."""
    try:
        record, out = measure(args)
    except (ValueError, OSError) as error:  # SharpnessError, RecipeError, missing files, bad batches
        print(f"dualadam-hf sharpness: error: {error}", file=sys.stderr)
        return 2
    results = {k: (math.nan if v is None else v) for k, v in record["results"].items()}
    print(f"sharpness of {record['model']} ({record['params']} parameters; {record['data']})")
    print(format_table(results))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualadam-hf sharpness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
