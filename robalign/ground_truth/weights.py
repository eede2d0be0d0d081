"""Reference DoRA density-ratio weights (Ye et al., DoRA, arXiv 2504.05831).

The training mixture is ``P = α·Q0 + Σ_k β_k·Q_k``. A classifier trained with
``class_ratio = n_target / n_source`` gives ``p = P(target | z)``, so ``Q_k/Q0 =
class_ratio·(1 − p)/p`` and

    w(z) = Q0(z) / P(z) = 1 / (α + β·class_ratio·(1 − p)/p) = p / (α·p + β·class_ratio·(1 − p))

which lies in ``[0, 1/α]``: ``p = 0`` gives exactly 0 and ``p = 1`` gives ``1/α``.
"""

from __future__ import annotations

import torch

__all__ = ["dora_weights"]


def dora_weights(probs, alpha, beta=None, class_ratio=1.0):
    """``w = p / (α·p + β·class_ratio·(1 − p))``, β defaulting to ``1 − α``; broadcastable.

    Where the denominator vanishes (``p = 0`` with ``β·class_ratio = 0``, a mixture with no
    synthetic mass) the weight is its limit ``1/α``.
    """
    probs = torch.as_tensor(probs)
    dtype = probs.dtype if probs.is_floating_point() else torch.get_default_dtype()
    p = probs.to(dtype)
    alpha = torch.as_tensor(alpha, dtype=dtype, device=p.device)
    beta = 1 - alpha if beta is None else torch.as_tensor(beta, dtype=dtype, device=p.device)
    den = alpha * p + beta * class_ratio * (1 - p)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, p / safe_den, 1 / alpha)
