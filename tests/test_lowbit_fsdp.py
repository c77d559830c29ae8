"""Low-bit optimizer state (``state_bits``) on DTensor parameters (FSDP2), in one process.

Each rank quantizes the moments of its own shard; checkpoints hold them dequantized, as fp32 DTensors over the
parameters' shards, and a load quantizes them again to the same codes. One gloo process with a 1-device CPU mesh
runs the DTensor code paths (``fully_shard``, torch's distributed optimizer state dicts) without a launch; two
processes are tests/multiprocess/test_lowbit_engines.py. The per-tensor step runs uncompiled (``eager_step``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dualadam_hf import DualAdam, lowbit
from dualadam_hf.functional import local
from dualadam_hf.lowbit import SAVED_AS_FP32, dense, is_quantized, requantized

BLOCK = 256


@pytest.fixture
def eager_step(monkeypatch):
    """The low-bit step uncompiled: the same per-tensor functions, without tens of seconds of compiling."""
    monkeypatch.setattr(lowbit, "_compile_once", lambda fn: fn)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A 1-device CPU mesh over a 1-process gloo group (the module's own, ended after it)."""
    from torch.distributed.device_mesh import init_device_mesh

    lowbit.state_types()
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def moment_values(bits: int, signed: bool, rows: int = 64, seed: int = 0) -> torch.Tensor:
    """Moments of widely ranging block scales, with blocks whose largest magnitude is negative (signed) and
    blocks of zeros."""
    torch.manual_seed(seed)
    values = torch.randn(rows, BLOCK) * torch.exp(torch.empty(rows, 1).uniform_(-30, 30))
    values[1] = 0.0
    values[2, 5] = -1e3  # the largest magnitude of its block, negative
    return values if signed else values.abs()


def quantized_moment(values: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    moment = lowbit._new_moment(values, {"state_bits": bits}, signed, torch.float32)
    moment.copy_(values)  # torchao's quantization, as the step's
    return moment


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_requantizing_dequantized_moments_gives_back_their_codes_and_scales(bits, signed):
    """The resume is exact only if quantize(dequantize(q)) == q: codes, block scales and map, bit for bit, on
    both maps of both widths (8-bit exp_avg_sq on the squared map)."""
    q = quantized_moment(moment_values(bits, signed), bits, signed)
    again = requantized(q.dequantize(), torch.zeros(q.shape), {"state_bits": bits}, signed)
    assert type(again) is type(q) and again.signed == q.signed and again.block_size == q.block_size
    for part in ("codes", "scale", "qmap"):
        assert torch.equal(getattr(again, part), getattr(q, part)), part
    assert torch.equal(again.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_alone_would_rescale_blocks_whose_largest_moment_is_negative(bits):
    """Why requantized() reads the scales back: the signed maps reach +1 but not -1, so quantizing the
    dequantized values afresh scales such a block anew and moves its codes."""
    q = quantized_moment(moment_values(bits, True), bits, True)
    fresh = quantized_moment(q.dequantize(), bits, True)
    assert not torch.equal(fresh.scale, q.scale) and not torch.equal(fresh.dequantize(), q.dequantize())


def test_values_of_another_block_layout_are_quantized_as_a_step_would():
    values = moment_values(8, True)
    q = quantized_moment(values, 8, True)
    again = requantized(values, torch.zeros(q.shape), {"state_bits": 8}, True)  # not a dequantized state
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scale, q.scale)


def sharded_model(mesh, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    # 8192-element weights: quantized; biases: fp32 moments.
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    fully_shard(model, mesh=mesh)
    return model


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        torch.manual_seed(100 + k)
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


OPTIONS = dict(lr=1e-2, weight_decay=0.1, blend_steps=4)


def test_dtensor_parameters_keep_quantized_moments_of_their_local_shards(eager_step, mesh):
    model = sharded_model(mesh)
    optimizer = DualAdam(model.parameters(), state_bits=8, **OPTIONS)
    train(model, optimizer, range(2))
    kinds = {}
    for p in model.parameters():
        m = optimizer.state[p]["exp_avg"]
        kinds[tuple(p.shape)] = type(m).__name__
        if is_quantized(m):
            assert m.shape == local(p).shape and m.block_size == BLOCK  # the shard's, not a DTensor
        else:
            assert m.placements == p.placements and m.dtype == torch.float32
    assert kinds == {(128, 64): "OptimState8bit", (128,): "DTensor", (64, 128): "OptimState8bit", (64,): "DTensor"}
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == [2.0] * 4


@pytest.mark.parametrize("scale", [1.0, "norm", "auto"])
def test_a_dtensor_on_one_device_steps_as_the_plain_tensor(eager_step, mesh, scale):
    """One shard covering the whole tensor: the same blocks, so the same run to the bit, with the norms of
    inverse_scale "norm" and "auto" summed over the mesh."""
    sharded, plain = sharded_model(mesh), torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                                              torch.nn.Linear(128, 64))
    plain.load_state_dict({k: v.full_tensor() for k, v in sharded.state_dict().items()})
    optimizers = [DualAdam(m.parameters(), state_bits=8, inverse_scale=scale, **OPTIONS) for m in (sharded, plain)]
    for model, optimizer in zip((sharded, plain), optimizers):
        train(model, optimizer, range(5))
    for a, b in zip(sharded.parameters(), plain.parameters()):
        assert torch.equal(local(a), b)
    # The share reads the fp32 moments of the biases back where the plain run kept the norms of its step: fp32
    # rounding of eps*c apart.
    assert optimizers[0].inverse_share() == pytest.approx(optimizers[1].inverse_share(), rel=1e-6)


def checkpoint_and_resume(mesh, tmp_path, bits: int, full: bool):
    """Train 3 steps, save the optimizer through torch's distributed state dict (a whole fp32 state through
    torch.save and torch.load(weights_only=True), or DCP's sharded files), load it into a fresh model and
    optimizer: (trained model, its optimizer, resumed model, its optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full)
    model = sharded_model(mesh)
    optimizer = DualAdam(model.parameters(), state_bits=bits, **OPTIONS)
    train(model, optimizer, range(3))
    saved = get_optimizer_state_dict(model, optimizer, options=options)
    if full:
        torch.save(saved, tmp_path / "optimizer.bin")
    else:
        dcp.save({"optimizer": saved}, checkpoint_id=str(tmp_path / "optimizer"))
    resumed = sharded_model(mesh, seed=1)
    resumed.load_state_dict(model.state_dict())
    fresh = DualAdam(resumed.parameters(), state_bits=bits, **OPTIONS)
    if full:
        loaded = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    else:  # as accelerate loads a sharded checkpoint: into the optimizer's own state dict
        loaded = {"optimizer": get_optimizer_state_dict(resumed, fresh, options=options)}
        dcp.load(loaded, checkpoint_id=str(tmp_path / "optimizer"))
        loaded = loaded["optimizer"]
    set_optimizer_state_dict(resumed, fresh, loaded, options=options)
    return model, optimizer, resumed, fresh, saved


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("full", [True, False], ids=["full_state_dict", "sharded_state_dict"])
def test_a_run_resumed_from_a_distributed_checkpoint_equals_the_uninterrupted_one(eager_step, mesh, tmp_path,
                                                                                 bits, full):
    model, optimizer, resumed, fresh, saved = checkpoint_and_resume(mesh, tmp_path, bits, full)
    moments = [s[key] for s in saved["state"].values() for key in ("exp_avg", "exp_avg_sq")]
    # The checkpoint holds fp32 moments (whole tensors, or DTensor shards), its groups say why.
    assert all(not is_quantized(local(t)) and t.dtype == torch.float32 for t in moments)
    assert saved["param_groups"][0][SAVED_AS_FP32] is True
    for p, q in zip(model.parameters(), resumed.parameters()):
        was, now = optimizer.state[p], fresh.state[q]
        assert float(now["step"]) == float(was["step"]) == 3.0  # not the zero-gradient step torch runs first
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(now[key]) is type(was[key])
            assert torch.equal(local(dense(now[key])), local(dense(was[key]))), key
            if is_quantized(was[key]):
                assert torch.equal(now[key].codes, was[key].codes) and torch.equal(now[key].scale, was[key].scale)
    assert SAVED_AS_FP32 not in fresh.param_groups[0]  # a mark of saved states only
    train(model, optimizer, range(3, 6))
    train(resumed, fresh, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(local(a), local(b))


def test_torch_first_step_on_an_empty_state_leaves_the_parameters(eager_step, mesh):
    """torch's distributed load first steps a fresh optimizer with zero gradients at lr 0 to create its state:
    the parameters stay, the moments are zero, and the load then replaces that state whole (above)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = sharded_model(mesh)
    before = [local(p).clone() for p in model.parameters()]
    optimizer = DualAdam(model.parameters(), state_bits=8, inverse_scale="auto", **OPTIONS)
    _init_optim_state(optimizer)
    assert optimizer.param_groups[0]["lr"] == OPTIONS["lr"]
    for p, b in zip(model.parameters(), before):
        state = optimizer.state[p]
        assert torch.equal(local(p), b) and p.grad is None
        assert float(state["step"]) == 1.0 and float(state["calibrated_scale"]) == 0.0  # not calibrated on zeros
        assert not local(dense(state["exp_avg"])).any() and not local(dense(state["exp_avg_sq"])).any()


def saved_state(bits: int | None, mesh=None):
    """(parameters, a state dict after two steps) of a DualAdam over one quantizable tensor and one small one."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(100))]
    optimizer = DualAdam(params, state_bits=bits, **OPTIONS)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return params, optimizer.state_dict()


def dequantized(state_dict: dict, mark: bool) -> dict:
    """``state_dict`` with its quantized moments dequantized, as a whole-tensor FSDP2 checkpoint holds them."""
    state = {pid: {k: dense(v) if k in ("exp_avg", "exp_avg_sq") else v for k, v in one.items()}
             for pid, one in state_dict["state"].items()}
    groups = [{**g, SAVED_AS_FP32: True} if mark else dict(g) for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def test_fp32_moments_load_as_quantized_ones_only_where_the_group_says_it_saved_them_so(eager_step):
    params, saved = saved_state(8)
    with pytest.raises(ValueError, match="exp_avg: it holds full-precision moments where this optimizer keeps "
                                         "8-bit moments"):
        DualAdam(params, state_bits=8, **OPTIONS).load_state_dict(dequantized(saved, mark=False))
    # Marked, as under FSDP2: loaded (here into plain tensors, an FSDP2 checkpoint read by one process) and
    # quantized to the codes they were saved from.
    optimizer = DualAdam(params, state_bits=8, **OPTIONS)
    optimizer.load_state_dict(dequantized(saved, mark=True))
    moment = optimizer.state[params[0]]["exp_avg"]
    assert is_quantized(moment) and torch.equal(moment.codes, saved["state"][0]["exp_avg"].codes)
    assert not is_quantized(optimizer.state[params[1]]["exp_avg"])


def test_foreign_fp32_state_is_still_refused(eager_step):
    params, fp32 = saved_state(None)
    # DualAdam's fp32 state, marked or not: another kind of state than an 8-bit optimizer keeps.
    for state_dict in (fp32, dequantized(fp32, mark=True)):
        with pytest.raises(ValueError, match=r"state_bits None saved, 8 here \(a change of state kind is not "
                                             "converted"):
            DualAdam(params, state_bits=8, **OPTIONS).load_state_dict(state_dict)
    # Marked 8-bit state saved for other shapes, or damaged: refused as ever.
    _, saved = saved_state(8)
    wrong = dequantized(saved, mark=True)
    wrong["state"][0]["exp_avg"] = wrong["state"][0]["exp_avg"][:32]
    with pytest.raises(ValueError, match=r"exp_avg has shape \(32, 128\), its parameter \(64, 128\)"):
        DualAdam(params, state_bits=8, **OPTIONS).load_state_dict(wrong)
    damaged = dequantized(saved, mark=True)
    damaged["state"][0]["exp_avg_sq"][0, 0] = -1.0
    with pytest.raises(ValueError, match="exp_avg_sq holds negative values"):
        DualAdam(params, state_bits=8, **OPTIONS).load_state_dict(damaged)


def test_a_mesh_of_more_than_one_dimension_is_refused(mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    square = init_device_mesh("cpu", (1, 1))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 128), square, [Shard(0), Shard(1)]))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="state_bits=8 supports DTensor parameters on a 1-D device mesh .* not on "
                                         "a 2-D one"):
        DualAdam([p], state_bits=8).step()
