"""`dualadam-hf sharpness` on tiny saved models: full, PEFT adapter, classifier, run folders, a recipe,
and bad input (exit code 2, one line on stderr, nothing measured)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from dualadam_hf.experiments import sharpness_cli
from dualadam_hf.experiments.sharpness import SharpnessSettings

FAST = ["--max-iters", "3", "--probes", "2", "--seeds", "1", "--batches", "1", "--batch-size", "2",
        "--max-length", "8", "--quiet"]
PREFIX = "dualadam-hf sharpness: error: "


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


def _one_error_line(err: str, *needles: str) -> None:
    # Only loading progress bars (carriage-return lines) may come before the error; no traceback.
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith(PREFIX), err
    assert [line for line in lines if PREFIX in line] == lines[-1:], err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture
def never_measured(monkeypatch):
    """Bad input must be caught before any Hessian product."""

    def fail(*args, **kwargs):
        raise AssertionError("measure_sharpness ran despite bad input")

    monkeypatch.setattr(sharpness_cli, "measure_sharpness", fail)


def _complete_checkpoint(source: str, folder: Path, step: int) -> None:
    shutil.copytree(source, folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_cli_writes_the_printed_numbers_for_a_saved_model(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--output", str(output), *FAST]) == 0
    record = _check_record(output / "sharpness.json", capsys.readouterr().out)
    assert record["model"] == tiny_model_dir
    assert record["params"] == "trainable"
    # The settings record as measured (batch size resolved), plus how the model was loaded.
    assert record["settings"] == {**vars(SharpnessSettings()), "max_iters": 3, "probes": 2, "seeds": 1, "batches": 1,
                                  "batch_size": 2}
    assert (record["dtype"], record["device"]) == ("float32", "cpu")
    assert record["results"]["probes"] == 2.0 and record["results"]["eigenvalue_iterations"] <= 3
    # Its manifest: the measured model by content, the batches, the settings, and where it came from.
    manifest = record["run_manifest"]
    assert set(manifest["inputs"]["model"]) == {"model weights", "model config", "tokenizer", "chat template"}
    assert manifest["inputs"]["data"] == {"random batches": {"seed": record["settings"]["seed"], "max_length": 8}}
    assert manifest["segments"][0]["ended"] and manifest["segments"][0]["libraries"]["torch"]
    assert record["results"]["num_tokens"] == 2 * 8
    # Every weight of a full model is trainable.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert record["results"]["num_params"] == sum(p.numel() for p in model.parameters())
    # Same seed, same numbers; underscores and dashes name the same options.
    underscored = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in FAST]
    assert sharpness_cli.main(["--model", tiny_model_dir, "--random-batches", "--output",
                               str(tmp_path / "again.json"), *underscored]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]
    assert {k: v for k, v in again.items() if not k.startswith("seconds")} == {
        k: v for k, v in record["results"].items() if not k.startswith("seconds")
    }


def test_cli_on_a_run_folder_measures_its_newest_complete_checkpoint(tiny_model_dir, tiny_chat_dataset_dir, tmp_path,
                                                                  capsys):
    run_dir = tmp_path / "run"
    _complete_checkpoint(tiny_model_dir, run_dir / "checkpoint-10", 10)
    _complete_checkpoint(tiny_model_dir, run_dir / "checkpoint-2", 2)
    (run_dir / "checkpoint-2" / "config.json").write_text("not json")  # would fail if it were picked
    shutil.copytree(tiny_model_dir, run_dir / "checkpoint-12")  # cut off: no trainer_state.json
    (run_dir / "checkpoint-12" / "config.json").write_text("not json")
    data = str(Path(tiny_chat_dataset_dir) / "train.jsonl")
    assert sharpness_cli.main(["--model", str(run_dir), "--data", data, *FAST]) == 0
    record = _check_record(run_dir / "sharpness.json", capsys.readouterr().out)  # into the run folder
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
    assert sharpness_cli.main(["--model", str(adapter_dir), "--data", data, *FAST]) == 0
    record = _check_record(adapter_dir / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_params"] == lora_count
    assert record["results"]["top_eigenvalue"] != 0  # random weights: either sign is possible
    # --params all takes the frozen base weights too.
    assert sharpness_cli.main(["--model", str(adapter_dir), "--data", data, "--params", "all",
                               "--output", str(tmp_path / "all.json"), *FAST]) == 0
    everything = json.loads((tmp_path / "all.json").read_text())["results"]
    assert everything["num_params"] == sum(p.numel() for p in model.parameters())


def test_jsonl_rows_are_encoded_like_training_text(tiny_model_dir):
    # Chat rows go through the chat template once (no second BOS); text rows as the tokenizer encodes them;
    # prompt + completion rows are joined. Every row is cut to max_length and padded per batch.
    from dualadam_hf.experiments.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "4"}]
    rows = [{"messages": messages}, {"text": "one plus one"}, {"prompt": "one plus", "completion": " one"},
            {"prompt": messages[:1], "completion": messages[1:]}]
    batches = sharpness_cli.jsonl_batches(rows, tokenizer, classifier=False, batch_size=3, max_length=12)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    chat = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert batches[0]["input_ids"][0].tolist() == chat[:12]
    assert batches[1]["input_ids"][0].tolist() == chat[:12]
    assert batches[0]["attention_mask"][1].sum() == len(tokenizer("one plus one")["input_ids"])
    assert batches[0]["attention_mask"][2].sum() == len(tokenizer("one plus one")["input_ids"])


def _tiny_classifier_folder(folder: Path, num_labels: int = 3) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dualadam_hf.experiments.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    return str(folder)


def test_cli_on_a_sequence_classifier_with_labelled_jsonl(tmp_path, capsys, never_measured, monkeypatch):
    folder = Path(_tiny_classifier_folder(tmp_path / "classifier"))
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"what is {i} + {i} ?", "label": i % 3}) + "\n" for i in range(6)))
    # Rows without a label, or with one the head does not have, are errors that name the row (before measuring).
    (tmp_path / "unlabelled.jsonl").write_text(json.dumps({"text": "1 + 1"}) + "\n")
    assert sharpness_cli.main(["--model", str(folder), "--data", str(tmp_path / "unlabelled.jsonl"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, 'row 1 needs an integer "label" in [0, 3)')
    (tmp_path / "bad_label.jsonl").write_text(json.dumps({"text": "1 + 1", "label": 3}) + "\n")
    assert sharpness_cli.main(["--model", str(folder), "--data", str(tmp_path / "bad_label.jsonl"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "bad_label.jsonl row 1", "got 3")
    monkeypatch.undo()
    assert sharpness_cli.main(["--model", str(folder), "--data", str(data), *FAST]) == 0
    record = _check_record(folder / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_parts"] == 1.0


def _recipe(tmp_path: Path, tiny_model_dir: str, extra: str = "") -> Path:
    from dualadam_hf.experiments.tiny import write_tiny_chat_jsonl

    data_dir = tmp_path / "data"
    write_tiny_chat_jsonl(data_dir / "train.jsonl", n=16, seed=0)
    write_tiny_chat_jsonl(data_dir / "test.jsonl", n=8, seed=5)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"task: sft\nmodel_name_or_path: {tiny_model_dir}\ndataset_name: {data_dir}\nmax_length: 32\n"
        f"per_device_eval_batch_size: 2\noutput_dir: {tmp_path / 'outputs'}\nreport_to: none\naccuracy_size: 0\n"
        f"bf16: false\nassistant_only_loss: true\n{extra}"
    )
    return recipe


def test_cli_with_a_recipe_measures_exactly_the_batches_training_evaluated(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from dualadam_hf.experiments.arguments import load_experiment
    from dualadam_hf.experiments.data import load_splits
    from dualadam_hf.experiments.trainers import build_trainer, eval_batches

    # use_peft: the model given is measured as saved, with no fresh LoRA from the recipe on top of it.
    recipe = _recipe(tmp_path, tiny_model_dir, "use_peft: true\nlora_r: 2\nlora_target_modules: [q_proj]\n")
    seen = []

    def spy(model, batches, settings, **kwargs):
        seen.append(batches)
        return real(model, batches, settings, **kwargs)

    real = sharpness_cli.measure_sharpness
    monkeypatch.setattr(sharpness_cli, "measure_sharpness", spy)
    out_file = tmp_path / "recipe.json"
    settings = ["--max_iters", "2", "--probes", "2", "--seeds", "1", "--quiet"]
    assert sharpness_cli.main(["--model", tiny_model_dir, "--config", str(recipe), "--batches", "2",
                               "--output", str(out_file), *settings]) == 0
    record = _check_record(out_file, capsys.readouterr().out)
    assert record["data"] == f"recipe {recipe}: 2 held-out batches, 4 rows"  # the recipe's eval batch size
    assert record["settings"]["batch_size"] == 2
    assert record["results"]["num_parts"] == 2.0
    assert not (tmp_path / "outputs").exists()  # the recipe's run folder is not created by measuring
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert record["results"]["num_params"] == sum(p.numel() for p in model.parameters())
    # The same batches the trainer's evaluation sees: labels on the assistant answer only.
    experiment = load_experiment(recipe)
    train, heldout = load_splits(experiment)
    trainer, _ = build_trainer(experiment, tiny_model_dir, train, heldout)
    expected = eval_batches(trainer, 2)
    assert len(seen[0]) == len(expected) == 2
    for got, want in zip(seen[0], expected, strict=True):
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].tolist() == want[key].tolist(), key
        assert ((want["labels"] == -100) & (want["attention_mask"] == 1)).any()  # the prompt is masked
    assert seen[0][0]["input_ids"].shape[1] > 14
    # --batch_size and --max_length override the recipe's eval batch size and row length (14 tokens still
    # reach into the answer; a row cut before it would have nothing to score and be dropped, as in training).
    assert sharpness_cli.main(["--model", tiny_model_dir, "--config", str(recipe), "--batches", "1",
                               "--batch_size", "1", "--max_length", "14", "--output", str(out_file), *settings]) == 0
    record = _check_record(out_file, capsys.readouterr().out)
    assert record["data"] == f"recipe {recipe}: 1 held-out batches, 1 rows"
    assert record["results"]["num_tokens"] == 14.0
    # Cut before every answer, no row has anything to score: said before measuring, with what to change.
    monkeypatch.setattr(sharpness_cli, "measure_sharpness", None)
    assert sharpness_cli.main(["--model", tiny_model_dir, "--config", str(recipe), "--max_length", "4",
                               *settings]) == 2
    _one_error_line(capsys.readouterr().err, "within max_length 4", "raise --max_length")


def test_a_recipe_for_another_task_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, never_measured):
    classifier = _tiny_classifier_folder(tmp_path / "classifier")
    recipe = _recipe(tmp_path, tiny_model_dir)
    assert sharpness_cli.main(["--model", classifier, "--config", str(recipe), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, f"recipe {recipe} has task sft", "holds a sequence classifier")


def test_bad_arguments_are_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, never_measured):
    main = sharpness_cli.main
    assert main(["--model", tiny_model_dir, *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "--config, --data or --random_batches")
    assert main(["--model", tiny_model_dir, "--random_batches", "--data", "x.jsonl", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "only one of")
    # Values the settings record rejects are reported by it, once.
    assert main(["--model", tiny_model_dir, "--random_batches", *FAST, "--rho", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "rho must be a finite number > 0, got 0.0")
    assert main(["--model", tiny_model_dir, "--random_batches", *FAST, "--params", "some"]) == 2
    _one_error_line(capsys.readouterr().err, "params must be one of")
    assert main(["--model", tiny_model_dir, "--random_batches", *FAST, "--max_length", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "--max_length must be >= 1")
    # Malformed options are argparse's: usage, then the error, exit 2.
    for argv in (["--max_iters", "many"], ["--bogus_option", "1"], ["--dtype", "float8"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(["--random_batches", *argv] if argv else argv)
        assert exit_info.value.code == 2
        assert PREFIX in capsys.readouterr().err


def test_missing_model_recipe_or_data_names_the_path(tiny_model_dir, tmp_path, capsys, never_measured):
    main = sharpness_cli.main
    missing = tmp_path / "missing_model"
    assert main(["--model", str(missing), "--random_batches", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, str(missing))
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--random_batches", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "no model in", str(tmp_path / "empty"))
    assert main(["--model", tiny_model_dir, "--data", str(tmp_path / "nope.jsonl"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "nope.jsonl"), "no such file")
    assert main(["--model", tiny_model_dir, "--config", str(tmp_path / "nope.yaml"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "recipe not found", "nope.yaml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert main(["--model", tiny_model_dir, "--data", str(bad), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, f"{bad}:2")


def test_bad_device_is_one_line_and_exit_2(tiny_model_dir, capsys, never_measured):
    import torch

    assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--device", "bogus", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "--device 'bogus' is not usable here")
    if not torch.cuda.is_available():
        assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--device", "cuda", *FAST]) == 2
        _one_error_line(capsys.readouterr().err, "--device 'cuda' is not usable here")
    else:  # an ordinal no machine has
        assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--device", "cuda:4096", *FAST]) == 2
        _one_error_line(capsys.readouterr().err, "--device 'cuda:4096' is not usable here")


def test_bad_output_is_caught_before_measuring(tiny_model_dir, tmp_path, capsys, never_measured):
    main = sharpness_cli.main
    missing = tmp_path / "no_such_folder"
    assert main(["--model", tiny_model_dir, "--random_batches", "--output", str(missing / "s.json"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, f"folder {missing} does not exist")
    assert main(["--model", tiny_model_dir, "--random_batches", "--output", str(missing), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, f"folder {missing} does not exist")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["--model", tiny_model_dir, "--random_batches", "--output", str(a_file / "s.json"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "does not exist")
    (tmp_path / "taken.json").mkdir()
    assert main(["--model", tiny_model_dir, "--random_batches", "--output", str(tmp_path / "taken.json"), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "is a folder, not a file")
    assert not list(tmp_path.rglob("sharpness.json"))


def test_read_only_output_folder_is_caught_before_measuring(tiny_model_dir, tmp_path, capsys, never_measured):
    # Root writes into read-only folders; nobody creates files in /proc, so root tests with it there.
    as_root = os.name == "posix" and os.geteuid() == 0 and Path("/proc").is_dir()
    locked = Path("/proc") if as_root else tmp_path / "locked"
    if not as_root:
        locked.mkdir()
        locked.chmod(0o500)
    try:
        assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--output", str(locked),
                                   *FAST]) == 2
    finally:
        if not as_root:
            locked.chmod(0o700)
    _one_error_line(capsys.readouterr().err, f"cannot write into {locked}")


def test_a_failed_write_after_measuring_still_prints_the_result(tiny_model_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "vanishing"
    output.mkdir()
    real = sharpness_cli.measure_sharpness

    def measure_then_lose_the_folder(*args, **kwargs):
        results = real(*args, **kwargs)
        shutil.rmtree(output)  # e.g. cleaned up by someone else during a long measurement
        return results

    monkeypatch.setattr(sharpness_cli, "measure_sharpness", measure_then_lose_the_folder)
    assert sharpness_cli.main(["--model", tiny_model_dir, "--random_batches", "--output", str(output), *FAST]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, f"cannot write {output / 'sharpness.json'}")
    table, marker, dump = captured.out.partition("the record that could not be written:\n")
    assert marker
    numbers = _printed_numbers(table)
    assert math.isfinite(numbers["top_eigenvalue"]) and math.isfinite(numbers["hessian_trace"])
    record = json.loads(dump)  # the full record, to save by hand
    assert record["results"]["top_eigenvalue"] == pytest.approx(numbers["top_eigenvalue"], rel=1e-7)


def test_dualadam_hf_sharpness_command_is_wired(tiny_model_dir, tmp_path, capsys):
    from dualadam_hf.experiments.cli import main

    out_file = tmp_path / "wired.json"
    assert main(["sharpness", "--model", tiny_model_dir, "--random-batches", "--output", str(out_file), *FAST]) == 0
    _check_record(out_file, capsys.readouterr().out)
    assert main(["sharpness", "--model", tiny_model_dir, "--random_batches", "--device", "bogus", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "--device 'bogus'")
    with pytest.raises(SystemExit) as exit_info:
        main(["sharpness", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dualadam-hf sharpness")
    for option in ("--model", "--config", "--data", "--random_batches", "--max_iters", "--max-iters", "--probes",
                   "--rho_random", "--max_graph_tokens", "--output", "--device"):
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sharpness" in capsys.readouterr().out


@pytest.mark.parametrize("names", [["final"], []])
def test_resolve_model_folder_prefers_the_final_model(tmp_path, names):
    run_dir = tmp_path / "run"
    for name in ["checkpoint-3", "checkpoint-12", "checkpoint-20", *names]:
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "adapter_config.json").write_text("{}")
        (run_dir / name / "adapter_model.safetensors").write_text("")
        if name != "checkpoint-20":  # the newest was cut off while saving
            (run_dir / name / "trainer_state.json").write_text("{}")
    expected = run_dir / (names[0] if names else "checkpoint-12")
    assert sharpness_cli.resolve_model_folder(run_dir) == expected
    (run_dir / "adapter_config.json").write_text("{}")  # a config without weights is no model (a cut-off save)
    assert sharpness_cli.resolve_model_folder(run_dir) == expected
    (run_dir / "adapter_model.safetensors").write_text("")  # a model at the top (the final save) wins
    assert sharpness_cli.resolve_model_folder(run_dir) == run_dir


def test_resolve_model_folder_says_what_it_skipped(tmp_path):
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "config.json").write_text("{}")
    with pytest.raises(sharpness_cli.SharpnessError, match=r"no model in .*skipped incomplete checkpoint-5 \(no "):
        sharpness_cli.resolve_model_folder(tmp_path / "run")


def test_the_folder_of_a_diverged_run_is_refused_in_one_line(tmp_path, capsys, never_measured):
    """Its weights are not finite: measured, they would end in a FloatingPointError traceback."""
    from tests.helpers import fake_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"non-finite weights an older version saved here")
    (run / "run_done.json").write_text(json.dumps({"log_history": [], "diverged": {"step": 5, "what": "grad_norm"}}))
    assert sharpness_cli.main(["--model", str(run), "--random_batches"]) == 2
    error = capsys.readouterr().err
    assert error == (f"{PREFIX}{run} holds a run marked diverged at step 5 ({run / 'run_done.json'}): its weights "
                     "are not finite, so it has no sharpness; it saved no checkpoint before diverging, so it keeps no "
                     "finite weights\n")
    fake_checkpoint(run, 4)
    assert sharpness_cli.main(["--model", str(run), "--random_batches"]) == 2
    assert f"its last checkpoint, {run / 'checkpoint-4'}, is the last finite one; pass that as --model to measure " \
           "it\n" in capsys.readouterr().err


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
    assert sharpness_cli.main(["--model", str(adapter_dir), "--data", str(data), *FAST]) == 0
    record = _check_record(adapter_dir / "sharpness.json", capsys.readouterr().out)
    assert record["results"]["num_params"] == trainable
