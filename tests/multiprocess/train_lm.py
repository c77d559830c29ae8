"""A plain HfArgumentParser + Trainer script used by the multi-process tests.

It never imports dualadam_hf: ``--optim dualadam`` works here only through the
package's startup hook, as it would in any user script. Each rank writes a
small JSON report (what optimizer does the math under the engine's wrappers,
the per-parameter step counters, how many ``exp_avg`` elements it holds, the
scales ``inverse_scale="auto"`` calibrated) and the full final model is saved
with ``trainer.save_model``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    model_path: str = field(metadata={"help": "folder of a saved causal LM"})
    report_dir: str = field(metadata={"help": "where each rank writes rank<N>.json"})
    num_samples: int = 64
    seq_len: int = 16
    token_seed: int = 0


class RandomTokens(torch.utils.data.Dataset):
    """Fixed-length random token sequences: no padding, so every token weighs the
    same whatever the split of the global batch across ranks."""

    def __init__(self, vocab_size: int, num_samples: int, seq_len: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def optimizer_chain(optimizer) -> list:
    """The optimizer objects from the outermost wrapper to the one doing the math.

    accelerate, DeepSpeed ZeRO and the Trainer each wrap the next one in an
    ``.optimizer`` attribute.
    """
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def local_numel(t: torch.Tensor) -> int:
    to_local = getattr(t, "to_local", None)  # FSDP2 DTensor: the shard this rank holds
    return (to_local() if to_local is not None else t).numel()


def report(trainer: Trainer, args: ScriptArguments) -> None:
    chain = optimizer_chain(trainer.optimizer)
    inner = chain[-1]
    states = [s for s in getattr(inner, "state", {}).values() if "exp_avg" in s]
    rank = int(os.environ.get("RANK", "0"))
    # The parameter name where the optimizer holds the model's own tensors (one process, DDP, FSDP2);
    # DeepSpeed ZeRO hands the optimizer flat partitions, numbered here in the order of the state.
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    scales = {names.get(id(p), f"#{i}"): float(s["calibrated_scale"])
              for i, (p, s) in enumerate(getattr(inner, "state", {}).items()) if "calibrated_scale" in s}
    data = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "optimizer_chain": [f"{type(o).__module__}.{type(o).__qualname__}" for o in chain],
        "steps": sorted({float(s["step"]) for s in states}),
        "num_states": len(states),
        "exp_avg_local_numel": sum(local_numel(s["exp_avg"]) for s in states),
        "exp_avg_dtypes": sorted({str(s["exp_avg"].dtype) for s in states}),
        "exp_avg_devices": sorted({str(s["exp_avg"].device) for s in states}),
        "exp_avg_classes": sorted({type(s["exp_avg"]).__name__ for s in states}),
        "param_classes": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        # inverse_scale="auto": the scale each parameter tensor (or flat partition) calibrated.
        "inverse_scales": scales,
        # DeepSpeed ZeRO keeps this flag on its optimizer wrapper (the one just above the inner optimizer).
        "offload_optimizer": bool(getattr(chain[-2], "offload_optimizer", False)) if len(chain) > 1 else False,
        # Whatever callbacks logged with the losses (the DualAdam callback adds dualadam/blend and
        # dualadam/inverse_share).
        "logged": [{k: v for k, v in h.items() if k not in ("epoch", "grad_norm")}
                   for h in trainer.state.log_history if "loss" in h],
        "param_groups": [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str))}
                         for g in inner.param_groups],
    }
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(data, indent=1))


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    model = AutoModelForCausalLM.from_pretrained(script_args.model_path, dtype=torch.float32)
    dataset = RandomTokens(model.config.vocab_size, script_args.num_samples, script_args.seq_len,
                           script_args.token_seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report(trainer, script_args)
    trainer.save_model(training_args.output_dir)
    if torch.distributed.is_initialized():
        # Tear the process group down before interpreter exit: left to exit-time
        # destructors, gloo's threads occasionally abort a rank ("terminate called
        # without an active exception") after the run has finished.
        torch.distributed.destroy_process_group()
    # Everything this run reports is written. Skip interpreter finalization, where
    # threads left by gloo/DeepSpeed still abort a rank now and then (seen in CI on
    # 2026-11-28 after a complete ZeRO-3 and FSDP2 run). The mechanism is described
    # in pytorch/pytorch#179291: gloo worker threads still hold tensors whose release
    # needs the GIL while the interpreter is being torn down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
