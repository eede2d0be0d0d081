"""The hot path reads no tensor value on the host: a DoRALoss step on the logits path (padded
and packed, with probabilities, weights and scores) and the exact accumulator, with lazy value
checks, on every kernel backend. On CPU a read is caught by making every host read raise; on a
GPU the same test runs under ``torch.cuda.set_sync_debug_mode("error")``. The lazy checks are
then read at once by ``raise_pending`` — and report a bad label there."""

import contextlib

import pytest
import torch

import robalign
from robalign import _validation
from conftest import KERNEL_BACKENDS, packed_from_padded, random_batch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = KERNEL_BACKENDS        # every kernel backend of the registry (conftest)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def no_host_reads(monkeypatch, device):
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            def refuse(self, *args, _name=name, **kwargs):
                raise AssertionError(f"the hot path read a tensor value on the host (Tensor.{_name})")
            patch.setattr(torch.Tensor, name, refuse)
        yield


def inputs(device, packed):
    logits, labels = random_batch(8, 6, 53, dtype=torch.float32, all_ignored=(3,))
    ref = torch.randn(8, dtype=torch.float32)
    cu = None
    if packed:
        logits, labels, cu = packed_from_padded(logits, labels, [6, 2, 5, 0, 6, 3, 4, 6])
        cu = cu.to(device)
    probs, scores = torch.rand(8), torch.randn(8)
    return logits.to(device), labels.to(device), ref.to(device), probs.to(device), scores.to(device), cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_doraloss_step_reads_nothing_on_the_host(monkeypatch, backend, packed):
    name, device = backend
    logits, labels, ref, probs, scores, cu = inputs(device, packed)
    z = logits.clone().requires_grad_(True)
    param = torch.nn.Parameter(torch.zeros((), device=device))
    loss_fn = robalign.DoRALoss("dpo", beta=0.5, lam=0.7, alpha=0.3, backend=name)
    acc = robalign.KLDROAccumulator([param], lam=0.7)
    with _validation.value_checks("lazy"), no_host_reads(monkeypatch, device):
        out = loss_fn(logits=z, labels=labels, ref_logps=ref, probs=probs, scores=scores, cu_seqlens=cu)
        (2.0 * out.loss).backward()
        for part in out.losses.detach().chunk(2):
            acc(part + param, None).backward()
        shifted = robalign.shift_labels(labels, cu_seqlens=cu) if packed else robalign.shift_labels(labels)
    _validation.raise_pending()                                  # nothing failed
    eager = robalign.DoRALoss("dpo", beta=0.5, lam=0.7, alpha=0.3, backend=name)(
        logits=logits, labels=labels, ref_logps=ref, probs=probs, scores=scores, cu_seqlens=cu)
    torch.testing.assert_close(out.loss.detach(), eager.loss, rtol=0, atol=0)
    assert torch.isfinite(z.grad).all() and acc.loss == pytest.approx(robalign.kl_dro(out.losses.detach(), lam=0.7).item())
    assert shifted.shape == labels.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_label_is_reported_by_the_lazy_check(backend):
    name, device = backend
    logits, labels = random_batch(2, 4, 11, dtype=torch.float32)
    labels[1, 2] = 11                                             # outside [0, V)
    with _validation.value_checks("lazy"):
        logps, _ = robalign.sequence_logps(logits.to(device), labels.to(device), backend=name)
    assert torch.isnan(logps[1]) and torch.isfinite(logps[0])     # never read out of bounds
    with pytest.raises(ValueError, match=r"robalign.sequence_logps: `labels` must lie in \[0, 11\)"):
        _validation.raise_pending()
    _validation.raise_pending()                                   # read once, then cleared
