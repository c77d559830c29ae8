"""``--optim dualadam_8bit`` (low-bit optimizer state) under DDP, for real: two CPU processes with gloo through
``accelerate launch``, uninterrupted and resumed, against one process on the same global batch.

The same launcher as tests/multiprocess/test_engines.py (train_lm.py, the shipped CPU configs), on the tiny Llama
at hidden size 64, whose attention and MLP weights are large enough to be quantized. Each rank compiles the
low-bit step on its first steps (about a minute on 2 cores). FSDP2 is refused before the model loads, with its
reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .test_engines import (
    MAX_STEPS,
    SAVE_AT,
    final_params,
    launch,
    read_reports,
    single_process_run,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.compile]

LOWBIT = ["--optim", "dualadam_8bit"]  # after script_args' --optim dualadam: the last one given wins
# Against one process: DDP sums float32 gradients in another order (differences ~1e-6), and a difference that
# moves a moment across a code boundary of the 8-bit map changes that element's step by up to a few percent:
# observed 1.7e-4 after 5 steps that move parameters by up to 3.5e-2 (fp32 moments: ~1e-6).
MATCH_ATOL = 1e-3
RESUME_ATOL = 1e-6  # the same computation replayed: bit-identical in practice


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
    full, resumed = final_params(ddp["full"]), final_params(ddp["resumed"])
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=RESUME_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    losses = [[h["loss"] for h in read_reports(out)[0]["logged"]] for out in (ddp["full"], ddp["resumed"])]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert json.loads((ddp["resumed"] / "report" / "rank0.json").read_text())["global_step"] == MAX_STEPS


def test_fsdp2_is_refused_with_the_reason(llama64: str, work: Path) -> None:
    out = work / "fsdp2"
    code = launch("fsdp2", llama64, work, out, LOWBIT + ["--save_strategy", "no"], check=False)
    log = out.with_suffix(".log").read_text()
    assert code != 0, log[-3000:]
    # Refused where the arguments are built (accelerate's FSDP environment is set before the script starts),
    # before the model loads.
    assert "--optim dualadam_8bit keeps 8-bit optimizer state, which does not run under FSDP" in log, log[-3000:]
    assert "Loading weights" not in log and not (out / "model.safetensors").exists(), log[-3000:]
