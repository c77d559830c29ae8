"""Trainer-level step time: ``--optim dualadam`` against ``adamw_torch_fused`` in the Hugging Face Trainer.

Full fine-tuning (fp32 master weights, bf16 autocast) and LoRA (r 16 on every linear layer of a bf16 base
model), on a real architecture built from its config with random weights (no hub access; step time does not
depend on the weights' values). Every variant trains its own copy of the model with its own Trainer; the
variants take turns, a few steps each, round after round, so a change of load or clocks hits all of them.
A callback times each optimizer step's whole training step (synchronized at its end); the first steps of a
turn (optimizer creation, DualAdam's plan) are left out. Reported: the median step time and the median of
per-round ratios against AdamW fused. DualAdam runs in the blend and past it (``switch_rate=1``: plain
Adam from the first step, handed to torch's fused AdamW kernel).

    python benchmarks/trainer_step.py --device cuda --preset smollm2-360m --batch 8 --seq 1024
    python benchmarks/trainer_step.py --device cpu --preset tiny --batch 2 --seq 32 --rounds 2   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune_throughput import PRESETS  # noqa: E402

import dualadam_hf  # noqa: E402, F401  (registers --optim dualadam where the startup hook is off)

PRESETS = {**PRESETS, "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}
VARIANTS = {
    "AdamW fused": ("adamw_torch_fused", ""),
    "DualAdam, in the blend": ("dualadam", "blend_steps=1000000"),
    "DualAdam, past the blend": ("dualadam", "switch_rate=1.0"),
}
SKIP = 2  # steps of each turn left out


def build_model(preset: str, seq: int, device: torch.device, dtype: torch.dtype, lora: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(2048, seq))
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return model


def time_steps(model, optim: str, optim_args: str, data, args, device, out_dir: str) -> list[float]:
    """One turn: a fresh Trainer trains ``--steps-per-round`` steps; the step times after the first ones."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    training = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps_per_round, per_device_train_batch_size=args.batch,
        optim=optim, optim_args=optim_args or None, learning_rate=1e-4, bf16=device.type == "cuda",
        use_cpu=device.type == "cpu", logging_steps=10**6, save_strategy="no", report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda", disable_tqdm=True,
    )
    Trainer(model=model, args=training, train_dataset=data, callbacks=[Clock()]).train()
    return times[SKIP:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="smollm2-360m", choices=list(PRESETS))
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    n = args.batch * args.steps_per_round
    ids = torch.randint(0, PRESETS[args.preset]["vocab_size"], (n, args.seq), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]  # a list is a map-style dataset (no `datasets`)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    import transformers

    print(f"device={device}{gpu} preset={args.preset} (random weights) batch={args.batch}x{args.seq} "
          f"torch={torch.__version__} transformers={transformers.__version__} rounds={args.rounds} "
          f"steps/turn={args.steps_per_round} (first {SKIP} left out)")
    with tempfile.TemporaryDirectory() as out_dir:
        for mode in args.modes.split(","):
            lora = mode == "lora"
            # Full: fp32 master weights under bf16 autocast. LoRA: a bf16 base, fp32 adapters (PEFT's default).
            dtype = torch.bfloat16 if lora and device.type == "cuda" else torch.float32
            base = build_model(args.preset, args.seq, device, dtype, lora)
            models = {name: copy.deepcopy(base) for name in VARIANTS}
            del base
            times: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
            names = list(VARIANTS)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    optim, optim_args = VARIANTS[name]
                    times[name].append(time_steps(models[name], optim, optim_args, data, args, device, out_dir))
            trainable = sum(p.numel() for p in models[names[0]].parameters() if p.requires_grad)
            tensors = sum(1 for p in models[names[0]].parameters() if p.requires_grad)
            print(f"\n{mode}: {trainable / 1e6:.1f}M trainable parameters in {tensors} tensors")
            print(f"{'variant':28s} {'median ms/step':>14s} {'x AdamW fused':>13s}")
            base_rounds = [statistics.median(t) for t in times["AdamW fused"]]
            for name, rounds in times.items():
                medians = [statistics.median(t) for t in rounds]
                ratio = statistics.median(a / b for a, b in zip(medians, base_rounds, strict=True))
                print(f"{name:28s} {statistics.median(medians) * 1e3:14.1f} {ratio:13.3f}")
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\nx AdamW fused: median over rounds of (median step time / AdamW fused's in the same round).")


if __name__ == "__main__":
    main()
