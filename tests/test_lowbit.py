"""Low-bit optimizer state (``state_bits=8``/``4``, ``--optim dualadam_8bit``/``dualadam_4bit``) on torchao's
quantized tensors.

The update is checked against the float64 reference fed the dequantized moments of the step before: the
update itself is then exact up to fp32 rounding, and only the new moments carry quantization error. Most
tests run the per-tensor step uncompiled (``eager_step``; the same function the compiled step wraps); the
ones marked ``compile`` run it compiled, through the optimizer and through the Trainer.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dualadam_hf import DualAdam, InvAdam, lowbit, optimizer_cls_and_kwargs
from dualadam_hf.lowbit import dense, is_quantized

from .reference import ReferenceDualAdam

BIG = (64, 128)  # 8192 elements: quantized with either block size (one compiled graph per shape and kind)
MOMENT_ERROR = {8: 0.02, 4: 0.25}  # largest error of a quantized moment, relative to its largest element


@pytest.fixture
def eager_step(monkeypatch):
    """The low-bit step uncompiled: the same per-tensor functions, without tens of seconds of compiling."""
    monkeypatch.setattr(lowbit, "_compile_once", lambda fn: fn)


def make_params(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(*BIG, requires_grad=True), torch.randn(100, requires_grad=True)]


def run_against_reference(bits, steps=5, blend_steps=3, **options):
    """Step DualAdam(state_bits=bits) and, from the same p, m, v (dequantized), the float64 reference; return
    the worst relative error of the updates and of the new moments, per tensor."""
    params = make_params()
    opt = DualAdam(params, lr=1e-2, weight_decay=0.1, blend_steps=blend_steps, state_bits=bits, **options)
    ref = ReferenceDualAdam(params, lrs=[1e-2] * 2, weight_decays=[0.1] * 2, switch_rate=1 / blend_steps,
                            maximize=options.get("maximize", False), inverse_scale=options.get("inverse_scale", 1.0))
    update_error, moment_error, blends = [0.0, 0.0], [0.0, 0.0], []
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        if opt.state:
            ref.p = [p.detach().double() for p in params]
            ref.m = [dense(opt.state[p]["exp_avg"]).double() for p in params]
            ref.v = [dense(opt.state[p]["exp_avg_sq"]).double() for p in params]
        before = [p.detach().double().clone() for p in params]
        opt.step()
        ref.step(grads)
        blends.append(opt.blend_weight())
        for k, p in enumerate(params):
            expected = ref.p[k] - before[k]
            got = p.detach().double() - before[k]
            update_error[k] = max(update_error[k], float((got - expected).abs().max() / expected.abs().max()))
            for key, want in (("exp_avg", ref.m[k]), ("exp_avg_sq", ref.v[k])):
                held = dense(opt.state[p][key]).double()
                moment_error[k] = max(moment_error[k], float((held - want).abs().max() / want.abs().max()))
    assert is_quantized(opt.state[params[0]]["exp_avg"]) and is_quantized(opt.state[params[0]]["exp_avg_sq"])
    assert not is_quantized(opt.state[params[1]]["exp_avg"])  # 100 elements: too small to quantize
    assert blends[0] > 0 and blends[-1] == 0  # steps on both sides of the blend's end
    assert [float(opt.state[p]["step"]) for p in params] == [steps, steps]
    return update_error, moment_error


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("options", [{}, {"maximize": True}, {"inverse_scale": "norm"}, {"inverse_scale": 0.0},
                                     {"inverse_scale": 2.5}, {"inverse_scale": "auto"}])
def test_update_matches_the_reference_fed_the_dequantized_moments(eager_step, bits, options):
    update_error, moment_error = run_against_reference(bits, **options)
    assert max(update_error) < 1e-4  # fp32 rounding of p (|p| ~ 1) against an update of ~1e-2
    assert moment_error[0] < MOMENT_ERROR[bits]  # quantized
    assert moment_error[1] < 1e-6  # fp32


@pytest.mark.compile
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_update_matches_the_reference(bits):
    update_error, moment_error = run_against_reference(bits, steps=4)
    assert max(update_error) < 1e-4 and moment_error[0] < MOMENT_ERROR[bits] and moment_error[1] < 1e-6


def stepped_once(make, grad=torch.randn_like):
    """The parameters of make_params() and an optimizer made by ``make`` over them, after one step."""
    params = make_params()
    opt = make(params)
    for p in params:
        p.grad = grad(p)
    opt.step()
    return params, opt


def test_invadam_takes_state_bits(eager_step):
    params, opt = stepped_once(lambda ps: InvAdam(ps, lr=1e-3, state_bits=8), torch.ones_like)
    assert is_quantized(opt.state[params[0]]["exp_avg"]) and opt.blend_weight() == 1.0


def test_tensors_too_small_or_not_whole_blocks_keep_fp32_moments(eager_step):
    torch.manual_seed(0)
    params = [torch.randn(4095), torch.randn(4096 + 128), torch.randn(64, 64).bfloat16(), torch.randn(64, 64)]
    opt = DualAdam([p.requires_grad_() for p in params], lr=1e-2, state_bits=8)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    moments = [opt.state[p]["exp_avg_sq"] for p in params]
    # Under 4096 elements, or not a whole number of 256-element blocks: fp32, as torchao keeps them (and fp32
    # for a bf16 parameter, as without state_bits); 4096 in whole blocks: quantized, also for bf16.
    assert [is_quantized(m) for m in moments] == [False, False, True, True]
    assert [m.dtype for m in moments[:2]] == [torch.float32, torch.float32]
    assert moments[2].dequantize().dtype == torch.float32
    assert params[2].dtype == torch.bfloat16 and torch.isfinite(params[2]).all()


def test_the_4_bit_block_rule_quantizes_whole_blocks_of_at_least_4096_elements(eager_step):
    # 4-bit codes come in pairs, so the rule is the same as 8-bit's at the same block size: at least MIN_QUANTIZED
    # elements in whole blocks; both sides of each bound.
    torch.manual_seed(0)
    params = [torch.randn(4096 - 256), torch.randn(4096), torch.randn(4096 + 128), torch.randn(4096 + 256)]
    for block, wanted in ((256, [False, True, False, True]), (128, [False, True, True, True])):
        opt = DualAdam([p.requires_grad_() for p in params], lr=1e-2, state_bits=4, block_size=block)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        moments = [opt.state[p]["exp_avg"] for p in params]
        assert [is_quantized(m) for m in moments] == wanted, block
        assert all(m.block_size == block and m.codes.numel() == m.numel() // 2 for m in moments if is_quantized(m))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state, quantized ones counted by their codes, scales and maps."""
    def storage(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            return sum(storage(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(storage(t) for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))


@pytest.mark.compile
def test_state_bytes_per_parameter_match_torchaos_adamw(eager_step):
    from torchao.optim import AdamW4bit, AdamW8bit

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(128, 64)  # a quantized weight and an fp32 bias: few shapes for torchao to compile

    def stepped(make):
        net = model()
        opt = make(net.parameters())
        net(torch.randn(4, 128)).sum().backward()
        opt.step()
        return opt, sum(p.numel() for p in net.parameters())

    # transformers' adamw_torch_8bit / adamw_torch_4bit: torchao's classes with blocks of 256 for both.
    for bits, adamw in ((8, AdamW8bit), (4, AdamW4bit)):
        ours, n = stepped(lambda params, bits=bits: DualAdam(params, lr=1e-3, state_bits=bits))
        theirs, _ = stepped(lambda params, adamw=adamw: adamw(params, lr=1e-3, block_size=256))
        ratio = state_bytes(ours) / state_bytes(theirs)
        assert 1 / 1.01 <= ratio <= 1.01, (bits, state_bytes(ours) / n, state_bytes(theirs) / n)
        assert state_bytes(ours) / n < {8: 2.5, 4: 1.5}[bits]  # against 8 bytes per parameter in fp32


def test_save_and_load_keep_the_moments_quantized(eager_step, tmp_path):
    params = make_params()
    opt = DualAdam(params, lr=1e-2, blend_steps=3, state_bits=4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)  # torchao's classes are safe globals
    fresh = DualAdam(params, lr=1e-2, blend_steps=3, state_bits=4)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        before, after = opt.state[params[0]][key], fresh.state[params[0]][key]
        assert type(after) is type(before) and torch.equal(after.codes, before.codes)
        assert torch.equal(after.scale, before.scale)
    for p in params:
        p.grad = torch.randn_like(p)
    twin = [p.detach().clone() for p in params]
    opt.step()
    after_first = [p.detach().clone() for p in params]
    for p, t in zip(params, twin):
        p.data.copy_(t)
    fresh.step()
    assert all(torch.equal(a, p) for a, p in zip(after_first, params))


def test_a_bf16_parameters_quantized_moments_survive_torchs_cast_at_load(eager_step):
    param = torch.randn(*BIG).bfloat16().requires_grad_()
    opt = DualAdam([param], lr=1e-2, state_bits=8)
    param.grad = torch.randn_like(param)
    opt.step()
    fresh = DualAdam([param], lr=1e-2, state_bits=8)
    fresh.load_state_dict(opt.state_dict())
    moment = fresh.state[param]["exp_avg"]
    # Left as torch loaded it: the parameter's appearance dtype, as the optimizer created it, and the same codes.
    assert is_quantized(moment) and moment.dtype == opt.state[param]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(moment.codes, opt.state[param]["exp_avg"].codes)


def test_a_damaged_quantized_state_is_refused(eager_step):
    params, opt = stepped_once(lambda ps: DualAdam(ps, lr=1e-2, state_bits=8))
    state = opt.state_dict()
    state["state"][0]["exp_avg"].scale[0] = float("nan")
    with pytest.raises(ValueError, match="the state of parameter 0 is damaged .exp_avg holds non-finite values"):
        DualAdam(params, lr=1e-2, state_bits=8).load_state_dict(state)


@pytest.mark.parametrize("bits, message", [
    (16, r"Invalid state_bits: 16 \(must be None, 8 or 4\)"),
    (True, r"Invalid state_bits: True"),
    ("8", r"Invalid state_bits: '8'"),
])
def test_bad_state_bits_are_refused(bits, message):
    with pytest.raises(ValueError, match=message):
        DualAdam([torch.zeros(1)], state_bits=bits)


@pytest.mark.parametrize("options, message", [
    ({"state_dtype": "bf16"}, r"state_bits=8 quantizes the moments; it cannot be combined with state_dtype='bfloat16'"),
    ({"fused": True}, r"state_bits=8 takes its own compiled step; it cannot be combined with fused=True"),
])
def test_settings_that_contradict_state_bits_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DualAdam([torch.zeros(1)], state_bits=8, **options)
    opt = DualAdam([torch.zeros(1)])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.zeros(2)], "state_bits": 8, **options})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_stochastic_rounding_keeps_updates_round_to_nearest_loses(eager_step, bits):
    """bf16 weights at 1.0 and steps of 1e-4 (plain Adam on a constant gradient: |u| = 1, lr 1e-4), far below
    half a bf16 spacing there (2**-9): rounded to nearest they never move; stochastically rounded they move by the
    fp32 total on average."""
    moved = {}
    for stochastic in (False, True):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.ones(*BIG, dtype=torch.bfloat16))
        opt = DualAdam([param], lr=1e-4, switch_rate=1.0, state_bits=bits, bf16_stochastic_round=stochastic)
        assert not opt.state[param]  # created at the first step
        for _ in range(200):
            param.grad = torch.ones_like(param)
            opt.step()
        assert lowbit.is_quantized(opt.state[param]["exp_avg"])
        moved[stochastic] = 1.0 - param.float().mean().item()
    assert moved[False] == 0.0
    assert moved[True] == pytest.approx(200 * 1e-4, abs=1e-3)


def test_complex_parameters_are_refused_with_state_bits():
    param = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    opt = DualAdam([param], state_bits=8)
    param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        opt.step()


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(lowbit, "_state_types", None)
    for module in ("torchao", "torchao.optim", "torchao.optim.subclass_8bit", "torchao.optim.subclass_4bit"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails as if it were not installed
    with pytest.raises(ImportError, match=r'state_bits needs torchao >= 0.18 .*: pip install torchao \(or pip install '
                                          r'"\.\[lowbit\]" in a dualadam-hf checkout\)'):
        DualAdam([torch.zeros(1)], state_bits=8)
    opt = DualAdam([torch.zeros(1)])  # without state_bits torchao is not needed
    with pytest.raises(ImportError, match=r"pip install torchao"):
        opt.add_param_group({"params": [torch.zeros(2)], "state_bits": 4})
    assert len(opt.param_groups) == 1  # the refused group is not left behind


def test_importing_torchao_prints_nothing():
    import subprocess

    code = "import torch\nfrom dualadam_hf import DualAdam\nDualAdam([torch.zeros(1)], state_bits=8)\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "ok\n" and done.stderr == "", done.stderr[-2000:]


class Args:
    """The TrainingArguments fields optimizer_cls_and_kwargs reads."""

    def __init__(self, optim, optim_args=None):
        self.optim, self.optim_args = optim, optim_args
        self.learning_rate, self.adam_beta1, self.adam_beta2, self.adam_epsilon, self.weight_decay = (
            1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_optim_names_set_state_bits():
    assert optimizer_cls_and_kwargs(Args("dualadam_8bit", "blend_steps=5"))[1]["state_bits"] == 8
    cls, kwargs = optimizer_cls_and_kwargs(Args("dualadam_4bit", "inverse_scale=norm"))
    assert cls is DualAdam and kwargs["state_bits"] == 4 and kwargs["inverse_scale"] == "norm"
    assert "state_bits" not in optimizer_cls_and_kwargs(Args("dualadam"))[1]
    # The explicit path, with a name transformers knows: state_bits as an override.
    assert optimizer_cls_and_kwargs(Args("adamw_torch"), state_bits=8)[1]["state_bits"] == 8
    with pytest.raises(ValueError, match="Unknown --optim_args key 'state_bits' for --optim dualadam_8bit"):
        optimizer_cls_and_kwargs(Args("dualadam_8bit", "state_bits=4"))


def test_training_arguments_take_the_names_and_check_them(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim="dualadam_8bit", optim_args="blend_steps=4",
                             report_to="none", use_cpu=True)
    assert str(getattr(args.optim, "value", args.optim)) == "dualadam_8bit"
    with pytest.raises(ValueError, match="--optim dualadam_4bit: state_bits=4 .* cannot be combined with state_dtype"):
        TrainingArguments(output_dir=str(tmp_path), optim="dualadam_4bit", optim_args="state_dtype=bf16",
                          report_to="none", use_cpu=True)


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    """The tiny Llama at hidden size 64: its attention and MLP weights (4096 and 8192 elements) are
    quantized (at hidden size 32 every tensor of it is under 4096 elements or not whole blocks)."""
    from dualadam_hf.experiments.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden_size=64)


@pytest.mark.compile
def test_trainer_optim_dualadam_8bit_resumes_bit_identical(llama64_dir, tmp_path):
    from dualadam_hf.integrations.unwrap import find_dualadam

    from .helpers import make_args, make_trainer, training_logs

    settings = dict(optim="dualadam_8bit", max_steps=6, save_strategy="steps", save_steps=3,
                    optim_args="blend_steps=4")
    full = make_trainer(llama64_dir, make_args(tmp_path / "full", **settings))
    full.train()
    optimizer = find_dualadam(full.optimizer)
    assert optimizer.param_groups[0]["state_bits"] == 8
    assert any(is_quantized(s["exp_avg"]) for s in optimizer.state.values())
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert any(is_quantized(s["exp_avg"]) for s in saved["state"].values())

    resumed = make_trainer(llama64_dir, make_args(tmp_path / "resumed", **settings))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [e["loss"] for e in training_logs(resumed)] == [e["loss"] for e in training_logs(full)]
    assert find_dualadam(resumed.optimizer).current_step() == 6


def test_trainer_lora_with_dualadam_4bit(eager_step, llama64_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dualadam_hf.integrations.unwrap import find_dualadam

    from .helpers import lora_trainer, make_args, training_logs

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(llama64_dir)
    # r=64: each adapter matrix holds 64*64 = 4096 elements, so the adapters' moments are quantized.
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = lora_trainer(llama64_dir, model, make_args(tmp_path, optim="dualadam_4bit", max_steps=4))
    trainer.train()
    optimizer = find_dualadam(trainer.optimizer)
    quantized = {n: is_quantized(optimizer.state[p]["exp_avg"]) for n, p in model.named_parameters() if n in before}
    assert len(optimizer.state) == len(before)
    assert quantized == {n: p.numel() >= 4096 for n, p in before.items()} and any(quantized.values())
    assert all(math.isfinite(e["loss"]) for e in training_logs(trainer))
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize(("environment", "engine"), [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
                                                      ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1")])
def test_sharded_engines_are_refused_where_the_arguments_are_built(tmp_path, monkeypatch, environment, engine):
    """`accelerate launch` with a DeepSpeed or FSDP1 config says so in the environment before the script starts:
    the refusal comes from TrainingArguments, before any model loads (not at train begin, minutes later)."""
    from transformers import TrainingArguments

    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"--optim dualadam_4bit keeps 4-bit optimizer state, which does not run "
                                         f"under {engine}: .* Use DDP or FSDP2 \\(fsdp_version: 2\\) for low-bit "
                                         "state, or --optim dualadam"):
        TrainingArguments(str(tmp_path), optim="dualadam_4bit", report_to="none", use_cpu=True)
    TrainingArguments(str(tmp_path), optim="dualadam", report_to="none", use_cpu=True)  # fp32 state runs there
    for variable in environment:
        monkeypatch.delenv(variable)
    TrainingArguments(str(tmp_path), optim="dualadam_4bit", report_to="none", use_cpu=True)


def test_fsdp2_takes_low_bit_state(tmp_path, monkeypatch):
    """FSDP2, from `accelerate launch`'s environment or from TrainingArguments' fsdp_config (whose default
    version is 2), runs low-bit state on each rank's shard (tests/test_lowbit_fsdp.py); FSDP1 there is refused."""
    from transformers import TrainingArguments

    from dualadam_hf.integrations.optim_args import check_training_args, fsdp_version

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    TrainingArguments(str(tmp_path), optim="dualadam_8bit", report_to="none", use_cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.delenv("FSDP_VERSION")
    arguments = TrainingArguments(str(tmp_path), optim="dualadam_8bit", report_to="none", use_cpu=True)
    arguments.fsdp = "full_shard"
    for config, version in (({}, 2), ({"version": 2}, 2), ({"version": 1}, 1)):
        arguments.fsdp_config = config
        assert fsdp_version(arguments) == version
        if version == 1:
            with pytest.raises(ValueError, match="which does not run under FSDP1: FSDP1 hands the optimizer flat "
                                                 "parameters"):
                check_training_args(arguments)
        else:
            check_training_args(arguments)


def test_block_size_is_transformers_default_and_set_by_optim_args(eager_step):
    params, opt = stepped_once(lambda ps: DualAdam(ps, state_bits=4))
    assert opt.state[params[0]]["exp_avg"].block_size == 256  # as adamw_torch_4bit builds AdamW4bit
    kwargs = optimizer_cls_and_kwargs(Args("dualadam_4bit", "block_size=128,bf16_stochastic_round=true"))[1]
    assert kwargs["block_size"] == 128 and kwargs["bf16_stochastic_round"] is True
    params, opt = stepped_once(lambda ps: DualAdam(ps, **kwargs))
    assert opt.state[params[0]]["exp_avg"].block_size == 128
    with pytest.raises(ValueError, match="Unknown --optim_args key 'block_size' for --optim dualadam"):
        optimizer_cls_and_kwargs(Args("dualadam", "block_size=128"))
    with pytest.raises(ValueError, match="block_size=128 sizes the blocks of quantized moments: it needs state_bits"):
        DualAdam([torch.zeros(1)], block_size=128)
    with pytest.raises(ValueError, match="Invalid block_size: 3"):
        DualAdam([torch.zeros(1)], state_bits=8, block_size=3)


def test_an_old_torchao_is_named(monkeypatch):
    monkeypatch.setattr(lowbit, "_state_types", None)
    monkeypatch.setattr(lowbit, "_torchao_version", lambda: (0, 17, 1))
    with pytest.raises(ImportError, match=r"state_bits needs torchao >= 0.18 .* found 0.17.1: pip install -U torchao"):
        DualAdam([torch.zeros(1)], state_bits=8)


def test_missing_torchao_is_one_line_where_the_arguments_are_built(monkeypatch, tmp_path):
    from transformers import TrainingArguments

    monkeypatch.setattr(lowbit, "_state_types", None)
    for module in ("torchao", "torchao.optim", "torchao.optim.subclass_8bit", "torchao.optim.subclass_4bit"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match="--optim dualadam_8bit: state_bits needs torchao >= 0.18"):
        TrainingArguments(str(tmp_path), optim="dualadam_8bit", report_to="none", use_cpu=True)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale", [1.0, "norm"])
def test_inverse_share_describes_the_step_taken_not_the_requantized_moments(eager_step, bits, scale):
    """At the first step every kind of state starts from zero moments, so the update, and the inverse share
    that describes it, are the fp32 state's to fp32 rounding; read from the requantized moments instead, the
    share came out 300 times lower at 8 bits."""
    shares = {}
    for kind in (None, bits):
        params, opt = stepped_once(lambda ps, kind=kind: DualAdam(ps, lr=1e-3, blend_steps=4, inverse_scale=scale,
                                                                  state_bits=kind))
        shares[kind] = opt.inverse_share()
    assert 0.0 < shares[None] < 1.0
    assert shares[bits] == pytest.approx(shares[None], rel=1e-5)


def test_after_a_load_the_inverse_share_reads_the_stored_moments(eager_step):
    from dualadam_hf import diagnostics

    params, opt = stepped_once(lambda ps: DualAdam(ps, lr=1e-3, blend_steps=4, state_bits=8))
    fresh = DualAdam(params, lr=1e-3, blend_steps=4, state_bits=8)
    fresh.load_state_dict(opt.state_dict())
    states = [fresh.state[p] for p in params]
    adam_sq, inverse_sq = diagnostics.update_norms([dense(s["exp_avg"]) for s in states],
                                                   [dense(s["exp_avg_sq"]) for s in states],
                                                   [s["step"] for s in states], fresh.hyper(fresh.param_groups[0]))
    assert fresh.inverse_share() == pytest.approx(diagnostics.inverse_share(adam_sq, inverse_sq), rel=1e-5)


# Two quantized 16M-element tensors, each with its own optimizer (one holding the inverse part at Adam's norm),
# once their graphs are compiled: how far the peak resident memory rises while each steps, and while the first
# reads the inverse share (as the Trainer callback does at each logging step).
_PEAK_SCRIPT = """
import json, torch
from dualadam_hf import DualAdam

def rise_mb(action):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak starts again from the memory in use now
    def peak():
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    before = peak()
    action()
    return peak() - before

torch.manual_seed(0)
opts = {}
for name, scale in (("held", "norm"), ("plain", 1.0)):
    param = torch.nn.Parameter(torch.randn(4096, 4096))
    param.grad = torch.randn_like(param)
    opts[name] = DualAdam([param], lr=1e-3, blend_steps=8, state_bits=8, inverse_scale=scale)
    opts[name].step()
    opts[name].inverse_share()  # every graph compiled
rises = {name: rise_mb(opt.step) for name, opt in opts.items()}
rises["share"] = rise_mb(opts["held"].inverse_share)
print(json.dumps(rises))
"""


@pytest.mark.compile
def test_reading_quantized_moments_never_holds_them_in_fp32():
    """The inverse share and the held norm read quantized moments without an fp32 copy: for one of these
    tensors that copy would be 128 MB (m and v) and its temporaries more."""
    import json
    import os
    import subprocess

    # Under warnings as errors, as a strict user runs it: building the compiled step must not warn (torch's own
    # deprecation raised while inductor imports torch.utils.mkldnn would otherwise end the run).
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rises = json.loads(done.stdout.strip().splitlines()[-1])
    assert rises["share"] < 16 and rises["held"] - rises["plain"] < 16, rises


def _sparse_row_run(bits, rows=2048, steps=150, seed=0):
    """An embedding-shaped parameter as an untied input embedding sees it: each step 10% of the rows (drawn anew)
    get a gradient of their own fixed scale (1e-4 to 1e-2, log-uniform) times a standard normal, the rest 0."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, -2, rows)[torch.randperm(rows, generator=gen)].unsqueeze(1)
    start = torch.randn(rows, 64, generator=gen)
    param = torch.nn.Parameter(start.clone())
    opt = DualAdam([param], lr=1e-3, blend_steps=20, state_bits=bits)
    for _ in range(steps):
        hit = (torch.rand(rows, 1, generator=gen) < 0.1).float()
        param.grad = torch.randn(rows, 64, generator=gen) * scales * hit
        opt.step()
    return start, param.detach()


@pytest.mark.slow
def test_rows_with_sparse_gradients_stay_near_fp32_state_at_8_bits(eager_step):
    """With torchao's map for v, a row's v rounded to 0 while its m did not, and m / (sqrt(v) + eps) moved such
    rows up to 20-40 times further than fp32 state moved any element (torchao's own AdamW8bit does so too)."""
    start, fp32 = _sparse_row_run(None)
    _, eight = _sparse_row_run(8)
    furthest = (fp32 - start).abs().max()
    assert (eight - start).abs().max() <= 2 * furthest
    assert torch.linalg.vector_norm(eight - fp32) <= 0.3 * torch.linalg.vector_norm(fp32 - start)
