"""What some LM heads do to their logits after the matmul, applied chunk by chunk on the fused
paths so that such models keep them (instead of falling back to materialised logits):

    z' = c·tanh(s·z / c) / T        with a soft-cap c (Gemma 2/3's ``final_logit_softcapping``)
    z' = s·z / T                    without one

``s`` is the model's logit scale (Cohere's ``logit_scale``; Granite divides by ``logits_scaling``:
s = 1/that), ``T`` a sampling temperature applied to the model's output. The derivative is
``∂z'/∂z = (s/T)·(1 − tanh²(s·z/c))`` (``s/T`` without a cap), so the backward of a row kernel's
``G' = c_t·(onehot − softmax(z'))`` is ``G = G' ⊙ ∂z'/∂z``: a scalar on the coefficient without a
cap; with one, the scalar and ``G' − G'·t²`` (two passes over the chunk and one more ``[C, V]``
buffer, which the chunk rule's memory cap counts).
The transform runs in the logits' dtype, as the models compute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .. import _validation as V

__all__ = ["HeadTransform"]


@dataclass(frozen=True)
class HeadTransform:
    """The logit transform of an LM head: ``scale`` s, ``softcap`` c (0: none), ``temperature`` T."""

    scale: float = 1.0
    softcap: float = 0.0
    temperature: float = 1.0

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
    def chunk_factor(self) -> int:
        """``[C, V]`` buffers a chunk's backward holds: 2 with a soft-cap (its derivative), else 1 —
        what the chunk rule's memory cap counts (:func:`robalign.ops.linear.chunk_tokens`)."""
        return 2 if self.softcap else 1

    def apply_(self, z: Tensor) -> Tensor:
        """``z ← z'`` in place; returns ``z``."""
        if self.softcap:
            z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap / self.temperature)
        elif self.scale != self.temperature:
            z.mul_(self.scale / self.temperature)
        return z

    def softmax_grad_(self, rows, z: Tensor, labels: Tensor, lse: Tensor, coeff: Tensor, ignore_index: int) -> Tensor:
        """The gradient ``G`` ``[C, V]`` with respect to the head's raw logits, from the transformed
        chunk ``z`` ``[C, V]`` (``z'``, overwritten) and the row kernels ``rows`` of a backend."""
        slope = self.scale / self.temperature
        coeff = coeff if slope == 1.0 else coeff * slope
        grad = z.new_empty(z.shape) if self.softcap else z                  # without a cap, in place
        rows.rows_softmax_grad(z.unsqueeze(0), labels, lse, coeff, ignore_index, grad.unsqueeze(0))
        if not self.softcap:
            return grad
        # ∂z'/∂z = (s/T)·(1 − t²) with t = tanh(s·z/c) = z'·T/c: G = G' − G'·t² (s/T is in the coefficient)
        t2 = z.mul_(self.temperature / self.softcap).square_()
        return grad.addcmul_(grad, t2, value=-1.0)
