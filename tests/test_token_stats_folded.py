"""The logged token statistics formed by the one-pass loss itself (``extras=BatchExtras(token_stats=True)``,
robalign.ops.one_pass): entropy from the ``U·W`` product the hidden-state gradient
needs, ``H_t = (lse'_t − z'_y) + h_t·(U·W)_t``; the mean logit from the head's mean row,
``m_t = s·h_t·w̄``; top-1 from each chunk's logits before the kernel overwrites them — against the
materialised float64 computation, for every kernel backend, float32 and bfloat16, one chunk, two and
sub-chunks, a linear transform, padded and packed rows, holes and an all-ignored row.

Tolerances. float32: 1e-5 relative to each sum's float64 terms (|lse'| + |z'_y| + Σ_k |h_k·(U·W)_k| for the
entropy: lse' and z'_y are rounded to float32 before their difference is taken, as in the separate
pass; Σ_v |z'_v| / V for the mean), the float32 products and row sums the loss itself meets at 1e-5
(tests/test_one_pass.py). bfloat16: 2⁻⁷ of the same terms — bfloat16 keeps 8 significant bits (each
rounding ≤ 2⁻⁹ relative), and the entropy's terms pass through two roundings (the chunk's logits and
the ``U·W`` product), each of which the separate pass's bfloat16 logits also carry; the bound leaves a
factor 2 on those. Top-1 is exact in float32; in bfloat16 it is compared on the tokens whose two
largest float64 logits are further apart than the logits' rounding (2⁻⁶ of the row's largest |z'|).
"""

import math

import pytest
import torch

import robalign
from robalign import BatchExtras, DoRALoss, FusedLinearDoRALoss, LossParams
from robalign.losses import loss as loss_module
from robalign.losses.reductions import KLDRO
from robalign.ops import _cpp
from robalign.ops.head import HeadTransform
from conftest import KERNEL_BACKENDS, packed_from_padded, torch_threads

TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
STATS = BatchExtras(token_stats=True)
CHUNKS = {"one": 10 ** 6, "two": 20, "sub-chunks": 3}


def problem(dtype, *, sequences=6, t=9, h=16, v=53, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sequences, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2
    labels = torch.randint(v, (sequences, t), generator=gen)
    labels[:, :2] = -100                                                  # prompt tokens
    labels[torch.rand(sequences, t, generator=gen) < 0.2] = -100          # holes
    labels[3] = -100                                                      # an all-ignored sequence
    z = hidden @ weight.T
    top = z.argmax(-1)
    hits = torch.rand(sequences, t, generator=gen) < 0.4                  # top-1 tokens
    labels = torch.where(hits & (labels != -100), top, labels)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return hidden, weight, labels


def materialised(hidden, weight, labels, transform):
    """Per sequence: the entropy, mean logit and top-1 sums in float64, each with the sum of its terms'
    magnitudes (the tolerances' scale), and the tokens whose top-1 is decided beyond rounding."""
    h, w = hidden.double(), weight.double()
    s = transform.kernel_args["scale"]
    z = s * (h @ w.T)
    scored = labels != -100
    y = labels.clamp(min=0)
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    z_y = z.gather(-1, y[..., None])[..., 0]
    u = s * (torch.nn.functional.one_hot(y, z.shape[-1]) - p)
    uw = u @ w
    entropy = lse - (p * z).sum(-1)
    entropy_scale = lse.abs() + z_y.abs() + (h * uw).abs().sum(-1)          # the terms the fold adds
    mean, mean_scale = z.mean(-1), z.abs().mean(-1)
    top2 = z.topk(2, -1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 ** -6 * z.abs().amax(-1)
    top1 = (z.argmax(-1) == labels) & scored
    per_seq = lambda x: (x * scored).sum(-1)                               # noqa: E731
    return (per_seq(entropy), per_seq(entropy_scale)), (per_seq(mean), per_seq(mean_scale)), scored.sum(-1), \
        top1, decided & scored


def _no_separate_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the statistics took a pass of their own")
    monkeypatch.setattr(loss_module, "per_token_stats", refuse)


def _loss(backend, transform=None, lam=1.0):
    return FusedLinearDoRALoss("dpo", reduction=KLDRO(lam), head=transform, params=LossParams(backend=backend))


def _check(stats, want, dtype, per_token_top1=None):
    (entropy, entropy_scale), (mean, mean_scale), counts, top1, decided = want
    got_entropy, got_mean, got_counts, got_top1 = (x.cpu() for x in stats)
    tol = TOL[dtype]
    assert torch.equal(got_counts, counts)
    assert (got_entropy.double() - entropy).abs().le(tol * entropy_scale + 1e-30).all(), (got_entropy, entropy)
    assert (got_mean.double() - mean).abs().le(tol * mean_scale + 1e-30).all(), (got_mean, mean)
    if dtype == torch.float32 or bool(decided.all()):
        assert torch.equal(got_top1, top1.sum(-1))
    else:                                   # the per-token hits are not returned: bound the counts
        undecided = (~decided & (counts[:, None] > 0)).sum(-1)
        assert ((got_top1 - top1.sum(-1)).abs() <= undecided).all()
    assert int(got_top1.sum()) >= 3                                         # hits were there to count


@pytest.mark.parametrize("chunking", sorted(CHUNKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_folded_statistics_are_the_materialised_ones(backend, dtype, chunking, chunks, monkeypatch):
    name, device = backend
    if name == "triton" and dtype == torch.bfloat16 and device == "cpu" and chunking != "one":
        pytest.skip("the interpreter's bfloat16 runs are slow; one chunk covers the path")
    chunks(CHUNKS[chunking])
    _no_separate_pass(monkeypatch)
    hidden, weight, labels = problem(dtype)
    h = hidden.to(device).requires_grad_()
    w = weight.to(device).requires_grad_()
    out = _loss(name)(h, w, labels.to(device), torch.zeros(labels.shape[0], device=device), extras=STATS)
    assert out.policy_logps.grad_fn is None                                # the one-pass path ran
    _check(out.token_stats, materialised(hidden, weight, labels, HeadTransform()), dtype)
    assert out.token_stats[0][3] == 0 and out.token_stats[2][3] == 0       # the all-ignored sequence
    out.loss.backward()                                                     # the gradients still come
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_linear_transform_and_packed_rows(dtype, chunks, monkeypatch):
    """``s = scale / temperature`` scales ``U·W`` and the mean row alike; packed rows (``cu_seqlens``)
    sum by sequence the same way."""
    chunks(CHUNKS["two"])
    _no_separate_pass(monkeypatch)
    transform = HeadTransform(scale=0.7, temperature=1.3)
    hidden, weight, labels = problem(dtype, seed=1)
    want = materialised(hidden, weight, labels, transform)
    lengths = [9, 5, 7, 9, 3, 8]
    h_packed, y_packed, cu = packed_from_padded(hidden, labels, lengths)
    cut = labels.clone()
    for row, n in enumerate(lengths):
        cut[row, n:] = -100
    out = _loss("cpp", transform)(h_packed.requires_grad_(), weight.requires_grad_(), y_packed,
                                  torch.zeros(len(lengths)), extras=BatchExtras(cu_seqlens=cu, token_stats=True))
    _check(out.token_stats, materialised(hidden, weight, cut, transform), dtype)
    padded = _loss("cpp", transform)(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels,
                                     torch.zeros(labels.shape[0]), extras=STATS)
    _check(padded.token_stats, want, dtype)


@pytest.mark.parametrize("case", ["bias", "softcap", "frozen hidden states", "recompute path"])
def test_where_the_loss_cannot_form_them_they_take_a_pass_of_their_own(case, monkeypatch):
    """A bias (``U·b`` would be a pass over the chunk), a soft-cap (``Σ p·z'`` is not linear in ``h``),
    hidden states without gradient (no ``U·W``) and the recompute path: the statistics come from
    :func:`robalign.ops.token_stats.token_stats`, one pass more, as before."""
    calls = []
    real = loss_module.per_token_stats
    monkeypatch.setattr(loss_module, "per_token_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, labels = problem(torch.float32, seed=2)
    transform = HeadTransform(softcap=3.0) if case == "softcap" else HeadTransform()
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(weight.shape[0], generator=gen) if case == "bias" else None
    params = LossParams(backend="cpp", one_pass=case != "recompute path")
    loss_fn = FusedLinearDoRALoss("dpo", reduction=KLDRO(1.0), head=transform, params=params)
    h = hidden.clone().requires_grad_(case != "frozen hidden states")
    out = loss_fn(h, weight.clone().requires_grad_(), labels, torch.zeros(labels.shape[0]), bias=bias, extras=STATS)
    assert calls == [1]
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    z = transform.apply_(z)
    scored = labels != -100
    entropy = ((torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)) * scored).sum(-1)
    torch.testing.assert_close(out.token_stats[0].double(), entropy, rtol=1e-5, atol=1e-5)


def test_the_logits_path_gives_them_from_its_logits():
    """``DoRALoss`` on logits: the statistics of those logits (robalign.ops.token_stats's ATen or C++ pass)."""
    hidden, weight, labels = problem(torch.float32, seed=4)
    logits = (hidden @ weight.T).requires_grad_()
    out = DoRALoss("dpo", params=LossParams(backend="cpp"))(logits, labels, torch.zeros(labels.shape[0]),
                                                             extras=STATS)
    _check(out.token_stats, materialised(hidden, weight, labels, HeadTransform()), torch.float32)
    out.loss.backward()
    assert logits.grad is not None


def test_no_statistics_unless_asked_and_a_clear_error_for_a_non_bool(monkeypatch):
    _no_separate_pass(monkeypatch)
    hidden, weight, labels = problem(torch.float32)
    out = _loss("cpp")(hidden.requires_grad_(), weight.requires_grad_(), labels, torch.zeros(labels.shape[0]))
    assert out.token_stats is None
    with pytest.raises(TypeError, match="`extras.token_stats` must be True or False"):
        _loss("cpp")(hidden, weight, labels, torch.zeros(labels.shape[0]), extras=BatchExtras(token_stats="yes"))
    with pytest.raises(ValueError, match="`extras.token_stats` needs the logits"):
        DoRALoss("dpo").from_logps(torch.zeros(4), torch.ones(4, dtype=torch.long), torch.zeros(4), extras=STATS)


CPP = _cpp.load()


@pytest.mark.skipif(CPP is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_labels_are_argmax_is_torchs_argmax(dtype):
    """The C++ top-1 check, rows and columns, against ``torch.argmax``: the first maximum among ties,
    a NaN the largest (the first NaN), a row of -inf at 0, labels out of range never; contiguous and
    strided rows, one token and one logit."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        c = int(torch.randint(1, 40, (), generator=gen)) if trial % 7 else 1
        v = int(torch.randint(1, 300, (), generator=gen)) if trial % 11 else 1
        z = torch.randint(-3, 4, (c, v), generator=gen).to(dtype)           # ties everywhere
        if trial % 3 == 0:
            z[torch.rand(c, v, generator=gen) < 0.05] = math.nan
        if trial % 5 == 0:
            z[0] = -math.inf
        y = torch.randint(-1, v + 1, (c,), generator=gen)
        y[::2] = z[::2].float().argmax(1)
        want = z.float().argmax(1) == y
        wide = torch.zeros(c, v + 5, dtype=dtype)
        wide[:, :v] = z
        for got in (CPP.labels_are_argmax(z, y, False), CPP.labels_are_argmax(z.T.contiguous(), y, True),
                    CPP.labels_are_argmax(wide[:, :v], y, False)):
            assert torch.equal(got, want), (trial, c, v)


@pytest.mark.skipif(CPP is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("v", [257, 1003])
def test_labels_are_argmax_by_columns_across_the_threads_shares(threads, v):
    """The column layout's top-1 check splits the vocabulary's rows into one share per thread: ties
    across shares (the first share's index wins), the maximum or the only NaN in the last share, NaNs
    in two shares (the first wins), a column of -inf (index 0) and one that is -inf in the first share
    only, against ``torch.argmax``."""
    gen = torch.Generator().manual_seed(v + threads)
    c = 9
    z = torch.randint(-3, 4, (c, v), generator=gen).float()
    z[0, [5, v - 3]] = 9.0                                               # a tie across the shares
    z[1, v - 2] = 9.0                                                    # the maximum in the last share
    z[2, v - 1] = math.nan                                               # the only NaN, in the last share
    z[3, [v - 5, 7]] = math.nan                                          # NaNs in two shares
    z[4] = -math.inf
    z[5, : v // 2 + 3] = -math.inf                                       # -inf in the first share only
    z[6, v // 3] = 9.0
    z[6, 2 * v // 3] = 9.0
    want_index = z.argmax(1)
    with torch_threads(threads):
        for shift in (0, 1, -1):                                     # the label at the argmax, and off it
            y = (want_index + shift).clamp(0, v - 1)
            got = CPP.labels_are_argmax(z.T.contiguous(), y, True)
            assert torch.equal(got, z.argmax(1) == y), (shift, got)


@pytest.mark.slow
def test_torch_compile_traces_the_statistics(chunks, monkeypatch):
    """The operator's fake gives the statistics' shapes and dtypes: the compiled call (C++ backend, CPU)
    returns the eager statistics bit for bit."""
    monkeypatch.setattr(robalign.ops.one_pass, "_defers", lambda *a: False)
    chunks(CHUNKS["two"])
    hidden, weight, labels = problem(torch.float32)
    loss_fn = _loss("cpp")

    def step(h, w):
        out = loss_fn(h, w, labels, torch.zeros(labels.shape[0]), extras=STATS)
        return out.loss, out.token_stats

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = [f(hidden.clone().requires_grad_(), weight.clone().requires_grad_())[1] for f in (compiled, step)]
    for a, b in zip(*got):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
