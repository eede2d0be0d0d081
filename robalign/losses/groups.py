"""Group DRO over known groups of samples (Sagawa et al. 2020, "Distributionally Robust Neural
Networks"; for preference optimisation, Ramesh et al. 2024, "Group Robust Preference Optimization").

For the N values ``x_i = w_i·ℓ_i`` of the effective batch and a group ``g(i) ∈ {0, …, G−1}`` per
sample, one step of the online algorithm is

    n_g = |{i : g(i) = g}|,   L_g = (1/n_g)·Σ_{g(i)=g} x_i          (L_g = 0 for a group with n_g = 0)
    q   ← q ⊙ exp(η_q·L)  normalised on the simplex                 (exponentiated gradient ascent)
    L   = Σ_g q_g·L_g,    ∂L/∂x_i = q_{g(i)} / n_{g(i)}             (q held fixed: the learner's step)

so q drifts toward the groups with the largest loss, and the training objective is the q-weighted
group losses, ``max_{q ∈ Δ} Σ_g q_g·L_g`` played online. A group absent from the batch keeps its
unnormalised q (its factor is e⁰). The step is formed as ``log q + η·(L − max L)`` (the same
softmax), so η·L beyond float64's range takes its limit — all of q on the groups of the largest L_g,
shared in proportion to their q — and a group at q = 0 stays there. Everything stays
on the device: the per-group sums and counts of every rank come from one SUM all-reduce of ``2G``
float64 numbers, so every rank — and the whole step, when its micro-batches' values are folded
together — takes the same q step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["group_sums", "group_dro_step"]


def group_sums(x: torch.Tensor, group_ids: torch.Tensor, num_groups: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_{g(i)=g} x_i, n_g)``, each ``[G]`` float64, over this rank's ``x`` ``[n]`` and every rank
    of the process ``group`` (one SUM all-reduce)."""
    both = torch.zeros(2, num_groups, dtype=torch.float64, device=x.device)
    ids = group_ids.to(device=x.device, dtype=torch.long)
    both[0].index_add_(0, ids, x.detach().double())
    both[1].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    if group is not None:
        dist.all_reduce(both, group=group)
    return both[0], both[1]


def group_dro_step(sums: torch.Tensor, counts: torch.Tensor, log_q: torch.Tensor, step_size: float,
                   update: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One online step from the global per-group ``sums`` and ``counts`` ``[G]``:
    ``(value, per_group_weight, group_losses, log_q_new)`` where ``per_group_weight[g] = q_g/n_g``
    (0 for an empty group) is the gradient ``∂L/∂x_i`` of each sample of group g. With
    ``update=False`` q is used as it is (evaluation)."""
    losses = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    if update:
        # log q + η·(L − max L), the same softmax as log q + η·L, but η·L never overflows and never
        # absorbs log q (η = 1e300: the prior of two tied groups is kept); a q_g = 0 stays 0
        alive = ~torch.isneginf(log_q)
        top = torch.where(alive, losses, -math.inf).max()
        z = torch.where(alive, log_q + step_size * (losses - top), -math.inf)
        log_q = torch.log_softmax(z, 0)
    q = log_q.exp()
    per_group = torch.where(counts > 0, q / counts.clamp(min=1), 0.0)
    return (q * losses).sum(), per_group, losses, log_q
