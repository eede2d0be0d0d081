"""robalign.kernels — Triton GPU kernels (installed from the top-level kernels/ folder).

The row kernels of the ``"triton"`` backend (:mod:`robalign.ops.registry`). Each op follows one
chain of names: ``_<op>_<fwd|bwd>_kernel`` (``@triton.jit``) → the launcher (allocates, builds the
grid) → the ``torch.library`` operator in :mod:`robalign.ops.library` → the public function in
:mod:`robalign`. This package imports nothing of robalign: from the repo root the folder is also
importable as a top-level ``kernels`` (transformers probes for one), and must stay harmless there.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported); that is how the test suite checks them on machines without a GPU.
"""

from .logps import block_size, empty_grad_like, rows_lse_target, rows_softmax_grad

__all__ = ["rows_lse_target", "rows_softmax_grad", "empty_grad_like", "block_size"]
