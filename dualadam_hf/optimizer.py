"""DualAdam and InvAdam: thin Optimizer shells over ``dualadam_hf.functional``.

The classes validate hyperparameters, create state lazily per parameter and hand the tensors to one
of the update paths. The step counter lives in each parameter's state (never on the optimizer or in a
param group), so a resumed run continues bias correction and the blend exactly, and DeepSpeed ZeRO-3,
which calls ``step()`` once per sub-group, cannot over-count.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional
from .functional import StepTensors
from .schedule import Hyper, blend_weight, switch_rate_from_fraction, switch_rate_from_steps

DEFAULT_SWITCH_RATE = 0.01
BLEND_KEYS = ("switch_rate", "blend_steps", "blend_fraction")
AUTO = "auto"

_logger = logging.getLogger(__name__)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_STATE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else value


def check_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group (or of the defaults)."""
    lr, betas = _number(group["lr"]), group["betas"]
    if not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {group['lr']!r} (must be a number >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1}: {beta!r} (must be in [0, 1))")
    for name in ("eps", "weight_decay"):
        if not 0.0 <= group[name] < math.inf:
            raise ValueError(f"Invalid {name}: {group[name]!r} (must be a number >= 0)")
    rate = group["switch_rate"]
    if rate is not None and not 0.0 <= rate <= 1.0:
        raise ValueError(f"Invalid switch_rate: {rate!r} (must be in [0, 1])")
    fraction = group.get("blend_fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"Invalid blend_fraction: {fraction!r} (must be in (0, 1])")
    scale = group["inverse_scale"]
    if scale != AUTO and (isinstance(scale, (bool, str)) or not 0.0 <= scale < math.inf):
        raise ValueError(f"Invalid inverse_scale: {scale!r} (a number >= 0, or 'auto')")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("foreach and fused cannot both be True")
    resolve_state_dtype(group.get("state_dtype"))


def resolve_state_dtype(state_dtype: torch.dtype | str | None) -> str | None:
    """None, "float32" or "bfloat16" (kept as a string so checkpoints hold no torch objects)."""
    if state_dtype is None:
        return None
    name = str(state_dtype).removeprefix("torch.")
    if name not in _STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype: {state_dtype!r} (must be None, float32 or bfloat16; "
            "None keeps fp32 moments for bf16/fp16 params and the param dtype otherwise)"
        )
    return _STATE_DTYPES[name]


def resolve_blend(switch_rate: float | None, blend_steps: int | None,
                  blend_fraction: float | None) -> tuple[float | None, float | None]:
    """(switch_rate, blend_fraction) from the three ways to state the blend; at most one may be given."""
    given = [n for n, v in zip(BLEND_KEYS, (switch_rate, blend_steps, blend_fraction)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"Give only one of switch_rate, blend_steps, blend_fraction; got {', '.join(given)}")
    if blend_steps is not None:
        return switch_rate_from_steps(blend_steps), None
    if blend_fraction is not None:
        # Resolved by set_total_steps() once the run length is known.
        return None, float(blend_fraction)
    return (DEFAULT_SWITCH_RATE if switch_rate is None else float(switch_rate)), None


class DualAdam(Optimizer):
    """DualAdam (arXiv 2603.07122): Adam blended with inverse Adam, annealed to Adam.

    u = (1-r)*mh/d + r*s*mh*d, with r = 1 - t*switch_rate while r >= switch_rate, then 0 (plain Adam);
    the rule and every argument are described in docs/optimizer.md and :mod:`dualadam_hf.schedule`.
    Give the blend as ``switch_rate`` (the paper's), ``blend_steps`` (optimizer steps) or
    ``blend_fraction`` (of the run, resolved by :meth:`set_total_steps`). ``inverse_scale`` is ``s``:
    1 is the paper's rule, ``"auto"`` a unit-free inverse step calibrated per tensor (its norm matched to
    Adam's at the tensor's first update, so the inverse share is r there), 0 no inverse part.
    ``state_dtype="bfloat16"`` keeps bf16 moments. ``foreach=False`` picks the single-tensor path;
    ``fused=True`` the single-pass path of the device (Triton on CUDA, torch.compile on CPU).
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
    ) -> None:
        switch_rate, blend_fraction = resolve_blend(switch_rate, blend_steps, blend_fraction)
        if switch_rate == 0.0 and not isinstance(self, InvAdam):
            warnings.warn("DualAdam(switch_rate=0) holds the blend weight at 1 for the whole run: that is InvAdam, "
                          "the inverse rule alone, not plain Adam (use InvAdam to say so).", UserWarning, stacklevel=2)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            switch_rate=switch_rate, blend_fraction=blend_fraction, inverse_scale=inverse_scale,
            maximize=maximize, foreach=foreach, fused=fused, state_dtype=resolve_state_dtype(state_dtype),
        )
        check_group({**defaults, "state_dtype": state_dtype})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its hyperparameters as the constructor checks the defaults."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["state_dtype"] = resolve_state_dtype(group.get("state_dtype"))
            if "betas" in param_group:
                group["betas"] = tuple(group["betas"])
            check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    # -- schedule ---------------------------------------------------------

    def set_total_steps(self, total_steps: int) -> None:
        """Resolve ``blend_fraction`` against the run's number of optimizer steps."""
        for group in self.param_groups:
            if group.get("blend_fraction") is not None:
                group["switch_rate"] = switch_rate_from_fraction(group["blend_fraction"], total_steps)

    def _switch_rate(self, group: dict[str, Any]) -> float:
        rate = group.get("switch_rate")
        if rate is None:
            raise RuntimeError(
                "DualAdam was given blend_fraction but does not know the run length: call "
                "optimizer.set_total_steps(total_optimizer_steps) before the first step "
                "(the Trainer integration does this for you)."
            )
        return rate

    def hyper(self, group: dict[str, Any]) -> Hyper:
        """The group's hyperparameters as the update paths take them."""
        beta1, beta2 = group["betas"]
        scale = group["inverse_scale"]
        return Hyper(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            switch_rate=self._switch_rate(group), inverse_scale=1.0 if scale == AUTO else float(scale),
            maximize=group["maximize"],
        )

    def current_step(self) -> int:
        """The largest per-parameter step taken so far (0 before the first step)."""
        steps = [float(s["step"]) for s in self.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    def blend_weight(self, group_index: int = 0) -> float:
        """Blend weight used by the most recent step of ``param_groups[group_index]``."""
        group = self.param_groups[group_index]
        rate = group.get("switch_rate")
        if rate is None:
            return 0.0  # blend_fraction not resolved yet, so no step has been taken
        steps = [float(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
        if steps:
            step = max(steps)
        elif not group["params"]:
            # DeepSpeed ZeRO-3 puts one sub-group's partition in params only for the
            # duration of its step() and empties the list afterwards; the state keeps them.
            step = self.current_step()
        else:
            step = 0
        # Before the first step: the weight step 1 will use.
        return float(blend_weight(max(step, 1), rate))

    def inverse_share(self) -> float:
        """Share of the latest update that comes from the inverse part, over all parameters:

        ||r*s*mh*d|| / (||(1-r)*mh/d|| + ||r*s*mh*d||), read from the state (costs one pass over it
        when called, nothing otherwise). 0 before the first step and after the blend. Under sharded
        engines (ZeRO, FSDP2) it covers this process's shard.
        """
        adam_sq = inverse_sq = 0.0
        seen: set[int] = set()
        for group in self.param_groups:
            if group.get("switch_rate") is None:
                continue
            states = [self.state[p] for p in group["params"] if "step" in self.state.get(p, {})]
            seen.update(id(s) for s in states)
            a, b = functional.update_norms(self._state_tensors(states), self.hyper(group))
            adam_sq, inverse_sq = adam_sq + a, inverse_sq + b
        orphans = [s for s in self.state.values() if "step" in s and id(s) not in seen]
        if orphans and self.param_groups[0].get("switch_rate") is not None:
            # DeepSpeed ZeRO-3 empties the groups' params between steps; the groups share one rule there.
            a, b = functional.update_norms(self._state_tensors(orphans), self.hyper(self.param_groups[0]))
            adam_sq, inverse_sq = adam_sq + a, inverse_sq + b
        return functional.inverse_share(adam_sq, inverse_sq)

    # -- state --------------------------------------------------------------

    @staticmethod
    def _moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        # Moments of low-precision params are kept in fp32 unless asked otherwise.
        name = group.get("state_dtype")
        if name is not None:
            return getattr(torch, name)
        return torch.float32 if p.dtype in functional.LOW_PRECISION else p.dtype

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # zeros_like keeps the DTensor placement under FSDP2 and the device under offload.
        dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["inverse_scale"] == AUTO:
            state["inverse_scale"] = torch.tensor(0.0, dtype=torch.float32)  # 0: not calibrated yet

    @staticmethod
    def _real(t: Tensor) -> Tensor:
        # Complex tensors are updated as pairs of reals, as torch's Adam does.
        return torch.view_as_real(t) if t.is_complex() else t

    def _state_tensors(self, states: list[dict[str, Any]]) -> StepTensors:
        scales = [s["inverse_scale"] for s in states] if states and "inverse_scale" in states[0] else None
        # Diagnostics read moments and steps only; the params and grads slots are not used.
        return StepTensors([self._real(s["exp_avg"]) for s in states], [None] * len(states),
                           [self._real(s["exp_avg"]) for s in states], [self._real(s["exp_avg_sq"]) for s in states],
                           [s["step"] for s in states], scales)

    def _gather(self, group: dict[str, Any]) -> StepTensors:
        params, grads, exp_avgs, exp_avg_sqs, steps, scales = [], [], [], [], [], []
        auto = group["inverse_scale"] == AUTO
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; use dense "
                    "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam."
                )
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            p_real, g_real, v_real = self._real(p), self._real(p.grad), self._real(state["exp_avg_sq"])
            if auto and float(state["inverse_scale"]) == 0.0:
                scale = functional.calibrated_scale(g_real, self._real(state["exp_avg"]), v_real,
                                                    float(state["step"]) + 1, self.hyper(group))
                if scale is not None:
                    state["inverse_scale"] = scale.to(state["inverse_scale"].device)
            params.append(p_real)
            grads.append(g_real)
            exp_avgs.append(self._real(state["exp_avg"]))
            exp_avg_sqs.append(v_real)
            steps.append(state["step"])
            if auto:
                scales.append(state["inverse_scale"])
        return StepTensors(params, grads, exp_avgs, exp_avg_sqs, steps, scales if auto else None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a DualAdam/InvAdam state; another optimizer's state is refused with what is missing."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # keys added after the checkpoint was written
        # torch casts floating state to the param dtype; put the moments back in the
        # moment dtype (fp32 for low-precision params unless state_dtype says otherwise)
        # from the saved values, so a resume is exact.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            if "inverse_scale" in saved:  # a calibrated scale is kept in float32 on the host, as created
                self.state[p]["inverse_scale"] = saved["inverse_scale"].to(device="cpu", dtype=torch.float32)
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and self.state[p][key].dtype != dtype:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        groups = state_dict.get("param_groups", [])
        lacking = sorted({k for g in groups for k in ("betas", "eps", "switch_rate") if k not in g})
        if lacking:
            raise ValueError(
                f"{name}.load_state_dict: this state was saved by another optimizer (its param groups lack "
                f"{', '.join(lacking)}); build that optimizer to load it, or start {name} from a fresh state"
            )
        for pid, saved in state_dict.get("state", {}).items():
            missing = [k for k in _STATE_KEYS if k not in saved]
            if saved and missing:
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {pid} lacks {', '.join(missing)} "
                    f"(it has {', '.join(saved)}): it was saved by another optimizer"
                )

    # -- step ---------------------------------------------------------------

    def _path(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """"fused" (Triton, CUDA), "compiled" (CPU), "foreach" or "single"; logged once per device.

        The compiled CPU path is opt-in (``fused=True``): its one-time compile takes tens of seconds.
        """
        fused, foreach = group.get("fused"), group.get("foreach")
        devices = {p.device for p in params}
        device = next(iter(devices))
        if fused:
            if len(devices) > 1 or device.type not in ("cuda", "cpu"):
                raise RuntimeError(
                    f"fused=True needs all parameters of a group on one CUDA or CPU device, got {devices}"
                )
            path = "fused" if device.type == "cuda" else "compiled"
        elif foreach is False:
            path = "single"
        elif foreach is None and fused is None and len(devices) == 1 and device.type == "cuda":
            from .fused import fused_supported

            path = "fused" if fused_supported(params) else "foreach"
        else:
            path = "foreach"
        logged = self.__dict__.setdefault("_logged_paths", set())
        if (path, device.type) not in logged:
            logged.add((path, device.type))
            _logger.info("%s: %s update path on %s (foreach=%s, fused=%s)",
                         type(self).__name__, path, device.type, foreach, fused)
        return path

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = self._gather(group)
            if not tensors.params:
                continue
            path = self._path(group, tensors.params)
            if path == "fused":
                # The kernel reads steps and scales on the device (no host sync); move them there once,
                # e.g. after a load_state_dict that kept them on CPU.
                tensors = self._state_on_device(group, tensors)
            functional.update(tensors, self.hyper(group), path)
        return loss

    def _state_on_device(self, group: dict[str, Any], tensors: StepTensors) -> StepTensors:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            for key in ("step", "inverse_scale"):
                if key in state and state[key].device != p.device:
                    state[key] = state[key].to(p.device)
        scales = [self.state[p]["inverse_scale"] for p in params] if tensors.scales is not None else None
        return tensors._replace(steps=[self.state[p]["step"] for p in params], scales=scales)


class InvAdam(DualAdam):
    """The inverse-Adam rule alone (u = s*mh*d): DualAdam with ``switch_rate=0``, the blend held at 1.

    Takes DualAdam's arguments except the three that set the blend. The paper reports that InvAdam
    alone may fail to converge; it is exposed for research. Use :class:`DualAdam` for training.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        blend = [key for key in BLEND_KEYS if key in kwargs]
        if blend:
            raise TypeError(f"InvAdam holds the blend weight at 1 and takes no {', '.join(blend)}")
        super().__init__(params, lr, betas, eps, weight_decay, switch_rate=0.0, **kwargs)
