"""The `dualadam-hf` command: subcommands, error exits before training, and `train` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualadam_hf import __version__
from dualadam_hf.experiments.cli import main

DEFAULT_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml")


def test_version_and_help_list_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0
    printed = capsys.readouterr().out
    for command in ("train", "compare", "sharpness"):
        assert command in printed


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "dualadam_hf", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"dualadam-hf {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "recipes/nope.yaml"], "recipe not found: recipes/nope.yaml"),
        (["train", "--config", DEFAULT_RECIPE, "--optim", "adam_w"], "unknown optimizer 'adam_w'"),
        (["train", "--config", DEFAULT_RECIPE, "--lora_alfa", "4"], "'lora_alfa' (did you mean 'lora_alpha'?)"),
        (["compare", "--config", DEFAULT_RECIPE, "--optims", "adamw_torch,foo"], "unknown optimizer 'foo'"),
        (["compare", "--config", DEFAULT_RECIPE, "--seeds", "0"], "--seeds must be >= 1"),
        # These ended in a traceback once the model had loaded, or trained (a negative weight decay).
        (["train", "--config", DEFAULT_RECIPE, "--gradient_accumulation_steps", "0"],
         "gradient_accumulation_steps must be >= 1, got 0"),
        (["train", "--config", DEFAULT_RECIPE, "--per_device_train_batch_size", "0"],
         "per_device_train_batch_size must be >= 1, got 0"),
        (["train", "--config", DEFAULT_RECIPE, "--optim", "adamw_torch", "--weight_decay", "-1"],
         "--optim adamw_torch: Invalid weight_decay value: -1.0"),
    ],
)
def test_bad_input_exits_with_code_2_and_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


@pytest.mark.parametrize("byte, name", [(b"\x00", "0x00"), (b"\x07", "0x07")])
def test_a_recipe_holding_a_control_character_is_refused_in_one_line(tmp_path, capsys, byte, name):
    """PyYAML's reader refused it with a ReaderError traceback."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"model_name_or_path: smollm2-135m-instruct\ndataset_name: x" + byte + b"\n")
    for command in ("train", "compare"):
        assert main([command, "--config", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert f"error: recipe {recipe}: line 2 holds the control character {name}, which YAML does not allow" in err
        assert "Traceback" not in err


def test_compare_says_what_it_loads_before_its_slow_start(capsys):
    # Importing the libraries and checking every variant's runs takes half a minute on CPU: a line comes first.
    assert main(["compare", "--config", DEFAULT_RECIPE, "--seeds", "0"]) == 2
    assert capsys.readouterr().out.startswith(f"[compare] loading the libraries, the recipe {DEFAULT_RECIPE}")


def test_missing_model_is_reported_before_training(tmp_path, capsys):
    argv = ["train", "--config", DEFAULT_RECIPE, "--model_name_or_path", str(tmp_path / "nothing"),
            "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sharpness_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sharpness", "--help"])
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out


def test_sharpness_on_the_meta_device_is_refused_before_loading(tiny_model_dir, capsys):
    argv = ["sharpness", "--model", tiny_model_dir, "--random_batches", "1", "--device", "meta"]
    assert main(argv) == 2
    assert "--device meta holds shapes, not numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_train_smoke_on_the_default_recipe_with_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    """`train --smoke`: real math data, answer-only loss, accuracy by generation, then resume from the log."""
    out = tmp_path / "run"
    argv = ["train", "--config", DEFAULT_RECIPE, "--smoke", "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(out)]
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    keys = {k for entry in state["log_history"] for k in entry}
    assert {"loss", "eval_loss", "eval_accuracy", "peak_memory_mb", "train_runtime", "dualadam/blend"} <= keys
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2").is_dir()
    # The checkpoint fixes the run's length (and with it a blend_fraction's blend): asking for 4 steps is
    # refused with what differs; the same command resumes the finished run without training it again.
    capsys.readouterr()
    assert main(argv + ["--max_steps", "4", "--resume_from_checkpoint", "last"]) == 2
    assert "max_steps: checkpoint 2, asked 4" in capsys.readouterr().err
    assert main(argv + ["--resume_from_checkpoint", "last"]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]


@pytest.mark.multiprocess
def test_train_under_accelerate_launch_with_two_processes(tiny_model_dir, tmp_path):
    """The shipped CPU DDP config starts two processes; `--use_cpu true` puts them on the CPU with gloo.
    (`accelerate launch --cpu` would start one process, whatever --num_processes says.)"""
    import socket

    out = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(repo / "accelerate_configs" / "cpu" / "multi_cpu.yaml"), "--main_process_port", str(port),
        "-m", "dualadam_hf", "train", "--config", DEFAULT_RECIPE, "--smoke", "--model_name_or_path", tiny_model_dir,
        "--output_dir", str(out), "--use_cpu", "true", "--log_level", "info", "--log_level_replica", "info",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # Each rank logs the start of training; the global batch is 2 per device x 2 processes.
    assert log.count("***** Running training *****") == 2, log[-3000:]
    assert "Instantaneous batch size per device = 2" in log, log[-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log, log[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("eval_accuracy" in entry for entry in state["log_history"])


@pytest.mark.slow
def test_train_prints_nothing_of_torchaos_import(tiny_model_dir, tmp_path):
    """transformers imports torchao where it is installed; on builds without its CUDA extensions that import
    logs "Failed to load ... .so" lines and a torch deprecation notice: none of them reach a command's output."""
    pytest.importorskip("torchao")
    command = [sys.executable, "-m", "dualadam_hf", "train", "--config", DEFAULT_RECIPE, "--smoke",
               "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Failed to load" not in log and "_pytree" not in log, log[:3000]
