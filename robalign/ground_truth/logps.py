"""Reference per-sequence log-probabilities: plain PyTorch, written from the equation.

    logp(s) = Σ_{t ∈ s, y_t ≠ ignore} [ z[t, y_t] − logsumexp_v z[t, v] ]

with z the logits, or ``hidden @ weightᵀ (+ bias)``. These functions materialise the full
logits (in float32, or float64 for float64 inputs) and let autograd differentiate them; they
are the ground truth every backend is tested against, not a fast path.
"""

from __future__ import annotations

import torch

__all__ = ["sequence_logps", "sequence_logps_with_ref", "linear_sequence_logps", "shift_labels", "sequence_index"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_index(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sequence id of every token of the flattened labels, and the number of sequences S.

    Padded ``labels`` ``[S, T]`` give ``t // T``; packed ``labels`` ``[N]`` with ``cu_seqlens``
    ``[S + 1]`` give the segment each token falls in.
    """
    if cu_seqlens is None:
        num_seqs, seqlen = labels.shape
        seq_idx = torch.arange(num_seqs, device=labels.device).repeat_interleave(seqlen)
        return seq_idx, num_seqs
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    num_seqs = lengths.numel()
    seq_idx = torch.arange(num_seqs, device=labels.device).repeat_interleave(lengths, output_size=labels.numel())
    return seq_idx, num_seqs


def _logps_from_logits(logits_fn, labels, ignore_index, cu_seqlens):
    """Shared body: ``logits_fn(mask)`` returns the ``[M, V]`` logits of the M scored tokens."""
    flat_labels = labels.reshape(-1).long()                            # any integer dtype
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    mask = flat_labels != ignore_index
    z = logits_fn(mask)                                               # [M, V]
    targets = flat_labels[mask]
    token_logps = z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    logps = z.new_zeros(num_seqs).index_add(0, seq_idx[mask], token_logps)
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device)
    counts = counts.index_add(0, seq_idx[mask], torch.ones_like(targets))
    return logps, counts


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probabilities.

    Args:
        logits: ``[S, T, V]`` padded, or ``[N, V]`` packed with ``cu_seqlens``.
        labels: ``[S, T]`` or ``[N]``, aligned with ``logits`` (``labels[s, t]`` is the token
            scored by ``logits[s, t]``); ``ignore_index`` marks positions that do not count.
        cu_seqlens: ``[S + 1]`` int32 segment offsets for packed input.

    Returns:
        ``(logps, counts)``: ``logps`` ``[S]`` in float32 (float64 for float64 logits) and
        ``counts`` ``[S]`` int64, the number of scored tokens. An all-ignored sequence has
        logp 0, count 0 and receives no gradient.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    dtype = _compute_dtype(logits.dtype)
    return _logps_from_logits(lambda mask: flat[mask].to(dtype), labels, ignore_index, cu_seqlens)


def sequence_logps_with_ref(logits, ref_logits, labels, ignore_index=-100, cu_seqlens=None):
    """``(logps, ref_logps, counts)``: :func:`sequence_logps` of both, the reference without gradient."""
    logps, counts = sequence_logps(logits, labels, ignore_index, cu_seqlens)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref_logits, labels, ignore_index, cu_seqlens)
    return logps, ref_logps, counts


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    logit_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of the logits ``z' = c·tanh(s·z/c)/T`` (``s·z/T`` without a soft-cap c)
    of ``z = hidden @ weightᵀ + bias``, with ``s`` = ``logit_scale``, ``c`` = ``logit_softcap``, ``T`` =
    ``logit_temperature``.

    Args:
        hidden: ``[S, T, H]`` or ``[N, H]``. weight: ``[V, H]`` (the LM head). bias: ``[V]``.

    The logits of the scored tokens are materialised in float32 (float64 for float64 inputs).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    dtype = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))

    def logits_of(mask):
        z = flat[mask].to(dtype) @ weight.to(dtype).T                   # [M, V]
        z = (z if bias is None else z + bias.to(dtype)) * logit_scale
        if logit_softcap:
            z = logit_softcap * torch.tanh(z / logit_softcap)
        return z / logit_temperature

    return _logps_from_logits(logits_of, labels, ignore_index, cu_seqlens)


def shift_labels(
    labels: torch.Tensor, ignore_index: int = -100, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Hugging Face style labels (same positions as ``input_ids``) to aligned labels.

    ``aligned[..., t] = labels[..., t + 1]`` and the last position of every sequence becomes
    ``ignore_index``, so that ``logits[..., t]`` (which predicts token ``t + 1``) is scored
    against ``aligned[..., t]`` without slicing the logits. For packed ``[N]`` labels with
    ``cu_seqlens``, the last token of every segment is ignored instead of borrowing the next
    segment's first token.
    """
    aligned = torch.full_like(labels, ignore_index)
    aligned[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        # the last token of every segment; an empty first segment (end −1) marks the extra slot N,
        # so no boolean indexing (a host synchronisation) is needed
        n = labels.shape[0]
        ends = cu_seqlens[1:].long() - 1
        is_end = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
        is_end.index_fill_(0, torch.where(ends >= 0, ends, n), True)
        aligned = aligned.masked_fill(is_end[:n], ignore_index)
    return aligned
