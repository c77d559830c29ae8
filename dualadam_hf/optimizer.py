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
from .update import choose_path, update

DEFAULT_SWITCH_RATE = 0.01
BLEND_KEYS = ("switch_rate", "blend_steps", "blend_fraction")
AUTO = "auto"
NORM = "norm"
INVERSE_SCALE_NAMES = (AUTO, NORM)
_MAX_PLANS = 1024  # cached plans per optimizer: one per pattern of missing gradients (ZeRO-3: per sub-group)

_logger = logging.getLogger(__name__)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_STATE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


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
    checks = [("learning rate", group["lr"], _is_number(lr) and 0.0 <= lr < math.inf, "a number >= 0")]
    checks += [(f"beta{i + 1}", beta, 0.0 <= beta < 1.0, "in [0, 1)") for i, beta in enumerate(betas)]
    checks += [(name, group[name], _is_number(group[name]) and 0.0 <= group[name] < math.inf, "a number >= 0")
               for name in ("eps", "weight_decay")]
    checks += [("switch_rate", rate, rate is None or (_is_number(rate) and 0.0 <= rate <= 1.0), "in [0, 1]"),
               ("blend_fraction", fraction, fraction is None or (_is_number(fraction) and 0.0 < fraction <= 1.0),
                "in (0, 1]"),
               ("inverse_scale", scale, scale in INVERSE_SCALE_NAMES if isinstance(scale, str)
                else _is_number(scale) and 0 <= scale < math.inf, "a number >= 0, 'auto' or 'norm'")]
    for name, value, ok, rule in checks:
        if not ok:
            hint = ", not a bool" if isinstance(value, bool) else ""
            raise ValueError(f"Invalid {name}: {value!r} (must be {rule}{hint})")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("foreach and fused cannot both be True")
    if not isinstance(group.get("bf16_stochastic_round", False), bool):
        raise ValueError(f"Invalid bf16_stochastic_round: {group['bf16_stochastic_round']!r} (must be True or False)")
    lowbit.check_group(group, resolve_state_dtype(group.get("state_dtype")))


def resolve_state_dtype(state_dtype: torch.dtype | str | None) -> str | None:
    """None, "float32" or "bfloat16" (kept as a string so checkpoints hold no torch objects)."""
    name = None if state_dtype is None else str(state_dtype).removeprefix("torch.")
    if name is not None and name not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (must be None, float32 or bfloat16; None keeps fp32 "
                         "moments for bf16/fp16 params and the param dtype otherwise)")
    return None if name is None else _STATE_DTYPES[name]


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
        self.flags = (group.get("foreach"), group.get("fused"))
        self.path = choose_path(params, *self.flags)
        self.scales = None
        if group["inverse_scale"] == AUTO:
            # The kernel reads the calibrated scales on the device (no host-to-device copy in a step).
            self.scale_device = device if self.path == "triton" else torch.device("cpu")
            for state in self.states:
                state["inverse_scale"] = state["inverse_scale"].to(self.scale_device)
            self.scales = [state["inverse_scale"] for state in self.states]
        self.uncalibrated = [k for k, scale in enumerate(self.scales or []) if float(scale) == 0.0]
        self.counts = StepCounts(vector, int(min(values)), int(max(values)), {})
        self.version = vector._version

    def still_holds(self, state: dict[Tensor, dict[str, Any]], group: dict[str, Any]) -> bool:
        """Whether nothing the plan relies on has moved (checked every step, in C-speed passes): the
        parameters' addresses (``p.data = ...`` moves one), the state dicts and their tensors (a reset or
        a replaced moment), and the group's path flags."""
        return ([local(p).data_ptr() for p in self.params] == self.addresses
                and all(map(operator.is_, map(state.__getitem__, self.params), self.states))
                and all(map(operator.is_, itertools.chain.from_iterable(map(_PLAN_KEYS, self.states)),
                            self.flat_state))
                and (group.get("foreach"), group.get("fused")) == self.flags)

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
    ) -> None:
        switch_rate, blend_fraction = resolve_blend(switch_rate, blend_steps, blend_fraction)
        if switch_rate == 0.0 and not isinstance(self, InvAdam):
            _warn_inverse_only("DualAdam(switch_rate=0)", stacklevel=2)
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay,
            switch_rate=switch_rate, blend_fraction=blend_fraction, inverse_scale=inverse_scale,
            maximize=maximize, foreach=foreach, fused=fused, state_dtype=resolve_state_dtype(state_dtype),
            bf16_stochastic_round=bf16_stochastic_round, state_bits=state_bits,
        )
        super().__init__(params, defaults)

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
        scales = [s["inverse_scale"] for s in states] if "inverse_scale" in states[0] else None
        one_tensor = lowbit.moment_norms if group.get("state_bits") is not None else None
        return diagnostics.update_norms([_real(s["exp_avg"]) for s in states], [_real(s["exp_avg_sq"]) for s in states],
                                        [s["step"] for s in states], self.hyper(group), scales, one_tensor)

    @staticmethod
    def _moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        # Moments of low-precision params are kept in fp32 unless asked otherwise.
        name = group.get("state_dtype")
        if name is not None:
            return getattr(torch, name)
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group.get("state_bits") is not None:
            lowbit.init_state(p, state, group, self._moment_dtype(group, p))
        else:
            # zeros_like keeps the DTensor placement under FSDP2 and the device under offload.
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["inverse_scale"] == AUTO:
            state["inverse_scale"] = torch.tensor(0.0, dtype=torch.float32)  # 0: not calibrated yet

    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> _GroupOperands:
        """The group's cached plan for these parameters, rebuilt when something it relies on moved."""
        plans: dict[tuple, _GroupOperands] = self.__dict__.setdefault("_plans", {})
        key = tuple(map(id, params))
        plan = plans.get(key)
        if plan is None or not plan.still_holds(self.state, group):
            plan = plans[key] = _GroupOperands(self, group, params)
            while len(plans) > _MAX_PLANS:
                plans.pop(next(iter(plans)))
            self._log_path(plan.path, params[0].device.type, group)
        return plan

    def _log_path(self, path: str, device_type: str, group: dict[str, Any]) -> None:
        logged = self.__dict__.setdefault("_logged_paths", set())
        if (path, device_type) not in logged:
            logged.add((path, device_type))
            _logger.info("%s: %s update path on %s (foreach=%s, fused=%s)", type(self).__name__, path,
                         device_type, group.get("foreach"), group.get("fused"))

    def _calibrate(self, plan: _GroupOperands, grads: list[Tensor], hyper: Hyper) -> None:
        """``inverse_scale="auto"``: a tensor's scale is the norm-matching scale of ``"norm"``
        (:func:`~dualadam_hf.functional.held_norm_scales`), taken at its first update with a non-zero
        gradient (0 until then: LoRA's A gets exactly 0 at first, while B is 0) and kept."""
        waiting = list(plan.uncalibrated)
        part = StepTensors([plan.real_params[k] for k in waiting], [_real(grads[k]) for k in waiting],
                           [plan.exp_avgs[k] for k in waiting], [plan.exp_avg_sqs[k] for k in waiting],
                           [plan.steps[k] for k in waiting])
        for k, scale in zip(waiting, held_norm_scales(part, hyper)):
            if float(scale) > 0.0:
                plan.states[k]["inverse_scale"] = plan.scales[k] = scale.to(plan.scale_device)
                plan.uncalibrated.remove(k)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a DualAdam/InvAdam state; another optimizer's state, a damaged one, group settings the
        constructor would refuse or moments that do not fit their parameters are refused with what is wrong,
        before anything is loaded."""
        name = type(self).__name__
        lacking = sorted({k for g in state_dict.get("param_groups", []) for k in ("betas", "eps", "switch_rate")
                          if k not in g})
        missing = [(pid, saved) for pid, saved in state_dict.get("state", {}).items()
                   if saved and not {"step", "exp_avg", "exp_avg_sq"} <= set(saved)]
        if lacking or missing:
            what = f"its param groups lack {', '.join(lacking)}" if lacking else (
                f"the state of parameter {missing[0][0]} has only {', '.join(missing[0][1])}")
            raise ValueError(f"{name}.load_state_dict: this state was saved by another optimizer ({what}); "
                             f"load it into that optimizer, or start {name} from a fresh state")
        for pid, saved in state_dict.get("state", {}).items():
            problem = damaged_state(saved) if saved else None
            if problem:
                raise ValueError(f"{name}.load_state_dict: the state of parameter {pid} is damaged ({problem}); "
                                 "resume from an earlier checkpoint, or start from a fresh state")
        inverse_only = self._check_loaded_groups(state_dict.get("param_groups", []))
        self._check_loaded_moments(state_dict)
        if numbered := [pid for pid, saved in state_dict.get("state", {}).items()
                        if saved and not isinstance(saved["step"], Tensor)]:
            # A step saved as a number (as torch's own optimizers accept) becomes the float32 0-d counter the
            # update paths count on; torch would keep it as it is. The caller's dict is left as given.
            state = dict(state_dict["state"])
            for pid in numbered:
                state[pid] = {**state[pid], "step": torch.tensor(float(state[pid]["step"]), dtype=torch.float32)}
            state_dict = {**state_dict, "state": state}
        self.__dict__.pop("_plans", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # keys added after the checkpoint was written
        for index in inverse_only:
            _warn_inverse_only(f"{name}.load_state_dict: param group {index} of this state has switch_rate=0, which",
                               stacklevel=2)
        # torch casts floating state to the param's dtype and device; a resume is exact only with the saved
        # moments in their own dtype (fp32 for low-precision params unless state_dtype says otherwise) and the
        # calibrated scale in float32 on the host, as they were created.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, (p, group) in zip(ids, [(p, g) for g in self.param_groups for p in g["params"]]):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            if "inverse_scale" in saved:
                self.state[p]["inverse_scale"] = saved["inverse_scale"].to(device="cpu", dtype=torch.float32)
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            for key in ("exp_avg", "exp_avg_sq"):
                # Quantized moments (state_bits) keep their codes: torch's cast changed only their appearance.
                if self.state[p][key].dtype != dtype and not lowbit.is_quantized(self.state[p][key]):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    def _check_loaded_groups(self, saved_groups: list[dict[str, Any]]) -> list[int]:
        """Check each saved group's settings as the constructor checks its own (a group's settings replace
        the live group's at load); return the groups whose switch_rate 0 would turn a blending DualAdam group
        into InvAdam, to be warned about once the state is in."""
        name, inverse_only = type(self).__name__, []
        for index, saved in enumerate(saved_groups):
            group = {**self.defaults, **{key: value for key, value in saved.items() if key != "params"}}
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
            try:
                check_group(group)
            except ValueError as error:
                raise ValueError(f"{name}.load_state_dict: param group {index} of this state: {error}") from None
            if isinstance(self, InvAdam):
                blend = [f"{key}={group[key]!r}" for key, own in (("switch_rate", 0.0), ("blend_fraction", None))
                         if group[key] != own]
                if blend:
                    raise ValueError(f"{name}.load_state_dict: param group {index} of this state: "
                                     f"{invadam_refusal(blend)}; load a DualAdam state into DualAdam")
            elif group["switch_rate"] == 0.0 and (index >= len(self.param_groups)
                                                  or self.param_groups[index]["switch_rate"] != 0.0):
                inverse_only.append(index)
        return inverse_only

    def _check_loaded_moments(self, state_dict: dict[str, Any]) -> None:
        """Refuse moments that do not fit their parameters, naming them, before torch takes them in (a wrong
        shape would load and fail at the first step)."""
        saved_groups, states = state_dict.get("param_groups", []), state_dict.get("state", {})
        if len(saved_groups) != len(self.param_groups) or any(
                len(saved.get("params", ())) != len(group["params"])
                for saved, group in zip(saved_groups, self.param_groups)):
            return  # torch refuses a state whose groups do not match, in its own words
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                problem = mismatched_state(states[pid], p) if states.get(pid) else None
                if problem:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: the state of parameter {pid} does not "
                                     f"fit it ({problem}); load the state saved for this model")

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
            if group.get("state_bits") is not None:
                lowbit.step(self, group, params, grads, self.hyper(group))
                continue
            plan = self._plan(group, params)
            hyper = self.hyper(group)
            if plan.uncalibrated:
                self._calibrate(plan, grads, hyper)
            update(plan.tensors(grads), hyper, plan.path)
            plan.settle()
        return loss


def damaged_state(saved: dict[str, Any]) -> str | None:
    """What is wrong with one parameter's saved state, or None: the step must be a whole number >= 0 and
    the moments finite, with v >= 0 (a bit flip in a checkpoint can leave a loadable but poisoned state)."""
    step = saved["step"]
    one = isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1)
    value = float(step) if one else math.nan
    if not (math.isfinite(value) and value >= 0 and value.is_integer()):
        return f"step {value if one else step!r} is not a whole number >= 0"
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
    for key in ("exp_avg", "exp_avg_sq"):
        moment = saved[key]
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
        inverse_scale, maximize, foreach, fused, state_dtype, bf16_stochastic_round, state_bits: keyword
            arguments with DualAdam's defaults (1.0, False, None, None, None, False, None).

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
