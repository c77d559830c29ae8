"""Loading data: a training pool each seed draws its own rows from, held-out rows fixed and apart from the train
rows even when the source repeats rows, and the rows of a data file as padded batches."""

from __future__ import annotations

import json

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments.arguments import load_experiment
from dualadam_hf.experiments.data import jsonl_batches, load_splits

GENERATED = """
model_name_or_path: some/model
dataset_name: reasoning-gym:chain_sum
dataset_config: min_terms=2,max_terms=2,min_digits=1,max_digits=2
dataset_seed: 0
train_size: 16
eval_size: 24
max_steps: 1
bf16: false
"""


def questions(dataset) -> set[str]:
    return {json.dumps(row["prompt"] if "prompt" in row else row["messages"]) for row in dataset}


def splits(recipe, *overrides: str):
    return load_splits(load_experiment(recipe, list(overrides)))


def test_seeds_draw_different_train_rows_from_one_pool_and_share_the_held_out_rows(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GENERATED + "train_pool_size: 64\n")
    train0, test0 = splits(recipe, "--seed", "0")
    train1, test1 = splits(recipe, "--seed", "1")
    again, _ = splits(recipe, "--seed", "0")
    _, validation = splits(recipe, "--seed", "1", "--dataset_test_split", "validation")
    pool, _ = splits(recipe, "--train_size", "64", "--train_pool_size", "64")
    assert len(train0) == len(train1) == 16 and questions(train0) != questions(train1)
    assert questions(again) == questions(train0)  # a seed's draw is reproducible
    assert questions(train0) | questions(train1) <= questions(pool)  # both from the same pool
    assert questions(test0) == questions(test1) and len(test0) == 24  # the held-out rows do not move with the seed
    for held in (test0, validation):
        assert not (questions(pool) & questions(held))


def test_without_a_pool_the_train_rows_do_not_depend_on_the_seed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GENERATED)
    assert questions(splits(recipe, "--seed", "0")[0]) == questions(splits(recipe, "--seed", "5")[0])


def test_a_pool_in_a_local_folder_keeps_the_carved_held_out_rows_out(tmp_path, tiny_chat_dataset_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: m\ndataset_name: {tiny_chat_dataset_dir}\neval_size: 8\ntrain_size: 12\n"
                      "train_pool_size: 40\nmax_steps: 1\nbf16: false\n")
    train0, test0 = splits(recipe, "--seed", "0")
    train1, test1 = splits(recipe, "--seed", "1")
    assert len(train0) == 12 and questions(train0) != questions(train1) and questions(test0) == questions(test1)
    assert not (questions(train0) | questions(train1)) & questions(test0)


def test_bad_pool_sizes_are_named(tmp_path, tiny_chat_dataset_dir):
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text(GENERATED + "train_pool_size: 8\n")
    with pytest.raises(RecipeError, match=r"train_pool_size \(8\) must be at least train_size \(16\)"):
        splits(smaller)
    no_size = tmp_path / "no_size.yaml"
    no_size.write_text(GENERATED.replace("train_size: 16\n", "") + "train_pool_size: 32\n")
    with pytest.raises(RecipeError, match="train_pool_size 32 needs train_size"):
        splits(no_size)
    too_large = tmp_path / "local.yaml"  # a pool larger than the local file holds
    too_large.write_text(f"model_name_or_path: m\ndataset_name: {tiny_chat_dataset_dir}\neval_size: 8\n"
                         "train_size: 12\ntrain_pool_size: 100000\nmax_steps: 1\nbf16: false\n")
    with pytest.raises(RecipeError, match=r"train_pool_size is 100000 but the train data has only \d+ rows"):
        splits(too_large)


def test_a_row_repeated_in_the_source_is_not_left_in_train_when_a_copy_is_held_out(tmp_path):
    # 10 distinct rows, 4 copies each. Held-out rows are carved from one shuffle: without the removal, the other
    # copies of each held-out row would stay in train and the held-out loss would score rows trained on.
    distinct = [{"text": f"row {i} says {i * 7}"} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in distinct * 4))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: m\ndataset_name: {tmp_path / 'train.jsonl'}\neval_size: 3\n"
                      "max_steps: 1\nbf16: false\n")
    train, test = splits(recipe)
    _, validation = splits(recipe, "--dataset_test_split", "validation")
    texts = lambda dataset: [row["text"] for row in dataset]
    held = set(texts(test)) | set(texts(validation))
    assert len(test) == len(validation) == 3 and not held & set(texts(train))
    # Repeats of rows that are not held out stay: every copy of every other row is still there.
    assert sorted(texts(train)) == sorted(row["text"] for row in distinct * 4 if row["text"] not in held)


def test_no_train_rows_left_once_held_out_rows_and_their_repeats_go_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text((json.dumps({"text": "the same row"}) + "\n") * 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: m\ndataset_name: {tmp_path / 'train.jsonl'}\neval_size: 2\n"
                      "max_steps: 1\nbf16: false\n")
    with pytest.raises(RecipeError, match="no train rows are left once the held-out rows and their repeats"):
        splits(recipe)


def test_data_file_rows_become_padded_batches_with_a_classifiers_labels(tiny_model_dir):
    from dualadam_hf.experiments.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [{"text": "one plus one", "label": 2}, {"text": "one", "label": 0},
            {"text": "one plus one plus one plus one", "label": 1}]
    lengths = [min(len(tokenizer(row["text"])["input_ids"]), 4) for row in rows]
    batches = jsonl_batches(rows, tokenizer, classifier=True, batch_size=2, max_length=4)
    assert [sorted(batch) for batch in batches] == [["attention_mask", "input_ids", "labels"]] * 2
    assert [batch["labels"].tolist() for batch in batches] == [[2, 0], [1]]
    assert [batch["attention_mask"].sum(1).tolist() for batch in batches] == [lengths[:2], lengths[2:]]
    first = batches[0]
    assert first["input_ids"].shape == (2, max(lengths[:2])) and lengths[0] != lengths[1]
    assert (first["input_ids"][first["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    # A language model's batches have no labels column: its loss is taken on the tokens themselves.
    assert "labels" not in jsonl_batches(rows, tokenizer, classifier=False, batch_size=2, max_length=4)[0]


def test_a_size_larger_than_the_data_is_said_once_with_the_numbers(tmp_path, monkeypatch):
    from dualadam_hf.experiments import data
    from dualadam_hf.experiments.tiny import write_tiny_chat_jsonl

    monkeypatch.setattr(data, "_WARNED", set())
    write_tiny_chat_jsonl(tmp_path / "rows.jsonl", n=10, seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: m\ndataset_name: {tmp_path / 'rows.jsonl'}\neval_size: 2\ntrain_size: 32\n"
                      "max_steps: 1\nbf16: false\n")
    with pytest.warns(UserWarning) as said:
        train, _ = splits(recipe)
        splits(recipe, "--seed", "1")  # a plan loads the same data again: no second warning
    # 10 rows, 2 held out for each of test and validation: 6 left to train on.
    assert len(train) == 6
    assert [str(w.message) for w in said if "_size" in str(w.message)] == [
        "train_size is 32 but the train data (once the held-out rows are out) has only 6 rows: every run uses those 6"]
