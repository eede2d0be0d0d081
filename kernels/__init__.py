"""robalign.kernels — Triton GPU kernels (installed from the top-level kernels/ folder).

Each op follows one chain of names: ``_<op>_<fwd|bwd>_kernel`` (``@triton.jit``) → the launcher
(allocates, builds the grid) → the ``torch.library`` operator in :mod:`robalign.library` → the
public function in :mod:`robalign`. The functions exported here with a public op's name are
what :mod:`robalign.backends` dispatches to for ``backend="triton"``.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported); that is how the test suite checks them on machines without a GPU.
"""

from robalign.library import public_functions  # absolute: from the repo root `kernels` is also importable top-level
from .logps import block_size, empty_grad_like, rows_lse_target, rows_softmax_grad


sequence_logps, sequence_logps_with_ref, linear_sequence_logps = public_functions("triton")


__all__ = ["sequence_logps", "linear_sequence_logps", "sequence_logps_with_ref", "rows_lse_target", "rows_softmax_grad",
           "empty_grad_like", "block_size"]
