"""The worst case over an ambiguity set around the (weighted) batch, solved exactly in float64.

For the N values ``x_i = w_i·ℓ_i`` of the effective batch, each function returns the value
``sup_{q ∈ Q} Σ_i q_i·x_i`` over its set ``Q`` of distributions on the N samples, the maximising
``q`` (the gradient ``∂L/∂x_i``, by the envelope theorem) and the dual variable that fixes it:

    kl_ball(x, η)     Q = {q : KL(q ‖ uniform) ≤ η}          L = min_{λ>0} λη + λ·log mean exp(x/λ)
                      q = softmax(x/λ*), λ* solves KL(softmax(x/λ) ‖ uniform) = η (bisection on log λ)
    chi2_ball(x, ρ)   Q = {q : ½·N·Σ (q_i − 1/N)² ≤ ρ}        L = min_c c + √(1+2ρ)·√(mean((x − c)₊²))
                      q_i ∝ (x_i − c*)₊ (Cressie–Read, Duchi & Namkoong 2021); c* by bisection
    cvar(x, level)    Q = {q : q_i ≤ 1/(level·N)}            L = min_c c + mean((x − c)₊)/level
                      weight 1/(level·N) on the worst ⌊level·N⌋ samples, the rest on the next one

η = 0 and level = 1 give the mean; a radius large enough gives the maximum. Inputs are detached
and solved on the host in float64 (N scalars: one copy, instead of a device read per bisection
step); value and q come back on the input's device. Callers build the loss from ``q`` (see
:mod:`robalign.losses.reductions`).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["kl_ball", "chi2_ball", "cvar"]

_STEPS = 200            # bisection steps: far past float64 resolution of the bracket


def _on_host(solve):
    """Run ``solve`` on a float64 host copy of ``x``; its value and q return to ``x``'s device."""

    @functools.wraps(solve)
    def wrapper(x: torch.Tensor, radius: float):
        value, q, dual = solve(x.detach().double().cpu(), radius)
        return value.to(x.device), q.to(x.device), dual

    return wrapper


def _kl_to_uniform(xc: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
    """``KL(softmax(x/λ) ‖ uniform)`` and the softmax, from the centred values ``xc = x − mean(x)``:
    with ``z = xc/λ``, ``KL = E_q[z] − log mean e^z = Σ q·z − log1p(mean(expm1(z)))``. At a tiny
    radius z ~ 1e-8 and KL ~ 1e-17: ``Σ q·log(q·N)`` sums first-order terms of 1e-8 that cancel to
    it and keeps no digit of it (the KL ball's value was 5e-9 off at η = 1e-17)."""
    z = xc / lam
    q = torch.softmax(z, 0)
    kl = (q * z).sum() - torch.log1p(torch.expm1(z - z.max()).mean()) - z.max()
    return float(kl.clamp(min=0.0)), q


@_on_host
def kl_ball(x: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(value, q, λ*)`` of the KL ball of radius ``eta`` (λ* = inf: the mean, the set holds only
    the uniform q or the values are equal; λ* = 0: the maximum, the radius holds the point mass)."""
    n = x.numel()
    spread = float(x.max() - x.min())
    if eta == 0 or spread == 0:
        return x.mean(), torch.full_like(x, 1 / n), math.inf
    k_max = int((x == x.max()).sum())
    if eta >= math.log(n / k_max):                      # the mass on the maxima fits: the supremum
        q = (x == x.max()).double() / k_max
        return x.max(), q, 0.0
    mean = x.mean()
    xc = x - mean
    lo, hi = math.log(spread) - 60.0, math.log(spread) + 60.0     # log λ: KL ≈ log(n/k) at lo, ≈ 0 at hi
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        kl, _ = _kl_to_uniform(xc, math.exp(mid))
        lo, hi = (mid, hi) if kl > eta else (lo, mid)  # KL falls as λ grows
    lam = math.exp(0.5 * (lo + hi))
    _, q = _kl_to_uniform(xc, lam)
    # the primal value mean + Σ q·(x − mean) equals the dual λη + λ·log mean e^{x/λ} at λ*, without
    # its cancellation: at a tiny radius λ* is huge and the dual's two terms lose every digit
    return mean + (q * xc).sum(), q, lam


def _chi2_weights(x, c):
    z = (x - c).clamp(min=0)
    norm = torch.sqrt((z * z).mean())
    return z, norm


@_on_host
def chi2_ball(x: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(value, q, c*)`` of the χ² ball of radius ``rho`` (Cressie–Read f(t) = ½(t − 1)²)."""
    n = x.numel()
    if rho == 0 or float(x.max() - x.min()) == 0:
        return x.mean(), torch.full_like(x, 1 / n), -math.inf
    k_max = int((x == x.max()).sum())
    if 0.5 * (n / k_max - 1) <= rho:                    # the point mass on the maxima is in the ball
        return x.max(), (x == x.max()).double() / k_max, float(x.max())
    m, var = float(x.mean()), float(x.var(unbiased=False))
    # a small radius keeps every q_i = 1/n + √(2ρ/n)·(x_i − m)/‖x − m‖ non-negative: then the
    # supremum is m + √(2ρ·var) in closed form, c* = m − √(var/(2ρ)), with nothing to cancel
    # (the bisection's 1 − target² is 0 in float64 for ρ ≲ 1e-16)
    q = 1 / n + math.sqrt(2 * rho / n) * (x - m) / float(torch.linalg.vector_norm(x - m))
    if bool((q >= 0).all()):
        return (q * x).sum(), q, m - math.sqrt(var / (2 * rho))
    target = 1 / math.sqrt(1 + 2 * rho)
    # mean(z)/√mean(z²) falls from 1 (c ≤ min x, and below) to √(k/n) (c → max x); c* meets target
    # below min x every z_i = x_i − c > 0 and the ratio is (m − c)/√((m − c)² + var): c* there is
    # m − t·√(var/(1 − t²)) (t = target), so the bracket starts below that
    lo = min(float(x.min()), m - target * math.sqrt(var / (1 - target * target))) - 1.0
    hi = float(x.max())
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        z, norm = _chi2_weights(x, mid)
        ratio = float(z.mean() / norm) if norm > 0 else 0.0
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    c = 0.5 * (lo + hi)
    z, norm = _chi2_weights(x, c)
    q = z / z.sum()
    return (q * x).sum(), q, c


@_on_host
def cvar(x: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(value, q, c*)``: the mean of the worst ``level`` fraction, the boundary sample
    fractionally; c* is the ``1 − level`` quantile (the boundary value)."""
    n = x.numel()
    order = torch.argsort(x, descending=True, stable=True)
    q = torch.zeros_like(x)
    full = min(n, int(math.floor(level * n + 1e-12)))
    cap = 1 / (level * n) if full else 1.0     # level·n < 1: the cap (> 1, or inf) binds nothing; q is one-hot
    q[order[:full]] = cap
    rest = 1.0 - full * cap
    if full < n and rest > 1e-15:
        q[order[full]] = rest
    boundary = float(x[order[min(full, n - 1)]])
    return (q * x).sum(), q, boundary
