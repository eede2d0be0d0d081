"""Per-token statistics of the policy for logging, what TRL's fused LM head reports beside the
log-probs: the entropy of the next-token distribution, the mean logit and whether the label is
the top-1 token (TRL's ``mean_token_accuracy``), over the scored tokens

    H_t = lse(z'_t) − Σ_v softmax(z'_t)_v · z'_{t,v}     m_t = (1/V) Σ_v z'_{t,v}     a_t = [argmax_v z'_{t,v} = y_t]

summed per sequence (``[S]``, with the scored tokens per sequence to average them), from logits or
from hidden states and the LM head (with its transform, :mod:`robalign.ops.head`) in chunks of
rows of at most ``CHUNK_BYTES`` of float32 logits, so no ``[N, V]`` tensor is made on the
hidden-state path. No gradient; float32 at least. A pass of its own (one more head matmul on the
hidden-state path), so the trainer runs it on one micro-batch per optimizer step.
"""

from __future__ import annotations

import torch

from ..ground_truth.logps import sequence_index
from .head import HeadTransform, scored_logit_chunks

__all__ = ["token_stats", "CHUNK_BYTES"]

# The float32 bytes of one chunk's logits: 2048 rows at V 128256 were 1 GB a tensor and three of
# them (logits, softmax, their product) the trainer's peak memory at an 8k-token micro-batch.
CHUNK_BYTES = 128 << 20


@torch.no_grad()
def token_stats(labels: torch.Tensor, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                ignore_index: int = -100, cu_seqlens: torch.Tensor | None = None,
                transform: HeadTransform | None = None, chunk_rows: int | None = None):
    """``(entropy_sum [S], mean_logit_sum [S], counts [S], top1_sum [S])`` of ``labels`` (``[S, T]``,
    or packed ``[N]`` with ``cu_seqlens``) under ``logits`` (``[S, T, V]`` / ``[N, V]``) or
    ``hidden`` with ``head_weight`` ``[V, H]`` (``head_bias``, ``transform``); ``top1_sum`` counts
    the scored tokens whose label is the argmax (ties: the first maximum, as ``argmax``).
    ``chunk_rows``: scored tokens a chunk, by default as many as fit ``CHUNK_BYTES`` of float32
    logits (two such tensors are alive at once: the logits and their softmax)."""
    where = "robalign.ops.token_stats"
    if chunk_rows is None:
        vocab = logits.shape[-1] if logits is not None else head_weight.shape[0]
        chunk_rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    dtype, chunks = scored_logit_chunks(where, labels, logits=logits, hidden=hidden, head_weight=head_weight,
                                        head_bias=head_bias, transform=transform, ignore_index=ignore_index,
                                        chunk_rows=chunk_rows)
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    entropy = torch.zeros(num_seqs, dtype=torch.float64, device=labels.device)
    mean_logit = torch.zeros_like(entropy)
    top1 = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device)
    flat = labels.reshape(-1)
    for index, z in chunks:
        lse = torch.logsumexp(z, -1)
        h = lse - torch.softmax(z, -1).unsqueeze(1).bmm(z.unsqueeze(2)).view(-1)   # Σ_v p·z, no [C, V] product
        entropy.index_add_(0, seq_idx[index], h.double())
        mean_logit.index_add_(0, seq_idx[index], z.mean(-1).double())
        top1.index_add_(0, seq_idx[index], (z.argmax(-1) == flat[index]).long())
    scored = flat != ignore_index
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device).index_add_(0, seq_idx, scored.long())
    return entropy.float(), mean_logit.float(), counts, top1
