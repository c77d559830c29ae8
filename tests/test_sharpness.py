"""Flatness diagnostics: exact checks on quadratics, then rankings and plumbing on tiny HF models."""

from __future__ import annotations

import math

import pytest
import torch

from dualadam_hf.experiments.sharpness import (
    BatchSetLoss,
    HessianVectorProduct,
    SharpnessSettings,
    epsilon_sharpness,
    hessian_power_iteration,
    hessian_trace,
    hessian_trace_estimate,
    measure_sharpness,
    model_loss_fn,
    select_parameters,
    top_hessian_eigenvalue,
)

# --------------------------------------------------------------------------- #
# Quadratic losses with a known Hessian
# --------------------------------------------------------------------------- #

SHAPES = [(3, 4), (5,)]  # the parameter vector is split over two tensors, as in a model
DIM = sum(math.prod(s) for s in SHAPES)


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _hessian(eigenvalues, seed=0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _quadratic(hessian, *, start_seed=1, center=None):
    """params and loss_fn for L = 0.5 (x - c)^T H (x - c)."""
    g = torch.Generator().manual_seed(start_seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
    c = torch.zeros(DIM, dtype=torch.float64) if center is None else center

    def loss_fn():
        d = _flat(params) - c
        return 0.5 * d @ hessian @ d

    return params, loss_fn


def _spectrum(top=10.0, second=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rest = (torch.rand(DIM - 2, generator=g, dtype=torch.float64) * 3.0 + 0.1).tolist()
    return [top, second, *rest]


def test_top_eigenvalue_matches_known_hessian_within_one_percent():
    h = _hessian(_spectrum(top=10.0))
    params, loss_fn = _quadratic(h)
    eig = top_hessian_eigenvalue(loss_fn, params, max_iters=100, tol=1e-6, seed=0)
    assert eig == pytest.approx(10.0, rel=1e-2)
    assert eig == pytest.approx(torch.linalg.eigvalsh(h).max().item(), rel=1e-2)


def test_top_eigenvalue_is_the_signed_dominant_one():
    h = _hessian([-7.0, 2.0, *([1.0] * (DIM - 2))])
    params, loss_fn = _quadratic(h)
    assert top_hessian_eigenvalue(loss_fn, params, max_iters=100, tol=1e-6) == pytest.approx(-7.0, rel=1e-2)


def test_power_iteration_stops_at_the_cap_or_the_tolerance():
    # Eigenvalues 10 and 9.9 converge slowly: two iterations cannot satisfy a tight tolerance.
    params, loss_fn = _quadratic(_hessian([10.0, 9.9, *([1.0] * (DIM - 2))]))
    capped = hessian_power_iteration(loss_fn, params, max_iters=2, tol=1e-9)
    assert capped.iterations == 2 and not capped.converged
    assert 1e-9 < capped.relative_change < 1  # the change that missed the tolerance is reported
    # A well-separated spectrum converges before a generous cap.
    params, loss_fn = _quadratic(_hessian(_spectrum(top=10.0, second=1.0)))
    done = hessian_power_iteration(loss_fn, params, max_iters=200, tol=1e-4)
    assert done.converged and done.iterations < 200 and done.relative_change <= 1e-4
    assert done.eigenvalue == pytest.approx(10.0, rel=1e-3)
    # The returned vector is the top eigenvector (unit norm, H v = 10 v).
    v = _flat(done.eigenvector)
    assert v.norm().item() == pytest.approx(1.0, rel=1e-9)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    diag = torch.linspace(0.5, 8.0, DIM, dtype=torch.float64)
    params, loss_fn = _quadratic(torch.diag(diag))
    est = hessian_trace_estimate(loss_fn, params, probes=3, seed=5)
    # z_i^2 = 1 for Rademacher z, so z^T D z = tr(D) for every probe.
    assert est.trace == pytest.approx(diag.sum().item(), rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("probes", [10, 200])
def test_hutchinson_trace_within_its_stated_probe_tolerance(probes):
    h = _hessian(_spectrum(), seed=3)
    params, loss_fn = _quadratic(h)
    off = h - torch.diag(torch.diag(h))
    sigma = math.sqrt(2.0 * (off**2).sum().item())  # std of one probe's z^T H z
    tolerance = 4.0 * sigma / math.sqrt(probes)
    est = hessian_trace_estimate(loss_fn, params, probes=probes, seed=0)
    assert abs(est.trace - torch.trace(h).item()) <= tolerance
    assert hessian_trace(loss_fn, params, probes=probes, seed=0) == est.trace
    # The reported standard error estimates sigma / sqrt(probes).
    assert 0.3 * sigma / math.sqrt(probes) < est.stderr < 3.0 * sigma / math.sqrt(probes)


def test_batch_set_loss_parts_give_the_same_hessian_products_as_the_whole():
    h1, h2 = _hessian(_spectrum(seed=1), seed=1), _hessian(_spectrum(top=3.0, seed=2), seed=2)
    params, part1 = _quadratic(h1)
    _, part2 = _quadratic(h2)
    part2_on_params = lambda: 0.5 * _flat(params) @ h2 @ _flat(params)
    split = BatchSetLoss([part1, part2_on_params], [3.0, 1.0])  # weights normalize to 0.75 / 0.25
    whole = lambda: 0.75 * part1() + 0.25 * part2_on_params()
    assert split().item() == pytest.approx(whole().item(), rel=1e-12)
    v = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    hv_split = _flat(HessianVectorProduct(split, params)(v))
    expected = (0.75 * h1 + 0.25 * h2) @ _flat(v)
    torch.testing.assert_close(hv_split, expected)
    torch.testing.assert_close(_flat(HessianVectorProduct(whole, params)(v)), expected)


def test_epsilon_sharpness_on_a_quadratic_matches_the_closed_form_and_restores_params():
    h = _hessian(_spectrum(), seed=4)
    center = torch.full((DIM,), 0.3, dtype=torch.float64)
    params, loss_fn = _quadratic(h, center=center)
    before = [p.detach().clone() for p in params]
    rho = 0.05
    out = epsilon_sharpness(loss_fn, params, rho=rho, seeds=4, seed=0)
    x = _flat(before)
    g = h @ (x - center)
    r = rho * x.norm().item()
    step = r * g / g.norm()
    expected_worst = (g @ step + 0.5 * step @ h @ step).item()  # exact for a quadratic
    assert out["radius"] == pytest.approx(r, rel=1e-12)
    assert out["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)
    assert out["worst"] == pytest.approx(expected_worst, rel=1e-6)
    assert out["loss"] == pytest.approx(loss_fn().item(), rel=1e-12)
    # Along a direction of norm r the increase is at most r|g| + 0.5 r^2 lambda_max.
    eigs = torch.linalg.eigvalsh(h)
    assert out["random_max"] <= r * g.norm().item() + 0.5 * r * r * eigs.max().item()
    # The +z/-z average cancels the gradient term: 0.5 r^2 u^T H u for a unit u, so between the
    # extreme eigenvalues, and over many directions it tends to 0.5 r^2 tr(H) / dim.
    assert 0.5 * r * r * eigs.min().item() <= out["random"] <= 0.5 * r * r * eigs.max().item()
    assert out["random"] < out["worst"]
    many = epsilon_sharpness(loss_fn, params, rho=rho, seeds=400, seed=1)
    assert many["random"] == pytest.approx(0.5 * r * r * torch.trace(h).item() / DIM, rel=0.05)
    # rho_random sets the random radius alone; the gradient step keeps rho.
    wide = epsilon_sharpness(loss_fn, params, rho=rho, rho_random=4 * rho, seeds=400, seed=1)
    assert wide["radius_random"] == pytest.approx(4 * r, rel=1e-12) and wide["radius"] == out["radius"]
    assert wide["worst"] == out["worst"]
    assert wide["random"] == pytest.approx(16 * many["random"], rel=1e-9)  # same directions, 4x the radius
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def test_epsilon_sharpness_at_an_exact_minimum_falls_back_to_the_random_worst():
    h = _hessian(_spectrum(), seed=4)
    params, loss_fn = _quadratic(h)
    center = _flat(params).detach().clone()
    _, loss_fn = _quadratic(h, center=center)
    loss_at_min = lambda: 0.5 * (_flat(params) - center) @ h @ (_flat(params) - center)
    out = epsilon_sharpness(loss_at_min, params, rho=0.1, seeds=3)
    assert out["grad_norm"] == 0.0
    assert out["worst"] == out["random_max"] > 0  # every direction goes up from a strict minimum


def test_estimators_are_deterministic_given_a_seed():
    params, loss_fn = _quadratic(_hessian(_spectrum(top=10.0, second=9.0)))
    a = hessian_power_iteration(loss_fn, params, max_iters=3, seed=7).eigenvalue
    assert a == hessian_power_iteration(loss_fn, params, max_iters=3, seed=7).eigenvalue
    assert a != hessian_power_iteration(loss_fn, params, max_iters=3, seed=8).eigenvalue
    t = hessian_trace(loss_fn, params, probes=2, seed=7)
    assert t == hessian_trace(loss_fn, params, probes=2, seed=7)
    assert t != hessian_trace(loss_fn, params, probes=2, seed=8)
    e = epsilon_sharpness(loss_fn, params, rho=0.05, seeds=2, seed=7)
    assert e == epsilon_sharpness(loss_fn, params, rho=0.05, seeds=2, seed=7)
    assert e["random"] != epsilon_sharpness(loss_fn, params, rho=0.05, seeds=2, seed=8)["random"]
    # Measuring leaves the global RNG alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    hessian_trace(loss_fn, params, probes=2)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs_raise_clear_errors():
    params, loss_fn = _quadratic(_hessian(_spectrum()))
    with pytest.raises(ValueError, match="no trainable parameters"):
        top_hessian_eigenvalue(loss_fn, [])
    with pytest.raises(ValueError, match="does not require grad"):
        hessian_trace(loss_fn, [torch.zeros(3)])
    with pytest.raises(ValueError, match="max_iters"):
        top_hessian_eigenvalue(loss_fn, params, max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        top_hessian_eigenvalue(loss_fn, params, tol=0)
    with pytest.raises(ValueError, match="probes"):
        hessian_trace(loss_fn, params, probes=0)
    with pytest.raises(ValueError, match="rho"):
        epsilon_sharpness(loss_fn, params, rho=-1.0)
    with pytest.raises(ValueError, match="rho_random"):
        epsilon_sharpness(loss_fn, params, rho_random=float("inf"))
    with pytest.raises(ValueError, match="seeds"):
        epsilon_sharpness(loss_fn, params, seeds=0)
    with pytest.raises(TypeError, match="scalar"):
        hessian_trace(lambda: _flat(params), params)
    with pytest.raises(FloatingPointError, match="non-finite"):
        hessian_trace(lambda: loss_fn() * float("nan"), params)
    with pytest.raises(ValueError, match="all trainable parameters are zero"):
        zero = [torch.zeros(3, requires_grad=True)]
        epsilon_sharpness(lambda: (zero[0] ** 2).sum() + zero[0].sum(), zero)
    with pytest.raises(TypeError, match="seed"):
        hessian_trace(loss_fn, params, seed=1.5)


# --------------------------------------------------------------------------- #
# Tiny Hugging Face models
# --------------------------------------------------------------------------- #

VOCAB = 32
FAST = {"max_iters": 6, "tol": 1e-2, "probes": 3, "seeds": 2}


def _fast(**changes) -> SharpnessSettings:
    """Short settings for the tiny models: few products, a loose tolerance."""
    return SharpnessSettings(**{**FAST, **changes})


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _tiny_classifier(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         num_labels=3, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def _lm_batches(n=2, batch=2, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # some right padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _cls_batches(n=2, batch=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (batch, length), generator=g),
             "labels": torch.randint(0, 3, (batch,), generator=g)} for _ in range(n)]


def test_model_loss_fn_is_the_token_weighted_mean_with_padding_masked():
    model = _tiny_llama().eval()
    batches = _lm_batches()
    loss_fn = model_loss_fn(model, batches)
    # Reference: one flat cross-entropy over every supervised (shifted, unpadded) token.
    logits, targets = [], []
    with torch.no_grad():
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits.append(lg[:, :-1].reshape(-1, VOCAB))
            targets.append(labels[:, 1:].reshape(-1))
        expected = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=-100)
        assert loss_fn().item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(loss_fn) == 2


def test_splitting_batches_into_row_groups_keeps_the_loss_and_the_hessian():
    model = _tiny_llama().eval()
    batches = _lm_batches(n=2, batch=3, length=8)
    whole = model_loss_fn(model, batches)
    split = model_loss_fn(model, batches, max_tokens_per_part=10)  # one 8-token row per part
    assert (len(whole), len(split)) == (2, 6)
    assert whole.tokens == split.tokens == 48
    assert split().item() == pytest.approx(whole().item(), rel=1e-6)
    params = [p for p in model.parameters()]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    for a, b in zip(HessianVectorProduct(whole, params)(v),
                    HessianVectorProduct(split, params, retain_graphs=False)(v), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # measure_sharpness keeps graphs while they fit in max_graph_tokens, rebuilds them otherwise.
    kept = measure_sharpness(model, batches, _fast(max_graph_tokens=64))
    rebuilt = measure_sharpness(model, batches, _fast(max_graph_tokens=16))
    assert (kept["graphs_retained"], kept["num_parts"]) == (1.0, 2.0)
    assert (rebuilt["graphs_retained"], rebuilt["num_parts"]) == (0.0, 4.0)  # rows 2 + 1 per batch
    for key in ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst"):
        assert rebuilt[key] == pytest.approx(kept[key], rel=1e-3, abs=1e-6), key


def test_model_loss_fn_rejects_bad_batches():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="non-empty list"):
        model_loss_fn(model, [])
    with pytest.raises(ValueError, match="no input_ids"):
        model_loss_fn(model, [{"labels": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="no supervised tokens"):
        model_loss_fn(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long),
                               "labels": torch.full((1, 4), -100)}])
    with pytest.raises(ValueError, match="needs them"):
        model_loss_fn(_tiny_classifier(), [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="params must be one of"):
        select_parameters(model, "some")
    with pytest.raises(ValueError, match="max_tokens_per_part"):
        model_loss_fn(model, _lm_batches(), max_tokens_per_part=0)


def _head_with_feature_scale(model, scale):
    """Scale the final norm (the features fed to the output head) and return the head's weight."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return [(model.lm_head if hasattr(model, "lm_head") else model.score).weight]


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
def test_flat_and_sharp_constructions_rank_correctly(kind):
    # Cross-entropy is convex in the output head's weights, so in the head the loss is a bowl with a
    # positive semi-definite Hessian. The same tiny network with its features scaled up by 3 has a bowl
    # about 9 times steeper (the Hessian holds the features twice) at nearly the same loss.
    make, batches = (_tiny_llama, _lm_batches()) if kind == "causal_lm" else (_tiny_classifier, _cls_batches())
    settings = _fast(rho=0.2, rho_random=0.2, seeds=6)
    flat_model, sharp_model = make(), make()
    flat = measure_sharpness(flat_model, batches, settings, params=_head_with_feature_scale(flat_model, 1.0))
    sharp = measure_sharpness(sharp_model, batches, settings, params=_head_with_feature_scale(sharp_model, 3.0))
    assert sharp["loss"] == pytest.approx(flat["loss"], rel=0.05)
    assert sharp["top_eigenvalue"] > 4.0 * flat["top_eigenvalue"] > 0
    assert sharp["hessian_trace"] > 4.0 * flat["hessian_trace"] > 0
    assert sharp["sharpness_worst"] > flat["sharpness_worst"] > 0
    assert sharp["sharpness_random"] > flat["sharpness_random"] > 0


def test_function_preserving_rescaling_moves_curvature_but_not_relative_sharpness():
    # Scale the MLP's up projection by c and its down projection by 1/c: the network computes the same
    # function, the Hessian in the down projection grows by c^2 (Dinh et al. 2017), while the
    # epsilon-sharpness, whose radius is relative to ||theta||, does not move.
    c = 3.0
    batches = _lm_batches()
    a, b = _tiny_llama(), _tiny_llama()
    with torch.no_grad():
        for layer in b.model.layers:
            layer.mlp.up_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.div_(c)
    pa = [layer.mlp.down_proj.weight for layer in a.model.layers]
    pb = [layer.mlp.down_proj.weight for layer in b.model.layers]
    ra = measure_sharpness(a, batches, _fast(), params=pa)
    rb = measure_sharpness(b, batches, _fast(), params=pb)
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rb["top_eigenvalue"] == pytest.approx(c * c * ra["top_eigenvalue"], rel=1e-3)
    assert rb["hessian_trace"] == pytest.approx(c * c * ra["hessian_trace"], rel=1e-3)
    assert rb["sharpness_worst"] == pytest.approx(ra["sharpness_worst"], rel=1e-2, abs=1e-6)
    assert rb["num_params"] == ra["num_params"] == 16 * 32


def test_measure_sharpness_on_a_peft_lora_model_measures_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.1, task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA starts with B = 0; give it a value so the point is generic
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    out = measure_sharpness(model, _lm_batches(), _fast())
    assert out["num_params"] == lora_count
    for key in ("loss", "top_eigenvalue", "hessian_trace", "sharpness_worst", "sharpness_random"):
        assert math.isfinite(out[key]), key
    assert out["top_eigenvalue"] > 0
    # Measuring restores training mode, requires_grad flags and every weight exactly.
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    # "lora" selects the same tensors here; "all" adds the frozen base and changes the numbers.
    assert [n for n, _ in select_parameters(model, "lora")] == [n for n, _ in select_parameters(model)]
    everything = measure_sharpness(model, _lm_batches(), _fast(params="all"))
    assert everything["num_params"] == sum(p.numel() for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_measure_sharpness_is_deterministic_given_a_seed():
    batches = _cls_batches()
    model = _tiny_classifier()
    a = measure_sharpness(model, batches, _fast(seed=1))
    b = measure_sharpness(model, batches, _fast(seed=1))
    c = measure_sharpness(model, batches, _fast(seed=2))
    numbers = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}
    assert numbers(a) == numbers(b)
    assert a["hessian_trace"] != c["hessian_trace"]
    assert a["loss"] == c["loss"]
    for key in ("seconds_eigenvalue", "seconds_trace", "seconds_epsilon", "seconds_total"):
        assert a[key] > 0


class _NoisyHead(torch.nn.Module):
    """Adds noise from torch's global generator to a classifier's logits, in eval mode too: a model whose loss
    depends on the global random state."""

    def forward(self, logits):
        return logits + 1e-3 * torch.randn_like(logits)


def test_measure_sharpness_does_not_depend_on_the_global_random_state():
    """The same model measured after different draws from torch's global generator (another run's training, a
    resumed run's fresh start) gives the same numbers, and the caller's global state is left as it was."""
    model = _tiny_classifier()
    model.score.register_forward_hook(lambda module, args, output: _NoisyHead()(output))
    batches = _cls_batches()
    numbers = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}
    torch.manual_seed(123)
    first = measure_sharpness(model, batches, _fast(seed=1))
    after_first = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(1000)  # a different global state before the second measurement
    second = measure_sharpness(model, batches, _fast(seed=1))
    assert numbers(first) == numbers(second)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert torch.equal(after_first, expected)  # the measurement drew nothing from the caller's generator


def test_measure_sharpness_shows_what_it_measures(capsys):
    lines = []
    out = measure_sharpness(_tiny_classifier(), _cls_batches(n=1), _fast(max_iters=3, probes=2, seeds=1),
                            progress=lines.append, show_bar=True)
    bar = capsys.readouterr().err
    for what in ("top eigenvalue (power iteration)", "Hessian trace (Hutchinson probes)", "loss at perturbed weights"):
        assert f"sharpness: {what}" in bar
    assert sum(line.startswith("eigenvalue iteration") for line in lines) == out["eigenvalue_iterations"]
    assert sum(line.startswith("trace probe") for line in lines) == 2
    assert sum(line.startswith("loss evaluation") for line in lines) == 4  # loss, +z, -z, gradient step
    assert out["eigenvalue_converged"] in (0.0, 1.0) and "eigenvalue_relative_change" in out


def test_measure_sharpness_says_before_the_power_iteration_what_it_costs_on_cpu(capsys):
    # A product on a real model takes minutes on CPU, and the bar moves only when one ends.
    lines = []
    measure_sharpness(_tiny_classifier(), _cls_batches(n=1), _fast(max_iters=3, probes=1, seeds=1),
                      progress=lines.append, show_bar=True)
    assert lines[0] == ("top eigenvalue: up to 3 power iterations, one Hessian-vector product each; on CPU each "
                        "can take a minute or more")
    assert lines[0] in capsys.readouterr().err


def test_measure_sharpness_defaults_to_the_settings_record():
    # No settings: SharpnessSettings() (the one place the defaults live); the record says what was used.
    model = _tiny_classifier()
    out = measure_sharpness(model, _cls_batches(n=1))
    defaults = SharpnessSettings()
    assert out["probes"] == defaults.probes
    assert out["rho"] == defaults.rho and out["rho_random"] == defaults.rho_random
    assert out["eigenvalue_iterations"] <= defaults.max_iters


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"batches": 0}, "batches must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"max_iters": 0}, "max_iters must be an int >= 1"),
        ({"probes": 2.5}, "probes must be an int >= 1"),
        ({"seeds": True}, "seeds must be an int >= 1"),
        ({"max_graph_tokens": 0}, "max_graph_tokens must be an int >= 1"),
        ({"tol": 0.0}, "tol must be a finite number > 0"),
        ({"rho": -1e-3}, "rho must be a finite number > 0"),
        ({"rho_random": float("inf")}, "rho_random must be a finite number > 0"),
        ({"params": "some"}, "params must be one of"),
    ],
)
def test_settings_reject_bad_values_when_built(changes, match):
    # Checked when the record is made (command line, recipe or code), before any Hessian product.
    with pytest.raises(ValueError, match=match):
        SharpnessSettings(**changes)
