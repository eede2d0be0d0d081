"""The head gradient's product from a transposed copy of the chunk (``robalign.ops.one_pass._addmm_head``).

A bfloat16 chunk on CPU laid out by rows hands oneDNN ``Uᵀ·(c ⊙ h)`` with ``Uᵀ`` copied contiguous, a
block of V rows at a time, by the C++ backend's ``transpose_into_``, from ``_TRANSPOSE_MIN_TOKENS``
tokens on. The tests lower that threshold and the block so that a small problem takes the path in
many blocks and a remainder.

Tolerances: ``transpose_into_`` moves bits, so it equals ``src.T`` exactly. The head gradient from
the copy: each element is the same float32 sum of C products, rounded once to bfloat16; the GEMM on a
block of rows may add them in another order, so an element may land on the neighbouring bfloat16
value — within one bfloat16 ulp (relative spacing at most 2⁻⁷) of the plain product's. The other
outputs do not go through this product and are equal bit for bit. Against float64, the loss keeps
the bfloat16 bound of tests/test_one_pass.py: within twice PyTorch's own bfloat16 error.
"""

import math

import pytest
import torch

from robalign.ops import cpu, one_pass
from test_one_pass import bf16_pytorch_run, problem, reference_run, run

ULP = 2.0 ** -7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n", [(1, 1), (31, 33), (32, 32), (33, 100), (70, 1000)])
def test_transpose_into_is_the_transpose(dtype, m, n):
    """``out ← srcᵀ`` for a column slice of a wider matrix (rows of stride > n) into a contiguous
    ``out`` and into a column slice of a wider one: every tile size, full and partial."""
    gen = torch.Generator().manual_seed(m * 1000 + n)
    wide = torch.randn(m, n + 37, generator=gen).to(dtype)
    src = wide[:, 5:5 + n]
    out = torch.empty(n, m, dtype=dtype)
    cpu.transpose_into_(out, src)
    assert torch.equal(out, src.T)
    into = torch.full((n, m + 9), 7.0, dtype=dtype)
    cpu.transpose_into_(into[:, 3:3 + m], src)
    assert torch.equal(into[:, 3:3 + m], src.T)
    assert (into[:, :3] == 7).all() and (into[:, 3 + m:] == 7).all()


def test_transpose_into_refuses_what_it_cannot_do():
    x = torch.randn(8, 6).bfloat16()
    cases = [
        (torch.empty(6, 8), x.float(), "both be bfloat16 or both float16"),
        (torch.empty(6, 8, dtype=torch.float16), x, "both be bfloat16 or both float16"),
        (torch.empty(8, 6, dtype=torch.bfloat16), x, r"out must be \[6, 8\]"),
        (torch.empty(8, 6, dtype=torch.bfloat16), x.T, "unit-stride rows"),
        (torch.empty(8, 6, dtype=torch.bfloat16).T, x, "unit-stride rows"),
    ]
    for out, src, message in cases:
        with pytest.raises(RuntimeError, match=message):
            cpu.transpose_into_(out, src)
    square = torch.randn(8, 8).bfloat16()
    with pytest.raises(RuntimeError, match="must not share memory"):
        cpu.transpose_into_(square, square)


@pytest.fixture
def transposed(monkeypatch):
    """The path taken at every size, in blocks of 32 rows of V; returns the calls to transpose_into_."""
    calls = []
    real = cpu.transpose_into_

    def spy(out, src):
        calls.append(tuple(out.shape))
        return real(out, src)

    monkeypatch.setattr(cpu, "transpose_into_", spy)

    def take(on: bool):
        monkeypatch.setattr(one_pass, "_TRANSPOSE_MIN_TOKENS", 1 if on else 1 << 40)
        monkeypatch.setattr(one_pass, "_TRANSPOSE_BLOCK_ELEMENTS", 1)
    return take, calls


@pytest.mark.parametrize("path", ["deferred", "in-the-forward", "bf16-sums-in-chunks"])
@pytest.mark.parametrize("lam", [1.0, math.inf, -0.5])
def test_head_gradient_from_the_transposed_copy(path, lam, chunks, transposed, monkeypatch):
    """The one-pass loss, bfloat16 on CPU: the last product left to the backward (one chunk), formed in
    the forward (one chunk, no deferral) and added chunk by chunk in bfloat16 (``fp32_head_grad=False``,
    several chunks): grad_W within one bfloat16 ulp of the plain product's, the rest bit for bit, and
    the copy made in blocks of 32 rows of V 500 (15 blocks and a part per product)."""
    take, calls = transposed
    if path == "in-the-forward":
        monkeypatch.setattr(one_pass, "_defers", lambda *a: False)
    chunks(7 if path == "bf16-sums-in-chunks" else 10 ** 6)
    kw = {"fp32_head_grad": False} if path == "bf16-sums-in-chunks" else {}
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16, bias=False)
    take(False)
    want, _ = run(p, "dpo", lam, "cpp", device="cpu", **kw)
    assert not calls
    take(True)
    got, _ = run(p, "dpo", lam, "cpp", device="cpu", **kw)
    assert calls and len(calls) % 16 == 0 and set(calls) >= {(32, calls[0][1]), (20, calls[0][1])}
    assert got[2].dtype == torch.bfloat16
    for i in (0, 1):
        assert torch.equal(got[i], want[i]), f"output {i}"
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=ULP, atol=0)
    ref = reference_run(p, "dpo", lam)
    theirs = bf16_pytorch_run(dict(p, bias=torch.zeros(500, dtype=torch.bfloat16)), "dpo", lam)
    err = lambda a, b: (a.double() - b).norm().item()
    for i in range(3):
        assert err(got[i], ref[i]) <= 2 * err(theirs[i], ref[i]) + 1e-6, f"output {i}"
