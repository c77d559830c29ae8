import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualadam_hf.experiments.tiny import build_tiny_tokenizer, tiny_arithmetic_pairs, write_tiny_chat_jsonl


def test_tiny_model_and_tokenizer_load_offline_and_run(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    batch = tokenizer(["what is 3 + 4 ?", "12 * 2 = 24"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape[-1] == len(tokenizer)
    assert out.loss.item() > 0


def test_every_dataset_token_is_in_vocabulary(tmp_path):
    tokenizer = build_tiny_tokenizer()
    path = write_tiny_chat_jsonl(tmp_path / "train.jsonl", n=32, seed=1)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(rows) == 32
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_chat_template_masks_assistant_turn_including_end_token():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.convert_ids_to_tokens(masked) == ["2", "+", "2", "=", "4", "<|end|>"]
    assert tokenizer.eos_token == "<|end|>"


def test_arithmetic_pairs_are_correct_and_seeded():
    pairs = tiny_arithmetic_pairs(20, seed=3)
    assert pairs == tiny_arithmetic_pairs(20, seed=3)
    for question, answer in pairs:
        expression, result = answer.split(" = ")
        assert question == f"what is {expression} ?"
        assert eval(expression) == int(result)  # noqa: S307 - our own generated arithmetic
    with pytest.raises(ValueError, match="n must be"):
        tiny_arithmetic_pairs(0)
