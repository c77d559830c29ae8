"""`dualadam-hf sharpness` on tiny saved models: full, PEFT adapter, classifier, run folders, a recipe."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest

from dualadam_hf import sharpness_cli

FAST = ["--max-iters", "3", "--probes", "2", "--seeds", "1", "--batches", "1", "--batch-size", "2",
        "--max-length", "8", "--quiet"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sharpness_cli.add_arguments(parser)
    return sharpness_cli.run(parser.parse_args(argv))


def _printed_numbers(out: str) -> dict[str, float]:
    numbers = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) == 2:
            numbers[parts[0]] = float(parts[1])
    return numbers


def _check_record(path: Path, out: str) -> dict:
    record = json.loads(path.read_text())
    results = record["results"]
    for key in ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst", "sharpness_random"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    printed = _printed_numbers(out)
    assert set(printed) == set(results)
    for key, value in results.items():
        assert math.isclose(printed[key], value, rel_tol=1e-7, abs_tol=1e-12), (key, printed[key], value)
    return record


def test_cli_writes_the_printed_numbers_for_a_saved_model(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(["--model", tiny_model_dir, "--random-batches", "--output", str(output), *FAST]) == 0
    record = _check_record(output / "sharpness.json", capsys.readouterr().out)
    assert record["model"] == tiny_model_dir
    assert record["params"] == "trainable"
    assert record["settings"]["max_iters"] == 3 and record["settings"]["probes"] == 2
    assert record["results"]["probes"] == 2.0 and record["results"]["eigenvalue_iterations"] <= 3
    # Every weight of a full model is trainable.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert record["results"]["num_params"] == sum(p.numel() for p in model.parameters())
    # Same seed, same numbers.
    assert _run(["--model", tiny_model_dir, "--random-batches", "--output", str(tmp_path / "again.json"),
                 *FAST]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]
    assert {k: v for k, v in again.items() if not k.startswith("seconds")} == {
        k: v for k, v in record["results"].items() if not k.startswith("seconds")
    }


def test_cli_on_a_run_folder_takes_the_last_checkpoint_and_writes_into_the_run_folder(
    tiny_model_dir, tiny_chat_dataset_dir, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run_dir / "checkpoint-10")
    shutil.copytree(tiny_model_dir, run_dir / "checkpoint-2")
    (run_dir / "checkpoint-2" / "config.json").write_text("not json")  # would fail if it were picked
    data = str(Path(tiny_chat_dataset_dir) / "train.jsonl")
    assert _run(["--model", str(run_dir), "--data", data, *FAST]) == 0
    record = _check_record(run_dir / "sharpness.json", capsys.readouterr().out)
    assert record["model"] == str(run_dir / "checkpoint-10")
    assert "train.jsonl" in record["data"]


def test_cli_on_a_peft_adapter_folder_measures_the_adapters(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(str(adapter_dir))  # no tokenizer here: it comes from the base model
    data = str(Path(tiny_chat_dataset_dir) / "train.jsonl")
    assert _run(["--model", str(adapter_dir), "--data", data, *FAST]) == 0
    record = _check_record(adapter_dir / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_params"] == lora_count
    assert record["results"]["top_eigenvalue"] != 0  # random weights: either sign is possible
    # --params all takes the frozen base weights too.
    assert _run(["--model", str(adapter_dir), "--data", data, "--params", "all",
                 "--output", str(tmp_path / "all.json"), *FAST]) == 0
    everything = json.loads((tmp_path / "all.json").read_text())["results"]
    assert everything["num_params"] == sum(p.numel() for p in model.parameters())


def test_cli_on_a_sequence_classifier_with_labelled_jsonl(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dualadam_hf.tiny import build_tiny_tokenizer

    folder = tmp_path / "classifier"
    tokenizer = build_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"what is {i} + {i} ?", "label": i % 3}) + "\n" for i in range(6)))
    assert _run(["--model", str(folder), "--data", str(data), *FAST]) == 0
    record = _check_record(folder / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_parts"] == 1.0
    # A row without a label is an error that names the row.
    (tmp_path / "unlabelled.jsonl").write_text(json.dumps({"text": "1 + 1"}) + "\n")
    assert _run(["--model", str(folder), "--data", str(tmp_path / "unlabelled.jsonl"), *FAST]) == 2
    assert 'row 1 needs an integer "label"' in capsys.readouterr().err


def test_cli_with_a_recipe_uses_its_held_out_batches(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, capsys):
    from dualadam_hf.tiny import write_tiny_chat_jsonl

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(Path(tiny_chat_dataset_dir) / "train.jsonl", data_dir / "train.jsonl")
    write_tiny_chat_jsonl(data_dir / "test.jsonl", n=8, seed=5)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"task: sft\nmodel_name_or_path: {tiny_model_dir}\ndataset_name: {data_dir}\n"
        f"max_length: 32\nper_device_eval_batch_size: 2\noutput_dir: {tmp_path / 'outputs'}\nreport_to: none\n"
        "accuracy_size: 0\nbf16: false\n"
    )
    settings = ["--max-iters", "2", "--probes", "2", "--seeds", "1", "--quiet"]
    out_file = tmp_path / "recipe.json"
    assert _run(["--model", tiny_model_dir, "--config", str(recipe), "--batches", "2", "--output", str(out_file),
                 *settings]) == 0
    record = _check_record(out_file, capsys.readouterr().out)
    assert record["data"] == f"recipe {recipe}: 2 held-out batches, 4 rows"  # the recipe's batch size
    assert record["results"]["num_parts"] == 2.0
    # --batch-size and --max-length override the recipe's eval batch size and row length.
    assert _run(["--model", tiny_model_dir, "--config", str(recipe), "--batches", "1", "--batch-size", "1",
                 "--max-length", "6", "--output", str(out_file), *settings]) == 0
    record = _check_record(out_file, capsys.readouterr().out)
    assert record["data"] == f"recipe {recipe}: 1 held-out batches, 1 rows"
    assert record["results"]["num_tokens"] == 6.0


def test_cli_errors_are_clear_and_return_2(tiny_model_dir, tmp_path, capsys):
    assert _run(["--model", tiny_model_dir, *FAST]) == 2
    assert "--config, --data or --random-batches" in capsys.readouterr().err
    assert _run(["--model", tiny_model_dir, "--random-batches", "--data", "x.jsonl", *FAST]) == 2
    assert "only one of" in capsys.readouterr().err
    assert _run(["--model", str(tmp_path / "missing"), "--random-batches", *FAST]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run(["--model", str(tmp_path / "empty"), "--random-batches", *FAST]) == 2
    assert "no model in" in capsys.readouterr().err
    assert _run(["--model", tiny_model_dir, "--random-batches", "--output", str(tmp_path / "o"),
                 *FAST, "--rho", "0"]) == 2
    assert "--rho must be > 0" in capsys.readouterr().err
    assert _run(["--model", tiny_model_dir, "--data", str(tmp_path / "nope.jsonl"), *FAST]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_dualadam_hf_sharpness_command_is_wired(tiny_model_dir, tmp_path, capsys):
    from dualadam_hf.cli import main

    out_file = tmp_path / "wired.json"
    assert main(["sharpness", "--model", tiny_model_dir, "--random-batches", "--output", str(out_file), *FAST]) == 0
    _check_record(out_file, capsys.readouterr().out)


@pytest.mark.parametrize("names", [["final"], []])
def test_resolve_model_folder_prefers_the_final_model(tmp_path, names):
    run_dir = tmp_path / "run"
    for name in ["checkpoint-3", "checkpoint-12", *names]:
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "adapter_config.json").write_text("{}")
    expected = run_dir / (names[0] if names else "checkpoint-12")
    assert sharpness_cli.resolve_model_folder(run_dir) == expected
    (run_dir / "adapter_config.json").write_text("{}")  # a model at the top wins
    assert sharpness_cli.resolve_model_folder(run_dir) == run_dir


def test_cli_on_a_classification_lora_adapter_reads_the_head_size_from_its_weights(tiny_model_dir, tmp_path, capsys):
    # As in a classification recipe: a causal-LM base, a new 3-class head trained with the adapters.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(base, lora)
    adapter_dir = tmp_path / "cls_adapter"
    model.save_pretrained(str(adapter_dir))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # adapters + the new head
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} + {i} = ?", "label": i % 3}) + "\n" for i in range(4)))
    assert _run(["--model", str(adapter_dir), "--data", str(data), *FAST]) == 0
    record = _check_record(adapter_dir / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_params"] == trainable
