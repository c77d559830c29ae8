"""Flatness diagnostics: how sharp is the minimum a run ended in?

On a fixed set of evaluation batches and w.r.t. the trainable parameters (for a PEFT model: the adapters):
the top Hessian eigenvalue (power iteration on Hessian-vector products), Hutchinson's Hessian trace, and
the epsilon-sharpness (loss rise at a radius relative to ``||theta||``). docs/flatness.md says what each
means. Deterministic given ``seed``: random vectors come from a private CPU generator, never the global RNG.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[], Tensor]
IGNORE_INDEX = -100  # tokens with this label are ignored by Hugging Face losses
PARAM_CHOICES = ("trainable", "all", "lora")
DEFAULT_BATCH_SIZE = 2  # rows per batch when neither the settings nor a run's eval batch size say
# The log-key prefix of the numbers train measures here after training, e.g. "sharpness/top_eigenvalue" and
# "sharpness/eigenvalue_converged" (0 when the power iteration stopped at its cap): the report reads both.
SHARPNESS_PREFIX = "sharpness/"


def _check(name: str, value: Any, integer: bool, prefix: str = "") -> None:
    if integer and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{prefix}{name} must be an int >= 1, got {value!r}")
    if not integer and not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{prefix}{name} must be a finite number > 0, got {value!r}")


class BatchSetLoss:
    """The weighted mean of per-batch losses, callable like a plain ``loss_fn``.

    ``weights`` (what each part's mean runs over: supervised tokens, rows) are normalized to sum to 1. The
    Hessian code goes part by part, so without retained graphs only one part's graph is alive at a time.
    """

    def __init__(self, parts: Sequence[LossFn], weights: Sequence[float], *, tokens: int = 0):
        if not parts or len(parts) != len(weights) or min(weights) < 0 or not sum(weights) > 0:
            raise ValueError(f"need one weight >= 0 per part with a positive sum, got {list(weights)!r}")
        self.parts = list(parts)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.tokens = int(tokens)  # input tokens over all parts, when known (sizes the graphs)

    def __call__(self) -> Tensor:
        return sum(w * part() for w, part in zip(self.weights, self.parts))  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.parts)


def _weighted_parts(loss_fn: LossFn) -> list[tuple[float, LossFn]]:
    return list(zip(loss_fn.weights, loss_fn.parts)) if isinstance(loss_fn, BatchSetLoss) else [(1.0, loss_fn)]


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: there are no trainable parameters to measure")
    for i, p in enumerate(params):
        if not getattr(p, "requires_grad", False):  # only floating-point tensors can
            raise ValueError(f"params[{i}] ({type(p).__name__} {tuple(getattr(p, 'shape', ()))}) does not require grad")
    return params


def _scalar_loss(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(f"loss_fn() must return a scalar tensor, got {value!r:.80}")
    if not torch.isfinite(value.detach()).all():
        raise FloatingPointError(f"loss_fn() returned a non-finite loss ({value.item()})")
    return value.reshape(())


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    # Accumulate in float64: these sums run over millions of elements.
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _random_vector(params: Sequence[Tensor], gen: torch.Generator, kind: str) -> list[Tensor]:
    # Drawn on CPU in float32 so the numbers depend only on the seed, not on the model's device or dtype.
    out = []
    for p in params:
        if kind == "normal":
            v = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        else:  # rademacher
            v = torch.randint(0, 2, p.shape, generator=gen).to(torch.float32).mul_(2).sub_(1)
        out.append(v.to(device=p.device, dtype=p.dtype))
    return out


# Offsets of the seeds of the trace probes and of the epsilon-sharpness directions from the measurement's seed:
# each measure draws from a stream of its own, so no probe repeats the power iteration's start vector (drawn
# from the seed itself). A million apart, so the streams of the nearby seeds of a comparison's runs (seed,
# seed + 1, ...) do not meet either.
TRACE_SEED_OFFSET = 1_000_003
EPSILON_SEED_OFFSET = 2_000_003


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


class HessianVectorProduct:
    """``v -> H v`` for the Hessian of ``loss_fn`` w.r.t. ``params`` (double backward).

    ``retain_graphs`` keeps each part's gradient graph after its first use (one backward per part per
    product, all graphs in memory); without it every product rebuilds and frees each part's graph in
    turn (memory of one part, about twice the time).
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor], *, retain_graphs: bool = True):
        self.params = _check_params(params)
        self.parts = _weighted_parts(loss_fn)
        self.retain_graphs = bool(retain_graphs)
        self._cache: dict[int, list[Tensor]] = {}

    def _grads(self, index: int) -> list[Tensor]:
        if index in self._cache:
            return self._cache[index]
        loss = _scalar_loss(self.parts[index][1]())
        if not loss.requires_grad:
            raise ValueError("loss_fn() does not depend on params (its result does not require grad)")
        raw = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, raw)]
        if self.retain_graphs:
            self._cache[index] = grads
        return grads

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for index, (weight, _) in enumerate(self.parts):
            # A gradient that does not require grad is constant in params: its Hessian rows are zero.
            pairs = [(g, v) for g, v in zip(self._grads(index), vector) if g.requires_grad]
            if not pairs:
                continue
            hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                                     retain_graph=self.retain_graphs, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h, alpha=weight)
        return out

    def release(self) -> None:
        """Free the retained graphs."""
        self._cache.clear()


def _hvp(loss_fn: LossFn | HessianVectorProduct, params: Sequence[Tensor] | None) -> HessianVectorProduct:
    return loss_fn if isinstance(loss_fn, HessianVectorProduct) else HessianVectorProduct(loss_fn, params or [])


@dataclass
class SharpnessSettings:
    """How sharpness is measured: one record for :func:`measure_sharpness`, the CLI and the recipes.

    Every Hessian-vector product costs about three forward passes of the model on the batches.
    """

    batches: int = field(default=2, metadata={"help": "Held-out batches the loss is measured on."})
    batch_size: int | None = field(default=None, metadata={
        "help": f"Rows per batch (None: the run's per_device_eval_batch_size, else {DEFAULT_BATCH_SIZE})."})
    max_iters: int = field(default=20, metadata={"help": "Power iterations for the top Hessian eigenvalue."})
    tol: float = field(default=1e-3, metadata={"help": "Relative eigenvalue tolerance that stops the iteration."})
    probes: int = field(default=10, metadata={"help": "Hutchinson probes for the Hessian trace."})
    rho: float = field(default=1e-3, metadata={"help": "Gradient-step radius relative to ||theta|| (worst case)."})
    rho_random: float = field(default=0.05, metadata={"help": "Random-direction radius relative to ||theta||."})
    seeds: int = field(default=3, metadata={"help": "Random directions for sharpness_random."})
    params: str = field(default="trainable", metadata={"help": f"Which weights: one of {PARAM_CHOICES}."})
    # About 10 MB per token for SmolLM2-135M: 128 keeps the measurement within the memory training needs.
    max_graph_tokens: int = field(default=128, metadata={
        "help": "Input tokens whose double-backward graphs may be alive at once (memory)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random vectors."})

    def __post_init__(self) -> None:
        # Checked before minutes of Hessian products, not after.
        for name in ("batches", "max_iters", "probes", "seeds", "max_graph_tokens", "tol", "rho", "rho_random"):
            _check(name, getattr(self, name), name not in ("tol", "rho", "rho_random"), "sharpness ")
        if self.batch_size is not None:
            _check("batch_size", self.batch_size, True, "sharpness ")
        if self.params not in PARAM_CHOICES:
            raise ValueError(f"sharpness params must be one of {PARAM_CHOICES}, got {self.params!r}")


@dataclass
class PowerIterationResult:
    eigenvalue: float
    eigenvector: list[Tensor]
    iterations: int
    converged: bool
    relative_change: float = math.nan  # of the estimate in the last iteration (what ``tol`` is compared with)


def hessian_power_iteration(loss_fn: LossFn | HessianVectorProduct, params: Sequence[Tensor] | None = None, *,
                            max_iters: int = 20, tol: float = 1e-3, seed: int = 0,
                            progress: Callable[[str], None] | None = None) -> PowerIterationResult:
    """Power iteration on the Hessian from a Gaussian start vector.

    Stops when the Rayleigh quotient changes by less than ``tol`` (relative) between two iterations, or
    after ``max_iters`` Hessian-vector products (``converged`` tells which).
    """
    _check("max_iters", max_iters, True)
    _check("tol", tol, False)
    hvp = _hvp(loss_fn, params)
    v = _random_vector(hvp.params, _generator(seed), "normal")
    n = _norm(v)
    v = [x / n for x in v]
    eigenvalue: float | None = None
    change = math.inf  # no change to compare before the second iteration
    for it in range(1, max_iters + 1):
        hv = hvp(v)
        rayleigh, hv_norm = _dot(v, hv), _norm(hv)  # v has unit norm
        if not math.isfinite(rayleigh) or not math.isfinite(hv_norm):
            raise FloatingPointError("Hessian-vector product is not finite")
        if hv_norm == 0.0:  # v is in the null space: every eigenvalue we can reach is 0
            return PowerIterationResult(0.0, v, it, True, 0.0)
        if eigenvalue is not None:
            change = abs(rayleigh - eigenvalue) / max(abs(rayleigh), 1e-30)
        eigenvalue = rayleigh
        if progress is not None:
            progress(f"eigenvalue iteration {it}/{max_iters}: {rayleigh:.6g}")
        if change <= tol:
            return PowerIterationResult(eigenvalue, v, it, True, change)
        v = [x / hv_norm for x in hv]
    assert eigenvalue is not None
    return PowerIterationResult(eigenvalue, v, max_iters, False, change)


def top_hessian_eigenvalue(loss_fn: LossFn, params: Sequence[Tensor], *, max_iters: int = 20, tol: float = 1e-3,
                           seed: int = 0) -> float:
    """The Hessian eigenvalue of largest magnitude, signed: the top curvature near a minimum, a dominant
    negative one at a saddle."""
    return hessian_power_iteration(loss_fn, params, max_iters=max_iters, tol=tol, seed=seed).eigenvalue


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # standard error of the mean over probes (nan for one probe)
    probes: int


def hessian_trace_estimate(loss_fn: LossFn | HessianVectorProduct, params: Sequence[Tensor] | None = None, *,
                           probes: int = 10, seed: int = 0,
                           progress: Callable[[str], None] | None = None) -> TraceEstimate:
    """Hutchinson's estimate ``mean_k z_k^T H z_k`` over Rademacher probes ``z_k``.

    Unbiased; its variance per probe is ``2 * sum_{i != j} H_ij^2``, so it is exact for a diagonal Hessian
    and the error shrinks as ``1/sqrt(probes)``.
    """
    _check("probes", probes, True)
    hvp = _hvp(loss_fn, params)
    gen = _generator(seed + TRACE_SEED_OFFSET)
    samples = []
    for k in range(1, probes + 1):
        z = _random_vector(hvp.params, gen, "rademacher")
        samples.append(_dot(z, hvp(z)))
        if progress is not None:
            progress(f"trace probe {k}/{probes}: running mean {sum(samples) / k:.6g}")
    mean = sum(samples) / probes
    var = sum((s - mean) ** 2 for s in samples) / (probes - 1) if probes > 1 else math.nan
    return TraceEstimate(mean, math.sqrt(var / probes), probes)


def hessian_trace(loss_fn: LossFn, params: Sequence[Tensor], *, probes: int = 10, seed: int = 0) -> float:
    """Hutchinson estimate of the Hessian trace with ``probes`` Rademacher probes."""
    return hessian_trace_estimate(loss_fn, params, probes=probes, seed=seed).trace


def _loss_and_gradient(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
    total = 0.0
    grad = [torch.zeros_like(p) for p in params]
    for weight, part in _weighted_parts(loss_fn):  # one batch graph alive at a time
        loss = _scalar_loss(part())
        total += weight * float(loss.detach())
        if loss.requires_grad:
            for acc, g in zip(grad, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g, alpha=weight)
    return total, grad


def _eval_loss(loss_fn: LossFn) -> float:
    with torch.no_grad():
        return float(sum(w * float(_scalar_loss(part())) for w, part in _weighted_parts(loss_fn)))


def epsilon_sharpness(loss_fn: LossFn, params: Sequence[Tensor], *, rho: float = 1e-3, seeds: int = 3,
                      seed: int = 0, rho_random: float | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Loss increase under perturbations of radius ``rho * ||theta||`` (global L2 norm of ``params``).

    ``worst``: one normalized gradient-ascent step (the first-order worst case; at a zero gradient the
    largest random increase stands in). ``random`` / ``random_std``: mean and spread over ``seeds``
    Gaussian directions of radius ``rho_random * ||theta||`` (default ``rho``: a random direction meets
    only the average curvature, so it needs a larger radius to rise above round-off), each averaged over
    +z and -z; ``random_max``: the largest of those single increases. Also ``loss``, ``radius``, ``rho``,
    ``radius_random``, ``rho_random``, ``grad_norm``, ``param_norm``. Parameters are restored bit for bit.
    ``progress`` gets one line per loss evaluation.
    """
    params = _check_params(params)
    rho_random = rho if rho_random is None else rho_random
    _check("rho", rho, False)
    _check("rho_random", rho_random, False)
    _check("seeds", seeds, True)
    gen = _generator(seed + EPSILON_SEED_OFFSET)
    backup = [p.detach().clone() for p in params]
    param_norm = _norm(backup)
    if param_norm == 0.0:
        raise ValueError("all trainable parameters are zero: a radius relative to ||theta|| is undefined")
    radius, radius_random = float(rho) * param_norm, float(rho_random) * param_norm

    evaluations = iter(range(1, 3 + 2 * seeds))
    total = 2 + 2 * seeds

    def report(what: str, value: float) -> None:
        if progress is not None:
            progress(f"loss evaluation {next(evaluations)}/{total}: {what} {value:.6g}")

    def loss_at(direction: Sequence[Tensor], scale: float) -> float:
        with torch.no_grad():
            for p, b, d in zip(params, backup, direction):
                p.copy_(b).add_(d, alpha=scale)
        try:
            loss = _eval_loss(loss_fn)
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
        report("perturbed loss", loss)
        return loss

    loss0, grad = _loss_and_gradient(loss_fn, params)
    report("loss and gradient", loss0)
    grad_norm = _norm(grad)
    increases, singles = [], []
    for _ in range(seeds):
        z = _random_vector(params, gen, "normal")
        scale = radius_random / _norm(z)
        # The +z/-z mean cancels the gradient's first-order term (noise of either sign away from an exact
        # minimum) and keeps the curvature term.
        up, down = loss_at(z, scale) - loss0, loss_at(z, -scale) - loss0
        increases.append(0.5 * (up + down))
        singles += [up, down]
    worst = loss_at(grad, radius / grad_norm) - loss0 if grad_norm > 0 else max(singles)
    mean = sum(increases) / seeds
    std = math.sqrt(sum((x - mean) ** 2 for x in increases) / (seeds - 1)) if seeds > 1 else 0.0
    return {"loss": loss0, "worst": worst, "random": mean, "random_std": std, "random_max": max(singles),
            "radius": radius, "rho": float(rho), "radius_random": radius_random, "rho_random": float(rho_random),
            "grad_norm": grad_norm, "param_norm": param_norm}


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a (possibly PEFT-wrapped) Hugging Face causal LM."""
    from transformers import GenerationMixin

    get_base = getattr(model, "get_base_model", None)  # a PeftModel
    base = get_base() if callable(get_base) else model
    return isinstance(base, GenerationMixin) or type(base).__name__.endswith("ForCausalLM")


def _weight(batch: Mapping[str, Any], causal: bool) -> float:
    """What the model's mean loss over ``batch`` averages over: supervised tokens (HF shifts a causal LM's
    labels by one inside the model: the first position predicts nothing), or rows."""
    labels = batch["labels"]
    return float((labels[..., 1:] != IGNORE_INDEX).sum()) if causal else float(labels.shape[0])


def _prepare_batch(batch: Mapping[str, Any], index: int, causal: bool, device: torch.device) -> dict[str, Any]:
    if "input_ids" not in batch:
        raise ValueError(f"batches[{index}] has no input_ids (keys: {sorted(batch)})")
    out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if out["input_ids"].dim() != 2:
        raise ValueError(f"batches[{index}]['input_ids'] must be (rows, tokens), got {tuple(out['input_ids'].shape)}")
    if "labels" not in out:
        if not causal:
            raise ValueError(f"batches[{index}] has no labels; a sequence classifier needs them")
        out["labels"] = out["input_ids"].clone()
        if "attention_mask" in out:
            out["labels"][out["attention_mask"] == 0] = IGNORE_INDEX
    if causal:
        out.setdefault("use_cache", False)
    if _weight(out, causal) <= 0:
        raise ValueError(f"batches[{index}] has no supervised tokens (all labels are {IGNORE_INDEX})")
    return out


def _split_rows(batch: dict[str, Any], max_tokens: int | None) -> list[dict[str, Any]]:
    rows, width = batch["input_ids"].shape
    step = rows if max_tokens is None else max(1, max_tokens // max(width, 1))
    if step >= rows:
        return [batch]
    return [{k: (v[i:i + step] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
             for k, v in batch.items()} for i in range(0, rows, step)]


def model_loss_fn(model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], *,
                  max_tokens_per_part: int | None = None) -> BatchSetLoss:
    """The mean loss of a Hugging Face model over a fixed list of batches, one part per batch.

    Each batch is a dict for ``model(**batch)``; a causal LM's ``labels`` default to the input ids with
    padding masked, a classifier needs them. With ``max_tokens_per_part`` batches are cut into row groups
    of at most that many tokens (at least one row); parts are weighted by what they average, so the split
    does not change the loss. The caller puts the model in eval mode (:func:`measure_sharpness` does).
    """
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty list of dicts of tensors")
    if max_tokens_per_part is not None and max_tokens_per_part < 1:
        raise ValueError(f"max_tokens_per_part must be >= 1 or None, got {max_tokens_per_part!r}")
    causal = is_causal_lm(model)
    device = next(model.parameters()).device
    parts = [part for i, b in enumerate(batches)
             for part in _split_rows(_prepare_batch(b, i, causal, device), max_tokens_per_part)
             if _weight(part, causal) > 0]  # a row group with no supervised token adds nothing

    def make_part(inputs: dict) -> LossFn:
        def part() -> Tensor:
            # The fused SDPA kernels have no second derivative; the math kernel is plain autograd ops.
            with sdpa_kernel(SDPBackend.MATH):
                loss = getattr(model(**inputs), "loss", None)
            if loss is None:
                raise ValueError(f"{type(model).__name__} returned no loss; are labels in the batch?")
            return loss

        return part

    return BatchSetLoss([make_part(p) for p in parts], [_weight(p, causal) for p in parts],
                        tokens=sum(int(p["input_ids"].numel()) for p in parts))


def select_parameters(model: torch.nn.Module, which: str = "trainable") -> list[tuple[str, Tensor]]:
    """Named parameters to measure: ``trainable`` (requires_grad), ``all``, or ``lora`` adapters."""
    if which not in PARAM_CHOICES:
        raise ValueError(f"params must be one of {PARAM_CHOICES}, got {which!r}")
    keep = {"trainable": lambda n, p: p.requires_grad, "lora": lambda n, p: "lora_" in n, "all": lambda n, p: True}
    chosen = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and keep[which](n, p)]
    if not chosen:
        raise ValueError(f"model has no {which} parameters to measure")
    return chosen


@contextlib.contextmanager
def _measuring(model: torch.nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    # Eval mode (no dropout), requires_grad on exactly the measured tensors; both restored afterwards.
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    measured = {id(p) for p in params}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in measured)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)


class _Steps:
    """One progress bar over all Hessian-vector products and perturbed losses of a measurement, saying which
    quantity is being measured; also forwards each line to ``progress``."""

    def __init__(self, settings: SharpnessSettings, show_bar: bool, progress: Callable[[str], None] | None):
        from tqdm.auto import tqdm

        # Power iteration, trace probes, then the perturbed losses (1 gradient + 2 per direction + the worst).
        self.bar = tqdm(total=settings.max_iters + settings.probes + 2 + 2 * settings.seeds, unit="step",
                        desc="sharpness", disable=not show_bar, dynamic_ncols=True)
        self.progress = progress

    def start(self, what: str) -> Callable[[str], None]:
        self.bar.set_description(f"sharpness: {what}")

        def step(line: str) -> None:
            self.bar.update(1)
            self.bar.set_postfix_str(line.split(": ", 1)[-1], refresh=False)
            if self.progress is not None:
                self.progress(line)

        return step

    def note(self, line: str) -> None:
        """A line that is not a step (what the next steps cost): above the bar and to ``progress``."""
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)
        if self.progress is not None:
            self.progress(line)

    def skip(self, steps: int) -> None:
        """A power iteration that converged early: its unused steps leave the total."""
        self.bar.total -= steps
        self.bar.refresh()


def measure_sharpness(model: torch.nn.Module, batches: Sequence[Mapping[str, Any]],
                      settings: SharpnessSettings | None = None, *, params: Sequence[Tensor] | None = None,
                      progress: Callable[[str], None] | None = None, show_bar: bool = False) -> dict[str, float]:
    """All flatness numbers (docs/flatness.md lists the keys) for a full or PEFT model on fixed batches.

    ``settings`` defaults to ``SharpnessSettings()``; its ``params`` picks the weights unless ``params`` gives
    them. Graphs are kept while all batches fit in ``max_graph_tokens``, else rebuilt per product in row
    groups of that size (half the speed). ``progress`` gets one line per Hessian-vector product; ``show_bar``
    draws a progress bar on stderr. The result depends only on the model, the batches and the settings: the
    random vectors come from generators seeded by ``settings.seed``, and anything in the model that draws from
    torch's global generator draws from one seeded the same way, restored afterwards.
    """
    s = settings or SharpnessSettings()
    tensors = [p for _, p in select_parameters(model, s.params)] if params is None else list(params)
    steps = _Steps(s, show_bar, progress)
    start = time.perf_counter()
    devices = sorted({p.device.index for p in tensors if p.device.type == "cuda"})
    with _measuring(model, tensors), torch.random.fork_rng(devices=devices):
        torch.manual_seed(s.seed)
        loss_fn = model_loss_fn(model, batches, max_tokens_per_part=s.max_graph_tokens)
        retain = loss_fn.tokens <= s.max_graph_tokens or len(loss_fn) == 1
        hvp = HessianVectorProduct(loss_fn, tensors, retain_graphs=retain)
        if all(p.device.type == "cpu" for p in tensors):
            # The bar shows nothing until the first product ends: say why the screen stays still so long.
            steps.note(f"top eigenvalue: up to {s.max_iters} power iterations, one Hessian-vector product each; "
                       "on CPU each can take a minute or more")
        try:
            t0 = time.perf_counter()
            power = hessian_power_iteration(hvp, max_iters=s.max_iters, tol=s.tol, seed=s.seed,
                                            progress=steps.start("top eigenvalue (power iteration)"))
            steps.skip(s.max_iters - power.iterations)
            t1 = time.perf_counter()
            trace = hessian_trace_estimate(hvp, probes=s.probes, seed=s.seed,
                                           progress=steps.start("Hessian trace (Hutchinson probes)"))
            t2 = time.perf_counter()
        finally:
            hvp.release()
        eps = epsilon_sharpness(loss_fn, tensors, rho=s.rho, seeds=s.seeds, seed=s.seed, rho_random=s.rho_random,
                                progress=steps.start("loss at perturbed weights"))
        t3 = time.perf_counter()
    steps.bar.close()
    return {
        "loss": eps["loss"], "top_eigenvalue": power.eigenvalue, "hessian_trace": trace.trace,
        "sharpness_worst": eps["worst"], "sharpness_random": eps["random"],
        "eigenvalue_iterations": float(power.iterations), "eigenvalue_converged": float(power.converged),
        "eigenvalue_relative_change": power.relative_change,
        "hessian_trace_stderr": trace.stderr, "probes": float(s.probes), "sharpness_random_std": eps["random_std"],
        **{k: eps[k] for k in ("rho", "radius", "rho_random", "radius_random", "grad_norm", "param_norm")},
        "num_params": float(sum(p.numel() for p in tensors)), "num_parts": float(len(loss_fn)),
        "num_tokens": float(loss_fn.tokens), "graphs_retained": float(retain),
        "seconds_eigenvalue": t1 - t0, "seconds_trace": t2 - t1, "seconds_epsilon": t3 - t2,
        "seconds_total": t3 - start,
    }
