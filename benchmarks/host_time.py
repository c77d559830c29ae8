"""Host time of an optimizer step on the CUDA path, measured on CPU with the kernels stubbed out.

On a GPU a step of a fused optimizer is bound by the Python work around its kernel launch as soon as the
model has many tensors: the kernels of 500 small tensors take microseconds, the host's loop over them does
not. This benchmark measures that host work where no GPU is at hand: DualAdam's fused path runs on CPU
tensors with the Triton launch replaced by a no-op, beside torch's ``AdamW(fused=True)`` with its kernel
(``torch._fused_adamw_``) replaced by a no-op, in one process, interleaved round by round. DualAdam is timed
in the blend (its Triton kernel stubbed) and past it (where it hands the update to ``torch._fused_adamw_``,
stubbed as for AdamW). What remains is the host work: the plan's checks, step counting, coefficients, launch
tables. The coefficients and step counts still run as small CPU ops, as they would be launched on a GPU.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/host_time.py --tensors 500 --numel 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualadam_hf import DualAdam  # noqa: E402
from dualadam_hf import fused as fused_module  # noqa: E402
from dualadam_hf import optimizer as optimizer_module  # noqa: E402


class _NoKernel:
    """The Triton launcher, minus the launch."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_fused_adamw(*args, **kwargs) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=500)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=50)
    args = ap.parse_args()

    # The CUDA path on CPU tensors: the path the optimizer would choose on one CUDA device with Triton.
    fused_module._kernel = _NoKernel()
    optimizer_module.choose_path = lambda params, foreach, fused: "triton"
    torch._fused_adamw_ = _no_fused_adamw

    def params():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(args.numel, generator=gen)) for _ in range(args.tensors)]
        for p in ps:
            p.grad = torch.randn(args.numel, generator=gen)
        return ps

    variants = {
        "torch AdamW(fused=True)": torch.optim.AdamW(params(), lr=1e-3, fused=True),
        "DualAdam fused path, in the blend": DualAdam(params(), lr=1e-3, blend_steps=10**9),
        "DualAdam fused path, past the blend": DualAdam(params(), lr=1e-3, switch_rate=1.0),
    }
    for opt in variants.values():
        for _ in range(3):  # state, plan, launch tables
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            opt = variants[name]
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps_per_round)

    base = times["torch AdamW(fused=True)"]
    print(f"{args.tensors} tensors of {args.numel} elements, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, {args.rounds} rounds x {args.steps_per_round} steps, kernels stubbed")
    print(f"{'variant':40s} {'us/step':>9s} {'us/tensor':>9s} {'x AdamW fused':>13s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        ratio = statistics.median(a / b for a, b in zip(ts, base, strict=True))
        print(f"{name:40s} {t * 1e6:9.1f} {t * 1e6 / args.tensors:9.2f} {ratio:13.3f}")
    print("x AdamW fused: median of per-round ratios (rounds are interleaved, so load changes hit both).")


if __name__ == "__main__":
    main()
