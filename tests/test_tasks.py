"""Generated tasks: generation, disjoint train/validation/test splits, format, answer parsing and scoring,
and that TRL's SFTTrainer puts loss on the completion only."""

from __future__ import annotations

import pytest
import torch

from dualadam_hf.experiments.tasks import (
    ANSWER_PREFIX,
    final_number,
    format_completion,
    generate_answers,
    generated_dataset,
    is_correct,
    parse_config,
    parse_final_answer,
    score_answers,
)


def math_dataset(split: str, size: int, seed: int = 0):
    return generated_dataset("gsm_symbolic", split, size, seed)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2 converted once per test session (same folder as in test_smollm2.py, so converted once)."""
    from dualadam_hf.experiments.smollm2 import smollm2_path

    return smollm2_path(str(tmp_path_factory.getbasetemp() / "smollm2_cache"))


def _questions(dataset) -> set[str]:
    return {prompt[-1]["content"] for prompt in dataset["prompt"]}


def test_columns_and_conversational_format():
    dataset = math_dataset("train", 16)
    assert dataset.column_names == ["prompt", "completion", "answer"]
    assert len(dataset) == 16
    for row in dataset:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"] and not row["prompt"][0]["content"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert ANSWER_PREFIX in row["prompt"][-1]["content"]  # the prompt states the answer format
        # The worked answer ends with the final line the parser reads, and it parses to the gold answer.
        assert row["completion"][0]["content"].splitlines()[-1] == f"{ANSWER_PREFIX} {row['answer']}"
        assert parse_final_answer(row["completion"][0]["content"]) == row["answer"]
        assert is_correct(row["completion"][0]["content"], row["answer"])


def test_short_answer_tasks_answer_with_the_answer_alone():
    rows = generated_dataset("chain_sum", "test", 5, config="min_terms=2,max_terms=2,min_digits=1,max_digits=2")
    for row in rows:
        assert row["completion"][0]["content"] == row["answer"]
        assert row["prompt"][-1]["content"].endswith("Reply with only the final answer.")
        assert is_correct(row["completion"][0]["content"], row["answer"])
    assert parse_config("min_terms=2,ratio=0.5,name=x,flag=true") == {
        "min_terms": 2, "ratio": 0.5, "name": "x", "flag": True}
    with pytest.raises(ValueError, match="basic_arithmetic"):
        generated_dataset("basic_arithmetic", "test", 2, config="no_such_setting=3")


def test_splits_are_disjoint_for_any_seeds():
    train = _questions(math_dataset("train", 300))
    assert len(train) == 300  # no duplicates within a split
    for seed in (0, 1):
        for split in ("validation", "test"):
            held = _questions(math_dataset(split, 60, seed=seed))
            assert len(held) == 60
            assert not train & held
    # Even with the same seed for every split the hash split keeps them apart.
    same = [_questions(math_dataset(split, 50, seed=7)) for split in ("train", "validation", "test")]
    assert not same[0] & same[1] and not same[0] & same[2] and not same[1] & same[2]


def test_deterministic_prefix_stable_and_seeded():
    assert math_dataset("test", 20)["answer"] == math_dataset("test", 20)["answer"]
    # A smaller dataset is the start of a larger one, so growing a recipe's train set keeps its first rows.
    assert math_dataset("train", 30)["prompt"] == math_dataset("train", 60)["prompt"][:30]
    assert _questions(math_dataset("train", 30, seed=1)) != _questions(math_dataset("train", 30, seed=2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        math_dataset("eval", 4)
    with pytest.raises(ValueError, match="size"):
        math_dataset("train", 0)


def test_completion_rewrites_final_line():
    # gsm_symbolic sometimes ends with "#### 20.0" for gold "20"; the completion uses the gold form.
    completion = format_completion("20", "2 * 10 = 20\n#### 20.0")
    assert completion == [{"role": "assistant", "content": "2 * 10 = 20\n#### 20"}]
    assert format_completion("5", "no marker here")[0]["content"] == "no marker here\n#### 5"
    assert format_completion("5")[0]["content"] == "5"


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("2 + 2 = 4\n#### 4", 4),
        ("#### 1,200", 1200),
        ("#### $45.50 dollars\nthen 9", 45.5),
        ("#### -3", -3),
        ("#### 1 3", 13),  # a word-level tokenizer decodes digits with spaces
        ("first 5, then the answer is 7.", 7),  # no marker: last number
        ("#### none\nso 12", 12),  # marker without a number: fall back
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_parse_final_answer_reads_text_answers():
    assert parse_final_answer("thinking\n#### Blue whale \nmore") == "Blue whale"
    assert parse_final_answer("just this line") == "just this line"
    assert parse_final_answer("   ") is None
    assert is_correct("#### blue WHALE", "Blue whale") and not is_correct("#### orca", "Blue whale")


def test_is_correct_uses_final_answer_only():
    assert is_correct("12 + 30 = 42\n#### 42", "42")
    assert is_correct("#### 42.0", "42")
    assert not is_correct("12 + 30 = 42\n#### 32", "42")  # the earlier 42 does not count
    assert not is_correct("I cannot tell.", "42")
    assert is_correct("#### 6945.75", "6945.75")
    assert not is_correct("#### 6945", "6945.75")


def test_sft_trainer_masks_prompt_tokens(tiny_model_dir, tmp_path):
    """TRL treats the rows as prompt-completion data: labels are -100 on the prompt, the tokens on the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = math_dataset("train", 4)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=1024,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        activation_checkpointing=False,  # named, or TRL's default sets its deprecated alias and transformers warns
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    for index, row in enumerate(trainer.train_dataset):
        prompt_ids = tokenizer.apply_chat_template(dataset[index]["prompt"], add_generation_prompt=True)
        prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) > len(prompt_ids)
        assert ids[: len(prompt_ids)] == list(prompt_ids)
        assert all(label == -100 for label in labels[: len(prompt_ids)])
        assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]  # every answer token is learned
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum()  # some real tokens are masked
    assert trainer.train().training_loss > 0


class EchoLastDigit(torch.nn.Module):
    """A stand-in causal LM whose greedy answer to a prompt is the prompt's last digit, then the end token: what
    each problem gets is known in advance. It records the batches it was given."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.batches = tokenizer, []
        self.digits = {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        last = [[t for t, m in zip(row.tolist(), mask.tolist()) if m and t in self.digits][-1]
                for row, mask in zip(input_ids, attention_mask)]
        new = torch.tensor([[d, self.tokenizer.eos_token_id] for d in last])[:, :max_new_tokens]
        return torch.cat([input_ids, new], dim=1)


def _prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_answers_are_scored_each_by_its_own_problem_answer(tiny_model_dir):
    """Problems of different lengths, batched by length: each answer and its score land on their own row."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = EchoLastDigit(tokenizer)
    model.train()
    rows = [{"prompt": _prompt("add 5 and 4 please , then tell me the total of the two numbers : 9"), "answer": "8"},
            {"prompt": _prompt("7"), "answer": "7"},
            {"prompt": _prompt("what is the sum of the numbers 1 and 2 , please tell me the result now : 3"),
             "answer": "3"},
            {"prompt": _prompt("6"), "answer": "5"}]
    correct, answers = score_answers(model, tokenizer, rows, max_new_tokens=4, batch_size=2)
    assert answers == ["9", "7", "3", "6"]
    assert correct == [False, True, True, False]
    assert tokenizer.padding_side == "right" and model.training  # left as found
    # Batched by length: the two long prompts together, the two short ones together, so almost nothing is
    # padding (in the given order each batch would pad a one-word prompt to a long one's length); on the left.
    assert sum(int((mask == 0).sum()) for _, mask in model.batches) <= 2
    assert all(mask[:, -1].all() for _, mask in model.batches)
    with pytest.raises(KeyError, match="'answer'"):
        score_answers(model, tokenizer, [{"prompt": rows[0]["prompt"]}], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one row"):
        score_answers(model, tokenizer, [], max_new_tokens=1)


def test_generation_on_the_tiny_model_runs_and_draws_a_bar(tiny_model_dir, capsys):
    """The real generate path end to end on the untrained tiny model, with the progress bar on stderr."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = math_dataset("test", 3)
    answers = generate_answers(model, tokenizer, dataset["prompt"], max_new_tokens=4, batch_size=2, show_bar=True)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert "exact match: generating answers" in capsys.readouterr().err
    # Alone or in a batch with a shorter prompt, a prompt gets the same greedy answer (padding is masked).
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=4, batch_size=1)[0] for p in dataset["prompt"]]
    assert alone == answers


@pytest.mark.slow
def test_sft_masks_prompt_with_smollm2_template(smollm2_dir, tmp_path):
    """With SmolLM2's ChatML template the prompt (system, user, "assistant\\n" header) is masked and the
    answer through <|im_end|> is learned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    dataset = math_dataset("train", 2)
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, report_to="none", use_cpu=True,
                     activation_checkpointing=False)  # named: TRL's default would set the deprecated alias
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    learned = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    masked = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100])
    answer = dataset[0]["completion"][0]["content"]
    assert learned.startswith(answer) and "<|im_end|>" in learned
    assert masked.endswith("<|im_start|>assistant\n") and dataset[0]["prompt"][-1]["content"] in masked

