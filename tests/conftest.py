"""Shared fixtures: an offline tiny Llama and a tiny chat dataset, built once per test session."""

from __future__ import annotations

import atexit
import os

import pytest
from hypothesis import settings

from tests.helpers import TORCH_EXTENSIONS_DIR, claim_extensions_dir

# Property tests draw from a fixed seed and keep no example database, so every run (CI's included) tests the
# same examples and a failure reproduces; `--hypothesis-profile=thorough` draws many more, from a fresh seed.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile("ci")

# Tests never reach the hub; set before transformers is imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Set before torch loads OpenMP (no test module is imported yet), for this process and every one it starts:
# spinning OpenMP threads made the suite several times slower on cores other jobs share.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# DeepSpeed's CPU ops are built once into the suite's own folder, not the user's shared ~/.cache/torch_extensions
# (see tests/helpers.py); this test run holds its claim on the folder until the interpreter exits.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    os.environ["TORCH_EXTENSIONS_DIR"] = str(TORCH_EXTENSIONS_DIR)
    if (_claim := claim_extensions_dir(TORCH_EXTENSIONS_DIR)) is not None:
        atexit.register(_claim.close)


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
