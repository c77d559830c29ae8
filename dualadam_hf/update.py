"""Which code updates which tensors: the one place where the update path is chosen, as torch's ``adam()``
chooses between its single-tensor, foreach and fused implementations.

- ``single``: :func:`~dualadam_hf.functional.single_tensor`, one tensor at a time (``foreach=False``).
- ``foreach``: :func:`~dualadam_hf.functional.foreach`, multi-tensor ops (the default off CUDA).
- ``triton``: :func:`~dualadam_hf.fused.triton_update`, the Triton kernel (``fused=True`` on CUDA; the default on one
  CUDA device with Triton).
- ``compiled``: :func:`~dualadam_hf.compiled.compiled`, torch.compile on CPU (``fused=True`` on CPU).
- ``lowbit``: :func:`~dualadam_hf.lowbit.update`, one compiled step per tensor over quantized moments (any group
  with ``state_bits``, whatever ``foreach`` says).

Around the chosen path: past the blend the update is AdamW's, so every tensor torch's fused AdamW kernel
takes goes to it (all paths but ``single``; not bf16 parameters with ``bf16_stochastic_round``, as that kernel
rounds to nearest); what the triton and compiled paths leave (non-contiguous, other dtypes) goes to foreach;
and with ``inverse_scale="norm"`` the per-tensor scales are found first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from . import functional, lowbit
from .compiled import compiled
from .functional import OneTensorNorms, StepCounts, StepTensors, held_norm_scales, local, takes_adamw_fused
from .fused import triton_supported, triton_update
from .schedule import Hyper, last_blend_step

PATHS = ("single", "foreach", "triton", "compiled", "lowbit")


def choose_path(params: Sequence[Tensor], foreach: bool | None, fused_flag: bool | None,
                state_bits: int | None = None) -> str:
    """The path for one group's parameters (a non-empty list) from the optimizer's ``foreach``/``fused`` and
    ``state_bits`` (quantized moments have a path of their own)."""
    if state_bits is not None:
        return "lowbit"
    devices = {p.device for p in params}
    device = next(iter(devices))
    if fused_flag:
        if len(devices) > 1 or device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"fused=True needs all parameters of a group on one CUDA or CPU device, got {devices}")
        return "triton" if device.type == "cuda" else "compiled"
    if foreach is False:
        return "single"
    if foreach is None and fused_flag is None and len(devices) == 1 and device.type == "cuda":
        return "triton" if triton_supported(list(params)) else "foreach"
    return "foreach"


def coming_norms(path: str) -> OneTensorNorms | None:
    """How the held norm reads one tensor's coming moments on ``path``: None where foreach ops read them
    (:func:`~dualadam_hf.functional.held_norm_scales`' batches), one tensor at a time where they are quantized."""
    return lowbit.coming_moment_norms if path == "lowbit" else None


def update(tensors: StepTensors, hyper: Hyper, path: str) -> list[Tensor] | None:
    """Apply one DualAdam update to ``tensors`` with the named path (see the module's notes). The ``lowbit``
    path returns each tensor's [||m/den||, ||m*den||] of the moments the update used (its stored moments are
    requantized, so they can no longer tell); the others return None, as their stored moments are those."""
    if not tensors.params:
        return None
    if path not in PATHS:
        raise ValueError(f"unknown update path {path!r}; one of {', '.join(PATHS)}")
    if hyper.hold_norm:
        if _blend_may_be_on(tensors, hyper):
            tensors = tensors._replace(scales=held_norm_scales(tensors, hyper, one_tensor=coming_norms(path)))
        hyper = dataclasses.replace(hyper, inverse_scale=1.0, hold_norm=False)
    if path == "lowbit":
        functional.count_step(tensors)
        return lowbit.update(tensors, hyper)
    if path == "single":
        functional.single_tensor(tensors, hyper)
        return None
    adam = _adam_phase(tensors, hyper)
    if adam and hyper.bf16_stochastic_round:
        # torch's fused AdamW rounds bf16 results to nearest: those parameters stay on the chosen path, which
        # computes a step past the blend exactly too (its inverse coefficient is 0 there).
        adam = [i for i in adam if tensors.params[i].dtype != torch.bfloat16]
    if adam:
        whole = len(adam) == len(tensors.params)
        part = tensors if whole else _part(tensors, adam, "adamw")
        functional.count_step(part)
        functional.adamw_fused(part, hyper)
        if whole:
            return None
        taken = set(adam)
        tensors = _part(tensors, [i for i in range(len(tensors.params)) if i not in taken], "blend")
    if path == "triton" or path == "compiled":
        rest = triton_update(tensors, hyper) if path == "triton" else compiled(tensors, hyper)
        if not rest:
            return None
        tensors = _part(tensors, rest, path + "-rest")
    functional.foreach(tensors, hyper)
    return None


def _part(tensors: StepTensors, indices: list[int], name: str) -> StepTensors:
    """The tensors at ``indices``, with a cache of their own inside the whole set's (kept across steps while
    the same tensors fall in the same part), so a part's launch tables are built once too."""
    part = tensors.subset(indices)
    counts = tensors.counts
    if counts is None:
        return part
    cache = counts.cache.setdefault((name, tuple(indices)), {})
    return part._replace(counts=StepCounts(None, counts.lowest, counts.highest, cache))


def _blend_may_be_on(tensors: StepTensors, hyper: Hyper) -> bool:
    """False only when the coming step of every tensor is known to be past the blend."""
    counts = tensors.counts
    if counts is not None:
        return counts.lowest + 1 <= last_blend_step(hyper.switch_rate)
    return True


def _adam_phase(tensors: StepTensors, hyper: Hyper) -> list[int]:
    """The tensors whose coming step is plain Adam and that torch's fused AdamW kernel takes. Known without
    reading a device: from the counts, or from step tensors on the host; steps on a device without counts
    are taken as in the blend (the blend paths compute any step exactly)."""
    last = last_blend_step(hyper.switch_rate)
    counts = tensors.counts
    if counts is not None:
        if counts.lowest + 1 <= last:
            return []
        candidates = range(len(tensors.params))
        eligible = counts.cache.get("adamw-eligible")
        if eligible is None:  # what p, m, v and the step allow stays put with them
            eligible = counts.cache["adamw-eligible"] = [
                i for i in candidates if takes_adamw_fused(*(local(xs[i]) for xs in tensors[:2]),
                                                           local(tensors.exp_avgs[i]), local(tensors.exp_avg_sqs[i]),
                                                           local(tensors.steps[i]))]
        # Gradients are new tensors every step: checked each time.
        grads = tensors.grads
        return [i for i in eligible if grads[i].dtype == tensors.params[i].dtype and grads[i].is_contiguous()]
    steps = tensors.steps
    return [i for i in range(len(tensors.params))
            if steps[i].device.type == "cpu" and float(steps[i]) + 1 > last
            and takes_adamw_fused(*(local(xs[i]) for xs in tensors[:4]), local(steps[i]))]
