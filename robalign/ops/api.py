"""The heavy ops: logits (or hidden states and the LM head) to per-sequence log-probabilities.

Each validates its arguments here, once, then runs the ops module of the backend chosen by
:func:`robalign.ops.registry.resolve` — the same call for every backend, the reference included.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from .. import ground_truth
from .head import HeadTransform
from .registry import resolve

__all__ = ["sequence_logps", "sequence_logps_with_ref", "linear_sequence_logps", "shift_labels"]


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probabilities.

        logps[s]  = Σ_{t ∈ s, y_t ≠ ignore_index} ( z[t, y_t] − logsumexp_v z[t, v] )
        counts[s] = |{t ∈ s : y_t ≠ ignore_index}|

    Args:
        logits: ``[S, T, V]`` padded, or ``[N, V]`` packed (with ``cu_seqlens``); float16,
            bfloat16, float32 or float64, with any strides (views such as ``logits[:, :-1]``
            are read in place when the last dimension is contiguous).
        labels: ``[S, T]`` or ``[N]`` integer tokens aligned with ``logits`` (see
            :func:`shift_labels` for Hugging Face style labels), or ``ignore_index``.
        cu_seqlens: ``[S + 1]`` int32 offsets of the packed sequences (flash-attn style).
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"`` (chunked PyTorch, any device)
            or ``"reference"``; ``None`` reads ``$ROBALIGN_BACKEND`` (default ``"auto"``).
        inplace_backward: the kernel backends write the gradient into the logits buffer
            instead of a new tensor, saving one ``[N, V]`` allocation. Safe only when nothing
            else reads these logits after the backward (true when they come straight from the
            LM head's matmul, whose backward needs its inputs, not its output); the reference
            backend ignores it.

    Returns:
        ``(logps, counts)``: ``[S]`` float32 (float64 for float64 logits), differentiable with
        respect to ``logits``; ``[S]`` int64. An all-ignored sequence gives 0 and 0, and no
        gradient.
    """
    where = "robalign.sequence_logps"
    V.check_tensor(where, "logits", logits, ndim=(2, 3), floating=True)
    V.check_tokens(where, "logits", logits, labels, cu_seqlens, "V")
    V.check_same_device(where, logits=logits, labels=labels, cu_seqlens=cu_seqlens)
    V.check_labels(where, labels, logits.shape[-1], ignore_index)
    entry = resolve(where, backend, logits)
    return entry.load_ops().sequence_logps(logits, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens,
                                           inplace_backward=inplace_backward, kernel=entry.name)


def sequence_logps_with_ref(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of the policy and, without gradient, of the reference model, on
    the same labels; the Triton backend reads both in one launch.

    Args:
        logits, ref_logits: the policy's and the reference model's logits, same shape
            (``[S, T, V]`` or packed ``[N, V]``); each may be float16, bfloat16 or float32.
        labels, ignore_index, cu_seqlens, backend, inplace_backward: as in :func:`sequence_logps`.

    Returns:
        ``(logps, ref_logps, counts)``, each ``[S]``; only ``logps`` is differentiable.
    """
    where = "robalign.sequence_logps_with_ref"
    V.check_tensor(where, "logits", logits, ndim=(2, 3), floating=True)
    V.check_tensor(where, "ref_logits", ref_logits, ndim=(2, 3), floating=True)
    if ref_logits.shape != logits.shape:
        V.fail(where, f"`ref_logits` must have the shape of `logits` {tuple(logits.shape)}, got {tuple(ref_logits.shape)}")
    V.check_tokens(where, "logits", logits, labels, cu_seqlens, "V")
    V.check_same_device(where, logits=logits, ref_logits=ref_logits, labels=labels, cu_seqlens=cu_seqlens)
    V.check_labels(where, labels, logits.shape[-1], ignore_index)
    entry = resolve(where, backend, logits)
    return entry.load_ops().sequence_logps_with_ref(logits, ref_logits, labels, ignore_index=ignore_index,
                                                    cu_seqlens=cu_seqlens, inplace_backward=inplace_backward,
                                                    kernel=entry.name)


def check_linear_inputs(where: str, hidden, weight, labels, bias, ignore_index: int, cu_seqlens) -> None:
    """The checks of :func:`linear_sequence_logps`'s tensors, each failure naming its argument."""
    V.check_tensor(where, "hidden", hidden, ndim=(2, 3), floating=True)
    V.check_tensor(where, "weight", weight, ndim=2, floating=True)
    V.check_tokens(where, "hidden", hidden, labels, cu_seqlens, "H")
    if weight.shape[0] == 0:
        V.fail(where, f"`weight` must be [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        V.fail(where, f"`weight` must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor(where, "bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            V.fail(where, f"`bias` must be [V] with V = weight.shape[0] = {weight.shape[0]}, got {tuple(bias.shape)}")
    V.check_same_device(where, hidden=hidden, weight=weight, bias=bias, labels=labels, cu_seqlens=cu_seqlens)
    V.check_labels(where, labels, weight.shape[0], ignore_index)


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    logit_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of the logits ``z = hidden @ weightᵀ + bias``, computed without
    holding the full ``[N, V]`` logits on the fused backends; with the head's logit transform
    ``z' = c·tanh(s·z/c)/T`` (``s·z/T`` without a soft-cap) when given (:mod:`robalign.ops.head`).

    Args:
        hidden: ``[S, T, H]`` or ``[N, H]`` (with ``cu_seqlens``).
        weight: ``[V, H]``, the LM head; a plain tensor (gather FSDP shards before the call).
        bias: optional ``[V]``.
        labels, ignore_index, cu_seqlens, backend: as in :func:`sequence_logps`.
        logit_scale: s, the model's logit scale (Cohere's ``logit_scale``; ``1/logits_scaling`` for Granite).
        logit_softcap: c, the soft-cap of the logits (Gemma 2/3's ``final_logit_softcapping``), ``None``: none.
        logit_temperature: T, divides the (capped) logits.

    Returns:
        ``(logps, counts)`` as :func:`sequence_logps`, differentiable with respect to
        ``hidden``, ``weight`` and ``bias``.
    """
    where = "robalign.linear_sequence_logps"
    check_linear_inputs(where, hidden, weight, labels, bias, ignore_index, cu_seqlens)
    transform = HeadTransform.checked(where, logit_scale, logit_softcap, logit_temperature)
    entry = resolve(where, backend, hidden)
    return entry.load_ops().linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                                  cu_seqlens=cu_seqlens, kernel=entry.name, transform=transform)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face style labels (``labels[b, t]`` = ``input_ids[b, t]``) to aligned labels.

        aligned[..., t] = labels[..., t + 1],   aligned[..., -1] = ignore_index

    so that ``sequence_logps(logits, shift_labels(labels))`` scores ``logits[..., t]`` (the
    prediction of token t + 1) without slicing, and so copying, the logits. Packed ``[N]``
    labels with ``cu_seqlens`` ignore the last token of every segment.
    """
    where = "robalign.shift_labels"
    V.check_tensor(where, "labels", labels, ndim=(1, 2), integer=True)
    V.check_ignore_index(where, ignore_index, None)
    if cu_seqlens is not None:
        if labels.dim() != 1:
            V.fail(where, f"with `cu_seqlens`, `labels` must be packed [N], got shape {tuple(labels.shape)}")
        V.check_cu_seqlens(where, cu_seqlens, labels.shape[0])
    return ground_truth.shift_labels(labels, ignore_index, cu_seqlens)
