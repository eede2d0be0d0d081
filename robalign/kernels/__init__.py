"""robalign.kernels — Triton GPU kernels, whose modules live in the repository's top-level
``kernels/`` folder.

The row kernels of the ``"triton"`` backend (:mod:`robalign.ops.registry`). Each op follows one
chain of names: ``_<op>_<fwd|bwd>_kernel`` (``@triton.jit``) → the launcher (allocates, builds the
grid) → the ``torch.library`` operator in :mod:`robalign.ops.library` → the public function in
:mod:`robalign`. The kernel modules import nothing of robalign.

Where the modules are found: a built package (wheel, ``pip install .``) holds them beside this
file (setup.py copies ``kernels/*.py`` here); a source checkout (the clone itself, or an editable
install) has them only in the top-level ``kernels/`` folder, which is added to ``__path__`` below.
That folder has no ``__init__.py`` on purpose: from the clone's root it is on ``sys.path``, and a
regular package there would shadow Hugging Face's ``kernels`` (which transformers imports).
Without one it is at most a namespace portion, which any installed ``kernels`` outranks and
transformers does not take for an installation.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported); that is how the test suite checks them on machines without a GPU.
"""

from pathlib import Path

if not Path(__file__).with_name("logps.py").is_file():          # a source checkout
    __path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821 (a package's own)

from .logps import block_size, empty_grad_like, rows_lse_target, rows_softmax_grad  # noqa: E402

__all__ = ["rows_lse_target", "rows_softmax_grad", "empty_grad_like", "block_size"]
