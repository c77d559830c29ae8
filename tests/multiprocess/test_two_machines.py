"""DualAdam across two "machines": the multi-machine launch docs/engines.md shows, run on one host.

Two ``accelerate launch`` commands, as on two machines, with ``--num_machines 2 --machine_rank 0/1``, the
main process at 127.0.0.1 and one process each (gloo), under DDP and DeepSpeed ZeRO-2 with the shipped CPU
configs. Each run is compared with one process on the same global batch: the logged losses within 1e-5 and
the final parameters as in tests/multiprocess/test_engines.py; a run resumed from its step-3 checkpoint (two
launches again) must end where the uninterrupted one does. Four launches of two commands each, plus one
single-process reference: 9.8 minutes on 2 cores shared with other work, DeepSpeed's first op build included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import end_group, start_in_own_group
from tests.multiprocess.launcher import (
    ENGINES,
    LAUNCH_TIMEOUT_S,
    MATCH_ATOL,
    MAX_STEPS,
    PER_RANK_BATCH,
    REPO,
    RESUME_ATOL,
    SAVE_AT,
    SCRIPT,
    WORLD,
    base_env,
    final_params,
    free_port,
    launch_config,
    read_reports,
    script_args,
    single_process_run,
)

pytestmark = pytest.mark.multiprocess

MACHINES = 2  # one process on each: WORLD processes in all
LOSS_ATOL = 1e-5


def launch_on_two_machines(name: str, model_dir: str, work: Path, out: Path, extra: list[str]) -> None:
    """Both machines' commands at once, as an operator starts them: the same command but for the rank."""
    engine = ENGINES[name]
    config, port = launch_config(engine, work), free_port()
    logs, procs = [], []
    for rank in range(MACHINES):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_machines", str(MACHINES), "--num_processes", str(WORLD), "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(SCRIPT)]
        cmd += script_args(model_dir, out, PER_RANK_BATCH) + engine.script_flags + extra
        log = out.parent / f"{out.name}.machine{rank}.log"
        logs.append(log)
        with log.open("w") as out_file:  # the child holds its own copy
            procs.append(start_in_own_group(cmd, cwd=REPO, env=base_env(), stdout=out_file,
                                            stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=LAUNCH_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:  # each launcher with its ranks, also after a timeout or a Ctrl-C
            end_group(proc)
    if any(codes):
        tails = "\n".join(f"--- machine {r} (exit {c}):\n{log.read_text()[-3000:]}"
                          for r, (c, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"a two-machine {name} launch failed:\n{tails}")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("two_machines")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, work: Path) -> Path:
    return single_process_run(tiny_model_dir, work / "reference")


@pytest.fixture(scope="module", params=["ddp", "zero2"])
def runs(request: pytest.FixtureRequest, tiny_model_dir: str, work: Path) -> dict:
    name = request.param
    full, resumed = work / name, work / f"{name}_resumed"
    launch_on_two_machines(name, tiny_model_dir, work, full, ["--save_strategy", "steps", "--save_steps",
                                                               str(SAVE_AT)])
    checkpoint = full / f"checkpoint-{SAVE_AT}"
    assert checkpoint.is_dir(), f"no checkpoint at step {SAVE_AT} in {full}"
    launch_on_two_machines(name, tiny_model_dir, work, resumed,
                           ["--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint)])
    return {"name": name, "full": full, "resumed": resumed}


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in read_reports(out)[0]["logged"]]


def test_two_machines_train_as_one_process(runs: dict, reference: Path, tiny_model_dir: str) -> None:
    for rep in read_reports(runs["full"]):
        assert rep["world_size"] == WORLD and rep["global_step"] == MAX_STEPS
        assert rep["optimizer_chain"][-1] == "dualadam_hf.optimizer.DualAdam", rep["optimizer_chain"]
        assert rep["steps"] == [float(MAX_STEPS)], rep["steps"]
    assert {rep["rank"] for rep in read_reports(runs["full"])} == set(range(WORLD))
    ref_losses = json.loads((reference / "report" / "rank0.json").read_text())
    ref_losses = [h["loss"] for h in ref_losses["logged"]]
    assert len(ref_losses) == MAX_STEPS
    assert losses(runs["full"]) == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    ref, got = final_params(reference), final_params(runs["full"])
    init = final_params(Path(tiny_model_dir))
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 100 * MATCH_ATOL  # training moved them
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=MATCH_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_two_machines_resume_where_they_stopped(runs: dict, reference: Path) -> None:
    ref_losses = [h["loss"] for h in json.loads((reference / "report" / "rank0.json").read_text())["logged"]]
    resumed = losses(runs["resumed"])
    # The resumed launch's history holds the checkpoint's steps and the ones it trained.
    assert resumed == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    assert resumed == pytest.approx(losses(runs["full"]), abs=LOSS_ATOL, rel=0)
    full, again = final_params(runs["full"]), final_params(runs["resumed"])
    for k in full:
        torch.testing.assert_close(again[k], full[k], atol=RESUME_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
