"""``--optim dualadam_8bit`` (low-bit optimizer state) under DDP and FSDP2, for real: two CPU processes with gloo
through ``accelerate launch``, uninterrupted and resumed, against one process on the same global batch.

The same launcher as tests/multiprocess/test_engines.py (train_lm.py, the shipped CPU configs), on the tiny Llama
at hidden size 64, whose attention and MLP weights are large enough to be quantized. Each rank compiles the
low-bit step on its first steps (about a minute on 2 cores). Under FSDP2 each rank quantizes its own shard of a
tensor, and a checkpoint holds the moments dequantized (fp32, sharded like the parameters): the resumed run
quantizes them again to the codes the uninterrupted run had. The uninterrupted FSDP2 launch also measures the
optimizer state's bytes on each rank.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from .launcher import (
    ENGINES,
    FSDP_SHIM,
    HERE,
    MAX_STEPS,
    PER_RANK_BATCH,
    SAVE_AT,
    WORLD,
    base_env,
    final_params,
    free_port,
    launch,
    launch_config,
    read_reports,
    run,
    script_args,
    single_process_run,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.compile]

LOWBIT = ["--optim", "dualadam_8bit"]  # after script_args' --optim dualadam: the last one given wins
# Against one process: DDP sums float32 gradients in another order (differences ~1e-6), and a difference that
# moves a moment across a code boundary of the 8-bit map changes that element's step by up to a few percent:
# observed 1.7e-4 after 5 steps that move parameters by up to 3.5e-2 (fp32 moments: ~1e-6).
MATCH_ATOL = 1e-3
RESUME_ATOL = 1e-6  # the same computation replayed: bit-identical in practice
# FSDP2 against one process, per tensor, as ||FSDP2 - one process|| / ||one process - initial||: 8-bit rounding
# turns reduction-order noise into code flips, which every tensor then feels through the loss. Observed over 5
# steps: at most 0.53% for the MLP weights, quantized on each shard in the blocks one process has (fp32 moments
# in their place put them 1.5% away); 1.4% for q_proj and o_proj, whose 2048-element shards keep fp32 moments
# (as fp32 moments in one process do); 2.6% for the embedding, whose rarely seen rows step by about lr on
# gradients near eps, in a direction noise decides (also 2.9% between one-process 8-bit and fp32 runs).
QUANTIZED_ALIKE_RTOL = 0.01
FSDP2_RTOL = 0.05


@pytest.fixture(scope="module")
def llama64(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dualadam_hf.experiments.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden_size=64)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lowbit_engines")


@pytest.fixture(scope="module")
def reference(llama64: str, work: Path) -> Path:
    return single_process_run(llama64, work / "reference", extra=LOWBIT)


@pytest.fixture(scope="module")
def ddp(llama64: str, work: Path) -> dict[str, Path]:
    full, resumed = work / "ddp", work / "ddp_resumed"
    launch("ddp", llama64, work, full, LOWBIT + ["--save_strategy", "steps", "--save_steps", str(SAVE_AT)])
    checkpoint = full / f"checkpoint-{SAVE_AT}"
    launch("ddp", llama64, work, resumed, LOWBIT + ["--save_strategy", "no", "--resume_from_checkpoint",
                                                    str(checkpoint)])
    return {"full": full, "resumed": resumed, "checkpoint": checkpoint}


def test_ddp_trains_with_quantized_state_and_matches_one_process(ddp: dict[str, Path], reference: Path,
                                                                 llama64: str) -> None:
    for out in (ddp["full"], ddp["resumed"]):
        for rep in read_reports(out):
            assert rep["optimizer_chain"][-1] == "dualadam_hf.optimizer.DualAdam", rep["optimizer_chain"]
            assert "OptimState8bit" in rep["exp_avg_classes"], rep["exp_avg_classes"]
            assert rep["param_groups"][0]["state_bits"] == 8
            assert rep["steps"] == [float(MAX_STEPS)]
    ref, got = final_params(reference), final_params(ddp["full"])
    init = final_params(Path(llama64))
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 20 * MATCH_ATOL, f"training barely moved the parameters ({moved}); the comparison is vacuous"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=MATCH_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_ddp_resume_matches_uninterrupted(ddp: dict[str, Path]) -> None:
    from dualadam_hf.lowbit import state_types

    state_types()  # imports torchao, which registers its quantized classes as safe globals
    saved = torch.load(ddp["checkpoint"] / "optimizer.pt", weights_only=True)
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in saved["state"].values())
    assert_resumed_as_uninterrupted(ddp)


# What the uninterrupted FSDP2 launch runs instead of train_lm.py: train_lm.py itself, whose report also gets the
# bytes each rank's optimizer state takes (quantized moments: codes and block scales, and apart the code map each
# holds; fp32 moments: the local shard).
_STATE_BYTES_SCRIPT = """
import json, os, sys
sys.path.insert(0, {train_lm_dir!r})
import train_lm

written = train_lm.report

def report(trainer, args):
    # Imported after training, which only the startup hook connects to dualadam_hf (as in train_lm.py).
    from dualadam_hf.functional import local
    from dualadam_hf.lowbit import is_quantized

    written(trainer, args)
    state = train_lm.optimizer_chain(trainer.optimizer)[-1].state
    stateful = [(p, s) for p, s in state.items() if "exp_avg" in s]
    moments = [s[key] for _, s in stateful for key in ("exp_avg", "exp_avg_sq")]
    quantized = [t for t in moments if is_quantized(t)]
    sizes = {{"quantized_params": sum(local(p).numel() for p, s in stateful if is_quantized(s["exp_avg"])),
              "fp32_params": sum(local(p).numel() for p, s in stateful if not is_quantized(s["exp_avg"])),
              "quantized_bytes": sum(t.codes.nbytes + t.scale.nbytes for t in quantized),
              "fp32_bytes": sum(local(t).nbytes for t in moments if not is_quantized(t)),
              "qmap_bytes": sum(t.qmap.nbytes for t in quantized),
              "block_size": quantized[0].block_size}}
    path = os.path.join(args.report_dir, "state_bytes_rank" + os.environ.get("RANK", "0") + ".json")
    with open(path, "w") as f:
        json.dump(sizes, f)

train_lm.report = report
train_lm.main()
"""


def launch_measuring_state_bytes(model_dir: str, work: Path, out: Path, extra: list[str]) -> None:
    """An FSDP2 launch as test_engines.launch makes it, of train_lm.py reporting its state's bytes as well."""
    script = work / "train_lm_state_bytes.py"
    script.write_text(_STATE_BYTES_SCRIPT.format(train_lm_dir=str(HERE)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(launch_config(ENGINES["fsdp2"], work)), "--main_process_port", str(free_port()), str(FSDP_SHIM),
           str(script), *script_args(model_dir, out, PER_RANK_BATCH)]
    run(cmd + extra, base_env(), out.with_suffix(".log"))


@pytest.fixture(scope="module")
def fsdp2(llama64: str, work: Path) -> dict[str, Path]:
    full, resumed = work / "fsdp2", work / "fsdp2_resumed"
    launch_measuring_state_bytes(llama64, work, full, LOWBIT + ["--save_strategy", "steps", "--save_steps",
                                                                str(SAVE_AT)])
    checkpoint = full / f"checkpoint-{SAVE_AT}"
    launch("fsdp2", llama64, work, resumed, LOWBIT + ["--save_strategy", "no", "--resume_from_checkpoint",
                                                      str(checkpoint)])
    return {"full": full, "resumed": resumed, "checkpoint": checkpoint}


def quantized_alone(numel: int) -> bool:
    """Whether one process keeps 8-bit moments for a tensor of ``numel`` elements (lowbit's rule, blocks of 256)."""
    return numel >= 4096 and numel % 256 == 0


def shard_sizes(shape: torch.Size) -> list[int]:
    """The elements of each rank's FSDP2 shard: the first dimension split in WORLD chunks of ceil(rows / WORLD)."""
    rows, per_row = shape[0], math.prod(shape[1:])
    chunk = -(-rows // WORLD)
    return [max(0, min(chunk, rows - r * chunk)) * per_row for r in range(WORLD)]


def test_fsdp2_trains_with_quantized_shards_and_matches_one_process(fsdp2: dict[str, Path], reference: Path,
                                                                    llama64: str) -> None:
    for out in (fsdp2["full"], fsdp2["resumed"]):
        for rep in read_reports(out):
            assert rep["optimizer_chain"][-1] == "dualadam_hf.optimizer.DualAdam", rep["optimizer_chain"]
            assert rep["param_classes"] == ["DTensor"], rep["param_classes"]
            # Each rank's quantized shards, and the DTensor fp32 moments of the tensors whose shards are too small.
            assert rep["exp_avg_classes"] == ["DTensor", "OptimState8bit"], rep["exp_avg_classes"]
            assert rep["param_groups"][0]["state_bits"] == 8
            assert rep["steps"] == [float(MAX_STEPS)]
    init, ref, got = final_params(Path(llama64)), final_params(reference), final_params(fsdp2["full"])
    alike = {k for k, t in init.items()
             if quantized_alone(t.numel()) and all(map(quantized_alone, shard_sizes(t.shape)))}
    assert len(alike) == 6, alike  # the MLP weights of both layers
    for k in ref:
        moved = (ref[k] - init[k]).norm().item()
        assert moved > 0.01, (k, moved)
        off = (got[k] - ref[k]).norm().item() / moved
        assert off <= (QUANTIZED_ALIKE_RTOL if k in alike else FSDP2_RTOL), f"{k}: {off:.3g} of its movement"
    losses = [[h["loss"] for h in json.loads((out / "report" / "rank0.json").read_text())["logged"]]
              for out in (reference, fsdp2["full"])]
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)  # observed 1.8e-4


def test_fsdp2_resume_matches_uninterrupted(fsdp2: dict[str, Path]) -> None:
    # The checkpoint's optimizer state is plain fp32 tensors (torch.load needs no torchao class for it), and its
    # groups say that their quantized moments were saved so.
    saved = torch.load(fsdp2["checkpoint"] / "optimizer.bin", weights_only=True)
    moments = [s[key] for s in saved["state"].values() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in moments)
    assert all(g["lowbit_moments_saved_as_fp32"] is True for g in saved["param_groups"]), saved["param_groups"]
    assert_resumed_as_uninterrupted(fsdp2)


def test_fsdp2_state_bytes_per_rank_are_the_arithmetic(fsdp2: dict[str, Path]) -> None:
    """2 bytes per element of a rank's quantized shards (a code per moment) plus one fp32 scale per block and
    moment, 8 bytes per element of the shards that keep fp32 moments; and a 1 KB code map per quantized moment."""
    rows = []
    for r in range(WORLD):
        sizes = json.loads((fsdp2["full"] / "report" / f"state_bytes_rank{r}.json").read_text())
        quantized = sizes["quantized_params"]
        assert quantized > 0
        assert sizes["quantized_bytes"] == quantized * (2 + 2 * 4 / sizes["block_size"])
        assert sizes["fp32_bytes"] == 8 * sizes["fp32_params"]
        assert sizes["qmap_bytes"] % (256 * 4) == 0  # a 256-entry fp32 map per quantized moment
        total = sizes["quantized_bytes"] + sizes["fp32_bytes"] + sizes["qmap_bytes"]
        rows.append(f"rank {r}: {quantized} quantized + {sizes['fp32_params']} fp32 parameter elements: "
                    f"{sizes['quantized_bytes']} bytes of codes and scales "
                    f"({sizes['quantized_bytes'] / quantized:.4f} per quantized element) + {sizes['fp32_bytes']} fp32 "
                    f"+ {sizes['qmap_bytes']} of code maps = {total} bytes")
    print("\nFSDP2 dualadam_8bit optimizer state per rank:\n" + "\n".join(rows))


def assert_resumed_as_uninterrupted(runs: dict[str, Path]) -> None:
    """The resumed launch ends with the uninterrupted one's weights and losses, at the last step."""
    full, resumed = final_params(runs["full"]), final_params(runs["resumed"])
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=RESUME_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    losses = [[h["loss"] for h in read_reports(out)[0]["logged"]] for out in (runs["full"], runs["resumed"])]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert json.loads((runs["resumed"] / "report" / "rank0.json").read_text())["global_step"] == MAX_STEPS
