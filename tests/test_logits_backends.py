"""Kernel backends of the logits path against the float64 reference, forward and gradient.

Tolerances (float32 logits): the kernels accumulate in float32 and use a vectorised exp with
≤ 20 ulp error (≈ 2.4e-6 relative), so per-sequence log-probs match to 1e-5 relative (the issue's
bound) and each gradient element ``coeff·(onehot − softmax)`` to 1e-5 relative plus 1e-6·|coeff|.
bfloat16 logits: the error against the float64 reference must stay within 2× PyTorch's own
error when it computes the same thing in bfloat16 (log_softmax + gather + autograd).
"""

import pytest
import torch

import robalign
from robalign import backends, ground_truth
from conftest import KERNEL_BACKENDS, packed_from_padded, random_batch, torch_threads

CUDA = torch.cuda.is_available()
# (backend, device): the C++ kernels on CPU; the Triton kernels compiled on CUDA, or under
# TRITON_INTERPRET=1 on CPU tensors where there is no GPU (conftest sets it).
# The chunked PyTorch backend runs on CPU, and on CUDA when there is one.


@pytest.fixture(autouse=True)
def small_row_chunks(monkeypatch):
    """Row chunks of 1 KiB of float32, so the chunked PyTorch backend takes several chunks."""
    from robalign.ops import chunked

    monkeypatch.setattr(chunked, "ROW_CHUNK_BYTES", 1 << 10)


@pytest.fixture(autouse=True)
def poison_empty(request, monkeypatch):
    """Every torch.empty float tensor starts as NaN, so an output element a kernel forgets to
    write fails the comparison instead of passing on leftover memory. Not under ``real_empty``:
    torch.compile must trace torch's own ``empty`` (Dynamo lists torch's functions once, on its
    first trace; a Python stand-in there leaves the real one unknown to every later compile)."""
    if request.node.get_closest_marker("real_empty"):
        return
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def run(backend, logits, labels, coeff, **kw):
    name, device = backend
    z = logits.detach().clone().to(device).requires_grad_(True)
    logps, counts = robalign.sequence_logps(z, labels.to(device), backend=name, **kw)
    (logps * coeff.to(device)).sum().backward()
    return logps.cpu(), counts.cpu(), z.grad.cpu()


def ref_run(logits, labels, coeff, **kw):
    return run(("reference", "cpu"), logits.double().cpu(), labels.cpu(), coeff.double(), **kw)


def assert_close_f32(got, want, coeff):
    logps, counts, grad = got
    rlogps, rcounts, rgrad = want
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(logps.double(), rlogps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6 * coeff.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 5, 1000), (4, 3, 2), (1, 9, 4099), (2, 2, 262144)])
def test_padded_float32(backend, shape):
    logits, labels = random_batch(*shape, dtype=torch.float32, all_ignored=(shape[0] - 1,))
    coeff = torch.randn(shape[0]) * 2.5                       # grad_output ≠ 1, per sequence
    got = run(backend, logits, labels, coeff)
    assert got[0][-1].item() == 0 and got[1][-1].item() == 0 and (got[2][-1] == 0).all()
    assert_close_f32(got, ref_run(logits, labels, coeff), coeff)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_packed_with_empty_segment(backend):
    logits, labels = random_batch(4, 6, 53, dtype=torch.float32)
    lengths = [6, 0, 3, 5]
    z, y, cu = packed_from_padded(logits, labels, lengths)
    coeff = torch.tensor([1.5, -2.0, 0.5, 3.0])
    got = run(backend, z, y, coeff, cu_seqlens=cu.to(backend[1]))
    assert_close_f32(got, ref_run(z, y, coeff, cu_seqlens=cu), coeff)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_view_is_read_in_place(backend):
    logits, labels = random_batch(3, 8, 41, dtype=torch.float32)
    view, view_labels = logits[:, :-1], labels[:, 1:]        # non-contiguous rows, no copy
    assert not view.is_contiguous()
    coeff = torch.tensor([2.0, -1.0, 0.5])
    assert_close_f32(run(backend, view, view_labels, coeff), ref_run(view, view_labels, coeff), coeff)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorch_error(backend, dtype):
    logits, labels = random_batch(4, 9, 301, dtype=dtype, all_ignored=(2,))
    coeff = torch.tensor([1.0, -2.0, 3.0, 0.5])
    logps, _, grad = run(backend, logits, labels, coeff)
    rlogps, _, rgrad = ref_run(logits, labels, coeff)
    # PyTorch in the same dtype: log_softmax + gather + autograd, all in `dtype`
    z = logits.detach().clone().requires_grad_(True)               # PyTorch's bf16 path, on CPU
    mask = labels != -100
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch_logps = tok.sum(-1)
    (torch_logps * coeff.to(dtype)).sum().backward()
    err = lambda a, b: (a.double() - b).norm().item()
    assert err(logps, rlogps) <= 2 * err(torch_logps, rlogps) + 1e-6
    assert err(grad, rgrad) <= 2 * err(z.grad, rgrad) + 1e-6
    assert grad.dtype == dtype and (grad[2] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward_writes_every_element_into_the_logits(backend):
    logits, labels = random_batch(3, 6, 77, dtype=torch.float32, all_ignored=(1,))
    coeff = torch.tensor([1.0, 2.0, -3.0])
    name, device = backend
    base = logits.clone().to(device).requires_grad_(True)
    buffer = base * 1.0                                       # a non-leaf, as an LM head's output
    logps, _ = robalign.sequence_logps(buffer, labels.to(device), backend=name, inplace_backward=True)
    (logps * coeff.to(device)).sum().backward()
    _, _, want = ref_run(logits, labels, coeff)
    torch.testing.assert_close(base.grad.double().cpu(), want, rtol=1e-5, atol=1e-5)
    # the buffer now holds the gradient: a row left unwritten would still hold logits
    torch.testing.assert_close(buffer.detach().double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_cpp_one_and_two_threads_agree_bitwise():
    backend = ("cpp", "cpu")
    logits, labels = random_batch(6, 11, 517, dtype=torch.float32)
    coeff = torch.randn(6)
    with torch_threads(1):
        one = run(backend, logits, labels, coeff)
    with torch_threads(2):
        two = run(backend, logits, labels, coeff)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_auto_picks_cpp_for_cpu_tensors():
    assert backends.resolve("f", "auto", torch.zeros(1)).name == "cpp"


def test_cpp_rejects_float64_with_a_pointer_to_the_reference():
    logits, labels = random_batch(2, 3, 5)
    with pytest.raises(TypeError, match=r"backend 'cpp' takes float32/bfloat16/float16 `logits`, got torch.float64 \(use backend='reference'\)"):
        robalign.sequence_logps(logits, labels, backend="cpp")


def test_missing_extension_warns_with_the_fix():
    from robalign.ops import _cpp
    with pytest.warns(RuntimeWarning, match=r"pip install --no-build-isolation"):
        assert _cpp._unavailable("no compiler") is None


COMPILE_CASES = [pytest.param(("cpp", "cpu"), id="cpp"),
                 pytest.param(("triton", "cuda"), id="triton-cuda",
                              marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: "
                                     "torch.compile cannot trace a Triton op on CPU tensors under the interpreter")])]


@pytest.mark.slow
@pytest.mark.real_empty
@pytest.mark.parametrize("backend", COMPILE_CASES)
def test_torch_compile_fullgraph_traces_the_op(backend):
    name, device = backend
    logits, labels = random_batch(4, 5, 33, dtype=torch.float32, device=device)
    ref_logps = torch.randn(4, device=device)
    loss_fn = robalign.DoRALoss("dpo", backend=name)

    def step(z):
        return loss_fn(logits=z, labels=labels, ref_logps=ref_logps).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    compiled(z1).backward()
    step(z2).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16])
def test_policy_and_reference_in_one_pass(backend, ref_dtype):
    name, device = backend
    logits, labels = random_batch(4, 6, 97, dtype=torch.float32, all_ignored=(3,), device=device)
    ref_logits = (torch.randn(4, 6, 97) * 2).to(ref_dtype).to(device)
    z = logits.clone().requires_grad_(True)
    logps, ref_logps, counts = robalign.sequence_logps_with_ref(z, ref_logits, labels, backend=name)
    want_ref, _ = ground_truth.sequence_logps(ref_logits.double().cpu(), labels.cpu())
    torch.testing.assert_close(ref_logps.double().cpu(), want_ref, rtol=1e-5, atol=1e-5)
    assert not ref_logps.requires_grad
    coeff = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (logps * coeff.to(device)).sum().backward()
    assert_close_f32((logps.cpu(), counts.cpu(), z.grad.cpu()), ref_run(logits, labels, coeff), coeff)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dora_loss_on_the_kernel_backend_matches_reference(backend):
    name, device = backend
    logits, labels = random_batch(8, 5, 61, dtype=torch.float32, all_ignored=(2,), device=device)
    ref_logits = torch.randn(8, 5, 61).to(device)
    probs = torch.rand(8)
    outs = []
    for b, dev in ((name, device), ("reference", "cpu")):
        z = logits.clone().to(dev).requires_grad_(True)
        loss_fn = robalign.DoRALoss("dpo", beta=0.5, lam=0.7, alpha=0.3, backend=b)
        out = loss_fn(logits=z, labels=labels.to(dev), ref_logits=ref_logits.to(dev), probs=probs.to(dev))
        (3.0 * out.loss).backward()
        outs.append((out.loss.detach().cpu().double(), z.grad.cpu().double()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the interpreter compiles nothing")
def test_triton_new_token_counts_and_strides_do_not_recompile():
    """New token counts and strided views of the same alignment class reuse the compiled kernels
    (V = 1024: every stride is a multiple of 16 elements, whatever T)."""
    from robalign.kernels import logps as triton_logps

    def compiled_count():
        total = 0
        for kernel in (triton_logps._rows_lse_target_fwd_kernel, triton_logps._rows_softmax_grad_bwd_kernel):
            while not hasattr(kernel, "device_caches") and hasattr(kernel, "fn"):     # @heuristics wraps it
                kernel = kernel.fn
            try:
                total += sum(len(entry[0]) for entry in kernel.device_caches.values())
            except (AttributeError, TypeError, IndexError, KeyError):
                pytest.skip("this Triton version keeps its kernel cache elsewhere")
        return total

    def step(tokens, view):
        logits, labels = random_batch(3, tokens, 1024, dtype=torch.bfloat16, device="cuda")
        z = logits.requires_grad_(True)
        z, y = (z[:, 1:], labels[:, 1:]) if view else (z, labels)
        robalign.sequence_logps(z, y, backend="triton")[0].sum().backward()

    step(7, False)
    step(33, True)                                             # warm: one compile each
    before = compiled_count()
    assert before > 0
    for tokens in (5, 64, 129, 300):
        step(tokens, False)
        step(tokens, True)
    assert compiled_count() == before
