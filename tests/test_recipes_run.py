"""The GPU-scale recipes load and run 2 steps on CPU with tiny stand-ins for the model and the data.

Only the model, the data and the sizes are overridden; every other setting (LoRA or full, the optimizer,
the schedule, evaluation) comes from the recipe itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualadam_hf.experiments import load_experiment as load_recipe
from dualadam_hf.experiments.tiny import build_tiny_tokenizer, tiny_arithmetic_pairs
from dualadam_hf.experiments.train import ACCURACY_KEY, ACCURACY_ROWS_FILE, DONE_FILE, PEAK_MEMORY_KEY, run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def tiny_overrides(model_dir: str, dataset: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--dataset_name", dataset, "--output_dir", str(output_dir),
        "--bf16", "false", "--dtype", "float32", "--attn_implementation", "eager",
        "--max_steps", "2", "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "2", "--eval_steps", "1",
        "--logging_steps", "1", "--save_steps", "1", "--eval_size", "4", "--disable_tqdm", "true",
    ]


def check_state(output_dir: Path) -> list[dict]:
    """The run finished 2 DualAdam steps and left its log and a usable last checkpoint."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    history = state["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert all("dualadam/blend" in e for e in history if "loss" in e)  # the recipe's optim: dualadam ran
    assert any("eval_loss" in e for e in history)
    assert [e for e in history if PEAK_MEMORY_KEY in e][-1][PEAK_MEMORY_KEY] > 0
    # save_total_limit 1 keeps only the newest checkpoint, and it holds the optimizer state to resume from.
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"] and (output_dir / "checkpoint-2" / "optimizer.pt").is_file()
    assert json.loads((output_dir / DONE_FILE).read_text())["log_history"] == history
    return history


@pytest.fixture(scope="module")
def gsm8k_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k.jsonl"
    with path.open("w") as f:
        for question, answer in tiny_arithmetic_pairs(16, seed=3):
            result = answer.split("=")[-1].strip()
            f.write(json.dumps({"question": question, "answer": f"{answer}\n#### {result}"}) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5_0.5b_math_lora.yaml", "qwen2.5_1.5b_math_full.yaml"])
def test_math_gpu_recipe_runs_two_steps_on_a_tiny_model(name, tiny_model_dir, gsm8k_jsonl, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, gsm8k_jsonl, out) + [
        "--accuracy_size", "2", "--max_new_tokens", "4", "--generation_batch_size", "2", "--max_length", "128",
    ]
    recipe = load_recipe(RECIPES / name, overrides)
    assert recipe.args.dataset_format == "gsm8k"
    run(recipe)
    history = check_state(out)
    accuracy = [e[ACCURACY_KEY] for e in history if ACCURACY_KEY in e]
    rows = json.loads((out / ACCURACY_ROWS_FILE).read_text())
    assert len(rows) == 2 and accuracy == [sum(rows) / 2]  # the logged accuracy is the scored rows' mean
    assert (out / "adapter_config.json").is_file() == recipe.model.use_peft


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny RobertaForSequenceClassification built from a config."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_roberta")
    tokenizer = build_tiny_tokenizer(folder)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=tokenizer.model_max_length + 4,
        pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_classification_recipe_runs_two_steps_on_a_tiny_classifier(tiny_classifier_dir, tmp_path):
    data = tmp_path / "sentiment.jsonl"
    with data.open("w") as f:
        for i in range(24):
            good = i % 2 == 0
            text = ("good good day" if good else "bad bad day") + " a" * i  # distinct rows: none repeats a held-out one
            f.write(json.dumps({"text": text, "label": int(good)}) + "\n")
    out = tmp_path / "run"
    recipe = load_recipe(
        RECIPES / "roberta_sst2_lora.yaml",
        tiny_overrides(tiny_classifier_dir, str(data), out) + ["--text_column", "text"],
    )
    assert recipe.args.task == "classification" and recipe.model.use_peft
    run(recipe)
    history = check_state(out)
    accuracy = [e["eval_accuracy"] for e in history if "eval_accuracy" in e]
    assert accuracy and all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in accuracy)  # 4 held-out rows
    assert (out / "adapter_config.json").is_file()
