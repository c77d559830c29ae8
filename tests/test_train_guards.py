"""`dualadam-hf train` computes only from settings and files its user sees: a resume that asks for other settings
than its checkpoint holds is refused, a run folder is not trained into afresh unless --overwrite_output_dir says
so, a diverged run keeps no non-finite weights where a user loads them, and a full disk ends in one line."""

from __future__ import annotations

import errno
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dualadam_hf.experiments import RecipeError, identity
from dualadam_hf.experiments import train as train_module
from dualadam_hf.experiments.checkpoints import (
    check_resume_inputs,
    check_resume_settings,
    resume_checkpoint,
    saved_training_arguments,
    setting_changes,
)
from dualadam_hf.experiments.cli import main
from dualadam_hf.experiments.train import DONE_FILE, clear_earlier_run, failed_write, run, write_atomically
from dualadam_hf.experiments.watch import finite_checkpoint_words

from .helpers import fake_checkpoint, tiny_argv, tiny_experiment

# --- a resume asks for the settings its checkpoint holds ----------------------------------------------------


def real_checkpoint(experiment, folder: Path, step: int) -> Path:
    """A checkpoint as the Trainer saves one for ``experiment``: its optimizer (built by the Trainer's own factory,
    a decayed and an undecayed group) after ``step`` steps of a linear schedule, and its pickled arguments."""
    from transformers import Trainer

    from dualadam_hf.integrations.transformers import register

    register()
    path = fake_checkpoint(folder, step, optimizer=None)
    weight, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(experiment.training)
    optimizer = optimizer_cls([{"params": [weight], "weight_decay": experiment.training.weight_decay},
                               {"params": [bias], "weight_decay": 0.0}], **kwargs)
    if hasattr(optimizer, "set_total_steps"):
        optimizer.set_total_steps(experiment.training.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (step * 2))  # keeps initial_lr
    for _ in range(step):
        (weight.sum() + bias.sum()).backward()
        optimizer.step()
        schedule.step()
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(experiment.training, path / "training_args.bin")
    return path


def edit_optimizer(checkpoint: Path, **settings) -> None:
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for group in saved["param_groups"]:
        group.update(settings)
    torch.save(saved, checkpoint / "optimizer.pt")


def test_a_resume_asking_for_the_checkpoints_settings_passes_mid_schedule(tiny_model_dir, tiny_chat_dataset_dir,
                                                                            tmp_path):
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16",
                                 "--weight_decay", "0.1")
    checkpoint = real_checkpoint(experiment, tmp_path, 4)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert saved["lr"] != saved["initial_lr"] == experiment.training.learning_rate  # the schedule moved lr
    assert setting_changes(checkpoint, experiment.training) == []
    assert resume_checkpoint("last", tmp_path) == checkpoint
    check_resume_settings(checkpoint, experiment.training)


def test_a_resume_asking_for_other_settings_is_refused_naming_each(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    """Resumed, the Trainer would continue with the checkpoint's 16-step blend and lr 1e-3 without a word."""
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16")
    checkpoint = real_checkpoint(experiment, tmp_path, 4)
    asked = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=4",
                            "--learning_rate", "5e-3", "--seed", "7", "--max_steps", "3")
    with pytest.raises(RecipeError) as refused:
        check_resume_settings(checkpoint, asked.training)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot resume from {checkpoint}: ")
    for change in ("optim_args: checkpoint 'blend_steps=16', asked 'blend_steps=4'",
                   "learning_rate: checkpoint 0.001, asked 0.005", "seed: checkpoint 0, asked 7",
                   "max_steps: checkpoint 2, asked 3", "--overwrite_output_dir true"):
        assert change in message, change
    assert "param group" not in message  # what training_args.bin already names is not named twice


def test_a_checkpoint_whose_optimizer_settings_differ_is_refused(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16",
                                 "--weight_decay", "0.1")
    checkpoint = real_checkpoint(experiment, tmp_path, 4)
    edit_optimizer(checkpoint, switch_rate=0.25)  # a 4-step blend where the run asks for 16
    with pytest.raises(RecipeError, match=r"optimizer.pt param group 0 switch_rate: checkpoint 0.25, asked 0.0625"):
        check_resume_settings(checkpoint, experiment.training)
    edit_optimizer(checkpoint, switch_rate=1 / 16, weight_decay=0.3, betas=(0.8, 0.999))
    changes = setting_changes(checkpoint, experiment.training)
    assert changes == ["optimizer.pt param group 0 betas: checkpoint (0.8, 0.999), asked (0.9, 0.999)",
                       "optimizer.pt param group 0 weight_decay: checkpoint 0.3, asked 0.1"]
    # Without training_args.bin (a Trainer that did not save it), optimizer.pt alone still tells.
    (checkpoint / "training_args.bin").unlink()
    edit_optimizer(checkpoint, betas=(0.9, 0.999), weight_decay=0.1)
    asked = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16",
                            "--weight_decay", "0.1", "--learning_rate", "5e-3")
    assert setting_changes(checkpoint, asked.training) == [
        "optimizer.pt param group 0 lr: checkpoint 0.001, asked 0.005"]


@pytest.mark.parametrize("tamper, problem", [
    ({"group": {"eps": -1e-3}}, "param group 0: Invalid eps: -0.001"),
    ({"group": {"betas": (1.5, 0.999)}}, "param group 0: Invalid beta1: 1.5"),
    ({"step": 2.5}, "is damaged (step 2.5 is not a whole number >= 0)"),
])
def test_a_tampered_optimizer_state_is_refused_before_training(tiny_model_dir, tiny_chat_dataset_dir, tmp_path,
                                                               tamper, problem):
    """DualAdam.load_state_dict refuses these too, but inside the Trainer, as a traceback: the resume names the
    file and the problem in one line first."""
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16")
    checkpoint = real_checkpoint(experiment, tmp_path, 4)
    assert resume_checkpoint("last", tmp_path) == checkpoint
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved["param_groups"][0].update(tamper.get("group", {}))
    first = saved["state"][0]
    if "step" in tamper:
        first["step"] = torch.tensor(tamper["step"])
    torch.save(saved, checkpoint / "optimizer.pt")
    with pytest.raises(RecipeError) as refused:
        resume_checkpoint("last", tmp_path)
    assert "\n" not in str(refused.value) and problem in str(refused.value), str(refused.value)
    assert str(refused.value).startswith(f"cannot resume from {checkpoint}: {checkpoint / 'optimizer.pt'}: ")


def test_the_checks_before_training_read_the_optimizer_state_once_and_no_moment(tiny_model_dir, tiny_chat_dataset_dir,
                                                                               tmp_path, monkeypatch):
    """For a 7B full fine-tune the moments are 56 GB that the Trainer reads again: the checks before it read the
    pickled part of optimizer.pt once (groups, step counters) and leave the moments to load_state_dict, which
    refuses a damaged one (as the slow end-to-end test shows)."""
    import dualadam_hf.optimizer as optimizer_module
    from dualadam_hf.experiments import checkpoints

    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args", "blend_steps=16")
    checkpoint = real_checkpoint(experiment, tmp_path, 4)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"][0] = float("nan")
    torch.save(saved, checkpoint / "optimizer.pt")
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or load(*args, **kwargs))
    monkeypatch.setattr(optimizer_module, "damaged_state", lambda state: pytest.fail("a moment was read"))
    checkpoints.forget_saved_optimizer()
    assert resume_checkpoint("last", tmp_path) == checkpoint
    check_resume_settings(checkpoint, experiment.training)
    assert loads == [checkpoint / "optimizer.pt"]


def test_a_blend_fraction_is_compared_as_the_blend_it_resolves_to(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, "--optim_args",
                                 "blend_fraction=0.5", "--max_steps", "8")
    checkpoint = real_checkpoint(experiment, tmp_path, 2)
    assert setting_changes(checkpoint, experiment.training) == []
    edit_optimizer(checkpoint, switch_rate=0.5)
    assert setting_changes(checkpoint, experiment.training) == [
        "optimizer.pt param group 0 switch_rate: checkpoint 0.5, asked 0.25"]


class RunsCode:
    """A pickle that would run a command when unpickled by pickle or by torch.load(weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_the_recorded_arguments_are_read_without_running_the_pickle(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 2)
    marker = tmp_path / "ran"
    torch.save({"learning_rate": RunsCode(marker)}, checkpoint / "training_args.bin")
    saved_training_arguments(checkpoint)
    assert not marker.exists()
    (checkpoint / "training_args.bin").write_bytes(b"not a zip")
    assert saved_training_arguments(checkpoint) is None


# --- a resume continues the run's own inputs: its model, data and settings ------------------------------------


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> str:
    """A tiny Llama with the session one's architecture, config and tokenizer, and other weights."""
    from dualadam_hf.experiments.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("other_weights"), seed=1)


def checkpoint_of(experiment, model_dir: str, out: Path, step: int = 2) -> Path:
    """A checkpoint of ``experiment`` in ``out`` with the manifest train writes into each checkpoint."""
    checkpoint = fake_checkpoint(out, step)
    record = identity.manifest(train_module.run_inputs(experiment, model_dir), {})
    (checkpoint / identity.MANIFEST_FILE).write_text(json.dumps(record))
    return checkpoint


@pytest.mark.parametrize("change, named", [
    ("model", "model weights (sha256 "),
    ("data", "data files (sha256 "),
    (("--dataset_seed", "3"), "dataset_seed (0 -> 3)"),
    (("--train_size", "8"), "train_size (16 -> 8)"),
    (("--max_length", "64"), "max_length (256 -> 64)"),
    (("--max_grad_norm", "0.5"), "max_grad_norm (1.0 -> 0.5)"),
], ids=["model", "data", "dataset_seed", "train_size", "max_length", "max_grad_norm"])
def test_a_resume_with_other_inputs_is_refused_naming_each(tiny_model_dir, tiny_chat_dataset_dir, other_weights,
                                                           tmp_path, change, named):
    """Each alone, these were taken as they came and the run finished with exit 0, one model's or one data's
    training continued with another's."""
    from dualadam_hf.experiments.tiny import write_tiny_chat_jsonl

    out = tmp_path / "run"
    checkpoint = checkpoint_of(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out), tiny_model_dir, out)
    model, data, extra = tiny_model_dir, tiny_chat_dataset_dir, change if isinstance(change, tuple) else ()
    if change == "model":
        model = other_weights
    elif change == "data":
        data = str(Path(write_tiny_chat_jsonl(tmp_path / "other_data" / "train.jsonl", n=64, seed=1)).parent)
    with pytest.raises(RecipeError) as refused:
        run(tiny_experiment(model, data, out, "--resume_from_checkpoint", "last", *extra))
    message = str(refused.value)
    assert message.startswith(f"cannot resume from {checkpoint}: the run was started with other inputs: {named}")
    assert "\n" not in message and message.endswith("or start over with --overwrite_output_dir true, or give another "
                                                    "output_dir")
    assert message.count(" -> ") == 1  # nothing else differs
    same = train_module.run_inputs(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out), tiny_model_dir)
    check_resume_inputs(checkpoint, same)


def test_a_checkpoint_without_a_manifest_is_not_resumed(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    out = tmp_path / "run"
    checkpoint = fake_checkpoint(out, 2)
    with pytest.raises(RecipeError, match=rf"^cannot resume from {checkpoint}: it holds no run_manifest.json "
                                          r"\(saved by an earlier version of dualadam-hf, or by another program\), so "
                                          r"whether .* cannot be told; start over with --overwrite_output_dir true"):
        run(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out, "--resume_from_checkpoint", "last"))


def test_an_optimizer_that_refuses_the_checkpoints_state_ends_the_run_in_one_line(tmp_path):
    """However the optimizer words its refusal (DualAdam's, torch's "loaded state dict contains a parameter group
    that doesn't match", a stricter check's), a resume it refuses ends in one line naming the checkpoint."""

    class Trainer:
        def train(self, resume_from_checkpoint=None):
            self._load_optimizer_and_scheduler(resume_from_checkpoint)

        def _load_optimizer_and_scheduler(self, checkpoint):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group\n(details)")

    checkpoint = tmp_path / "checkpoint-4"
    with pytest.raises(RecipeError) as refused:
        train_module._train(Trainer(), checkpoint)
    assert str(refused.value) == (f"cannot resume from {checkpoint}: its optimizer state does not load: loaded state "
                                  "dict contains a parameter group that doesn't match the size of optimizer's group; "
                                  "resume from an earlier checkpoint, or start over with --overwrite_output_dir true")
    with pytest.raises(ValueError, match="details"):  # without a checkpoint it is no resume's problem
        train_module._train(Trainer(), None)


# --- a folder that holds a run is not trained into afresh ------------------------------------------------------


def test_training_afresh_into_a_folder_holding_a_run_is_refused(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    """Without a resume flag the run would retrain from scratch and replace the run's run_done.json."""
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    (out / DONE_FILE).write_text('{"log_history": []}')
    with pytest.raises(RecipeError, match=rf"^{out} already holds a run \(checkpoint-2, {DONE_FILE}\): training "
                                          r"would start over and replace it. Continue it with --resume_from_checkpoint "
                                          r"last, or start over with --overwrite_output_dir true"):
        run(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out))
    assert (out / DONE_FILE).read_text() == '{"log_history": []}'
    (out / DONE_FILE).unlink()
    with pytest.raises(RecipeError, match=r"already holds a run \(checkpoint-2\)"):
        run(tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out))


def test_overwriting_and_resuming_a_named_checkpoint_are_not_asked_together(tiny_model_dir, tiny_chat_dataset_dir,
                                                                             tmp_path):
    out = tmp_path / "run"
    checkpoint = fake_checkpoint(out, 2)
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out, "--overwrite_output_dir", "true",
                                 "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(RecipeError, match="overwrite_output_dir starts .* over, resume_from_checkpoint .* continues "
                                          "a run: give one of them"):
        run(experiment)
    assert checkpoint.is_dir()


def test_overwrite_removes_the_earlier_runs_files_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4)
    (out / "tmp-checkpoint-6").mkdir()
    for name in (DONE_FILE, "trainer_state.json", "training_args.bin", "adapter_model.safetensors",
                 "adapter_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "accuracy_rows.json", "sharpness.json", "compare_command.json", ".train.lock", "notes.txt"):
        (out / name).write_text("x")
    (out / "runs").mkdir()  # e.g. TensorBoard logs
    elsewhere = tmp_path / "elsewhere"
    fake_checkpoint(elsewhere, 8)
    (out / "checkpoint-8").symlink_to(elsewhere / "checkpoint-8")
    removed = clear_earlier_run(out)
    assert sorted(p.name for p in out.iterdir()) == [".train.lock", "compare_command.json", "notes.txt", "runs"]
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-8", "tmp-checkpoint-6", DONE_FILE} <= set(removed)
    assert (elsewhere / "checkpoint-8" / "trainer_state.json").is_file()  # a link is removed, not followed
    assert clear_earlier_run(tmp_path / "missing") == []


# --- what a run writes never lands on what it reads ---------------------------------------------------------


def test_an_output_dir_that_is_the_model_folder_is_refused_before_anything_loads(tiny_model_dir, tiny_chat_dataset_dir,
                                                                                 tmp_path, monkeypatch):
    """It trained there and overwrote the model's model.safetensors; with overwrite_output_dir it would first have
    deleted the model's config and weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    monkeypatch.setattr(train_module, "load_splits", lambda *args: pytest.fail("the data was loaded"))
    for extra in ((), ("--overwrite_output_dir", "true")):
        with pytest.raises(RecipeError, match=rf"^output_dir {model} is the model folder {model}: "
                                              r".*overwrite_output_dir would delete them\); give another output_dir$"):
            run(tiny_experiment(str(model), tiny_chat_dataset_dir, model, *extra))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_an_output_dir_in_or_around_an_input_or_another_run_is_refused(tmp_path):
    model, data, other = tmp_path / "models" / "tiny", tmp_path / "data", tmp_path / "runs" / "a"
    model.mkdir(parents=True)
    data.mkdir()
    fake_checkpoint(other, 2)
    inputs = {"the model folder": model, "the data folder": data}
    for out, words in ((model / "finetuned", f"lies inside the model folder {model}"),
                       (tmp_path / "models", f"contains the model folder {model}"),
                       (data, f"is the data folder {data}"),
                       (other / "more", f"lies inside the folder of another run, {other} (it holds checkpoint-2)"),
                       (other / "checkpoint-2", "lies inside the folder of another run"),
                       (tmp_path / "runs", f"contains the folder of another run, {other}")):
        with pytest.raises(RecipeError, match=rf"^output_dir {out} {re.escape(words)}"):
            train_module.check_output_apart(out, inputs)
    train_module.check_output_apart(tmp_path / "fresh", inputs)
    train_module.check_output_apart(other, inputs)  # the run's own folder: resumed, or refused as holding a run
    # A data file: an output folder beside it writes nothing over it; one that holds it may.
    data_file = tmp_path / "project" / "data.jsonl"
    data_file.parent.mkdir()
    data_file.write_text("{}\n")
    train_module.check_output_apart(data_file.parent / "outputs" / "run", {"the data file": data_file})
    with pytest.raises(RecipeError, match=rf"^output_dir {data_file.parent} contains the data file {data_file}: "):
        train_module.check_output_apart(data_file.parent, {"the data file": data_file})


# --- a diverged run ---------------------------------------------------------------------------------------------


def test_a_diverged_run_says_which_finite_checkpoint_it_keeps_if_any(tmp_path):
    assert finite_checkpoint_words(tmp_path) == "it saved no checkpoint before diverging, so it keeps no finite weights"
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, state=False)  # cut off
    assert finite_checkpoint_words(tmp_path) == f"its last checkpoint, {tmp_path / 'checkpoint-2'}, is the last " \
                                                "finite one"


def test_resuming_a_diverged_run_without_a_checkpoint_says_so(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / DONE_FILE).write_text(json.dumps({"log_history": [], "diverged": {"step": 3, "what": "loss"}}))
    experiment = tiny_experiment(tiny_model_dir, tiny_chat_dataset_dir, out, "--resume_from_checkpoint", "last")
    with pytest.raises(RecipeError) as refused:
        run(experiment)
    assert str(refused.value) == (f"{out} holds a run that diverged at step 3 ({DONE_FILE}) and has no finite "
                                  "checkpoint to resume from. To train again, start over with --overwrite_output_dir "
                                  "true, or give another output_dir.")


# --- a full disk -------------------------------------------------------------------------------------------


def disk_full_after(half: bool):
    """A Path.write_text that writes half of its text (if ``half``) and then finds the disk full."""
    original = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if half:
            original(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    return write_text


@pytest.mark.parametrize("half", [False, True])
def test_a_full_disk_leaves_the_file_as_it_was_and_says_so_in_one_line(tmp_path, monkeypatch, half):
    done = tmp_path / DONE_FILE
    done.write_text('{"earlier": 1}')
    monkeypatch.setattr(Path, "write_text", disk_full_after(half))
    with pytest.raises(RecipeError) as refused:
        write_atomically(done, {"log_history": [1, 2, 3]})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot write {done}: No space left on device;")
    assert "--resume_from_checkpoint last" in message
    monkeypatch.undo()
    assert done.read_text() == '{"earlier": 1}' and sorted(p.name for p in tmp_path.iterdir()) == [DONE_FILE]


def test_write_errors_from_deep_inside_become_one_line(tmp_path):
    deep = failed_write(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors")),
                        tmp_path)
    assert str(deep) == (f"cannot write the run's files in {tmp_path}: No space left on device "
                         f"({tmp_path / 'model.safetensors'}); " + train_module._AFTER_A_FAILED_WRITE)
    torch_words = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
    assert "file write failed" in str(failed_write(torch_words, tmp_path))
    assert failed_write(OSError(errno.ENOENT, "No such file"), tmp_path) is None  # not a write problem
    assert failed_write(RuntimeError("shapes differ"), tmp_path) is None


def test_torchs_own_words_for_a_full_disk_become_one_line(tmp_path):
    """A full disk while the optimizer state was saved ended in a traceback: torch's stream writer words it
    "basic_ios::clear", or "unexpected pos" (what /dev/full, a device that is always full, gives here)."""
    words = ["basic_ios::clear: iostream error"]
    if Path("/dev/full").exists():
        with pytest.raises(RuntimeError) as full:
            torch.save({"exp_avg": torch.zeros(100_000)}, "/dev/full")
        words.append(str(full.value).strip().splitlines()[0])
    for text in words:
        message = str(failed_write(RuntimeError(text), tmp_path))
        assert message.startswith(f"cannot write the run's files in {tmp_path}: {text}, ") and "\n" not in message
        assert "bytes free on its disk;" in message and "--resume_from_checkpoint last" in message


# --- end to end -----------------------------------------------------------------------------------------------


def error_line(stderr: str) -> str:
    """The command's error: one line, and no traceback (progress bars may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dualadam-hf train: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_resume_refusals_end_to_end(tiny_model_dir, tiny_chat_dataset_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--optim_args", "blend_steps=16",
                                "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--max_steps", "4",
                                "--save_steps", "2", "--save_total_limit", "5")]
    assert main(argv) == 0
    first = json.loads((out / DONE_FILE).read_text())
    capsys.readouterr()
    # Trained again without a flag: refused, the run kept.
    assert main(argv) == 2
    assert "already holds a run (checkpoint-4, checkpoint-2, run_done.json)" in error_line(capsys.readouterr().err)
    assert json.loads((out / DONE_FILE).read_text()) == first
    shutil.rmtree(out / "checkpoint-4")  # killed after checkpoint-2
    (out / DONE_FILE).unlink()
    resume = ["--resume_from_checkpoint", "last"]
    # Other settings asked on resume: refused, each named.
    assert main(argv + ["--optim_args", "blend_steps=4", "--learning_rate", "5e-3"] + resume) == 2
    error = error_line(capsys.readouterr().err)
    assert "optim_args: checkpoint 'blend_steps=16', asked 'blend_steps=4'" in error
    assert "learning_rate: checkpoint 0.001, asked 0.005" in error and "--overwrite_output_dir" in error
    # A step count its checkpoint does not agree with: refused.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = state_file.read_text()
    state_file.write_text(state.replace('"global_step": 2', '"global_step": 1000'))
    assert main(argv + resume) == 2
    assert "global_step is 1000, but the folder checkpoint-2 was saved at step 2" in error_line(
        capsys.readouterr().err)
    state_file.write_text(state)
    # A moment of another shape (a state saved for another model): the optimizer refuses it as the Trainer loads
    # it, and the command says so in one line.
    optimizer_file = out / "checkpoint-2" / "optimizer.pt"
    kept = optimizer_file.read_bytes()
    saved = torch.load(optimizer_file, weights_only=True)
    first = next(iter(saved["state"].values()))
    first["exp_avg"] = first["exp_avg"].reshape(-1)[:1].clone()
    torch.save(saved, optimizer_file)
    assert main(argv + resume) == 2
    assert "load_state_dict: the state of parameter 0 does not fit it (exp_avg has shape (1,)" in error_line(
        capsys.readouterr().err)
    # A damaged moment: the checks before the Trainer read no moment, the optimizer refuses it as it loads it.
    saved = torch.load(io.BytesIO(kept), weights_only=True)
    next(iter(saved["state"].values()))["exp_avg"].view(-1)[0] = float("nan")
    torch.save(saved, optimizer_file)
    assert main(argv + resume) == 2
    assert "is damaged (exp_avg holds non-finite values)" in error_line(capsys.readouterr().err)
    optimizer_file.write_bytes(kept)
    # The same settings resume, mid-schedule (the group's lr has moved; its initial lr is what is compared).
    assert main(argv + resume) == 0
    history = json.loads((out / DONE_FILE).read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    # Starting over replaces the run's files.
    (out / "compare_command.json").write_text("{}")
    assert main(argv + ["--max_steps", "2", "--overwrite_output_dir", "true"]) == 0
    printed = capsys.readouterr().out
    assert "overwrite_output_dir: removed the earlier run's files" in printed and "checkpoint-4" in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    history = json.loads((out / DONE_FILE).read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2] and (out / "compare_command.json").is_file()


@pytest.mark.slow
def test_a_diverged_run_without_a_checkpoint_keeps_no_weights(tiny_model_dir, tiny_chat_dataset_dir, tmp_path,
                                                               capsys):
    from dualadam_hf.experiments import sharpness_cli

    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--optim", "adamw_torch", "--optim_args",
                                "", "--learning_rate", "1e4", "--max_steps", "8", "--save_strategy", "no")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    step = json.loads((out / DONE_FILE).read_text())["diverged"]["step"]
    assert "it saved no checkpoint before diverging, so it keeps no finite weights" in printed
    assert "its last checkpoint" not in printed
    assert not any((out / name).exists() for name in ("adapter_model.safetensors", "model.safetensors"))
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 2
    error = error_line(capsys.readouterr().err)
    assert f"diverged at step {step} ({DONE_FILE}) and has no finite checkpoint" in error
    assert "save_strategy" not in error
    assert sharpness_cli.main(["--model", str(out), "--random_batches"]) == 2
    assert "marked diverged" in capsys.readouterr().err


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_it_resumes(tiny_model_dir, tiny_chat_dataset_dir, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--max_steps", "2", "--save_steps", "2")]
    original = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == f"{DONE_FILE}.tmp":
            original(self, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert main(argv) == 2
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert not (out / DONE_FILE).exists() and not (out / f"{DONE_FILE}.tmp").exists()
    monkeypatch.undo()
    # Saving the model fails the same way, deep inside the Trainer.
    from transformers import Trainer

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(Trainer, "save_model", disk_full)
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 2
    assert f"cannot write the run's files in {out}: No space left on device" in error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 0  # room again: the run finishes
    assert json.loads((out / DONE_FILE).read_text())["log_history"]


def test_a_run_carries_its_manifest_and_resumes_only_from_its_own_inputs(tiny_model_dir, tiny_chat_dataset_dir,
                                                                          tmp_path, capsys):
    import hashlib

    out = tmp_path / "run"
    argv = ["train", *tiny_argv(tiny_model_dir, tiny_chat_dataset_dir, out, "--max_steps", "2", "--save_steps", "2")]
    assert main(argv) == 0
    done = json.loads((out / DONE_FILE).read_text())
    record = done[identity.MANIFEST_KEY]
    saved = json.loads((out / "checkpoint-2" / identity.MANIFEST_FILE).read_text())
    assert record["inputs"] == saved["inputs"] == json.loads((out / identity.MANIFEST_FILE).read_text())["inputs"]
    weights = hashlib.sha256((Path(tiny_model_dir) / "model.safetensors").read_bytes()).hexdigest()
    assert record["inputs"]["model"]["model weights"] == {"model.safetensors": weights}
    assert set(record["inputs"]["model"]) == {"model weights", "model config", "tokenizer", "chat template"}
    assert list(record["inputs"]["data"]["data files"]) == [str(Path(tiny_chat_dataset_dir) / "train.jsonl")]
    assert record["inputs"]["settings"]["train_size"] == 16 and record["inputs"]["settings"]["processes"] == 1
    segment = record["segments"][-1]
    assert segment["started"] <= segment["ended"] and saved["segments"][-1]["ended"] is None
    assert segment["libraries"]["transformers"] and segment["dualadam_hf"]["version"]
    assert record["where"]["model"] == str(Path(tiny_model_dir).resolve())
    # The log history ends with it, so a comparison's raw logs, made of the history, carry it too.
    assert done["log_history"][-1] == {identity.MANIFEST_KEY: record, "step": 2}
    capsys.readouterr()
    assert main(argv + ["--resume_from_checkpoint", "last", "--train_size", "8"]) == 2
    assert "the run was started with other inputs: train_size (16 -> 8)" in error_line(capsys.readouterr().err)
    # Resumed as it ran: only the evaluation is redone, and the manifest records both processes.
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 0
    again = json.loads((out / DONE_FILE).read_text())[identity.MANIFEST_KEY]
    assert again["inputs"] == record["inputs"] and len(again["segments"]) == 2
