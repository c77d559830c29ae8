"""Property tests: random shapes and hyperparameters against the reference.

The examples are drawn from a fixed seed (the "ci" profile in tests/conftest.py), so a run is reproducible;
``--hypothesis-profile=thorough`` draws many more, from a fresh seed each run.
"""

from __future__ import annotations

import warnings

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dualadam_hf import DualAdam, InvAdam, functional
from tests.reference import ReferenceDualAdam, max_path_err

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    lr=st.floats(1e-4, 5e-2),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-3),
    weight_decay=st.floats(0.0, 0.2),
    switch_rate=st.floats(0.0, 1.0),
    maximize=st.booleans(),
    foreach=st.booleans(),
    inverse=st.booleans(),
    inverse_scale=st.sampled_from([1.0, 0.0, 37.0, "auto"]),
    block=st.sampled_from([4, 64, functional.FOREACH_BLOCK]),
    seed=st.integers(0, 2**16),
)
# A float32 cancellation: steps of about 0.5 (InvAdam at scale 37) cancel to an end value of -0.0025, whose
# float32 error of 1.4e-7 is 5.6e-5 of that end value but tiny against the path the parameter took.
@example(shape_list=[(3,), (), ()], lr=0.013214181117310191, beta1=0.0, beta2=0.5625, eps=0.0009930111482237703,
         weight_decay=0.125, switch_rate=0.0, maximize=False, foreach=False, inverse=False, inverse_scale=37.0,
         block=4, seed=39798)
def test_random_problems_match_reference(
    shape_list, lr, beta1, beta2, eps, weight_decay, switch_rate, maximize, foreach, inverse, inverse_scale, block,
    seed,
):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shape_list]
    common = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                  inverse_scale=inverse_scale)
    if inverse:
        opt, switch_rate = InvAdam(params, **common), 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # switch_rate=0 warns that it is InvAdam
            opt = DualAdam(params, switch_rate=switch_rate, **common)
    ref = ReferenceDualAdam(
        params, lrs=[lr] * len(params), weight_decays=[weight_decay] * len(params), betas=(beta1, beta2),
        eps=eps, switch_rate=switch_rate, maximize=maximize, inverse_scale=inverse_scale,
    )
    old_block = functional.FOREACH_BLOCK
    functional.FOREACH_BLOCK = block
    try:
        for _ in range(12):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            ref.step(grads)
    finally:
        functional.FOREACH_BLOCK = old_block
    assert all(torch.isfinite(p).all() for p in params)
    assert max_path_err(params, ref) < 1e-5
    assert all(opt.state[p]["step"].item() == 12 for p in params)
