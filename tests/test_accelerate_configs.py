"""Static checks of the shipped accelerate configs (fast; no processes launched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "accelerate_configs"
SHIPPED = [
    "single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml", "fsdp2.yaml",
]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def deepspeed_settings(config: dict) -> dict:
    """The DeepSpeed config a YAML resolves to: its JSON file, or the inline accelerate keys."""
    ds = config.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        return json.loads((CONFIGS.parent / ds["deepspeed_config_file"]).read_text())
    return ds


@pytest.mark.parametrize("name", SHIPPED)
def test_config_is_valid_for_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    # accelerate's own loader (what `accelerate launch --config_file` uses) raises on unknown keys.
    loaded = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert loaded.use_cpu is False
    assert loaded.num_machines == 1


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("deepspeed")])
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


def test_offload_config_keeps_dualadam() -> None:
    settings = deepspeed_settings(load("deepspeed_zero3_offload.yaml"))
    zero = settings["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    # Without this accelerate replaces the client optimizer with DeepSpeedCPUAdam.
    assert settings["zero_force_ds_cpu_optimizer"] is False


def test_fsdp2_config() -> None:
    fsdp = load("fsdp2.yaml")["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes one ordinary checkpoint
