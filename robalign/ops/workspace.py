"""CPU buffers of the heavy ops: uninitialised and on huge pages (``empty``), or kept by the thread
for the next call (``kept``). A fresh CPU buffer's first touch costs a page fault every 4 KiB, and
the kernel zeroes every fresh page: for a 100 MB chunk of logits that was 2–5 % of the one-pass loss
against matmuls writing into warm memory. On CUDA the caching allocator keeps memory already.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

__all__ = ["empty", "kept", "release"]

_KEPT = threading.local()


def empty(rows, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``shape`` buffer: on CPU on huge pages through the row-kernel module ``rows``'
    ``empty_huge`` (the C++ backend's) where it has one."""
    make = getattr(rows, "empty_huge", None)
    if make is not None and device.type == "cpu":
        return make(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def kept(rows, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A workspace of ``shape``: on CPU a view of a buffer this thread keeps for the next call under
    ``name`` (``"logits"``: a chunk of logits, of the one-pass loss or the token statistics, one call
    at a time; ``"product"``: a row tile of grad_W's per-chunk product), grown when too small. What is
    kept: at most one chunk (the chunk rule's ``MAX_BYTES``; up to ``V·H·4`` bytes more for a
    bfloat16 head's call in the one-chunk room of :func:`robalign.ops.one_pass.default_chunk`)
    and one tile (16 MB in bfloat16, see :mod:`robalign.ops.one_pass`); ``ROBALIGN_KEEP_WORKSPACE=0``
    frees them after each call. Elsewhere a fresh :func:`empty` buffer."""
    if device.type != "cpu" or os.environ.get("ROBALIGN_KEEP_WORKSPACE", "1") == "0":
        return empty(rows, shape, dtype, device)
    numel = math.prod(shape)
    buffer = getattr(_KEPT, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        setattr(_KEPT, name, None)                                      # free the old one first
        buffer = empty(rows, (numel,), dtype, device)
        setattr(_KEPT, name, buffer)
    return buffer[:numel].view(shape)


def release() -> None:
    """Free the buffers this thread keeps (:func:`kept`). A training step calls it once its forward is
    done: the model's backward, where the step's memory peaks, then has that memory (at Qwen2.5-0.5B's
    vocabulary a chunk of logits is 512 MiB), and the next forward touches fresh pages again, about
    6 ms per 512 MiB on huge pages (docs/benchmarks.md)."""
    for name in list(vars(_KEPT)):
        setattr(_KEPT, name, None)
