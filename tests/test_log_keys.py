"""What the callback logs is what the comparison report reads, and the report reads it without transformers."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch


def test_the_report_does_not_import_transformers():
    # The callback module imports transformers and torch; the report, which reads what the callback logs,
    # takes the keys from a module of their own and stays quick to import.
    probe = "import sys; from dualadam_hf.experiments import checkpoints, report; print('transformers' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == ["False"]


def test_the_report_reads_the_blend_and_share_the_callback_logged():
    from dualadam_hf import DualAdam
    from dualadam_hf.experiments.report import blended_steps
    from dualadam_hf.integrations.callbacks import DualAdamCallback

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    opt = DualAdam([weight], lr=1e-2, blend_steps=4, inverse_scale="norm")
    callback = DualAdamCallback()
    args = SimpleNamespace(optim="dualadam", max_grad_norm=1.0)
    state = SimpleNamespace(global_step=0, max_steps=6, log_history=[])
    callback.on_train_begin(args, state, None, optimizer=opt)
    logged = []
    for step in range(1, 7):
        weight.grad = torch.randn(8, 8)
        opt.step()
        state.global_step = step
        logs = {"loss": 1.0, "learning_rate": 1e-2}
        state.log_history.append({**logs, "step": step})
        callback.on_log(args, state, None, logs=logs)
        logged.append((step, opt.blend_weight(), opt.inverse_share()))
    # The blend covers steps 1-3 (r = 0.75, 0.5, 0.25); the report finds exactly those, with their shares.
    expected = [(step, r, share) for step, r, share in logged if r > 0]
    assert [step for step, *_ in expected] == [1, 2, 3]
    found = blended_steps(state.log_history)
    assert [step for step, *_ in found] == [1, 2, 3]
    for (_, r, share), (_, found_r, found_share) in zip(expected, found):
        assert found_r == r and found_share == share > 0
