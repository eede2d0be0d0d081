"""robalign.kernels — Triton GPU kernels (installed from the top-level kernels/ folder).

Each op follows one chain of names: ``_<op>_<fwd|bwd>_kernel`` (``@triton.jit``) → the launcher
(allocates, builds the grid) → the ``torch.library`` operator in :mod:`robalign.library` → the
public function in :mod:`robalign`. The functions exported here with a public op's name are
what :mod:`robalign.backends` dispatches to for ``backend="triton"``.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported); that is how the test suite checks them on machines without a GPU.
"""

from .logps import block_size, empty_grad_like, rows_lse_target, rows_softmax_grad


def sequence_logps(logits, labels, *, ignore_index=-100, cu_seqlens=None, inplace_backward=False):
    """:func:`robalign.sequence_logps` with the Triton row kernels."""
    from ..library import sequence_logps as run_op

    return run_op(logits, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens, kernel="triton",
                  inplace_backward=inplace_backward)


def sequence_logps_with_ref(logits, ref_logits, labels, *, ignore_index=-100, cu_seqlens=None,
                            inplace_backward=False):
    """:func:`robalign.sequence_logps_with_ref`: policy and reference rows in one launch."""
    from ..library import sequence_logps as run_op

    return run_op(logits, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens, kernel="triton",
                  inplace_backward=inplace_backward, ref_logits=ref_logits)


def linear_sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, cu_seqlens=None):
    """:func:`robalign.linear_sequence_logps`: chunked cuBLAS matmuls with the Triton row kernels."""
    from ..linear import linear_sequence_logps as run_op

    return run_op(hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens,
                  kernel="triton")


__all__ = ["sequence_logps", "linear_sequence_logps", "sequence_logps_with_ref", "rows_lse_target", "rows_softmax_grad",
           "empty_grad_like", "block_size"]
