"""The one-pass fused loss: from hidden states and the LM head, per-sequence log-probs, the
preference objective, the DoRA weights, the KL-DRO exponents **and** the gradients of hidden,
head and bias, in one forward with three matmul passes.

For each chunk of whole groups (the K candidates of a prompt are in one chunk; chunks hold at
most ``chunk`` scored tokens, see :func:`robalign.ops.linear.chunk_tokens`):

    z      = h_c · Wᵀ (+ b)                                   [C, V]   one chunk of logits alive
    lse, z'_y = row kernel(f(z))    logp_s = Σ_t (z'_y − lse)  (float64 sums, float32 result)
                                   (f: the head's transform, :mod:`robalign.ops.head`, in the kernel)
    ℓ_i, ∂ℓ_i/∂logp_s              the objective on the chunk's [b, K] log-probs, by torch.func (any
                                   registered objective, no hand-written derivative)
    a_i    = w_i·ℓ_i/λ             (0 for λ = ∞);   m ← max(m, max_i a_i)
    c_s    = w_i·e^{a_i − m}·∂ℓ_i/∂logp_s              per sequence, then per token
    z      ← c_t·(onehot(y_t) − softmax(f(z_t)))·f'(z_t)    row kernel, in place: z is now G
    grad_h[c] = G·W;   grad_W ← e^{m_old − m}·grad_W + Gᵀ·h_c;   grad_b likewise

When the running maximum m grows, what is already in ``grad_W``/``grad_b`` is rescaled inside the
next ``addmm`` (its ``beta``) — or at the end, when no chunk with scored tokens follows — and the
``grad_h`` rows of earlier chunks once each at the end. The result is the unnormalised gradient
``Σ_i w_i·e^{a_i − shift}·∇ℓ_i`` with ``shift`` the final m: the caller (:mod:`robalign.losses`)
turns it into the exact gradient of the DRO loss over the whole batch, every micro-batch and every
rank with one scalar ``e^{shift − M}/S`` (M, S the global maximum and Σ e^{a − M}); the backward
only multiplies by the incoming gradient. Where grad_W is formed in the head's dtype on CPU (float32,
or bfloat16 in one chunk), the last chunk's ``Gᵀ·h`` is left to the backward, which adds it with that
scalar as the GEMM's ``alpha`` and ``beta`` instead of a pass over ``[V, H]`` (:func:`_defers`).

A group with more scored tokens than ``chunk`` is processed in sub-chunks: their log-probs in a
first pass, then their logits again for the gradient — one extra logits matmul for that group only.

The row kernels are the backend's (``kernel``: ``"cpp"``, ``"triton"``, ``"torch"``). A float32 head
on CPU with the C++ backend and the identity transform forms each chunk by columns, ``zᵀ = W·hᵀ``
``[V, C]``, with the C++ column kernel: MKL's float32 GEMM runs that layout faster (:func:`_by_columns`).
A bfloat16 chunk stays by rows; its logits are formed a block of vocabulary columns at a time
(:func:`robalign.ops.head.head_logits`) and its head gradient's product, where formed in bfloat16, from a
transposed copy of ``U`` (:func:`_addmm_head`): oneDNN runs both faster so.
``grad_W`` (and ``grad_b``) accumulate in float32 for bfloat16/float16 heads unless ``fp32_grad_weight`` is
False (then in the head's dtype, one rounding per chunk, as Liger-Kernel does). Each chunk's product
is summed and added in float32 by one GEMM where the BLAS has one (cuBLAS's ``out_dtype``; on CPU
MKL's bf16bf16f32, through the C++ backend), else formed in the head's dtype and then added. For a
bfloat16 head on CPU where every token fits one chunk, one GEMM forms grad_W in bfloat16: its
float32 sum rounded once — with the scale, where the backward forms it. The host reads the
per-group token counts once and the running maximum once a chunk (a CPU-side branch decides the
rescaling); the objective's derivatives run on ``[b, K]`` tensors.

With ``token_stats`` the call also gives the per-token statistics the trainer logs (TRL's entropy,
mean logit and top-1 accuracy, :func:`robalign.ops.token_stats.token_stats`) without a pass of their
own, where a linear head forms ``grad_h`` (no soft-cap, no bias: :func:`_folds_stats`):

    H_t = lse'_t − Σ_v p_v·z'_v = (lse'_t − z'_y) + h_t·(U·W)_t   (U·W = s·(W_y − p·W), grad_h's product)
    m_t = (1/V)·Σ_v z'_v = s·h_t·w̄,   w̄ = (1/V)·Σ_v W_v            (s the transform's scale, z' = s·z)
    a_t = [argmax_v z_t = y_t]        read from each chunk's logits before the kernel overwrites them

Registered as ``robalign::linear_dora_loss`` (a fake implementation gives the shapes, so
``torch.compile`` sees one opaque operator).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..ground_truth.logps import sequence_index
from ..ground_truth.objectives import OBJECTIVES
from .library import check_kernel_dtypes, flat_labels, labels_are_argmax, row_kernels, rows_lse_target_grad
from .head import HeadTransform, head_logits
from . import workspace
from .linear import chunk_tokens

__all__ = ["linear_dora_loss", "fused_dora_loss", "FormedGradient", "plan_chunks", "plan_tokens", "default_chunk"]


def plan_chunks(group_tokens: list[int], chunk: int) -> list[tuple[int, int]]:
    """``[g0, g1)`` ranges of consecutive groups whose scored tokens fit ``chunk``, balanced: a
    range closes once it holds the even share ``⌈total / ⌈total / chunk⌉⌉`` (3072 tokens at a
    2048-token chunk are two chunks of 1536, not 2048 + 1024: the BLAS runs a small chunk's matmuls
    at a lower rate). A group larger than ``chunk`` is a range of its own (processed in sub-chunks)."""
    total = sum(group_tokens)
    share = -(-total // max(1, -(-total // chunk))) if total else chunk
    ranges, start, tokens = [], 0, 0
    for g, n in enumerate(group_tokens):
        if g > start and (tokens + n > chunk or tokens >= share):
            ranges.append((start, g))
            start, tokens = g, 0
        tokens += n
    if start < len(group_tokens):
        ranges.append((start, len(group_tokens)))
    return ranges


def _pieces(tokens: int, chunk: int) -> list[tuple[int, int]]:
    """``[p0, p1)`` ranges splitting ``tokens`` into the fewest pieces of at most ``chunk``, of
    equal size (±1): 896 tokens at a 442-token chunk are 298 + 299 + 299, not 442 + 442 + 12."""
    if tokens == 0:
        return [(0, 0)]
    n = -(-tokens // chunk)
    bounds = [tokens * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _objective_grad(objective: str, hparams: dict, logps: Tensor, ref: Optional[Tensor], counts: Tensor,
                    scores: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(ℓ [b], ∂ℓ_i/∂logps [b, K])`` of a registered objective on one chunk's groups. ℓ_i depends
    only on row i, so the gradient of Σℓ is the per-row derivative.

    An operator's implementation runs below autograd (its dispatch keys excluded, thread-locally),
    so the derivative is torch.func's. Under torch.compile the op runs inside dispatch modes that
    refuse torch.func's wrapper tensors; there (only there, so that eager runs stay on one thread)
    it is taken by autograd on a helper thread, whose dispatch state is fresh, on the caller's CUDA
    stream."""
    fn = OBJECTIVES[objective].fn

    def total(lp):
        losses = fn(lp, ref, counts=counts, scores=scores, **hparams)
        return losses.sum(), losses

    try:
        grad, losses = torch.func.grad(total, has_aux=True)(logps)
        return losses.detach(), grad
    except RuntimeError:
        stream = torch.cuda.current_stream(logps.device) if logps.is_cuda else None
        return _helper().submit(_objective_grad_here, objective, hparams, logps, ref, counts, scores, stream).result()


def _objective_grad_here(objective, hparams, logps, ref, counts, scores, stream):
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(), torch.enable_grad():
        lp = logps.detach().requires_grad_(True)
        losses = OBJECTIVES[objective].fn(lp, ref, counts=counts, scores=scores, **hparams)
        (grad,) = torch.autograd.grad(losses.sum(), lp)
    return losses.detach(), grad


@functools.lru_cache(maxsize=None)
def _helper() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="robalign-objective")


def _dead_rows_zeroed(u: Tensor, c: Tensor, lse: Tensor) -> Tensor:
    """``U`` with 0 on the rows whose coefficient is 0 and whose logsumexp is not finite: such a
    row's unit gradient holds NaN (an infinite logit), which ``0·NaN`` would carry into the
    products, while its true gradient is 0 (the rows of a zero-weight sample)."""
    dead = (c == 0) & ~torch.isfinite(lse)
    if bool(dead.any()):
        u.masked_fill_(dead[:, None], 0.0)
    return u


def _float32_buffer(dtype: torch.dtype, fp32_grad_weight: bool) -> bool:
    """Whether chunks add a head's gradient into a float32 buffer (a half-precision head's, by default)."""
    return fp32_grad_weight and dtype in (torch.bfloat16, torch.float16)


def _one_gemm_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether one GEMM may form a call's whole head gradient in the head's dtype, unscaled, when the
    call is one chunk: a bfloat16 head on CPU (float32's range; float16's is too narrow)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def _grad_weight_dtype(weight: Tensor, fp32_grad_weight: bool, tokens: int, chunk: int) -> torch.dtype:
    """grad_W's dtype while chunks add into it: float32 for a half-precision head unless
    ``fp32_grad_weight`` is False — or for a bfloat16 head on CPU where the call's ``tokens`` (those
    its plan counts, :func:`plan_tokens`: an argument of the operator, so the fake decides the same)
    fit one ``chunk``: one GEMM then forms the whole gradient, accumulating in float32 and rounding
    once — after the scaling where the backward forms it (:func:`_defers`), before it under
    torch.compile (a float32 buffer is rounded once, after scaling). Not for float16, whose range an
    unscaled sum may leave."""
    one_product = _one_gemm_on_cpu(weight.dtype, weight.device) and tokens <= chunk
    if _float32_buffer(weight.dtype, fp32_grad_weight) and not one_product:
        return torch.float32
    return weight.dtype


def plan_tokens(hidden: Tensor, labels: Tensor, ignore_index: int) -> int:
    """The tokens a call's chunk plan counts (:func:`default_chunk`, :func:`_grad_weight_dtype`): its
    scored tokens on CPU in eager mode, where counting them is one pass over the labels; else all its
    tokens, scored or not — a static number, as torch.compile's fake needs, and on a GPU no wait for
    the device (whose chunk rule has no one-chunk room either)."""
    total = hidden.numel() // hidden.shape[-1]
    if hidden.device.type != "cpu" or torch.compiler.is_compiling():
        return total
    return int((labels != ignore_index).sum())


def default_chunk(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                  fp32_grad_weight: bool = True) -> int:
    """The one-pass loss's chunk for a call of ``tokens`` (those its plan counts, :func:`plan_tokens`)
    through a ``[V, H]`` head: :func:`robalign.ops.linear.chunk_tokens`, where on CPU a bfloat16
    head's spare room is grad_W's float32 ``[V, H]`` buffer — the logits of ``2H`` tokens — which
    several chunks hold and one chunk does without (its one GEMM forms grad_W in bfloat16,
    :func:`_grad_weight_dtype`). At V 256000, H 512, bfloat16: 1048 tokens a chunk, and calls of up
    to 2072 scored tokens in one."""
    element_size = torch.finfo(dtype).bits // 8
    room = _float32_buffer(dtype, fp32_grad_weight) and _one_gemm_on_cpu(dtype, device)
    spare = vocab * hidden_size * 4 if room else 0
    return chunk_tokens(vocab, element_size, device, tokens=tokens, spare_bytes=spare)


_OUT_DTYPE_MM: dict[str, bool] = {}


def _chunk_logits(h_chunk: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor,
                  by_columns: bool = False) -> Tensor:
    """``h_chunk·Wᵀ (+ b)`` written into ``out`` (the chunk's rows of the logits workspace), or with
    ``by_columns`` its transpose ``W·h_chunkᵀ (+ b)`` ``[V, C]``."""
    if not by_columns:
        return head_logits(h_chunk, weight, bias, out=out)
    if bias is None:
        return torch.mm(weight, h_chunk.T, out=out)
    return torch.addmm(bias.unsqueeze(1), weight, h_chunk.T, out=out)


# oneDNN's AMX GEMM for bfloat16/float16 ``U·W`` (a long reduction over V into H columns) runs on one of
# this CPU's two threads from 384 to 1407 rows where H ≤ 768: at V 32000, H 512, 15.7 / 26.2 / 34.1 ms
# whole at 384 / 768 / 1024 rows, 9.2 / 17.1 / 22.4 in pieces of at most 320 rows, 7.6 / 14.3 / 18.1
# with the reduction split between the threads (the row-kernel module's ``times_weight_split_``); whole
# from 1408 rows on, and at H ≥ 896 at any row count, it runs on both (docs/benchmarks.md). MKL's
# float32 GEMM has no such gap.
_HALF_SLOW_ROWS = (384, 1408)
_HALF_SLOW_MAX_WIDTH = 768
_HALF_PIECE_ROWS = 320
_SPLIT_MIN_REDUCTION = 2048                     # V per thread's share, at least


def _by_columns(rows, weight: Tensor, transform: HeadTransform) -> bool:
    """Whether chunks form their logits transposed, ``zᵀ = W·hᵀ`` ``[V, C]``: for a float32 head on CPU
    under the identity transform, with a row-kernel module that has ``cols_lse_target_grad`` (the C++
    backend's). MKL's float32 GEMM forms ``W·hᵀ`` faster than ``h·Wᵀ`` in the chunk sizes a call has,
    and the gradient's products take ``Uᵀ`` as it is (docs/benchmarks.md)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and transform.identity and \
        hasattr(rows, "cols_lse_target_grad")


def _chunk_by_columns(rows, h_p: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, ignore_index: int,
                      buffer: Tensor, hits: Optional[Tensor] = None):
    """``(Uᵀ [V, C], lse [C], target [C])`` of one chunk formed transposed in ``buffer``'s memory, or
    three Nones where the column kernel does not apply (an ignored or out-of-range label, a column
    whose maximum is not finite): the caller then forms the chunk by rows, whose kernels give those
    limits. ``hits`` ``[C]``: filled with whether each label is its column's argmax, from the logits."""
    zt = buffer.view(-1)[:weight.shape[0] * h_p.shape[0]].view(weight.shape[0], h_p.shape[0])
    _chunk_logits(h_p, weight, bias, zt, by_columns=True)
    if hits is not None:
        hits.copy_(labels_are_argmax(rows, zt, y, columns=True))
    lse, target, ok = rows.cols_lse_target_grad(zt, y, ignore_index, zt)
    return (zt, lse, target) if ok else (None, None, None)


def _times_weight(u: Tensor, weight: Tensor, out: Optional[Tensor] = None, rows=None) -> Tensor:
    """``U·W`` ``[C, H]`` (into ``out`` where given). For a half-precision chunk on CPU of
    ``_HALF_SLOW_ROWS`` rows and a head of at most ``_HALF_SLOW_MAX_WIDTH`` columns, the reduction over
    V split between torch's threads by the row-kernel module ``rows``' ``times_weight_split_`` (the C++
    backend's: each thread's share a GEMM of its own, the shares added in float32, returned in float32
    without ``out``), or without one in equal pieces of at most ``_HALF_PIECE_ROWS`` rows (each output
    row is the same dot products)."""
    n, vocab = u.shape
    if u.device.type != "cpu" or u.dtype not in (torch.bfloat16, torch.float16) or \
            not _HALF_SLOW_ROWS[0] <= n < _HALF_SLOW_ROWS[1] or weight.shape[1] > _HALF_SLOW_MAX_WIDTH:
        return torch.mm(u, weight, out=out)
    split = getattr(rows, "times_weight_split_", None)
    parts = min(torch.get_num_threads(), vocab // _SPLIT_MIN_REDUCTION)
    if split is not None and parts > 1:
        if out is None:
            out = u.new_empty(n, weight.shape[1], dtype=torch.float32)
        split(out, u, weight, parts)
        return out
    if out is None:
        out = u.new_empty(n, weight.shape[1])
    for r0, r1 in _pieces(n, _HALF_PIECE_ROWS):
        torch.mm(u[r0:r1], weight, out=out[r0:r1])
    return out


# grad_W's per-chunk product is formed and added in tiles of about this many elements (16 MB in
# bfloat16), each added while it is still in cache: at V 151936, H 896, 1024 tokens, 188 ms against
# 237 for the whole [V, H] product then one pass over it (docs/benchmarks.md)
_TILE_ELEMENTS = 8 << 20


# oneDNN's bfloat16 GEMM forms Uᵀ·(c ⊙ h), Uᵀ a transposed view of the row-major chunk, slower than from a
# contiguous Uᵀ by more than a transposed copy costs (a block of V rows at a time), from about 768 tokens:
# the whole one-pass loss 3–4 % faster at 768 tokens and V 128256 or 151936, 4–16 % at 1536–2048 tokens;
# at V 32000 no change below 1024 tokens (docs/kernels.md)
_TRANSPOSE_MIN_TOKENS = 768
_TRANSPOSE_BLOCK_ELEMENTS = 4 << 20            # one block of Uᵀ: 8 MB of bfloat16


def _addmm_head(out: Tensor, ut: Tensor, hc: Tensor, beta: float, alpha: float, rows) -> Tensor:
    """``out ← beta·out + alpha·Uᵀ·(c ⊙ h)`` in ``out``'s dtype (``beta`` 0 ignores what ``out`` holds),
    ``ut`` ``[V, C]`` the head gradient's operand: the transposed view of a row-major chunk, or a
    contiguous one (the float32 column layout). For a bfloat16 chunk on CPU of at least
    ``_TRANSPOSE_MIN_TOKENS`` tokens laid out by rows, each block of V rows of ``Uᵀ`` is first copied
    contiguous into a kept workspace (the row-kernel module ``rows``' ``transpose_into_``, the C++
    backend's), then multiplied: the same float32 sums over C, rounded once, into ``out``'s rows."""
    transpose = getattr(rows, "transpose_into_", None)
    vocab, tokens = ut.shape
    if transpose is None or out.device.type != "cpu" or ut.dtype != torch.bfloat16 or out.dtype != ut.dtype or \
            ut.stride(0) != 1 or tokens < _TRANSPOSE_MIN_TOKENS:
        return torch.addmm(out, ut, hc, beta=beta, alpha=alpha, out=out)
    block = max(32, _TRANSPOSE_BLOCK_ELEMENTS // tokens // 32 * 32)
    scratch = workspace.kept(rows, "transposed", (min(block, vocab), tokens), ut.dtype, out.device)
    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        transpose(scratch[:v1 - v0], ut[v0:v1].T)
        torch.addmm(out[v0:v1], scratch[:v1 - v0], hc, beta=beta, alpha=alpha, out=out[v0:v1])
    return out


def _accumulate(buffer: Tensor, a: Tensor, b: Tensor, beta: float, rows, product: list) -> None:
    """``buffer ← beta·buffer + a·b``. When ``buffer`` is wider than the inputs (a half-precision
    head's float32 gradient), the product is accumulated and added in ``buffer``'s dtype by one GEMM
    where one exists: cuBLAS's ``out_dtype``, or on CPU the row-kernel module ``rows``' ``gemm_into_``
    (the C++ backend's: MKL's bf16bf16f32 GEMM, at V 32000, H 512, 384 tokens 6.2 ms against 11.2 for
    the bfloat16 product added in tiles, docs/benchmarks.md). Else the product is formed in the
    inputs' dtype, then added: by ``rows``' ``accumulate_`` where it has one, in row tiles of about
    ``_TILE_ELEMENTS`` through a tile workspace kept in ``product`` for the next chunk."""
    if buffer.dtype == a.dtype:
        _addmm_head(buffer, a, b, beta, 1.0, rows)
        return
    device = buffer.device.type
    if _OUT_DTYPE_MM.get(device, True):
        try:
            torch.addmm(buffer, a, b, beta=beta, out_dtype=buffer.dtype, out=buffer)
            _OUT_DTYPE_MM[device] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[device] = False
    gemm_into = getattr(rows, "gemm_into_", None)
    if gemm_into is not None and gemm_into(buffer, a, b, beta):
        return
    fused = getattr(rows, "accumulate_", None)
    if fused is not None:
        n, width = buffer.shape
        tile = min(n, max(64, _TILE_ELEMENTS // width // 64 * 64))
        if not product:
            product.append(workspace.kept(rows, "product", (tile, width), a.dtype, buffer.device))
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            fused(buffer[r0:r1], torch.mm(a[r0:r1], b, out=product[0][:r1 - r0]), beta)
        return
    if beta == 0.0:
        buffer.zero_()                  # what was there may be uninitialised memory
    elif beta != 1.0:
        buffer.mul_(beta)
    buffer.add_(a @ b)


def _defers(asked: bool, weight: Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether the call leaves its last chunk's grad_W product to the backward (``asked``: by
    :func:`fused_dora_loss` in eager mode): on CPU, where grad_W is formed in the head's dtype, float32
    or bfloat16. The backward knows the scale ``s`` (κ times the incoming gradient) and forms
    ``grad_W = s·β·grad_W + s·Uᵀ·(c ⊙ h)`` with one ``addmm`` whose ``alpha`` and ``beta`` carry it,
    where the scale was one more pass over the ``[V, H]`` gradient: 64 MB in float32 at V 32000,
    H 512, about 5 % of a 512-token call. A bfloat16 gradient is then rounded once, from the GEMM's
    float32 sum times ``s``, not once before the scaling and once after (at V 32000, H 512, 384
    tokens: 1.7e-3 against 2.4e-3 relative to float64). The chunk's ``Uᵀ`` stays in the logits
    workspace, lent to the backward (:func:`robalign.ops.workspace.lend`)."""
    return asked and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and \
        acc_dtype == weight.dtype


def _folds_stats(asked: bool, need_hidden: bool, bias: Optional[Tensor], softcap: float) -> bool:
    """Whether the call forms the logged token statistics itself (``asked``): from the ``U·W`` product of
    ``grad_h`` (so ``need_hidden``), under a linear transform (no soft-cap: ``Σ_v p_v·z'_v`` is then
    ``z'_y − h·(U·W)``), without a bias (which would add ``U·b``, a pass over the chunk). Otherwise the
    caller takes them in a pass of their own (:func:`robalign.ops.token_stats.token_stats`)."""
    return asked and need_hidden and bias is None and softcap == 0.0


# the product a call left to its backward: (Uᵀ, c ⊙ h, beta, alpha, the row-kernel module, the workspace's
# loan), taken by fused_dora_loss right after the operator returns, on the same thread
_DEFERRED = threading.local()


@torch.library.custom_op("robalign::linear_dora_loss", mutates_args=())
def _linear_dora_loss(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, seq_idx: Tensor, num_seqs: int,
        ref_logps: Optional[Tensor], sample_weights: Tensor, scores: Optional[Tensor], objective: str,
        hparam_names: str, hparam_values: list[float], group_size: int, lam: float, ignore_index: int, kernel: str,
        chunk: int, planned: int, need_hidden: bool, need_weight: bool, need_bias: bool, fp32_grad_weight: bool,
        logit_scale: float, softcap: float, temperature: float, defer_weight: bool, token_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = row_kernels(kernel)
    transform = HeadTransform(logit_scale, softcap, temperature)
    f = transform.kernel_args
    columns = _by_columns(rows, weight, transform)
    hparams = dict(zip(hparam_names.split(",") if hparam_names else [], hparam_values))
    k = group_size
    num_groups = num_seqs // k
    device = hidden.device
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels
    scored = y != ignore_index
    idx = scored.nonzero().squeeze(1)                                   # ascending, so by sequence
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=device).index_add_(0, seq_idx, scored.long())
    tok_seq = seq_idx.index_select(0, idx)
    group_tokens = counts.view(num_groups, k).sum(1).tolist()           # the one read of sizes
    token_start = [0]
    for n in group_tokens:
        token_start.append(token_start[-1] + n)

    logps64 = torch.zeros(num_seqs, dtype=torch.float64, device=device)
    losses = torch.zeros(num_groups, dtype=torch.float32, device=device)
    acc_dtype = _grad_weight_dtype(weight, fp32_grad_weight, planned, chunk)
    grad_h = torch.zeros_like(h) if need_hidden else h.new_empty(0)
    # written by the first chunk's addmm with beta = 0 (which ignores what is there), zeroed if none. The
    # head's gradient itself: in the block of the last call's once the caller dropped it, where
    # fused_dora_loss allows it; a float32 buffer for a half-precision head is dropped in the backward, so
    # it is fresh, on plain pages (robalign.ops.workspace)
    if not need_weight:
        grad_w = weight.new_empty(0)
    elif acc_dtype == weight.dtype and getattr(_RECYCLING, "on", False):
        grad_w = workspace.recycled(rows, "grad_weight", weight.shape, acc_dtype, device)
    else:
        grad_w = torch.empty(weight.shape, dtype=acc_dtype, device=device)
    has_bias = need_bias and bias is not None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if has_bias else weight.new_empty(0)
    w_all = sample_weights.float()
    mean = math.isinf(lam) and lam > 0
    m = -math.inf if not mean else 0.0
    accumulated = False                                                 # grad_w / grad_b hold something
    pending = 1.0                                                       # their rescaling not yet applied
    rescale_h: list[tuple[Tensor, float]] = []                          # (token rows, m when written)
    # one [C, V] workspace for every chunk's logits (then its unit gradient), allocated once
    plan = plan_chunks(group_tokens, chunk)
    # the last chunk with scored tokens leaves its grad_W product to the backward (see _defers)
    defer = _defers(defer_weight and need_weight, weight, acc_dtype)
    last_scored = max((i for i, (g0, g1) in enumerate(plan) if token_start[g1] > token_start[g0]), default=-1)
    deferred = None                                                     # (Uᵀ, c ⊙ h, beta)
    widest = max([p1 - p0 for g0, g1 in plan for p0, p1 in _pieces(token_start[g1] - token_start[g0], chunk)],
                 default=0)
    logits_buffer = workspace.kept(rows, "logits", (widest, weight.shape[0]), weight.dtype, device)
    product = []                                                        # grad_W's per-chunk product, if needed
    fold = _folds_stats(token_stats, need_hidden, bias, softcap)        # the logged token statistics
    if fold:
        entropy64 = torch.zeros(num_seqs, dtype=torch.float64, device=device)
        mean_logit64 = torch.zeros_like(entropy64)
        top1 = torch.zeros(num_seqs, dtype=torch.int64, device=device)
        mean_row = _mean_row(rows, weight)

    for i_chunk, (g0, g1) in enumerate(plan):
        t0, t1 = token_start[g0], token_start[g1]
        s0, s1 = g0 * k, g1 * k
        i_c = idx[t0:t1]
        y_c = y.index_select(0, i_c)
        pieces = _pieces(t1 - t0, chunk)
        kept = kept_h = None                                            # the chunk's logits and rows, one piece
        lse_c = torch.empty(t1 - t0, dtype=torch.float32, device=device)
        if fold:                                                        # lse' − z'_y, and the top-1 checks
            nll_c = torch.empty(t1 - t0, dtype=torch.float32, device=device)
            hit_c = torch.zeros(t1 - t0, dtype=torch.bool, device=device)
        for p0, p1 in pieces:
            if p1 == p0:
                continue
            h_p = h.index_select(0, i_c[p0:p1])
            kept_t = None
            if columns and len(pieces) == 1:                            # [V, C]: zᵀ becomes Uᵀ, in place
                kept_t, lse_p, target_p = _chunk_by_columns(rows, h_p, weight, bias, y_c, ignore_index, logits_buffer,
                                                            hit_c if fold else None)
            if kept_t is not None:                                      # U as a [C, V] view: the products
                kept, kept_h = kept_t.T, h_p                            # below take either layout
            else:
                z = _chunk_logits(h_p, weight, bias, logits_buffer[:p1 - p0])
                if fold:
                    hit_c[p0:p1] = labels_are_argmax(rows, z, y_c[p0:p1])
                if len(pieces) == 1:                                    # z becomes U, in place
                    lse_p, target_p = rows_lse_target_grad(rows, z.unsqueeze(0), y_c, ignore_index, z.unsqueeze(0),
                                                           **f)
                    kept, kept_h = z, h_p
                else:
                    lse_p, target_p, _ = rows.rows_lse_target(z.unsqueeze(0), y_c[p0:p1], ignore_index, **f)
                del z
            lse_c[p0:p1] = lse_p
            token_logps = target_p - lse_p
            if fold:
                nll_c[p0:p1] = token_logps.neg()
            logps64.index_add_(0, tok_seq[t0 + p0:t0 + p1], token_logps.double())
            del h_p
        lp = logps64[s0:s1].float().view(-1, k)
        ref = None if ref_logps is None else ref_logps[s0:s1].float().view(-1, k)
        sc = None if scores is None else scores[s0:s1].view(-1, k)
        loss_c, dl = _objective_grad(objective, hparams, lp, ref, counts[s0:s1].view(-1, k), sc)
        losses[g0:g1] = loss_c
        w_c = w_all[g0:g1]
        if mean:
            coeff_g = w_c
        else:
            a = (w_c * loss_c).double() / lam                          # in float64: λ may be 1e-200
            chunk_max = a.max().item() if a.numel() else -math.inf
            new_m = chunk_max if (math.isnan(chunk_max) or chunk_max > m) else m
            coeff_g = (w_c.double() * torch.exp(a - new_m)).float()
        if not mean and new_m != m:
            pending *= math.exp(m - new_m)                              # applied by the next addmm
            m = new_m
        if t1 == t0:                                                    # no scored token: no gradient
            continue
        beta = pending if accumulated else 0.0
        coeff_tok = (coeff_g[:, None] * dl).reshape(-1).index_select(0, tok_seq[t0:t1] - s0)
        for p0, p1 in pieces:
            i_p = i_c[p0:p1]
            h_p = kept_h if kept_h is not None else h.index_select(0, i_p)
            if kept is not None:
                u = kept
            else:                                                       # a sub-chunk: its logits again
                u = _chunk_logits(h_p, weight, bias, logits_buffer[:p1 - p0])
                rows.rows_softmax_grad(u.unsqueeze(0), y_c[p0:p1], lse_c[p0:p1], torch.ones(p1 - p0, device=device),
                                       ignore_index, u.unsqueeze(0), **f)
            kept = kept_h = None
            c = coeff_tok[p0:p1]
            u = _dead_rows_zeroed(u, c, lse_c[p0:p1])
            if need_hidden:                                             # G·W = c ⊙ (U·W)
                uw = _times_weight(u, weight, rows=rows)
                if fold:
                    _add_token_stats((entropy64, mean_logit64, top1), tok_seq[t0 + p0:t0 + p1], h_p, uw,
                                     nll_c[p0:p1], hit_c[p0:p1], mean_row, f["scale"])
                grad_h.index_copy_(0, i_p, uw.mul(c[:, None]).to(h.dtype))
                rescale_h.append((i_p, m))
            if need_weight:                                             # Gᵀ·h = Uᵀ·(c ⊙ h)
                hc = h_p.mul(c[:, None]).to(h_p.dtype)
                if defer and i_chunk == last_scored and len(pieces) == 1:
                    deferred = (u.T, hc, beta)
                else:
                    _accumulate(grad_w, u.T, hc, beta, rows, product)
            if has_bias:                                                # Σ_t G[t] = Uᵀ·c
                if beta != 1.0:
                    grad_b.mul_(beta)
                grad_b.add_(torch.mv(u.T, c.to(u.dtype)))
            beta, pending = 1.0, 1.0
            accumulated = True
            del u, h_p

    if need_weight and not accumulated:
        grad_w.zero_()
    late = pending if accumulated else 1.0      # the maximum grew after the last chunk with tokens
    if late != 1.0:
        if need_weight and deferred is None:
            grad_w.mul_(late)
        if has_bias:
            grad_b.mul_(late)
    if need_hidden:
        for rows_i, m_i in rescale_h:
            if m_i != m:
                grad_h.index_copy_(0, rows_i, grad_h.index_select(0, rows_i) * math.exp(m_i - m))
    if deferred is not None:                    # grad_W = late·(beta·grad_W + Uᵀ·(c ⊙ h)), in the backward
        ut, hc, beta = deferred
        _DEFERRED.product = (ut, hc, late * beta, late, rows, workspace.lend("logits"))
    shift = torch.tensor(m if math.isfinite(m) else 0.0, dtype=torch.float64, device=device)
    grad_h = grad_h.reshape(hidden.shape) if need_hidden else grad_h
    stats = (entropy64.float(), mean_logit64.float(), top1) if fold else tuple(h.new_empty(0) for _ in range(3))
    return logps64.float(), counts, losses, shift, grad_h, grad_w, grad_b, *stats


def _mean_row(rows, weight: Tensor) -> Tensor:
    """``w̄ = Σ_v W_v / V``, float32 ``[H]``. A half-precision head on CPU goes through the row-kernel
    module's ``gemm_into_`` (MKL's bf16bf16f32 GEMM, ``1ᵀ·W``: one read of the head, float32 sums), where
    ATen's ``sum(dtype=float32)`` converts the head first: 14 against 160 ms at V 151936, H 896."""
    vocab = max(1, weight.shape[0])
    gemm_into = getattr(rows, "gemm_into_", None)
    if gemm_into is not None and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(1, weight.shape[1], dtype=torch.float32)
        if gemm_into(out, weight.new_ones(1, weight.shape[0]), weight, 0.0):
            return out[0].div_(vocab)
    return weight.sum(0, dtype=torch.float32).div_(vocab)


def _add_token_stats(sums: tuple[Tensor, Tensor, Tensor], seq: Tensor, h: Tensor, uw: Tensor, nll: Tensor,
                     hit: Tensor, mean_row: Tensor, scale: float) -> None:
    """Add one piece's token statistics into the per-sequence ``sums`` (entropy, mean logit, top-1):
    ``H_t = (lse'_t − z'_y) + h_t·(U·W)_t`` and ``m_t = s·h_t·w̄`` (the module's docstring), by the
    tokens' sequences ``seq``; ``h`` ``[C, H]``, ``uw`` ``[C, H]`` the unscaled ``U·W``."""
    entropy, mean_logit, top1 = sums
    hf = h.float()
    entropy.index_add_(0, seq, (nll + (hf * uw.float()).sum(1)).double())
    mean_logit.index_add_(0, seq, (hf @ mean_row).mul_(scale).double())
    top1.index_add_(0, seq, hit.long())


@_linear_dora_loss.register_fake
def _(hidden, weight, bias, labels, seq_idx, num_seqs, ref_logps, sample_weights, scores, objective, hparam_names,
      hparam_values, group_size, lam, ignore_index, kernel, chunk, planned, need_hidden, need_weight, need_bias,
      fp32_grad_weight, logit_scale, softcap, temperature, defer_weight, token_stats):
    new = hidden.new_empty
    fold = _folds_stats(token_stats, need_hidden, bias, softcap)
    stats = (new(num_seqs, dtype=torch.float32), new(num_seqs, dtype=torch.float32),
             new(num_seqs, dtype=torch.int64)) if fold else tuple(new(0) for _ in range(3))
    return (new(num_seqs, dtype=torch.float32), new(num_seqs, dtype=torch.int64),
            new(num_seqs // group_size, dtype=torch.float32), new((), dtype=torch.float64),
            torch.empty_like(hidden) if need_hidden else new(0),
            weight.new_empty(weight.shape, dtype=_grad_weight_dtype(weight, fp32_grad_weight, planned, chunk))
            if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0], dtype=torch.float32) if (need_bias and bias is not None)
            else weight.new_empty(0), *stats)


def linear_dora_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None, ignore_index: int,
                     cu_seqlens: Tensor | None, ref_logps: Tensor | None, sample_weights: Tensor,
                     scores: Tensor | None, objective: str, hparams: dict, group_size: int, lam: float, kernel: str,
                     need: tuple[bool, bool, bool], fp32_grad_weight: bool = True, chunk: int | None = None,
                     transform: HeadTransform = HeadTransform(), defer_weight: bool = False,
                     token_stats: bool = False):
    """Run the operator on validated inputs (:class:`robalign.DoRALoss` validates them).

    Returns ``(logps [S], counts [S], losses [B], shift, grad_hidden, grad_weight, grad_bias)``: the
    gradients are ``Σ_i w_i·e^{a_i − shift}·∇ℓ_i`` (``a_i = w_i·ℓ_i/λ``, 0 for λ = ∞), empty where
    ``need`` (hidden, weight, bias) is False; ``grad_weight`` is float32 for a half-precision head
    with ``fp32_grad_weight`` (bfloat16 for a bfloat16 head on CPU whose call is one chunk),
    ``grad_bias`` always float32 (the caller casts after scaling). Under ``torch.autocast`` the inputs are cast to the
    autocast dtype first, as ``F.linear`` would. ``defer_weight`` (:func:`fused_dora_loss`'s, see
    :func:`_defers`): ``grad_weight`` may then lack its last chunk's product, left to the backward.
    ``token_stats``: a last result, ``(entropy [S], mean_logit [S], counts [S], top1 [S])`` summed per
    sequence as :func:`robalign.ops.token_stats.token_stats` gives them, where the call forms them
    (:func:`_folds_stats`), else None.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_kernel_dtypes("robalign.DoRALoss", kernel, hidden=hidden, head_weight=weight, head_bias=bias)
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    planned = plan_tokens(hidden, labels, ignore_index)
    if chunk is None:
        chunk = default_chunk(planned, weight.shape[0], weight.shape[1], hidden.dtype, hidden.device, fp32_grad_weight)
    names = sorted(hparams)
    with torch.autocast(device_type, enabled=False), torch.no_grad():
        *out, entropy, mean_logit, top1 = torch.ops.robalign.linear_dora_loss(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach(), flat_labels(labels), seq_idx,
            num_seqs, None if ref_logps is None else ref_logps.detach().float(), sample_weights.detach().float(),
            None if scores is None else scores.detach(), objective, ",".join(names),
            [float(hparams[n]) for n in names], group_size, float(lam), ignore_index, kernel, chunk, planned, *need,
            fp32_grad_weight, *transform.args, defer_weight, token_stats)
    folded = _folds_stats(token_stats, need[0], bias, transform.softcap)
    return (*out, (entropy, mean_logit, out[1], top1) if folded else None)


def fused_dora_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, scale, bias: Tensor | None = None,
                    **op_kwargs):
    """The one-pass loss as a differentiable scalar: :func:`linear_dora_loss` (``op_kwargs``: its
    keyword arguments), then ``scale(logps, losses, shift) → (value, κ)`` — the reduction's value of
    the per-sample losses and the scalar κ of the gradient formed ahead of it (see
    :meth:`robalign.losses.reductions.Reduction.gradient_scale`). Returns ``(loss, logps [S],
    counts [S], losses [B], stats)``, ``stats`` the token statistics where ``token_stats`` asked for
    them and the call forms them (:func:`linear_dora_loss`), else None; ``loss.backward()`` hands
    ``hidden``, ``weight`` and ``bias`` their gradients formed in the forward, times κ
    (:class:`FormedGradient`)."""
    rows = row_kernels(op_kwargs["kernel"])
    recycle = _may_recycle(hidden, weight, rows)
    _RECYCLING.on = recycle
    _DEFERRED.product = None
    try:
        logps, counts, losses, shift, grad_h, grad_w, grad_b, stats = linear_dora_loss(
            hidden, weight, labels, bias=bias, defer_weight=not torch.compiler.is_compiling(), **op_kwargs)
    finally:
        _RECYCLING.on = False
        deferred, _DEFERRED.product = _DEFERRED.product, None
    value, kappa = scale(logps, losses, shift)
    narrow = getattr(rows, "scaled_to", None)
    loss = FormedGradient.apply(value.float(), kappa, grad_h, grad_w, grad_b, hidden, weight, bias, narrow,
                                rows if recycle else None, deferred)
    return loss, logps, counts, losses, stats


# whether the running call may form the head gradient in a recycled block (set by fused_dora_loss)
_RECYCLING = threading.local()


def _may_recycle(hidden: Tensor, weight: Tensor, rows) -> bool:
    """Whether the head gradient may go into a recycled block (robalign.ops.workspace.recycled): where
    ``rows`` can recycle at all, in eager mode, for a head that requires grad and that the graph
    behind ``hidden`` (walked only then) does not use too — a tied input embedding. Autograd adds
    that other gradient into the head's in place only where nothing else holds the block, and the
    block kept for reuse does; a tied head's gradient is then formed in a fresh block, as every
    gradient was before blocks were recycled."""
    if torch.compiler.is_compiling() or not weight.requires_grad or not workspace.recycles(rows, weight.device):
        return False
    seen, stack = set(), [hidden.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is weight:
            return False
        stack.extend(f for f, _ in node.next_functions)
    return True


class FormedGradient(torch.autograd.Function):
    """The one-pass loss as an autograd node: ``value`` forward; backward hands each input its
    gradient formed in the forward, times ``κ`` and the incoming scalar (in place: once). ``narrow``
    (the C++ backend's ``scaled_to``, or None) scales a float32 or half-precision gradient of a
    half-precision input in float32 and rounds it to that dtype in one pass, as ``float().mul_``
    then ``to`` would in three; a head gradient narrowed from float32 goes into a recycled block
    (:func:`robalign.ops.workspace.recycled`), as the head gradient formed in its own dtype is. Such
    a block is kept for the next call only when autograd takes it as the head's ``.grad`` as it is;
    one it will add into an existing ``.grad``, or copy, is dropped inside this backward and is
    forgotten, so that it is freed there, not held through the rest of it. ``deferred``: the head
    gradient's last product, ``(Uᵀ, c ⊙ h, β, α, rows, loan)``, which this backward adds with the scale
    ``s`` in one ``addmm`` (:func:`_addmm_head`): ``grad_W ← s·β·grad_W + s·α·Uᵀ·(c ⊙ h)``
    (:func:`_defers`), then gives the workspace holding ``Uᵀ`` back (:func:`robalign.ops.workspace.give_back`)."""

    @staticmethod
    def forward(ctx, value, kappa, grad_h, grad_w, grad_b, hidden, weight, bias, narrow=None, recycle=None,
                deferred=None):
        ctx.formed = (kappa, grad_h, grad_w, grad_b)
        ctx.deferred = deferred
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        ctx.narrow = narrow
        ctx.recycle = recycle
        ctx.weight = None if torch.compiler.is_compiling() else weakref.ref(weight)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.formed is None:
            raise RuntimeError("robalign.DoRALoss: the one-pass loss holds its gradients once; to backward twice "
                               "build the loss with LossParams(one_pass=False)")
        kappa, *grads = ctx.formed
        deferred, ctx.deferred = ctx.deferred, None
        compiling = torch.compiler.is_compiling()     # dynamo traces this body, maybe more than once,
        if not compiling:                              # and takes ATen's ops, not the C++ narrowing
            ctx.formed = None
        needs = ctx.needs_input_grad[5:]
        scale = (grad_out.double() * kappa).float()               # scaled in float32, rounded once
        out = []
        for i, (grad, need, dtype) in enumerate(zip(grads, needs, ctx.dtypes)):
            if not need:
                out.append(None)
                continue
            if i == 1 and deferred is not None:                     # the scale in the last product
                ut, hc, beta, alpha, rows, _ = deferred
                s = float(scale)
                out.append(_addmm_head(grad, ut, hc, s * beta, s * alpha, rows))
                continue
            if ctx.narrow is not None and not compiling and grad.dtype in (torch.float32, dtype) and \
                    dtype in (torch.bfloat16, torch.float16) and grad.device.type == "cpu" and grad.is_contiguous():
                into = None                                            # in place when grad is in dtype
                if i == 1 and grad.dtype != dtype and ctx.recycle is not None:   # the head's, from float32
                    into = workspace.recycled(ctx.recycle, "grad_weight_narrowed", grad.shape, dtype, grad.device)
                out.append(ctx.narrow(grad, float(scale), dtype, into))
                continue
            out.append((grad.mul_(scale) if grad.dtype == torch.float32 else grad.float().mul_(scale)).to(dtype))
        if deferred is not None:
            workspace.give_back("logits", deferred[-1])
        if not compiling:                       # a recycled block dropped inside this backward is not kept
            returned = out[1]
            taken = returned is not None and _taken_as_grad(ctx.weight)
            for block in (grads[1], returned):
                if block is not None and not (taken and block.data_ptr() == returned.data_ptr()):
                    workspace.forget(block)
        return (None, None, None, None, None, *out, None, None, None)


def _taken_as_grad(weight_ref) -> bool:
    """Whether autograd will take the head's gradient as the head's ``.grad`` (a leaf whose ``.grad``
    is None now), to be dropped by ``zero_grad`` outside any backward."""
    weight = weight_ref() if weight_ref is not None else None
    return weight is not None and weight.is_leaf and weight.grad is None
