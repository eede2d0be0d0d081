"""CPU buffers of the heavy ops kept by the thread for the next call: workspaces (``kept``), on huge
pages, and the blocks of results handed to the caller (``recycled``), reused once the caller drops them.

A buffer that lives for one call is a plain ``torch.empty``: fresh huge pages are the wrong memory
for it on a VM whose balloon reports free 2 MiB blocks to the host (this project's machine). Such a
block, once the host has taken it back, costs host faults on first touch: 290–780 ms per 545 MB
against ~105 ms on plain pages when seconds pass between calls, as in a training step
(docs/benchmarks.md). Kept buffers stay warm, and huge pages spare their TLB entries. A fresh
``[V, H]`` head gradient costs its first touch even on plain pages (64 MB: 13–16 ms here, 10 % of
the one-pass loss at 384 tokens), which a recycled block does not. On CUDA the caching allocator
keeps memory already.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

__all__ = ["kept", "lend", "give_back", "recycles", "recycled", "forget", "release"]

_KEPT = threading.local()
_RECYCLED = threading.local()
_RELEASES = threading.local()                                           # release() calls so far


def _huge(rows, numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU buffer of ``numel`` elements, on huge pages through the row-kernel module
    ``rows``' ``empty_huge`` (the C++ backend's) where it has one."""
    make = getattr(rows, "empty_huge", None)
    return make([numel], dtype) if make is not None else torch.empty(numel, dtype=dtype)


def _keeping(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("ROBALIGN_KEEP_WORKSPACE", "1") != "0"


def kept(rows, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A workspace of ``shape``: on CPU a view of a buffer this thread keeps for the next call under
    ``name`` (``"logits"``: a chunk of logits, of the one-pass loss or the token statistics, one call
    at a time; ``"product"``: a row tile of grad_W's per-chunk product; ``"transposed"``: a block of a
    chunk's unit gradient, transposed), grown when too small. What is kept: at most one chunk (the
    chunk rule's ``MAX_BYTES``; up to ``V·H·4`` bytes more for a bfloat16 head's call in the one-chunk
    room of :func:`robalign.ops.one_pass.default_chunk`), one tile (16 MB in bfloat16) and one
    transposed block (8 MB; see :mod:`robalign.ops.one_pass`); ``ROBALIGN_KEEP_WORKSPACE=0`` frees them
    after each call. Off the CPU, or with that setting, a fresh buffer (on plain pages: it lives for
    one call)."""
    if not _keeping(device):
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = getattr(_KEPT, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        setattr(_KEPT, name, None)                                      # free the old one first
        buffer = _huge(rows, numel, dtype)
        setattr(_KEPT, name, buffer)
    return buffer[:numel].view(shape)


def lend(name: str) -> tuple[Tensor, int] | None:
    """Take the buffer kept under ``name`` out of the keeping, for a result that reads it after the call
    (the one-pass loss's last chunk, whose head-gradient product its backward forms): the next call
    gets a buffer of its own, so nothing overwrites this one while it is lent. Returns ``(buffer,
    ticket)`` for :func:`give_back`, or None where nothing is kept (off the CPU, or
    ``ROBALIGN_KEEP_WORKSPACE=0``: the caller's view then holds a buffer no one else has)."""
    buffer = getattr(_KEPT, name, None)
    if buffer is None:
        return None
    setattr(_KEPT, name, None)
    return buffer, getattr(_RELEASES, "count", 0)


def give_back(name: str, loan: tuple[Tensor, int] | None) -> None:
    """Keep a buffer lent by :func:`lend` again, unless another is kept under ``name`` by now (a call
    ran while it was lent) or :func:`release` ran since it was lent (a training step between its
    forward and its backward: the model's backward, after this, gets the memory)."""
    if loan is None:
        return
    buffer, ticket = loan
    if getattr(_KEPT, name, None) is None and ticket == getattr(_RELEASES, "count", 0):
        setattr(_KEPT, name, buffer)


def recycles(rows, device: torch.device) -> bool:
    """Whether :func:`recycled` can hand out a kept block here: on CPU, blocks kept, and the row-kernel
    module ``rows`` has ``storage_use_count`` (the C++ backend's). Only it counts a storage's holders
    without making a Python storage object, which would stay tied to the storage as one more holder,
    so that autograd could no longer add a tied head's other gradient into the block in place."""
    return _keeping(device) and hasattr(rows, "storage_use_count")


def recycled(rows, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` for a result the caller gets (the one-pass
    loss's head gradient, ``"grad_weight"``, or that gradient narrowed from a float32 buffer). On CPU
    with the row-kernel module ``rows`` of the C++ backend, its memory is the block of the last
    tensor this thread made under ``name`` when nothing holds that one any more (the caller dropped
    it: ``optimizer.zero_grad()``) and shape and dtype match, else a fresh block on plain pages,
    remembered in its place. The tensor is not a view and shares its block with no Python storage
    object, so autograd takes it as a parameter's ``.grad`` without a copy and adds another gradient
    into it in place; a block in use is never handed out twice. What is held: one block per name
    once its tensor is dropped, until the next call, :func:`forget` (a result about to be dropped
    inside a backward), :func:`release` or, with ``ROBALIGN_KEEP_WORKSPACE=0``, not at all (a fresh
    block each call). Off the CPU, or without the C++ backend's count, a fresh tensor."""
    if not recycles(rows, device):
        return torch.empty(shape, dtype=dtype, device=device)
    block = getattr(_RECYCLED, name, None)
    if block is None or block.shape != tuple(shape) or block.dtype != dtype or rows.storage_use_count(block) > 1:
        setattr(_RECYCLED, name, None)                                  # whoever holds it keeps it
        block = torch.empty(shape, dtype=dtype, device=device)
        setattr(_RECYCLED, name, block)
    return torch.empty(0, dtype=dtype, device=device).set_(block)


def forget(tensor: Tensor) -> None:
    """Stop recycling ``tensor``'s block, if :func:`recycled` made it: it is freed when its holders
    drop it. For a result that will be dropped inside a backward (added into an existing ``.grad``,
    or copied), whose block must not sit through the rest of that backward, where a training step's
    memory peaks."""
    if not tensor.numel():
        return
    for name, block in list(vars(_RECYCLED).items()):
        if block is not None and block.data_ptr() == tensor.data_ptr():
            setattr(_RECYCLED, name, None)


def release() -> None:
    """Free the buffers this thread keeps (:func:`kept`) and forget the blocks it would recycle
    (:func:`recycled`; a tensor in use keeps its block). A training step calls it once its forward is
    done: the model's backward, where the step's memory peaks, then has that memory (at
    Qwen2.5-0.5B's vocabulary a chunk of logits is 512 MiB), and no gradient's block outlives the
    gradient. The next forward touches fresh pages again: about 6 ms per 512 MiB on huge pages the
    guest still holds, far more on ones its balloon gave back to the host (docs/benchmarks.md). A
    buffer lent (:func:`lend`) is freed when its borrower is done with it, not given back."""
    for store in (_KEPT, _RECYCLED):
        for name in list(vars(store)):
            setattr(store, name, None)
    _RELEASES.count = getattr(_RELEASES, "count", 0) + 1
