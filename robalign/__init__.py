"""robalign — fused kernels for distribution-aware robust preference alignment (DoRA).

    logits or (hidden, LM head) ──sequence_logps / linear_sequence_logps──▶ logps [S]
    logps, ref_logps ──objectives.<name>──▶ per-sample losses ℓ [B]
    classifier probs ──dora_weights──▶ w [B]
    ℓ, w ──kl_dro──▶ λ·log mean exp(w·ℓ/λ)   (over every micro-batch and rank)

:class:`DoRALoss` composes the four; :mod:`robalign.reference` is the plain-PyTorch ground truth.

Three layers, each importing only the ones below it:

    robalign.ops      the heavy ops and their backends (Triton, C++, chunked PyTorch, reference)
    robalign.losses   objectives, density-ratio weights, DRO reductions, DoRALoss
    robalign.app      the classifier stage, data, trainer, command line, demo
"""

from . import _compat, reference
from .losses import objectives
from .losses.dro import DROStats, KLDROAccumulator, kl_dro, kl_dro_with_stats
from .losses.loss import DoRALoss, DoRAOutput, DoRASamples
from .losses.reductions import KLDRO, Reduction
from .losses.weights import dora_weights
from .ops import linear_sequence_logps, sequence_logps, sequence_logps_with_ref, shift_labels
from .ops import registry as backends

__version__ = "0.1.0"

_compat.install()

__all__ = [
    "sequence_logps",
    "sequence_logps_with_ref",
    "linear_sequence_logps",
    "shift_labels",
    "dora_weights",
    "kl_dro",
    "kl_dro_with_stats",
    "KLDROAccumulator",
    "DROStats",
    "DoRALoss",
    "DoRAOutput",
    "DoRASamples",
    "Reduction",
    "KLDRO",
    "objectives",
    "reference",
    "backends",
]
