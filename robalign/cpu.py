"""The ``"cpp"`` backend: the heavy ops on CPU tensors through the C++ extension (csrc/).

Importing this module loads (or builds once) the extension and raises ImportError when it
cannot, which :mod:`robalign.backends` reports for a forced backend and skips under "auto".
"""

from __future__ import annotations

from . import _cpp, library

if _cpp.load() is None:
    raise ImportError("the C++ extension robalign._C could not be built or loaded")


def sequence_logps(logits, labels, *, ignore_index=-100, cu_seqlens=None, inplace_backward=False):
    """:func:`robalign.sequence_logps` with the C++ row kernels."""
    return library.sequence_logps(logits, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens, kernel="cpp",
                                  inplace_backward=inplace_backward)
