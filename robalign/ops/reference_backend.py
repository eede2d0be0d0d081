"""The ``"reference"`` backend: :mod:`robalign.ground_truth` behind the ops signature every backend
shares (:mod:`robalign.ops.registry`). It materialises logits in float32 (float64 for float64
inputs) and lets autograd differentiate them: any device, any float dtype, not fast.
``inplace_backward`` and ``kernel`` do not apply and are ignored."""

from __future__ import annotations

from .. import ground_truth

__all__ = ["sequence_logps", "sequence_logps_with_ref", "linear_sequence_logps"]


def sequence_logps(logits, labels, *, ignore_index, cu_seqlens, inplace_backward=False, kernel="reference"):
    return ground_truth.sequence_logps(logits, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens)


def sequence_logps_with_ref(logits, ref_logits, labels, *, ignore_index, cu_seqlens, inplace_backward=False,
                            kernel="reference"):
    return ground_truth.sequence_logps_with_ref(logits, ref_logits, labels, ignore_index=ignore_index,
                                             cu_seqlens=cu_seqlens)


def linear_sequence_logps(hidden, weight, labels, *, bias, ignore_index, cu_seqlens, kernel="reference",
                          transform=None):
    return ground_truth.linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                           cu_seqlens=cu_seqlens, **({} if transform is None else transform.kwargs))
