"""Low-bit optimizer state (``state_bits=8`` or ``4``): DualAdam's moments as torchao's block-wise quantized
tensors, for runs that fit only with 8-bit or 4-bit optimizer state (what ``--optim adamw_torch_8bit`` gives AdamW).

- The moments are ``torchao.optim``'s quantized state tensors: per block of elements one fp32 scale and one code
  per element (8 bits, or 4 bits packed in pairs) looked up in a dynamic-tree map, signed for ``exp_avg`` and
  unsigned for ``exp_avg_sq``, as torchao's AdamW8bit/AdamW4bit hold them. torchao registers them as safe
  globals when imported, so ``optimizer.pt`` loads with ``torch.load(weights_only=True)``.
- Tensors with fewer than :data:`MIN_QUANTIZED` elements, or whose size the block does not divide, keep
  full-precision moments as without ``state_bits`` (fp32 for bf16/fp16 parameters): the rule torchao takes from
  bitsandbytes, as a block scale and a map for a few elements would save nothing.
- Each tensor takes one compiled step (``torch.compile``, CPU and CUDA) that dequantizes m and v, applies the rule
  of :mod:`dualadam_hf.schedule` (:func:`~dualadam_hf.schedule.fold`'s coefficients, computed for the group by
  :func:`~dualadam_hf.functional.coefficients`, applied by :func:`~dualadam_hf.schedule.folded_update`) and
  quantizes the new moments again. It compiles once per shape and kind of state; the first steps of a run take
  about a minute on a few CPU cores (the inductor cache shortens later runs).
- ``inverse_scale="norm"`` and ``"auto"`` find their per-tensor scales from the dequantized moments before the
  step, with :func:`~dualadam_hf.functional.held_norm_scales` as the other paths do.

torchao is an optional dependency (the ``lowbit`` extra: ``pip install ".[lowbit]"`` in a checkout, or
``pip install torchao``); it is imported on first use only.
DDP runs it as one process does. FSDP2 (DTensor parameters) is refused at the first step and DeepSpeed at train
begin, each with the reason (:func:`init_state`, ``DualAdamCallback``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .functional import StepTensors, coefficients, held_norm_scales, local, stochastic_round_to_bf16
from .schedule import Hyper, folded_update, last_blend_step

STATE_BITS = (8, 4)
# Elements per block scale, as torchao's AdamW8bit/AdamW4bit (the 4-bit map is coarser: smaller blocks).
BLOCK_SIZE = {8: 256, 4: 128}
# Smaller tensors keep fp32 moments: their block scales and per-tensor map would outweigh the saving.
MIN_QUANTIZED = 4096
INSTALL_HINT = 'pip install torchao (or pip install ".[lowbit]" in a dualadam-hf checkout)'
_MODULES = {8: ("torchao.optim.subclass_8bit", "OptimState8bit"), 4: ("torchao.optim.subclass_4bit", "OptimState4bit")}
# What importing torchao logs on builds without its CUDA extensions, and torch's notice about a registration
# inside torchao: nothing a DualAdam user can act on.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")

_state_types: dict[int, type] | None = None
_quantized: tuple[type, ...] = ()  # the same classes, for isinstance inside the compiled step
_compiled_fns: dict[Callable[..., Any], Callable[..., Any]] = {}  # each per-tensor function, compiled once


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def state_types() -> dict[int, type]:
    """{8: OptimState8bit, 4: OptimState4bit} from torchao, imported quietly on first use; an ImportError that
    says how to install it where torchao is missing."""
    global _state_types, _quantized
    if _state_types is None:
        try:
            with _quiet_import():
                found = {bits: getattr(__import__(module, fromlist=[name]), name)
                         for bits, (module, name) in _MODULES.items()}
        except ImportError as error:
            raise ImportError(f"state_bits needs torchao >= 0.18 for its quantized optimizer state: {INSTALL_HINT} "
                              f"({error})") from None
        _state_types, _quantized = found, tuple(found.values())
    return _state_types


def check_group(group: dict[str, Any], state_dtype: str | None) -> None:
    """Raise ValueError for a bad ``state_bits`` or one that another setting of the group contradicts, and
    ImportError where torchao is missing. ``state_dtype`` is the group's, resolved. ``foreach`` has no say: the
    low-bit step is its own."""
    bits = group.get("state_bits")
    if bits is None:
        return
    if isinstance(bits, bool) or bits not in STATE_BITS:
        raise ValueError(f"Invalid state_bits: {bits!r} (must be None, 8 or 4)")
    if state_dtype not in (None, "float32"):
        raise ValueError(f"state_bits={bits} quantizes the moments; it cannot be combined with "
                         f"state_dtype={group['state_dtype']!r} (drop one of them)")
    if group.get("fused"):
        raise ValueError(f"state_bits={bits} takes its own compiled step; it cannot be combined with fused=True")
    state_types()


def is_quantized(t: Any) -> bool:
    """Whether ``t`` is torchao's quantized optimizer state. Never imports torchao: a quantized tensor exists
    only once torchao is imported."""
    found = tuple(getattr(sys.modules.get(module), name, None) for module, name in _MODULES.values())
    return isinstance(t, tuple(cls for cls in found if cls is not None))


def dense(t: Tensor) -> Tensor:
    """The values a moment stands for: quantized state dequantized to fp32, other tensors as they are."""
    return t.dequantize() if is_quantized(t) else t


def _new_moment(p: Tensor, bits: int, signed: bool, fallback: torch.dtype) -> Tensor:
    block = BLOCK_SIZE[bits]
    if p.numel() >= MIN_QUANTIZED and p.numel() % block == 0:
        # The appearance dtype is the parameter's, as torchao's: torch's load_state_dict casts state to it.
        return state_types()[bits].zeros(p.shape, signed, block, p.device, dtype=p.dtype)
    return torch.zeros_like(p, dtype=fallback)


def init_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], fallback: torch.dtype) -> None:
    """A parameter's state at its first step: quantized moments where the tensor is large enough (else
    ``fallback``, fp32 for low-precision parameters) and the step counter. The optimizer adds the scale of
    ``inverse_scale="auto"``, as for any state."""
    bits = group["state_bits"]
    if p.is_complex():
        raise ValueError(f"state_bits={bits} quantizes real moments; complex parameters are not supported (train "
                         "them in another param group without state_bits)")
    if local(p) is not p:
        raise ValueError(f"state_bits={bits} does not support FSDP2 (DTensor) parameters: the full optimizer state "
                         "of a checkpoint gathers the quantized moments into collective tensors that "
                         "torch.load(weights_only=True) refuses, so the run could not resume. Use DDP, or --optim "
                         "dualadam under FSDP2.")
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = _new_moment(p, bits, True, fallback)
    state["exp_avg_sq"] = _new_moment(p, bits, False, fallback)


def _write_param(p: Tensor, value: Tensor, stochastic: bool) -> None:
    # The one place the step writes a parameter: bf16 parameters with bf16_stochastic_round are rounded up or
    # down at random (unbiased), others to nearest.
    p.copy_(stochastic_round_to_bf16(value) if stochastic else value)


def _dense_fp32(t: Tensor) -> Tensor:
    return t.dequantize() if isinstance(t, _quantized) else t.float()


def _single_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: Tensor, decay: Tensor, beta1: float,
                 beta2: float, maximize: bool, stochastic: bool) -> None:
    """One tensor's update, compiled: dequantize, :func:`~dualadam_hf.schedule.folded_update`, quantize."""
    gf = g.float()
    if maximize:
        gf = -gf
    adam, inverse, eps_c = coef.unbind()
    p_new, m_new, v_new = folded_update(p.float(), gf, _dense_fp32(m), _dense_fp32(v), beta1, beta2, adam, inverse,
                                        eps_c, decay)
    m.copy_(m_new)  # quantized state: block scales and codes of the new values
    v.copy_(v_new)
    _write_param(p, p_new, stochastic)


def _moment_norms(m: Tensor, v: Tensor, eps_c: Tensor) -> Tensor:
    """[||m/den||, ||m*den||] of one tensor's moments in fp32, den = sqrt(v) + eps*c: what the inverse share and
    the held norm read. Compiled for quantized moments, so that dequantizing fuses into the reduction instead of
    holding the tensor's moments in fp32 (a whole model's at once would take the memory the state saves)."""
    m, v = _dense_fp32(m), _dense_fp32(v)
    den = v.sqrt() + eps_c
    return torch.stack([torch.linalg.vector_norm(m / den), torch.linalg.vector_norm(m * den)])


def _coming_moment_norms(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float, eps_c: Tensor) -> Tensor:
    """:func:`_moment_norms` of the moments the coming update will leave, from the fp32 gradient ``g``."""
    return _moment_norms(_dense_fp32(m).lerp(g, 1.0 - beta1), _dense_fp32(v) * beta2 + (1.0 - beta2) * g * g, eps_c)


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    if fn not in _compiled_fns:
        # Static shapes, as torchao's step: one graph per shape and kind of state, a fixed set for a model.
        _compiled_fns[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled_fns[fn]


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    import torch._dynamo.utils  # noqa: F401 (disable_cache_limit lives there; importing torchao loads it too)

    # One graph per shape: a model has a fixed set of them, so the recompile limit would only cut a run short.
    with torch._dynamo.utils.disable_cache_limit(), warnings.catch_warnings():
        # torch asks tensor subclasses for a cache key it could use across processes; torchao's have none.
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        yield


def _norms_of_stored(fn: Callable[..., Tensor], m: Tensor, v: Tensor, *rest: Any, eps_c: float) -> Tensor:
    # Compiled where the moments are quantized, eager for the fp32 moments of small tensors; eps*c goes in as a
    # tensor, since a number would be baked into the graph and recompiled at every step.
    eps = torch.tensor(eps_c, dtype=torch.float32, device=m.device)
    with _compiling():
        return (_compiled(fn) if isinstance(m, _quantized) else fn)(m, v, *rest, eps)


def moment_norms(m: Tensor, v: Tensor, eps_c: float) -> Tensor:
    """[||m/den||, ||m*den||] of one tensor's stored moments (quantized or not), without their fp32 copies."""
    return _norms_of_stored(_moment_norms, m, v, eps_c=eps_c)


def coming_moment_norms(m: Tensor, v: Tensor, g: Tensor, eps_c: float, hyper: Hyper) -> Tensor:
    """[||m/den||, ||m*den||] of the moments the coming update will leave (``g``: the fp32 gradient, negated
    for ``maximize``), from one tensor's stored moments, without their fp32 copies."""
    return _norms_of_stored(_coming_moment_norms, m, v, g, hyper.beta1, hyper.beta2, eps_c=eps_c)


def _scales(params: Sequence[Tensor], grads: Sequence[Tensor], states: list[dict[str, Any]],
            hyper: Hyper) -> list[Tensor] | None:
    """Per-tensor factors on ``hyper.inverse_scale`` for this step: found from the dequantized moments for
    ``"norm"`` (while the blend may be on) and at the first update with a gradient for ``"auto"``."""
    def step_tensors(indices: Sequence[int]) -> StepTensors:
        return StepTensors([params[k] for k in indices], [grads[k] for k in indices],
                           [states[k]["exp_avg"] for k in indices],
                           [states[k]["exp_avg_sq"] for k in indices], [states[k]["step"] for k in indices])

    if hyper.hold_norm:
        if min(float(s["step"]) for s in states) + 1 > last_blend_step(hyper.switch_rate):
            return None  # past the blend the scale multiplies 0
        return held_norm_scales(step_tensors(range(len(params))), hyper, one_tensor=coming_moment_norms)
    if "inverse_scale" not in states[0]:
        return None
    waiting = [k for k, s in enumerate(states) if float(s["inverse_scale"]) == 0.0]
    if waiting:
        for k, scale in zip(waiting, held_norm_scales(step_tensors(waiting), hyper, one_tensor=coming_moment_norms)):
            if float(scale) > 0.0:
                states[k]["inverse_scale"] = scale.to("cpu", torch.float32)
    return [s["inverse_scale"] for s in states]


def step(opt: torch.optim.Optimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
         hyper: Hyper) -> None:
    """One update of a ``state_bits`` group's parameters that have gradients; states are created here on the
    first step (through the optimizer's ``_init_state``)."""
    states = [opt.state[p] for p in params]
    for p, state in zip(params, states):
        if len(state) == 0:
            opt._init_state(p, state, group)
    scales = _scales(params, grads, states, hyper)
    if hyper.hold_norm:
        hyper = dataclasses.replace(hyper, inverse_scale=1.0, hold_norm=False)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for k, p in enumerate(params):
        state = states[k]
        state["step"] += 1
        by_device[p.device].append(k)
    compiled = _compiled(_single_step)
    with _compiling():
        for device, indices in by_device.items():
            coef, decay = coefficients([states[k]["step"] for k in indices],
                                       None if scales is None else [scales[k] for k in indices], hyper, device)
            decay = decay.float()
            for k, row in zip(indices, coef.unbind(0)):
                p, m, v = params[k], states[k]["exp_avg"], states[k]["exp_avg_sq"]
                if p.numel() == 0:
                    continue  # nothing to update; its step still counts
                # Moments kept in fp32 (small tensors) take the same step uncompiled: a graph per small shape
                # would cost more compile time than it saves.
                fn = compiled if isinstance(m, _quantized) else _single_step
                # p.detach(): the step writes the parameter's data, never through autograd.
                stochastic = hyper.bf16_stochastic_round and p.dtype == torch.bfloat16
                fn(p.detach(), grads[k], m, v, row.detach(), decay, hyper.beta1, hyper.beta2, hyper.maximize,
                   stochastic)
