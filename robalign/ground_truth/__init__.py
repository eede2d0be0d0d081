"""robalign.ground_truth — the ground truth: plain PyTorch written from the equations.

Every backend (Triton, C++, chunked PyTorch) is tested against these functions, run in
float64. They validate nothing and are not fast; the public functions in :mod:`robalign`
check their arguments and then dispatch to a backend, with these as the fallback.
"""

from . import objectives
from .dro import group_dro, kl_dro
from .logps import linear_sequence_logps, sequence_logps, sequence_logps_with_ref, shift_labels
from .weights import dora_weights

__all__ = [
    "sequence_logps",
    "sequence_logps_with_ref",
    "linear_sequence_logps",
    "shift_labels",
    "dora_weights",
    "kl_dro",
    "group_dro",
    "objectives",
]
