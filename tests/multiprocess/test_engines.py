"""DualAdam under DDP, DeepSpeed ZeRO-1/2/3 (+ optimizer offload) and FSDP2, for real.

Each engine runs the same short Trainer job (tests/multiprocess/train_lm.py,
``--optim dualadam``) through ``accelerate launch`` with two CPU processes and
the gloo backend, using the shipped CPU configs ``accelerate_configs/cpu/*.yaml``
as they are (only the offload config gets a temporary copy, with small ZeRO-3
sub-groups) and the script flags their header commands give:

* once uninterrupted (it also saves the checkpoint at step ``SAVE_AT``), and
* once resumed from that checkpoint in a new launch.

One single-process run on the same global batch is the reference. DDP, FSDP2 and
ZeRO-2 run once more with ``inverse_scale="auto"`` (FSDP2 and ZeRO-2 resumed too),
against a single-process reference with the same optimizer arguments. The cost
is 20 runs, 10-50 s each on 2 cores (7.5 minutes for the module, 2 of them for
the auto runs). On a fresh machine DeepSpeed first JIT-builds its shared-memory
comm op (about 2 minutes), then cached in the suite's own TORCH_EXTENSIONS_DIR
(.cache/torch_extensions in the checkout, set by tests/conftest.py). The offload
guard's run is refused before DeepSpeed would build its cpu_adam op.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .launcher import (
    ENGINES,
    MATCH_ATOL,
    MAX_STEPS,
    PER_RANK_BATCH,
    RESUME_ATOL,
    SAVE_AT,
    SCRIPT,
    WORLD,
    Engine,
    base_env,
    final_params,
    launch,
    launch_config,
    read_reports,
    run,
    script_args,
    single_process_run,
)

pytestmark = pytest.mark.multiprocess

# inverse_scale="auto": each tensor's scale is calibrated at its first step. The auto runs save at
# step 2, so the resumed run takes step 3 (blend 0.25) with the scales restored from the checkpoint;
# from step 4 the blend is 0 and the scale no longer matters. A scale that was not restored would be
# calibrated again at step 3, from other moments, and the resumed run would end elsewhere.
AUTO_OPTIM_ARGS = "blend_steps=4,inverse_scale=auto"
AUTO_SAVE_AT = 2
# Calibrated, the inverse part r*s*mh*d is of the size of Adam's step on average and far larger on
# elements whose gradient is far above their tensor's root mean square (s = 1/mean(d**2)): these runs
# move parameters by up to ~4 (vs ~3e-2 with the paper's scale), and the reduction-order noise of the
# gradients grows with the step. So the match with one process is relative to how far each tensor
# moved: observed at most 2.5e-5 of it under DDP and 5.4e-5 under FSDP2, against differences of the
# order of the movement itself for a different calibration (as under ZeRO).
AUTO_MATCH_RTOL = 3e-4


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, work: Path) -> Path:
    return single_process_run(tiny_model_dir, work / "reference")


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


def check_inverse_share_logged(logged: list[dict]) -> None:
    """dualadam/inverse_share is logged with every loss: > 0 while the blend is on, 0 once it is over."""
    for h in logged:
        share, blend = h.get("dualadam/inverse_share"), h.get("dualadam/blend")
        assert share is not None and math.isfinite(share) and 0.0 <= share <= 1.0, logged
        assert (share > 0) == (blend > 0), logged


def test_logged_blend_matches_single_process(runs: dict, reference: Path) -> None:
    ref = json.loads((reference / "report" / "rank0.json").read_text())["logged"]
    ref_blend = [h.get("dualadam/blend") for h in ref]
    assert len(ref_blend) == MAX_STEPS and None not in ref_blend, ref
    assert ref_blend[0] > 0 and ref_blend[-1] == 0  # both phases of the blend are in the run
    check_inverse_share_logged(ref)
    for out in (runs["full"], runs["resumed"]):
        logged = read_reports(out)[0]["logged"]
        assert [h.get("dualadam/blend") for h in logged] == pytest.approx(ref_blend), logged
        check_inverse_share_logged(logged)
        if not runs["engine"].sharded:
            # DDP: every rank holds the whole state, so the share is the single-process one. (Under
            # ZeRO and FSDP2 it covers the logging rank's shard.)
            shares = [h["dualadam/inverse_share"] for h in logged]
            assert shares == pytest.approx([h["dualadam/inverse_share"] for h in ref], rel=1e-3), logged


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
    """The guard, for real: drop "zero_force_ds_cpu_optimizer": false and accelerate would swap in
    DeepSpeedCPUAdam; the run stops where its arguments are built, before the model loads (and before
    DeepSpeed would JIT-build its cpu_adam op, minutes on a fresh machine)."""
    out = work / "swapped"
    config = launch_config(ENGINES["zero3_offload"], work, keep_ds_cpu_optimizer=False)
    code = launch("zero3_offload", tiny_model_dir, work, out, ["--save_strategy", "no"], config=config, check=False)
    log = out.with_suffix(".log").read_text()
    assert code != 0, log[-3000:]
    assert "DeepSpeedCPUAdam, not DualAdam" in log and "zero_force_ds_cpu_optimizer" in log, log[-3000:]
    assert "under DeepSpeed optimizer offload" in log, log[-3000:]  # the refusal of the arguments, not of train begin
    assert not (out / "model.safetensors").exists() and not (out / "report").exists()


# -- inverse_scale="auto" -----------------------------------------------------------------------------

# Engines run with inverse_scale="auto". DDP and FSDP2 calibrate each scale over the whole tensor
# (FSDP2 with a collective over the DTensor), so they must end where one process does. ZeRO hands
# DualAdam one flat partition per param group and rank, and the scale is calibrated per partition:
# a different optimizer than one process runs, so ZeRO-2 is checked for what holds there instead.
AUTO_ENGINES = ["ddp", "fsdp2", "zero2"]
# Resumed: the engines whose checkpoints hold sharded optimizer state. DDP's is the plain torch
# optimizer state dict, whose resume the single-process tests of load_state_dict cover.
AUTO_RESUMED = ["fsdp2", "zero2"]


@pytest.fixture(scope="module")
def auto_reference(tiny_model_dir: str, work: Path) -> Path:
    return single_process_run(tiny_model_dir, work / "auto_reference", AUTO_OPTIM_ARGS)


@pytest.fixture(scope="module")
def auto_run(tiny_model_dir: str, work: Path):
    """auto_run(name, resumed=False): the output folder of that engine's inverse_scale="auto" launch,
    launched on first use (the resumed one starts from the uninterrupted one's checkpoint)."""
    done: dict[tuple[str, bool], Path] = {}

    def get(name: str, resumed: bool = False) -> Path:
        if (name, resumed) not in done:
            if resumed:
                checkpoint = get(name) / f"checkpoint-{AUTO_SAVE_AT}"
                out = work / f"auto_{name}_resumed"
                extra = ["--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint)]
            else:
                out = work / f"auto_{name}"
                extra = ["--save_strategy", "steps", "--save_steps", str(AUTO_SAVE_AT)]
            launch(name, tiny_model_dir, work, out, extra, optim_args=AUTO_OPTIM_ARGS)
            done[name, resumed] = out
        return done[name, resumed]

    return get


def scales_of(out: Path) -> list[dict[str, float]]:
    return [rep["inverse_scales"] for rep in read_reports(out)]


def max_param_difference(a: Path, b: Path) -> float:
    pa, pb = final_params(a), final_params(b)
    assert sorted(pa) == sorted(pb)
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def checkpoint_scales(checkpoint: Path) -> dict[str, list[float]]:
    """Every ``calibrated_scale`` in the optimizer files of a Trainer checkpoint, per file."""

    def walk(obj, found: list[float]) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "calibrated_scale" and isinstance(value, torch.Tensor):
                    found.append(float(value))
                else:
                    walk(value, found)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, found)

    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()
             and (p.name.startswith("optimizer") or p.name.endswith("optim_states.pt"))]
    assert files, f"no optimizer file in {checkpoint}: {sorted(p.name for p in checkpoint.rglob('*'))}"
    result = {}
    for path in files:
        found: list[float] = []
        walk(torch.load(path, map_location="cpu", weights_only=False), found)
        result[str(path.relative_to(checkpoint))] = found
    return result


def test_auto_reference_calibrates_every_tensor(auto_reference: Path, tiny_model_dir: str) -> None:
    rep = json.loads((auto_reference / "report" / "rank0.json").read_text())
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    # One scale per trained tensor (tied weights count once), each finite and > 0.
    assert 0 < len(rep["inverse_scales"]) <= len(init), rep["inverse_scales"]
    assert all(math.isfinite(s) and s > 0 for s in rep["inverse_scales"].values()), rep["inverse_scales"]
    logged = rep["logged"]
    check_inverse_share_logged(logged)
    # Calibrated, the inverse part is a sizeable share of the update while the blend is on.
    assert logged[0]["dualadam/inverse_share"] > 0.1, logged


def assert_moved_as_single_process(out: Path, reference: Path, tiny_model_dir: str) -> None:
    """Every tensor of ``out``'s final model where the single-process run put it, to within reduction-order
    noise relative to how far the tensor moved (each must have moved well beyond that noise)."""
    init, expected, got = (load_file(str(Path(tiny_model_dir) / "model.safetensors")), final_params(reference),
                           final_params(out))
    assert sorted(got) == sorted(expected)
    for k in expected:
        moved = (expected[k] - init[k]).abs().max().item()
        assert moved > 100 * MATCH_ATOL, (k, moved)
        torch.testing.assert_close(got[k], expected[k], atol=MATCH_ATOL + AUTO_MATCH_RTOL * moved, rtol=0,
                                   msg=lambda m, k=k, moved=moved: f"{k} (moved by {moved:.3g}): {m}")


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_auto_matches_single_process(name: str, auto_run, auto_reference: Path, tiny_model_dir: str) -> None:
    out = auto_run(name)
    ref_scales = json.loads((auto_reference / "report" / "rank0.json").read_text())["inverse_scales"]
    for scales in scales_of(out):
        # The same scale per tensor on every rank as in one process, named by parameter.
        assert scales.keys() == ref_scales.keys()
        assert scales == pytest.approx(ref_scales, rel=1e-4), (scales, ref_scales)
    assert_moved_as_single_process(out, auto_reference, tiny_model_dir)
    logged = read_reports(out)[0]["logged"]
    check_inverse_share_logged(logged)
    ref_logged = json.loads((auto_reference / "report" / "rank0.json").read_text())["logged"]
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in ref_logged], abs=1e-5)


def test_auto_under_zero2_calibrates_per_partition(auto_run, auto_reference: Path, tiny_model_dir: str) -> None:
    out = auto_run("zero2")
    reports = read_reports(out)
    for rep in reports:
        scales = list(rep["inverse_scales"].values())
        # One scale per flat partition: one per param group on each rank.
        assert len(scales) == len(rep["param_groups"]), rep["inverse_scales"]
        assert all(math.isfinite(s) and s > 0 for s in scales), rep["inverse_scales"]
        check_inverse_share_logged(rep["logged"])
    # The two ranks hold different halves of the flattened parameters, so their scales differ. (If
    # they ever agree, ZeRO calibration became global: docs/engines.md says otherwise.)
    assert list(reports[0]["inverse_scales"].values()) != pytest.approx(
        list(reports[1]["inverse_scales"].values()), rel=1e-3)
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    got = final_params(out)
    assert all(torch.isfinite(t).all() for t in got.values())
    moved = max((got[k] - init[k]).abs().max().item() for k in init)
    assert moved > 100 * MATCH_ATOL, moved
    ref = json.loads((auto_reference / "report" / "rank0.json").read_text())
    print(f"\nZeRO-2 inverse_scale=auto: max |param - one-process param| = "
          f"{max_param_difference(out, auto_reference):.3g} (training moved params by up to {moved:.3g}); "
          f"scales per rank {[rep['inverse_scales'] for rep in reports]}; one process: "
          f"{min(ref['inverse_scales'].values()):.4g}..{max(ref['inverse_scales'].values()):.4g} "
          f"over {len(ref['inverse_scales'])} tensors")


@pytest.mark.parametrize("name", AUTO_ENGINES)
def test_auto_scales_are_saved_in_the_checkpoint(name: str, auto_run) -> None:
    out = auto_run(name)
    saved = checkpoint_scales(out / f"checkpoint-{AUTO_SAVE_AT}")
    reports = read_reports(out)
    # A scale never changes once calibrated (at step 1 here): the checkpoint holds the final ones.
    if ENGINES[name].zero:
        # One optimizer file per rank, with that rank's partition scales.
        for rep in reports:
            (found,) = [v for f, v in saved.items() if f"zero_pp_rank_{rep['rank']}_" in f]
            assert found == pytest.approx(list(rep["inverse_scales"].values()), rel=1e-6), (saved, rep)
    else:
        # One file with every tensor's scale (FSDP2 saves the full optimizer state).
        (found,) = [v for v in saved.values() if v]
        assert sorted(found) == pytest.approx(sorted(reports[0]["inverse_scales"].values()), rel=1e-6), saved


@pytest.mark.parametrize("name", AUTO_RESUMED)
def test_auto_resume_matches_uninterrupted(name: str, auto_run) -> None:
    full, resumed = auto_run(name), auto_run(name, resumed=True)
    assert max_param_difference(resumed, full) <= RESUME_ATOL
    for a, b in zip(scales_of(full), scales_of(resumed)):
        assert a == pytest.approx(b, rel=1e-6)
    logged_full = read_reports(full)[0]["logged"]
    logged_resumed = read_reports(resumed)[0]["logged"]
    check_inverse_share_logged(logged_resumed)
    assert [h["loss"] for h in logged_resumed] == pytest.approx([h["loss"] for h in logged_full], abs=1e-5)


# -- inverse_scale="norm" ------------------------------------------------------------------------------

# The scale is set at every step from the norms of whole tensors: under FSDP2 the squared norms of the
# shards are summed over the mesh first, so the run must end where one process does.
NORM_OPTIM_ARGS = "blend_steps=4,inverse_scale=norm"


def test_norm_under_fsdp2_matches_single_process(tiny_model_dir: str, work: Path) -> None:
    ref = work / "norm_reference"
    cmd = [sys.executable, str(SCRIPT)] + script_args(tiny_model_dir, ref, PER_RANK_BATCH * WORLD, NORM_OPTIM_ARGS)
    run(cmd + ["--use_cpu", "--save_strategy", "no"], base_env(), work / "norm_reference.log")
    out = work / "norm_fsdp2"
    launch("fsdp2", tiny_model_dir, work, out, ["--save_strategy", "no"], optim_args=NORM_OPTIM_ARGS)
    assert_moved_as_single_process(out, ref, tiny_model_dir)
    shares = [h["dualadam/inverse_share"] for h in read_reports(out)[0]["logged"]]
    assert shares[0] > 0.5 and shares[-1] == 0.0, shares  # r = 0.75 at step 1 (on this rank's shard)
