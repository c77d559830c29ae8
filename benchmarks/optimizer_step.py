"""Optimizer-step benchmark: time and temporary memory, as ratios.

All variants run in one process on one shared set of transformer-shaped
parameters and gradients (each keeps its own moments), interleaved round by
round; the table holds medians over rounds. Only ratios measured here are
meaningful: memory bandwidth on a shared machine drifts between runs.

DualAdam is timed in its two phases separately by setting the per-parameter
step before every round: the dual phase (step ~10, the inverse part active) and
the Adam phase (step ~10_000, blend spent).

Temporary memory is the peak of bytes allocated during one step beyond what
was live before it (params, grads, state), per parameter element. On CPU it
comes from the profiler's raw allocator events (every allocation and free
through c10's CPU allocator, each with its own timestamp, including those
inside foreach ops and compiled kernels); on CUDA from
``torch.cuda.max_memory_allocated``.

The probe is a compiled kernel with the same traffic as the fused update
(reads p, g, m, v; writes p, m, v: 28 bytes per fp32 element); "% probe" is
probe time / variant time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizer_step.py            # CPU, ~50M elements
    python benchmarks/optimizer_step.py --device cuda --layers 24           # GPU, fused and >100M
"""

from __future__ import annotations

import argparse
import os
import sys

# Must precede the first torch import: spinning OpenMP threads distort timings
# on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualadam_hf import DualAdam  # noqa: E402

DUAL_STEP, ADAM_STEP = 10, 10_000
SWITCH_RATE = 0.01


def transformer_shapes(vocab: int, hidden: int, intermediate: int, layers: int) -> list[tuple[int, ...]]:
    """A Llama/Qwen-like parameter set: tied embedding, attention with q/k/v biases, MLP, norms."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(hidden,)] * 3
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
        shapes += [(hidden,), (hidden,)]
    shapes.append((hidden,))
    return shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_temporary_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` beyond those live when it starts."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw allocator events (alloc > 0, free < 0) with their own timestamps.
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    cur = peak = 0
    for _, size in sorted(events):
        cur += size
        peak = max(peak, cur)
    return peak


class Variant:
    """One optimizer (or probe) with its own state, stepping the shared params."""

    def __init__(self, name, make, params, phase_step=None):
        self.name, self.params, self.phase_step = name, params, phase_step
        self.opt = make(params) if make is not None else None
        self.times: list[float] = []
        self.first_step_s = 0.0
        self.temp_bytes = 0

    def set_phase(self):
        if self.phase_step is None or self.opt is None:
            return
        for group in self.opt.param_groups:
            if "step" in group:  # pytorch_optimizer keeps one counter per group
                group["step"] = self.phase_step
        for state in self.opt.state.values():
            if "step" in state and isinstance(self.opt, DualAdam):
                state["step"].fill_(self.phase_step)

    def step(self):
        self.opt.step()

    def bytes_moved(self) -> int:
        """The fewest bytes a step must move: read p, g, both moments; write p and both moments."""
        total = 0
        for group in self.opt.param_groups:
            for p in group["params"]:
                moments = [v for k, v in self.opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape]
                total += p.numel() * (2 * p.element_size() + p.grad.element_size()
                                      + sum(2 * m.element_size() for m in moments))
        return total


class Probe(Variant):
    """Same traffic as the update (read p, g, m, v; write p, m, v) over flat buffers.

    One compiled loop over four buffers of the model's size: no per-tensor
    overhead, so it measures what the memory system gives such a kernel.
    """

    def __init__(self, params, device):
        super().__init__("probe (28 B/elem)", None, params)
        n = sum(p.numel() for p in params)
        self.p, self.g, self.m, self.v = (torch.rand(n, device=device) for _ in range(4))

        def touch(p, g, m, v):
            m.copy_(m * 0.5 + g)
            v.copy_(v * 0.5 + g)
            p.copy_(p * 0.999 + 1e-9 * (m + v))

        self.fn = torch.compile(touch)

    def step(self):
        self.fn(self.p, self.g, self.m, self.v)

    def bytes_moved(self) -> int:
        return 28 * self.p.numel()


class InverseShare(Variant):
    """DualAdam.inverse_share() on a stepped optimizer: what a logging step adds (other steps add nothing:
    step() holds no code for it, the Trainer callback calls it from on_log only)."""

    def __init__(self, make, params, phase_step):
        super().__init__("inverse_share() on a logging step", make, params, phase_step)
        self.opt.step()

    def step(self):
        self.opt.inverse_share()

    def bytes_moved(self) -> int:
        return sum(8 * p.numel() for p in self.params)  # reads m and v


class CopyProbe(Variant):
    """A plain copy of a flat buffer of the model's size (8 B/element): the usual bandwidth yardstick."""

    def __init__(self, params, device):
        super().__init__("copy probe (8 B/elem)", None, params)
        n = sum(p.numel() for p in params)
        self.src, self.dst = torch.rand(n, device=device), torch.empty(n, device=device)

    def step(self):
        self.dst.copy_(self.src)

    def bytes_moved(self) -> int:
        return 8 * self.src.numel()


def build_variants(params, device, args):
    from functools import partial

    V = []
    adamw = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
    dual = partial(DualAdam, lr=1e-4, weight_decay=0.01, switch_rate=SWITCH_RATE)
    V.append(Variant("AdamW foreach", partial(adamw, foreach=True), params))
    V.append(Variant("AdamW fused", partial(adamw, fused=True), params))
    if not args.skip_pyo:
        try:
            from pytorch_optimizer import DualAdam as PyoDualAdam

            pyo = partial(PyoDualAdam, lr=1e-4, weight_decay=0.01, weight_decouple=True,
                          switch_rate=SWITCH_RATE, foreach=True)
            V.append(Variant("pytorch_optimizer DualAdam foreach [dual]", pyo, params, DUAL_STEP))
            V.append(Variant("pytorch_optimizer DualAdam foreach [adam]", pyo, params, ADAM_STEP))
        except ImportError:
            print("pytorch_optimizer not installed: skipping its DualAdam")
    for phase, step in (("dual", DUAL_STEP), ("adam", ADAM_STEP)):
        V.append(Variant(f"DualAdam foreach [{phase}]", partial(dual, foreach=True), params, step))
        if phase == "dual":
            V.append(Variant("DualAdam foreach auto scale [dual]", partial(dual, foreach=True, inverse_scale="auto"),
                             params, step))
            # The inverse part held at the Adam part's norm: one more pass over the moments every step.
            V.append(Variant("DualAdam foreach norm scale [dual]", partial(dual, foreach=True, inverse_scale="norm"),
                             params, step))
            single_pass = "compiled" if device.type == "cpu" else "fused"
            if device.type == "cuda" or not args.skip_compiled:
                V.append(Variant(f"DualAdam {single_pass} norm scale [dual]",
                                 partial(dual, fused=True, inverse_scale="norm"), params, step))
            V.append(InverseShare(partial(dual, foreach=True), params, step))
        if device.type == "cpu" and not args.skip_compiled:
            V.append(Variant(f"DualAdam compiled [{phase}]", partial(dual, fused=True), params, step))
        if device.type == "cuda":
            V.append(Variant(f"DualAdam fused [{phase}]", partial(dual, fused=True), params, step))
            if params[0].dtype != torch.float32:
                # torch's AdamW keeps bf16 state for bf16 params: compare like with like.
                V.append(Variant(f"DualAdam fused bf16-state [{phase}]",
                                 partial(dual, fused=True, state_dtype="bfloat16"), params, step))
    if not args.skip_probe:
        V.append(Probe(params, device))
    V.append(CopyProbe(params, device))  # the bandwidth yardstick of the %copy column
    return V


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps-per-round", type=int, default=None, help="default: 1 on CPU, 20 on CUDA")
    ap.add_argument("--skip-pyo", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--skip-probe", action="store_true", help="leave out the compiled 28 B/element probe")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to keep")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.steps_per_round is None:
        # A GPU step takes about a millisecond: time many back to back so the
        # host-side sync and timer cost vanish, as a training loop would run them.
        args.steps_per_round = 20 if device.type == "cuda" else 1
    torch.manual_seed(0)
    shapes = transformer_shapes(args.vocab, args.hidden, args.intermediate, args.layers)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}) dtype={args.dtype} tensors={len(params)} elements={numel / 1e6:.1f}M "
          f"threads={torch.get_num_threads()} torch={torch.__version__} steps/round={args.steps_per_round}")

    variants = build_variants(params, device, args)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        variants = [v for v in variants
                    if any(k in v.name for k in keep) or v.name.startswith(("AdamW", "probe", "copy probe"))]

    # Warm-up: creates state, compiles; the first step's time is reported. A
    # variant that fails here is reported and left out rather than ending the run.
    working = []
    for v in variants:
        try:
            v.set_phase()
            sync(device)
            t0 = time.perf_counter()
            v.step()
            sync(device)
            v.first_step_s = time.perf_counter() - t0
            v.step()
            working.append(v)
        except Exception as error:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"{v.name}: FAILED ({type(error).__name__}: {error}); left out")
    variants = working
    for v in variants:
        v.set_phase()
        v.temp_bytes = peak_temporary_bytes(v.step, device)

    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.set_phase()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                v.step()
            sync(device)
            v.times.append((time.perf_counter() - t0) / args.steps_per_round)

    # Ratios are medians of per-round ratios: the two timings of a round are
    # seconds apart, so a load change on the shared machine hits both.
    by_name = {v.name: v for v in variants}

    def ratio(v, ref_name):
        ref = by_name.get(ref_name)
        if ref is None:
            return None
        return statistics.median(a / b for a, b in zip(v.times, ref.times, strict=True))

    probe_name = "probe (28 B/elem)"
    copy = by_name.get("copy probe (8 B/elem)")
    copy_bw = 8 * numel / statistics.median(copy.times) if copy else None
    head = (f"{'variant':44s} {'ms/step':>9s} {'xAdamW-fe':>9s} {'xAdamW-fu':>9s} {'PyO/this':>8s} "
            f"{'GB/s':>6s} {'%probe':>6s} {'%copy':>6s} {'tmp B/el':>8s} {'1st step s':>10s}")
    print(head)
    print("-" * len(head))
    for v in variants:
        t = statistics.median(v.times)
        phase = "dual" if "[dual]" in v.name else "adam" if "[adam]" in v.name else None
        pyo_name = f"pytorch_optimizer DualAdam foreach [{phase}]"
        xp = ratio(by_name[pyo_name], v.name) if phase and pyo_name in by_name and v.name != pyo_name else None
        pr = ratio(by_name[probe_name], v.name) if probe_name in by_name else None

        def fmt(x, w=9, p=3, scale=1.0):
            return f"{x * scale:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"

        moved = v.bytes_moved()
        print(f"{v.name:44s} {t * 1e3:9.2f} {fmt(ratio(v, 'AdamW foreach'))} {fmt(ratio(v, 'AdamW fused'))} "
              f"{fmt(xp, 8, 2)} {moved / t / 1e9:6.1f} {fmt(pr, 6, 0, 100)} "
              f"{fmt(moved / t / copy_bw if copy_bw else None, 6, 0, 100)} {v.temp_bytes / numel:8.3f} "
              f"{v.first_step_s:10.2f}")
    print("xAdamW-*: time / AdamW time (lower is faster); PyO/this: pytorch_optimizer DualAdam time / this time,")
    print("same phase (speed-up); ratios are medians of per-round ratios. GB/s counts the bytes each variant")
    print("must move (read p, g, m, v; write p, m, v): 28 B/element in fp32, 22 with bf16 params and fp32 moments,")
    print("14 with bf16 moments too; %copy = this GB/s / copy-probe GB/s.")
    fused_times = by_name["AdamW fused"].times
    print(f"AdamW fused round times (ms): min {min(fused_times) * 1e3:.1f}, max {max(fused_times) * 1e3:.1f}")

if __name__ == "__main__":
    main()
