"""Recipe parsing: every shipped recipe loads, overrides win, and each kind of bad input gets a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments import arguments as config
from dualadam_hf.experiments.arguments import load_experiment as load_recipe
from dualadam_hf.experiments.data import gsm8k_to_chat, load_splits
from dualadam_hf.experiments.train import run
from dualadam_hf.experiments.trainers import build_trainer, eval_batches

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if "bf16: true" in p.read_text()]
# What makes a GPU recipe parse on this CPU machine.
CPU_OVERRIDES = ["--bf16", "false", "--dtype", "float32"]


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
model_name_or_path: some/model
dataset_name: data.jsonl
learning_rate: 1e-4
optim: dualadam
optim_args: blend_fraction=0.1
use_peft: true
lora_target_modules: [q_proj, v_proj]
max_steps: 3
bf16: false
"""


def base_with(line: str) -> str:
    """BASE with ``line`` in place of the line of the same key (a recipe names each key once)."""
    key = line.split(":", 1)[0]
    return "\n".join([kept for kept in BASE.splitlines() if not kept.startswith(f"{key}:")] + [line]) + "\n"


def test_there_are_cpu_and_gpu_recipes():
    names = {p.name for p in RECIPES}
    assert {"smollm2_math_lora.yaml", "smollm2_math_full.yaml", "roberta_sst2_lora.yaml"} <= names
    assert len(GPU_RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_its_header_is_the_command(path):
    overrides = CPU_OVERRIDES if path in GPU_RECIPES else []
    recipe = load_recipe(path, overrides)
    assert recipe.model.model_name_or_path and recipe.script.dataset_name
    assert recipe.training.optim == "dualadam"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    header = [line for line in lines if line.startswith("#   ")]
    # The first command line of the header names this very recipe.
    assert header and f"--config recipes/{path.name}" in header[0] and "dualadam-hf" in header[0]
    assert any("Hardware:" in line for line in lines[:12])
    if path in GPU_RECIPES:
        assert "accelerate_configs/" in path.read_text()
        for config in re.findall(r"accelerate_configs/[\w.]+\.yaml", path.read_text()):
            assert (path.parents[1] / config).is_file(), config


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_the_compare_block_of_every_recipe_passes_the_plan_checks(path):
    from dualadam_hf.experiments.compare import checked_settings
    from dualadam_hf.experiments.variants import parse_variants
    from dualadam_hf.integrations.names import DEFAULT_OPTIMS

    recipe = load_recipe(path, CPU_OVERRIDES if path in GPU_RECIPES else [])
    settings = checked_settings(recipe.compare, {}, path)
    variants = parse_variants(settings.get("optims", DEFAULT_OPTIMS), recipe.training.optim_args)
    assert set(settings.get("baseline", [])) <= {v.label for v in variants}


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipes_compare_the_variants_of_the_study(path):
    # The study's arms (the paper's inverse part at the recipe's blend and at the paper's rate, the inverse part
    # held at strength r, the matched warmups); not the calibrated "auto" scale, which tests a fixed rescaling.
    from dualadam_hf.experiments.compare import checked_settings
    from dualadam_hf.experiments.variants import parse_variants

    def variants(recipe_path):
        recipe = load_recipe(recipe_path, CPU_OVERRIDES if recipe_path in GPU_RECIPES else [])
        return parse_variants(checked_settings(recipe.compare, {}, recipe_path)["optims"], recipe.training.optim_args)

    study = variants(path.parent / "smollm2_chainsum_study_v2.yaml")
    here = variants(path)
    assert [v.label for v in here] == [v.label for v in study]
    assert all(v.optim_args.get("inverse_scale") != "auto" for v in here)
    assert {v.label: v.optim_args.get("inverse_scale") for v in here} == \
        {v.label: v.optim_args.get("inverse_scale") for v in study}


def test_the_suite_recipe_plans_six_tasks_of_short_answers_at_the_study_rate(tmp_path, tiny_model_dir):
    from dualadam_hf.experiments.compare import smoke_overrides
    from dualadam_hf.experiments.suite import plan_suite
    from dualadam_hf.experiments.tasks import INSTRUCTION

    path = RECIPES[0].parent / "smollm2_suite_lora.yaml"
    suite = plan_suite(path, output_dir=tmp_path / "out", smoke=True, sharpness=False,
                       overrides=[*smoke_overrides(), "--model_name_or_path", tiny_model_dir])
    names = [task.dataset_name for task in suite.tasks]
    assert len(set(names)) == len(names) >= 6 and all(n.startswith("reasoning-gym:") for n in names)
    every = {"adamw_torch", "dualadam", "dualadam-norm"}
    planned = {task.label: {v.label for v in plan.variants} for task, plan in zip(suite.tasks, suite.plans)}
    assert all(labels in (every, every | {"matched-warmup"}) for labels in planned.values())
    assert sum("matched-warmup" in labels for labels in planned.values()) == 3
    norm = next(v for v in suite.variants if v.label == "dualadam-norm")
    assert norm.optim_args["inverse_scale"] == "norm"
    for plan in suite.plans:
        assert plan.seeds == [0, 1, 2, 3, 4] and plan.lr_grid == []
        experiment = load_recipe(path, plan.overrides)
        assert experiment.training.learning_rate == pytest.approx(3e-4)  # the study v2's chosen rate
        _, heldout = load_splits(experiment)
        # Bare short answers, the question in the user's turn: what exact match scores within max_new_tokens.
        assert all(row["completion"][0]["content"] == row["answer"] and 0 < len(row["answer"]) <= 13
                   for row in heldout)
        assert all(row["prompt"][-1]["role"] == "user" and row["prompt"][-1]["content"].endswith(INSTRUCTION)
                   for row in heldout)


def test_command_line_overrides_win_and_are_typed(tmp_path):
    recipe = load_recipe(
        write_recipe(tmp_path, BASE),
        ["--learning_rate", "3e-3", "--max_steps=7", "--lora_target_modules", "k_proj", "--use_peft", "false",
         "--eval_size", "none", "--train_size", "12", "--logging_first_step"],
    )
    assert recipe.training.learning_rate == pytest.approx(3e-3)
    assert recipe.training.max_steps == 7
    assert recipe.model.lora_target_modules == "k_proj"  # TRL's ModelConfig unwraps a one-element list
    assert recipe.model.use_peft is False
    assert recipe.args.eval_size is None and recipe.args.train_size == 12
    assert recipe.training.logging_first_step is True
    # Untouched YAML values stay, with YAML's "1e-4" string read as a float.
    assert recipe.training.optim_args == "blend_fraction=0.1"
    plain = load_recipe(write_recipe(tmp_path, BASE))
    assert plain.training.learning_rate == pytest.approx(1e-4)
    assert plain.model.lora_target_modules == ["q_proj", "v_proj"]


def test_list_override_with_several_values(tmp_path):
    path = write_recipe(tmp_path, BASE)
    assert load_recipe(path, ["--lora_target_modules", "a", "b"]).model.lora_target_modules == ["a", "b"]
    with pytest.raises(RecipeError, match="max_steps takes one value"):
        load_recipe(write_recipe(tmp_path, base_with("max_steps: [1, 2]")))


@pytest.mark.parametrize("line, match", [
    ("max_steps: 2.7", "--max_steps.*invalid int value: '2.7'"),
    ("eval_size: 2.5", "--eval_size.*invalid int value: '2.5'"),
    ("learning_rate: fast", "--learning_rate.*invalid float value: 'fast'"),
    ("use_peft: maybe", "use_peft"),
    ("max_steps: 0", "max_steps must be a positive number of optimizer steps"),
])
def test_yaml_values_get_the_checks_command_line_values_get(tmp_path, line, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write_recipe(tmp_path, base_with(line)))


def test_optim_args_may_be_a_yaml_mapping(tmp_path):
    text = BASE.replace("optim_args: blend_fraction=0.1", "optim_args: {blend_steps: 4, foreach: false}")
    assert load_recipe(write_recipe(tmp_path, text)).training.optim_args == "blend_steps=4,foreach=false"
    with pytest.raises(RecipeError, match="Unknown --optim_args key 'blend' for --optim dualadam"):
        load_recipe(write_recipe(tmp_path, BASE.replace("blend_fraction=0.1", "{blend: 4}")))


def test_unknown_yaml_key_is_named_with_a_suggestion_and_the_valid_keys(tmp_path):
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, base_with("lerning_rate: 0.1")))
    message = str(error.value)
    assert "'lerning_rate'" in message and "did you mean 'learning_rate'" in message
    assert "Keys of this toolkit:" in message and "accuracy_size" in message
    assert "Keys of TRL/transformers:" in message and "gradient_accumulation_steps" in message


def test_unknown_command_line_key_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match=r"on the command line: 'max_step' \(did you mean 'max_steps'"):
        load_recipe(write_recipe(tmp_path, BASE), ["--max_step", "3"])


def test_unknown_optimizer_lists_the_valid_names(tmp_path):
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, BASE), ["--optim", "dualadm"])
    message = str(error.value)
    assert "unknown optimizer 'dualadm'" in message and "did you mean 'dualadam'" in message
    assert "adamw_torch" in message and "invadam" in message


def test_bad_values_are_errors_naming_the_key(tmp_path):
    path = write_recipe(tmp_path, BASE)
    with pytest.raises(RecipeError, match="max_steps.*invalid int value: 'many'"):
        load_recipe(path, ["--max_steps", "many"])
    with pytest.raises(RecipeError, match="eval_strategy.*invalid choice: 'bogus'"):
        load_recipe(path, ["--eval_strategy", "bogus"])
    with pytest.raises(RecipeError, match="unknown task 'regression'.*sft, classification"):
        load_recipe(path, ["--task", "regression"])
    with pytest.raises(RecipeError, match="unknown dataset_format 'csv'"):
        load_recipe(path, ["--dataset_format", "csv"])
    with pytest.raises(RecipeError, match="sets no dataset_name"):
        load_recipe(write_recipe(tmp_path, BASE.replace("dataset_name: data.jsonl", "")))


def test_missing_or_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write_recipe(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path, "a: [1, 2\n"))


def tiny_recipe(tmp_path: Path, model_dir: str, dataset: str, extra: str = "") -> Path:
    return write_recipe(
        tmp_path,
        f"model_name_or_path: {model_dir}\ndataset_name: {dataset}\noutput_dir: {tmp_path / 'out'}\n"
        "bf16: false\nreport_to: none\nmax_steps: 1\n" + extra,
    )


def test_missing_model_path_fails_before_loading_data(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, str(tmp_path / "no_model"), str(tmp_path / "no_data.jsonl")))
    with pytest.raises(RecipeError, match="model path not found"):
        run(recipe)


def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = load_recipe(tiny_recipe(tmp_path, str(tmp_path / "no_model"), "x.jsonl"),
                         ["--output_dir", str(blocker / "out")])
    with pytest.raises(RecipeError, match="output_dir .* is not writable"):
        run(recipe)


def test_missing_dataset_file_and_columns_are_named(tmp_path, tiny_model_dir):
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, str(tmp_path / "missing.jsonl")))
    with pytest.raises(RecipeError, match="dataset file not found"):
        load_splits(recipe)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "reply": "r"}) + "\n" for i in range(8)))
    with pytest.raises(RecipeError, match=r"rows.jsonl:1: a row needs columns prompt\+completion or messages or text"):
        load_splits(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, str(rows))))
    with pytest.raises(RecipeError, match="dataset_format gsm8k needs columns 'question' and 'answer'"):
        load_splits(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, str(rows), "dataset_format: gsm8k\n")))
    classification = tiny_recipe(tmp_path, tiny_model_dir, str(rows), "task: classification\n")
    with pytest.raises(RecipeError, match=r"lacks column\(s\) \['text', 'label'\]"):
        load_splits(load_recipe(classification))


@pytest.mark.parametrize("content, match", [
    ("", "holds no rows"),
    ("\n\n", "holds no rows"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"bad.jsonl:2: not valid JSON"),
    ('{"messages": []}\n', r"bad.jsonl:1: 'messages' must be a non-empty list of messages"),
    ('{"messages": [{"role": "user"}]}\n', r"bad.jsonl:1: every message in 'messages' needs 'role' and 'content'"),
    ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": "q", "completion": ""}\n', r"bad.jsonl:1: 'completion' must be text"),
])
def test_bad_data_files_name_the_file_line_and_problem(tmp_path, tiny_model_dir, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(RecipeError, match=match):
        load_splits(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, str(bad))))


def test_a_data_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "latin1.jsonl"
    first = b'{"messages": [{"role": "user", "content": "ok"}]}\n'
    second = '{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin-1")
    bad.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")
    with pytest.raises(RecipeError, match=rf"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at offset {offset}\)"):
        load_splits(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, str(bad))))


def test_accuracy_eval_needs_prompt_and_answer(tmp_path, tiny_model_dir, tiny_chat_dataset_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_chat_dataset_dir, "accuracy_size: 2\neval_size: 4\n")
    with pytest.raises(RecipeError, match="accuracy_size > 0 needs held-out columns 'prompt' and 'answer'"):
        load_splits(load_recipe(path))


def test_local_folder_without_held_out_splits_carves_disjoint_test_and_validation(
        tmp_path, tiny_model_dir, tiny_chat_dataset_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_chat_dataset_dir, "eval_size: 8\ntrain_size: 20\n")
    train, test = load_splits(load_recipe(path))
    train_again, validation = load_splits(load_recipe(path, ["--dataset_test_split", "validation"]))
    assert len(train) == 20 and len(test) == 8 and len(validation) == 8
    as_text = lambda ds: {json.dumps(row["messages"]) for row in ds}
    assert not as_text(train) & as_text(test) and not as_text(train) & as_text(validation)
    assert not as_text(test) & as_text(validation)
    assert as_text(train) == as_text(train_again)  # the same train rows whichever split is held out


def test_gsm8k_rows_become_chat_with_the_final_answer():
    row = gsm8k_to_chat({"question": "How many?", "answer": "She has 3+4=<<3+4=7>>7 apples.\n#### 1,007"})
    assert row["answer"] == "1007"
    assert row["prompt"][-1]["role"] == "user" and row["prompt"][-1]["content"].startswith("How many?")
    completion = row["completion"][0]["content"]
    assert "<<" not in completion and completion.endswith("#### 1007") and "7 apples" in completion
    with pytest.raises(RecipeError, match="no '#### <answer>' line"):
        gsm8k_to_chat({"question": "q", "answer": "no final line"})


def test_eval_batches_label_the_completion_only(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    rows = tmp_path / "pc.jsonl"
    with rows.open("w") as f:
        for i in range(10):
            prompt = [{"role": "user", "content": f"what is {i} + 1 ?"}]
            completion = [{"role": "assistant", "content": f"{i} + 1 = {i + 1}" + " . so" * i}]
            f.write(json.dumps({"prompt": prompt, "completion": completion, "answer": str(i + 1)}) + "\n")
    path = tiny_recipe(tmp_path, tiny_model_dir, str(rows), "eval_size: 3\nper_device_eval_batch_size: 2\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    experiment = load_recipe(path)
    train, heldout = load_splits(experiment)
    trainer, _ = build_trainer(experiment, tiny_model_dir, train, heldout)
    batches = eval_batches(trainer, 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    for index, row in enumerate(heldout.select(range(3))):
        batch, line = batches[index // 2], index % 2
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        n_tokens = int(batch["attention_mask"][line].sum())
        labels, ids = batch["labels"][line], batch["input_ids"][line]
        assert (labels[:n_prompt] == -100).all() and (labels[n_tokens:] == -100).all()
        assert (labels[n_prompt:n_tokens] == ids[n_prompt:n_tokens]).all()
        answer = tokenizer.decode(ids[n_prompt:n_tokens])
        assert row["answer"].replace("", " ").strip() in answer  # the tiny tokenizer spells digits apart
    again = eval_batches(trainer, 2)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, again, strict=True))
    assert eval_batches(trainer, 1, batch_size=3)[0]["input_ids"].shape[0] == 3


def test_bare_names_resolve_and_unknown_names_list_the_recipes(monkeypatch, tmp_path):
    assert config.find_recipe("smollm2_math_lora").name == "smollm2_math_lora.yaml"
    with pytest.raises(RecipeError, match="one of: .*roberta_sst2_lora.*smollm2_math_lora"):
        config.find_recipe("smollm3_math")
    # Outside a clone only the copy inside the installed package is there.
    shipped = tmp_path / "_recipes"
    shipped.mkdir()
    (shipped / "only_here.yaml").write_text("model_name_or_path: x\n")
    monkeypatch.setattr(config, "recipe_folders", lambda: [shipped])
    assert config.find_recipe("only_here") == shipped / "only_here.yaml"


@pytest.mark.slow
def test_wheel_ships_the_recipes(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True)
    (wheel,) = tmp_path.glob("dualadam_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in (root / "recipes").glob("*.yaml"):
        assert f"dualadam_hf/_recipes/{recipe.name}" in names
    assert "_dualadam_hf_autoregister.py" in names and "dualadam_hf_autoregister.pth" in names


# --- the recipe file itself: UTF-8, each key once, not empty -----------------------------------------------


@pytest.mark.parametrize("content, match", [
    (b"model_name_or_path: caf\xe9\n", r"recipe .*recipe.yaml is not UTF-8 text \(byte 0xe9 on line 1\)"),
    (b"max_steps: 3\nlearning_rate: 1e-4\nmax_steps: 30\n",
     r"recipe.yaml:3: key 'max_steps' appears twice \(first on line 1\); the second would silently win"),
    (b"max_steps: 3\ncompare:\n  seeds: 2\n  seeds: 3\n", r"recipe.yaml:4: key 'seeds' appears twice"),
    (b"", r"recipe .*recipe.yaml is empty"),
    (b"# only a comment\n\n", r"recipe .*recipe.yaml is empty"),
])
def test_a_recipe_file_that_is_not_utf8_names_a_key_twice_or_is_empty_is_refused(tmp_path, capsys, content, match):
    from dualadam_hf.experiments.cli import main
    from dualadam_hf.experiments.recipe_file import check_recipe_file

    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=match):
        check_recipe_file(path)
    for command in ("train", "compare"):  # where the harness reads a recipe
        assert main([command, "--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err


def test_every_shipped_recipe_names_each_key_once_and_a_merge_key_is_no_repeat(tmp_path):
    from dualadam_hf.experiments.recipe_file import check_recipe_file

    for recipe in RECIPES:
        check_recipe_file(recipe)
    merged = write_recipe(tmp_path, "base: &base\n  a: 1\nother:\n  <<: *base\n  a: 2\n")
    check_recipe_file(merged)  # `<<` merges, and a key of the mapping itself may override a merged one
