"""robalign — fused kernels for distribution-aware robust preference alignment (DoRA).

    logits or (hidden, LM head) ──sequence_logps / linear_sequence_logps──▶ logps [S]
    logps, ref_logps ──objectives.<name>──▶ per-sample losses ℓ [B]
    classifier probs ──dora_weights──▶ w [B]
    ℓ, w ──kl_dro──▶ λ·log mean exp(w·ℓ/λ)   (over every micro-batch and rank)

:class:`DoRALoss` composes the four; :mod:`robalign.ground_truth` is the plain-PyTorch ground truth.

Three layers, each importing only the ones below it:

    robalign.ops      the heavy ops and their backends (Triton, C++, chunked PyTorch, ground truth)
    robalign.losses   objectives, density-ratio weights, DRO reductions, DoRALoss
    robalign.app      the classifier stage, data, trainer, command line, demo
"""

import importlib

from . import _compat

__version__ = "0.2.0"

_compat.install()

# Public names, imported on first use (PEP 562), so that `import robalign` — and with it the
# command line's --help and argument errors — does not pay for importing torch.
_LAZY = {
    "sequence_logps": ".ops", "sequence_logps_with_ref": ".ops", "linear_sequence_logps": ".ops",
    "shift_labels": ".ops", "dora_weights": ".losses.weights", "kl_dro": ".losses.dro",
    "kl_dro_with_stats": ".losses.dro", "KLDROAccumulator": ".losses.dro", "DROStats": ".losses.dro",
    "DoRALoss": ".losses.loss", "DoRAOutput": ".losses.loss", "DoRASamples": ".losses.loss",
    "FusedLinearDoRALoss": ".losses.loss", "fused_linear_dora_loss": ".losses.loss",
    "Objective": ".losses.objectives", "DoRAWeights": ".losses.weights", "LossParams": ".losses.options",
    "BatchExtras": ".losses.options", "HeadTransform": ".ops.head",
    "Reduction": ".losses.reductions", "KLDRO": ".losses.reductions", "KLBall": ".losses.reductions",
    "Chi2Ball": ".losses.reductions", "CVaR": ".losses.reductions", "GroupDRO": ".losses.reductions",
    "pairs_to_group_major": ".losses.layout", "pairs_to_chosen_first": ".losses.layout",
}
_MODULES = {"objectives": ".losses.objectives", "backends": ".ops.registry", "ground_truth": ".ground_truth",
            "ops": ".ops", "losses": ".losses", "app": ".app"}


def __getattr__(name: str):
    if name == "reference":                      # the old name of ground_truth: through the alias, with its warning
        return importlib.import_module(__name__ + ".reference")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'robalign' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))


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
    "FusedLinearDoRALoss",
    "fused_linear_dora_loss",
    "Objective",
    "DoRAWeights",
    "LossParams",
    "BatchExtras",
    "HeadTransform",
    "DoRAOutput",
    "DoRASamples",
    "Reduction",
    "KLDRO",
    "KLBall",
    "Chi2Ball",
    "CVaR",
    "GroupDRO",
    "pairs_to_group_major",
    "pairs_to_chosen_first",
    "objectives",
    "ground_truth",
    "backends",
]
