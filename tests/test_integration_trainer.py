"""`--optim dualadam` through the Hugging Face Trainer, in-process, on the tiny offline Llama."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_callback import DefaultFlowCallback

from dualadam_hf import DualAdam, DualAdamCallback, InvAdam, blend_weight, optimizer_cls_and_kwargs
from dualadam_hf.experiments.tiny import tiny_lm_dataset
from dualadam_hf.integrations.callbacks import BLEND_LOG_KEY
from dualadam_hf.integrations.unwrap import find_dualadam
from tests.helpers import make_args, make_trainer, training_logs


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_optim_dualadam_trains_resolves_blend_fraction_and_logs_blend(tiny_model_dir, tmp_path):
    recorder = LogRecorder()
    args = make_args(tmp_path, optim_args="blend_fraction=0.5", adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    trainer = make_trainer(tiny_model_dir, args, callbacks=[recorder])
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and isinstance(callbacks[1], DualAdamCallback)
    trainer.train()

    optimizer = find_dualadam(trainer.optimizer)
    assert type(optimizer) is DualAdam
    group = optimizer.param_groups[0]
    assert group["switch_rate"] == pytest.approx(1 / 4)  # half of 8 steps
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7

    logs = training_logs(trainer)
    assert [entry["step"] for entry in logs] == list(range(1, 9))
    for entry in logs:
        assert entry[BLEND_LOG_KEY] == pytest.approx(blend_weight(entry["step"], 0.25))
    assert logs[0][BLEND_LOG_KEY] > 0 and logs[-1][BLEND_LOG_KEY] == 0
    assert logs[-1]["loss"] < logs[0]["loss"]
    # Callbacks after ours (reporting integrations, user callbacks) see the blend too.
    assert [entry[BLEND_LOG_KEY] for entry in recorder.logs if "loss" in entry] == [e[BLEND_LOG_KEY] for e in logs]


def test_dualadam_decays_only_what_the_trainer_puts_in_its_decay_group(tiny_model_dir, tmp_path):
    # With zero gradients the update is the weight decay alone: p * (1 - lr * wd) for the Trainer's decay
    # group, untouched for the rest (norms, biases). What is checked is DualAdam's use of the groups.
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path, weight_decay=0.1, max_steps=1))
    trainer.create_optimizer()
    decay_group, no_decay_group = trainer.optimizer.param_groups
    assert decay_group["params"] and no_decay_group["params"]
    before = {p: p.detach().clone() for p in decay_group["params"] + no_decay_group["params"]}
    for p in before:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    lr = decay_group["lr"]
    for p in decay_group["params"]:
        torch.testing.assert_close(p.detach(), before[p] * (1 - lr * 0.1))
    for p in no_decay_group["params"]:
        assert torch.equal(p.detach(), before[p])


def test_optim_invadam_builds_invadam_and_logs_full_blend(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path, optim="invadam", optim_args=None, max_steps=2))
    trainer.train()
    assert type(find_dualadam(trainer.optimizer)) is InvAdam
    assert [entry[BLEND_LOG_KEY] for entry in training_logs(trainer)] == [1.0, 1.0]


def test_patch_free_optimizer_cls_and_kwargs_path(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=4, weight_decay=0.05)
    optimizer_cls, kwargs = optimizer_cls_and_kwargs(args, blend_steps=2)
    assert optimizer_cls is DualAdam
    assert kwargs == {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "blend_steps": 2}
    # A DualAdamCallback passed by the user is moved ahead of the others, not duplicated.
    trainer = make_trainer(
        tiny_model_dir, args, optimizer_cls_and_kwargs=(optimizer_cls, kwargs), callbacks=[DualAdamCallback()]
    )
    assert sum(isinstance(cb, DualAdamCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert type(find_dualadam(trainer.optimizer)) is DualAdam
    assert [entry[BLEND_LOG_KEY] for entry in training_logs(trainer)] == [blend_weight(s, 0.5) for s in (1, 2, 3, 4)]


def test_other_optimizers_get_no_callback(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, make_args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=1))
    assert not any(isinstance(cb, DualAdamCallback) for cb in trainer.callback_handler.callbacks)


def test_requested_dualadam_but_other_optimizer_raises(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, max_steps=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_lm_dataset(tokenizer, 8),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        optimizers=(torch.optim.AdamW(model.parameters()), None),
    )
    with pytest.raises(RuntimeError, match="optim is 'dualadam' but the Trainer's optimizer is .*AdamW"):
        trainer.train()


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, optim_args="blend_fraction=0.5")
    full = make_trainer(tiny_model_dir, make_args(tmp_path / "full", **settings))
    full.train()

    resumed = make_trainer(tiny_model_dir, make_args(tmp_path / "resumed", **settings))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))

    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    full_logs = {e["step"]: e[BLEND_LOG_KEY] for e in training_logs(full)}
    resumed_logs = {e["step"]: e[BLEND_LOG_KEY] for e in training_logs(resumed)}
    assert set(resumed_logs) == {1, 2, 3, 4, 5, 6}  # steps 1-3 come from the checkpoint's trainer_state.json
    assert resumed_logs == full_logs
    assert find_dualadam(resumed.optimizer).current_step() == 6


def test_inverse_share_is_logged_with_the_blend_and_tracks_inverse_scale(tiny_model_dir, tmp_path):
    shares = {}
    for scale in ("1", "auto"):
        args = make_args(tmp_path / scale, optim_args=f"blend_steps=4,inverse_scale={scale}")
        trainer = make_trainer(tiny_model_dir, args)
        trainer.train()
        logs = training_logs(trainer)
        shares[scale] = [entry["dualadam/inverse_share"] for entry in logs]
        assert all((s > 0) == (entry[BLEND_LOG_KEY] > 0) for s, entry in zip(shares[scale], logs, strict=True))
    # With the calibrated scale the inverse part is a share of the order of r, far above the paper's rule.
    assert shares["auto"][0] > 0.3 and shares["auto"][0] > 10 * shares["1"][0]


def test_training_without_clipping_warns_once(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="without gradient clipping") as caught:
        make_trainer(tiny_model_dir, make_args(tmp_path, max_grad_norm=0.0, max_steps=2)).train()
    assert sum("gradient clipping" in str(w.message) for w in caught) == 1


def test_resuming_with_an_empty_optimizer_state_warns(tiny_model_dir, tmp_path):
    first = make_trainer(tiny_model_dir, make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    first.train()
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    again = make_trainer(tiny_model_dir, make_args(tmp_path, max_steps=4))
    with pytest.warns(UserWarning, match="Resumed at step 2 with an empty DualAdam state"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
