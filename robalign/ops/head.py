"""What some LM heads do to their logits after the matmul, applied chunk by chunk on the fused
paths so that such models keep them (instead of falling back to materialised logits):

    z' = c·tanh(s·z / c) / T        with a soft-cap c (Gemma 2/3's ``final_logit_softcapping``)
    z' = s·z / T                    without one

``s`` is the model's logit scale (Cohere's ``logit_scale``; Granite divides by ``logits_scaling``:
s = 1/that), ``T`` a sampling temperature applied to the model's output. The derivative is
``∂z'/∂z = (s/T)·(1 − tanh²(s·z/c))`` (``s/T`` without a cap).

On the gradient paths (:mod:`robalign.ops.linear`, :mod:`robalign.ops.one_pass`) the row kernels
apply the transform themselves, in float32, to each element as they read the raw chunk of
logits, and their backward writes ``G = c_t·(onehot − softmax(z'))·∂z'/∂z`` with respect to the raw
logits (in place): the transform costs no pass over the chunk and no buffer (:attr:`HeadTransform.kernel_args`:
T folds into s/T and c/T). The no-gradient passes (WPO's weights, the token statistics) apply it to
the chunk with :meth:`HeadTransform.apply_`, in float32 (float64 for float64 inputs) as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _validation as V

__all__ = ["HeadTransform", "head_logits", "scored_logit_chunks"]

# oneDNN's bfloat16 GEMM on CPU forms h·Wᵀ faster a block of vocabulary columns at a time than whole, from
# a few hundred rows on (V 128256, H 576: 1536 rows 120 → 79 ms, 384 rows 36.8 → 29.2; V 32000, H 512:
# 1536 rows 25.2 → 20.5, 384 rows 6.2 → 6.1), slower below (128 rows at V 128256: 17.8 → 21.7)
_BLOCKED_MIN_ROWS = 384
_BLOCK_COLUMNS = 4096


def head_logits(h: Tensor, weight: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """The LM head's logits ``h·Wᵀ (+ b)`` ``[C, V]`` for ``h`` ``[C, H]``, ``weight`` ``[V, H]``, into
    ``out`` (unit-stride rows) where given. For bfloat16 on CPU from ``_BLOCKED_MIN_ROWS`` rows, a block
    of ``_BLOCK_COLUMNS`` vocabulary columns at a time (docs/kernels.md): each logit is the same float32
    dot product over H, rounded once, where the GEMM may add it in another order."""
    rows, vocab = h.shape[0], weight.shape[0]
    if h.device.type != "cpu" or h.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or \
            rows < _BLOCKED_MIN_ROWS or vocab <= _BLOCK_COLUMNS:
        return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
    if out is None:
        out = h.new_empty(rows, vocab)
    for v0 in range(0, vocab, _BLOCK_COLUMNS):
        v1 = min(vocab, v0 + _BLOCK_COLUMNS)
        if bias is None:
            torch.mm(h, weight[v0:v1].T, out=out[:, v0:v1])
        else:
            torch.addmm(bias[v0:v1], h, weight[v0:v1].T, out=out[:, v0:v1])
    return out


@dataclass(frozen=True)
class HeadTransform:
    """The logit transform of an LM head, ``z' = c·tanh(s·z/c)/T`` (``s·z/T`` without a soft-cap):
    ``scale`` s (Cohere's ``logit_scale``; 1/``logits_scaling`` for Granite), ``softcap`` c (Gemma 2/3's
    ``final_logit_softcapping``; 0 or ``None``: none), ``temperature`` T; each finite and > 0.
    ``HeadTransform()`` is the identity, a plain head."""

    scale: float = 1.0
    softcap: float | None = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        where = "robalign.HeadTransform"
        for name, value in (("scale", self.scale), ("temperature", self.temperature)):
            V.check_number(where, name, value, low=0, low_open=True)
            if not math.isfinite(value):
                V.fail(where, f"`{name}` must be finite, got {value}")
        if self.softcap is None:
            object.__setattr__(self, "softcap", 0.0)
        V.check_number(where, "softcap", self.softcap, low=0)
        if not math.isfinite(self.softcap):
            V.fail(where, f"`softcap` must be finite (0 or None: no soft-cap), got {self.softcap}")
        for name in ("scale", "softcap", "temperature"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def checked(cls, where: str, scale=1.0, softcap=None, temperature=1.0) -> HeadTransform:
        """The transform of the public arguments ``logit_scale``, ``logit_softcap`` and ``logit_temperature``,
        each checked (finite, > 0; ``logit_softcap`` ``None``: none)."""
        for name, value in (("logit_scale", scale), ("logit_temperature", temperature)):
            V.check_number(where, name, value, low=0, low_open=True)
            if not math.isfinite(value):
                V.fail(where, f"`{name}` must be finite, got {value}")
        if softcap is not None:
            V.check_number(where, "logit_softcap", softcap, low=0, low_open=True)
            if not math.isfinite(softcap):
                V.fail(where, f"`logit_softcap` must be finite (None: no soft-cap), got {softcap}")
        return cls(float(scale), float(softcap or 0.0), float(temperature))

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap == 0.0 and self.temperature == 1.0

    @property
    def args(self) -> tuple[float, float, float]:
        """``(scale, softcap, temperature)``, as an operator's float arguments."""
        return self.scale, self.softcap, self.temperature

    @property
    def kwargs(self) -> dict:
        """The transform as the public functions' arguments (``logit_scale``, ``logit_softcap``, ``logit_temperature``)."""
        return {"logit_scale": self.scale, "logit_softcap": self.softcap or None, "logit_temperature": self.temperature}

    @property
    def kernel_args(self) -> dict:
        """The transform as the row kernels' ``scale`` and ``softcap``: z' = (c/T)·tanh((s/T)·z/(c/T))."""
        return {"scale": self.scale / self.temperature, "softcap": self.softcap / self.temperature}

    def apply_(self, z: Tensor) -> Tensor:
        """``z ← z'`` in place; returns ``z``."""
        if self.softcap:
            z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap / self.temperature)
        elif self.scale != self.temperature:
            z.mul_(self.scale / self.temperature)
        return z


def scored_logit_chunks(where: str, labels: Tensor, *, logits: Tensor | None, hidden: Tensor | None,
                        head_weight: Tensor | None, head_bias: Tensor | None, transform: HeadTransform | None,
                        ignore_index: int, chunk_rows: int, float32_head: bool = False, raw: bool = False,
                        out: Tensor | None = None):
    """``(dtype, chunks)``: the dtype of the logits (float32 at least; float64 stays) and an iterator
    of ``(index, z)`` for chunks of at most ``chunk_rows`` scored tokens of ``labels`` — their rows of
    ``logits``, or ``hidden @ head_weightᵀ (+ head_bias)`` with the head's ``transform``, so no
    ``[N, V]`` tensor exists on the hidden-state path. The head's matmul runs in the hidden states'
    dtype, or in float32 at least with ``float32_head``; the transform on its float32 (or float64)
    result, as the row kernels apply it. ``raw``: each chunk as the logits hold it or the matmul gives
    it, in its dtype and without the transform (for a row kernel that converts and transforms as it
    reads); with ``out`` (``[chunk_rows, V]``, raw only) the head's chunks are written into its rows
    (each chunk is then valid until the next is drawn). The arguments are checked here, before any
    chunk. For the no-gradient passes over the head (WPO's weights, the logged token statistics)."""
    if (logits is None) == (hidden is None):
        V.fail(where, "pass exactly one of `logits` or `hidden` (with `head_weight`)")
    if hidden is not None and head_weight is None:
        V.fail(where, "`hidden` needs `head_weight` (the LM head's weight, [V, H])")
    source = logits if logits is not None else hidden
    rows = source.reshape(-1, source.shape[-1])
    flat = labels.reshape(-1)
    if rows.shape[0] != flat.numel():
        V.fail(where, f"`labels` ({flat.numel()} tokens) must match the rows of the "
                      f"{'logits' if logits is not None else 'hidden states'} ({rows.shape[0]})")
    dtype = torch.promote_types(source.dtype, torch.float32)
    matmul_dtype = dtype if float32_head else source.dtype
    weight = None if hidden is None else head_weight.to(matmul_dtype)
    bias = None if hidden is None or head_bias is None else head_bias.to(matmul_dtype)

    def chunks():
        for index in (flat != ignore_index).nonzero().squeeze(-1).split(chunk_rows):
            z = rows[index]
            if weight is None:
                yield index, z if raw else z.to(dtype)
                continue
            z = z.to(matmul_dtype)
            into = None if out is None else out[:z.shape[0]]
            z = head_logits(z, weight, bias, out=into)
            if raw:
                yield index, z
                continue
            z = z.to(dtype)
            yield index, z if transform is None else transform.apply_(z)      # z is this chunk's own

    return dtype, chunks()
