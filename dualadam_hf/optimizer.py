"""DualAdam and InvAdam: thin Optimizer shells over ``dualadam_hf.functional``.

The classes validate hyperparameters, create state lazily per parameter and hand the tensors to one
of the update paths. The step counter lives in each parameter's state (never on the optimizer or in a
param group), so a resumed run continues bias correction and the blend exactly, and DeepSpeed ZeRO-3,
which calls ``step()`` once per sub-group, cannot over-count.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import diagnostics, lowbit
from .functional import LOW_PRECISION, StepCounts, StepTensors, held_norm_scales, local
from .schedule import Hyper, blend_weight, switch_rate_from_fraction, switch_rate_from_steps
from .update import choose_path, coming_norms, update

DEFAULT_SWITCH_RATE = 0.01
BLEND_KEYS = ("switch_rate", "blend_steps", "blend_fraction")
AUTO = "auto"
NORM = "norm"
INVERSE_SCALE_NAMES = (AUTO, NORM)
# Cached operand sets per optimizer: one per pattern of missing gradients (ZeRO-3: per sub-group).
_MAX_OPERAND_SETS = 1024

_logger = logging.getLogger(__name__)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Every state has these, and every group the group keys; a saved state without them is another optimizer's.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
STATE_KEYS = ("step", *MOMENT_KEYS)
DUALADAM_GROUP_KEYS = ("betas", "eps", "switch_rate")
# The settings a state was made under and only means under: a load refuses a state saved under others (torch's
# optimizers would adopt the saved ones silently, and a resumed run would train with settings nobody chose).
# The kind of state among them is never converted on a load, only refused.
STATE_KIND_SETTINGS = ("state_dtype", "state_bits", "block_size")
BINDING_SETTINGS = ("betas", "eps", "weight_decay", "maximize", "inverse_scale", *STATE_KIND_SETTINGS,
                    "bf16_stochastic_round")
# A group key of saved states only: how many of the group's parameters had state, so that a state deleted from
# the checkpoint (its parameter would restart bias correction and the blend) is seen at load.
STATEFUL_KEY = "params_with_state"
# A tensor's own factor on the group's inverse_scale, found by inverse_scale="auto" at its first update and kept in
# its state. (Checkpoints written before it had its own name keep it under "inverse_scale": read as this.)
CALIBRATED_SCALE = "calibrated_scale"
_OLD_CALIBRATED_SCALE = "inverse_scale"

_STATE_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _is_number(value: Any) -> bool:
    # Python counts a bool as an int, but True where a rate belongs is a slip, not 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def invadam_refusal(blend: Iterable[str], name: str = "InvAdam") -> str:
    """Why InvAdam refuses the blend settings ``blend`` (names, or name=value), wherever they are given."""
    return f"{name} holds the blend weight at 1 and takes no {', '.join(blend)}"


def _warn_inverse_only(where: str, stacklevel: int) -> None:
    """DualAdam with switch_rate 0 is InvAdam under another name: say so wherever such a setting enters."""
    warnings.warn(f"{where} holds the blend weight at 1 for the whole run: that is InvAdam, the inverse rule alone, "
                  "not plain Adam (use InvAdam to say so).", UserWarning, stacklevel=stacklevel + 1)


def _warn_updates_nothing(stacklevel: int) -> None:
    """InvAdam with inverse_scale 0: its only part is scaled away, whether by the defaults or by a group."""
    warnings.warn("InvAdam(inverse_scale=0) updates nothing: its only part is the inverse one, scaled by 0.",
                  UserWarning, stacklevel=stacklevel + 1)


def check_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group (or of the defaults)."""
    lr, betas = group["lr"], group["betas"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: a tensor of shape {tuple(lr.shape)} (lr must be a number or a "
                             "one-element tensor)")
        lr = lr.item()
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(map(_is_number, betas)):
        raise ValueError(f"betas must be two numbers (beta1, beta2), got {betas!r}")
    rate, fraction, scale = group["switch_rate"], group.get("blend_fraction"), group["inverse_scale"]
    # Each test runs only on a number (and() stops first), so a string or None is named, not compared.
    # The update runs in float32: a rate float32 cannot hold would only fail (as inf) at the first step.
    held = f"a number >= 0 that float32 holds (at most {FLOAT32_MAX:.4g})"
    checks = [("learning rate", group["lr"], _is_number(lr) and 0.0 <= lr <= FLOAT32_MAX, held)]
    checks += [(f"beta{i + 1}", beta, 0.0 <= beta < 1.0, "in [0, 1)") for i, beta in enumerate(betas)]
    checks += [(name, group[name], _is_number(group[name]) and 0.0 <= group[name] <= FLOAT32_MAX, held)
               for name in ("eps", "weight_decay")]
    # The decoupled decay multiplies each parameter by 1 - lr*weight_decay: past 1 it flips their signs.
    decay_ok = not (_is_number(lr) and _is_number(group["weight_decay"])) or lr * group["weight_decay"] <= 1.0
    checks += [("weight_decay", group["weight_decay"], decay_ok, "at most 1/lr (each step multiplies the parameters "
                "by 1 - lr*weight_decay)")]
    checks += [("switch_rate", rate, rate is None or (_is_number(rate) and 0.0 <= rate <= 1.0), "in [0, 1]"),
               ("blend_fraction", fraction, fraction is None or (_is_number(fraction) and 0.0 < fraction <= 1.0),
                "in (0, 1]"),
               ("inverse_scale", scale, scale in INVERSE_SCALE_NAMES if isinstance(scale, str)
                else _is_number(scale) and 0 <= scale < math.inf, "a number >= 0, 'auto' or 'norm'")]
    for name, value, ok, rule in checks:
        if not ok:
            hint = ", not a bool" if isinstance(value, bool) else ""
            raise ValueError(f"Invalid {name}: {value!r} (must be {rule}{hint})")
    # Flags are booleans: "no" or 0.0 in a flag's place is a slip (and "no" is true).
    for flag, default, may_be_none in (("maximize", False, False), ("bf16_stochastic_round", False, False),
                                       ("skip_nonfinite", True, False), ("foreach", None, True), ("fused", None, True)):
        value = group.get(flag, default)
        if not (isinstance(value, bool) or (may_be_none and value is None)):
            raise ValueError(f"Invalid {flag}: {value!r} (must be {'None, ' if may_be_none else ''}True or False)")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("foreach and fused cannot both be True")
    lowbit.check_block_size(group)
    lowbit.check_group(group, resolve_state_dtype(group.get("state_dtype")))


def resolve_state_dtype(state_dtype: torch.dtype | str | None) -> str | None:
    """None, "float32" or "bfloat16" (kept as a string so checkpoints hold no torch objects)."""
    name = None if state_dtype is None else str(state_dtype).removeprefix("torch.")
    if name is not None and name not in _STATE_DTYPE_ALIASES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (must be None, float32 or bfloat16; None keeps fp32 "
                         "moments for bf16/fp16 params and the param dtype otherwise)")
    return None if name is None else _STATE_DTYPE_ALIASES[name]


def resolve_blend(switch_rate: float | None, blend_steps: int | None,
                  blend_fraction: float | None) -> tuple[float | None, float | None]:
    """(switch_rate, blend_fraction) from the three ways to state the blend; at most one may be given."""
    given = [n for n, v in zip(BLEND_KEYS, (switch_rate, blend_steps, blend_fraction)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"Give only one of switch_rate, blend_steps, blend_fraction; got {', '.join(given)}")
    for name, value in (("switch_rate", switch_rate), ("blend_fraction", blend_fraction)):
        if value is not None and not _is_number(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a number)")
    if blend_steps is not None:
        return switch_rate_from_steps(blend_steps), None
    if blend_fraction is not None:
        # Resolved by set_total_steps() once the run length is known.
        return None, float(blend_fraction)
    return (DEFAULT_SWITCH_RATE if switch_rate is None else float(switch_rate)), None


class _GroupOperands:
    """The operands of one param group's step, kept across steps.

    It covers the group's parameters that have gradients. It holds their parameters and moments, the
    chosen update path, and one float32 vector of their step counters on the parameters' device. Each
    ``state["step"]`` is a view into that vector, so one ``add_`` counts a step for all. It also holds the
    lowest and highest step, so the host knows them without reading the device.

    It is built at the first step of that set of parameters. Each step checks :meth:`still_holds` in a few
    C-speed passes; it is rebuilt when that fails: after ``load_state_dict``, when a parameter or a state
    tensor moved, or when the group's ``foreach`` or ``fused`` changed.
    """

    def __init__(self, opt: DualAdam, group: dict[str, Any], params: list[Tensor]):
        self.states = [opt.state[p] for p in params]
        for p, state in zip(params, self.states):
            if len(state) == 0:
                opt._init_state(p, state, group)
        devices = {p.device for p in params}
        device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        vector = torch.stack([state["step"].detach().to("cpu", torch.float32) for state in self.states])
        values = vector.tolist()
        vector = vector.to(device)
        for k, state in enumerate(self.states):
            state["step"] = vector[k]
        self.params = params
        self.real_params = [_real(p) for p in params]
        self.complex = any(p.is_complex() for p in params)
        self.exp_avgs = [_real(state["exp_avg"]) for state in self.states]
        self.exp_avg_sqs = [_real(state["exp_avg_sq"]) for state in self.states]
        self.steps = [state["step"] for state in self.states]
        self.flat_state = [t for state in self.states for t in _PLAN_KEYS(state)]
        self.addresses = [local(p).data_ptr() for p in params]
        self.flags = (group.get("foreach"), group.get("fused"), group.get("state_bits"))
        self.path = choose_path(params, *self.flags)
        self.scales = None
        if group["inverse_scale"] == AUTO:
            # The kernel reads the calibrated scales on the device (no host-to-device copy in a step).
            self.scale_device = device if self.path == "triton" else torch.device("cpu")
            for state in self.states:
                state[CALIBRATED_SCALE] = state[CALIBRATED_SCALE].to(self.scale_device)
            self.scales = [state[CALIBRATED_SCALE] for state in self.states]
        self.uncalibrated = [k for k, scale in enumerate(self.scales or []) if float(scale) == 0.0]
        self.counts = StepCounts(vector, int(min(values)), int(max(values)), {})
        self.version = vector._version

    def still_holds(self, state: dict[Tensor, dict[str, Any]], group: dict[str, Any]) -> bool:
        """Whether nothing these operands rely on has moved (checked every step, in C-speed passes): the
        parameters' addresses (``p.data = ...`` moves one), the state dicts and their tensors (a reset or
        a replaced moment), and the group's path flags."""
        return ([local(p).data_ptr() for p in self.params] == self.addresses
                and all(map(operator.is_, map(state.__getitem__, self.params), self.states))
                and all(map(operator.is_, itertools.chain.from_iterable(map(_PLAN_KEYS, self.states)),
                            self.flat_state))
                and (group.get("foreach"), group.get("fused"), group.get("state_bits")) == self.flags)

    def tensors(self, grads: list[Tensor]) -> StepTensors:
        """This step's operands; the host's step range moves with the count. A write into the steps from
        outside (``state["step"].fill_(n)``) shows in the vector's version counter: the range is then read
        again (one read of the device)."""
        vector = self.counts.vector
        if vector._version != self.version:
            values = vector.tolist()
            self.counts = self.counts._replace(lowest=int(min(values)), highest=int(max(values)))
        if self.complex:
            grads = [_real(g) for g in grads]
        tensors = StepTensors(self.real_params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.scales,
                              self.counts)
        counts = self.counts
        self.counts = counts._replace(lowest=counts.lowest + 1, highest=counts.highest + 1)
        return tensors

    def settle(self) -> None:
        """After the update: the steps as the update left them are the ones the host knows."""
        self.version = self.counts.vector._version


_PLAN_KEYS = operator.itemgetter("exp_avg", "exp_avg_sq", "step")


def _highest(steps: list[Any]) -> float | None:
    """The largest of these step counters (None if there are none), read from each device once: the Trainer
    logs the blend at every logging step, and a read per counter would wait on the GPU once per parameter."""
    on_device: dict[torch.device, list[Tensor]] = {}
    numbers = []
    for step in steps:
        if isinstance(step, Tensor):
            on_device.setdefault(step.device, []).append(step.detach())
        else:
            numbers.append(float(step))
    numbers += [torch.stack(counters).max().item() for counters in on_device.values()]
    return max(numbers) if numbers else None


def _real(t: Tensor) -> Tensor:
    # Complex tensors are updated as pairs of reals, as torch's Adam does.
    return torch.view_as_real(t) if t.is_complex() else t


class DualAdam(Optimizer):
    r"""DualAdam (arXiv 2603.07122): Adam blended with inverse Adam, annealing to plain Adam.

    Per element, at the parameter's own step ``t``, with Adam's bias-corrected ``mh`` and
    ``d = sqrt(v_hat) + eps``::

        u = (1 - r) * mh / d  +  r * s * mh * d        r = 1 - t * switch_rate, then 0 (plain Adam)
        p = p - lr * weight_decay * p - lr * u

    The full rule is in :mod:`dualadam_hf.schedule` and docs/optimizer.md. The step counter lives in each
    parameter's state, so a resumed run continues the blend and the bias correction exactly.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate, a number or a tensor (default 1e-3).
        betas: Adam's moment coefficients (beta1, beta2) (default (0.9, 0.999)).
        eps: added to sqrt(v_hat) (default 1e-8).
        weight_decay: decoupled weight decay, scaled by lr, AdamW style (default 0).
        switch_rate: the paper's rate: the blend lasts about ``1 / switch_rate`` optimizer steps
            (default None: 0.01 when neither ``blend_steps`` nor ``blend_fraction`` is given). Give at most
            one of ``switch_rate``, ``blend_steps``, ``blend_fraction``.
        blend_steps: ``N`` sets ``switch_rate = 1/N``: steps 1 to N-1 carry the inverse part, step N on is
            plain Adam (default None).
        blend_fraction: the blend's length as a fraction of the run, resolved by :meth:`set_total_steps`,
            which the Trainer integration calls (default None).
        inverse_scale: ``s``. 1 is the paper's rule; another number scales the inverse part; ``"auto"``
            calibrates one scale per tensor at its first update (the inverse part's norm matched to Adam's
            there, then kept); ``"norm"`` sets it at every step so that the inverse part's norm equals the
            Adam part's, holding the inverse part at strength r throughout; 0 leaves only the Adam part, a
            linear warmup of Adam over the blend (default 1).
        maximize: maximize the objective instead of minimizing it (default False).
        foreach: ``False`` takes the single-tensor path. ``True`` and the default, None, take multi-tensor
            ops where no single-pass path runs.
        fused: ``True`` takes the device's single-pass path (Triton on CUDA, torch.compile on CPU). The
            default, None, lets CUDA parameters take the Triton kernel when Triton is installed.
        state_dtype: ``"bfloat16"`` keeps bf16 moments. The default, None, keeps fp32 moments for bf16/fp16
            parameters and the parameters' dtype otherwise.
        bf16_stochastic_round: write bf16 parameters back from the fp32 update with stochastic rounding, so
            that on average updates below half a bf16 ulp of the weight are kept (round-to-nearest drops
            them). For pure-bf16 training without fp32 master weights; no effect on other dtypes
            (default False).
        state_bits: 8 or 4 keeps the moments as torchao's block-wise quantized 8-bit or 4-bit state (about 2
            or 1 bytes per parameter instead of 8), updated by one compiled step per tensor; tensors under 4096
            elements stay fp32. Needs torchao (the ``lowbit`` extra) (see :mod:`dualadam_hf.lowbit`).
            The default, None, keeps full-precision moments.
        block_size: elements per block scale of quantized moments (``state_bits``); the default, None, is 256, as
            transformers' ``adamw_torch_8bit`` / ``adamw_torch_4bit`` (``--optim_args block_size=...``).
        skip_nonfinite: a tensor whose gradient holds NaN or inf skips its step, its parameter, moments and step
            counter kept as they were (such an element would poison the moments for good), counted in
            ``nonfinite_skips`` and warned about once. Costs one norm of each gradient per step (one more read
            of the gradients) and one read of the host; False applies every step as it comes (default True).

    Train with gradient clipping: the inverse part grows like g*|g|.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_rate: float | None = None,
        *,
        blend_steps: int | None = None,
        blend_fraction: float | None = None,
        inverse_scale: float | str = 1.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
        bf16_stochastic_round: bool = False,
        state_bits: int | None = None,
        block_size: int | None = None,
        skip_nonfinite: bool = True,
    ) -> None:
        switch_rate, blend_fraction = resolve_blend(switch_rate, blend_steps, blend_fraction)
        if switch_rate == 0.0 and not isinstance(self, InvAdam):
            _warn_inverse_only("DualAdam(switch_rate=0)", stacklevel=2)
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay,
            switch_rate=switch_rate, blend_fraction=blend_fraction, inverse_scale=inverse_scale,
            maximize=maximize, foreach=foreach, fused=fused, state_dtype=resolve_state_dtype(state_dtype),
            bf16_stochastic_round=bf16_stochastic_round, state_bits=state_bits, block_size=block_size,
            skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)
        self.nonfinite_skips = 0  # tensor steps skipped for a non-finite gradient (see skip_nonfinite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its hyperparameters as the constructor checks the defaults. The blend may be
        given as ``switch_rate``, ``blend_steps`` or ``blend_fraction`` (one of them), as to the constructor; a
        group that states its blend takes none of the defaults' (``None`` states nothing)."""
        own_rate = None
        if any(key in param_group for key in BLEND_KEYS):
            # The group's blend replaces the defaults' whole: a group's switch_rate that kept the defaults'
            # blend_fraction would be overwritten by set_total_steps().
            blend = [param_group.get(key) for key in BLEND_KEYS]
            param_group = {key: value for key, value in param_group.items() if key not in BLEND_KEYS}
            if any(value is not None for value in blend):
                own_rate, param_group["blend_fraction"] = resolve_blend(*blend)
                param_group["switch_rate"] = own_rate
        super().add_param_group(param_group)  # fills the defaults into param_group
        group = self.param_groups[-1]
        try:
            group["state_dtype"] = resolve_state_dtype(group.get("state_dtype"))
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
            check_group(group)
        except (ValueError, ImportError):  # ImportError: state_bits without torchao
            self.param_groups.pop()
            raise
        if own_rate == 0.0 and not isinstance(self, InvAdam):
            _warn_inverse_only("A DualAdam param group with switch_rate=0", stacklevel=2)

    def set_total_steps(self, total_steps: int) -> None:
        """Resolve ``blend_fraction`` against the run's number of optimizer steps."""
        for group in self.param_groups:
            if group.get("blend_fraction") is not None:
                group["switch_rate"] = switch_rate_from_fraction(group["blend_fraction"], total_steps)

    def hyper(self, group: dict[str, Any]) -> Hyper:
        """The group's hyperparameters as the update paths take them."""
        if group.get("switch_rate") is None:
            raise RuntimeError("DualAdam was given blend_fraction but does not know the run length: call "
                               "optimizer.set_total_steps(total_optimizer_steps) before the first step "
                               "(the Trainer integration does this for you).")
        (beta1, beta2), scale = group["betas"], group["inverse_scale"]
        return Hyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     switch_rate=group["switch_rate"],
                     inverse_scale=1.0 if scale in INVERSE_SCALE_NAMES else float(scale),
                     maximize=group["maximize"], hold_norm=scale == NORM,
                     bf16_stochastic_round=group.get("bf16_stochastic_round", False))

    def current_step(self) -> int:
        """The largest per-parameter step taken so far (0 before the first step)."""
        highest = _highest([s["step"] for s in self.state.values() if "step" in s])
        return 0 if highest is None else int(highest)

    def blend_weight(self, group_index: int = 0) -> float:
        """Blend weight of the most recent step of ``param_groups[group_index]`` (before any: step 1's)."""
        group = self.param_groups[group_index]
        if group.get("switch_rate") is None:
            return 0.0  # blend_fraction not resolved yet, so no step has been taken
        highest = _highest([self.state[p]["step"] for p in group["params"] if "step" in self.state.get(p, {})])
        # DeepSpeed ZeRO-3 puts a sub-group's partition in params only during its step(); the state keeps them.
        step = highest if highest is not None else (0 if group["params"] else self.current_step())
        return float(blend_weight(max(step, 1), group["switch_rate"]))

    def inverse_share(self) -> float:
        """||r*s*mh*d|| / (||(1-r)*mh/d|| + ||r*s*mh*d||) of the latest update over all parameters.

        Read from the state: one pass over it when called, nothing otherwise. 0 before the first step and
        after the blend. Under sharded engines (ZeRO, FSDP2) it covers this process's shard.
        """
        norms, seen = [(0.0, 0.0)], set()
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"] if "step" in self.state.get(p, {})]
            seen.update(map(id, states))
            if states:
                norms.append(self._update_norms(states, group))
        # DeepSpeed ZeRO-3 empties the groups' params between steps; the groups share one rule there.
        orphans = [s for s in self.state.values() if "step" in s and id(s) not in seen]
        if orphans:
            norms.append(self._update_norms(orphans, self.param_groups[0]))
        return diagnostics.inverse_share(sum(a for a, _ in norms), sum(b for _, b in norms))

    def _update_norms(self, states: list[dict[str, Any]], group: dict[str, Any]) -> tuple[float, float]:
        scales = [s[CALIBRATED_SCALE] for s in states] if CALIBRATED_SCALE in states[0] else None
        one_tensor = self._stepped_norms if group.get("state_bits") is not None else None
        return diagnostics.update_norms([_real(s["exp_avg"]) for s in states], [_real(s["exp_avg_sq"]) for s in states],
                                        [s["step"] for s in states], self.hyper(group), scales, one_tensor)

    def _finite_only(self, group: dict[str, Any], params: list[Tensor],
                     grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters whose gradients are finite, with their gradients. A non-finite gradient element would
        leave NaN or inf in the moments for good (with low-bit state, in a whole block's), so that tensor's step
        is skipped: its parameter, moments and step counter stay as they were. Each skip is counted
        (``nonfinite_skips``); the first is told as a warning that names the parameter.

        One L1 norm per tensor (a single foreach call, one read of the host per device): NaN and inf show in it,
        and it overflows only for gradients whose squares would overflow the second moment anyway."""
        finite = _finite_tensors(grads)
        if all(finite):
            return params, grads
        index = {id(p): k for k, p in enumerate(group["params"])}
        skipped = [p for p, ok in zip(params, finite) if not ok]
        told = self.nonfinite_skips > 0  # the first skip is warned about, every one counted
        self.nonfinite_skips += len(skipped)
        if not told:
            first = skipped[0]
            where = f"param group {self.param_groups.index(group)}, parameter {index[id(first)]}"
            warnings.warn(f"{type(self).__name__}: the gradient of {where} (shape {tuple(first.shape)}) holds NaN or "
                          f"inf; the step of {len(skipped)} tensor(s) was skipped, their parameters and moments kept. "
                          "Later skips are counted in optimizer.nonfinite_skips (the Trainer logs it); pass "
                          "skip_nonfinite=False to apply such steps.", RuntimeWarning, stacklevel=2)
        kept = [k for k, ok in enumerate(finite) if ok]
        return [params[k] for k in kept], [grads[k] for k in kept]

    def _taken_norms(self) -> dict[int, Tensor]:
        """[||m/den||, ||m*den||] of the fp32 moments each low-bit tensor's latest update used, by the id of its
        stored first moment: the quantized moments left behind are those values requantized, so norms read
        from them would describe other moments than the step taken (for tensors whose moments round towards
        0, by a factor of ten or more). Not saved: after a load, the stored moments are read until a step."""
        return self.__dict__.setdefault("_taken", {})

    def _stepped_norms(self, m: Tensor, v: Tensor, eps_c: float) -> Tensor:
        taken = self._taken_norms().get(id(m))
        return taken if taken is not None else lowbit.moment_norms(m, v, eps_c)

    @staticmethod
    def _moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        # Moments of low-precision params are kept in fp32 unless asked otherwise.
        name = group.get("state_dtype")
        if name is not None:
            return getattr(torch, name)
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # The step counter is every state's, in one place; the moments are the group's kind of state.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if group.get("state_bits") is not None:
            lowbit.init_moments(p, state, group, self._moment_dtype(group, p))
        else:
            # zeros_like keeps the DTensor placement under FSDP2 and the device under offload.
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["inverse_scale"] == AUTO:
            state[CALIBRATED_SCALE] = torch.tensor(0.0, dtype=torch.float32)  # 0: not calibrated yet

    def _operands(self, group: dict[str, Any], params: list[Tensor]) -> _GroupOperands:
        """The group's cached operands for these parameters, rebuilt when something they rely on moved."""
        operand_sets: dict[tuple, _GroupOperands] = self.__dict__.setdefault("_operand_sets", {})
        key = tuple(map(id, params))
        operands = operand_sets.get(key)
        if operands is None or not operands.still_holds(self.state, group):
            operands = operand_sets[key] = _GroupOperands(self, group, params)
            while len(operand_sets) > _MAX_OPERAND_SETS:
                operand_sets.pop(next(iter(operand_sets)))
            self._log_path(operands.path, params[0].device.type, group)
        return operands

    def _log_path(self, path: str, device_type: str, group: dict[str, Any]) -> None:
        logged = self.__dict__.setdefault("_logged_paths", set())
        if (path, device_type) not in logged:
            logged.add((path, device_type))
            _logger.info("%s: %s update path on %s (foreach=%s, fused=%s)", type(self).__name__, path,
                         device_type, group.get("foreach"), group.get("fused"))

    def _calibrate(self, operands: _GroupOperands, grads: list[Tensor], hyper: Hyper) -> None:
        """``inverse_scale="auto"``: a tensor's scale is the norm-matching scale of ``"norm"``
        (:func:`~dualadam_hf.functional.held_norm_scales`), taken at its first update with a non-zero
        gradient (0 until then: LoRA's A gets exactly 0 at first, while B is 0) and kept."""
        waiting = list(operands.uncalibrated)
        part = StepTensors([operands.real_params[k] for k in waiting], [_real(grads[k]) for k in waiting],
                           [operands.exp_avgs[k] for k in waiting], [operands.exp_avg_sqs[k] for k in waiting],
                           [operands.steps[k] for k in waiting])
        for k, scale in zip(waiting, held_norm_scales(part, hyper, one_tensor=coming_norms(operands.path))):
            if float(scale) > 0.0:
                operands.states[k][CALIBRATED_SCALE] = operands.scales[k] = scale.to(operands.scale_device)
                operands.uncalibrated.remove(k)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; each saved group also records how many of its parameters have state. Under FSDP2
        (DTensor parameters) a ``state_bits`` group's quantized moments are saved dequantized, as fp32 DTensors
        over their parameters' shards, and the group says so (``lowbit.SAVED_AS_FP32``): torch's checkpoint layer
        gathers or shards a moment by its parameter's layout, which a rank's quantized shard does not carry."""
        saved = super().state_dict()
        for group, own in zip(saved["param_groups"], self.param_groups):
            group[STATEFUL_KEY] = sum(1 for pid in group["params"] if saved["state"].get(pid))
            if lowbit.saves_as_fp32(own):
                group[lowbit.SAVED_AS_FP32] = True
                for pid, p in zip(group["params"], own["params"]):
                    if one := saved["state"].get(pid):
                        saved["state"][pid] = {**one, **{key: lowbit.checkpoint_moment(one[key], p)
                                                          for key in MOMENT_KEYS}}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a DualAdam/InvAdam state, refusing with what is wrong, before anything is loaded, what this
        optimizer cannot honour: another optimizer's state; other param groups; group settings that differ from
        this optimizer's (torch would adopt the saved ones: a resumed run would take settings nobody chose, or
        keep another kind of state than asked for); a learning rate above its schedule's initial one; damaged
        moments or ones of another kind or shape than this optimizer keeps; a parameter's state missing from a
        state that recorded it."""
        problem = self._load_problem(state_dict)
        if problem:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {problem}")
        if renamed := [pid for pid, saved in state_dict["state"].items() if _OLD_CALIBRATED_SCALE in saved]:
            state = dict(state_dict["state"])
            for pid in renamed:
                one = dict(state[pid])
                one[CALIBRATED_SCALE] = one.pop(_OLD_CALIBRATED_SCALE)
                state[pid] = one
            state_dict = {**state_dict, "state": state}
        if numbered := [pid for pid, saved in state_dict["state"].items()
                        if saved and not isinstance(saved["step"], Tensor)]:
            # A step saved as a number (as torch's own optimizers accept) becomes the float32 0-d counter the
            # update paths count on; torch would keep it as it is. The caller's dict is left as given.
            state = dict(state_dict["state"])
            for pid in numbered:
                state[pid] = {**state[pid], "step": torch.tensor(float(state[pid]["step"]), dtype=torch.float32)}
            state_dict = {**state_dict, "state": state}
        state_dict = self._requantized(state_dict)
        self.__dict__.pop("_operand_sets", None)
        self.__dict__.pop("_taken", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop(STATEFUL_KEY, None)
            group.pop(lowbit.SAVED_AS_FP32, None)
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # keys added after the checkpoint was written
        # torch casts floating state to the param's dtype and device; a resume is exact only with the saved
        # moments in their own dtype (fp32 for low-precision params unless state_dtype says otherwise) and the
        # calibrated scale in float32 on the host, as they were created.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, (p, group) in zip(ids, [(p, g) for g in self.param_groups for p in g["params"]]):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            if CALIBRATED_SCALE in saved:
                self.state[p][CALIBRATED_SCALE] = saved[CALIBRATED_SCALE].to(device="cpu", dtype=torch.float32)
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            for key in MOMENT_KEYS:
                # Quantized moments (state_bits) keep their codes: torch's cast changed only their appearance.
                if self.state[p][key].dtype != dtype and not lowbit.is_quantized(self.state[p][key]):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    def _requantized(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the moments its groups saved dequantized (``lowbit.SAVED_AS_FP32``) quantized again
        where this optimizer keeps them quantized, one tensor at a time (the caller's dict is left as given).
        Before torch's load, which would cast them to a bf16 parameter's dtype first."""
        marked = [(saved, group) for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  if saved.get(lowbit.SAVED_AS_FP32)]
        if not marked:
            return state_dict
        state = dict(state_dict["state"])
        for saved, group in marked:
            for pid, p in zip(saved["params"], group["params"]):
                one = state.get(pid)
                if one and lowbit.quantizes(p, group) and not lowbit.is_quantized(one["exp_avg"]):
                    state[pid] = {**one, "exp_avg": lowbit.requantized(one["exp_avg"], p, group, signed=True),
                                  "exp_avg_sq": lowbit.requantized(one["exp_avg_sq"], p, group, signed=False)}
        return {**state_dict, "state": state}

    def _load_problem(self, state_dict: dict[str, Any]) -> str | None:
        """What keeps ``state_dict`` from being loaded into this optimizer as it stands, or None."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            return "this is not an optimizer state (it lacks state or param_groups)"
        saved_groups, states = state_dict["param_groups"], state_dict["state"]
        lacking = sorted({k for g in saved_groups for k in DUALADAM_GROUP_KEYS if k not in g})
        missing = [(pid, saved) for pid, saved in states.items() if saved and not set(STATE_KEYS) <= set(saved)]
        if lacking or missing:
            what = f"its param groups lack {', '.join(lacking)}" if lacking else (
                f"the state of parameter {missing[0][0]} has only {', '.join(missing[0][1])}")
            return (f"this state was saved by another optimizer ({what}); load it into that optimizer, or start "
                    f"{name} from a fresh state")
        if len(saved_groups) != len(self.param_groups):
            return (f"this state has {len(saved_groups)} param group(s), this optimizer {len(self.param_groups)}; "
                    "load the state saved for this model and these groups")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                return (f"param group {index} of this state has {len(saved['params'])} parameters, this optimizer's "
                        f"{len(group['params'])}; load the state saved for this model and these groups")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if problem := self._group_problem(saved, group):
                return f"param group {index} of this state: {problem}"
            as_fp32 = bool(saved.get(lowbit.SAVED_AS_FP32))
            for pid, p in zip(saved["params"], group["params"]):
                if (one := states.get(pid)) and (problem := _parameter_state_problem(one, p, group, as_fp32)):
                    return (f"the state of parameter {pid} {problem}; resume from the checkpoint this optimizer "
                            "saved, or start from a fresh state")
            recorded, present = saved.get(STATEFUL_KEY), sum(1 for pid in saved["params"] if states.get(pid))
            if recorded is not None and recorded != present:
                return (f"param group {index} recorded state for {recorded} parameters, but {present} are in this "
                        "state: a parameter's state is missing (it would restart its bias correction and blend "
                        "unseen); resume from a complete checkpoint")
        return None

    def _group_problem(self, saved: dict[str, Any], group: dict[str, Any]) -> str | None:
        """Why a saved group's settings cannot replace ``group``'s (None when they can): ones the constructor would
        refuse, ones that differ from this optimizer's, a learning rate off its schedule."""
        merged = {**self.defaults, **{key: value for key, value in saved.items() if key != "params"}}
        if isinstance(merged["betas"], list):
            merged["betas"] = tuple(merged["betas"])
        try:
            check_group(merged)
        except ValueError as error:
            return str(error)
        differ = [f"{key} {_shown(merged[key])} saved, {_shown(group[key])} here" for key in BINDING_SETTINGS
                  if not _same(merged[key], group[key])]
        blend = "blend_fraction" if merged.get("blend_fraction") is not None or group.get(
            "blend_fraction") is not None else "switch_rate"
        if not _same(merged.get(blend), group.get(blend)) and not (blend == "switch_rate" and group[blend] is None):
            differ.append(f"{blend} {_shown(merged.get(blend))} saved, {_shown(group.get(blend))} here")
        if "initial_lr" in merged and "initial_lr" in group and not _same(merged["initial_lr"], group["initial_lr"]):
            differ.append(f"learning rate {_shown(merged['initial_lr'])} saved, {_shown(group['initial_lr'])} here")
        if differ:
            kind = " (a change of state kind is not converted: resume with the optimizer that saved it)" if any(
                part.startswith(STATE_KIND_SETTINGS) for part in differ) else ""
            return (f"it was saved with other settings than this optimizer's: {'; '.join(differ)}{kind}; construct "
                    "the optimizer with the saved settings to resume it, or start from a fresh state")
        lr, initial = _value(merged["lr"]), merged.get("initial_lr")
        # Schedules start from initial_lr and go down from it (warmup, decay); only the cyclic ones, which mark
        # their groups with max_lr, rise above it.
        if initial is not None and "max_lr" not in merged and lr > _value(initial) * (1 + 1e-6):
            return (f"its learning rate {lr:.6g} is above its schedule's initial {_value(initial):.6g}: the state was "
                    "changed after it was saved; resume from the checkpoint as it was saved")
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                                   "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam.")
            if group.get("skip_nonfinite", True):
                params, grads = self._finite_only(group, params, grads)
                if not params:
                    continue
            operands = self._operands(group, params)
            hyper = self.hyper(group)
            if operands.uncalibrated:
                self._calibrate(operands, grads, hyper)
            taken = update(operands.tensors(grads), hyper, operands.path)
            operands.settle()
            if taken is not None:
                self._taken_norms().update(zip(map(id, operands.exp_avgs), taken))
        return loss


def _finite_tensors(grads: list[Tensor]) -> list[bool]:
    """Per gradient, whether all its elements are finite (see ``DualAdam._finite_only``)."""
    by_device: dict[torch.device, list[int]] = {}
    for k, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(k)
    finite = [True] * len(grads)
    for device, indices in by_device.items():
        if device.type == "meta":
            continue  # no values to read (shape-only tensors)
        norms = torch._foreach_norm([_real(local(grads[k])) for k in indices], 1)
        for k, ok in zip(indices, torch.isfinite(torch.stack(norms)).tolist()):
            finite[k] = ok
    return finite


def _value(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _same(a: Any, b: Any) -> bool:
    """Equal settings: numbers (or one-element tensors) by value, sequences element by element."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (numbers.Real, Tensor)) and isinstance(b, (numbers.Real, Tensor)) and not (
            isinstance(a, bool) or isinstance(b, bool)):
        return _value(a) == _value(b)
    return type(a) is type(b) and a == b


def _shown(x: Any) -> str:
    return f"{_value(x):g}" if isinstance(x, Tensor) else repr(x)


def _parameter_state_problem(saved: dict[str, Any], p: Tensor, group: dict[str, Any],
                             saved_as_fp32: bool = False) -> str | None:
    """What keeps one parameter's saved state from loading, worded to follow "the state of parameter N"
    (``saved_as_fp32``: its group saved quantized moments dequantized, see ``lowbit.SAVED_AS_FP32``)."""
    # In this order: the damage check reads the moments, which must first be tensors of the right kind.
    if problem := mismatched_state(saved, p):
        return f"does not fit it ({problem})"
    if problem := _kind_problem(saved, p, group, saved_as_fp32):
        return f"is of another kind ({problem})"
    if problem := damaged_state(saved):
        return f"is damaged ({problem})"
    return None


def _kind_problem(saved: dict[str, Any], p: Tensor, group: dict[str, Any], saved_as_fp32: bool) -> str | None:
    """Whether each saved moment is the kind of state this group keeps for ``p`` (quantized or not, how)."""
    if group.get("state_bits") is None and not any(map(lowbit.is_quantized, (saved["exp_avg"], saved["exp_avg_sq"]))):
        return None
    for key in MOMENT_KEYS:
        if problem := lowbit.moment_problem(saved[key], p, group, saved_as_fp32):
            return f"{key}: {problem}"
    return None


def saved_by_dualadam(state_dict: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is DualAdam's or InvAdam's: groups that all hold DualAdam's keys."""
    groups = state_dict.get("param_groups")
    return bool(groups) and all(isinstance(g, dict) and all(k in g for k in DUALADAM_GROUP_KEYS) for g in groups)


def step_problem(step: Any) -> str | None:
    """Why a saved step counter is not one (None when it is): a whole number >= 0, as a number or a one-element
    tensor."""
    one = isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1)
    value = float(step) if one else math.nan
    if not (math.isfinite(value) and value >= 0 and value.is_integer()):
        return f"step {value if one else step!r} is not a whole number >= 0"
    return None


def damaged_state(saved: dict[str, Any]) -> str | None:
    """What is wrong with one parameter's saved state, or None: the step must be a whole number >= 0 and
    the moments finite, with v >= 0 (a bit flip in a checkpoint can leave a loadable but poisoned state)."""
    if problem := step_problem(saved["step"]):
        return problem
    m, v = lowbit.dense(saved["exp_avg"]), lowbit.dense(saved["exp_avg_sq"])
    for key, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if not isinstance(t, Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{key} holds non-finite values"
    if not v.is_complex() and bool((v < 0).any()):
        return "exp_avg_sq holds negative values"
    return None


def mismatched_state(saved: dict[str, Any], param: Tensor) -> str | None:
    """What keeps one parameter's saved moments from fitting it, or None: each moment has the parameter's
    shape and, held in a plain tensor, a floating (or complex) dtype. A tensor subclass (a quantized moment)
    keeps the parameter's shape but may store its values in another dtype: it is compared by shape alone."""
    for key in MOMENT_KEYS:
        moment = saved[key]
        if not isinstance(moment, Tensor):
            return f"{key} is a {type(moment).__name__}, not a tensor"
        if moment.shape != param.shape:
            return f"{key} has shape {tuple(moment.shape)}, its parameter {tuple(param.shape)}"
        if type(moment) in (Tensor, torch.nn.Parameter) and not (moment.is_floating_point() or moment.is_complex()):
            return f"{key} is {moment.dtype}, not a floating dtype"
    return None


class InvAdam(DualAdam):
    """The inverse-Adam rule alone: u = s * mh * d at every step.

    It is DualAdam with ``switch_rate=0``: the blend stays at 1 and never anneals to Adam. The paper reports
    that this rule may fail to converge, so it is for research.

    Args (each as for :class:`DualAdam`):
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2) (default (0.9, 0.999)).
        eps: added to sqrt(v_hat) (default 1e-8).
        weight_decay: decoupled weight decay (default 0).
        inverse_scale, maximize, foreach, fused, state_dtype, bf16_stochastic_round, state_bits, block_size,
            skip_nonfinite: keyword arguments with DualAdam's defaults (1.0, False, None, None, None, False, None,
            None, True).

    The blend arguments (``switch_rate``, ``blend_steps``, ``blend_fraction``) are refused with a TypeError.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        blend = [key for key in BLEND_KEYS if key in kwargs]
        if blend:
            raise TypeError(invadam_refusal(blend))
        if kwargs.get("inverse_scale", 1.0) == 0:
            _warn_updates_nothing(stacklevel=2)
        super().__init__(params, lr, betas, eps, weight_decay, switch_rate=0.0, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as DualAdam does; a blend setting is refused as by the constructor (a copy of one of
        InvAdam's own groups, with switch_rate 0 and no blend_fraction, is taken as it is)."""
        own = {"switch_rate": 0.0}
        blend = [key for key in BLEND_KEYS if key in param_group and param_group[key] != own.get(key)]
        if blend:
            raise TypeError(invadam_refusal(blend))
        scale = param_group.get("inverse_scale")  # the group's own: the defaults' scale warned in the constructor
        super().add_param_group(param_group)
        if _is_number(scale) and scale == 0:
            _warn_updates_nothing(stacklevel=2)
