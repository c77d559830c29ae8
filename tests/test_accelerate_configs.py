"""Static checks of the shipped accelerate configs, GPU and CPU (fast; no processes launched).

tests/multiprocess/test_engines.py launches the CPU variants for real.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
SHIPPED = [
    "single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml", "fsdp2.yaml",
]
# CPU variant -> the GPU config it mirrors.
CPU = {
    "cpu/multi_cpu.yaml": "multi_gpu.yaml",
    "cpu/deepspeed_zero1.yaml": "deepspeed_zero1.yaml",
    "cpu/deepspeed_zero2.yaml": "deepspeed_zero2.yaml",
    "cpu/deepspeed_zero3.yaml": "deepspeed_zero3.yaml",
    "cpu/deepspeed_zero3_offload.yaml": "deepspeed_zero3_offload.yaml",
    "cpu/fsdp2.yaml": "fsdp2.yaml",
}
FSDP_SHIM = "scripts/run_fsdp_on_cpu.py"
# What the training script needs to run its processes on the CPU, per distributed_type of a CPU config.
CPU_SCRIPT_FLAGS = {"MULTI_GPU": ["--use_cpu"], "DEEPSPEED": ["--ddp_backend", "gloo"], "FSDP": []}


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def deepspeed_settings(config: dict) -> dict:
    """The DeepSpeed config a YAML resolves to: its JSON file, or the inline accelerate keys."""
    ds = config.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        return json.loads((REPO / ds["deepspeed_config_file"]).read_text())
    return ds


def header_command(name: str) -> list[str]:
    """The launch command in the config's header comment, as argv."""
    lines = [line.lstrip("#").strip() for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")]
    commands = [line for line in lines if line.startswith("accelerate launch ")]
    assert len(commands) == 1, f"{name}: expected one `accelerate launch` line in the header, got {commands}"
    return shlex.split(commands[0])


@pytest.mark.parametrize("name", SHIPPED + list(CPU))
def test_config_is_valid_for_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    # accelerate's own loader (what `accelerate launch --config_file` uses) raises on unknown keys.
    loaded = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    # use_cpu true would make accelerate launch start one process whatever num_processes says.
    assert loaded.use_cpu is False
    assert loaded.num_machines == 1


@pytest.mark.parametrize("name", SHIPPED + list(CPU))
def test_header_is_the_launch_command_of_this_file(name: str) -> None:
    argv = header_command(name)
    assert argv[:4] == ["accelerate", "launch", "--config_file", f"accelerate_configs/{name}"], argv
    assert "train.py" in argv and argv[argv.index("train.py") + 1:][:2] == ["--optim", "dualadam"], argv


@pytest.mark.parametrize("name", list(CPU))
def test_cpu_variant_runs_two_cpu_processes(name: str) -> None:
    config = load(name)
    assert config["num_processes"] == 2
    assert config["use_cpu"] is False
    settings = deepspeed_settings(config)
    if "deepspeed_config_file" in config.get("deepspeed_config", {}):
        # accelerate rejects mixed_precision next to a DeepSpeed config file; the file follows the Trainer.
        assert "mixed_precision" not in config
        assert settings["bf16"]["enabled"] == "auto" and settings["fp16"]["enabled"] == "auto"
    else:
        assert config["mixed_precision"] == "no"
    # The header command puts the script's processes on the CPU the way this engine needs.
    argv = header_command(name)
    script_flags = argv[argv.index("train.py") + 1:]
    for flag in CPU_SCRIPT_FLAGS[config["distributed_type"]]:
        assert flag in script_flags, (name, argv)
    if config["distributed_type"] == "FSDP":
        assert argv[argv.index("train.py") - 1] == FSDP_SHIM, argv
        assert (REPO / FSDP_SHIM).is_file()


@pytest.mark.parametrize(("name", "gpu"), list(CPU.items()))
def test_cpu_variant_is_its_gpu_config_but_for_the_cpu_keys(name: str, gpu: str) -> None:
    cpu_config, gpu_config = load(name), load(gpu)
    for config in (cpu_config, gpu_config):
        for key in ("num_processes", "mixed_precision"):
            config.pop(key, None)
        ds = config.get("deepspeed_config", {})
        ds.pop("deepspeed_config_file", None)  # the CPU JSON file is compared below
    assert cpu_config == gpu_config
    cpu_settings, gpu_settings = deepspeed_settings(load(name)), deepspeed_settings(load(gpu))
    if "zero_optimization" in cpu_settings:
        # No pinned memory without a GPU; everything else as on GPUs.
        assert cpu_settings["zero_optimization"]["offload_optimizer"].pop("pin_memory") is False
        gpu_settings["zero_optimization"]["offload_optimizer"].pop("pin_memory")
        assert cpu_settings == gpu_settings


@pytest.mark.parametrize("name", [n for n in SHIPPED + list(CPU) if "deepspeed" in n])
def test_deepspeed_configs_leave_the_optimizer_to_the_trainer(name: str) -> None:
    config = load(name)
    assert config["distributed_type"] == "DEEPSPEED"
    settings = deepspeed_settings(config)
    # An optimizer block would make DeepSpeed build its own optimizer instead of DualAdam.
    assert "optimizer" not in settings
    ds = config["deepspeed_config"]
    if "deepspeed_config_file" in ds:
        # accelerate ignores (and rejects) inline DeepSpeed keys next to a config file.
        assert set(ds) <= {"deepspeed_config_file", "deepspeed_multinode_launcher", "zero3_init_flag"}, ds


@pytest.mark.parametrize("name", ["deepspeed_zero3_offload.yaml", "cpu/deepspeed_zero3_offload.yaml"])
def test_offload_config_keeps_dualadam(name: str) -> None:
    settings = deepspeed_settings(load(name))
    zero = settings["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    # Without this accelerate replaces the client optimizer with DeepSpeedCPUAdam.
    assert settings["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("name", ["fsdp2.yaml", "cpu/fsdp2.yaml"])
def test_fsdp2_config(name: str) -> None:
    fsdp = load(name)["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes one ordinary checkpoint
