"""Low-bit optimizer state (``state_bits=8`` or ``4``): DualAdam's moments as torchao's block-wise quantized
tensors, for runs that fit only with 8-bit or 4-bit optimizer state (what ``--optim adamw_torch_8bit`` gives AdamW).

- The moments are ``torchao.optim``'s quantized state tensors: per block of elements one fp32 scale and one code
  per element (8 bits, or 4 bits packed in pairs) looked up in a dynamic-tree map, signed for ``exp_avg`` and
  unsigned for ``exp_avg_sq``, as torchao's AdamW8bit/AdamW4bit hold them (8-bit ``exp_avg_sq`` on that map
  squared: :func:`second_moment_map`). Blocks of :data:`DEFAULT_BLOCK_SIZE` unless a group's ``block_size`` says
  otherwise. torchao registers them as safe globals when imported, so ``optimizer.pt`` loads with
  ``torch.load(weights_only=True)``.
- Tensors with fewer than :data:`MIN_QUANTIZED` elements, or whose size the block does not divide, keep
  full-precision moments as without ``state_bits`` (fp32 for bf16/fp16 parameters): the rule torchao takes from
  bitsandbytes, as a block scale and a map for a few elements would save nothing.
- The optimizer's ``lowbit`` update path (:func:`update`, chosen in :mod:`dualadam_hf.update` for any group with
  ``state_bits``): each tensor takes one compiled step (``torch.compile``, CPU and CUDA) that dequantizes m and v,
  applies the rule
  of :mod:`dualadam_hf.schedule` (:func:`~dualadam_hf.schedule.fold`'s coefficients, computed for the group by
  :func:`~dualadam_hf.functional.coefficients`, applied by :func:`~dualadam_hf.schedule.folded_update`) and
  quantizes the new moments again, returning the norms of the fp32 moments it used (the inverse share of the
  step taken). It compiles once per shape and kind of state; the first steps of a run take about a minute on a
  few CPU cores (the inductor cache shortens later runs).
- ``inverse_scale="norm"`` and ``"auto"`` find their per-tensor scales from the dequantized moments before the
  step, with :func:`~dualadam_hf.functional.held_norm_scales` as the other paths do
  (:func:`coming_moment_norms`).

Under FSDP2 (DTensor parameters on a 1-D mesh) each rank quantizes its own shard of a tensor: a quantized moment
is a plain torchao tensor over the local shard, and the block rule reads the shard (an 8192-element weight over 2
ranks is quantized, over 4 it keeps fp32 moments; ranks may decide differently for one tensor, which nothing
depends on). The step works on local shards as the other paths do, and ``inverse_scale="norm"``/``"auto"`` sum
the squared norms of the shards over the mesh (:func:`~dualadam_hf.functional.held_norm_scales`), so a 1-device
mesh runs as one process to the bit. Where the shards are whole numbers of blocks, the blocks are one process's.

Checkpoints under FSDP2 hold the quantized moments dequantized, as fp32 DTensors with their parameters' mesh,
placements, shape and stride (:func:`checkpoint_moment`, from ``DualAdam.state_dict``), and their groups say so
(:data:`SAVED_AS_FP32`). torch's checkpoint layer (``get_optimizer_state_dict``/``set_optimizer_state_dict``,
which accelerate's FSDP2 checkpoints use with ``FULL_STATE_DICT`` and ``SHARDED_STATE_DICT``) gathers, shards and
reshards each moment by its parameter's layout, which a rank's quantized shard does not carry; gathered as they
are, torchao's tensors became collective tensors that ``torch.load(weights_only=True)`` refuses. A load quantizes
them again to exactly the codes and scales they came from (:func:`requantized`), so a resumed run equals the
uninterrupted one to the bit; a checkpoint of another layout (another number of ranks, or read by one process) is
quantized as a step would. The cost: the checkpoint takes fp32 state's size (8 bytes per parameter, 4 times 8-bit
state's), and while a rank saves or loads, its moments exist in fp32 on the parameters' device next to the
quantized ones (8 more bytes per parameter of its shard, until the checkpoint layer has gathered or written them):
leave that headroom, or the first save of a run that fits only with 8-bit state runs out of memory.

torchao is an optional dependency (the ``lowbit`` extra: ``pip install ".[lowbit]"`` in a checkout, or
``pip install torchao``); it is imported on first use only.
DDP runs it as one process does, FSDP2 as above. DeepSpeed and FSDP1 are refused where the Trainer's arguments are
built (``integrations.optim_args.check_training_args``): their flat parameters join many tensors. DTensor
parameters on a mesh of more than one dimension at the first step (:func:`init_moments`) and DeepSpeed's wrapper
at train begin (``DualAdamCallback``) are refused for scripts that build the optimizer themselves.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import logging
import math
import numbers
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .functional import StepTensors, coefficients, grad_like_param, local, write_param
from .schedule import Hyper, folded_update, next_moments

STATE_BITS = (8, 4)
# Elements per block scale by default: transformers' adamw_torch_8bit / adamw_torch_4bit build torchao's AdamW8bit /
# AdamW4bit with blocks of 256 for both (torchao's own AdamW4bit defaults to 128), so the same --optim_args give
# the same state. A group's ``block_size`` sets another.
DEFAULT_BLOCK_SIZE = 256
# Smaller tensors keep fp32 moments: their block scales and per-tensor map would outweigh the saving.
MIN_QUANTIZED = 4096
# The oldest torchao whose quantized state classes (zeros, dequantize, copy_, safe globals) this module was tested on.
MIN_TORCHAO = "0.18"
INSTALL_HINT = 'pip install torchao (or pip install ".[lowbit]" in a dualadam-hf checkout)'
_MODULES = {8: ("torchao.optim.subclass_8bit", "OptimState8bit"), 4: ("torchao.optim.subclass_4bit", "OptimState4bit")}
# What importing torchao logs on builds without its CUDA extensions, and torch's notice about a registration
# inside torchao: nothing a DualAdam user can act on.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")

_state_types: dict[int, type] | None = None
# The same classes as a tuple, filled with _state_types: the compiled step and the choice of a compiled or eager
# step test isinstance against it (is_quantized, which looks the classes up in sys.modules, is for code that may
# run before torchao is imported, and that dynamo need not trace).
_quantized: tuple[type, ...] = ()
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


def _release(text: str) -> tuple[int, ...]:
    """The leading numbers of a version ("0.18.0+cpu" -> (0, 18, 0)), enough to order torchao's releases."""
    numbers_ = []
    for part in text.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers_.append(int(digits))
    return tuple(numbers_)


def _torchao_version() -> tuple[int, ...] | None:
    try:
        return _release(importlib.metadata.version("torchao"))
    except importlib.metadata.PackageNotFoundError:  # importable but not installed as a distribution (a checkout)
        return None


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
            raise ImportError(f"state_bits needs torchao >= {MIN_TORCHAO} for its quantized optimizer state: "
                              f"{INSTALL_HINT} ({error})") from None
        if (version := _torchao_version()) is not None and version < _release(MIN_TORCHAO):
            raise ImportError(f"state_bits needs torchao >= {MIN_TORCHAO} for its quantized optimizer state, found "
                              f"{'.'.join(map(str, version))}: pip install -U torchao")
        _state_types, _quantized = found, tuple(found.values())
    return _state_types


def check_group(group: dict[str, Any], state_dtype: str | None) -> None:
    """Raise ValueError for a bad ``state_bits`` or one that another setting of the group contradicts, and
    ImportError where torchao is missing. ``state_dtype`` is the group's, resolved. ``foreach`` has no say: the
    low-bit step is its own."""
    bits = group.get("state_bits")
    if bits is None:
        return
    # A whole number, not one that equals it: 8.0 is a slip (a bool too, as True == 1).
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or bits not in STATE_BITS:
        raise ValueError(f"Invalid state_bits: {bits!r} (must be None, 8 or 4)")
    if state_dtype not in (None, "float32"):
        raise ValueError(f"state_bits={bits} quantizes the moments; it cannot be combined with "
                         f"state_dtype={group['state_dtype']!r} (drop one of them)")
    if group.get("fused"):
        raise ValueError(f"state_bits={bits} takes its own compiled step; it cannot be combined with fused=True")
    size = group.get("block_size")
    # 4-bit codes are packed in pairs: a block must hold whole bytes.
    if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 2
                             or size % 2):
        raise ValueError(f"Invalid block_size: {size!r} (must be an even whole number >= 2, or None for "
                         f"{DEFAULT_BLOCK_SIZE})")
    state_types()


def check_block_size(group: dict[str, Any]) -> None:
    """A ``block_size`` without ``state_bits`` has nothing to size: refused rather than ignored."""
    if group.get("block_size") is not None and group.get("state_bits") is None:
        raise ValueError(f"block_size={group['block_size']!r} sizes the blocks of quantized moments: it needs "
                         "state_bits=8 or 4")


def block_size(group: dict[str, Any]) -> int:
    """Elements per block scale of a ``state_bits`` group."""
    return group.get("block_size") or DEFAULT_BLOCK_SIZE


def is_quantized(t: Any) -> bool:
    """Whether ``t`` is torchao's quantized optimizer state. Never imports torchao: a quantized tensor exists
    only once torchao is imported."""
    found = tuple(getattr(sys.modules.get(module), name, None) for module, name in _MODULES.values())
    return isinstance(t, tuple(cls for cls in found if cls is not None))


def dense(t: Tensor) -> Tensor:
    """The values a moment stands for: quantized state dequantized to fp32, other tensors as they are."""
    return t.dequantize() if is_quantized(t) else t


def quantizes(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether the group keeps this parameter's moments quantized (else in full precision). For a DTensor
    parameter (FSDP2) the rule reads this rank's shard, whose moments it sizes: ranks may decide differently for
    one tensor, which nothing depends on (each rank steps, saves and loads its own shard's moments)."""
    numel = local(p).numel()
    return group.get("state_bits") is not None and numel >= MIN_QUANTIZED and numel % block_size(group) == 0


def moment_problem(moment: Any, p: Tensor, group: dict[str, Any], saved_as_fp32: bool = False) -> str | None:
    """Why a saved moment cannot stand for parameter ``p``'s in a group with ``state_bits=bits`` (None: it can):
    another kind of state than this optimizer keeps for it (fp32 against 8-bit or 4-bit, another block size), or
    quantized parts that do not fit together (codes, block scales, map), which would fail at the step.
    ``saved_as_fp32``: the saved group says its quantized moments were saved dequantized (:data:`SAVED_AS_FP32`),
    so full-precision moments are this optimizer's own, to be quantized again (:func:`requantized`)."""
    kind = lambda quantized, n: f"{n}-bit moments" if quantized else "full-precision moments"
    bits, wanted = group.get("state_bits"), quantizes(p, group)
    if not is_quantized(moment):
        if not wanted or saved_as_fp32:
            return None
        return f"it holds {kind(False, 0)} where this optimizer keeps {kind(True, bits)}"
    saved_bits = next(b for b, cls in state_types().items() if isinstance(moment, cls))
    if not wanted or saved_bits != bits:
        return f"it holds {kind(True, saved_bits)} where this optimizer keeps {kind(wanted, bits)}"
    if moment.block_size != block_size(group):
        return f"its blocks hold {moment.block_size} elements, this optimizer's {block_size(group)}"
    numel = local(p).numel()
    parts = {"codes": numel * bits // 8, "block scales": numel // block_size(group), "map": 2**bits}
    found = {"codes": moment.codes.numel(), "block scales": moment.scale.numel(), "map": moment.qmap.numel()}
    wrong = [f"{found[k]} {k} for {n}" for k, n in parts.items() if found[k] != n]
    return f"its quantized parts do not fit ({', '.join(wrong)})" if wrong else None


def second_moment_map(unsigned_map: Tensor) -> Tensor:
    """The 8-bit ``exp_avg_sq``'s code map: torchao's unsigned map squared, so that a code stands for sqrt(v) on
    torchao's map. With torchao's map itself, a v below 1.6e-7 of its block's largest rounds to 0 while m, whose
    signed map reaches as far down, keeps a value: on row-sparse gradients of wide-ranging scale (an untied
    embedding) m / (sqrt(v) + eps) then jumped by up to 1/eps and moved parameters 20 to 40 times further than
    fp32 state. Squared, v's range reaches as far down as m's. ``dequantize()`` still returns v and the map is
    saved with the state, so a checkpoint's ``exp_avg_sq`` keeps its meaning. (torchao's 4-bit map for v has no
    zero code, and squaring it makes dense 4-bit runs drift further: 4-bit keeps torchao's map.)"""
    return unsigned_map.square()


def _new_moment(p: Tensor, group: dict[str, Any], signed: bool, fallback: torch.dtype) -> Tensor:
    """Zero moments for ``p``: quantized over its local shard (a DTensor's moments are this rank's, a plain
    quantized tensor), else ``fallback`` like ``p`` (a DTensor keeps its placement, as fp32 state does)."""
    bits, block = group["state_bits"], block_size(group)
    if not quantizes(p, group):
        return torch.zeros_like(p, dtype=fallback)
    shard = local(p)
    # The appearance dtype is the parameter's, as torchao's: torch's load_state_dict casts state to it.
    moment = state_types()[bits].zeros(shard.shape, signed, block, shard.device, dtype=p.dtype)
    if bits == 8 and not signed:
        moment.qmap.copy_(second_moment_map(moment.qmap))
    return moment


def init_moments(p: Tensor, state: dict[str, Any], group: dict[str, Any], fallback: torch.dtype) -> None:
    """A parameter's moments at its first step: quantized where the tensor (a DTensor's local shard) is large
    enough, else ``fallback`` (fp32 for low-precision parameters). The optimizer adds the step counter and the
    scale of ``inverse_scale="auto"``, as for any state."""
    bits = group["state_bits"]
    if p.is_complex():
        raise ValueError(f"state_bits={bits} quantizes real moments; complex parameters are not supported (train "
                         "them in another param group without state_bits)")
    if (mesh := getattr(p, "device_mesh", None)) is not None and mesh.ndim != 1:
        raise ValueError(f"state_bits={bits} supports DTensor parameters on a 1-D device mesh (FSDP2), not on a "
                         f"{mesh.ndim}-D one (HSDP, tensor parallelism): inverse_scale 'norm' and 'auto' sum norms "
                         "over one mesh dimension, and quantized shards over several have not been run. Use "
                         "--optim dualadam there.")
    state["exp_avg"] = _new_moment(p, group, True, fallback)
    state["exp_avg_sq"] = _new_moment(p, group, False, fallback)


# A saved param group's key: its quantized moments were saved dequantized, as fp32 DTensors over their
# parameters' shards (see the module's notes), for a load to quantize again.
SAVED_AS_FP32 = "lowbit_moments_saved_as_fp32"
# Elements requantized at once on a load: bounds the integer temporaries of the code search.
_REQUANTIZE_CHUNK = 1 << 22
# Scale candidates around the one read back from a block's values: (fl(q*s)/q) is within an ulp or two of s.
_SCALE_ULPS = (0, 1, -1, 2, -2)


def saves_as_fp32(group: dict[str, Any]) -> bool:
    """Whether a group's checkpoints hold its quantized moments dequantized: a ``state_bits`` group of DTensor
    parameters (FSDP2), whose moments the checkpoint layer shards or gathers by the parameter's layout."""
    return group.get("state_bits") is not None and any(local(p) is not p for p in group["params"])


def checkpoint_moment(moment: Tensor, p: Tensor) -> Tensor:
    """What a checkpoint holds for one moment of DTensor parameter ``p``: a quantized moment (this rank's shard)
    as an fp32 DTensor with ``p``'s mesh, placements, shape and stride; other moments (DTensors already) as they
    are."""
    if not is_quantized(moment):
        return moment
    from torch.distributed.tensor import DTensor

    # shape and stride given: shards may differ in size across ranks (a first dimension the ranks do not divide).
    return DTensor.from_local(moment.dequantize(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def requantized(values: Tensor, p: Tensor, group: dict[str, Any], signed: bool) -> Tensor:
    """``p``'s quantized moment (over its local shard) holding the saved fp32 ``values`` (a DTensor like ``p``,
    or the whole tensor): each block that :func:`checkpoint_moment` dequantized from this block layout gets back
    its codes and a scale that dequantize to exactly the saved values, so a resumed run steps from the moments
    the uninterrupted one had; other blocks (a checkpoint of another layout) are quantized as a step would."""
    moment = _new_moment(p, group, signed, torch.float32)
    shard = _shard_like(values, p).to(device=moment.device, dtype=torch.float32).reshape(-1, moment.block_size)
    quantize = _quantizer(moment)
    codes, scales = [], []
    for blocks in shard.split(max(1, _REQUANTIZE_CHUNK // moment.block_size)):
        chunk_codes, chunk_scales = _exact_codes(blocks, moment.qmap, quantize)
        codes.append(chunk_codes)
        scales.append(chunk_scales)
    flat = torch.cat(codes).view(-1)
    moment.codes.copy_(flat.view_as(moment.codes) if moment.codes.numel() == flat.numel()
                       else (flat[::2] << 4) | flat[1::2])  # 4 bits: packed in pairs, as torchao packs them
    moment.scale.copy_(torch.cat(scales))
    return moment


def _shard_like(values: Tensor, p: Tensor) -> Tensor:
    """This rank's part of ``values`` in ``p``'s layout: the local shard of a DTensor (redistributed if its
    placements differ), the matching chunk of a whole tensor given for a DTensor ``p``, else ``values``."""
    if local(p) is p or local(values) is not values:
        return grad_like_param(p, values)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds the whole tensor and takes its own chunk, without a collective.
    return local(distribute_tensor(values, p.device_mesh, p.placements, src_data_rank=None))


def _quantizer(moment: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    return quantize_8bit_with_qmap if isinstance(moment, state_types()[8]) else quantize_4bit_with_qmap


def _exact_codes(blocks: Tensor, qmap: Tensor, quantize: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(codes, scales) of ``blocks`` [n, block]. Quantizing dequantized values afresh does not give their codes
    back: torchao scales a block by its largest magnitude, which its signed maps reach as +1 but not as -1 (the
    lowest code is about -0.993), so a block whose largest moment was negative would be scaled anew. The scale is
    read back instead (the largest value over the map's top, or the lowest over its bottom), tried with its
    neighbouring floats, and kept per block where codes and scale dequantize to exactly ``blocks``; torchao's own
    quantization where none does."""
    own = blocks.abs().amax(-1).clip(1e-12)  # torchao's scale_tensor
    codes, scales = quantize(blocks / own[:, None], qmap), own
    guess = blocks.amax(-1) / qmap[-1]
    if qmap[0] < 0:
        guess = torch.maximum(guess, blocks.amin(-1) / qmap[0])
    guess = guess.clip(1e-12)
    # The most likely candidate is tried last, so that where several are exact it is the one kept.
    for ulps in reversed(_SCALE_ULPS):
        scale = _ulps_away(guess, ulps)
        tried = quantize(blocks / scale[:, None], qmap)
        exact = (qmap[tried.int()] * scale[:, None] == blocks).all(-1)
        codes = torch.where(exact[:, None], tried, codes)
        scales = torch.where(exact, scale, scales)
    return codes, scales


def _ulps_away(x: Tensor, ulps: int) -> Tensor:
    toward = torch.full_like(x, math.inf if ulps > 0 else 0.0)
    for _ in range(abs(ulps)):
        x = torch.nextafter(x, toward)
    return x


def _dense_fp32(t: Tensor) -> Tensor:
    return t.dequantize() if isinstance(t, _quantized) else t.float()


def _single_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: Tensor, decay: Tensor, beta1: float,
                 beta2: float, maximize: bool, stochastic_round: bool) -> Tensor:
    """One tensor's update, compiled: dequantize, :func:`~dualadam_hf.schedule.folded_update`, quantize. Returns
    [||m/den||, ||m*den||] of the fp32 moments the update used (before they are quantized again): the
    diagnostics of the step taken, which the stored codes can no longer tell exactly."""
    gf = g.float()
    if maximize:
        gf = -gf
    adam, inverse, eps_c = coef.unbind()
    p_new, m_new, v_new = folded_update(p.float(), gf, _dense_fp32(m), _dense_fp32(v), beta1, beta2, adam, inverse,
                                        eps_c, decay)
    m.copy_(m_new)  # quantized state: block scales and codes of the new values
    v.copy_(v_new)
    write_param(p, p_new, stochastic_round)
    return _fp32_norms(m_new, v_new, eps_c)


def _fp32_norms(m: Tensor, v: Tensor, eps_c: Tensor) -> Tensor:
    den = v.sqrt() + eps_c
    return torch.stack([torch.linalg.vector_norm(m / den), torch.linalg.vector_norm(m * den)])


def _moment_norms(m: Tensor, v: Tensor, eps_c: Tensor) -> Tensor:
    """[||m/den||, ||m*den||] of one tensor's moments in fp32, den = sqrt(v) + eps*c: what the inverse share and
    the held norm read. Compiled for quantized moments, so that dequantizing fuses into the reduction instead of
    holding the tensor's moments in fp32 (a whole model's at once would take the memory the state saves)."""
    return _fp32_norms(_dense_fp32(m), _dense_fp32(v), eps_c)


def _coming_moment_norms(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float, eps_c: Tensor) -> Tensor:
    """:func:`_moment_norms` of the moments the coming update will leave, from the fp32 gradient ``g``."""
    return _moment_norms(*next_moments(_dense_fp32(m), _dense_fp32(v), g, beta1, beta2), eps_c)


def _compile_once(fn: Callable[..., Any]) -> Callable[..., Any]:
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
        # Building the first graph imports torch.utils.mkldnn, which warns that torch.jit.script_method is
        # deprecated: torch's own doing, and under -W error (PYTHONWARNINGS=error) it would end the run.
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
        yield


def _norms_of_stored(fn: Callable[..., Tensor], m: Tensor, v: Tensor, *rest: Any, eps_c: float) -> Tensor:
    # Compiled where the moments are quantized, eager for the fp32 moments of small tensors; eps*c goes in as a
    # tensor, since a number would be baked into the graph and recompiled at every step. Local shards: the
    # fp32 moments of a DTensor parameter are DTensors too, its gradient already a local shard.
    m, v = local(m), local(v)
    eps = torch.tensor(eps_c, dtype=torch.float32, device=m.device)
    with _compiling():
        return (_compile_once(fn) if isinstance(m, _quantized) else fn)(m, v, *rest, eps)


def moment_norms(m: Tensor, v: Tensor, eps_c: float) -> Tensor:
    """[||m/den||, ||m*den||] of one tensor's stored moments (quantized or not), without their fp32 copies."""
    return _norms_of_stored(_moment_norms, m, v, eps_c=eps_c)


def coming_moment_norms(m: Tensor, v: Tensor, g: Tensor, eps_c: float, hyper: Hyper) -> Tensor:
    """[||m/den||, ||m*den||] of the moments the coming update will leave (``g``: the fp32 gradient, negated
    for ``maximize``), from one tensor's stored moments, without their fp32 copies."""
    return _norms_of_stored(_coming_moment_norms, m, v, g, hyper.beta1, hyper.beta2, eps_c=eps_c)


def update(tensors: StepTensors, hyper: Hyper) -> list[Tensor]:
    """One update of a ``state_bits`` group's tensors, their steps already counted: one compiled step per tensor
    with quantized moments, the same step uncompiled for the fp32 moments of small tensors (a graph per small
    shape would cost more compile time than it saves). Returns each tensor's [||m/den||, ||m*den||] of the
    moments the update used (a zero pair for an empty tensor), for :func:`~dualadam_hf.diagnostics.update_norms`."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for k, p in enumerate(tensors.params):
        by_device[p.device].append(k)
    norms: list[Tensor] = [torch.zeros(2)] * len(tensors.params)
    compiled = _compile_once(_single_step)
    with _compiling():
        for device, indices in by_device.items():
            scales = None if tensors.scales is None else [tensors.scales[k] for k in indices]
            coef, decay = coefficients([tensors.steps[k] for k in indices], scales, hyper, device)
            decay = decay.float()
            for k, row in zip(indices, coef.unbind(0)):
                # Local shards under FSDP2 (DTensor parameters): the step is element-wise and each rank's
                # quantized moments cover its own shard.
                p, m = local(tensors.params[k]), local(tensors.exp_avgs[k])
                if p.numel() == 0:
                    continue  # nothing to update (an empty shard too); its step still counts
                fn = compiled if isinstance(m, _quantized) else _single_step
                g = grad_like_param(tensors.params[k], tensors.grads[k])
                # p.detach(): the step writes the parameter's data, never through autograd.
                norms[k] = fn(p.detach(), g, m, local(tensors.exp_avg_sqs[k]), row.detach(), decay, hyper.beta1,
                              hyper.beta2, hyper.maximize, hyper.bf16_stochastic_round)
    return norms
