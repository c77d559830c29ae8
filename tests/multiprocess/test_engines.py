"""DualAdam under DDP, DeepSpeed ZeRO-1/2/3 (+ optimizer offload) and FSDP2, for real.

Each engine runs the same short Trainer job (tests/multiprocess/train_lm.py,
``--optim dualadam``) through ``accelerate launch`` with two CPU processes and
the gloo backend, using CPU variants of the shipped ``accelerate_configs``:

* once uninterrupted (it also saves the checkpoint at step ``SAVE_AT``), and
* once resumed from that checkpoint in a new launch.

One single-process run on the same global batch is the reference. The cost is
two launches per engine, 15-30 s each on 2 cores (about 5 minutes for the
module). On a fresh machine DeepSpeed first JIT-builds its shared-memory comm op
and, for the guard test, its cpu_adam op (a few minutes each, then cached in
~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "accelerate_configs"
SCRIPT = HERE / "train_lm.py"
FSDP_SHIM = HERE / "run_fsdp_on_cpu.py"

MAX_STEPS = 5
SAVE_AT = 3
PER_RANK_BATCH = 2
WORLD = 2
# blend_steps=4: the inverse-Adam part is live in steps 1-3 and spent from step 4,
# so the run covers both phases and a resume at step 3 must carry the per-parameter
# step counters across the switch (a restarted counter would replay the blend).
OPTIM_ARGS = "blend_steps=4"
LAUNCH_TIMEOUT_S = 900

# Final parameters vs the single-process run: float32 gradients are summed in a
# different order across ranks (observed differences ~1e-6), while the run moves
# parameters by ~3e-2. 2e-5 absolute sits well between the two.
MATCH_ATOL = 2e-5
# Resumed vs uninterrupted run of the same engine: the same computation replayed,
# bit-identical in practice; a small margin for reduction-order noise.
RESUME_ATOL = 1e-6


@dataclass(frozen=True)
class Engine:
    config: str  # shipped file under accelerate_configs/
    sharded: bool  # optimizer state split across ranks
    zero: bool = False  # a DeepSpeed ZeRO engine
    fsdp: bool = False
    offload: bool = False


ENGINES = {
    "ddp": Engine("multi_gpu.yaml", sharded=False),
    "zero1": Engine("deepspeed_zero1.yaml", sharded=True, zero=True),
    "zero2": Engine("deepspeed_zero2.yaml", sharded=True, zero=True),
    "zero3": Engine("deepspeed_zero3.yaml", sharded=True, zero=True),
    "zero3_offload": Engine("deepspeed_zero3_offload.yaml", sharded=True, zero=True, offload=True),
    "fsdp2": Engine("fsdp2.yaml", sharded=True, fsdp=True),
}


def cpu_variant(engine: Engine, out_dir: Path, *, keep_ds_cpu_optimizer: bool = True) -> Path:
    """The shipped config with what a 2-process CPU run needs changed, nothing else.

    ``use_cpu`` stays false: with ``use_cpu: true`` accelerate launch starts a
    single process; the processes are put on CPU from the script side instead
    (``--use_cpu`` for DDP, ``--ddp_backend gloo`` for DeepSpeed, the FSDP shim).
    """
    config = yaml.safe_load((CONFIGS / engine.config).read_text())
    config.update(num_processes=WORLD, use_cpu=False, mixed_precision="no")
    ds = config.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        ds_json = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
        zero = ds_json["zero_optimization"]
        # Small sub-groups: ZeRO-3 then calls DualAdam.step() several times per
        # optimizer step, which is what a per-optimizer step counter gets wrong.
        zero["sub_group_size"] = 4096
        zero.get("offload_optimizer", {})["pin_memory"] = False  # no pinned memory without a GPU
        if not keep_ds_cpu_optimizer:
            ds_json.pop("zero_force_ds_cpu_optimizer")  # let accelerate swap in DeepSpeedCPUAdam
        suffix = "" if keep_ds_cpu_optimizer else "_swapped"
        path = out_dir / f"ds_{engine.config}{suffix}.json"
        path.write_text(json.dumps(ds_json))
        ds["deepspeed_config_file"] = str(path)
        config.pop("mixed_precision")  # taken from the JSON file
    path = out_dir / (f"cpu_{engine.config}" if keep_ds_cpu_optimizer else f"cpu_swapped_{engine.config}")
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # CPU processes and gloo even on a machine with GPUs: these tests prove the wiring, not speed.
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    env.pop("DUALADAM_HF_NO_AUTOREGISTER", None)  # the startup hook is what makes --optim dualadam work
    return env


def script_args(model_dir: str, out: Path, batch: int) -> list[str]:
    return [
        "--model_path", model_dir, "--output_dir", str(out), "--report_dir", str(out / "report"),
        "--optim", "dualadam", "--optim_args", OPTIM_ARGS,
        "--learning_rate", "1e-2", "--weight_decay", "0.1", "--lr_scheduler_type", "constant",
        "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", str(batch),
        "--train_sampling_strategy", "sequential", "--seed", "0",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
    ]


def run(cmd: list[str], env: dict[str, str], log: Path, *, check: bool = True) -> int:
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT_S)
    if check and proc.returncode != 0:
        tail = log.read_text()[-6000:]
        pytest.fail(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}; log tail:\n{tail}")
    return proc.returncode


def launch(name: str, model_dir: str, work: Path, out: Path, extra: list[str], *, config: Path | None = None,
           check: bool = True) -> int:
    engine = ENGINES[name]
    env = base_env()
    config = config or cpu_variant(engine, work)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port())]
    if engine.fsdp:
        env["ACCELERATE_TORCH_DEVICE"] = "cpu"
        cmd.append(str(FSDP_SHIM))
    cmd.append(str(SCRIPT))
    cmd += script_args(model_dir, out, PER_RANK_BATCH)
    cmd += ["--use_cpu"] if name == "ddp" else ["--ddp_backend", "gloo"]
    return run(cmd + extra, env, out.with_suffix(".log"), check=check)


def read_reports(out: Path) -> list[dict]:
    return [json.loads((out / "report" / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, work: Path) -> Path:
    """One process, per-device batch = the global batch of the launches."""
    out = work / "reference"
    cmd = [sys.executable, str(SCRIPT)] + script_args(tiny_model_dir, out, PER_RANK_BATCH * WORLD)
    run(cmd + ["--use_cpu", "--save_strategy", "no"], base_env(), work / "reference.log")
    return out


@pytest.fixture(scope="module", params=list(ENGINES))
def runs(request: pytest.FixtureRequest, tiny_model_dir: str, work: Path) -> dict:
    """The uninterrupted launch (saving a checkpoint at SAVE_AT) and the resumed one."""
    name = request.param
    full, resumed = work / name, work / f"{name}_resumed"
    launch(name, tiny_model_dir, work, full, ["--save_strategy", "steps", "--save_steps", str(SAVE_AT)])
    checkpoint = full / f"checkpoint-{SAVE_AT}"
    assert checkpoint.is_dir(), f"no checkpoint at step {SAVE_AT} in {full}"
    launch(name, tiny_model_dir, work, resumed, ["--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint)])
    return {"name": name, "engine": ENGINES[name], "full": full, "resumed": resumed}


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_dualadam_does_the_math(runs: dict) -> None:
    engine: Engine = runs["engine"]
    for out in (runs["full"], runs["resumed"]):
        for rep in read_reports(out):
            chain = rep["optimizer_chain"]
            assert rep["world_size"] == WORLD
            assert chain[-1] == "dualadam_hf.optimizer.DualAdam", chain
            assert not any("CPUAdam" in c or c.endswith(".Adam") or c.endswith(".AdamW") for c in chain), chain
            if engine.zero:
                assert any(c.startswith("deepspeed.runtime.zero.") for c in chain), chain
            assert rep["offload_optimizer"] is engine.offload
            if engine.fsdp:
                # FSDP2: parameters and DualAdam's moments are DTensor shards.
                assert rep["param_classes"] == ["DTensor"] and rep["exp_avg_classes"] == ["DTensor"], rep
            assert rep["exp_avg_dtypes"] == ["torch.float32"]


def test_every_step_counter_equals_optimizer_steps(runs: dict) -> None:
    for out in (runs["full"], runs["resumed"]):
        for rep in read_reports(out):
            assert rep["global_step"] == MAX_STEPS
            assert rep["num_states"] > 0
            # One distinct value over every parameter / flat partition / sub-group.
            assert rep["steps"] == [float(MAX_STEPS)], rep["steps"]
    if runs["engine"].offload:
        # The offload variant uses small ZeRO-3 sub-groups: more states than param
        # groups proves step() ran once per sub-group without over-counting.
        rep = read_reports(runs["full"])[0]
        assert rep["num_states"] > len(rep["param_groups"]), rep["num_states"]


def test_logged_blend_matches_single_process(runs: dict, reference: Path) -> None:
    ref = json.loads((reference / "report" / "rank0.json").read_text())["logged"]
    ref_blend = [h.get("dualadam/blend") for h in ref]
    assert len(ref_blend) == MAX_STEPS and None not in ref_blend, ref
    assert ref_blend[0] > 0 and ref_blend[-1] == 0  # both phases of the blend are in the run
    for out in (runs["full"], runs["resumed"]):
        logged = read_reports(out)[0]["logged"]
        assert [h.get("dualadam/blend") for h in logged] == pytest.approx(ref_blend), logged


def test_final_parameters_match_single_process(runs: dict, reference: Path, tiny_model_dir: str) -> None:
    ref, got = final_params(reference), final_params(runs["full"])
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert sorted(got) == sorted(ref)
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 100 * MATCH_ATOL, f"training barely moved the parameters ({moved}); the comparison is vacuous"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=MATCH_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_optimizer_state_sharded(runs: dict, tiny_model_dir: str) -> None:
    total = sum(t.numel() for t in load_file(str(Path(tiny_model_dir) / "model.safetensors")).values())
    local = [rep["exp_avg_local_numel"] for rep in read_reports(runs["full"])]
    if not runs["engine"].sharded:
        assert local == [total] * WORLD, (local, total)  # DDP: every rank holds all of it
        return
    for n in local:
        assert 0.45 * total <= n <= 0.55 * total, (local, total)
    # Together the ranks hold everything once (plus alignment padding under ZeRO).
    assert total <= sum(local) <= total * 1.01 + 64, (local, total)


def test_resume_matches_uninterrupted(runs: dict) -> None:
    full, resumed = final_params(runs["full"]), final_params(runs["resumed"])
    assert sorted(full) == sorted(resumed)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=RESUME_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    logged_full = [h["loss"] for h in read_reports(runs["full"])[0]["logged"]]
    logged_resumed = [h["loss"] for h in read_reports(runs["resumed"])[0]["logged"]]
    assert logged_resumed == pytest.approx(logged_full, abs=1e-5)


def test_offload_without_the_flag_stops_instead_of_training_with_cpuadam(tiny_model_dir: str, work: Path) -> None:
    """The guard, for real: drop "zero_force_ds_cpu_optimizer": false and accelerate swaps in
    DeepSpeedCPUAdam; the run must stop before training. (The first run on a machine JIT-builds
    DeepSpeed's cpu_adam op, a few minutes; cached afterwards.)"""
    out = work / "swapped"
    config = cpu_variant(ENGINES["zero3_offload"], work, keep_ds_cpu_optimizer=False)
    code = launch("zero3_offload", tiny_model_dir, work, out, ["--save_strategy", "no"], config=config, check=False)
    log = out.with_suffix(".log").read_text()
    assert code != 0, log[-3000:]
    assert "DeepSpeedCPUAdam, not DualAdam" in log and "zero_force_ds_cpu_optimizer" in log, log[-3000:]
    assert not (out / "model.safetensors").exists() and not (out / "report").exists()
