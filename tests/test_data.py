"""A training pool: each seed draws its own train rows from it, while the held-out rows stay fixed and apart."""

from __future__ import annotations

import json

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments.arguments import load_experiment
from dualadam_hf.experiments.data import load_splits

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
