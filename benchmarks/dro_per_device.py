"""Per-device KL-DRO (as the official DoRA code computes it) against robalign's exact one.

The same 64 DPO samples are split over D simulated devices, each computing
``λ·log mean exp(w·ℓ/λ)`` over its own micro-batch (then averaged, as DDP does), and compared
with the exact global objective. With one sample per device the log-mean-exp is the identity
and the method degenerates to plain reweighting ``mean(w·ℓ)``. Prints a Markdown table.

    python benchmarks/dro_per_device.py [--lam 1.0]
"""

from __future__ import annotations

import argparse

import torch

import robalign


def problem(seed=0, n=64, dim=16):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 2, dim, generator=gen, dtype=torch.float64)      # chosen, rejected
    feats[: n // 4] *= 4                                                     # a hard minority
    probs = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    theta = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3
    return feats, probs, theta


def dpo_losses(theta, feats):
    logps = feats @ theta                                                    # [n, 2]
    return robalign.objectives.dpo(logps, torch.zeros_like(logps), beta=1.0)


def per_device(theta, feats, w, lam, devices):
    theta = theta.clone().requires_grad_(True)
    losses = dpo_losses(theta, feats)
    value = sum(robalign.kl_dro(l, ww, lam=lam) for l, ww in zip(losses.chunk(devices), w.chunk(devices))) / devices
    value.backward()
    return value.item(), theta.grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=1.0)
    args = parser.parse_args(argv)
    feats, probs, theta = problem()
    w = robalign.dora_weights(probs, 0.25).mean(-1)
    exact_value, exact_grad = per_device(theta, feats, w, args.lam, 1)
    print(f"64 samples, λ = {args.lam}, DoRA weights with α = 0.25\n")
    print("| normaliser | objective value | gradient rel. error vs exact | cosine to exact gradient |")
    print("| --- | ---: | ---: | ---: |")
    for devices in (64, 16, 4, 1):
        value, grad = per_device(theta, feats, w, args.lam, devices)
        err = ((grad - exact_grad).norm() / exact_grad.norm()).item()
        cos = torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0).item()
        name = "exact (robalign, any device count)" if devices == 1 else \
            f"per device, {64 // devices} sample(s) each ({devices} devices)"
        if devices == 64:
            name += ", as the official code"
        print(f"| {name} | {value:.4f} | {err:.3f} | {cos:.3f} |")


if __name__ == "__main__":
    main()
