"""Reading checkpoint folders: the Trainer's naming, its own state reader, and files cut off mid-write.

tests/test_resume.py covers which checkpoint a run resumes from; these tests cover the pieces it relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments.checkpoints import (
    checkpoint_folders,
    holds_weights,
    incomplete_reason,
    load_trainer_state,
    optimizer_start,
    read_json,
    resume_checkpoint,
    resume_kind,
    saved_wall_time,
    wall_time_record,
)
from tests.helpers import fake_checkpoint


def test_the_newest_checkpoint_is_the_one_the_trainer_would_pick(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    for step in (9, 10, 99):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-100-old").mkdir()  # not a name the Trainer gives
    (tmp_path / "tmp-checkpoint-300").mkdir()
    (tmp_path / "checkpoint-200").write_text("a file, not a folder")
    found = checkpoint_folders(tmp_path)
    assert found == [tmp_path / "checkpoint-99", tmp_path / "checkpoint-10", tmp_path / "checkpoint-9"]
    assert found[0] == Path(get_last_checkpoint(str(tmp_path)))
    assert checkpoint_folders(tmp_path / "missing") == []


def test_the_trainer_state_is_read_by_transformers(tmp_path):
    path = fake_checkpoint(tmp_path, 7)
    state = load_trainer_state(path)
    assert type(state).__name__ == "TrainerState" and (state.global_step, state.max_steps) == (7, 10)
    assert load_trainer_state(tmp_path / "missing") is None


def test_a_whole_state_that_transformers_cannot_read_is_refused_not_passed_over(tmp_path):
    # Passing over it would pass over a finished save (and every older one the same version wrote), and the
    # run would start over; the Trainer itself would fail on the file when it resumes.
    fake_checkpoint(tmp_path, 5)
    newer = fake_checkpoint(tmp_path, 8)
    (newer / "trainer_state.json").write_text(json.dumps({"global_step": 8, "a_later_field": 1}))
    for value in ("last", str(newer)):
        with pytest.raises(RecipeError, match=r"checkpoint-8/trainer_state.json is not a trainer state this "
                                              r"transformers version reads \(.*a_later_field"):
            resume_checkpoint(value, tmp_path)
    (newer / "trainer_state.json").write_text("[8]")
    with pytest.raises(RecipeError, match="is not a trainer state"):
        resume_checkpoint("last", tmp_path)


def test_a_state_cut_inside_a_character_is_a_cut_off_save(tmp_path):
    older = fake_checkpoint(tmp_path, 5)
    cut = fake_checkpoint(tmp_path, 8)
    whole = json.dumps({"global_step": 8, "log_history": [{"note": "café"}]}, ensure_ascii=False).encode()
    (cut / "trainer_state.json").write_bytes(whole[: whole.index("é".encode()) + 1])  # half of "é"
    said = []
    assert resume_checkpoint("last", tmp_path, log=said.append) == older
    assert said == [f"[train] skipping incomplete checkpoint {cut}: trainer_state.json is truncated"]
    assert read_json(cut / "trainer_state.json") is None


def test_a_folder_holds_a_model_when_it_holds_one_of_the_weight_files(tmp_path):
    sharded = fake_checkpoint(tmp_path, 3)
    (sharded / "adapter_model.safetensors").unlink()
    assert not holds_weights(sharded) and incomplete_reason(sharded) == "no model weights"
    (sharded / "model.safetensors.index.json").write_text("{}")  # a sharded save names its shards here
    assert holds_weights(sharded) and incomplete_reason(sharded) is None


@pytest.mark.parametrize("content", ['{"train_seconds": 4.5, "segm', "[4.5, 2]", '{"segments": 2}'])
def test_wall_time_a_checkpoint_cannot_tell_counts_as_one_earlier_segment(tmp_path, content):
    path = fake_checkpoint(tmp_path, 3)
    (path / "wall_time.json").write_text(content)
    assert saved_wall_time(path) == (0.0, 1, 0.0)


def test_the_wall_time_a_run_writes_is_the_one_a_resume_reads(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    (path / "wall_time.json").write_text(json.dumps(wall_time_record(4.5, 2, 123.0, 7)))
    assert saved_wall_time(path) == (4.5, 2, 123.0)
    assert optimizer_start(path) == 7


@pytest.mark.parametrize("value, kind", [
    (None, None), (False, None), ("", None), ("false", None), ("No", None),
    (True, "last"), ("true", "last"), ("YES", "last"), ("last", "last"),
    # Digits are no boolean here: like any other text that is no word, they name a checkpoint folder.
    ("1", "folder"), ("0", "folder"), ("out/checkpoint-5", "folder"),
])
def test_resume_from_checkpoint_reads_words_and_folder_names(value, kind):
    assert resume_kind(value) == kind
