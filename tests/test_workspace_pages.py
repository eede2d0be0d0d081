"""Which CPU memory the heavy ops take (robalign.ops.workspace): a workspace kept across calls on huge
pages, every buffer that outlives its call on plain pages. On a VM whose balloon reports free 2 MiB
blocks to the host, a fresh huge page costs host faults on first touch (docs/benchmarks.md), so a
gradient handed to autograd must not be one. Read from /proc/self/smaps: where transparent huge pages
are in ``madvise`` mode, only memory the ops asked for gets them."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

import robalign
from robalign.ops import registry, workspace

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_madvise() -> bool:
    try:
        with open(THP) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not _thp_madvise(), reason=f"needs Linux with {THP} in madvise mode"),
    pytest.mark.skipif(registry.get("cpp").missing(torch.device("cpu")) is not None, reason="needs the C++ backend"),
]


def _huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping that holds ``t``'s first byte."""
    return _huge_kb_at(t.data_ptr())


def _huge_kb_at(ptr: int) -> int:
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds address {ptr:#x}")


def _kernel_gives_huge_pages() -> bool:
    """Whether the kernel, now, backs a fresh 16 MiB mapping advised MADV_HUGEPAGE with huge pages. It
    may decline (memory too fragmented for a free 2 MiB block, compaction off): the advice is a hint,
    seen declined on a CI machine in madvise mode."""
    with mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as probe:
        probe.madvise(mmap.MADV_HUGEPAGE)
        probe.write(b"\1" * len(probe))
        first = ctypes.c_char.from_buffer(probe)
        ptr = ctypes.addressof(first)
        del first                                                       # or the mapping cannot close
        return _huge_kb_at(ptr) > 0


# a [V, H] bfloat16 gradient of 34 MB: above glibc's largest mmap threshold (32 MiB), so every buffer
# this size is a fresh mapping, never a reused heap chunk already faulted in on small pages
V, H = 17000, 1024


def _gradients(dtype, chunk_mb, monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(8, 64, H).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H) / H ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(V, (8, 64))
    labels[:, :8] = -100
    if chunk_mb is not None:
        monkeypatch.setenv("ROBALIGN_CHUNK_MB", str(chunk_mb))
    fn = robalign.FusedLinearDoRALoss(robalign.Objective("dpo", beta=0.1), robalign.KLDRO(1.0),
                                      robalign.DoRAWeights(0.25), params=robalign.LossParams(backend="cpp"))
    loss = fn(hidden, weight, labels, torch.randn(8) - 300, probs=torch.rand(4, 1).expand(-1, 2)).loss
    return torch.autograd.grad(loss, (hidden, weight))


def test_the_kept_logits_workspace_is_on_huge_pages():
    from robalign.ops import cpu

    def fresh():
        workspace.release()
        buffer = workspace.kept(cpu, "logits", (1024, 8192), torch.float32, torch.device("cpu"))
        return buffer.fill_(1.0)

    buffer = fresh()
    if not _huge_kb(buffer):
        if not _kernel_gives_huge_pages():
            workspace.release()
            pytest.skip("the kernel now gives no huge page even to a plain madvised mapping (a hint it may decline)")
        buffer = fresh()                        # the kernel gives them now, so a fresh workspace gets them too
    assert _huge_kb(buffer) > 0, "a workspace kept across calls should be on huge pages (the control)"
    workspace.release()


def test_a_workspace_not_kept_is_on_plain_pages(monkeypatch):
    from robalign.ops import cpu

    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")                 # it lives for one call
    buffer = workspace.kept(cpu, "logits", (1024, 9000), torch.float32, torch.device("cpu"))
    buffer.fill_(1.0)
    assert _huge_kb(buffer) == 0


@pytest.mark.parametrize("dtype,chunk_mb", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 1)],
                         ids=["float32", "bfloat16-one-chunk", "bfloat16-float32-buffer"])
def test_one_pass_gradients_are_on_plain_pages(dtype, chunk_mb, monkeypatch):
    grad_h, grad_w = _gradients(dtype, chunk_mb, monkeypatch)
    assert grad_w.nbytes > 32 << 20 and torch.isfinite(grad_w.float()).all()
    assert _huge_kb(grad_w) == 0


def test_the_materialised_logits_gradient_is_on_plain_pages():
    logits = torch.randn(1, 1024, V, requires_grad=True)                 # 70 MB
    labels = torch.randint(V, (1, 1024))
    logps, _ = robalign.sequence_logps(logits, labels, backend="cpp")
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    assert _huge_kb(grad) == 0
