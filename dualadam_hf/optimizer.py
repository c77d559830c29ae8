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


def check_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group (or of the defaults)."""
    lr, betas = group["lr"], group["betas"]
    lr = float(lr.item()) if isinstance(lr, Tensor) else lr
    if not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {group['lr']!r} (must be a number >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checks = [(f"beta{i + 1}", beta, 0.0 <= beta < 1.0, "in [0, 1)") for i, beta in enumerate(betas)]
    checks += [(name, group[name], 0.0 <= group[name] < math.inf, ">= 0") for name in ("eps", "weight_decay")]
    rate, fraction, scale = group["switch_rate"], group.get("blend_fraction"), group["inverse_scale"]
    checks += [("switch_rate", rate, rate is None or 0.0 <= rate <= 1.0, "in [0, 1]"),
               ("blend_fraction", fraction, fraction is None or 0.0 < fraction <= 1.0, "in (0, 1]"),
               ("inverse_scale", scale, scale == AUTO or (not isinstance(scale, (bool, str)) and 0 <= scale < math.inf),
                "a number >= 0, or 'auto'")]
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"Invalid {name}: {value!r} (must be {rule})")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("foreach and fused cannot both be True")
    resolve_state_dtype(group.get("state_dtype"))


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
                     switch_rate=group["switch_rate"], inverse_scale=1.0 if scale == AUTO else float(scale),
                     maximize=group["maximize"])

    def current_step(self) -> int:
        """The largest per-parameter step taken so far (0 before the first step)."""
        steps = [float(s["step"]) for s in self.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    def blend_weight(self, group_index: int = 0) -> float:
        """Blend weight of the most recent step of ``param_groups[group_index]`` (before any: step 1's)."""
        group = self.param_groups[group_index]
        if group.get("switch_rate") is None:
            return 0.0  # blend_fraction not resolved yet, so no step has been taken
        steps = [float(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
        # DeepSpeed ZeRO-3 puts a sub-group's partition in params only during its step(); the state keeps them.
        step = max(steps) if steps else (0 if group["params"] else self.current_step())
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
                norms.append(functional.update_norms(self._state_tensors(states), self.hyper(group)))
        # DeepSpeed ZeRO-3 empties the groups' params between steps; the groups share one rule there.
        orphans = [s for s in self.state.values() if "step" in s and id(s) not in seen]
        if orphans:
            norms.append(functional.update_norms(self._state_tensors(orphans), self.hyper(self.param_groups[0])))
        return functional.inverse_share(sum(a for a, _ in norms), sum(b for _, b in norms))

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

    def _gather(self, group: dict[str, Any], on_device: bool) -> StepTensors:
        """The group's operands; ``on_device`` puts steps and scales on the parameters' device (the fused
        kernel reads them there, with no host sync), e.g. after a load_state_dict that kept them on CPU."""
        tensors = StepTensors([], [], [], [], [], [] if group["inverse_scale"] == AUTO else None)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                                   "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam.")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            m, v = self._real(state["exp_avg"]), self._real(state["exp_avg_sq"])
            if tensors.scales is not None and float(state["inverse_scale"]) == 0.0:
                scale = functional.calibrated_scale(self._real(p.grad), m, v, float(state["step"]) + 1,
                                                    self.hyper(group))
                if scale is not None:
                    state["inverse_scale"] = scale.to(state["inverse_scale"].device)
            for key in ("step", "inverse_scale") if on_device else ():
                if key in state and state[key].device != p.device:
                    state[key] = state[key].to(p.device)
            for values, value in zip(tensors, (self._real(p), self._real(p.grad), m, v, state["step"],
                                               state.get("inverse_scale"))):
                if values is not None:
                    values.append(value)
        return tensors

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a DualAdam/InvAdam state; another optimizer's state is refused with what it lacks."""
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
        super().load_state_dict(state_dict)
        for group in self.param_groups:
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
            if "inverse_scale" in saved:
                self.state[p]["inverse_scale"] = saved["inverse_scale"].to(device="cpu", dtype=torch.float32)
            dtype = p.dtype if p.is_complex() else self._moment_dtype(group, p)
            for key in ("exp_avg", "exp_avg_sq"):
                if self.state[p][key].dtype != dtype:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    def _path(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """"fused" (Triton, CUDA), "compiled" (CPU), "foreach" or "single"; logged once per device. The compiled
        CPU path is opt-in (``fused=True``): its one-time compile takes tens of seconds."""
        fused, foreach = group.get("fused"), group.get("foreach")
        devices = {p.device for p in params}
        device = next(iter(devices))
        if fused and (len(devices) > 1 or device.type not in ("cuda", "cpu")):
            raise RuntimeError(f"fused=True needs all parameters of a group on one CUDA or CPU device, got {devices}")
        if fused:
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
            _logger.info("%s: %s update path on %s (foreach=%s, fused=%s)", type(self).__name__, path,
                         device.type, foreach, fused)
        return path

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                path = self._path(group, params)
                functional.update(self._gather(group, on_device=path == "fused"), self.hyper(group), path)
        return loss


class InvAdam(DualAdam):
    """The inverse-Adam rule alone (u = s*mh*d): DualAdam with ``switch_rate=0``, the blend held at 1; it takes
    DualAdam's arguments but the blend's. The paper reports that it may fail to converge: it is for research."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        blend = [key for key in BLEND_KEYS if key in kwargs]
        if blend:
            raise TypeError(f"InvAdam holds the blend weight at 1 and takes no {', '.join(blend)}")
        super().__init__(params, lr, betas, eps, weight_decay, switch_rate=0.0, **kwargs)
