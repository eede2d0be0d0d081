"""Layer 1 — the heavy ops and their backends: logits, or hidden states and the LM head, to
per-sequence log-probabilities and their gradients.

    api.py               the public functions: validate once, dispatch through the registry
    registry.py          the one backend registry (name → devices, dtypes, row kernels, ops)
    library.py           the torch.library logits op, shared by every kernel backend
    linear.py            the chunked fused linear op, shared likewise
    fused.py             the ops module of the kernel backends
    reference_backend.py the reference behind the same signature
    one_pass.py          the one-pass fused DoRA loss (loss and gradients in the forward)
    wpo.py               WPO's per-sequence weights (chunked, no gradient)
    cpu.py, _cpp.py      C++ row kernels (csrc/)        chunked.py   ATen row kernels
    (robalign.kernels    Triton row kernels, from the top-level kernels/ folder)

Nothing here imports the losses or the application.
"""

from . import fused, reference_backend  # noqa: F401  (cheap; loaded before any torch.compile trace needs them)
from .api import linear_sequence_logps, sequence_logps, sequence_logps_with_ref, shift_labels

__all__ = ["sequence_logps", "sequence_logps_with_ref", "linear_sequence_logps", "shift_labels"]
