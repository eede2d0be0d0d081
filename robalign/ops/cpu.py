"""The ``"cpp"`` backend: the heavy ops on CPU tensors through the C++ extension (csrc/).

It provides the same row-kernel interface as :mod:`robalign.kernels` (``rows_lse_target``,
``rows_softmax_grad``, ``empty_grad_like``), and the fused ``rows_lse_target_grad`` of the one-pass
loss, for :mod:`robalign.ops.library`. Importing this module loads (or builds once) the extension
and raises ImportError when it cannot, which :mod:`robalign.ops.registry` reports for a forced
backend and skips under "auto".
"""

from __future__ import annotations

from . import _cpp, chunked

_C = _cpp.load()
if _C is None:
    raise ImportError("the C++ extension robalign.ops._C could not be built or loaded")


def rows_lse_target(logits3d, labels, ignore_index, ref3d=None, *, scale=1.0, softcap=0.0):
    """``(lse, target, ref_token_logps or None)``, as :func:`robalign.kernels.rows_lse_target`."""
    lse, target = _C.rows_lse_target(logits3d, labels, ignore_index, scale, softcap)
    if ref3d is None:
        return lse, target, None
    ref_lse, ref_target = _C.rows_lse_target(ref3d, labels, ignore_index, scale, softcap)
    return lse, target, ref_target - ref_lse


def rows_lse_target_grad(logits3d, labels, ignore_index, out3d, *, scale=1.0, softcap=0.0):
    """``(lse, target)`` and the unit gradient into ``out3d`` in one visit of each row, as
    :func:`robalign.ops.library.rows_lse_target_grad`."""
    return _C.rows_lse_target_grad(logits3d, labels, ignore_index, out3d, scale, softcap)


rows_softmax_grad = _C.rows_softmax_grad
cols_lse_target_grad = _C.cols_lse_target_grad   # (zt [V, C] float32, labels, ignore_index, out): lse, target, ok
accumulate_ = _C.accumulate_                   # a float32 buffer += a half-precision product, one pass
gemm_into_ = _C.gemm_into_                     # (buffer, a, b, beta): float32 buffer += a @ b by MKL; False if it cannot
transpose_into_ = _C.transpose_into_           # (out [N, M], src [M, N]): out = srcᵀ, bfloat16/float16, 32 x 32 tiles
times_weight_split_ = _C.times_weight_split_   # (out, u, w, parts): out = u @ w, half precision, the reduction split
parallel_threads = _C.parallel_threads         # (n): threads at::parallel_for used; 1 means a serial build
labels_are_argmax = _C.labels_are_argmax       # (z, labels, columns): whether each label is its row's (column's) argmax
rows_token_stats = _C.rows_token_stats         # (logits3d, labels, ignore_index, scale, softcap): the logged statistics
scaled_to = _C.scaled_to                       # (float32 buffer, scale, dtype[, out]): scaled and narrowed, one pass
empty_huge = _C.empty_huge                     # (sizes, dtype): workspaces kept across calls (robalign.ops.workspace)
storage_use_count = _C.storage_use_count       # (t): holders of t's storage, for blocks recycled (robalign.ops.workspace)
empty_grad_like = chunked.empty_grad_like      # (like, dtype=None); plain pages: a gradient outlives its call

