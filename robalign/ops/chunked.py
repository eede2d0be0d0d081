"""The ``"torch"`` backend: the heavy ops in plain PyTorch, chunked over rows, on any device.

It provides the row-kernel interface of :mod:`robalign.kernels` and :mod:`robalign.ops.cpu`
(``rows_lse_target``, ``rows_softmax_grad``, ``empty_grad_like``) with ATen operations, so the
same ``torch.library`` operators run where neither Triton nor the C++ extension does (a CUDA
machine without Triton, a CPU without a compiler, other devices). The float32 temporaries are
bounded by ``ROW_CHUNK_BYTES`` (rows of ``V`` float32 values at a time), never ``[N, V]``:

    forward   per chunk of rows:  lse = logsumexp(z'),  target = z'[y]        z' = f(float(z))
    backward  per chunk of rows:  out = coeff·(onehot(y) − exp(z' − lse))·f'(z)   (out may be z)

``f`` is the head's logit transform (``scale``, ``softcap``; the identity by default), in float32,
as in the Triton and C++ kernels.

Compared with the fused kernels it reads each chunk of logits about twice as often (the
float32 copy, then the reduction), so it is the portable fallback, not the fast path.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


__all__ = ["rows_lse_target", "rows_softmax_grad", "empty_grad_like", "ROW_CHUNK_BYTES"]

ROW_CHUNK_BYTES = 256 << 20          # float32 bytes of one chunk's temporaries


def _row_chunks(*rows3d: Tensor) -> Iterator[tuple[int, list[Tensor]]]:
    """``(first flat row, [C, V] views)`` covering the rows of same-shaped ``[B, T, V]`` views in
    order, without copying strided input: chunks cross a ``B`` boundary only where every view's
    rows are evenly spaced."""
    b, t, v = rows3d[0].shape
    per_chunk = max(1, ROW_CHUNK_BYTES // (4 * max(v, 1)))
    if b * t == 0:
        return
    if b == 1 or all(x.stride(0) == t * x.stride(1) for x in rows3d):
        flat = [x.reshape(b * t, v) for x in rows3d]
        for start in range(0, b * t, per_chunk):
            yield start, [x[start:start + per_chunk] for x in flat]
        return
    for i in range(b):
        for start in range(0, t, per_chunk):
            yield i * t + start, [x[i, start:start + per_chunk] for x in rows3d]


def _transformed(z: Tensor, scale: float, softcap: float, slope: bool = False):
    """``z'`` in float32: ``softcap·tanh(scale·z/softcap)`` (``scale·z`` without a cap); with
    ``slope``, ``(z', dz'/dz)`` (the backward's; the forward skips its ``[C, V]`` buffer)."""
    z = z.float()
    if not softcap:
        zt = z * scale if scale != 1.0 else z
        return (zt, scale) if slope else zt
    t = torch.tanh(z * (scale / softcap))
    return (t * softcap, (1.0 - t.square()).mul_(scale)) if slope else t.mul_(softcap)


def _lse_target(rows3d: Tensor, labels: Tensor, scored: Tensor, scale: float, softcap: float) -> tuple[Tensor, Tensor]:
    n = labels.numel()
    lse = torch.zeros(n, dtype=torch.float32, device=rows3d.device)
    target = torch.zeros_like(lse)
    for start, (z,) in _row_chunks(rows3d):
        end = start + z.shape[0]
        y, keep = labels[start:end], scored[start:end]
        in_range = (y >= 0) & (y < z.shape[-1])             # else NaN, never an out-of-bounds read
        z = _transformed(z, scale, softcap)
        chunk_lse = torch.logsumexp(z, dim=-1)
        chunk_target = z.gather(-1, torch.where(keep & in_range, y, 0).unsqueeze(-1)).squeeze(-1)
        lse[start:end] = torch.where(keep, chunk_lse, 0.0)
        target[start:end] = torch.where(keep, torch.where(in_range, chunk_target, float("nan")), 0.0)
    return lse, target


def rows_lse_target(logits3d: Tensor, labels: Tensor, ignore_index: int, ref3d: Tensor | None = None, *,
                    scale: float = 1.0, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """``lse[n] = logsumexp_v z'[n, v]``, ``target[n] = z'[n, y_n]`` (float32 ``[N]``, 0 for ignored
    rows; ``z'`` the transformed logits) and, with ``ref3d``, the reference model's token log-probs
    ``ref_target − ref_lse``."""
    y = labels.reshape(-1)
    scored = y != ignore_index
    lse, target = _lse_target(logits3d, y, scored, scale, softcap)
    if ref3d is None:
        return lse, target, None
    ref_lse, ref_target = _lse_target(ref3d, y, scored, scale, softcap)
    return lse, target, ref_target - ref_lse


def rows_softmax_grad(logits3d: Tensor, labels: Tensor, lse: Tensor, coeff: Tensor, ignore_index: int,
                      out3d: Tensor, *, scale: float = 1.0, softcap: float = 0.0) -> None:
    """``out[n, v] = coeff[n]·(onehot(y_n)[v] − exp(z'[n, v] − lse[n]))·dz'/dz[n, v]``, zero rows where
    ``y_n`` is ignored; ``out3d`` has the shape of ``logits3d`` and may be the same tensor."""
    y = labels.reshape(-1)
    c = torch.where(y != ignore_index, coeff.float(), 0.0)
    valid = (y >= 0) & (y < logits3d.shape[-1])
    for start, (z, out) in _row_chunks(logits3d, out3d):
        end = start + z.shape[0]
        c_chunk = c[start:end, None]
        zt, slope = _transformed(z, scale, softcap, slope=True)
        g = (zt - lse[start:end, None]).exp_().mul_(-c_chunk)
        g.scatter_add_(-1, torch.where((c_chunk != 0) & valid[start:end, None], y[start:end, None], 0),
                       torch.where(valid[start:end, None], c_chunk, float("nan")))
        if softcap or scale != 1.0:
            g.mul_(slope)
        out.copy_(g.masked_fill_(c_chunk == 0, 0.0))     # rows with no gradient are 0, even if non-finite


def empty_grad_like(logits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A buffer for a gradient or a workspace: contiguous, the shape of ``logits``, its dtype or ``dtype``."""
    return torch.empty_like(logits, dtype=dtype, memory_format=torch.contiguous_format)

