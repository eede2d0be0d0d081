"""The fused linear path (chunked matmuls + row kernels) against the float64 reference.

Tolerances, float32: each chunk's logits come from a float32 matmul (error ≈ √H·ulp·|h||w|),
then the row kernels of test_logits_backends; log-probs match to 1e-5 relative and the three
gradients, sums of C·H-term float32 products, to 1e-5 relative plus 1e-5·scale absolute.
bfloat16: within 2× the error of PyTorch computing the same thing in bfloat16.
"""

import json
import subprocess
import sys

import pytest
import torch

import robalign
from robalign.ops import linear
from conftest import KERNEL_BACKENDS, packed_from_padded

CUDA = torch.cuda.is_available()
BACKENDS = KERNEL_BACKENDS        # every kernel backend of the registry (conftest)


def problem(s, t, h, v, *, dtype=torch.float32, bias=True, all_ignored=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 3
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    labels = torch.randint(v, (s, t), generator=gen)
    labels[torch.rand(s, t, generator=gen) < 0.3] = -100
    for row in all_ignored:
        labels[row] = -100
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(hidden), cast(weight), cast(b), labels


def run(backend, hidden, weight, bias, labels, coeff, **kw):
    name, device = backend
    leaves = [None if x is None else x.detach().clone().to(device).requires_grad_(True) for x in (hidden, weight, bias)]
    logps, counts = robalign.linear_sequence_logps(leaves[0], leaves[1], labels.to(device), bias=leaves[2],
                                                   backend=name, **kw)
    (logps * coeff.to(device, logps.dtype)).sum().backward()
    grads = [None if x is None else x.grad.cpu() for x in leaves]
    return [logps.detach().cpu(), counts.cpu(), *grads]


def ref_run(hidden, weight, bias, labels, coeff, **kw):
    d = lambda x: None if x is None else x.double()
    return run(("reference", "cpu"), d(hidden), d(weight), d(bias), labels, coeff.double(), **kw)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 tokens, so every test takes several chunks."""
    monkeypatch.setattr(linear, "chunk_tokens", lambda *args, **kwargs: 3)


def assert_close(got, want, rtol=1e-5):
    assert torch.equal(got[1], want[1])
    for g, w in zip([got[0], *got[2:]], [want[0], *want[2:]]):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,v,bias", [(24, 1000, True), (24, 1000, False), (24, 32001, True), (8, 2, False)])
def test_float32_forward_and_all_gradients(backend, small_chunks, h, v, bias):
    args = problem(3, 7, h, v, bias=bias, all_ignored=(1,))
    coeff = torch.tensor([2.5, -1.0, 0.5])
    got = run(backend, *args, coeff)
    assert got[0][1] == 0 and got[1][1] == 0 and (got[2][1] == 0).all()
    assert_close(got, ref_run(*args, coeff))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_input(backend, small_chunks):
    hidden, weight, bias, labels = problem(4, 6, 16, 333)
    lengths = [6, 0, 2, 5]
    h, y, cu = packed_from_padded(hidden, labels, lengths)
    coeff = torch.tensor([1.0, 2.0, -1.5, 0.5])
    got = run(backend, h, weight, bias, y, coeff, cu_seqlens=cu.to(backend[1]))
    assert_close(got, ref_run(h, weight, bias, y, coeff, cu_seqlens=cu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_gets_no_gradient(backend, small_chunks):
    hidden, weight, _, labels = problem(2, 5, 12, 50, bias=False)
    name, device = backend
    h = hidden.clone().to(device).requires_grad_(True)
    logps, _ = robalign.linear_sequence_logps(h, weight.to(device), labels.to(device), backend=name)
    logps.sum().backward()
    want = ref_run(hidden, weight, None, labels, torch.ones(2))[2]
    torch.testing.assert_close(h.grad.cpu().double(), want, rtol=1e-5, atol=1e-5)


def assert_within_twice_pytorch_error(got, want, args, coeff):
    """Each output's error against the float64 reference is at most twice that of PyTorch
    computing the same thing in the inputs' dtype (materialised logits, log_softmax, gather,
    autograd)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in args[:3]]
    labels = args[3]
    z = leaves[0] @ leaves[1].T + leaves[2]
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    (tok.sum(-1) * coeff.to(z.dtype)).sum().backward()
    torch_got = [tok.sum(-1).detach(), None, *[x.grad for x in leaves]]
    err = lambda a, b: (a.double() - b).norm().item()
    for i in (0, 2, 3, 4):
        assert err(got[i], want[i]) <= 2 * err(torch_got[i], want[i]) + 1e-6, f"output {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_twice_pytorch_error(backend, small_chunks):
    args = problem(3, 6, 32, 500, dtype=torch.bfloat16, all_ignored=(2,))
    coeff = torch.tensor([1.0, -2.0, 0.5])
    assert_within_twice_pytorch_error(run(backend, *args, coeff), ref_run(*args, coeff), args, coeff)


@pytest.mark.parametrize("backend", BACKENDS)
def test_256k_vocabulary_float32_within_twice_pytorch_error(backend, small_chunks):
    """V = 262144: ``grad_hidden = G @ W`` sums 262144 float32 products, so its rounding error
    (3e-5 of its largest element here, for PyTorch's float32 as for ours) is above the 1e-5
    that holds for V ≤ 32001; the bound is therefore PyTorch's own float32 error, as for
    bfloat16. The log-probs still match to 1e-5."""
    args = problem(3, 7, 8, 262144, bias=True, all_ignored=(1,))
    coeff = torch.tensor([2.5, -1.0, 0.5])
    got, want = run(backend, *args, coeff), ref_run(*args, coeff)
    assert got[0][1] == 0 and got[1][1] == 0 and (got[2][1] == 0).all()
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    assert_within_twice_pytorch_error(got, want, args, coeff)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_loss_with_hidden_states_matches_reference(backend, small_chunks):
    name, device = backend
    hidden, weight, _, labels = problem(4, 5, 16, 97, bias=False)
    ref_hidden = torch.randn_like(hidden)
    probs = torch.rand(4)
    outs = []
    for b, dev in ((name, device), ("reference", "cpu")):
        h = hidden.clone().to(dev).requires_grad_(True)
        w = weight.clone().to(dev).requires_grad_(True)
        out = robalign.DoRALoss("dpo", beta=0.5, alpha=0.4, backend=b)(
            hidden=h, head_weight=w, labels=labels.to(dev), ref_hidden=ref_hidden.to(dev), ref_head_weight=weight.to(dev),
            probs=probs.to(dev))
        (2.0 * out.loss).backward()
        outs.append([out.loss.detach().cpu().double(), h.grad.cpu().double(), w.grad.cpu().double()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_head_in_the_autocast_dtype(backend, small_chunks):
    """Under autocast, float32 leaves give what their bfloat16 casts give (as ``F.linear`` would),
    and the gradients reach the float32 leaves."""
    name, device = backend
    hidden, weight, _, labels = problem(2, 5, 24, 1000, bias=False)
    coeff = torch.tensor([1.5, -0.5])

    def leaves():
        return [x.float().to(device).requires_grad_(True) for x in (hidden, weight)]

    h, w = leaves()
    with torch.autocast(device, dtype=torch.bfloat16):
        logps, _ = robalign.linear_sequence_logps(h, w, labels.to(device), backend=name)
    (logps * coeff.to(device)).sum().backward()
    h2, w2 = leaves()
    want, _ = robalign.linear_sequence_logps(h2.bfloat16(), w2.bfloat16(), labels.to(device), backend=name)
    (want * coeff.to(device)).sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(logps, want, rtol=0, atol=0)
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_dtype_mismatch_is_a_clear_error():
    hidden, weight, _, labels = problem(2, 3, 8, 10, bias=False)
    with pytest.raises(TypeError, match=r"needs `weight` in the dtype of `hidden` \(torch.float32\), got torch.bfloat16"):
        robalign.linear_sequence_logps(hidden, weight.bfloat16(), labels, backend="cpp")


PEAK_SCRIPT = r"""
import gc, json, sys, torch, robalign
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(field + ':')) / 1024
torch.manual_seed(0)
n, h, v = 2048, 64, 32000
hidden = torch.randn(n, h, requires_grad=True)
weight = torch.randn(v, h, requires_grad=True)
labels = torch.randint(v, (n,))
cu = torch.tensor([0, n], dtype=torch.int32)
backend = sys.argv[1]
robalign.linear_sequence_logps(hidden[:2], weight, labels[:2], cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), backend=backend)
gc.collect(); Path('/proc/self/clear_refs').write_text('5'); base = status('VmRSS')
logps, _ = robalign.linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu, backend=backend)
logps.sum().backward()
print(json.dumps({"peak_mb": status('VmHWM') - base}))
"""


@pytest.mark.slow
def test_cpu_chunked_path_peak_memory_is_below_one_logits_tensor():
    """Peak resident growth of forward+backward, in a fresh process, against the size of one
    [N, V] float32 logits tensor (250 MB here); the reference is measured too, to show that the
    measurement sees a materialised path. The chunk is pinned at 64 MiB (524 tokens of 2048): the
    rule's default on CPU, 1024 tokens, would be half of this small batch."""
    import os

    logits_mb = 2048 * 32000 * 4 / 2**20
    peaks = {}
    env = dict(os.environ, ROBALIGN_CHUNK_MB="64")
    for backend in ("cpp", "torch", "reference"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, backend], capture_output=True, text=True, check=True,
                             env=env)
        peaks[backend] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peaks["cpp"] < logits_mb and peaks["torch"] < logits_mb, peaks
    assert peaks["reference"] > logits_mb, peaks


def test_chunk_rule(monkeypatch):
    """Tokens per chunk by rule: the device's target (enough rows for the matmuls to run at their
    rate), fewer when the chunk's logits would pass the memory cap; ROBALIGN_CHUNK_MB overrides."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("ROBALIGN_CHUNK_MB", raising=False)
    assert linear.chunk_tokens(32000, 4, cpu) == 1024
    assert linear.chunk_tokens(128256, 4, cpu) == 1024                  # 513 MB: under the 512 MiB cap
    assert linear.chunk_tokens(262144, 4, cpu) == 512                   # capped by memory
    assert linear.chunk_tokens(128256, 2, cuda) == 4096
    assert linear.chunk_tokens(10 ** 9, 4, cpu) == 1                    # at least one token
    spare = 256000 * 512 * 4                                            # a float32 [V, H] buffer
    assert linear.chunk_tokens(256000, 2, cpu) == 1048
    assert linear.chunk_tokens(256000, 2, cpu, tokens=2072, spare_bytes=spare) == 2072    # 1024 more: one chunk
    assert linear.chunk_tokens(256000, 2, cpu, tokens=2073, spare_bytes=spare) == 1048
    assert linear.chunk_tokens(256000, 2, cpu, tokens=2000) == 1048                        # no spare room
    assert linear.chunk_tokens(256000, 2, cpu, tokens=500, spare_bytes=spare) == 1048      # fits anyway
    monkeypatch.setenv("ROBALIGN_CHUNK_MB", "64")
    assert linear.chunk_tokens(32000, 4, cpu) == 524
    assert linear.chunk_tokens(32000, 4, cpu, tokens=530, spare_bytes=1 << 30) == 524      # a limit: not widened
