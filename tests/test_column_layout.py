"""The one-pass loss's float32 chunks laid out by columns (``zᵀ = W·hᵀ``, ``[V, C]``) on CPU: the C++
kernel ``cols_lse_target_grad`` and the loss that uses it (robalign.ops.one_pass._by_columns).

- The kernel against float64: lse, label logit and the unit gradient ``onehot − softmax`` of each
  column, V and C not multiples of the vector width, of four rows or of its blocks (about 512 KB of
  rows each), a column whose maximum rises in a late block (the running sum rescaled), −inf logits in
  a finite column, in place, into other memory, and from a strided view; and on 1, 2 and 3 threads,
  which split the vocabulary's rows into as many shares: the maximum in the last share's last block,
  a share of only −inf for one column, many blocks per share. Tolerances as
  tests/test_fused_row_step.py's float32 rows: 1e-6 relative on lse (its float32 rounding), 1e-5 on
  the gradient (float32 exponentials, one float32 scale per block).
- Where it does not apply (an ignored or out-of-range label, a NaN, +inf or all −inf column) it says
  so: ``ok`` False, having written nothing for a label it refuses.
- The loss: a float32 call on CPU forms its chunks by columns, and gives what the row layout gives
  (loss and the three gradients within 1e-5 relative: the same float32 products summed in another
  order); a chunk with a non-finite column is formed by rows instead (same values, NaN where the
  row path has NaN). The float64 comparisons of tests/test_one_pass.py run the column path too.
"""

import math
import random

import pytest
import torch

import robalign
from conftest import torch_threads
from robalign.ops import one_pass

cpu = pytest.importorskip("robalign.ops.cpu", reason="the C++ backend is not built")


def reference(zt: torch.Tensor, labels: torch.Tensor):
    z = zt.double().T                                                # [C, V]
    lse = torch.logsumexp(z, 1)
    grad = -torch.softmax(z, 1)
    grad[torch.arange(len(labels)), labels] += 1
    return lse, z.gather(1, labels[:, None]).squeeze(1), grad.T


def within_summation_bound(zt: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                           out: torch.Tensor) -> bool:
    """Whether the column kernel's outputs for ``zt`` [V, C] are within float32's summation bound of
    float64: each gradient element within ``(V + 8)·u·p + u`` (``u = 2⁻²⁴``, ``p`` the float64 softmax:
    ``p`` comes from a float32 sum over V terms, and ``1 − p`` at the label is rounded once more),
    ``lse`` within ``(V + 8)·u`` relative, the label logit exact."""
    v, u = zt.shape[0], 2.0 ** -24
    lse_want, target_want, grad_want = reference(zt, labels)
    p = torch.softmax(zt.double(), 0)
    return bool(((lse.double() - lse_want).abs() <= (v + 8) * u * lse_want.abs().clamp_min(1)).all()) and \
        torch.equal(target.double(), target_want) and bool(((out.double() - grad_want).abs() <= (v + 8) * u * p + u).all())


@pytest.mark.parametrize("v", [1, 3, 255, 257, 1000, 2049])
@pytest.mark.parametrize("c", [1, 5, 16, 17, 37])
@pytest.mark.parametrize("where", ["in_place", "other_memory", "strided"])
def test_column_kernel_against_float64(v, c, where):
    gen = torch.Generator().manual_seed(v * 100 + c)
    wide = torch.randn(v, c + 3, generator=gen) * 4
    zt = wide[:, :c] if where == "strided" else wide[:, :c].contiguous()
    if v > 300:
        zt[:, 0] = torch.linspace(-5, 30, v)                         # the maximum in the last block
        zt[::7, -1] = -float("inf")                                  # −inf logits in a finite column
    labels = torch.randint(v, (c,), generator=gen)
    lse_want, target_want, grad_want = reference(zt, labels)
    before = zt.clone()
    out = zt if where == "in_place" else torch.full((v, c), float("nan"))
    lse, target, ok = cpu.cols_lse_target_grad(zt, labels, -100, out)
    assert ok
    torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double(), target_want, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), grad_want, rtol=1e-5, atol=1e-7)
    if where != "in_place":
        torch.testing.assert_close(zt, before, rtol=0, atol=0, equal_nan=True)     # out was other memory


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("v, c", [(3001, 520), (1203, 1041), (4099, 131)])
def test_column_kernel_splits_the_vocabulary_between_threads(threads, v, c):
    # blocks of 252, 125 and 1000 rows: 12, 10 and 5 blocks, split into 1–3 shares
    gen = torch.Generator().manual_seed(v + c + threads)
    zt = torch.randn(v, c, generator=gen) * 4
    zt[:, 0] = torch.linspace(-5, 30, v)                             # the maximum in the last share's last block
    zt[:, 1] = torch.linspace(30, -5, v)                             # ... in the first block
    zt[: v // 2 + 7, 2] = -float("inf")                              # a share of only −inf
    zt[::3, 3] = -float("inf")
    labels = torch.randint(v, (c,), generator=gen)
    labels[2] = v - 1
    lse_want, target_want, grad_want = reference(zt, labels)
    with torch_threads(threads):
        lse, target, ok = cpu.cols_lse_target_grad(zt, labels, -100, zt)
    assert ok
    torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double(), target_want, rtol=0, atol=0)
    torch.testing.assert_close(zt.double(), grad_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threads", [8, 16])
@pytest.mark.parametrize("c", [7, 37])
def test_column_kernels_on_more_threads_than_ci_has(threads, c):
    """8 and 16 shares of the vocabulary, as a server's threads split it (the tests above use 1–3):
    V 20003 is 20 blocks of 1024 rows for the unit-gradient kernel and 312 rows of 64 for the top-1
    check. A maximum in the last share and in the first, a column whose maximum ties across two shares
    (the first share's index wins), −inf in all but the last share, −inf runs; each element within
    float32's summation bound of float64 (:func:`within_summation_bound`)."""
    v = 20003
    gen = torch.Generator().manual_seed(threads + c)
    zt = torch.randn(v, c, generator=gen) * 4
    zt[:, 0] = torch.linspace(-5, 30, v)
    zt[:, 1] = torch.linspace(30, -5, v)
    zt[:, 2] = -3.0
    zt[[100, v - 100], 2] = 9.0                                        # a tie, first and last share
    zt[: v - 500, 3] = -math.inf
    zt[::3, 4] = -math.inf
    labels = torch.randint(v, (c,), generator=gen)
    labels[:3] = torch.tensor([v - 1, 0, 100])
    out = zt.clone()
    with torch_threads(threads):
        hits = cpu.labels_are_argmax(zt, labels, True)
        lse, target, ok = cpu.cols_lse_target_grad(out, labels, -100, out)
    assert torch.equal(hits, zt.argmax(0) == labels) and bool(hits[:3].all())
    assert ok
    assert within_summation_bound(zt, labels, lse, target, out)


def test_column_kernel_and_top1_on_random_chunks():
    """An adversarial sweep of both column kernels, 150 random chunks: V 1–3000, C 1–300, 1–3 threads,
    logit scales 0.1–30, runs of −inf, a whole −inf column, a NaN, a +inf, integer ties. The top-1
    check equals ``torch.argmax``; the unit-gradient kernel declines exactly the non-finite chunks and
    is otherwise within float32's summation bound of float64 (:func:`within_summation_bound`)."""
    rng = random.Random(35)
    for trial in range(150):
        v = rng.choice([1, 2, 5, 64, 65, 255, 257, 1000, rng.randint(1, 3000)])
        c = rng.choice([1, 15, 16, 17, 33, 100, rng.randint(1, 300)])
        threads = rng.randint(1, 3)
        gen = torch.Generator().manual_seed(trial)
        zt = torch.randn(v, c, generator=gen) * rng.choice([0.1, 1.0, 4.0, 30.0])
        kind = rng.random()
        if kind < 0.2:
            zt[torch.rand(v, c, generator=gen) < 0.3] = -math.inf
        elif kind < 0.3:
            zt[:, rng.randrange(c)] = -math.inf
        elif kind < 0.4:
            zt[rng.randrange(v), rng.randrange(c)] = math.nan
        elif kind < 0.45:
            zt[rng.randrange(v), rng.randrange(c)] = math.inf
        elif kind < 0.6:
            zt = torch.randint(-2, 3, (v, c), generator=gen).float()
        labels = torch.randint(v, (c,), generator=gen)
        labels[::2] = torch.nan_to_num(zt, nan=math.inf).argmax(0)[::2]
        out = zt.clone()
        with torch_threads(threads):
            hits = cpu.labels_are_argmax(zt, labels, True)
            lse, target, ok = cpu.cols_lse_target_grad(out, labels, -100, out)
        assert torch.equal(hits, zt.argmax(0) == labels), trial
        finite = bool(torch.isfinite(zt.amax(0)).all()) and not bool(zt.isnan().any())
        assert ok == finite, trial
        if not ok:
            continue
        assert within_summation_bound(zt, labels, lse, target, out), trial


@pytest.mark.parametrize("case", ["ignored", "below_zero", "past_v", "nan", "plus_inf", "all_minus_inf"])
def test_column_kernel_declines_what_the_row_kernels_handle(case):
    gen = torch.Generator().manual_seed(4)
    v, c = 600, 20
    zt = torch.randn(v, c, generator=gen)
    labels = torch.randint(v, (c,), generator=gen)
    if case == "ignored":
        labels[3] = -100
    elif case == "below_zero":
        labels[3] = -2
    elif case == "past_v":
        labels[3] = v
    elif case == "nan":
        zt[400, 3] = float("nan")
    elif case == "plus_inf":
        zt[10, 3] = float("inf")
    else:
        zt[:, 3] = -float("inf")
    before = zt.clone()
    out = torch.zeros(v, c)
    _, _, ok = cpu.cols_lse_target_grad(zt, labels, -100, out)
    assert not ok
    if case in ("ignored", "below_zero", "past_v"):                  # refused before anything is written
        assert torch.equal(out, torch.zeros(v, c))
    torch.testing.assert_close(zt, before, rtol=0, atol=0, equal_nan=True)     # out was other memory


def _problem(seed=0, groups=6, t=9, h=24, v=300, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(groups * 2, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h ** 0.5 * 2
    b = torch.randn(v, generator=gen) if bias else None
    labels = torch.randint(v, (groups * 2, t), generator=gen)
    labels[:, :2] = -100
    labels[torch.rand(groups * 2, t, generator=gen) < 0.2] = -100
    return hidden, weight, b, labels


def _run(hidden, weight, bias, labels):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    fn = robalign.DoRALoss("dpo", lam=0.7, group_size=2, backend="cpp")
    ref = -torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(9)) * 20
    weights = torch.linspace(0.3, 1.5, labels.shape[0] // 2)
    out = fn(hidden=leaves[0], head_weight=leaves[1], head_bias=leaves[2], labels=labels, ref_logps=ref,
             weights=weights)
    out.loss.backward()
    return [out.loss.detach(), *[None if x is None else x.grad for x in leaves]]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [10 ** 6, 30])
def test_float32_loss_by_columns_gives_what_rows_give(bias, chunk, monkeypatch):
    monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: chunk)
    calls = []
    kernel = cpu.cols_lse_target_grad
    monkeypatch.setattr(cpu, "cols_lse_target_grad", lambda *args: calls.append(1) or kernel(*args))
    problem = _problem(bias=bias)
    by_columns = _run(*problem)
    assert calls, "a float32 call on CPU forms its chunks by columns"
    monkeypatch.setattr(one_pass, "_by_columns", lambda *args: False)
    by_rows = _run(*problem)
    for got, want in zip(by_columns, by_rows):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_a_chunk_with_a_non_finite_column_is_formed_by_rows(monkeypatch):
    hidden, weight, bias, labels = _problem(seed=1)
    hidden[3, 5, 0] = float("inf")                                   # that token's logits: ±inf, NaN
    labels[3, 5] = 7
    by_columns = _run(hidden, weight, bias, labels)
    monkeypatch.setattr(one_pass, "_by_columns", lambda *args: False)
    by_rows = _run(hidden, weight, bias, labels)
    for got, want in zip(by_columns, by_rows):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
