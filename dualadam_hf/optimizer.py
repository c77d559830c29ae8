"""DualAdam and InvAdam: thin Optimizer shells over ``dualadam_hf.functional``.

The classes validate hyperparameters, create state lazily per parameter and
hand lists of tensors to the pure update functions. The step counter lives in
each parameter's state (never on the optimizer or in a param group), so a
resumed run continues bias correction and the blend exactly, and DeepSpeed
ZeRO-3, which calls ``step()`` once per sub-group, cannot over-count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional
from .schedule import blend_weight, switch_rate_from_fraction, switch_rate_from_steps

DEFAULT_SWITCH_RATE = 0.01

_logger = logging.getLogger(__name__)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _check_hyperparameters(lr, betas, eps, weight_decay, switch_rate=None) -> None:
    lr_value = float(lr.item()) if isinstance(lr, Tensor) else lr
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be >= 0)")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1}: {beta!r} (must be in [0, 1))")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")
    if switch_rate is not None and not 0.0 <= switch_rate <= 1.0:
        raise ValueError(f"Invalid switch_rate: {switch_rate!r} (must be in [0, 1])")


_STATE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _resolve_state_dtype(state_dtype: torch.dtype | str | None) -> str | None:
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


def _resolve_switch_rate(switch_rate, blend_steps, blend_fraction):
    """Return (switch_rate, blend_fraction) from the three ways to state the blend."""
    given = [n for n, v in (("switch_rate", switch_rate), ("blend_steps", blend_steps),
                            ("blend_fraction", blend_fraction)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"Give only one of switch_rate, blend_steps, blend_fraction; got {', '.join(given)}")
    if blend_steps is not None:
        return switch_rate_from_steps(blend_steps), None
    if blend_fraction is not None:
        if not 0.0 < blend_fraction <= 1.0:
            raise ValueError(f"Invalid blend_fraction: {blend_fraction!r} (must be in (0, 1])")
        # Resolved by set_total_steps() once the run length is known.
        return None, float(blend_fraction)
    return (DEFAULT_SWITCH_RATE if switch_rate is None else float(switch_rate)), None


class DualAdam(Optimizer):
    """DualAdam (arXiv 2603.07122): Adam blended with inverse Adam, annealed to Adam.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the moment averages (default (0.9, 0.999)).
        eps: added to sqrt(v_hat) (default 1e-8).
        weight_decay: decoupled, lr-scaled weight decay (AdamW style, default 0).
        switch_rate: the blend weight falls by this much per optimizer step; the
            inverse part lasts about 1/switch_rate steps (default 0.01).
        blend_steps: the blend length in optimizer steps (switch_rate = 1/N).
        blend_fraction: the blend length as a fraction of the run; resolved by
            :meth:`set_total_steps` (the Trainer integration calls it).
        maximize: maximize the objective instead of minimizing it.
        state_dtype: dtype of the two moments: None (default) keeps them in fp32
            for bf16/fp16 params and in the param dtype otherwise; "bfloat16"
            halves the state memory and traffic (the math stays fp32), as
            ``torch.optim.AdamW`` does for bf16 params.
        foreach: False selects the plain single-tensor path; True the multi-tensor path.
        fused: True selects the single-pass path of the device: a Triton kernel on
            CUDA (``dualadam_hf.fused``), ``torch.compile`` on CPU
            (``dualadam_hf.compiled``). With both None the fastest path that needs
            no compile step is picked per device and logged once (INFO).

    Steps count optimizer steps: with gradient accumulation a run of N batches
    takes N / accumulation_steps optimizer steps.
    """

    inverse_only = False

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
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        switch_rate, blend_fraction = _resolve_switch_rate(switch_rate, blend_steps, blend_fraction)
        _check_hyperparameters(lr, betas, eps, weight_decay, switch_rate)
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            switch_rate=switch_rate, blend_fraction=blend_fraction,
            maximize=maximize, foreach=foreach, fused=fused,
            state_dtype=_resolve_state_dtype(state_dtype),
        )
        super().__init__(params, defaults)

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

    def current_step(self) -> int:
        """The largest per-parameter step taken so far (0 before the first step)."""
        steps = [float(s["step"]) for s in self.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    def blend_weight(self, group_index: int = 0) -> float:
        """Blend weight used by the most recent step of ``param_groups[group_index]``."""
        if self.inverse_only:
            return 1.0
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
        return blend_weight(max(step, 1), rate)

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
        dtype = self._moment_dtype(group, p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _gather(self, group: dict[str, Any]):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
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
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype; put the moments back in the
        # moment dtype (fp32 for low-precision params unless state_dtype says otherwise)
        # from the saved values, so a resume is exact.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            dtype = self._moment_dtype(group, p)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and self.state[p][key].dtype != dtype:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    # -- step ---------------------------------------------------------------

    def _path(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """The update path for this group: "fused", "compiled", "foreach" or "single".

        ``fused=True`` asks for the single-pass path of the parameters' device:
        the Triton kernel on CUDA, the ``torch.compile`` path on CPU (as
        ``torch.optim.AdamW(fused=True)`` has a fused kernel per device). With
        ``foreach=None, fused=None`` CUDA gets the Triton kernel when it applies
        and everything else the foreach path; the compiled CPU path is opt-in
        because its one-time compile takes tens of seconds (issue 6).
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
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                switch_rate=1.0 if self.inverse_only else self._switch_rate(group),
                inverse_only=self.inverse_only, maximize=group["maximize"],
            )
            path = self._path(group, params)
            if path == "fused":
                from .fused import fused_dualadam

                # The kernel reads the step on the device (no host sync); move it
                # there once, e.g. after a load_state_dict that kept it on CPU.
                for p in params:
                    if self.state[p]["step"].device != p.device:
                        self.state[p]["step"] = self.state[p]["step"].to(p.device)
                steps = [self.state[p]["step"] for p in params]
                fused_dualadam(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
            elif path == "compiled":
                from .compiled import compiled_dualadam

                compiled_dualadam(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
            else:
                functional.dualadam(params, grads, exp_avgs, exp_avg_sqs, steps, foreach=path == "foreach", **hyper)
        return loss


class InvAdam(DualAdam):
    """The inverse-Adam rule alone (u = mh * d): DualAdam with the blend held at 1.

    The paper reports that InvAdam alone may fail to converge; it is exposed for
    research. Use :class:`DualAdam` for training.
    """

    inverse_only = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, switch_rate=0.0,
            maximize=maximize, foreach=foreach, fused=fused, state_dtype=state_dtype,
        )
