"""Reference KL-DRO reduction (DoRA, arXiv 2504.05831, Eq. 8; Dr.DPO, arXiv 2407.07880).

The dual of the worst case over a KL ball around the (weighted) empirical distribution:

    L = λ · log( (1/N) Σ_i exp(w_i·ℓ_i / λ) )        ∂L/∂ℓ_i = w_i · softmax_i(w·ℓ / λ)

λ → +∞ is the weighted mean ``mean(w·ℓ)``; λ > 0 up-weights hard samples; λ < 0 is a
soft minimum (Dr.DPO is λ = −β′).
"""

from __future__ import annotations

import math

import torch

__all__ = ["kl_dro", "group_dro"]


def kl_dro(losses: torch.Tensor, weights: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """``λ·log mean_i exp(w_i·ℓ_i/λ)`` over all N samples of ``losses`` ``[N]``; a scalar."""
    weighted = losses if weights is None else weights * losses
    if math.isinf(lam) and lam > 0:
        return weighted.mean()
    a = weighted / lam
    m = a.max().detach()
    # = λ·(logsumexp(a) − log N), written λ·m + λ·log1p(mean(expm1(a − m))) so that large |λ|
    # (a ≈ 0, the log ≈ 0, then times λ) does not cancel; it tends to mean(w·ℓ) as |λ| → ∞
    return lam * m + lam * torch.log1p(torch.expm1(a - m).mean())


def group_dro(losses: torch.Tensor, group_ids, q: torch.Tensor, step_size: float,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One online group-DRO step (Sagawa et al. 2020, Algorithm 1), group by group:
    ``L_g = mean_{g(i)=g} w_i·ℓ_i`` (0 for an empty group), ``q'_g ∝ q_g·exp(step_size·L_g)``,
    loss ``Σ_g q'_g·L_g`` with q' held fixed. Returns ``(loss, q')``; ``losses`` ``[N]``,
    ``group_ids`` N integers, ``q`` ``[G]``."""
    weighted = losses if weights is None else weights * losses
    ids = [int(g) for g in group_ids]
    group_losses = []
    for g in range(q.numel()):
        members = [weighted[i] for i in range(len(ids)) if ids[i] == g]
        group_losses.append(torch.stack(members).mean() if members else weighted.new_zeros(()))
    group_losses = torch.stack(group_losses)
    new_q = q * torch.exp(step_size * group_losses.detach())
    new_q = new_q / new_q.sum()
    return (new_q * group_losses).sum(), new_q
