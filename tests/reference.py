"""A slow float64 reference of DualAdam written straight from the update rule.

It shares no code with the package on purpose: the fast paths are checked against these lines, not
against themselves. The rule, per element at a parameter's step t:

    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g ;  mh = m/(1-b1**t) ;  d = sqrt(v/(1-b2**t)) + eps
    r = 1 - t*switch_rate if that is >= switch_rate (in exact arithmetic) else 0   (switch_rate 0: r = 1)
    u = (1-r)*mh/d + r*s*mh*d ;  p = p - lr*wd*p - lr*u

s is inverse_scale: a number; "auto": ||mh/d|| / ||mh*d|| over the tensor at its first step with a
non-zero gradient, kept from then on; or "norm": ||mh/d|| / ||mh*d|| of this step's mh and d, at every step
(0 where mh*d is 0), so that the inverse part's norm is the Adam part's.
"""

from __future__ import annotations

import math

import torch


class ReferenceDualAdam:
    """Per-element DualAdam in float64."""

    def __init__(self, params, *, lrs, weight_decays, betas=(0.9, 0.999), eps=1e-8, switch_rate=0.01,
                 maximize=False, inverse_scale=1.0, round_to=None):
        self.p = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.t = [0 for _ in self.p]
        self.norm = inverse_scale == "norm"
        self.s = [None if inverse_scale in ("auto", "norm") else float(inverse_scale) for _ in self.p]
        self.lrs, self.wds = lrs, weight_decays
        self.b1, self.b2 = betas
        self.eps, self.switch_rate = eps, switch_rate
        self.maximize = maximize
        self.round_to = round_to  # emulate storing params in a low-precision dtype
        # Per tensor, the largest |p| met and the summed largest |step|: the magnitudes float32 rounding
        # is relative to (see max_path_err).
        self.peak = [float(p.abs().max()) if p.numel() else 0.0 for p in self.p]
        self.travel = [0.0 for _ in self.p]

    def blend(self, t):
        if self.switch_rate == 0:
            return 1.0
        r = 1 - t * self.switch_rate
        # r >= switch_rate in exact arithmetic (1 - 4*0.2 must count as 0.2).
        return r if r >= self.switch_rate * (1 - 1e-9) else 0.0

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            self.t[i] += 1
            t, b1, b2 = self.t[i], self.b1, self.b2
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            mh = self.m[i] / (1 - b1**t)
            vh = self.v[i] / (1 - b2**t)
            d = torch.sqrt(vh) + self.eps
            if self.norm:
                inverse = float((mh * d).norm())
                self.s[i] = float((mh / d).norm()) / inverse if inverse > 0 else 0.0
            elif self.s[i] is None and self.p[i].numel() and bool((mh * d != 0).any()):
                self.s[i] = float((mh / d).norm() / (mh * d).norm())
            r = self.blend(t)
            u = (1 - r) * mh / d + r * (self.s[i] or 0.0) * mh * d
            lr, wd = self.lrs[i], self.wds[i]
            p = self.p[i] - lr * wd * self.p[i]
            p = p - lr * u
            if self.round_to is not None:
                p = p.to(self.round_to).to(torch.float64)
            if p.numel():
                self.peak[i] = max(self.peak[i], float(p.abs().max()))
                self.travel[i] += float((p - self.p[i]).abs().max())
            self.p[i] = p


def max_rel_err(actual, expected) -> float:
    """Largest per-tensor relative error, max|a - e| / max|e| (infinity norm).

    Norm-wise, not element-wise: fp32 rounding accumulated over hundreds of
    steps is relative to the tensor's scale, and an element that happens to
    sit near zero would otherwise turn that rounding into a failure.
    """
    worst = 0.0
    for a, e in zip(actual, expected):
        a = a.detach().to(torch.float64)
        if a.numel() == 0:
            continue
        err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
        worst = max(worst, err if not math.isnan(err) else math.inf)
    return worst


def max_path_err(actual, reference: ReferenceDualAdam) -> float:
    """Largest per-tensor error relative to the tensor's path: max|a - e| / (largest |p| met + summed
    largest |step|).

    A float32 update rounds relative to the magnitudes it adds and subtracts, not to where the parameter
    ends: a tensor whose steps of size 1 cancel to an end value of 1e-3 carries float32 rounding of the
    steps, which is large against 1e-3 but not against the path it took.
    """
    worst = 0.0
    for a, e, peak, travel in zip(actual, reference.p, reference.peak, reference.travel):
        a = a.detach().to(torch.float64)
        if a.numel() == 0:
            continue
        err = (a - e).abs().max().item() / max(peak + travel, 1e-30)
        worst = max(worst, err if not math.isnan(err) else math.inf)
    return worst
