"""DoRA density-ratio weights from classifier probabilities."""

from __future__ import annotations

import torch

from .. import _validation as V
from .. import ground_truth

__all__ = ["dora_weights", "DoRAWeights"]


def dora_weights(probs, alpha, beta=None, *, class_ratio: float = 1.0) -> torch.Tensor:
    """Density-ratio weights ``w = Q0/P`` of DoRA (arXiv 2504.05831, Sec. 4.1).

    The training data is the mixture ``P = α·Q0 + Σ_k β_k·Q_k``; a classifier trained with
    ``class_ratio = n_target / n_source`` estimates ``p = P(target | z)``, so

        w = 1 / (α + β·class_ratio·(1 − p)/p) = p / (α·p + β·class_ratio·(1 − p))  ∈ [0, 1/α]

    Args:
        probs: classifier probabilities, any shape, finite in [0, 1].
        alpha: target fraction α in (0, 1]; a number or a tensor broadcastable to ``probs``.
        beta: synthetic fraction β ≥ 0 (default ``1 − α``); a number or a tensor broadcastable
            to ``probs`` (one β_k per source or per candidate position).
        class_ratio: ``n_target / n_source`` of the classifier's training set, > 0.

    Returns:
        weights of the broadcast shape, in the dtype of ``probs``; ``p = 0`` gives 0 exactly and
        ``p = 1`` gives ``1/α`` (never inf or NaN).
    """
    where = "robalign.dora_weights"
    probs = torch.as_tensor(probs, dtype=torch.get_default_dtype()) if not isinstance(probs, torch.Tensor) else probs
    V.check_probs(where, "probs", probs)
    V.check_number(where, "alpha", alpha, low=0, high=1, low_open=True, allow_tensor=True)
    if beta is not None:
        V.check_number(where, "beta", beta, low=0, allow_tensor=True)
    V.check_number(where, "class_ratio", class_ratio, low=0, low_open=True)
    if class_ratio == float("inf"):
        V.fail(where, "`class_ratio` must be finite")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, torch.Tensor):
            try:
                torch.broadcast_shapes(probs.shape, value.shape)
            except RuntimeError:
                V.fail(where, f"`{name}` of shape {tuple(value.shape)} does not broadcast to `probs` "
                              f"{tuple(probs.shape)}")
            if tuple(torch.broadcast_shapes(probs.shape, value.shape)) != tuple(probs.shape):
                V.fail(where, f"`{name}` of shape {tuple(value.shape)} would change the shape of `probs` "
                              f"{tuple(probs.shape)}; the weights have one entry per probability")
    return ground_truth.dora_weights(probs, alpha, beta, class_ratio)


class DoRAWeights:
    """The density-ratio weighting of :class:`robalign.DoRALoss`: classifier probabilities → per-sample
    weights, ``w_i = mean_k dora_weights(p_ik, alpha, synthetic_fraction, class_ratio)`` over a
    sample's K candidates (see :func:`dora_weights` for the formula).

    Args:
        alpha: the target fraction α ∈ (0, 1] of the training mixture.
        synthetic_fraction: the mixture's β (default ``1 − α``); a number or a tensor per candidate position.
        class_ratio: ``n_target / n_source`` of the classifier's training set, > 0.

    Calling it on probabilities ``[B, K]`` gives the weights ``[B]``.
    """

    __slots__ = ("alpha", "synthetic_fraction", "class_ratio")

    def __init__(self, alpha: float, synthetic_fraction=None, class_ratio: float = 1.0):
        where = "robalign.DoRAWeights"
        V.check_number(where, "alpha", alpha, low=0, high=1, low_open=True)
        if synthetic_fraction is not None:
            V.check_number(where, "synthetic_fraction", synthetic_fraction, low=0, allow_tensor=True)
        V.check_number(where, "class_ratio", class_ratio, low=0, low_open=True)
        if class_ratio == float("inf"):
            V.fail(where, "`class_ratio` must be finite")
        self.alpha, self.synthetic_fraction, self.class_ratio = alpha, synthetic_fraction, class_ratio

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``[B]`` of probabilities ``[B, K]``."""
        return dora_weights(probs, self.alpha, self.synthetic_fraction, class_ratio=self.class_ratio).mean(-1)

    def __repr__(self) -> str:
        return (f"DoRAWeights(alpha={self.alpha!r}, synthetic_fraction={self.synthetic_fraction!r}, "
                f"class_ratio={self.class_ratio!r})")
