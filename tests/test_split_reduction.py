"""``grad_h``'s product ``U·W`` with the reduction over V split between threads
(``robalign.ops.one_pass._times_weight``, the C++ backend's ``times_weight_split_``).

A half-precision chunk on CPU of 384–1407 rows through a head of at most 768 columns forms ``U·W`` as
``parts`` GEMMs side by side, one per thread, each over its range of V into a partial of the inputs'
dtype, the partials added in float32. The tests lower the thresholds so that small problems take the
path.

Tolerances: each partial is a float32 sum rounded once to the inputs' dtype, so it is off its exact
value by at most half an ulp of its own magnitude plus the float32 sum's error: per element within
``2⁻⁸·Σ_v |u_v|·|w_v|`` of the exact product for bfloat16 (``2⁻¹¹`` for float16), summed over the
partials, which the float32 addition of at most three partials does not reach. A bfloat16 or float16
``out`` is the float32 sum rounded once more, which adds half an ulp of the result. In the loss only
``grad_h`` goes through this product, so the loss, the log-probs and ``grad_W`` are bit for bit those
of the path in pieces of rows; ``grad_h`` is, in norm, within ``2⁻⁷`` of that path's (each is a few
bfloat16 roundings, ``2⁻⁹`` relative each, from the same float32 value; one element may be further where
its terms cancel), and within the bound of tests/test_one_pass.py against float64: twice PyTorch's own
bfloat16 error.
"""

import math

import pytest
import torch

from conftest import torch_threads
from robalign.ops import cpu, one_pass
from test_one_pass import bf16_pytorch_run, problem, reference_run, run

UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def split_calls(monkeypatch):
    """The ``parts`` of every call to ``times_weight_split_``, which still runs."""
    calls = []
    real = cpu.times_weight_split_

    def spy(out, u, w, parts):
        calls.append(parts)
        return real(out, u, w, parts)

    monkeypatch.setattr(cpu, "times_weight_split_", spy)
    return calls


def bound(u: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """Per element: the partials' rounding (``UNIT`` of ``Σ|u||w|``), and ``out``'s own rounding."""
    scale = u.double().abs() @ w.double().abs()
    extra = UNIT[out_dtype] if out_dtype != torch.float32 else 0.0
    return scale * UNIT[dtype] + (u.double() @ w.double()).abs() * extra + 1e-30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", ["float32", "same"])
@pytest.mark.parametrize("parts", [1, 2, 3, 8, 17])
def test_split_product_is_the_product(dtype, out_dtype, parts):
    """Each element within the partials' rounding of the exact ``U·W``, for strided ``U`` (a column
    slice of a wider chunk) and a head stored transposed; ``V`` not a multiple of ``parts``; 8 and 17
    parts, as a server's threads split it, run several to a thread here."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(45, 1100, generator=gen).to(dtype)
    u = wide[:, 3:1004]                                     # [45, 1001], row stride 1100
    w = (torch.randn(40, 1001, generator=gen) / 8).to(dtype).T     # [1001, 40], stored transposed
    out = torch.full((45, 40), float("nan"), dtype=torch.float32 if out_dtype == "float32" else dtype)
    cpu.times_weight_split_(out, u, w, parts)
    want = u.double() @ w.double()
    gap = (out.double() - want).abs()
    assert bool((gap <= bound(u, w, dtype, out.dtype)).all()), f"worst excess {(gap / bound(u, w, dtype, out.dtype)).max():.2f}"


def test_split_product_refuses_what_it_cannot_do():
    u, w = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    cases = [
        (torch.empty(4, 3), u.float(), w.float(), "u and w must both be bfloat16 or both float16"),
        (torch.empty(4, 3), u, w.half(), "u and w must both be bfloat16 or both float16"),
        (torch.empty(4, 3, dtype=torch.float64), u, w, "out must be float32 or"),
        (torch.empty(4, 4), u, w, r"do not give \[4, 4\]"),
        (torch.empty(4, 3), u[:, :5], w, "do not give"),
    ]
    for out, a, b, message in cases:
        with pytest.raises(RuntimeError, match=message):
            cpu.times_weight_split_(out, a, b, 2)
    square = torch.randn(8, 8).bfloat16()
    for a, b in ((square, torch.randn(8, 8).bfloat16()), (torch.randn(8, 8).bfloat16(), square)):
        with pytest.raises(RuntimeError, match="out must not share memory with u or w"):
            cpu.times_weight_split_(square, a, b, 2)


def test_times_weight_takes_the_split_where_it_applies(split_calls):
    """In the slow rows, at most 768 columns, V of at least two shares and more than one thread: the
    split, in float32 without ``out``; at 896 columns the whole product; without the C++ module, pieces."""
    calls = split_calls
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(400, 4096, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    for width, split in ((512, threads > 1), (768, threads > 1), (896, False)):
        w = torch.randn(4096, width, generator=gen).bfloat16()
        calls.clear()
        got = one_pass._times_weight(u, w, rows=cpu)
        assert bool(calls) == split and got.dtype == (torch.float32 if split else torch.bfloat16)
        if split:
            assert calls == [min(threads, 4096 // one_pass._SPLIT_MIN_REDUCTION)]
        gap = (got.double() - u.double() @ w.double()).abs()
        assert bool((gap <= bound(u, w, torch.bfloat16, got.dtype)).all())
    calls.clear()
    assert one_pass._times_weight(u, w[:, :512], rows=None).dtype == torch.bfloat16 and not calls


def assert_as_the_pieces(got, want):
    """The split path's loss, grad_h and grad_W (``got``) against the pieces path's (``want``): the loss and
    ``grad_W`` bit for bit (neither goes through ``U·W``), ``grad_h`` within ``2⁻⁷`` in norm."""
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert (got[1].double() - want[1].double()).norm() <= 2 ** -7 * want[1].double().norm()


@pytest.mark.parametrize("lam", [1.0, math.inf])
@pytest.mark.parametrize("chunk", [10 ** 6, 9])
def test_grad_hidden_from_the_split_product(lam, chunk, chunks, split_calls, monkeypatch):
    """The bfloat16 one-pass loss on CPU with every chunk's ``U·W`` split in two (one chunk, and chunks
    of 9 tokens): the loss and ``grad_W`` bit for bit those of the pieces path, ``grad_h`` within ``2⁻⁷``
    of it in norm, and against float64 within twice PyTorch's bfloat16 error."""
    if torch.get_num_threads() < 2:
        pytest.skip("the split needs two threads")
    calls = split_calls
    chunks(chunk)
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16, bias=False)
    monkeypatch.setattr(one_pass, "_HALF_SLOW_ROWS", (1, 1 << 40))
    monkeypatch.setattr(one_pass, "_SPLIT_MIN_REDUCTION", 1 << 40)          # no split: pieces of rows
    want, _ = run(p, "dpo", lam, "cpp", device="cpu")
    assert not calls
    monkeypatch.setattr(one_pass, "_SPLIT_MIN_REDUCTION", 200)              # two shares of V 500
    got, _ = run(p, "dpo", lam, "cpp", device="cpu")
    assert calls and set(calls) == {2}
    assert got[1].dtype == torch.bfloat16
    assert_as_the_pieces(got, want)
    ref = reference_run(p, "dpo", lam)
    theirs = bf16_pytorch_run(dict(p, bias=torch.zeros(500, dtype=torch.bfloat16)), "dpo", lam)
    err = lambda a, b: (a.double() - b).norm().item()
    for i in range(3):
        assert err(got[i], ref[i]) <= 2 * err(theirs[i], ref[i]) + 1e-6, f"output {i}"


@pytest.mark.parametrize("threads", [2, 3])
def test_loss_takes_the_split_at_its_real_thresholds(threads, split_calls, monkeypatch):
    """Nothing lowered: a bfloat16 call of 558 scored tokens through a head of V 6144 splits ``U·W``
    into one share per thread (three shares of 2048 on three threads, more threads than this machine's
    cores included), and gives what the pieces path gives: the loss and ``grad_W`` bit for bit,
    ``grad_h`` within ``2⁻⁷`` in norm; each output within bfloat16's few roundings of float64."""
    calls = split_calls
    p = problem("dpo", groups=4, t=110, h=64, v=6144, dtype=torch.bfloat16, bias=False, seed=7)
    with torch_threads(threads):
        got, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
        assert calls and set(calls) == {threads}
        monkeypatch.setattr(one_pass, "_SPLIT_MIN_REDUCTION", 1 << 40)      # the pieces of rows instead
        calls.clear()
        want, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
        assert not calls
    assert_as_the_pieces(got, want)
    ref = reference_run(p, "dpo", 1.0)
    for i in range(3):      # a few bfloat16 roundings, 2⁻⁹ relative each, of every element (the sweep's gate)
        assert (got[i].double() - ref[i]).norm() <= 2e-2 * ref[i].norm(), f"output {i}"
