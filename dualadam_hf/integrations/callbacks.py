"""A TrainerCallback that resolves the blend length and logs `dualadam/blend`, `dualadam/inverse_share` and
`dualadam/effective_lr`."""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..optimizer import AUTO, DualAdam
from .log_keys import BLEND_LOG_KEY, EFFECTIVE_LR_LOG_KEY, INVERSE_SHARE_LOG_KEY, NONFINITE_SKIPS_LOG_KEY
from .optim_args import OPTIMIZER_NAMES, optimizer_name
from .unwrap import find_dualadam


def _wrapper_chain(optimizer: Any) -> str:
    names, current = [], optimizer
    while current is not None and len(names) < 8:
        names.append(type(current).__name__)
        current = getattr(current, "optimizer", None)
    return " -> ".join(names) or "None"


class DualAdamCallback(TrainerCallback):
    """Resolves `blend_fraction` against the run length and logs the blend weight with the training logs.

    At train begin it finds DualAdam inside the optimizer wrappers and calls `set_total_steps(max_steps)`, or
    raises if `--optim dualadam`/`invadam` was requested but something else trains (e.g. DeepSpeedCPUAdam under
    optimizer offload). Each training log gets `dualadam/blend` (the inverse-Adam weight r of the latest step),
    `dualadam/inverse_share` (that step's share of the update from the inverse part) and `dualadam/effective_lr`
    (the rate on the Adam part, (1 - r) times the group's learning rate: the schedule's `learning_rate` is the
    rate before the blend, so the matched warmup logs its warmup here). It warns when gradient
    clipping is off and when a resumed run has an empty optimizer state. See docs/usage.md.
    """

    def __init__(self) -> None:
        self._optimizer: DualAdam | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._optimizer = found = find_dualadam(optimizer)
        if found is None:
            if optimizer_name(args) in OPTIMIZER_NAMES:
                raise RuntimeError(
                    f"TrainingArguments.optim is {optimizer_name(args)!r} but the Trainer's optimizer is "
                    f"{_wrapper_chain(optimizer)}, not DualAdam. Something replaced it: with DeepSpeed optimizer "
                    "offload, accelerate swaps in DeepSpeedCPUAdam unless the DeepSpeed config sets "
                    '"zero_force_ds_cpu_optimizer": false; an `optimizers=(...)` argument also overrides --optim.'
                )
            return
        if any(g.get("state_bits") for g in found.param_groups) and "deepspeed" in _wrapper_chain(optimizer).lower():
            raise ValueError(
                "state_bits (--optim dualadam_8bit/dualadam_4bit) does not run under DeepSpeed: ZeRO hands DualAdam "
                "one flat partition of many parameters per rank, so the quantization blocks would straddle tensors "
                "and no tensor would keep its own rule for small tensors. Use DDP, or --optim dualadam under DeepSpeed."
            )
        # Resolves blend_fraction (a no-op for switch_rate/blend_steps); max_steps counts optimizer steps.
        found.set_total_steps(state.max_steps)
        if not args.max_grad_norm or args.max_grad_norm <= 0:
            warnings.warn(
                "DualAdam is training without gradient clipping (max_grad_norm is off). Its inverse part grows "
                "like g*|g|: on raw, large gradients it can diverge where AdamW converges. Keep max_grad_norm "
                "(the Trainer's default is 1.0) unless you know your gradients are small.", UserWarning, stacklevel=2,
            )
        if any(g.get("inverse_scale") == AUTO for g in found.param_groups) and "deepspeed" in _wrapper_chain(
                optimizer).lower():
            warnings.warn(
                'inverse_scale="auto" under DeepSpeed ZeRO is calibrated per flat partition of each rank, not per '
                "parameter tensor: the run differs from a single-process one and depends on the number of "
                "processes (docs/engines.md). DDP and FSDP2 calibrate per tensor.", UserWarning, stacklevel=2,
            )
        if state.global_step > 0 and not any(found.state.values()):
            warnings.warn(
                f"Resumed at step {state.global_step} with an empty DualAdam state: the checkpoint held no "
                "optimizer state (optimizer.pt), so bias correction and the blend restart from step 1.",
                UserWarning, stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        opt = self._optimizer
        if opt is None or logs is None or not ("loss" in logs or "learning_rate" in logs):
            return
        # Report a group that has stepped: one without state (e.g. an empty no-decay group under LoRA) would
        # report the weight of step 1.
        group = next((i for i, g in enumerate(opt.param_groups)
                      if any("step" in opt.state.get(p, {}) for p in g["params"])), 0)
        blend = opt.blend_weight(group)
        added = {BLEND_LOG_KEY: blend, INVERSE_SHARE_LOG_KEY: opt.inverse_share(),
                 # The rate the log reports (the Trainer's learning_rate), else the group's.
                 EFFECTIVE_LR_LOG_KEY: float(logs.get("learning_rate", opt.param_groups[group]["lr"])) * (1.0 - blend),
                 # This process's count: a sharded engine's other ranks skip (and count) their own shards.
                 NONFINITE_SKIPS_LOG_KEY: getattr(opt, "nonfinite_skips", 0)}
        # Trainer.log stores a copy of `logs` in log_history before calling the callbacks; add the numbers to
        # that copy too so they are saved in trainer_state.json.
        latest = state.log_history[-1] if state.log_history else {}
        if latest.get("step") == state.global_step and all(
                latest.get(key) == value for key, value in logs.items() if key not in added):
            latest.update(added)
        logs.update(added)


def attach_callback(trainer: Any) -> DualAdamCallback | None:
    """If the Trainer will train with DualAdam (by `--optim`, `optimizer_cls_and_kwargs` or `optimizers`), put
    one DualAdamCallback right after the flow callback, ahead of the reporting integrations.

    The position matters: TensorBoard/W&B callbacks write `logs` in their own on_log, so the blend must be added
    before they run. A DualAdamCallback the user passed is moved there rather than duplicated.
    """
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if not (optimizer_name(trainer.args) in OPTIMIZER_NAMES
            or (cls_and_kwargs is not None and isinstance(cls_and_kwargs[0], type)
                and issubclass(cls_and_kwargs[0], DualAdam))
            or find_dualadam(getattr(trainer, "optimizer", None)) is not None):
        return None
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, DualAdamCallback)]
    for cb in existing:
        callbacks.remove(cb)
    position = max((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), default=0)
    callbacks.insert(position, existing[0] if existing else DualAdamCallback())
    return callbacks[position]
