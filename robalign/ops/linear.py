"""The fused linear path: per-sequence log-probs from hidden states and the LM head, with no
``[N, V]`` logits tensor — only one chunk of scored tokens' logits exists at a time.

    forward   for each chunk c of scored tokens:  z_c = h_c @ Wᵀ (+ b)             [C, V]
              lse_c, target_c = row kernel(f(z_c));  logp_t = target_t − lse_t;  save lse (4 B/token)
    backward  for each chunk:  recompute z_c;  G_c = coeff·(onehot − softmax(f(z_c)))·f'(z_c)  (in place)
              grad_h[c] = G_c @ W;   grad_W += G_cᵀ @ h_c;   grad_b += Σ_t G_c[t]

The matmuls are ATen's (cuBLAS / the CPU BLAS, float32 accumulation inside each product); the
row work is the ``kernel``'s (``"cpp"``, ``"triton"`` or ``"torch"``, as in :mod:`robalign.ops.library`).
``f`` is the head's logit transform (scale, soft-cap, temperature; the identity by default, see
:mod:`robalign.ops.head`), applied by the row kernels as they read the chunk. Backward recomputes
the logits because the per-sequence coefficient (the DRO normaliser couples the whole batch) is
only known after the forward. Prompt and padding tokens are
skipped entirely. ``grad_W`` and ``grad_b`` accumulate across chunks in the weight's dtype:
exact for float32; for bfloat16 one rounding per chunk, as Liger-Kernel does (a float32
accumulator would double the memory of the largest gradient).

Registered as ``robalign::linear_sequence_logps_fwd`` / ``_bwd``; the op takes a plain
``weight`` tensor, so under FSDP the trainer passes the gathered LM head weight. Under
``torch.autocast`` the inputs are cast to the autocast dtype first (what ``F.linear`` does), and
the op runs with autocast off, so its backward recomputes exactly the forward's logits.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..ground_truth.logps import sequence_index
from .head import HeadTransform, head_logits
from .library import check_kernel_dtypes, flat_labels, per_sequence, row_kernels

__all__ = ["linear_sequence_logps", "chunk_tokens"]

# The chunk rule, by device type: enough tokens per chunk for the chunk's matmuls to run at the
# BLAS's rate (TARGET_TOKENS), within a memory budget for the [C, V] logits (MAX_BYTES).
# Measured (README, "The fused linear path"): on CPU, H = 512, 2048 tokens, the time falls until
# ~1024 tokens a chunk and is flat after; on an H100, 16 × 1024 tokens, H = 4096, from 103.6 ms
# at ~1000 tokens to 92.7 ms at ~4000 and 91.4 ms at ~8000. On CPU the target is in float32
# tokens, so a half-precision chunk holds twice as many (the same bytes): oneDNN's AMX bfloat16
# G·W ran at 84 µs a token below 1536 rows against 45 µs from 1536 on (H 512, V 32000;
# benchmarks/results/cpu_sweep.json), and each chunk costs one pass over the float32 head
# gradient. ROBALIGN_CHUNK_MB overrides both.
TARGET_TOKENS = {"cpu": 1024, "cuda": 4096}
MAX_BYTES = {"cpu": 512 << 20, "cuda": 2 << 30}


def chunk_tokens(vocab: int, element_size: int, device: torch.device, *, tokens: int | None = None,
                 spare_bytes: int = 0) -> int:
    """Tokens per chunk: ``TARGET_TOKENS`` of the device (on CPU, times ``4 / element_size``), fewer
    when their ``[C, V]`` logits would exceed ``MAX_BYTES``; with ``$ROBALIGN_CHUNK_MB``, the most
    that fit that many MiB. At least 1.

    ``tokens`` (the call's) and ``spare_bytes`` (memory several chunks hold besides their logits and
    one chunk does not): all ``tokens`` in one chunk where their logits exceed the rule's chunk by
    no more than ``spare_bytes`` — one chunk then holds no more than the chunked plan. Not with
    ``$ROBALIGN_CHUNK_MB``, which is a limit."""
    row_bytes = vocab * element_size
    override = int(os.environ.get("ROBALIGN_CHUNK_MB", 0)) << 20
    if override:
        return max(1, override // row_bytes)
    target = TARGET_TOKENS.get(device.type, TARGET_TOKENS["cpu"])
    if device.type == "cpu":
        target = target * 4 // element_size
    chunk = max(1, min(target, MAX_BYTES.get(device.type, MAX_BYTES["cpu"]) // row_bytes))
    if tokens is not None and chunk < tokens and (tokens - chunk) * row_bytes <= spare_bytes:
        return tokens
    return chunk


def _chunk_logits(h_chunk: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return head_logits(h_chunk, weight, bias)


@torch.library.custom_op("robalign::linear_sequence_logps_fwd", mutates_args=())
def _fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, seq_idx: Tensor, num_seqs: int,
         ignore_index: int, kernel: str, chunk: int, logit_scale: float, softcap: float,
         temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    rows = row_kernels(kernel)
    f = HeadTransform(logit_scale, softcap, temperature).kernel_args
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    scored = y != ignore_index
    idx = scored.nonzero().squeeze(1)
    lse = torch.zeros(y.numel(), dtype=torch.float32, device=h.device)
    token_logps = torch.zeros_like(lse)
    for start in range(0, idx.numel(), chunk):
        i_c = idx[start:start + chunk]
        z = _chunk_logits(h.index_select(0, i_c), weight, bias)                       # [C, V]
        lse_c, target_c, _ = rows.rows_lse_target(z.unsqueeze(0), y.index_select(0, i_c), ignore_index, **f)
        lse.index_copy_(0, i_c, lse_c)
        token_logps.index_copy_(0, i_c, target_c - lse_c)
        del z                           # free this chunk before the next one is allocated
    counts = torch.zeros(num_seqs, dtype=torch.int64, device=h.device).index_add_(0, seq_idx, scored.long())
    return per_sequence(token_logps, seq_idx, num_seqs), counts, lse


@_fwd.register_fake
def _(hidden, weight, bias, labels, seq_idx, num_seqs, ignore_index, kernel, chunk, logit_scale, softcap,
      temperature):
    return (hidden.new_empty(num_seqs, dtype=torch.float32), hidden.new_empty(num_seqs, dtype=torch.int64),
            hidden.new_empty(labels.numel(), dtype=torch.float32))


@torch.library.custom_op("robalign::linear_sequence_logps_bwd", mutates_args=())
def _bwd(grad_logps: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, seq_idx: Tensor,
         lse: Tensor, ignore_index: int, kernel: str, chunk: int, need_hidden: bool, need_weight: bool,
         need_bias: bool, logit_scale: float, softcap: float, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    rows = row_kernels(kernel)
    f = HeadTransform(logit_scale, softcap, temperature).kernel_args
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    coeff = grad_logps.float().index_select(0, seq_idx)
    idx = ((y != ignore_index) & (coeff != 0)).nonzero().squeeze(1)
    grad_h = torch.zeros_like(h) if need_hidden else h.new_empty(0)
    grad_w = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
    grad_b = torch.zeros_like(bias) if (need_bias and bias is not None) else weight.new_empty(0)
    for start in range(0, idx.numel(), chunk):
        i_c = idx[start:start + chunk]
        h_c = h.index_select(0, i_c)
        g = _chunk_logits(h_c, weight, bias).unsqueeze(0)                           # [1, C, V]
        rows.rows_softmax_grad(g, y.index_select(0, i_c), lse.index_select(0, i_c), coeff.index_select(0, i_c),
                               ignore_index, g, **f)                                # in place: z becomes G
        g = g.squeeze(0)
        if need_hidden:
            grad_h.index_copy_(0, i_c, g @ weight)
        if need_weight:
            grad_w.addmm_(g.T, h_c)
        if grad_b.numel():
            grad_b.add_(g.sum(0, dtype=torch.float32).to(grad_b.dtype))
        del g                           # free this chunk before the next one is allocated
    return grad_h.reshape(hidden.shape) if need_hidden else grad_h, grad_w, grad_b


@_bwd.register_fake
def _(grad_logps, hidden, weight, bias, labels, seq_idx, lse, ignore_index, kernel, chunk, need_hidden, need_weight,
      need_bias, logit_scale, softcap, temperature):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if (need_bias and bias is not None) else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, seq_idx, _, ignore_index, kernel, chunk, *transform = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, seq_idx, output[2])
    ctx.ignore_index, ctx.kernel, ctx.chunk, ctx.transform = ignore_index, kernel, chunk, transform


def _backward(ctx, grad_logps, grad_counts, grad_lse):
    hidden, weight, bias, labels, seq_idx, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h, grad_w, grad_b = torch.ops.robalign.linear_sequence_logps_bwd(
        grad_logps, hidden, weight, bias, labels, seq_idx, lse, ctx.ignore_index, ctx.kernel, ctx.chunk,
        need_h, need_w, need_b and bias is not None, *ctx.transform)
    return (grad_h if need_h else None, grad_w if need_w else None,
            grad_b if (need_b and bias is not None) else None, *[None] * 9)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None, ignore_index: int,
                          cu_seqlens: Tensor | None, kernel: str,
                          transform: HeadTransform = HeadTransform()) -> tuple[Tensor, Tensor]:
    """Run the operator; ``(logps, counts)`` as :func:`robalign.linear_sequence_logps`."""
    where = "robalign.linear_sequence_logps"
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):      # as F.linear would: the head runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_kernel_dtypes(where, kernel, hidden=hidden, weight=weight, bias=bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{where}: backend {kernel!r} needs `{name}` in the dtype of `hidden` ({hidden.dtype}), "
                            f"got {t.dtype}")
    seq_idx, num_seqs = sequence_index(labels, cu_seqlens)
    labels = flat_labels(labels)
    chunk = chunk_tokens(weight.shape[0], hidden.element_size(), hidden.device)
    with torch.autocast(device_type, enabled=False):
        logps, counts, _ = torch.ops.robalign.linear_sequence_logps_fwd(
            hidden, weight, bias, labels, seq_idx, num_seqs, ignore_index, kernel, chunk, *transform.args)
    return logps, counts
