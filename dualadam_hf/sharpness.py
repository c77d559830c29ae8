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
from dataclasses import dataclass
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

    ``parts`` holds one closure per batch. The Hessian code uses them to
    accumulate Hessian-vector products batch by batch, so only one batch's
    double-backward graph is alive at a time (memory-aware); calling the object
    gives the averaged loss for code that just wants a number.
    """

    def __init__(self, parts: Sequence[LossFn], weights: Sequence[float]):
        if len(parts) == 0:
            raise ValueError("BatchSetLoss needs at least one part")
        if len(parts) != len(weights):
            raise ValueError(f"got {len(parts)} parts but {len(weights)} weights")
        total = float(sum(weights))
        if not all(w >= 0 for w in weights) or not total > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)!r}")
        self.parts = list(parts)
        self.weights = [float(w) / total for w in weights]

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

    With a single loss part the first-order gradient graph is built once and
    kept (``retain_graph``), so each further product costs one extra backward.
    With several parts (a ``BatchSetLoss`` of many batches) each product
    rebuilds each part's graph in turn and frees it, which bounds memory by one
    batch at the price of a forward and backward per part per product.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor]):
        self.params = _check_params(params)
        self.parts = _weighted_parts(loss_fn)
        self.calls = 0
        self._cached: tuple[Tensor, list[Tensor]] | None = None

    def _loss_and_grads(self, part: LossFn) -> tuple[Tensor, list[Tensor]]:
        loss = _scalar_loss(part())
        if not loss.requires_grad:
            raise ValueError("loss_fn() does not depend on params (its result does not require grad)")
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]

    def _grads_for(self, index: int) -> tuple[Tensor, list[Tensor]]:
        if len(self.parts) == 1:
            if self._cached is None:
                self._cached = self._loss_and_grads(self.parts[0][1])
            return self._cached
        return self._loss_and_grads(self.parts[index][1])

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        self.calls += 1
        keep = len(self.parts) == 1
        out = [torch.zeros_like(p) for p in self.params]
        for index, (weight, _) in enumerate(self.parts):
            _, grads = self._grads_for(index)
            # A gradient that does not require grad is constant in params: its
            # rows of the Hessian are zero, so it is left out of the backward.
            pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g.requires_grad]
            if not pairs:
                continue
            hv = torch.autograd.grad(
                [g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                retain_graph=keep, allow_unused=True,
            )
            for o, h in zip(out, hv, strict=True):
                if h is not None:
                    o.add_(h, alpha=weight)
        return out

    def release(self) -> None:
        """Free the cached graph."""
        self._cached = None


# --------------------------------------------------------------------------- #
# Top eigenvalue (power iteration)
# --------------------------------------------------------------------------- #


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
    for _ in range(probes):
        z = _random_vector(hvp.params, gen, "rademacher")
        samples.append(_dot(z, hvp(z)))
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
) -> dict[str, float]:
    """Loss increase under perturbations of relative radius ``rho``.

    The radius is ``rho * ||theta||`` with ``||theta||`` the global L2 norm of
    ``params``, so the number does not depend on how the weights are scaled
    overall. Returns a dict with:

    - ``loss``: the loss at ``theta``;
    - ``worst``: ``L(theta + r g/||g||) - L(theta)``, one normalized
      gradient-ascent step (the first-order worst case in the ball). Where the
      gradient is exactly zero there is no ascent direction; then the largest
      random increase stands in for it;
    - ``random`` / ``random_std`` / ``random_max``: mean, standard deviation and
      maximum of the increase over ``seeds`` Gaussian directions of norm r;
    - ``radius``, ``rho``, ``grad_norm``, ``param_norm``.

    The parameters are restored bit for bit afterwards, even on error.
    """
    params = _check_params(params)
    if not (isinstance(rho, int | float) and rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    gen = _generator(seed + 2_000_003)
    backup = [p.detach().clone() for p in params]
    param_norm = _norm(backup)
    if param_norm == 0.0:
        raise ValueError("all trainable parameters are zero: a radius relative to ||theta|| is undefined")
    radius = float(rho) * param_norm

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
    increases = []
    for _ in range(seeds):
        z = _random_vector(params, gen, "normal")
        increases.append(loss_at(z, radius / _norm(z)) - loss0)
    worst = loss_at(grad, radius / grad_norm) - loss0 if grad_norm > 0 else max(increases)
    mean = sum(increases) / seeds
    std = math.sqrt(sum((x - mean) ** 2 for x in increases) / (seeds - 1)) if seeds > 1 else 0.0
    return {
        "loss": loss0,
        "worst": worst,
        "random": mean,
        "random_std": std,
        "random_max": max(increases),
        "radius": radius,
        "rho": float(rho),
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


def _prepare_batch(batch: Mapping[str, Any], index: int, causal: bool, device: torch.device) -> tuple[dict, float]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches[{index}] must be a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch and "inputs_embeds" not in batch:
        raise ValueError(f"batches[{index}] has no input_ids (keys: {sorted(batch)})")
    out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if "labels" not in out:
        if not causal:
            raise ValueError(f"batches[{index}] has no labels; a sequence classifier needs them")
        labels = out["input_ids"].clone()
        if "attention_mask" in out:
            labels[out["attention_mask"] == 0] = IGNORE_INDEX
        out["labels"] = labels
    labels = out["labels"]
    if causal:
        # HF shifts labels by one inside the model: the first position predicts nothing.
        weight = float((labels[..., 1:] != IGNORE_INDEX).sum())
        out.setdefault("use_cache", False)
    else:
        weight = float(labels.shape[0])
    if weight <= 0:
        raise ValueError(f"batches[{index}] has no supervised tokens (all labels are {IGNORE_INDEX})")
    return out, weight


def model_loss_fn(model: torch.nn.Module, batches: Sequence[Mapping[str, Any]]) -> BatchSetLoss:
    """The loss closure of a Hugging Face model over a fixed list of batches.

    Each batch is a dict of tensors for ``model(**batch)``: ``input_ids`` and
    ``attention_mask``, and ``labels`` (for a causal LM they default to the
    input ids with padding masked out; a sequence classifier needs them). The
    result is the mean loss over all supervised tokens (causal LM) or examples
    (classification), split per batch so Hessian products can go batch by batch.

    The caller puts the model in eval mode (dropout would make the loss random);
    :func:`measure_sharpness` does. Works the same for PEFT models: which
    parameters count is decided by the ``params`` handed to the estimators.
    """
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty list of dicts of tensors")
    causal = is_causal_lm(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None
    prepared = [_prepare_batch(b, i, causal, device) for i, b in enumerate(batches)]

    def make_part(inputs: dict) -> LossFn:
        def part() -> Tensor:
            with _double_backward_attention():
                out = model(**inputs)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError(f"{type(model).__name__} returned no loss; are labels in the batch?")
            return loss

        return part

    return BatchSetLoss([make_part(inputs) for inputs, _ in prepared], [w for _, w in prepared])


PARAM_CHOICES = ("trainable", "all", "lora")


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
    *,
    seed: int = 0,
    max_iters: int = 20,
    tol: float = 1e-3,
    probes: int = 10,
    rho: float = 1e-3,
    seeds: int = 3,
    params: str | Sequence[Tensor] = "trainable",
) -> dict[str, float]:
    """All flatness numbers for a Hugging Face model (full or PEFT) on fixed batches.

    ``params`` is ``"trainable"`` (default; the adapters of a PEFT model),
    ``"lora"``, ``"all"``, or an explicit list of the model's tensors.

    Returns ``loss``, ``top_eigenvalue``, ``hessian_trace``, ``sharpness_worst``,
    ``sharpness_random`` and, for context, ``eigenvalue_iterations``,
    ``eigenvalue_converged`` (1.0/0.0), ``hessian_trace_stderr``, ``probes``,
    ``sharpness_random_std``, ``rho``, ``radius``, ``grad_norm``, ``param_norm``,
    ``num_params``, ``num_batches`` and wall times ``seconds_eigenvalue``,
    ``seconds_trace``, ``seconds_epsilon``, ``seconds_total``.
    """
    tensors = [p for _, p in select_parameters(model, params)] if isinstance(params, str) else list(params)
    if not tensors:
        raise ValueError("params is empty: there are no parameters to measure")
    start = time.perf_counter()
    with _measuring(model, tensors):
        loss_fn = model_loss_fn(model, batches)
        hvp = HessianVectorProduct(loss_fn, tensors)
        try:
            t0 = time.perf_counter()
            power = hessian_power_iteration(hvp, max_iters=max_iters, tol=tol, seed=seed)
            t1 = time.perf_counter()
            trace = hessian_trace_estimate(hvp, probes=probes, seed=seed)
            t2 = time.perf_counter()
        finally:
            hvp.release()
        eps = epsilon_sharpness(loss_fn, tensors, rho=rho, seeds=seeds, seed=seed)
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
        "grad_norm": eps["grad_norm"],
        "param_norm": eps["param_norm"],
        "num_params": float(sum(p.numel() for p in tensors)),
        "num_batches": float(len(loss_fn)),
        "seconds_eigenvalue": t1 - t0,
        "seconds_trace": t2 - t1,
        "seconds_epsilon": t3 - t2,
        "seconds_total": t3 - start,
    }
