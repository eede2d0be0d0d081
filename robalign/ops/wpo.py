"""WPO's per-sequence weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
Optimization", arXiv 2406.11827, Eq. 2, in the form TRL's ``use_weighting`` computes):

    ω_s = exp( (1/|y_s|) · Σ_t [ log p(y_t) − log Σ_v p(v)² ] )
        = exp( (1/|y_s|) · Σ_t [ z_{y_t} + lse(z_t) − lse(2·z_t) ] )          [S], no gradient

over the scored tokens of each sequence (``log Σ_v p(v)²`` aligns the sampling distribution; the
weight is the probability of the response under the policy, per token, relative to it). From
logits ``[S, T, V]`` or from hidden states ``[S, T, H]`` and the LM head, in chunks of rows so that
no ``[S, T, V]`` tensor is made on the hidden-state path; float32 at least, no autograd.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from .head import HeadTransform, scored_logit_chunks

__all__ = ["wpo_weights"]


@torch.no_grad()
def wpo_weights(labels: torch.Tensor, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                ignore_index: int = -100, chunk_rows: int = 4096, transform: HeadTransform | None = None) -> torch.Tensor:
    """``ω`` ``[S]`` (float32, or float64 for float64 inputs; 1 for a sequence with no scored token) of ``labels`` ``[S, T]`` under
    ``logits`` ``[S, T, V]`` or ``hidden`` ``[S, T, H]`` with ``head_weight`` ``[V, H]`` (and
    ``head_bias`` ``[V]``, and the head's logit ``transform``, :mod:`robalign.ops.head`)."""
    where = "robalign.ops.wpo_weights"
    V.check_tensor(where, "labels", labels, ndim=2, integer=True)
    dtype, chunks = scored_logit_chunks(where, labels, logits=logits, hidden=hidden, head_weight=head_weight,
                                        head_bias=head_bias, transform=transform, ignore_index=ignore_index,
                                        chunk_rows=chunk_rows, float32_head=True)
    s, t = labels.shape
    flat_labels = labels.reshape(-1)
    aligned = torch.zeros(s * t, dtype=dtype, device=labels.device)
    for index, z in chunks:                                           # the scored rows only, in chunks
        target = z.gather(-1, flat_labels[index].unsqueeze(-1)).squeeze(-1)
        aligned[index] = target + torch.logsumexp(z, -1) - torch.logsumexp(2 * z, -1)
    per_sequence = aligned.view(s, t).sum(-1)
    counts = (flat_labels != ignore_index).view(s, t).sum(-1).clamp(min=1)
    return torch.exp(per_sequence / counts)
