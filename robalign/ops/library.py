"""``torch.library`` operators of the logits path: one operator for every kernel backend.

    robalign::sequence_logps_fwd(logits, labels, seq_idx, num_seqs, ignore_index, kernel,
                                 inplace_backward, ref_logits?)
        -> (logps [S] f32, counts [S] i64, lse [N] f32, ref_logps [S] f32, or [0] without ref_logits)
    robalign::sequence_logps_bwd(grad_logps, logits, labels, seq_idx, lse, ignore_index, kernel)
                                 -> grad_logits (the shape and dtype of logits)
    robalign::sequence_logps_bwd_inplace(...)  the same, written into ``logits``

``kernel`` names the backend whose row kernels do the per-row work (its registry entry,
:mod:`robalign.ops.registry`): ``"cpp"`` (robalign.ops.cpu over csrc/, CPU tensors),
``"triton"`` (robalign.kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
``"torch"`` (robalign.ops.chunked: ATen operations, any device). Each provides
``rows_lse_target``, ``rows_softmax_grad`` and ``empty_grad_like`` over ``[B, T, V]`` views; the
small per-sequence reductions are shared here.
The reference model's log-probs (``ref_logits``) carry no gradient. Autograd, ``torch.compile`` (through the fake
implementations) and FSDP see one operator.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ground_truth.logps import sequence_index
from .registry import get

__all__ = ["sequence_logps", "sequence_logps_with_ref", "row_kernels", "rows_lse_target_grad", "labels_are_argmax",
           "check_kernel_dtypes", "flat_labels"]


def row_kernels(kernel: str):
    """The module implementing ``rows_lse_target`` / ``rows_softmax_grad`` for backend ``kernel``."""
    return get(kernel).load_rows()


def rows_lse_target_grad(rows, logits3d: Tensor, labels: Tensor, ignore_index: int, out3d: Tensor, *,
                         scale: float = 1.0, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(lse [N], target [N])`` of each row of the ``[B, T, V]`` view and, into ``out3d`` (which may
    be the logits), the unit gradient ``(onehot(y) − softmax(z'))·f'(z)`` (0 on ignored rows): the
    one-pass loss's chunk step. The row-kernel module ``rows``' own fused kernel where it has one
    (the C++ backend: one read of each row, one exponential per logit), else its
    ``rows_lse_target`` then ``rows_softmax_grad`` with a coefficient of 1."""
    fused = getattr(rows, "rows_lse_target_grad", None)
    if fused is not None:
        return fused(logits3d, labels, ignore_index, out3d, scale=scale, softcap=softcap)
    lse, target, _ = rows.rows_lse_target(logits3d, labels, ignore_index, scale=scale, softcap=softcap)
    rows.rows_softmax_grad(logits3d, labels, lse, torch.ones_like(lse), ignore_index, out3d, scale=scale,
                           softcap=softcap)
    return lse, target


def labels_are_argmax(rows, z: Tensor, labels: Tensor, *, columns: bool = False) -> Tensor:
    """``[C]`` bool: whether each token's label is ``argmax`` of its logits (the first maximum; NaN the
    largest), ``z`` ``[C, V]``, or ``[V, C]`` with ``columns``. The row-kernel module ``rows``' own
    kernel where it has one (the C++ backend: one read of the chunk; ATen's argmax takes 4–20× as long
    on CPU), else ``argmax``."""
    fused = getattr(rows, "labels_are_argmax", None)
    if fused is not None and z.device.type == "cpu":
        return fused(z, labels, columns)
    return z.argmax(0 if columns else 1) == labels


def _as_rows(t: Tensor) -> Tensor:
    """A ``[B, T, V]`` view with a contiguous last dimension (copying only if it is not)."""
    t = t if t.dim() == 3 else t.unsqueeze(0)
    return t if t.stride(-1) == 1 else t.contiguous()


def check_kernel_dtypes(where: str, kernel: str, **tensors: Tensor | None) -> None:
    """Each tensor is in a dtype backend ``kernel`` serves (its registry entry); else an error naming it."""
    entry = get(kernel)
    for name, t in tensors.items():
        if t is not None and not entry.serves(t.dtype):
            raise TypeError(f"{where}: backend {kernel!r} takes float32/bfloat16/float16 `{name}`, got {t.dtype} "
                            "(use backend='reference')")


def flat_labels(labels: Tensor) -> Tensor:
    """``[N]`` contiguous int64 labels, what every row kernel reads: any integer dtype and any strides
    are taken at the op boundary, once (a no-op for contiguous int64 labels)."""
    return labels.reshape(-1).to(torch.int64).contiguous()


def per_sequence(token_values: Tensor, seq_idx: Tensor, num_seqs: int) -> Tensor:
    """Σ over each sequence's tokens, accumulated in float64, returned in float32."""
    out = torch.zeros(num_seqs, dtype=torch.float64, device=token_values.device)
    return out.index_add_(0, seq_idx, token_values.double()).float()


@torch.library.custom_op("robalign::sequence_logps_fwd", mutates_args=())
def _fwd(logits: Tensor, labels: Tensor, seq_idx: Tensor, num_seqs: int, ignore_index: int, kernel: str,
         inplace_backward: bool, ref_logits: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ref_rows = None if ref_logits is None else _as_rows(ref_logits)
    lse, target, ref_token = row_kernels(kernel).rows_lse_target(_as_rows(logits), labels, ignore_index, ref_rows)
    scored = labels.reshape(-1) != ignore_index
    logps = per_sequence(torch.where(scored, target - lse, 0.0), seq_idx, num_seqs)
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=logits.device).index_add_(0, seq_idx, scored.long())
    ref_logps = logps.new_empty(0) if ref_token is None else \
        per_sequence(torch.where(scored, ref_token, 0.0), seq_idx, num_seqs)
    return logps, counts, lse, ref_logps


@_fwd.register_fake
def _(logits, labels, seq_idx, num_seqs, ignore_index, kernel, inplace_backward, ref_logits):
    n = labels.numel()
    return (logits.new_empty(num_seqs, dtype=torch.float32), logits.new_empty(num_seqs, dtype=torch.int64),
            logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(0 if ref_logits is None else num_seqs, dtype=torch.float32))


def _coeff(grad_logps: Tensor, seq_idx: Tensor) -> Tensor:
    return grad_logps.float().index_select(0, seq_idx)


@torch.library.custom_op("robalign::sequence_logps_bwd", mutates_args=())
def _bwd(grad_logps: Tensor, logits: Tensor, labels: Tensor, seq_idx: Tensor, lse: Tensor, ignore_index: int,
         kernel: str) -> Tensor:
    kernels = row_kernels(kernel)
    grad = kernels.empty_grad_like(logits)
    kernels.rows_softmax_grad(_as_rows(logits), labels, lse, _coeff(grad_logps, seq_idx), ignore_index,
                              _as_rows(grad))
    return grad


@_bwd.register_fake
def _(grad_logps, logits, labels, seq_idx, lse, ignore_index, kernel):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("robalign::sequence_logps_bwd_inplace", mutates_args=("logits",))
def _bwd_inplace(grad_logps: Tensor, logits: Tensor, labels: Tensor, seq_idx: Tensor, lse: Tensor,
                 ignore_index: int, kernel: str) -> None:
    rows = logits if logits.dim() == 3 else logits.unsqueeze(0)
    if rows.stride(-1) != 1:
        raise ValueError("robalign.sequence_logps: inplace_backward needs logits with a contiguous last dimension")
    row_kernels(kernel).rows_softmax_grad(rows, labels, lse, _coeff(grad_logps, seq_idx), ignore_index, rows)


@_bwd_inplace.register_fake
def _(grad_logps, logits, labels, seq_idx, lse, ignore_index, kernel):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, seq_idx, _, ignore_index, kernel, inplace_backward, _ = inputs
    ctx.save_for_backward(logits, labels, seq_idx, output[2])
    ctx.ignore_index, ctx.kernel, ctx.inplace_backward = ignore_index, kernel, inplace_backward


def _backward(ctx, grad_logps, grad_counts, grad_lse, grad_ref_logps):
    logits, labels, seq_idx, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        torch.ops.robalign.sequence_logps_bwd_inplace(grad_logps, logits, labels, seq_idx, lse, ctx.ignore_index,
                                                      ctx.kernel)
        grad = logits
    else:
        grad = torch.ops.robalign.sequence_logps_bwd(grad_logps, logits, labels, seq_idx, lse, ctx.ignore_index,
                                                     ctx.kernel)
    return grad, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _run(logits: Tensor, labels: Tensor, ignore_index: int, cu_seqlens: Tensor | None, kernel: str,
         inplace_backward: bool, ref_logits: Tensor | None):
    """Run the operator with ``kernel``'s row kernels: ``(logps, counts)`` as
    :func:`robalign.sequence_logps`, or ``(logps, ref_logps, counts)`` with ``ref_logits``."""
    check_kernel_dtypes("robalign.sequence_logps", kernel, logits=logits, ref_logits=ref_logits)
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    labels = flat_labels(labels)
    logps, counts, _, ref_logps = torch.ops.robalign.sequence_logps_fwd(
        logits, labels, seq_idx, num_seqs, ignore_index, kernel, inplace_backward,
        None if ref_logits is None else ref_logits.detach())
    return (logps, counts) if ref_logits is None else (logps, ref_logps.detach(), counts)


def sequence_logps(logits: Tensor, labels: Tensor, *, ignore_index: int, cu_seqlens: Tensor | None,
                   inplace_backward: bool = False, kernel: str) -> tuple[Tensor, Tensor]:
    """:func:`robalign.sequence_logps` with ``kernel``'s row kernels."""
    return _run(logits, labels, ignore_index, cu_seqlens, kernel, inplace_backward, None)


def sequence_logps_with_ref(logits: Tensor, ref_logits: Tensor, labels: Tensor, *, ignore_index: int,
                            cu_seqlens: Tensor | None, inplace_backward: bool = False, kernel: str):
    """:func:`robalign.sequence_logps_with_ref`: both in one pass, the reference without gradient."""
    return _run(logits, labels, ignore_index, cu_seqlens, kernel, inplace_backward, ref_logits)
