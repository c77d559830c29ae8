"""End to end, in fresh processes that never import dualadam_hf: an HfArgumentParser script, `trl sft` and a
YAML config all train with `--optim dualadam` thanks to the startup hook alone."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualadam_hf import blend_weight

SCRIPTS = Path(__file__).parent / "scripts"
STEPS = 16
COMMON_ARGS = [
    "--optim", "dualadam", "--optim_args", "blend_fraction=0.5", "--max_steps", str(STEPS),
    "--per_device_train_batch_size", "8", "--logging_steps", "4", "--save_steps", str(STEPS), "--seed", "0",
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
]


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def check_dualadam_run(output_dir: Path, output: str) -> None:
    """DualAdam was the optimizer, blend_fraction was resolved, the blend was logged and the loss went down."""
    checkpoint = output_dir / f"checkpoint-{STEPS}"
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    group = optimizer_state["param_groups"][0]
    assert group["blend_fraction"] == 0.5 and group["switch_rate"] == pytest.approx(2 / STEPS)
    assert all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in optimizer_state["state"].values())
    assert all(float(s["step"]) == STEPS for s in optimizer_state["state"].values())

    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [4, 8, 12, 16]
    expected_blend = [blend_weight(step, 2 / STEPS) for step in (4, 8, 12, 16)]
    assert [entry["dualadam/blend"] for entry in logs] == pytest.approx(expected_blend)
    assert logs[0]["dualadam/blend"] > 0
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert "dualadam/blend" in output  # printed with the other training logs
    # The inverse share is logged beside the blend: > 0 while blending, 0 once the blend is spent.
    shares = [entry["dualadam/inverse_share"] for entry in logs]
    assert all((share > 0) == (entry["dualadam/blend"] > 0) for share, entry in zip(shares, logs, strict=True))
    assert all(0 <= share < 1 for share in shares) and "dualadam/inverse_share" in output


@pytest.mark.slow
def test_hfargumentparser_script_without_import(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    script = SCRIPTS / "train_clm.py"
    assert not re.search(r"^\s*(import|from)\s+dualadam_hf", script.read_text(), re.MULTILINE)
    output = run(
        [sys.executable, str(script), "--model_name_or_path", tiny_model_dir,
         "--train_file", str(Path(tiny_chat_dataset_dir) / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
         "--learning_rate", "1e-2", *COMMON_ARGS],
        cwd=tmp_path,
    )
    check_dualadam_run(tmp_path / "out", output)


@pytest.mark.slow
def test_script_with_bad_optim_args_fails_while_parsing(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_clm.py"), "--model_name_or_path", tiny_model_dir,
         "--train_file", str(Path(tiny_chat_dataset_dir) / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
         "--optim", "dualadam", "--optim_args", "blend_step=10", "--report_to", "none"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Unknown --optim_args key 'blend_step' for --optim dualadam; valid keys: switch_rate, blend_steps" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def trl_command() -> list[str]:
    trl = shutil.which("trl", path=str(Path(sys.executable).parent))
    assert trl is not None, "the trl command is not installed next to this Python"
    return [trl, "sft"]


@pytest.mark.slow
def test_trl_sft_with_lora(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    output = run(
        [*trl_command(), "--model_name_or_path", tiny_model_dir, "--dataset_name", tiny_chat_dataset_dir,
         "--output_dir", str(tmp_path / "out"), "--learning_rate", "5e-2", "--use_peft", "--lora_r", "8",
         "--lora_alpha", "16", *COMMON_ARGS],
        cwd=tmp_path,
    )
    check_dualadam_run(tmp_path / "out", output)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_trl_sft_from_yaml_config(tiny_model_dir, tiny_chat_dataset_dir, tmp_path):
    output = run(
        [*trl_command(), "--config", str(SCRIPTS / "sft_dualadam_lora.yaml"), "--model_name_or_path", tiny_model_dir,
         "--dataset_name", tiny_chat_dataset_dir, "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path,
    )
    check_dualadam_run(tmp_path / "out", output)
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.slow
def test_trl_sft_with_8bit_dualadam_state(tiny_chat_dataset_dir, tmp_path):
    """`trl sft --optim dualadam_8bit`, full fine-tuning: the checkpoint's moments are torchao's 8-bit state where
    a tensor is large enough (hidden size 64: the attention and MLP weights)."""
    pytest.importorskip("torchao")
    from dualadam_hf.experiments.tiny import build_tiny_llama
    from dualadam_hf.lowbit import is_quantized, state_types

    state_types()  # torchao's state classes: torch.load(weights_only=True) knows them once it is imported
    model_dir = build_tiny_llama(tmp_path / "llama64", hidden_size=64)
    steps = 4
    run([*trl_command(), "--model_name_or_path", model_dir, "--dataset_name", tiny_chat_dataset_dir,
         "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3", "--optim", "dualadam_8bit",
         "--optim_args", "blend_steps=2", "--max_steps", str(steps), "--per_device_train_batch_size", "8",
         "--save_steps", str(steps), "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"], cwd=tmp_path)
    saved = torch.load(tmp_path / "out" / f"checkpoint-{steps}" / "optimizer.pt", weights_only=True)
    assert {group["state_bits"] for group in saved["param_groups"]} == {8}
    moments = [s["exp_avg"] for s in saved["state"].values()]
    assert any(is_quantized(m) for m in moments) and all(float(s["step"]) == steps for s in saved["state"].values())
