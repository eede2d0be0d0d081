"""The ops of the kernel backends (``"triton"``, ``"cpp"``, ``"torch"``): one module for all three,
since they differ only in their row kernels, which ``kernel`` names (:mod:`robalign.ops.registry`).

    sequence_logps            the torch.library logits op (:mod:`robalign.ops.library`)
    sequence_logps_with_ref   the same op reading the reference model's logits in the same pass
    linear_sequence_logps     the chunked fused linear op (:mod:`robalign.ops.linear`)

Arguments are those of the public functions in :mod:`robalign.ops.api`, validated there.
"""

from .library import sequence_logps, sequence_logps_with_ref
from .linear import linear_sequence_logps

__all__ = ["sequence_logps", "sequence_logps_with_ref", "linear_sequence_logps"]
