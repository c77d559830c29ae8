"""Sweep the Triton kernel's block size and warp count against AdamW(fused=True) (GPU only).

Times one optimizer step with CUDA events (median of repeats of ``--steps``
back-to-back steps) on the same transformer-shaped parameters as
``optimizer_step.py``, AdamW fused interleaved with every configuration.

    python benchmarks/fused_block_sweep.py --dtype float32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optimizer_step import transformer_shapes  # noqa: E402

from dualadam_hf import DualAdam, fused  # noqa: E402


def seconds_per_call(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the per-call time of ``calls`` back-to-back calls (CUDA events)."""
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = transformer_shapes(32000, args.hidden, args.intermediate, args.layers)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    state = "bfloat16" if dtype != torch.float32 else None
    dual = DualAdam(params, lr=1e-4, weight_decay=0.01, switch_rate=0.01, fused=True, state_dtype=state)
    for opt in (adamw, dual):
        opt.step()
    # Copy bandwidth of a flat buffer of the model's size (bytes read + written).
    src = torch.rand(numel, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = seconds_per_call(lambda: dst.copy_(src), args.steps, 3)
    copy_bw = 8 * numel / copy_s
    elem = 2 if dtype != torch.float32 else 4
    moved = numel * (3 * elem + 4 * elem)  # read p, g, m, v; write p, m, v (state dtype = param dtype here)
    print(f"{torch.cuda.get_device_name()} dtype={args.dtype} elements={numel / 1e6:.1f}M "
          f"copy probe {copy_bw / 1e9:.0f} GB/s")
    print(f"{'BLOCK':>6s} {'warps':>5s} {'ms':>7s} {'xAdamW-fused':>12s} {'GB/s':>6s} {'%copy':>6s}")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 4:
                continue
            fused.BLOCK, fused.NUM_WARPS = block, warps
            dual.__dict__.pop("_operand_sets", None)  # the launch tables (kept in the plans) depend on BLOCK
            dual.step()
            ratios, times = [], []
            for _ in range(3):
                t_a = seconds_per_call(adamw.step, args.steps, args.repeats)
                t_d = seconds_per_call(dual.step, args.steps, args.repeats)
                ratios.append(t_d / t_a)
                times.append(t_d)
            t = statistics.median(times)
            print(f"{block:6d} {warps:5d} {t * 1e3:7.3f} {statistics.median(ratios):12.3f} "
                  f"{moved / t / 1e9:6.0f} {moved / t / copy_bw * 100:6.0f}")


if __name__ == "__main__":
    main()
