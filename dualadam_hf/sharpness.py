"""Flatness diagnostics: how sharp is the minimum a run ended in?

DualAdam's claim is that it leaves sharp minima for flat ones. These functions
put numbers on "sharp", all measured on a fixed set of evaluation batches and
with respect to the trainable parameters only (for a PEFT model: the adapters):

- ``top_hessian_eigenvalue``: the largest-magnitude eigenvalue of the Hessian of
  the loss, by power iteration on Hessian-vector products (double backward).
- ``hessian_trace``: Hutchinson's estimate of the Hessian trace (the sum of all
  curvatures), averaged over a stated number of Rademacher probes.
- ``epsilon_sharpness``: how much the loss rises when the parameters move by a
  relative radius ``rho`` (``||delta|| = rho * ||theta||``), once along the
  normalized gradient (a first-order worst case) and along random directions.

Everything is deterministic given ``seed``: random vectors come from a private
CPU generator, never from the global RNG, so measuring does not disturb a run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]

# Tokens with this label are ignored by Hugging Face losses.
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- #
# Loss over a fixed batch set
# --------------------------------------------------------------------------- #


class BatchSetLoss:
    """The weighted mean of per-batch losses, callable like a plain ``loss_fn``.

    ``parts`` holds one closure per batch (or group of rows); ``weights`` are
    what each part's mean runs over (supervised tokens, rows) and are
    normalized to sum to 1. The Hessian code uses the parts to accumulate
    Hessian-vector products part by part, so that with ``retain_graphs=False``
    only one part's double-backward graph is alive at a time (memory-aware);
    calling the object gives the averaged loss for code that just wants a number.
    """

    def __init__(self, parts: Sequence[LossFn], weights: Sequence[float], *, tokens: int = 0):
        if len(parts) == 0:
            raise ValueError("BatchSetLoss needs at least one part")
        if len(parts) != len(weights):
            raise ValueError(f"got {len(parts)} parts but {len(weights)} weights")
        total = float(sum(weights))
        if not all(w >= 0 for w in weights) or not total > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)!r}")
        self.parts = list(parts)
        self.weights = [float(w) / total for w in weights]
        self.tokens = int(tokens)  # input tokens over all parts, when known (sizes the graphs)

    def __call__(self) -> Tensor:
        return sum(w * part() for w, part in zip(self.weights, self.parts, strict=True))  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.parts)


def _weighted_parts(loss_fn: LossFn) -> list[tuple[float, LossFn]]:
    if isinstance(loss_fn, BatchSetLoss):
        return list(zip(loss_fn.weights, loss_fn.parts, strict=True))
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return [(1.0, loss_fn)]


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: there are no trainable parameters to measure")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; only floating-point tensors have a Hessian")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    return params


def _scalar_loss(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(f"loss_fn() must return a scalar tensor, got {value!r:.80}")
    if not torch.isfinite(value.detach()).all():
        raise FloatingPointError(f"loss_fn() returned a non-finite loss ({value.item()})")
    return value.reshape(())


# --------------------------------------------------------------------------- #
# Vector helpers (a "vector" is a list of tensors shaped like params)
# --------------------------------------------------------------------------- #


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    # Accumulate in float64: these sums run over millions of elements.
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _random_vector(params: Sequence[Tensor], gen: torch.Generator, kind: str) -> list[Tensor]:
    out = []
    for p in params:
        # Drawn on CPU in float32 so the numbers depend only on the seed, not on
        # the device or dtype the model happens to live in.
        if kind == "normal":
            v = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        else:  # rademacher
            v = torch.randint(0, 2, p.shape, generator=gen).to(torch.float32).mul_(2).sub_(1)
        out.append(v.to(device=p.device, dtype=p.dtype))
    return out


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------- #
# Hessian-vector products
# --------------------------------------------------------------------------- #


class HessianVectorProduct:
    """``v -> H v`` for the Hessian of ``loss_fn`` w.r.t. ``params`` (double backward).

    With ``retain_graphs`` (the default) each batch's first-order gradient graph
    is built once and kept, so every further product costs one extra backward
    pass per batch; memory then holds all batches' graphs at once. With
    ``retain_graphs=False`` each product rebuilds each batch's graph in turn and
    frees it, which bounds memory by one batch at the price of a forward and a
    backward pass per batch per product (about twice the time).
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor], *, retain_graphs: bool = True):
        self.params = _check_params(params)
        self.parts = _weighted_parts(loss_fn)
        self.retain_graphs = bool(retain_graphs)
        self.calls = 0
        self._cache: dict[int, list[Tensor]] = {}

    def _grads(self, index: int) -> list[Tensor]:
        if index in self._cache:
            return self._cache[index]
        loss = _scalar_loss(self.parts[index][1]())
        if not loss.requires_grad:
            raise ValueError("loss_fn() does not depend on params (its result does not require grad)")
        raw = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, raw, strict=True)]
        if self.retain_graphs:
            self._cache[index] = grads
        return grads

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        self.calls += 1
        out = [torch.zeros_like(p) for p in self.params]
        for index, (weight, _) in enumerate(self.parts):
            # A gradient that does not require grad is constant in params: its
            # rows of the Hessian are zero, so it is left out of the backward.
            pairs = [(g, v) for g, v in zip(self._grads(index), vector, strict=True) if g.requires_grad]
            if not pairs:
                continue
            hv = torch.autograd.grad(
                [g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                retain_graph=self.retain_graphs, allow_unused=True,
            )
            for o, h in zip(out, hv, strict=True):
                if h is not None:
                    o.add_(h, alpha=weight)
        return out

    def release(self) -> None:
        """Free the retained graphs."""
        self._cache.clear()


# --------------------------------------------------------------------------- #
# Top eigenvalue (power iteration)
# --------------------------------------------------------------------------- #


PARAM_CHOICES = ("trainable", "all", "lora")
DEFAULT_BATCH_SIZE = 2  # rows per batch when neither the settings nor a run's eval batch size say


@dataclass
class SharpnessSettings:
    """How sharpness is measured: one record for :func:`measure_sharpness`, the CLI and the recipes.

    Every Hessian-vector product costs about three forward passes of the model on the batches.
    """

    batches: int = field(default=2, metadata={"help": "Held-out batches the loss is measured on."})
    batch_size: int | None = field(
        default=None,
        metadata={"help": f"Rows per batch (None: the run's per_device_eval_batch_size, else {DEFAULT_BATCH_SIZE})."})
    max_iters: int = field(default=20, metadata={"help": "Power iterations for the top Hessian eigenvalue."})
    tol: float = field(default=1e-3, metadata={"help": "Relative eigenvalue tolerance that stops the iteration."})
    probes: int = field(default=10, metadata={"help": "Hutchinson probes for the Hessian trace."})
    rho: float = field(default=1e-3, metadata={"help": "Gradient-step radius relative to ||theta|| (worst case)."})
    rho_random: float = field(default=0.05, metadata={"help": "Random-direction radius relative to ||theta||."})
    seeds: int = field(default=3, metadata={"help": "Random directions for sharpness_random."})
    params: str = field(default="trainable", metadata={"help": f"Which weights: one of {PARAM_CHOICES}."})
    max_graph_tokens: int = field(
        default=512, metadata={"help": "Input tokens whose double-backward graphs may be alive at once (memory)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random vectors."})

    def __post_init__(self) -> None:
        # Checked before minutes of Hessian products, not after.
        for name in ("batches", "max_iters", "probes", "seeds", "max_graph_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sharpness {name} must be an int >= 1, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"sharpness batch_size must be an int >= 1, got {self.batch_size!r}")
        for name in ("tol", "rho", "rho_random"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"sharpness {name} must be a finite number > 0, got {value!r}")
        if self.params not in PARAM_CHOICES:
            raise ValueError(f"sharpness params must be one of {PARAM_CHOICES}, got {self.params!r}")


@dataclass
class PowerIterationResult:
    eigenvalue: float
    eigenvector: list[Tensor]
    iterations: int
    converged: bool


def hessian_power_iteration(
    loss_fn: LossFn | HessianVectorProduct,
    params: Sequence[Tensor] | None = None,
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PowerIterationResult:
    """Power iteration on the Hessian; see :func:`top_hessian_eigenvalue`.

    Stops when the Rayleigh quotient changes by less than ``tol`` relative to
    its size between two iterations, or after ``max_iters`` Hessian-vector
    products, whichever comes first (``converged`` tells which).
    """
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    hvp = loss_fn if isinstance(loss_fn, HessianVectorProduct) else HessianVectorProduct(loss_fn, params or [])
    v = _random_vector(hvp.params, _generator(seed), "normal")
    n = _norm(v)
    v = [x / n for x in v]
    eigenvalue: float | None = None
    for it in range(1, max_iters + 1):
        hv = hvp(v)
        rayleigh = _dot(v, hv)  # v has unit norm
        hv_norm = _norm(hv)
        if not math.isfinite(rayleigh) or not math.isfinite(hv_norm):
            raise FloatingPointError("Hessian-vector product is not finite")
        if hv_norm == 0.0:  # v is in the null space: every eigenvalue we can reach is 0
            return PowerIterationResult(0.0, v, it, True)
        done = eigenvalue is not None and abs(rayleigh - eigenvalue) <= tol * max(abs(rayleigh), 1e-30)
        eigenvalue = rayleigh
        if progress is not None:
            progress(f"eigenvalue iteration {it}/{max_iters}: {rayleigh:.6g}")
        if done:
            return PowerIterationResult(eigenvalue, v, it, True)
        v = [x / hv_norm for x in hv]
    assert eigenvalue is not None
    return PowerIterationResult(eigenvalue, v, max_iters, False)


def top_hessian_eigenvalue(
    loss_fn: LossFn, params: Sequence[Tensor], *, max_iters: int = 20, tol: float = 1e-3, seed: int = 0
) -> float:
    """The Hessian eigenvalue of largest magnitude (signed), by power iteration.

    ``loss_fn()`` returns the scalar loss over a fixed batch set; ``params`` are
    the trainable tensors. Near a minimum this is the top (positive) curvature,
    the usual "sharpness"; at a saddle with a dominant negative direction it is
    that negative value. The start vector is Gaussian from ``seed``.
    """
    hvp = HessianVectorProduct(loss_fn, params)
    try:
        return hessian_power_iteration(hvp, max_iters=max_iters, tol=tol, seed=seed).eigenvalue
    finally:
        hvp.release()


# --------------------------------------------------------------------------- #
# Trace (Hutchinson)
# --------------------------------------------------------------------------- #


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # standard error of the mean over probes (nan for one probe)
    probes: int


def hessian_trace_estimate(
    loss_fn: LossFn | HessianVectorProduct,
    params: Sequence[Tensor] | None = None,
    *,
    probes: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``mean_k z_k^T H z_k`` over Rademacher probes ``z_k``.

    Unbiased; its variance per probe is ``2 * sum_{i != j} H_ij^2``, so it is
    exact for a diagonal Hessian and the error shrinks as ``1/sqrt(probes)``.
    """
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    hvp = loss_fn if isinstance(loss_fn, HessianVectorProduct) else HessianVectorProduct(loss_fn, params or [])
    # Offset the seed so the probes are not the power iteration's start vector.
    gen = _generator(seed + 1_000_003)
    samples = []
    for k in range(1, probes + 1):
        z = _random_vector(hvp.params, gen, "rademacher")
        samples.append(_dot(z, hvp(z)))
        if progress is not None:
            progress(f"trace probe {k}/{probes}: running mean {sum(samples) / k:.6g}")
    mean = sum(samples) / probes
    if probes > 1:
        var = sum((s - mean) ** 2 for s in samples) / (probes - 1)
        stderr = math.sqrt(var / probes)
    else:
        stderr = math.nan
    return TraceEstimate(mean, stderr, probes)


def hessian_trace(loss_fn: LossFn, params: Sequence[Tensor], *, probes: int = 10, seed: int = 0) -> float:
    """Hutchinson estimate of the Hessian trace with ``probes`` Rademacher probes."""
    hvp = HessianVectorProduct(loss_fn, params)
    try:
        return hessian_trace_estimate(hvp, probes=probes, seed=seed).trace
    finally:
        hvp.release()


# --------------------------------------------------------------------------- #
# Epsilon-sharpness
# --------------------------------------------------------------------------- #


def _loss_and_gradient(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
    total = 0.0
    grad = [torch.zeros_like(p) for p in params]
    for weight, part in _weighted_parts(loss_fn):  # one batch graph alive at a time
        loss = _scalar_loss(part())
        total += weight * float(loss.detach())
        if not loss.requires_grad:
            continue
        for acc, g in zip(grad, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                acc.add_(g, alpha=weight)
    return total, grad


def _eval_loss(loss_fn: LossFn) -> float:
    with torch.no_grad():
        return float(sum(w * float(_scalar_loss(part())) for w, part in _weighted_parts(loss_fn)))


def epsilon_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    rho: float = 1e-3,
    seeds: int = 3,
    seed: int = 0,
    rho_random: float | None = None,
) -> dict[str, float]:
    """Loss increase under perturbations of relative radius ``rho``.

    The radius is ``rho * ||theta||`` with ``||theta||`` the global L2 norm of
    ``params``, so the number does not depend on how the weights are scaled
    overall. ``rho_random`` (default: ``rho``) is the relative radius of the
    random directions: a random direction in millions of dimensions meets only
    the average curvature ``tr(H) / dim``, so it needs a much larger radius than
    the gradient step before its loss change rises above float32 round-off.
    Returns a dict with:

    - ``loss``: the loss at ``theta``;
    - ``worst``: ``L(theta + r g/||g||) - L(theta)``, one normalized
      gradient-ascent step (the first-order worst case in the ball). Where the
      gradient is exactly zero there is no ascent direction; then the largest
      random increase stands in for it;
    - ``random`` / ``random_std``: mean and standard deviation over ``seeds``
      Gaussian directions z of the increase, each averaged over +z and -z (of
      norm r) so that the gradient's first-order term cancels;
    - ``random_max``: the largest increase over those 2 * ``seeds`` points;
    - ``radius``, ``rho``, ``radius_random``, ``rho_random``, ``grad_norm``,
      ``param_norm``.

    The parameters are restored bit for bit afterwards, even on error.
    """
    params = _check_params(params)
    rho_random = rho if rho_random is None else rho_random
    for name, value in (("rho", rho), ("rho_random", rho_random)):
        if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    gen = _generator(seed + 2_000_003)
    backup = [p.detach().clone() for p in params]
    param_norm = _norm(backup)
    if param_norm == 0.0:
        raise ValueError("all trainable parameters are zero: a radius relative to ||theta|| is undefined")
    radius = float(rho) * param_norm
    radius_random = float(rho_random) * param_norm

    def loss_at(direction: Sequence[Tensor], scale: float) -> float:
        with torch.no_grad():
            for p, b, d in zip(params, backup, direction, strict=True):
                p.copy_(b).add_(d, alpha=scale)
        try:
            return _eval_loss(loss_fn)
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    loss0, grad = _loss_and_gradient(loss_fn, params)
    grad_norm = _norm(grad)
    increases, singles = [], []
    for _ in range(seeds):
        z = _random_vector(params, gen, "normal")
        scale = radius_random / _norm(z)
        # Antithetic pair: the mean of the +z and -z increases cancels the
        # gradient's first-order term, which away from an exact minimum is
        # random noise of either sign, and keeps the curvature term.
        up, down = loss_at(z, scale) - loss0, loss_at(z, -scale) - loss0
        increases.append(0.5 * (up + down))
        singles += [up, down]
    worst = loss_at(grad, radius / grad_norm) - loss0 if grad_norm > 0 else max(singles)
    mean = sum(increases) / seeds
    std = math.sqrt(sum((x - mean) ** 2 for x in increases) / (seeds - 1)) if seeds > 1 else 0.0
    return {
        "loss": loss0,
        "worst": worst,
        "random": mean,
        "random_std": std,
        "random_max": max(singles),
        "radius": radius,
        "rho": float(rho),
        "radius_random": radius_random,
        "rho_random": float(rho_random),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
    }


# --------------------------------------------------------------------------- #
# Hugging Face models
# --------------------------------------------------------------------------- #


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a PeftModel
    return get_base() if callable(get_base) else model


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a (possibly PEFT-wrapped) Hugging Face causal LM."""
    base = _base_model(model)
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return type(base).__name__.endswith("ForCausalLM")
    return isinstance(base, GenerationMixin) or type(base).__name__.endswith("ForCausalLM")


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    # The fused CPU/CUDA SDPA kernels have no second derivative
    # ("derivative for ..._flash_attention_..._backward is not implemented");
    # the math kernel is plain autograd ops and does.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _prepare_batch(batch: Mapping[str, Any], index: int, causal: bool, device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches[{index}] must be a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise ValueError(f"batches[{index}] has no input_ids (keys: {sorted(batch)})")
    out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if out["input_ids"].dim() != 2:
        shape = tuple(out["input_ids"].shape)
        raise ValueError(f"batches[{index}]['input_ids'] must be (rows, tokens), got shape {shape}")
    if "labels" not in out:
        if not causal:
            raise ValueError(f"batches[{index}] has no labels; a sequence classifier needs them")
        labels = out["input_ids"].clone()
        if "attention_mask" in out:
            labels[out["attention_mask"] == 0] = IGNORE_INDEX
        out["labels"] = labels
    if causal:
        out.setdefault("use_cache", False)
    if _weight(out, causal) <= 0:
        raise ValueError(f"batches[{index}] has no supervised tokens (all labels are {IGNORE_INDEX})")
    return out


def _weight(batch: Mapping[str, Any], causal: bool) -> float:
    """What the model's mean loss over ``batch`` averages over: supervised tokens, or rows."""
    labels = batch["labels"]
    if causal:
        # HF shifts labels by one inside the model: the first position predicts nothing.
        return float((labels[..., 1:] != IGNORE_INDEX).sum())
    return float(labels.shape[0])


def _split_rows(batch: dict[str, Any], max_tokens: int | None) -> list[dict[str, Any]]:
    rows, width = batch["input_ids"].shape
    step = rows if max_tokens is None else max(1, max_tokens // max(width, 1))
    if step >= rows:
        return [batch]
    return [
        {k: (v[i:i + step] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
         for k, v in batch.items()}
        for i in range(0, rows, step)
    ]


def model_loss_fn(
    model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], *, max_tokens_per_part: int | None = None
) -> BatchSetLoss:
    """The loss closure of a Hugging Face model over a fixed list of batches.

    Each batch is a dict of tensors for ``model(**batch)``: ``input_ids`` and
    ``attention_mask``, and ``labels`` (for a causal LM they default to the
    input ids with padding masked out; a sequence classifier needs them). The
    result is the mean loss over all supervised tokens (causal LM) or examples
    (classification), split into parts so Hessian products can go part by part:
    one part per batch, or, with ``max_tokens_per_part``, batches cut into
    groups of rows holding at most that many tokens (at least one row). The
    split does not change the loss: parts are weighted by what they average.

    The caller puts the model in eval mode (dropout would make the loss random);
    :func:`measure_sharpness` does. Works the same for PEFT models: which
    parameters count is decided by the ``params`` handed to the estimators.
    """
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty list of dicts of tensors")
    if max_tokens_per_part is not None and max_tokens_per_part < 1:
        raise ValueError(f"max_tokens_per_part must be >= 1 or None, got {max_tokens_per_part!r}")
    causal = is_causal_lm(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None
    parts = [
        part
        for i, b in enumerate(batches)
        for part in _split_rows(_prepare_batch(b, i, causal, device), max_tokens_per_part)
        if _weight(part, causal) > 0  # a row group with no supervised token adds nothing
    ]

    def make_part(inputs: dict) -> LossFn:
        def part() -> Tensor:
            with _double_backward_attention():
                out = model(**inputs)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError(f"{type(model).__name__} returned no loss; are labels in the batch?")
            return loss

        return part

    return BatchSetLoss([make_part(inputs) for inputs in parts], [_weight(p, causal) for p in parts],
                        tokens=sum(int(p["input_ids"].numel()) for p in parts))


def select_parameters(model: torch.nn.Module, which: str = "trainable") -> list[tuple[str, Tensor]]:
    """Named parameters to measure: ``trainable`` (requires_grad), ``all``, or ``lora`` adapters."""
    if which not in PARAM_CHOICES:
        raise ValueError(f"params must be one of {PARAM_CHOICES}, got {which!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if which == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif which == "lora":
        chosen = [(n, p) for n, p in named if "lora_" in n]
    else:
        chosen = named
    if not chosen:
        raise ValueError(f"model has no {which} parameters to measure")
    return chosen


@contextlib.contextmanager
def _measuring(model: torch.nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    # Eval mode (no dropout) and requires_grad on exactly the measured tensors;
    # both restored afterwards so a training run can go on.
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


def measure_sharpness(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Any]],
    settings: SharpnessSettings | None = None,
    *,
    params: Sequence[Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """All flatness numbers for a Hugging Face model (full or PEFT) on fixed batches.

    ``settings`` (default :class:`SharpnessSettings()`) says how; ``settings.params`` picks the weights
    (``"trainable"``: the adapters of a PEFT model, ``"lora"``, ``"all"``) unless ``params`` gives the
    tensors. ``settings.max_graph_tokens`` bounds memory: the double-backward graphs of at most that many
    input tokens are alive at once. When all batches fit, their graphs are built once and kept; otherwise
    the batches are cut into row groups of at most that many tokens and each product rebuilds each
    group's graph in turn (about twice the time). A SmolLM2-135M graph takes about 12 MB per token in
    float32 (docs/flatness.md). ``progress`` receives one line per Hessian-vector product.

    Returns ``loss``, ``top_eigenvalue``, ``hessian_trace``, ``sharpness_worst``,
    ``sharpness_random`` and, for context, ``eigenvalue_iterations``,
    ``eigenvalue_converged`` (1.0/0.0), ``hessian_trace_stderr``, ``probes``,
    ``sharpness_random_std``, ``rho``, ``radius``, ``rho_random``,
    ``radius_random``, ``grad_norm``, ``param_norm``,
    ``num_params``, ``num_parts`` (row groups), ``num_tokens``,
    ``graphs_retained`` (1.0/0.0) and wall times ``seconds_eigenvalue``,
    ``seconds_trace``, ``seconds_epsilon``, ``seconds_total``.
    """
    settings = settings or SharpnessSettings()
    seed, max_iters, tol, probes = settings.seed, settings.max_iters, settings.tol, settings.probes
    rho, rho_random, seeds, max_graph_tokens = settings.rho, settings.rho_random, settings.seeds, \
        settings.max_graph_tokens
    tensors = [p for _, p in select_parameters(model, settings.params)] if params is None else list(params)
    if not tensors:
        raise ValueError("params is empty: there are no parameters to measure")
    start = time.perf_counter()
    with _measuring(model, tensors):
        loss_fn = model_loss_fn(model, batches, max_tokens_per_part=max_graph_tokens)
        retain = loss_fn.tokens <= max_graph_tokens or len(loss_fn) == 1
        hvp = HessianVectorProduct(loss_fn, tensors, retain_graphs=retain)
        try:
            t0 = time.perf_counter()
            power = hessian_power_iteration(hvp, max_iters=max_iters, tol=tol, seed=seed, progress=progress)
            t1 = time.perf_counter()
            trace = hessian_trace_estimate(hvp, probes=probes, seed=seed, progress=progress)
            t2 = time.perf_counter()
        finally:
            hvp.release()
        eps = epsilon_sharpness(loss_fn, tensors, rho=rho, seeds=seeds, seed=seed, rho_random=rho_random)
        t3 = time.perf_counter()
    return {
        "loss": eps["loss"],
        "top_eigenvalue": power.eigenvalue,
        "hessian_trace": trace.trace,
        "sharpness_worst": eps["worst"],
        "sharpness_random": eps["random"],
        "eigenvalue_iterations": float(power.iterations),
        "eigenvalue_converged": 1.0 if power.converged else 0.0,
        "hessian_trace_stderr": trace.stderr,
        "probes": float(probes),
        "sharpness_random_std": eps["random_std"],
        "rho": eps["rho"],
        "radius": eps["radius"],
        "rho_random": eps["rho_random"],
        "radius_random": eps["radius_random"],
        "grad_norm": eps["grad_norm"],
        "param_norm": eps["param_norm"],
        "num_params": float(sum(p.numel() for p in tensors)),
        "num_parts": float(len(loss_fn)),
        "num_tokens": float(loss_fn.tokens),
        "graphs_retained": 1.0 if retain else 0.0,
        "seconds_eigenvalue": t1 - t0,
        "seconds_trace": t2 - t1,
        "seconds_epsilon": t3 - t2,
        "seconds_total": t3 - start,
    }
