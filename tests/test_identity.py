"""One identity per run: file digests cached across processes, a model and its data by content, the settings that
change a result, and refusals that name each difference (dualadam_hf/experiments/identity.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dualadam_hf.experiments import identity

from .helpers import tiny_experiment


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A digest cache of the test's own, and a process that has hashed nothing yet; the list of files hashed."""
    monkeypatch.setenv("DUALADAM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_MEMORY", {})
    hashed, sha256 = [], identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    return hashed


def test_a_file_is_hashed_once_across_processes_and_again_when_it_changes(tmp_path, cache, monkeypatch):
    import hashlib

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights one")
    expected = hashlib.sha256(b"weights one").hexdigest()
    assert identity.file_sha256([file]) == {file: expected}
    assert identity.file_sha256([file]) == {file: expected}
    monkeypatch.setattr(identity, "_MEMORY", {})  # another process: the digest comes from the cache on disk
    assert identity.file_sha256([file]) == {file: expected}
    assert cache == ["model.safetensors"]
    assert (tmp_path / "cache" / "file_sha256.json").is_file()
    # The same size, the old modification time set back by hand: the change time still tells.
    stat = file.stat()
    file.write_bytes(b"weights two")
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity.file_sha256([file]) == {file: hashlib.sha256(b"weights two").hexdigest()}
    assert cache == ["model.safetensors"] * 2


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DUALADAM_HF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert identity.cache_folder() == Path.home() / ".cache" / "dualadam_hf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert identity.cache_folder() == tmp_path / "xdg" / "dualadam_hf"
    monkeypatch.setenv("DUALADAM_HF_CACHE", str(tmp_path / "own"))
    assert identity.cache_folder() == tmp_path / "own"


def test_a_cache_folder_that_cannot_be_written_still_gives_digests(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DUALADAM_HF_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(identity, "_MEMORY", {})
    file = tmp_path / "data.jsonl"
    file.write_text("{}\n")
    assert len(identity.file_sha256([file])[file]) == 64


def test_a_model_folder_is_identified_by_the_files_that_shape_the_run(tmp_path, cache):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                 "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "README.md", "training_args.bin", "optimizer.pt", "run_done.json"):
        (folder / name).write_text(name)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    groups = {group: sorted(files) for group, files in identity.model_files(folder).items()}
    assert groups == {
        "model weights": ["model-00001-of-00002.safetensors", "model.safetensors.index.json"],
        "model config": ["config.json", "generation_config.json"],
        "tokenizer": ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
        "chat template": ["additional_chat_templates/tool_use.jinja", "chat_template.jinja"],
    }
    # The path is not the identity: a copy elsewhere (another cache folder, a moved checkout) is the same model.
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, copy)
    assert identity.model_identity("a", folder) == identity.model_identity("b", copy)
    assert identity.model_identity("org/model", tmp_path / "not-here", "v1") == {"hub model": "org/model",
                                                                                 "revision": "v1"}


def test_a_peft_adapter_is_identified_with_its_base_model(tmp_path, cache, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir}))
    found = identity.model_identity(str(adapter), adapter)
    assert set(found) >= {"model weights", "model config", "base model weights", "base model tokenizer"}
    assert found["base model weights"] == identity.model_identity(tiny_model_dir, tiny_model_dir)["model weights"]


def test_differences_name_each_change_with_its_values():
    old = {"model": {"model weights": {"model.safetensors": "1a2b3c4d" + "0" * 56}},
           "data": {"data files": {"train.jsonl": "a" * 64, "test.jsonl": "b" * 64}},
           "settings": {"train_size": 128, "max_length": 512, "seed": 0}}
    new = {"model": {"model weights": {"model.safetensors": "9f8e7d6c" + "0" * 56}},
           "data": {"data files": {"train.jsonl": "c" * 64, "test.jsonl": "b" * 64}},
           "settings": {"train_size": 256, "max_length": 512, "seed": 0, "max_grad_norm": 0.5}}
    several = identity.combined_digest
    assert identity.differences(old, new) == [
        "model weights (sha256 1a2b3c4d.. -> 9f8e7d6c..)",
        f"data files (sha256 {several(old['data']['data files'])[:8]}.. -> {several(new['data']['data files'])[:8]}..)",
        "train_size (128 -> 256)", "max_grad_norm (none -> 0.5)"]
    assert identity.differences(new, new) == []


def test_the_settings_that_change_a_result_are_in_the_identity_and_the_others_are_not(
        tiny_model_dir, tiny_chat_dataset_dir, tmp_path, cache):
    base = identity.run_inputs(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path / "a"), tiny_model_dir)
    settings = base["settings"]
    assert {"max_grad_norm", "max_length", "dataset_seed", "train_size", "learning_rate", "seed"} <= set(settings)
    assert not {"output_dir", "save_steps", "hub_token", "model_name_or_path", "dataset_name"} & set(settings)
    assert "num_train_epochs" not in settings  # max_steps is set: the epochs change nothing
    assert set(base["data"]) == {"data files", "held-out splits carved from train"}
    # Where the run is written, how often it saves and how fast it runs leave the identity as it is.
    same = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path / "b", "--save_steps", "7",
                           "--dataloader_num_workers", "1", "--gradient_checkpointing", "true")
    assert identity.run_inputs(same, tiny_model_dir) == base
    other = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path / "a", "--max_grad_norm", "0.5")
    assert identity.differences(base, identity.run_inputs(other, tiny_model_dir)) == ["max_grad_norm (1.0 -> 0.5)"]


def test_a_chat_template_file_is_held_by_its_content(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, cache):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--chat_template_path",
                                 str(template))
    before = identity.determining_settings(experiment)["chat_template_path"]
    template.write_text("{{ messages | length }}")
    assert before.startswith("sha256:") and identity.determining_settings(experiment)["chat_template_path"] != before


def test_generated_data_is_identified_by_its_generator_settings_and_version(tiny_model_dir, tmp_path):
    experiment = tiny_experiment(tiny_model_dir, "reasoning-gym:chain_sum", tmp_path, "--dataset_config",
                                 "min_terms=2,max_terms=2")
    assert identity.data_identity(experiment) == {
        "data generator": "reasoning-gym:chain_sum", "generator settings": "min_terms=2,max_terms=2",
        "generator version": identity.library_versions()["reasoning-gym"]}


def test_provenance_names_the_code_the_libraries_and_the_times(monkeypatch):
    segment = identity.new_segment()
    assert segment["ended"] is None and segment["started"].endswith("Z")
    assert set(segment["libraries"]) == set(identity.LIBRARIES)
    import torch

    assert segment["libraries"]["torch"] == torch.__version__
    monkeypatch.setattr(identity, "LIBRARIES", ("torch", "no-such-package-dualadam"))
    assert identity.library_versions()["no-such-package-dualadam"] is None
    code = segment["dualadam_hf"]
    from dualadam_hf import __version__

    assert code["version"] == __version__
    checkout = Path(identity.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (checkout / ".git").exists():
        assert code["git_commit"] == head.stdout.strip() and isinstance(code["uncommitted_changes"], bool)
    record = identity.manifest({"settings": {}}, {}, {"segments": [{"started": "earlier", "ended": None}]})
    assert len(record["segments"]) == 2 and record["segments"][0]["started"] == "earlier"
    assert identity.ended(record)["segments"][-1]["ended"] is not None
