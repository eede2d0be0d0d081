"""The reduction protocol: how the per-sample losses ℓ_i (with weights w_i) of the effective
batch — every micro-batch on every data-parallel rank — become the one scalar that is trained.

A reduction is an object with two methods, and nothing else in robalign knows its formula:

    reduce(losses, weights, *, group, ddp_average)  → (loss, DROStats)   one batch, exact over the
                                                                          ranks of ``group``
    accumulator(params, *, group, ddp_average, exact, accumulation_steps) → Accumulator
                                                    the same objective exact across micro-batches

A reduction whose gradient with respect to ℓ_i is ``w_i·e^{a_i}`` up to one batch-wide scalar
(``a_i = w_i·ℓ_i/λ``) can take a gradient formed ahead of it, as the one-pass fused loss
(:mod:`robalign.ops.one_pass`) forms it: it names that λ in ``one_pass_temperature`` and gives
the scalar in ``gradient_scale`` (and its accumulator likewise). Others leave
``one_pass_temperature`` ``None``; ``DoRALoss`` then takes the recompute path.

An :class:`Accumulator` is called once per micro-batch with its losses and weights and returns
the surrogate to ``backward()``; after the last micro-batch the parameters' gradients are those
of the full-batch loss, ``.loss`` is its value and ``.stats()`` its sample-weight statistics.
``DoRALoss`` and ``DoRATrainer`` take any reduction; adding an ambiguity set is one class here.

    name   class     formula
    kl     KLDRO     λ·log mean_i exp(w_i·ℓ_i/λ)   (λ = ∞: mean(w·ℓ); λ < 0: soft minimum)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .. import _validation as V
from .dro import DROStats, KLDROAccumulator, kl_dro_gradient_scale, kl_dro_with_stats

__all__ = ["Reduction", "Accumulator", "KLDRO", "REDUCTIONS"]


class Accumulator(Protocol):
    """One effective batch folded in micro-batch by micro-batch (see the module docstring)."""

    loss: float | None

    def __call__(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def stats(self) -> DROStats: ...

    def gradient_scale(self, losses: torch.Tensor, weights: torch.Tensor | None,
                       shift: torch.Tensor) -> torch.Tensor: ...


class Reduction(ABC):
    """An ambiguity set over the effective batch, as a reduction of per-sample losses."""

    name: ClassVar[str]
    #: λ of the exponents ``w·ℓ/λ`` a one-pass gradient is formed with; ``None``: no one-pass path
    one_pass_temperature: ClassVar[float | None] = None

    def gradient_scale(self, losses, weights, shift, *, group=None, ddp_average=True):
        """``(value, κ, stats)`` for a gradient formed ahead as ``Σ_i w_i·e^{a_i − shift}·∇ℓ_i``: the
        loss value and the scalar that makes it the exact gradient (see :func:`robalign.kl_dro_gradient_scale`)."""
        raise NotImplementedError(f"reduction {self.name!r} takes no gradient formed ahead of it")

    @abstractmethod
    def reduce(self, losses: torch.Tensor, weights: torch.Tensor | None = None, *, group=None,
               ddp_average: bool = True) -> tuple[torch.Tensor, DROStats]:
        """The loss of one batch ``losses`` ``[n]`` (weights ``[n]``), exact over ``group``'s ranks."""

    @abstractmethod
    def accumulator(self, params, *, group=None, ddp_average: bool = True, exact: bool = True,
                    accumulation_steps: int | None = None) -> Accumulator:
        """The same objective, exact across gradient-accumulation micro-batches of ``params``."""


@dataclass(frozen=True)
class KLDRO(Reduction):
    """KL-DRO with temperature λ (DoRA, arXiv 2504.05831, Eq. 8): ``λ·log mean_i exp(w_i·ℓ_i/λ)``.

    The dual of the worst case over a KL ball around the weighted data; λ = ∞ is the weighted
    mean, λ > 0 up-weights hard samples, λ < 0 is Dr.DPO's soft minimum. See :func:`robalign.kl_dro`
    and :class:`robalign.KLDROAccumulator`.
    """

    lam: float = 1.0
    name: ClassVar[str] = "kl"

    def __post_init__(self):
        V.check_lam("robalign.KLDRO", self.lam)

    @property
    def one_pass_temperature(self) -> float:
        return self.lam

    def reduce(self, losses, weights=None, *, group=None, ddp_average=True):
        return kl_dro_with_stats(losses, weights, lam=self.lam, group=group, ddp_average=ddp_average)

    def gradient_scale(self, losses, weights, shift, *, group=None, ddp_average=True):
        return kl_dro_gradient_scale(losses, weights, shift, lam=self.lam, group=group, ddp_average=ddp_average)

    def accumulator(self, params, *, group=None, ddp_average=True, exact=True, accumulation_steps=None):
        return KLDROAccumulator(params, lam=self.lam, group=group, ddp_average=ddp_average, exact=exact,
                                accumulation_steps=accumulation_steps)


REDUCTIONS = {cls.name: cls for cls in (KLDRO,)}
