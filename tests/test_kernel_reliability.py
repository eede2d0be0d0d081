"""Valid but unusual input on every kernel backend, both paths: strided and narrow labels,
masked vocabularies, non-finite logits, and the arguments that must be refused up front.

Semantics of non-finite logits (the reference's, which every backend follows;
docs/reliability.md): a token's log-prob is ``z[y] − logsumexp(z)`` in IEEE arithmetic — NaN if the row
holds a NaN, ``−inf`` if it holds a ``+inf`` logit other than the label's (NaN if the label's is
``+inf``), ``−inf`` for a ``−inf`` label logit, NaN for a row of ``−inf`` only. The gradient is
``coeff·(onehot − exp(z − lse))`` elementwise with the same arithmetic. Ignored tokens are never
read. Tolerances as in test_logits_backends (float32: 1e-5 relative).
"""

import pytest
import torch

import robalign
from robalign import ground_truth
from conftest import KERNEL_BACKENDS

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = KERNEL_BACKENDS        # every kernel backend of the registry (conftest)
NAN = float("nan")
INF = float("inf")


def logits_path(backend, logits, labels, coeff, **kw):
    name, device = backend
    z = logits.detach().clone().to(device).requires_grad_(True)
    logps, counts = robalign.sequence_logps(z, labels.to(device), backend=name, **kw)
    (logps * coeff.to(device, logps.dtype)).sum().backward()
    return logps.detach().cpu().double(), counts.cpu(), z.grad.cpu().double()


def linear_path(backend, hidden, weight, labels, coeff):
    name, device = backend
    h = hidden.detach().clone().to(device).requires_grad_(True)
    w = weight.detach().clone().to(device).requires_grad_(True)
    logps, counts = robalign.linear_sequence_logps(h, w, labels.to(device), backend=name)
    (logps * coeff.to(device, logps.dtype)).sum().backward()
    return logps.detach().cpu().double(), counts.cpu(), h.grad.cpu().double(), w.grad.cpu().double()


def assert_same(got, want):
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5, equal_nan=True)
        else:
            assert torch.equal(g, w)


# -- strided and narrow labels (issue: Triton read labels as if contiguous) ------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_logits_path(backend):
    gen = torch.Generator().manual_seed(1)
    wide = torch.randint(0, 7, (2, 8), generator=gen)
    labels = wide[:, ::2]                                   # reshapes to a stride-2 [N] view
    assert labels.reshape(-1).stride() == (2,)
    logits = torch.randn(2, 4, 7, generator=gen)
    coeff = torch.tensor([1.5, -2.0])
    want = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double())
    assert_same(logits_path(backend, logits, labels, coeff), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_labels_as_a_column_of_a_wider_tensor(backend):
    gen = torch.Generator().manual_seed(2)
    table = torch.randint(0, 11, (9, 3), generator=gen)
    labels = table[:, 1]                                    # stride 3
    logits = torch.randn(9, 11, generator=gen)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    coeff = torch.tensor([0.5, 3.0])
    want = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double(), cu_seqlens=cu)
    assert_same(logits_path(backend, logits, labels, coeff, cu_seqlens=cu.to(backend[1])), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_every_integer_label_dtype_is_taken(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 13, generator=gen)
    labels = torch.randint(0, 13, (3, 5), generator=gen)
    coeff = torch.tensor([1.0, -1.0, 2.0])
    if dtype != torch.uint8:
        labels[0, 1] = labels[2] = -100
    want = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double())
    assert_same(logits_path(backend, logits, labels.to(dtype), coeff), want)
    hidden, weight = torch.randn(3, 5, 6, generator=gen), torch.randn(13, 6, generator=gen)
    want = linear_path(("reference", "cpu"), hidden.double(), weight.double(), labels, coeff.double())
    assert_same(linear_path(backend, hidden, weight, labels.to(dtype), coeff), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_linear_path(backend):
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 9, (2, 10), generator=gen)[:, ::2]
    hidden, weight = torch.randn(2, 5, 4, generator=gen), torch.randn(9, 4, generator=gen)
    coeff = torch.tensor([2.0, -0.5])
    want = linear_path(("reference", "cpu"), hidden.double(), weight.double(), labels, coeff.double())
    assert_same(linear_path(backend, hidden, weight, labels, coeff), want)


# -- a vocabulary block that is all -inf (issue: NaN from exp(-inf - -inf) on Triton) ----------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_masked_vocabulary_block(backend, where):
    v = 4200                                                  # > BLOCK_V = 4096: two blocks
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, v, generator=gen)
    masked = {"start": slice(0, 4096), "middle": slice(50, 4150), "end": slice(100, v)}[where]
    logits[..., masked] = -INF
    allowed = torch.ones(v, dtype=torch.bool)
    allowed[masked] = False
    choices = allowed.nonzero().squeeze(1)
    labels = choices[torch.randint(len(choices), (2, 3), generator=gen)]
    coeff = torch.tensor([1.0, -3.0])
    got = logits_path(backend, logits, labels, coeff)
    want = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double())
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    assert_same(got, want)


def test_the_issue_example_gives_the_reference_value():
    x = torch.randn(1, 1, 4200)
    x[..., :4096] = -INF
    y = torch.tensor([[4150]])
    values = {name: robalign.sequence_logps(x, y, backend=name)[0].item() for name in ("triton", "cpp", "torch")}
    want = ground_truth.sequence_logps(x.double(), y)[0].item()
    for name, value in values.items():
        assert value == pytest.approx(want, rel=1e-5), name


# -- non-finite logits: every backend follows the reference ---------------------------------

def nonfinite_batch():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 2, 37, generator=gen)
    labels = torch.randint(0, 37, (6, 2), generator=gen)
    labels[:, 1] = 3
    logits[0, 0, 5] = NAN                                  # NaN in the row
    logits[1, 0, 5] = INF                                  # +inf, not the label
    logits[2, 0, 3] = INF
    labels[2, 0] = 3                                       # +inf label logit: inf - inf
    logits[3, 0, :] = -INF                                 # a row of -inf only
    logits[4, 0, labels[4, 0]] = -INF                      # -inf label logit
    logits[5, 0, 7] = NAN
    labels[5, 0] = -100                                    # non-finite but ignored: never read
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_logits_follow_the_reference(backend):
    logits, labels = nonfinite_batch()
    coeff = torch.tensor([1.0, -2.0, 0.5, 1.5, 3.0, -1.0])
    got = logits_path(backend, logits, labels, coeff)
    want = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double())
    assert torch.isnan(want[0][0]) and want[0][1] == -INF and torch.isnan(want[0][2])
    assert torch.isnan(want[0][3]) and want[0][4] == -INF and torch.isfinite(want[0][5])
    assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_logits_low_precision(backend, dtype):
    logits, labels = nonfinite_batch()
    logits = logits.to(dtype)
    coeff = torch.tensor([1.0, -2.0, 0.5, 1.5, 3.0, -1.0])
    logps, _, grad = logits_path(backend, logits, labels, coeff)
    rlogps, _, rgrad = logits_path(("reference", "cpu"), logits.double(), labels, coeff.double())
    # where the reference is non-finite the backend gives the same value; finite values are
    # compared in test_logits_backends (2× PyTorch's own low-precision error)
    for got, want in ((logps, rlogps), (grad, rgrad)):
        special = ~torch.isfinite(want)
        assert torch.equal(got[special].isnan(), want[special].isnan())
        assert torch.equal(got[special & ~want.isnan()], want[special & ~want.isnan()])
        assert torch.isfinite(got[~special]).all()


# -- arguments refused up front, the same on every backend ----------------------------------

@pytest.mark.parametrize("name", ["reference", "cpp", "triton", "torch"])
@pytest.mark.parametrize("ignore_index,match", [
    (5, r"`ignore_index` must be negative \(the usual -100\) or a token id below V = 5, got 5"),
    (7, r"below V = 5, got 7"),
    (2 ** 70, r"`ignore_index` must fit in int64"),
    (1.5, r"`ignore_index` must be an int, got float"),
    (True, r"`ignore_index` must be an int, got bool"),
])
def test_bad_ignore_index(name, ignore_index, match):
    z, y = torch.randn(2, 3, 5), torch.randint(5, (2, 3))
    exc = TypeError if isinstance(ignore_index, (float, bool)) else ValueError
    with pytest.raises(exc, match=match):
        robalign.sequence_logps(z, y, ignore_index=ignore_index, backend=name)
    with pytest.raises(exc, match=match):
        robalign.linear_sequence_logps(torch.randn(2, 3, 4), torch.randn(5, 4), y, ignore_index=ignore_index,
                                       backend=name)


def test_an_ignore_index_inside_the_vocabulary_skips_that_token():
    z, y = torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([[0, 1, 2], [2, 2, 4]])
    logps, counts = robalign.sequence_logps(z, y, ignore_index=2)
    assert counts.tolist() == [2, 1]
    want, _ = ground_truth.sequence_logps(z, torch.where(y == 2, -100, y))
    torch.testing.assert_close(logps, want)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton", "torch"])
def test_empty_vocabulary_is_refused(name):
    with pytest.raises(ValueError, match=r"`logits` must have V >= 1 \(its last dimension\), got shape \(2, 3, 0\)"):
        robalign.sequence_logps(torch.randn(2, 3, 0), torch.full((2, 3), -100), backend=name)
    with pytest.raises(ValueError, match=r"`weight` must be \[V, H\] with V >= 1, got \(0, 4\)"):
        robalign.linear_sequence_logps(torch.randn(2, 3, 4), torch.randn(0, 4), torch.full((2, 3), -100),
                                       backend=name)


def test_shift_labels_checks_ignore_index():
    with pytest.raises(ValueError, match=r"`ignore_index` must fit in int64"):
        robalign.shift_labels(torch.zeros(2, 3, dtype=torch.long), ignore_index=2 ** 70)
