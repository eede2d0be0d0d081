"""CPU buffers of the heavy ops kept by the thread for the next call (``kept``), on huge pages.

A buffer that lives for one call is a plain ``torch.empty``: fresh huge pages are the wrong memory
for it on a VM whose balloon reports free 2 MiB blocks to the host (this project's machine). Such a
block, once the host has taken it back, costs host faults on first touch: 290–780 ms per 545 MB
against ~105 ms on plain pages when seconds pass between calls, as in a training step
(docs/benchmarks.md). Kept buffers stay warm, and huge pages spare their TLB entries. On CUDA the
caching allocator keeps memory already.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

__all__ = ["kept", "release"]

_KEPT = threading.local()


def _huge(rows, numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU buffer of ``numel`` elements, on huge pages through the row-kernel module
    ``rows``' ``empty_huge`` (the C++ backend's) where it has one."""
    make = getattr(rows, "empty_huge", None)
    return make([numel], dtype) if make is not None else torch.empty(numel, dtype=dtype)


def kept(rows, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A workspace of ``shape``: on CPU a view of a buffer this thread keeps for the next call under
    ``name`` (``"logits"``: a chunk of logits, of the one-pass loss or the token statistics, one call
    at a time; ``"product"``: a row tile of grad_W's per-chunk product), grown when too small. What is
    kept: at most one chunk (the chunk rule's ``MAX_BYTES``; up to ``V·H·4`` bytes more for a
    bfloat16 head's call in the one-chunk room of :func:`robalign.ops.one_pass.default_chunk`)
    and one tile (16 MB in bfloat16, see :mod:`robalign.ops.one_pass`); ``ROBALIGN_KEEP_WORKSPACE=0``
    frees them after each call. Off the CPU, or with that setting, a fresh buffer (on plain pages: it
    lives for one call)."""
    if device.type != "cpu" or os.environ.get("ROBALIGN_KEEP_WORKSPACE", "1") == "0":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = getattr(_KEPT, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        setattr(_KEPT, name, None)                                      # free the old one first
        buffer = _huge(rows, numel, dtype)
        setattr(_KEPT, name, buffer)
    return buffer[:numel].view(shape)


def release() -> None:
    """Free the buffers this thread keeps (:func:`kept`). A training step calls it once its forward is
    done: the model's backward, where the step's memory peaks, then has that memory (at Qwen2.5-0.5B's
    vocabulary a chunk of logits is 512 MiB), and the next forward touches fresh pages again, about
    6 ms per 512 MiB on huge pages the guest still holds, far more on ones its balloon gave back to the
    host (docs/benchmarks.md)."""
    for name in list(vars(_KEPT)):
        setattr(_KEPT, name, None)
