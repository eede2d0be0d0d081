"""Triton kernels of the logits path: the same two row kernels as csrc/logps_cpu.cpp.

    _rows_lse_target_fwd_kernel   lse[n] = logsumexp_v z[n, v], target[n] = z[n, y_n]
                                  (HAS_REF: also the reference model's token log-prob)
    _rows_softmax_grad_bwd_kernel out[n, v] = coeff[n]·(onehot(y_n)[v] − exp(z[n, v] − lse[n]))

Both take the LM head's logit transform (:mod:`robalign.ops.head`), applied in float32 to each
element as it is loaded: z' = cap·tanh(scale·z/cap), or scale·z without a cap (``TRANSFORM`` 2 or 1;
0, the identity, reads the logits as they are). The forward's lse and target are those of z', the
backward's gradient is with respect to the raw z: ``coeff·(onehot − softmax(z'))·dz'/dz`` with
``dz'/dz = scale·(1 − tanh²)``. So the fused linear path hands the kernels its raw chunk of logits
and no ``[C, V]`` pass or buffer is spent on the transform.

Rows are addressed through a ``[B, T, V]`` view with a contiguous last dimension and free
leading strides (row n is (n // T, n % T)), so padded, packed and strided inputs are read in
place. Labels are ``[N]`` contiguous integers, label n at ``p_labels + n``: the op boundary
(``robalign.ops.library.flat_labels``) hands every backend that form, whatever the caller's. One program handles one row, sweeping the vocabulary in blocks of ``BLOCK_V`` with an
online logsumexp in float32. Ignored rows are not read: the forward's loop runs zero times for
them, the backward stores zeros without loading.

Compilation: ``T`` (the token count) is not specialised, so new batch shapes reuse the compiled
kernel. The strides are: Triton then knows when every row starts on a 16-element boundary and
issues 16-byte vector loads and stores (on an H100 that took the bfloat16 backward from 3.26 to
2.8 ms at 16384 × 128256, and the in-place one from 5.5 ms). A stride has three classes
(1, a multiple of 16, other), so a shape change compiles at most once per class, never per T.

Bytes per token (V-wide rows of b bytes each element): forward reads the row once (V·b), the
backward reads it once more and writes the gradient once (2·V·b); the saved state is one
float32 LSE (4 bytes). The floor of forward+backward is 3·V·b bytes a token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rows_lse_target", "rows_softmax_grad", "empty_grad_like", "block_size"]

MAX_BLOCK_V = 4096


def block_size(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` by rule: the next power of two of V, capped, and a warp ladder."""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    warps = 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 2048 else 8
    return block, warps


@triton.jit
def _cast_rtne(x, dtype: tl.constexpr):
    """float32 → ``dtype`` rounding to nearest even. For bfloat16 the rounding is done on the bits,
    so the result is the same compiled on a GPU and under the interpreter (whose own float32 →
    bfloat16 cast truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh in float32 from ``exp`` alone (the interpreter has no libdevice), to a few ulp: below
    |x| = 0.3 its odd Taylor polynomial to x¹¹ (the first omitted term is < 2e-9 relative there),
    above it (1 − e)/(1 + e) with e = exp(−2|x|), where 1 − e > 0.45 cancels nothing."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835
                                                                                 + x2 * (-1382.0 / 155925))))))
    t = tl.where(a < 0.3, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _transform(b_z, scale, cap_in, cap, TRANSFORM: tl.constexpr):
    """``(z', dz'/dz)`` of the head's transform: ``cap·tanh(cap_in·z)`` (cap_in = scale/cap) for
    ``TRANSFORM`` 2, ``scale·z`` for 1 (callers skip it for 0, the identity)."""
    if TRANSFORM == 2:
        t = _tanh(b_z * cap_in)
        return cap * t, scale * (1.0 - t * t)
    else:
        return scale * b_z, scale


@triton.jit
def _row_lse_target(p_row, label, scored, V, scale, cap_in, cap, BLOCK_V: tl.constexpr, TRANSFORM: tl.constexpr):
    """Online logsumexp of one (transformed) row and its label logit, in float32; ``(0, 0)`` when
    not scored (the loop then runs zero times: the row is not read)."""
    v_end = tl.where(scored, V, 0)
    b_max = -float("inf")
    b_sum = 0.0
    for v0 in range(0, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        b_z = tl.load(p_row + o_v, mask=o_v < V, other=-float("inf")).to(tl.float32)   # [BV]
        if TRANSFORM != 0:                                  # the lanes past V stay -inf
            b_zt, _ = _transform(b_z, scale, cap_in, cap, TRANSFORM)
            b_z = tl.where(o_v < V, b_zt, -float("inf"))
        new_max = tl.maximum(b_max, tl.max(b_z, axis=0))
        # an infinite running maximum (a block all -inf, or a +inf logit) is no shift: exp(-inf - -inf)
        # would be NaN; with the shift 0 a -inf block adds 0 and a +inf logit makes the sum +inf
        shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
        b_sum = b_sum * tl.exp(b_max - shift) + tl.sum(tl.exp(b_z - shift), axis=0)
        b_max = new_max
    b_lse = b_max + tl.log(tl.where(scored, b_sum, 1.0))
    # the row's limit, as torch.logsumexp: NaN if any logit is NaN, else +inf with a +inf logit
    b_lse = tl.where(b_sum != b_sum, float("nan"), tl.where(b_max == float("inf"), float("inf"), b_lse))
    b_lse = tl.where(scored, b_lse, 0.0)
    # a label outside [0, V) (queued as an error by a lazy value check) is never read: NaN
    in_range = (label >= 0) & (label < V)
    b_target = tl.load(p_row + tl.where(scored & in_range, label, 0), mask=scored & in_range, other=0.0)
    b_target = b_target.to(tl.float32)
    if TRANSFORM != 0:
        b_target, _ = _transform(b_target, scale, cap_in, cap, TRANSFORM)
    b_target = tl.where(scored & ~in_range, float("nan"), b_target)
    return b_lse, b_target


@triton.heuristics({"HAS_REF": lambda args: args["p_ref"] is not None})
@triton.jit(do_not_specialize=["T", "ignore_index"])
def _rows_lse_target_fwd_kernel(
    p_logits, p_ref, p_labels, p_lse, p_target, p_ref_logp,
    T, V, stride_b, stride_t, ref_stride_b, ref_stride_t, ignore_index, scale, cap_in, cap,
    BLOCK_V: tl.constexpr, HAS_REF: tl.constexpr, TRANSFORM: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b, i_t = i_n // T, i_n % T
    label = tl.load(p_labels + i_n).to(tl.int64)
    scored = label != ignore_index
    b_lse, b_target = _row_lse_target(p_logits + i_b * stride_b + i_t * stride_t, label, scored, V, scale, cap_in, cap,
                                      BLOCK_V, TRANSFORM)
    tl.store(p_lse + i_n, b_lse)
    tl.store(p_target + i_n, b_target)
    if HAS_REF:
        r_lse, r_target = _row_lse_target(p_ref + i_b * ref_stride_b + i_t * ref_stride_t, label, scored, V, scale,
                                          cap_in, cap, BLOCK_V, TRANSFORM)
        tl.store(p_ref_logp + i_n, r_target - r_lse)


@triton.jit(do_not_specialize=["T", "ignore_index"])
def _rows_softmax_grad_bwd_kernel(
    p_logits, p_labels, p_lse, p_coeff, p_out,
    T, V, stride_b, stride_t, out_stride_b, out_stride_t, ignore_index, scale, cap_in, cap,
    BLOCK_V: tl.constexpr, TRANSFORM: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b, i_t = i_n // T, i_n % T
    p_row = p_logits + i_b * stride_b + i_t * stride_t
    p_out_row = p_out + i_b * out_stride_b + i_t * out_stride_t
    label = tl.load(p_labels + i_n).to(tl.int64)
    g = tl.where(label != ignore_index, tl.load(p_coeff + i_n), 0.0)
    b_lse = tl.load(p_lse + i_n)
    v_read = tl.where(g != 0.0, V, 0)                      # rows with no gradient are not read
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=o_v < v_read, other=-float("inf")).to(tl.float32)  # [BV]
        if TRANSFORM == 0:
            b_grad = g * (tl.where(o_v == label, 1.0, 0.0) - tl.exp(b_z - b_lse))
        else:                                               # masked lanes: z' finite or -inf, slope finite
            b_zt, b_slope = _transform(b_z, scale, cap_in, cap, TRANSFORM)
            b_grad = g * (tl.where(o_v == label, 1.0, 0.0) - tl.exp(b_zt - b_lse)) * b_slope
        tl.store(p_out_row + o_v, _cast_rtne(b_grad, p_out.dtype.element_ty), mask=m_v)


def _transform_args(scale: float, softcap: float) -> dict:
    """The kernels' transform arguments: ``TRANSFORM`` 2 (a soft-cap), 1 (a scale) or 0 (identity)."""
    kind = 2 if softcap else 1 if scale != 1.0 else 0
    return dict(scale=float(scale), cap_in=float(scale / softcap) if softcap else 0.0, cap=float(softcap),
                TRANSFORM=kind)


def rows_lse_target(logits3d: torch.Tensor, labels: torch.Tensor, ignore_index: int, ref3d=None, *,
                    scale: float = 1.0, softcap: float = 0.0):
    """``(lse [N], target [N], ref_token_logps [N] or None)`` in float32 for the ``[B, T, V]``
    view ``logits3d`` transformed by ``z' = softcap·tanh(scale·z/softcap)`` (``scale·z`` for
    ``softcap`` 0); with ``ref3d`` (a view of the same shape, the same transform) the reference
    model's token log-probs come from the same launch (0 on ignored rows)."""
    b, t, v = logits3d.shape
    n = b * t
    new = lambda: torch.empty(n, dtype=torch.float32, device=logits3d.device)
    lse, target, ref_logp = new(), new(), None if ref3d is None else new()
    if n == 0:
        return lse, target, ref_logp
    block, warps = block_size(v)
    ref_strides = (0, 0) if ref3d is None else (ref3d.stride(0), ref3d.stride(1))
    _rows_lse_target_fwd_kernel[(n,)](
        logits3d, ref3d, labels, lse, target, ref_logp, t, v, logits3d.stride(0), logits3d.stride(1),
        *ref_strides, ignore_index, **_transform_args(scale, softcap), BLOCK_V=block, num_warps=warps)
    return lse, target, ref_logp


def rows_softmax_grad(logits3d, labels, lse, coeff, ignore_index: int, out3d, *, scale: float = 1.0,
                      softcap: float = 0.0) -> None:
    """Write ``coeff·(onehot − softmax(z'))·dz'/dz`` (the transform as in :func:`rows_lse_target`)
    into ``out3d`` (may be ``logits3d`` itself)."""
    b, t, v = logits3d.shape
    n = b * t
    if n == 0:
        return
    block, warps = block_size(v)
    _rows_softmax_grad_bwd_kernel[(n,)](
        logits3d, labels, lse, coeff.float().contiguous(), out3d, t, v,
        logits3d.stride(0), logits3d.stride(1), out3d.stride(0), out3d.stride(1), ignore_index,
        **_transform_args(scale, softcap), BLOCK_V=block, num_warps=warps)


def empty_grad_like(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A buffer for a gradient or a workspace: contiguous, the shape of ``logits``, its dtype or ``dtype``."""
    return torch.empty(logits.shape, dtype=dtype or logits.dtype, device=logits.device)
