"""DualAdam with PEFT LoRA adapters (Trainer `--optim dualadam`) and with LoRA+ (`create_loraplus_optimizer`)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import AutoModelForCausalLM

from dualadam_hf import DualAdam, DualAdamCallback, blend_weight, optimizer_cls_and_kwargs
from dualadam_hf.integrations.callbacks import BLEND_LOG_KEY
from dualadam_hf.integrations.unwrap import find_dualadam

from .helpers import lora_trainer, make_args, training_logs


def lora_model(model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def test_lora_adapters_only_reach_the_optimizer_train_save_and_load(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir)
    args = make_args(tmp_path, max_steps=10, learning_rate=5e-2, weight_decay=0.1, optim_args="blend_fraction=0.3")
    trainer = lora_trainer(tiny_model_dir, model, args)
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert in_optimizer == trainable and all("lora_" in n for n in in_optimizer) and len(in_optimizer) == 12
    decay_names = set(trainer.get_decay_parameter_names(model))
    assert {names[id(p)] for p in optimizer.param_groups[0]["params"]} == decay_names & trainable
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert type(find_dualadam(trainer.optimizer)) is DualAdam
    logs = training_logs(trainer)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [e[BLEND_LOG_KEY] for e in logs] == pytest.approx([blend_weight(e["step"], 1 / 3) for e in logs])
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    batch = torch.tensor([[5, 9, 12, 7, 20]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, model(batch).logits)


def test_loraplus_with_dualadam(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir)
    args = make_args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=6, learning_rate=2e-2)
    optimizer_cls, kwargs = optimizer_cls_and_kwargs(args, blend_fraction=0.5)
    lr = kwargs.pop("lr")
    weight_decay = kwargs.pop("weight_decay")
    optimizer = create_loraplus_optimizer(
        model, optimizer_cls, lr=lr, loraplus_lr_ratio=8, loraplus_weight_decay=weight_decay, **kwargs
    )
    group_a, _embedding, group_b, _group_b_no_decay = optimizer.param_groups
    assert group_b["lr"] == pytest.approx(8 * group_a["lr"])
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])

    trainer = lora_trainer(tiny_model_dir, model, args, optimizers=(optimizer, None))
    assert any(isinstance(cb, DualAdamCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert optimizer.param_groups[0]["switch_rate"] == pytest.approx(1 / 3)  # half of 6 steps
    logs = training_logs(trainer)
    assert [e[BLEND_LOG_KEY] for e in logs] == pytest.approx([blend_weight(s, 1 / 3) for s in range(1, 7)])
    assert logs[-1]["loss"] < logs[0]["loss"]
