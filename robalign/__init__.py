"""robalign — fused kernels for distribution-aware robust preference alignment (DoRA).

    logits or (hidden, LM head) ──sequence_logps / linear_sequence_logps──▶ logps [S]
    logps, ref_logps ──objectives.<name>──▶ per-sample losses ℓ [B]
    classifier probs ──dora_weights──▶ w [B]
    ℓ, w ──kl_dro──▶ λ·log mean exp(w·ℓ/λ)   (over every micro-batch and rank)

:class:`DoRALoss` composes the four; :mod:`robalign.reference` is the plain-PyTorch ground truth.
"""

from . import backends, objectives, reference
from .dro import DROStats, KLDROAccumulator, kl_dro, kl_dro_with_stats
from .loss import DoRALoss, DoRAOutput
from .ops import linear_sequence_logps, sequence_logps, sequence_logps_with_ref, shift_labels
from .weights import dora_weights

__version__ = "0.1.0"

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
    "objectives",
    "reference",
    "backends",
]
