"""Base preference objectives, written from their papers. Each returns unreduced losses ``[B]``.

Every objective takes the same arguments so that :class:`robalign.DoRALoss` can swap them:

    logps      [B, K]  policy log-probabilities of the K candidates of each sample
    ref_logps  [B, K]  reference-model log-probabilities (objectives with a reference only)
    counts     [B, K]  scored tokens per candidate (used by length-normalised objectives)
    scores     [B, K]  candidate quality, higher is better; ``None`` means the candidates are
                       already in preference order, best first (for pairs: chosen, rejected)

For pairs, write ``Δ = (logp_c − ref_c) − (logp_r − ref_r)`` for the log-ratio margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo", "robust", "ipo", "hinge", "simpo", "plackett_luce", "rrhf", "lire", "OBJECTIVES"]


def rank_scores(scores: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The given scores, or ``−k`` for candidate k when candidates are given best first."""
    if scores is not None:
        return scores.to(like.dtype)
    k = like.shape[-1]
    return -torch.arange(k, dtype=like.dtype, device=like.device).expand_as(like)


def sort_by_scores(x: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """Reorder the candidates of every row best first (stable, so ties keep their order)."""
    if scores is None:
        return x
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return x.gather(-1, order)


def _pair_margin(logps, ref_logps, scores):
    ratios = sort_by_scores(logps - ref_logps, scores)
    return ratios[:, 0] - ratios[:, 1]


def _length_normalised(logps, counts):
    return logps / counts.clamp(min=1).to(logps.dtype)


def dpo(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """DPO, sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290), with cDPO smoothing ε:

        ℓ = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)
    """
    h = beta * _pair_margin(logps, ref_logps, scores)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def robust(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """Robust DPO for preference labels flipped with rate ε < 1/2 (Chowdhury et al. 2024,
    arXiv 2403.00409), an unbiased estimate of the clean DPO loss:

        ℓ = [(1 − ε)·(−log σ(β·Δ)) − ε·(−log σ(−β·Δ))] / (1 − 2ε)
    """
    h = beta * _pair_margin(logps, ref_logps, scores)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def ipo(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """IPO (Azar et al. 2023, arXiv 2310.12036), τ = β:  ℓ = (Δ − 1/(2β))²."""
    return (_pair_margin(logps, ref_logps, scores) - 1 / (2 * beta)) ** 2


def hinge(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """Hinge / SLiC-HF loss (Zhao et al. 2023, arXiv 2305.10425):  ℓ = max(0, 1 − β·Δ)."""
    return F.relu(1 - beta * _pair_margin(logps, ref_logps, scores))


def simpo(logps, ref_logps=None, *, counts, scores=None, beta=2.0, gamma=0.5):
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free and length-normalised:

        ℓ = −log σ( β·(logp_c/|y_c| − logp_r/|y_r|) − γ )
    """
    avg = sort_by_scores(_length_normalised(logps, counts), scores)
    return -F.logsigmoid(beta * (avg[:, 0] - avg[:, 1]) - gamma)


def plackett_luce(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """Listwise DPO under the Plackett–Luce model (Rafailov et al. 2023, Appendix A.3).

    With implicit rewards ``r_k = β·(logp_k − ref_k)`` ordered best first (by ``scores``),

        ℓ = −Σ_{j=1..K} [ r_(j) − log Σ_{l ≥ j} exp r_(l) ]

    which equals :func:`dpo` for K = 2.
    """
    r = sort_by_scores(beta * (logps - ref_logps), scores)
    tail_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    return -(r - tail_lse).sum(-1)


def rrhf(logps, ref_logps=None, *, counts, scores=None, sft_weight=1.0):
    """RRHF (Yuan et al. 2023, arXiv 2304.05302), reference-free.

    With length-normalised ``p_k = logp_k/|y_k|`` and scores ``s``:

        ℓ = Σ_{s_i < s_j} max(0, p_i − p_j)  +  sft_weight · (−p_best)

    The fine-tuning term is the best-scored response's token-mean NLL, as in the authors'
    released code (the paper's equation writes the token sum).
    """
    p = _length_normalised(logps, counts)
    s = rank_scores(scores, logps)
    worse = s[:, :, None] < s[:, None, :]                                  # [B, K, K] s_i < s_j
    rank = (F.relu(p[:, :, None] - p[:, None, :]) * worse).sum((-2, -1))
    best = s.argmax(-1, keepdim=True)
    return rank - sft_weight * p.gather(-1, best).squeeze(-1)


def lire(logps, ref_logps=None, *, counts=None, scores=None, temperature=2.0):
    """LIRE, listwise reward enhancement (Zhu et al. 2024, arXiv 2405.13516), reference-free:

        ℓ = −Σ_k softmax(logp / T)_k · softmax(scores)_k
    """
    target = torch.softmax(rank_scores(scores, logps), dim=-1)
    return -(torch.softmax(logps / temperature, dim=-1) * target).sum(-1)


# name -> (function, needs a reference model, pairwise only)
OBJECTIVES = {
    "dpo": (dpo, True, True),
    "robust": (robust, True, True),
    "ipo": (ipo, True, True),
    "hinge": (hinge, True, True),
    "simpo": (simpo, False, True),
    "plackett_luce": (plackett_luce, True, False),
    "rrhf": (rrhf, False, False),
    "lire": (lire, False, False),
}
