"""Per-device (or per-micro-batch) DRO against robalign's exact one.

The same 64 DPO samples are split over D simulated devices, each reducing its own micro-batch
(then averaged, as DDP does), and compared with the exact global objective. For the KL
temperature form (``--set kl``, as the official DoRA code computes it) with one sample per device
the log-mean-exp is the identity and the method degenerates to plain reweighting ``mean(w·ℓ)``;
``--set kl-ball|chi2|cvar --param P`` measures the same approximation (``exact_dro=False``) for the
other ambiguity sets. ``--set group --param η_q``: group DRO over two groups (the hard quarter
and the rest, samples shuffled); from the same uniform q, the exact step moves q once on the
whole batch's group means, the approximation once per micro-batch on its own. Prints a
Markdown table.

    python benchmarks/dro_per_device.py [--set kl] [--lam 1.0] [--param P]
"""

from __future__ import annotations

import argparse
import copy

import torch

import robalign
from robalign.losses.reductions import REDUCTIONS, GroupDRO


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


def per_device(theta, feats, w, reduction, devices, group_ids=None):
    """The average of ``devices`` micro-batch reductions; a stateful reduction (group DRO) starts
    each call from the same state and steps on every micro-batch."""
    reduction = copy.deepcopy(reduction)
    theta = theta.clone().requires_grad_(True)
    losses = dpo_losses(theta, feats)
    ids = [None] * devices if group_ids is None else group_ids.chunk(devices)
    value = sum(reduction.reduce(l, ww, **({} if i is None else {"group_ids": i}))[0]
                for l, ww, i in zip(losses.chunk(devices), w.chunk(devices), ids)) / devices
    value.backward()
    return value.item(), theta.grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="kl", choices=sorted(REDUCTIONS), help="the ambiguity set")
    parser.add_argument("--lam", type=float, default=1.0, help="λ of --set kl")
    parser.add_argument("--param", type=float, help="η, ρ, the level or η_q of the other sets")
    args = parser.parse_args(argv)
    feats, probs, theta = problem()
    w = robalign.dora_weights(probs, 0.25).mean(-1)
    group_ids = None
    if args.set == "group":
        reduction = GroupDRO(2, args.param, names=("hard", "rest"))
        group_ids = (torch.arange(64) >= 16).long()                 # the hard quarter is group 0
        order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        feats, w, group_ids = feats[order], w[order], group_ids[order]
    else:
        reduction = REDUCTIONS[args.set](args.lam if args.set == "kl" else args.param)
    exact_value, exact_grad = per_device(theta, feats, w, reduction, 1, group_ids)
    print(f"64 samples, {reduction}, DoRA weights with α = 0.25\n")
    print("| normaliser | objective value | gradient rel. error vs exact | cosine to exact gradient |")
    print("| --- | ---: | ---: | ---: |")
    for devices in (64, 16, 4, 1):
        value, grad = per_device(theta, feats, w, reduction, devices, group_ids)
        err = ((grad - exact_grad).norm() / exact_grad.norm()).item()
        cos = torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0).item()
        name = "exact (robalign, any device count)" if devices == 1 else \
            f"per device, {64 // devices} sample(s) each ({devices} devices)"
        if devices == 64 and args.set == "kl":
            name += ", as the official code"
        print(f"| {name} | {value:.4f} | {err:.3f} | {cos:.3f} |")


if __name__ == "__main__":
    main()
