"""Shared fixtures: an offline tiny Llama and a tiny chat dataset, built once per test session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests draw from a fixed seed and keep no example database, so every run (CI's included) tests the
# same examples and a failure reproduces; `--hypothesis-profile=thorough` draws many more, from a fresh seed.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile("ci")

# Tests never reach the hub; set before transformers is imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a saved tiny LlamaForCausalLM (hidden 32, 2 layers) with its tokenizer."""
    from dualadam_hf.experiments.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder holding train.jsonl with 64 arithmetic chat rows (usable as `--dataset_name <dir>`)."""
    from dualadam_hf.experiments.tiny import write_tiny_chat_jsonl

    folder = tmp_path_factory.mktemp("tiny_chat")
    write_tiny_chat_jsonl(folder / "train.jsonl", n=64, seed=0)
    return str(folder)
