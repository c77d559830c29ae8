"""Fine-tune throughput: tokens/s and peak memory, DualAdam vs AdamW.

Both optimizers train their own copy of one model on the same random tokens,
in one process, interleaved round by round; medians over rounds. The target is
a DualAdam overhead of at most 2% in tokens/s.

Peak memory is the peak of bytes allocated during one training step (forward,
backward, optimizer step) above what was live before it, read from the
profiler's allocator events on CPU and ``torch.cuda.max_memory_allocated`` on
CUDA (see ``optimizer_step.peak_temporary_bytes``); the optimizer state itself
is reported separately.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/finetune_throughput.py                    # tiny Llama on CPU
    python benchmarks/finetune_throughput.py --device cuda --model HuggingFaceTB/SmolLM2-135M --batch 16 --seq 1024
    python benchmarks/finetune_throughput.py --device cuda --preset smollm2-360m --amp bf16 --batch 8 --seq 1024

``--preset`` builds a real model's architecture with random weights (no hub
access needed); step time does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optimizer_step import peak_temporary_bytes, sync  # noqa: E402

from dualadam_hf import DualAdam  # noqa: E402
from dualadam_hf.update import choose_path  # noqa: E402

# Architectures of real models, built from their configs with random weights.
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True),
}


def build_model(args, device):
    if args.preset:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(2048, args.seq))
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype))
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="", help="a Hugging Face causal LM name or path (default: a tiny Llama)")
    ap.add_argument("--preset", default="", choices=["", *PRESETS], help="a real architecture, random weights")
    ap.add_argument("--dtype", default="float32", help="dtype of the parameters")
    ap.add_argument("--amp", default="", choices=["", "bf16"], help="bf16 autocast for forward/backward")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--fused", action="store_true", help="DualAdam(fused=True) (Triton on CUDA, compiled on CPU)")
    args = ap.parse_args()

    device = torch.device(args.device)
    base = build_model(args, device)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]
    dual_kw = {"fused": True} if args.fused else {}
    runs = {
        "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01)),
        "AdamW fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True)),
        "DualAdam" + (" fused" if args.fused else ""): (
            lambda ps: DualAdam(ps, lr=1e-4, weight_decay=0.01, blend_steps=1000, **dual_kw)),
    }
    models = {name: copy.deepcopy(base) for name in runs}
    opts = {name: make(models[name].parameters()) for name, make in runs.items()}
    counter = {"i": 0}

    def train_step(name):
        model, opt = models[name], opts[name]
        ids = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in runs:  # warm-up: state, compile
        for _ in range(2):
            train_step(name)
    peaks = {name: peak_temporary_bytes(lambda n=name: train_step(n), device) for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                train_step(name)
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps_per_round)

    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq
    model_name = args.preset and f"{args.preset} (random weights)" or args.model or "tiny Llama (hidden 256, 4 layers)"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    dual = next(o for o in opts.values() if isinstance(o, DualAdam))
    group = dual.param_groups[0]
    path = choose_path(group["params"], group["foreach"], group["fused"])
    print(f"device={device}{gpu} model={model_name} params={n_params / 1e6:.1f}M dtype={args.dtype} "
          f"amp={args.amp or 'off'} batch={args.batch}x{args.seq} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} DualAdam path={path}")
    def ratio(name, ref):  # median of per-round ratios (robust to load drift)
        return statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))

    print(f"{'optimizer':16s} {'tokens/s':>10s} {'x AdamW':>8s} {'x AdamW fused':>13s} "
          f"{'peak MB/step':>12s} {'state MB':>9s}")
    for name in runs:
        t = statistics.median(times[name])
        state_mb = sum(v.numel() * v.element_size() for s in opts[name].state.values()
                       for v in s.values() if torch.is_tensor(v)) / 2**20
        print(f"{name:16s} {tokens / t:10.0f} {ratio(name, 'AdamW'):8.3f} {ratio(name, 'AdamW fused'):13.3f} "
              f"{peaks[name] / 2**20:12.1f} {state_mb:9.1f}")
    print("x AdamW*: step time / AdamW step time (medians of per-round ratios; 1.02 = 2% overhead).")

if __name__ == "__main__":
    main()
