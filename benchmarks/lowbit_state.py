"""Low-bit DualAdam state against torchao's AdamW8bit / AdamW4bit: bytes, step time, fidelity, peak memory.

Every figure is a ratio against an anchor measured in the same process (peak memory: in sibling processes
started by this one), on SmolLM2-135M's architecture built from its configuration with random weights:

- ``bytes``: optimizer-state bytes per parameter, counted from the storage of every state tensor (codes,
  block scales, quantization maps, step counters; each storage once), for DualAdam with ``state_bits`` 8 and
  4 against torchao's AdamW8bit and AdamW4bit on the same model, and for fp32 DualAdam.
- ``time``: step time after warm-up (median over interleaved rounds), compiled, DualAdam with ``state_bits``
  against torchao's AdamW of the same bits on the same parameters; the first (compiling) step's time is
  printed beside it. During the blend, DualAdam's inverse part is live; the steps are timed there and past it.
- ``fidelity``: after 200 steps on one fixed stream of gradients, the distance of low-bit DualAdam's
  parameters from fp32 DualAdam's, against the distance of torchao's AdamW8bit/4bit from torch's AdamW, each
  relative to how far the full-precision run moved; read at step 50 (inside a 100-step blend) and at 200.
- ``memory``: the peak resident memory of a process that fully fine-tunes SmolLM2-135M's architecture for a few
  steps (random tokens, a plain training loop) with each optimizer, against fp32 DualAdam's.
- ``sparse``: an embedding-shaped parameter (8192 x 64) as an untied input embedding sees it: each step 10% of
  the rows (drawn anew every step) get a gradient, row scale times a standard normal (scales spread log-uniformly
  from 1e-4 to 1e-2, fixed per row), and the other rows exactly 0; 200 steps on one stream. For DualAdam with
  ``state_bits`` 8 and 4 (the default blend and ``blend_steps=20``) against fp32 DualAdam, and torchao's
  AdamW8bit/AdamW4bit (blocks of 256, as transformers' adamw_torch_8bit/4bit build them) against torch's AdamW:
  the furthest any element moved against the full-precision run's furthest move, and the distance from the
  full-precision run relative to how far it moved (L2, and the largest element's). Then 4-bit DualAdam on rows
  of several widths (64, 256, 576) and with blocks of 64 on the narrowest rows.
- ``offload`` (a GPU only): torchao's ``CPUOffloadOptimizer`` around DualAdam against the same wrapper around torch's
  fused CPU AdamW and against DualAdam on the GPU: peak GPU memory, step time, and the weights' difference.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lowbit_state.py                 # all of them, CPU, ~13 minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lowbit_state.py bytes fidelity  # some of them
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lowbit_state.py sparse          # the sparse-row case, ~3 minutes
    python benchmarks/lowbit_state.py time offload --device cuda              # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys

# Must precede the first torch import: spinning OpenMP threads distort timings on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualadam_hf import DualAdam  # noqa: E402
from dualadam_hf.lowbit import state_types  # noqa: E402  (imports torchao quietly)

BLEND_STEPS = 100  # the fidelity runs' blend: the inverse part is live in steps 1-99
LR = 1e-3
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


def smollm2_model(layers: int | None = None, device: str = "cpu") -> torch.nn.Module:
    """SmolLM2-135M's architecture (transformers' Llama) with random weights; ``layers`` fewer for a quick run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, **({} if layers is None else {"num_hidden_layers": layers})})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def optimizers(bits: int) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    from torchao.optim import AdamW4bit, AdamW8bit

    anchor = {8: AdamW8bit, 4: AdamW4bit}[bits]
    # Blocks of 256 for both, as transformers' adamw_torch_8bit / adamw_torch_4bit build them and as DualAdam's
    # default (torchao's own AdamW4bit defaults to 128).
    return {f"DualAdam state_bits={bits}": lambda ps: DualAdam(ps, lr=LR, blend_steps=BLEND_STEPS, state_bits=bits),
            f"torchao AdamW{bits}bit": lambda ps: anchor(ps, lr=LR, weight_decay=0.0, block_size=256)}


def storages(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a state tensor's data: itself, or a tensor subclass's inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in storages(getattr(t, name))]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every storage the optimizer state holds, each storage once."""
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                for t in storages(value):
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def first_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def bench_bytes(args: argparse.Namespace) -> None:
    model = smollm2_model(args.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    print(f"\n## State bytes per parameter: SmolLM2-135M architecture, {n / 1e6:.1f}M parameters\n")
    print("The first step compiles the low-bit steps (one graph per tensor shape; inductor's on-disk cache as "
          "found).\n")
    print("| optimizer | bytes/param | vs torchao AdamW of the same bits | first step (s) |\n|---|---|---|---|")
    fp32 = DualAdam(params, lr=LR)
    seconds = first_step(fp32, params)
    print(f"| DualAdam (fp32 moments) | {state_bytes(fp32) / n:.3f} | | {seconds:.1f} |")
    del fp32
    for bits in (8, 4):
        measured, seconds = {}, {}
        for name, make in optimizers(bits).items():
            opt = make(params)
            seconds[name] = first_step(opt, params)
            measured[name] = state_bytes(opt) / n
            del opt
        (ours_name, ours), (anchor_name, anchor) = measured.items()
        print(f"| DualAdam state_bits={bits} | {ours:.3f} | {ours / anchor:.4f}x | {seconds[ours_name]:.1f} |")
        print(f"| torchao AdamW{bits}bit | {anchor:.3f} | 1 | {seconds[anchor_name]:.1f} |")


def bench_time(args: argparse.Namespace) -> None:
    model = smollm2_model(args.layers, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    print(f"\n## Step time, compiled, {args.device}: {n / 1e6:.1f}M parameters, median of {args.rounds} rounds\n")
    print("| state | DualAdam in the blend | DualAdam past it | torchao AdamW | in the blend / torchao | "
          "past it / torchao | first step here: DualAdam, torchao |\n|---|---|---|---|---|---|---|")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for bits in (8, 4):
        made = {name: make(params) for name, make in optimizers(bits).items()}
        first = {name: first_step(opt, params) for name, opt in made.items()}
        ours_name, anchor_name = made
        ours = made[ours_name]
        times: dict[str, list[float]] = {"blend": [], "past": [], "anchor": []}
        for _ in range(args.rounds):
            for phase, opt, step in (("blend", ours, 10.0), ("past", ours, 10_000.0), ("anchor", made[anchor_name],
                                                                                        None)):
                if step is not None:
                    for state in opt.state.values():
                        state["step"].fill_(step)
                sync()
                start = time.perf_counter()
                opt.step()
                sync()
                times[phase].append(time.perf_counter() - start)
        blend, past, anchor = (statistics.median(times[k]) for k in ("blend", "past", "anchor"))
        print(f"| {bits}-bit | {blend * 1e3:.0f} ms | {past * 1e3:.0f} ms | {anchor * 1e3:.0f} ms | "
              f"{blend / anchor:.3f} | {past / anchor:.3f} | {first[ours_name]:.1f} s, {first[anchor_name]:.1f} s |")
        del made, ours


def bench_fidelity(args: argparse.Namespace) -> None:
    from torchao.optim import AdamW4bit, AdamW8bit

    # One layer of SmolLM2-135M: every matrix shape it has, 3.5M parameters.
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    # A fixed gradient stream with a per-row scale spread over two decades, as in real layers.
    row_scales = [torch.logspace(-4, -2, s[0])[torch.randperm(s[0], generator=gen)].unsqueeze(1) for s in shapes]
    checkpoints = (50, 200)
    makers = {
        "fp32 DualAdam": lambda ps: DualAdam(ps, lr=LR, blend_steps=BLEND_STEPS),
        "DualAdam state_bits=8": lambda ps: DualAdam(ps, lr=LR, blend_steps=BLEND_STEPS, state_bits=8),
        "DualAdam state_bits=4": lambda ps: DualAdam(ps, lr=LR, blend_steps=BLEND_STEPS, state_bits=4),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0),
        "torchao AdamW8bit": lambda ps: AdamW8bit(ps, lr=LR, weight_decay=0.0, block_size=256),
        "torchao AdamW4bit": lambda ps: AdamW4bit(ps, lr=LR, weight_decay=0.0, block_size=256),
    }
    snapshots: dict[str, dict[int, list[torch.Tensor]]] = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        stream = torch.Generator().manual_seed(1)
        snapshots[name] = {}
        for step in range(1, max(checkpoints) + 1):
            for p, scale in zip(params, row_scales):
                p.grad = torch.randn(p.shape, generator=stream) * scale
            opt.step()
            if step in checkpoints:
                snapshots[name][step] = [p.detach().clone() for p in params]

    def distance(a: str, b: str, step: int) -> float:
        """||a - b|| over all parameters, relative to how far b moved from the start."""
        diff = sum(float((x - y).pow(2).sum()) for x, y in zip(snapshots[a][step], snapshots[b][step]))
        moved = sum(float((y - s).pow(2).sum()) for y, s in zip(snapshots[b][step], start))
        return (diff / moved) ** 0.5

    print(f"\n## Fidelity: 200 steps on one gradient stream, one SmolLM2-135M layer, lr {LR:g}, "
          f"DualAdam blend_steps={BLEND_STEPS}\n")
    print("| bits | step | DualAdam low-bit vs fp32 | torchao AdamW low-bit vs torch AdamW | ratio |")
    print("|---|---|---|---|---|")
    for bits in (8, 4):
        for step in checkpoints:
            ours = distance(f"DualAdam state_bits={bits}", "fp32 DualAdam", step)
            anchor = distance(f"torchao AdamW{bits}bit", "torch AdamW", step)
            where = "in the blend" if step < BLEND_STEPS else "past the blend"
            print(f"| {bits} | {step} ({where}) | {ours:.4f} | {anchor:.4f} | {ours / anchor:.3f} |")


SPARSE_SHAPE = (8192, 64)  # an input embedding's rows
SPARSE_SHARE = 0.1  # of the rows with a gradient at each step
SPARSE_STEPS = 200
SPARSE_BLOCK = 256  # torchao's block size in transformers' adamw_torch_8bit / adamw_torch_4bit (both)


# 4-bit state and the width of a row: shapes of about the same size whose rows are narrower than a block of 256
# (blocks straddle 4 rows of different scales), exactly one block wide, and as wide as SmolLM2's hidden size.
SPARSE_WIDTHS = ((8192, 64), (2048, 256), (1024, 576))


def sparse_row_stream(steps: int = SPARSE_STEPS, seed: int = 0, shape: tuple[int, int] = SPARSE_SHAPE,
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The start and the gradient stream of the sparse-row case, generated once: per step the indices of the rows
    with a gradient and their gradient (row scale times a standard normal); every other row's gradient is 0."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    start = torch.randn(rows, cols, generator=gen) * 0.02
    scales = torch.logspace(-4, -2, rows)[torch.randperm(rows, generator=gen)].unsqueeze(1)
    taken = int(SPARSE_SHARE * rows)
    stream = []
    for _ in range(steps):
        index = torch.randperm(rows, generator=gen)[:taken]
        stream.append((index, torch.randn(taken, cols, generator=gen) * scales[index]))
    return start, stream


def sparse_run(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], start: torch.Tensor,
               stream: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The parameter after the optimizer `make` builds has stepped through the sparse-row stream from `start`."""
    p = torch.nn.Parameter(start.clone())
    opt = make([p])
    for index, rows in stream:
        grad = torch.zeros_like(p)
        grad[index] = rows
        p.grad = grad
        opt.step()
    return p.detach()


def bench_sparse(args: argparse.Namespace) -> None:
    from torchao.optim import AdamW4bit, AdamW8bit

    start, stream = sparse_row_stream()
    start = start.to(args.device)
    stream = [(index.to(args.device), rows.to(args.device)) for index, rows in stream]
    anchors = {8: AdamW8bit, 4: AdamW4bit}

    def run(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> torch.Tensor:
        return sparse_run(make, start, stream)

    # (name, full-precision optimizer, the same optimizer with low-bit state of the given bits)
    families = [
        ("DualAdam, default blend", lambda ps: DualAdam(ps, lr=LR),
         lambda bits: lambda ps: DualAdam(ps, lr=LR, state_bits=bits)),
        ("DualAdam, blend_steps=20", lambda ps: DualAdam(ps, lr=LR, blend_steps=20),
         lambda bits: lambda ps: DualAdam(ps, lr=LR, blend_steps=20, state_bits=bits)),
        ("AdamW: torchao's against torch's", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0),
         lambda bits: lambda ps: anchors[bits](ps, lr=LR, weight_decay=0.0, block_size=SPARSE_BLOCK)),
    ]
    rows, cols = SPARSE_SHAPE
    print(f"\n## Sparse rows: an {rows} x {cols} embedding, {SPARSE_SHARE:.0%} of its rows with a gradient per step "
          f"(the rest exactly 0), row scales 1e-4 to 1e-2, {SPARSE_STEPS} steps, lr {LR:g}\n")
    print("Each low-bit run against the same optimizer with full-precision moments on the same stream: the furthest "
          "any element moved over the full-precision run's furthest move; the distance between the two runs' "
          "parameters over how far the full-precision run moved (L2, and the largest element's difference over "
          "its furthest move). torchao's AdamW8bit/AdamW4bit take blocks of "
          f"{SPARSE_BLOCK}, as transformers' adamw_torch_8bit/4bit.\n")
    print("| optimizer | bits | full precision's furthest move | max move / full precision's | "
          "distance / full precision's movement | max difference / full precision's furthest move |")
    print("|---|---|---|---|---|---|")
    for name, full_make, low_make in families:
        full = run(full_make)
        moved = full - start
        furthest, movement = float(moved.abs().max()), float(moved.norm())
        for bits in (8, 4):
            low = run(low_make(bits))
            print(f"| {name} | {bits} | {furthest:.4f} | {float((low - start).abs().max()) / furthest:.2f} | "
                  f"{float((low - full).norm()) / movement:.3f} | {float((low - full).abs().max()) / furthest:.2f} |")
    bench_sparse_widths(args)


def bench_sparse_widths(args: argparse.Namespace) -> None:
    """4-bit DualAdam (blend_steps=20) on the same kind of stream for rows of several widths, and with blocks of 64
    on the narrowest: whether a block holds rows of several scales decides how far 4-bit state strays."""
    print(f"\n## 4-bit state and the width of a row ({SPARSE_SHARE:.0%} of the rows per step, row scales 1e-4 to "
          f"1e-2, {SPARSE_STEPS} steps, lr {LR:g}, DualAdam blend_steps=20, against fp32 DualAdam)\n")
    print("| rows x width | block | furthest move / fp32's | distance / fp32's movement |\n|---|---|---|---|")
    for shape in SPARSE_WIDTHS:
        start, stream = sparse_row_stream(shape=shape)
        start = start.to(args.device)
        stream = [(index.to(args.device), rows.to(args.device)) for index, rows in stream]
        full = sparse_run(lambda ps: DualAdam(ps, lr=LR, blend_steps=20), start, stream)
        moved = full - start
        for block in (SPARSE_BLOCK, 64) if shape[1] < SPARSE_BLOCK else (SPARSE_BLOCK,):
            low = sparse_run(lambda ps, block=block: DualAdam(ps, lr=LR, blend_steps=20, state_bits=4,
                                                              block_size=block), start, stream)
            print(f"| {shape[0]} x {shape[1]} | {block} | {float((low - start).abs().max() / moved.abs().max()):.2f}"
                  f" | {float((low - full).norm() / moved.norm()):.3f} |")


MEMORY_RUN = """
import json, sys, torch
sys.path.insert(0, {root!r})
from benchmarks.lowbit_state import smollm2_model, peak_rss_mb, LR
from dualadam_hf import DualAdam
name, layers, steps = sys.argv[1], {layers!r}, {steps!r}
model = smollm2_model(layers)
params = list(model.parameters())
if name.startswith("torchao"):
    from dualadam_hf.lowbit import state_types
    state_types()
    from torchao.optim import AdamW8bit, AdamW4bit
    opt = (AdamW8bit if name.endswith("8bit") else AdamW4bit)(params, lr=LR, block_size=256)
else:
    bits = None if name == "dualadam" else int(name.removeprefix("dualadam_").removesuffix("bit"))
    opt = DualAdam(params, lr=LR, blend_fraction=0.25, state_bits=bits)
    opt.set_total_steps(steps)
gen = torch.Generator().manual_seed(0)
for _ in range(steps):
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({{"peak_rss_mb": peak_rss_mb()}}))
"""


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss of a child started by
    fork and exec keeps the parent's peak at the fork, which here would hide the child's own."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(args: argparse.Namespace) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = MEMORY_RUN.format(root=root, layers=args.layers, steps=args.memory_steps)
    names = ["dualadam", "dualadam_8bit", "dualadam_4bit", "torchao AdamW8bit", "torchao AdamW4bit"]
    peaks = {}
    for name in names:
        done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True)
        peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    print(f"\n## Peak memory of a process that fully fine-tunes SmolLM2-135M's architecture ({args.memory_steps} "
          "steps, batch 2 x 128 random tokens, fp32 weights and gradients)\n")
    print("| optimizer | peak RSS (MiB) | vs fp32 DualAdam |\n|---|---|---|")
    for name, peak in peaks.items():
        print(f"| {name} | {peak:.0f} | {peak / peaks['dualadam']:.3f} |")


def bench_offload(args: argparse.Namespace) -> None:
    """torchao's CPUOffloadOptimizer (one GPU: moments and the step on the CPU) around DualAdam, against the same
    wrapper around torch's fused CPU AdamW (its default) and against DualAdam on the GPU: peak GPU memory and the
    time of a training step (forward, backward, step), and how far the offloaded run's weights end from DualAdam's
    on the GPU after the same batches (float32 throughout, so only the order of operations differs)."""
    from torchao.optim import CPUOffloadOptimizer

    if args.device == "cpu":
        print("\n## CPU offload: needs a GPU (torchao's CPUOffloadOptimizer moves state off a CUDA device); skipped")
        return
    layers, steps = args.layers or 8, max(args.rounds, 3)
    batches = [torch.randint(0, SMOLLM2_135M["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(k))
               for k in range(steps)]
    makers = {
        "DualAdam on the GPU": lambda ps: DualAdam(ps, lr=LR, blend_steps=BLEND_STEPS),
        "CPUOffloadOptimizer(DualAdam)": lambda ps: CPUOffloadOptimizer(ps, DualAdam, lr=LR, blend_steps=BLEND_STEPS),
        "CPUOffloadOptimizer(AdamW, fused)": lambda ps: CPUOffloadOptimizer(ps, torch.optim.AdamW, lr=LR,
                                                                              weight_decay=0.0),
    }
    results, weights = {}, {}
    for name, make in makers.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = smollm2_model(layers, args.device)
        opt = make(list(model.parameters()))
        times = []
        for ids in batches:
            ids = ids.to(args.device)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = (torch.cuda.max_memory_allocated() / 2**20, statistics.median(times[1:]))
        weights[name] = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
        del model, opt
    base_memory, base_time = results["DualAdam on the GPU"]
    print(f"\n## CPU offload: SmolLM2-135M's architecture with {layers} layers, batch 4 x 256, {steps} steps "
          "(median step after the first)\n")
    print("| optimizer | peak GPU memory (MiB) | vs DualAdam on the GPU | step (s) | vs DualAdam on the GPU | "
          "largest weight difference from DualAdam on the GPU |\n|---|---|---|---|---|---|")
    for name, (memory, seconds) in results.items():
        gap = float((weights[name] - weights["DualAdam on the GPU"]).abs().max())
        print(f"| {name} | {memory:.0f} | {memory / base_memory:.3f} | {seconds:.3f} | {seconds / base_time:.2f} | "
              f"{gap:.2e} |")


def main() -> None:
    sections = {"bytes": bench_bytes, "time": bench_time, "fidelity": bench_fidelity, "memory": bench_memory,
                "sparse": bench_sparse, "offload": bench_offload}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"what to measure: {', '.join(sections)} (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than SmolLM2-135M's 30")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--memory_steps", type=int, default=3)
    args = parser.parse_args()
    unknown = [name for name in args.sections if name not in sections]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(sections)}")
    state_types()  # torchao, imported quietly, before anything prints
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; "
          f"max RSS of this process so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for name in args.sections or list(sections):
        if name == "memory" and args.device != "cpu":
            continue
        sections[name](args)


if __name__ == "__main__":
    main()
