"""``torch.library`` operators of the logits path: one operator for every kernel backend.

    robalign::sequence_logps_fwd(logits, labels, seq_idx, num_seqs, ignore_index, kernel,
                                 inplace_backward) -> (logps [S] f32, counts [S] i64, lse [N] f32)
    robalign::sequence_logps_bwd(grad_logps, logits, labels, seq_idx, lse, ignore_index, kernel)
                                 -> grad_logits (the shape and dtype of logits)
    robalign::sequence_logps_bwd_inplace(...)  the same, written into ``logits``

``kernel`` names the implementation of the per-row work: ``"cpp"`` (csrc/, CPU tensors) or
``"triton"`` (robalign.kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
Both provide ``rows_lse_target`` and ``rows_softmax_grad`` over a ``[B, T, V]`` view; the small
per-sequence reductions are shared here. Autograd, ``torch.compile`` (through the fake
implementations) and FSDP see one operator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference.logps import sequence_index

__all__ = ["sequence_logps", "row_kernels"]


def row_kernels(kernel: str):
    """The module implementing ``rows_lse_target`` / ``rows_softmax_grad`` for ``kernel``."""
    if kernel == "cpp":
        from . import _cpp

        module = _cpp.load()
        if module is None:
            raise RuntimeError("robalign: the C++ CPU extension is unavailable (see the warning above)")
        return module
    if kernel == "triton":
        from . import kernels

        return kernels
    raise ValueError(f"robalign: unknown kernel {kernel!r}")


def _as_rows(t: Tensor) -> Tensor:
    """A ``[B, T, V]`` view with a contiguous last dimension (copying only if it is not)."""
    t = t if t.dim() == 3 else t.unsqueeze(0)
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("robalign::sequence_logps_fwd", mutates_args=())
def _fwd(logits: Tensor, labels: Tensor, seq_idx: Tensor, num_seqs: int, ignore_index: int, kernel: str,
         inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    lse, target = row_kernels(kernel).rows_lse_target(_as_rows(logits), labels, ignore_index)
    scored = labels.reshape(-1) != ignore_index
    token_logps = torch.where(scored, target - lse, 0.0)
    logps = torch.zeros(num_seqs, dtype=torch.float64, device=logits.device)
    logps = logps.index_add_(0, seq_idx, token_logps.double()).float()
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=logits.device).index_add_(0, seq_idx, scored.long())
    return logps, counts, lse


@_fwd.register_fake
def _(logits, labels, seq_idx, num_seqs, ignore_index, kernel, inplace_backward):
    n = labels.numel()
    return (logits.new_empty(num_seqs, dtype=torch.float32), logits.new_empty(num_seqs, dtype=torch.int64),
            logits.new_empty(n, dtype=torch.float32))


def _coeff(grad_logps: Tensor, seq_idx: Tensor) -> Tensor:
    return grad_logps.float().index_select(0, seq_idx)


@torch.library.custom_op("robalign::sequence_logps_bwd", mutates_args=())
def _bwd(grad_logps: Tensor, logits: Tensor, labels: Tensor, seq_idx: Tensor, lse: Tensor, ignore_index: int,
         kernel: str) -> Tensor:
    kernels = row_kernels(kernel)
    if kernel == "cpp":
        grad = kernels.empty_huge_like(logits)
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
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
    logits, labels, seq_idx, _, ignore_index, kernel, inplace_backward = inputs
    ctx.save_for_backward(logits, labels, seq_idx, output[2])
    ctx.ignore_index, ctx.kernel, ctx.inplace_backward = ignore_index, kernel, inplace_backward


def _backward(ctx, grad_logps, grad_counts, grad_lse):
    logits, labels, seq_idx, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        torch.ops.robalign.sequence_logps_bwd_inplace(grad_logps, logits, labels, seq_idx, lse, ctx.ignore_index,
                                                      ctx.kernel)
        grad = logits
    else:
        grad = torch.ops.robalign.sequence_logps_bwd(grad_logps, logits, labels, seq_idx, lse, ctx.ignore_index,
                                                     ctx.kernel)
    return grad, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def sequence_logps(logits: Tensor, labels: Tensor, *, ignore_index: int, cu_seqlens: Tensor | None, kernel: str,
                   inplace_backward: bool = False) -> tuple[Tensor, Tensor]:
    """Run the operator; ``(logps, counts)`` as :func:`robalign.sequence_logps`."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"robalign.sequence_logps: backend {kernel!r} takes float32/bfloat16/float16 logits, "
                        f"got {logits.dtype} (use backend='reference')")
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    logps, counts, _ = torch.ops.robalign.sequence_logps_fwd(logits, labels, seq_idx, num_seqs, ignore_index,
                                                             kernel, inplace_backward)
    return logps, counts
