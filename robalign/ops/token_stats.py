"""Per-token statistics of the policy for logging, what TRL's fused LM head reports beside the
log-probs: the entropy of the next-token distribution, the mean logit and whether the label is
the top-1 token (TRL's ``mean_token_accuracy``), over the scored tokens

    H_t = lse(z'_t) − Σ_v softmax(z'_t)_v · z'_{t,v}     m_t = (1/V) Σ_v z'_{t,v}     a_t = [argmax_v z'_{t,v} = y_t]

summed per sequence (``[S]``, with the scored tokens per sequence to average them), from logits or
from hidden states and the LM head (with its transform, :mod:`robalign.ops.head`) in chunks of
rows of at most ``CHUNK_BYTES`` of float32 logits, so no ``[N, V]`` tensor is made on the
hidden-state path. No gradient; float32 at least. A pass of its own (one more head matmul on the
hidden-state path), so the trainer runs it on one micro-batch per optimizer step. On CPU tensors
with the C++ backend, each chunk's logits stay in their dtype and one kernel reads each row once
(``rows_token_stats``: the transform, the maximum, Σ e, Σ e·z', Σ z' and the top-1 check), where
the ATen path makes four float32 ``[C, V]`` passes and a softmax tensor.
"""

from __future__ import annotations

import torch

from ..ground_truth.logps import sequence_index
from . import workspace
from .head import HeadTransform, scored_logit_chunks
from .linear import chunk_tokens
from .registry import get

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
    logits (two such tensors are alive at once: the logits and their softmax), or on the C++ path the
    one-pass loss's chunk (:func:`robalign.ops.linear.chunk_tokens`), in the workspace it keeps."""
    where = "robalign.ops.token_stats"
    source = logits if logits is not None else hidden
    rows = None if source is None else _cpp_rows(source)
    head = logits if logits is not None else head_weight
    vocab = max(1, head.shape[-1] if head is logits else head.shape[0]) if head is not None else 1
    if chunk_rows is None:                  # the C++ path: the one-pass loss's chunk, in its kept workspace
        chunk_rows = max(1, CHUNK_BYTES // (4 * vocab)) if rows is None else \
            chunk_tokens(vocab, source.element_size(), source.device)
    flat = labels.reshape(-1)
    scored = flat != ignore_index
    out = None if rows is None or hidden is None or head_weight is None else \
        workspace.kept(rows, "logits", (min(chunk_rows, int(scored.sum())), vocab), hidden.dtype, hidden.device)
    dtype, chunks = scored_logit_chunks(where, labels, logits=logits, hidden=hidden, head_weight=head_weight,
                                        head_bias=head_bias, transform=transform, ignore_index=ignore_index,
                                        chunk_rows=chunk_rows, raw=rows is not None, out=out)
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    entropy = torch.zeros(num_seqs, dtype=torch.float64, device=labels.device)
    mean_logit = torch.zeros_like(entropy)
    top1 = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device)
    f = (transform if hidden is not None and transform is not None else HeadTransform()).kernel_args  # logits: as given
    for index, z in chunks:
        if rows is not None:
            _, h, mean, hit = rows.rows_token_stats(z.unsqueeze(0), flat[index], ignore_index, **f)
        else:
            lse = torch.logsumexp(z, -1)
            h = lse - torch.softmax(z, -1).unsqueeze(1).bmm(z.unsqueeze(2)).view(-1)   # Σ_v p·z, no [C, V] product
            mean, hit = z.mean(-1), z.argmax(-1) == flat[index]
        entropy.index_add_(0, seq_idx[index], h.double())
        mean_logit.index_add_(0, seq_idx[index], mean.double())
        top1.index_add_(0, seq_idx[index], hit.long())
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device).index_add_(0, seq_idx, scored.long())
    return entropy.float(), mean_logit.float(), counts, top1


def _cpp_rows(source: torch.Tensor):
    """The C++ backend's row-kernel module for a CPU float32/bfloat16/float16 ``source``, or None
    (another device or dtype, or no extension: the ATen path)."""
    backend = get("cpp")
    if source.device.type != "cpu" or not backend.serves(source.dtype) or backend.unavailable(source.device):
        return None
    rows = backend.load_rows()
    return rows if hasattr(rows, "rows_token_stats") else None
