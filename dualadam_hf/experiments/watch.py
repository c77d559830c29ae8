"""What a training run watches for and records, beyond its metrics: divergence, and a blend too long for the run.

A **diverged** run is one whose training loss (or gradient norm) became non-finite. Training stops at the end of
that optimizer step: nothing a NaN model computes afterwards means anything, and the last checkpoint stays the
last finite one (no checkpoint, evaluation or final model is saved at that step; a run that saved no checkpoint
before keeps no weights at all). The run is then finished: its log history and ``run_done.json`` carry
``{"diverged": {"step": N, "what": "loss"}}``, which the comparison report reads to keep the run out of means and
intervals and to say so, and which ``dualadam-hf sharpness`` reads to refuse the run's folder.

A blend that does not end inside the run (e.g. the default switch_rate 0.01, a 100-step blend, with
``max_steps 20``) is announced at train start and recorded as ``{"blend_unfinished": {...}}``: DualAdam never
reaches plain Adam, and the matched warmup never reaches the full learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Keys of the log history and run_done.json: {"diverged": {"step": N, "what": "loss"}} when training stopped at a
# non-finite number, {"blend_unfinished": {...}} when the blend outlasts the run. The report reads both.
DIVERGED_KEY = "diverged"
BLEND_UNFINISHED_KEY = "blend_unfinished"


def _finite(value: Any) -> bool:
    return not isinstance(value, (int, float)) or isinstance(value, bool) or math.isfinite(value)


def _on_any_process(flag: bool, device: Any) -> bool:
    """``flag`` or-ed over the processes of a distributed run, so that every process stops at the same step
    (one stopping alone would leave the others waiting in the next collective)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def finite_checkpoint_words(output_dir: str | Path) -> str:
    """What a diverged run in ``output_dir`` keeps, in words: its last complete checkpoint, or none."""
    from .checkpoints import checkpoint_folders, incomplete_reason

    complete = [folder for folder in checkpoint_folders(output_dir) if incomplete_reason(folder) is None]
    if complete:
        return f"its last checkpoint, {complete[0]}, is the last finite one"
    return "it saved no checkpoint before diverging, so it keeps no finite weights"


def divergence_watch(trainer: Any, log: Callable[[str], None]) -> Any:
    """A callback, added to ``trainer``, that stops training at the first non-finite training loss or gradient
    norm and records where; its ``mark`` is that record (None while the run is finite).

    The loss is checked at every micro-batch (the Trainer's own ``training_step`` is wrapped: callbacks never
    see the loss, and transformers logs a non-finite one as the running mean); the gradient norm at every log,
    where it is the same number on every process."""
    import torch
    from transformers import TrainerCallback

    class DivergenceWatch(TrainerCallback):
        def __init__(self) -> None:
            self.first_bad: tuple[int, str] | None = None  # (step, what) seen by this process
            self.mark: dict[str, Any] | None = None

        def _stop(self, state: Any, control: Any, step: int, what: str) -> None:
            self.mark = {"step": step, "what": what}
            state.log_history.append({DIVERGED_KEY: self.mark, "step": state.global_step})
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False  # the last checkpoint stays a finite one
            log(f"[train] DIVERGED: the training {what} became non-finite at step {step}; training stops here and "
                f"the run is finished, marked diverged ({finite_checkpoint_words(trainer.args.output_dir)}).")

        def on_step_end(self, args, state, control, **kwargs):
            if self.mark is None and _on_any_process(self.first_bad is not None, args.device):
                step, what = self.first_bad or (state.global_step, "loss (on another process)")
                self._stop(state, control, step, what)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.mark is None and logs:
                bad = [key for key in ("loss", "grad_norm") if not _finite(logs.get(key))]
                # Under fp16 a loss scaler overflows now and then on purpose: it skips that step and lowers the
                # scale. An infinite gradient norm on a skipped step is that, not divergence.
                skipped = bool(getattr(getattr(trainer, "accelerator", None), "optimizer_step_was_skipped", False))
                if bad and not (bad == ["grad_norm"] and skipped):
                    self._stop(state, control, state.global_step, bad[0])

    watch = DivergenceWatch()
    original = trainer.training_step

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(model, inputs, *args, **kwargs)
        if watch.first_bad is None and not bool(torch.isfinite(loss.detach()).all()):
            watch.first_bad = (trainer.state.global_step + 1, "loss")  # the optimizer step being computed
        return loss

    trainer.training_step = training_step
    trainer.add_callback(watch)
    return watch


def unfinished_blend(optimizer: Any, max_steps: int) -> dict[str, Any] | None:
    """``{"blend_steps", "max_steps", "last_blend", "inverse_scale"}`` when DualAdam's blend outlasts a run of
    ``max_steps`` optimizer steps (None when it ends inside the run, or for InvAdam, whose blend never ends by
    design). ``last_blend`` is the inverse weight r at the run's last step."""
    from ..integrations.unwrap import find_dualadam
    from ..optimizer import InvAdam
    from ..schedule import blend_weight, last_blend_step

    found = find_dualadam(optimizer)
    if found is None or isinstance(found, InvAdam) or max_steps <= 0:
        return None
    for group in found.param_groups:
        rate = group.get("switch_rate")
        if rate and rate > 0 and last_blend_step(rate) >= max_steps:
            return {"blend_steps": math.ceil(1 / rate), "max_steps": max_steps,
                    "last_blend": float(blend_weight(max_steps, rate)), "inverse_scale": group.get("inverse_scale")}
    return None


def blend_length_check(trainer: Any, log: Callable[[str], None]) -> Any:
    """A callback, added to ``trainer``, that warns at train start when the blend does not end inside the run,
    and records it in the log history (once, even over resumed segments)."""
    from transformers import TrainerCallback

    class BlendLengthCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            found = unfinished_blend(optimizer, state.max_steps)
            if found is None:
                return
            what = ("the matched warmup never reaches the full learning rate (it ends at "
                    f"{1 - found['last_blend']:.2f} of it)" if found["inverse_scale"] == 0 else
                    "DualAdam never becomes plain Adam")
            log(f"[train] WARNING: the blend lasts {found['blend_steps']} optimizer steps but the run has "
                f"{found['max_steps']}: at its last step the inverse weight is still r={found['last_blend']:.2f}, "
                f"so {what}. Give a shorter blend (optim_args blend_steps or blend_fraction) or a longer run.")
            if not any(BLEND_UNFINISHED_KEY in entry for entry in state.log_history):
                state.log_history.append({BLEND_UNFINISHED_KEY: found, "step": state.global_step})

    check = BlendLengthCheck()
    trainer.add_callback(check)
    return check
