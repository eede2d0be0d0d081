"""Per-token statistics of the policy for logging, what TRL's fused LM head reports beside the
log-probs: the entropy of the next-token distribution and the mean logit, over the scored tokens

    H_t = lse(z'_t) − Σ_v softmax(z'_t)_v · z'_{t,v}        m_t = (1/V) Σ_v z'_{t,v}

summed per sequence (``[S]``, with the scored tokens per sequence to average them), from logits or
from hidden states and the LM head (with its transform, :mod:`robalign.ops.head`) in chunks of
rows, so no ``[N, V]`` tensor is made on the hidden-state path. No gradient; float32 at least. A
pass of its own (one more head matmul on the hidden-state path), so the trainer runs it on one
micro-batch per optimizer step.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from ..reference.logps import sequence_index
from .head import HeadTransform

__all__ = ["token_stats"]


@torch.no_grad()
def token_stats(labels: torch.Tensor, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                ignore_index: int = -100, cu_seqlens: torch.Tensor | None = None,
                transform: HeadTransform | None = None, chunk_rows: int = 2048):
    """``(entropy_sum [S], mean_logit_sum [S], counts [S])`` of ``labels`` (``[S, T]``, or packed
    ``[N]`` with ``cu_seqlens``) under ``logits`` (``[S, T, V]`` / ``[N, V]``) or ``hidden`` with
    ``head_weight`` ``[V, H]`` (``head_bias``, ``transform``)."""
    where = "robalign.ops.token_stats"
    if (logits is None) == (hidden is None):
        V.fail(where, "pass exactly one of `logits` or `hidden` (with `head_weight`)")
    if hidden is not None and head_weight is None:
        V.fail(where, "`hidden` needs `head_weight` (the LM head's weight, [V, H])")
    source = logits if logits is not None else hidden
    rows = source.reshape(-1, source.shape[-1])
    flat = labels.reshape(-1)
    if rows.shape[0] != flat.numel():
        V.fail(where, f"`labels` ({flat.numel()} tokens) must match the rows of the "
                      f"{'logits' if logits is not None else 'hidden states'} ({rows.shape[0]})")
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    dtype = torch.promote_types(source.dtype, torch.float32)
    entropy = torch.zeros(num_seqs, dtype=torch.float64, device=source.device)
    mean_logit = torch.zeros_like(entropy)
    scored = flat != ignore_index
    for index in scored.nonzero().squeeze(-1).split(chunk_rows):
        z = rows[index]
        if logits is None:
            z = z @ head_weight.T if head_bias is None else torch.addmm(head_bias, z, head_weight.T)
            if transform is not None:
                transform.apply_(z)
        z = z.to(dtype)
        lse = torch.logsumexp(z, -1)
        h = lse - (torch.softmax(z, -1) * z).sum(-1)
        entropy.index_add_(0, seq_idx[index], h.double())
        mean_logit.index_add_(0, seq_idx[index], z.mean(-1).double())
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=source.device).index_add_(0, seq_idx, scored.long())
    return entropy.float(), mean_logit.float(), counts
