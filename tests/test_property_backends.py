"""Property-based: drawn shapes, layouts, strides, label dtypes, ignore holes, logit dtypes and
non-finite values; every kernel backend (C++, Triton under the interpreter or on CUDA, chunked
PyTorch) agrees with ``robalign.ground_truth`` in float64 on the same values — or every backend
raises the same error.

Tolerances, with the reason:
- log-probs, any dtype: the kernels read the stored values exactly and accumulate in float32, so
  they match the float64 reference to 1e-5 relative (1e-5 absolute for values near 0);
- gradients: computed in float32 and rounded once to the logits' dtype: relative 1e-5 (float32),
  2⁻⁸ (bfloat16: 8 significant bits) or 2⁻¹⁰ (float16), plus 1e-6·max|coeff| absolute for
  elements that round to (sub)normals near 0;
- gradients that are sums (the linear path's: hidden's over V, the head's and the bias's over the
  tokens) also ``(n + 8)·u·Σ|terms|``, u = 2⁻²⁴: the float32 error of a sum of n products (Higham's
  γₙ bound) and a few roundings of each term's factor, ``Σ|terms|`` from float64. An element whose
  terms cancel is far smaller than they are — at H = 1 a token's gradient is ``c·(Σ_v p_v·W_v − W_y)``,
  terms of size |W| ≈ 2–5 cancelling to 1e-2 —, which a bound relative to the element cannot cover
  (the thorough profile's draw at seed 2891, V 300: every backend 8.4e-7 to 9.0e-7 off an element of
  −1.09e-2, PyTorch's own float32 autograd 6.6e-7 off another; the bound there is 3–6e-5);
- non-finite values must be identical (NaN where the reference has NaN, the same infinities);
  the semantics are in test_kernel_reliability.py.
The draws are derandomised (the same examples on every run) and bounded, so `make test` stays
within its time budget; `HYPOTHESIS_PROFILE=thorough` draws more.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import robalign
from conftest import kernel_backends

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = tuple(kernel_backends())        # every kernel backend of the registry (conftest)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
U32 = 2.0 ** -24                            # float32's unit roundoff
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
SETTINGS = settings(max_examples=300 if THOROUGH else 30, deadline=None, derandomize=not THOROUGH,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def small_row_chunks(monkeypatch):
    """Several row chunks in the chunked PyTorch backend, as in test_logits_backends."""
    from robalign.ops import chunked

    monkeypatch.setattr(chunked, "ROW_CHUNK_BYTES", 1 << 10)


def draw_labels(data, gen, shape, vocab, ignore_index):
    """Labels of the drawn dtype and layout (contiguous, or a strided view of a wider tensor)."""
    hole_rate = data.draw(st.sampled_from([0.0, 0.3, 0.9]), label="hole_rate")
    labels = torch.randint(vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < hole_rate] = ignore_index
    if len(shape) == 2 and shape[0] > 1 and data.draw(st.booleans(), label="all_ignored_row"):
        labels[-1] = ignore_index
    dtypes = [torch.int64, torch.int32, torch.int16]
    if vocab <= 127 and ignore_index >= -128:
        dtypes.append(torch.int8)
    labels = labels.to(data.draw(st.sampled_from(dtypes), label="label_dtype"))
    if data.draw(st.booleans(), label="strided_labels"):
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=labels.dtype)
        wide[..., ::2] = labels
        labels = wide[..., ::2]
    return labels


def inject_nonfinite(data, gen, logits):
    kind = data.draw(st.sampled_from(["none", "none", "nan", "+inf", "-inf", "-inf block"]), label="nonfinite")
    rows = logits.shape[:-1].numel()
    if kind == "none" or logits.numel() == 0:
        return
    row = torch.unravel_index(torch.randint(rows, (1,), generator=gen), logits.shape[:-1])
    row = tuple(int(i) for i in row)
    vocab = logits.shape[-1]
    if kind == "-inf block":
        logits[row][: max(1, vocab * 3 // 4)] = float("-inf")
    else:
        col = int(torch.randint(vocab, (1,), generator=gen))
        logits[row][col] = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[kind]


def outcome(fn):
    """``("ok", tensors)`` or ``("error", type name, message)``."""
    try:
        return ("ok", fn())
    except (ValueError, TypeError) as err:
        return ("error", type(err).__name__, str(err))


def compare(got, want, dtypes, coeff, sums=None):
    """``got`` against ``want`` within the module's tolerances. ``sums``: per gradient, None (each element
    its own term: the logits' gradient) or ``(n, Σ|terms|)``, the terms' count and the float64 sum of
    their absolute values per element, for the sum's own float32 error (the module's docstring)."""
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1:] == want[1:]
        return
    logps, counts, *grads = got[1]
    rlogps, rcounts, *rgrads = want[1]
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(logps, rlogps, rtol=1e-5, atol=1e-5, equal_nan=True)
    scale = float(coeff.abs().max()) if coeff.numel() else 1.0
    for i, (g, r, dtype) in enumerate(zip(grads, rgrads, dtypes)):
        # plus half the dtype's smallest subnormal: what rounding into the dtype itself may cost a value
        # below its normal range (float16: 2⁻²⁵ ≈ 3e-8, which a small coefficient's gradient reaches)
        floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
        atol = 1e-6 * scale + 1e-12 + floor
        if sums is None or sums[i] is None:
            torch.testing.assert_close(g, r, rtol=GRAD_RTOL[dtype], atol=atol, equal_nan=True)
            continue
        n, magnitude = sums[i]
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g[r.isinf()], r[r.isinf()]), f"gradient {i}"
        tol = GRAD_RTOL[dtype] * r.abs() + atol + (n + 8) * U32 * magnitude.nan_to_num(0.0)
        excess = ((g - r).abs() - tol)[r.isfinite()]
        assert bool((excess <= 0).all()), f"gradient {i}: {excess.max().item():.3g} beyond the bound"


def summed_magnitudes(hidden, weight, bias, labels, coeff):
    """``(n, Σ|terms|)`` of the linear path's gradients in float64, from the values the backends get:
    hidden's ``Σ_v |G_tv|·|W_v|`` over V, the head's ``Σ_t |G_tv|·|h_t|`` and the bias's ``Σ_t |G_tv|``
    over the tokens, ``G = c_s·(softmax(z_t) − onehot(y_t))`` on scored tokens (0 on ignored ones)."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    w = weight.double()
    z = h @ w.T + (0 if bias is None else bias.double())
    g = torch.softmax(z, -1)
    y = labels.reshape(-1).long()
    scored = y != -100
    g[scored.nonzero().squeeze(1), y[scored]] -= 1
    g = (g * coeff.double().repeat_interleave(labels.shape[-1])[:, None]).abs() * scored[:, None]
    tokens = h.shape[0]
    out = [(w.shape[0], (g @ w.abs()).reshape(hidden.shape)), (tokens, g.T @ h.abs())]
    return out + ([(tokens, g.sum(0))] if bias is not None else [])


@SETTINGS
@given(data=st.data())
def test_logits_path_backends_agree_with_the_reference(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    vocab = data.draw(st.sampled_from([1, 2, 3, 7, 37, 130, 1000, 4100]), label="V")
    dtype = DTYPES[data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")]
    packed = data.draw(st.booleans(), label="packed")
    ignore_index = data.draw(st.sampled_from([-100, -1]), label="ignore_index")
    if packed:
        lengths = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4), label="lengths")
        n = sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        shape, num_seqs = (n,), len(lengths)
    else:
        s, t = data.draw(st.integers(1, 4), label="S"), data.draw(st.integers(1, 5), label="T")
        cu, shape, num_seqs = None, (s, t), s
    layout = data.draw(st.sampled_from(["contiguous", "time slice", "last dim strided"]), label="layout")
    full = (torch.randn(*shape[:-1], shape[-1] + 1, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    logits = full[..., 1:, :] if layout == "time slice" else full[..., :-1, :].contiguous()
    if layout == "last dim strided":                          # a transposed copy: the last dim has stride > 1
        logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    inject_nonfinite(data, gen, logits)
    labels = draw_labels(data, gen, shape, vocab, ignore_index)
    corrupt = data.draw(st.sampled_from(["none"] * 6 + ["label >= V", "ignore_index >= V"]), label="corrupt")
    if corrupt == "label >= V" and labels.numel():
        labels = labels.clone()
        labels.view(-1)[0] = vocab
    if corrupt == "ignore_index >= V":
        ignore_index = vocab
    coeff = torch.randn(num_seqs, generator=gen, dtype=torch.float64) * 2 + 0.1

    def run(name, device, work_dtype):
        def go():
            z = logits.to(device, work_dtype, copy=True).requires_grad_(True)
            logps, counts = robalign.sequence_logps(
                z, labels.to(device), ignore_index=ignore_index, backend=name,
                cu_seqlens=None if cu is None else cu.to(device))
            (logps * coeff.to(device, logps.dtype)).sum().backward()
            return logps.detach().double().cpu(), counts.cpu(), z.grad.double().cpu()
        return outcome(go)

    want = run("reference", "cpu", torch.float64)
    for name, device in BACKENDS:
        compare(run(name, device, dtype), want, [dtype], coeff)


@SETTINGS
@given(data=st.data())
def test_linear_path_backends_agree_with_the_reference(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    vocab = data.draw(st.sampled_from([1, 3, 37, 300]), label="V")
    hidden_size = data.draw(st.sampled_from([1, 4, 19]), label="H")
    dtype = DTYPES[data.draw(st.sampled_from(["float32", "float32", "bfloat16"]), label="dtype")]
    s, t = data.draw(st.integers(1, 4), label="S"), data.draw(st.integers(1, 5), label="T")
    hidden = torch.randn(s, t + 1, hidden_size, generator=gen, dtype=torch.float64)[:, 1:]   # a strided view
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 2 / hidden_size ** 0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if data.draw(st.booleans(), label="bias") else None
    if data.draw(st.sampled_from([False, False, False, True]), label="nan hidden"):
        hidden = hidden.clone()
        hidden[0, 0, 0] = float("nan")
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    labels = draw_labels(data, gen, (s, t), vocab, -100)
    coeff = torch.randn(s, generator=gen, dtype=torch.float64) * 2 + 0.1

    def run(name, device, work_dtype):
        def go():
            leaves = [x.to(device, work_dtype, copy=True).requires_grad_(True) for x in (hidden, weight)]
            b = None if bias is None else bias.to(device, work_dtype, copy=True).requires_grad_(True)
            logps, counts = robalign.linear_sequence_logps(*leaves, labels.to(device), bias=b, backend=name)
            (logps * coeff.to(device, logps.dtype)).sum().backward()
            grads = [x.grad.double().cpu() for x in leaves] + ([] if b is None else [b.grad.double().cpu()])
            return (logps.detach().double().cpu(), counts.cpu(), *grads)
        return outcome(go)

    want = run("reference", "cpu", torch.float64)
    # bfloat16 heads: each chunk's logits are a bfloat16 matmul, so the reference on the same
    # values is not the right yardstick for magnitudes; finite agreement of the float32 path and
    # identical non-finite patterns are what this property checks for bfloat16
    for name, device in BACKENDS:
        got = run(name, device, dtype)
        if dtype == torch.float32:
            compare(got, want, [dtype] * 3, coeff, summed_magnitudes(hidden, weight, bias, labels, coeff))
        else:
            assert got[0] == want[0]
            if got[0] == "ok":
                for g, r in zip(got[1], want[1]):
                    assert torch.equal(torch.isnan(g), torch.isnan(r))
