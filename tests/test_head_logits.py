"""The head's logits a block of vocabulary columns at a time (``robalign.ops.head.head_logits``).

For a bfloat16 head on CPU from ``_BLOCKED_MIN_ROWS`` rows, ``h·Wᵀ (+ b)`` is formed by one GEMM per
block of ``_BLOCK_COLUMNS`` columns, written into the output's columns (oneDNN runs the whole product
slower). The tests lower both constants so that small problems take the path in several blocks and a
remainder.

Tolerances: each logit is the same float32 dot product over H, rounded once to bfloat16; the GEMM on a
block may add it in another order, so a logit may land on the neighbouring bfloat16 value — within one
bfloat16 ulp (relative spacing at most 2⁻⁷) of the whole product's. float32, and bfloat16 below the
threshold, are the whole product itself, bit for bit. The losses that form their chunks with it keep
the bfloat16 bound of tests/test_one_pass.py against float64: within twice PyTorch's own bfloat16 error.
"""

import math

import pytest
import torch

from robalign.ops import head
from robalign.ops.head import head_logits
from test_one_pass import bf16_pytorch_run, problem, reference_run, run

ULP = 2.0 ** -7


@pytest.fixture
def blocks(monkeypatch):
    """Blocks of 64 columns from one row on; returns the number of GEMMs run by ``torch.mm``/``addmm``."""
    calls = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(head, "_BLOCKED_MIN_ROWS", 1)
    monkeypatch.setattr(head, "_BLOCK_COLUMNS", 64)
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_blocked_logits_are_the_whole_product(bias, into, blocks):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(37, 48, generator=gen).bfloat16()
    w = torch.randn(700, 48, generator=gen).bfloat16()          # 10 blocks of 64 and one of 60
    b = torch.randn(700, generator=gen).bfloat16() if bias else None
    want = torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T)
    blocks.clear()
    wide = torch.full((40, 710), 7.0, dtype=torch.bfloat16)
    out = wide[:37, 5:705] if into else None                    # rows of stride 710, as a kept workspace's
    got = head_logits(h, w, b, out=out)
    assert len(blocks) == 11
    assert got.shape == (37, 700) and (not into or got.data_ptr() == out.data_ptr())
    torch.testing.assert_close(got.float(), want.float(), rtol=ULP, atol=0)
    if into:
        assert (wide[:, :5] == 7).all() and (wide[:, 705:] == 7).all() and (wide[37:] == 7).all()


@pytest.mark.parametrize("dtype, rows", [(torch.float32, 400), (torch.bfloat16, 383)])
def test_whole_product_elsewhere(dtype, rows, monkeypatch):
    """float32 (MKL runs the whole product fine), and bfloat16 under the row threshold: one GEMM, the
    whole product bit for bit."""
    monkeypatch.setattr(head, "_BLOCK_COLUMNS", 64)
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(rows, 16, generator=gen).to(dtype), torch.randn(300, 16, generator=gen).to(dtype)
    assert torch.equal(head_logits(h, w), torch.mm(h, w.T))


@pytest.mark.parametrize("path", ["one-pass", "one-pass-sub-chunks", "recompute", "token-stats"])
@pytest.mark.parametrize("lam", [1.0, math.inf])
def test_losses_on_blocked_logits_stay_within_the_bfloat16_bound(path, lam, chunks, blocks):
    """The one-pass loss (one chunk; and 3-token sub-chunks, whose logits are formed twice), the
    recompute path (``one_pass=False``: the fused linear log-probs) and the logged token statistics, all
    on blocked logits (V 500: eight blocks): against float64 within twice PyTorch's bfloat16 error."""
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16)
    p["weights"] = p["weights"].bfloat16().float()
    if path == "token-stats":
        from robalign.ops.token_stats import token_stats
        blocks.clear()
        got = token_stats(p["labels"], hidden=p["hidden"], head_weight=p["weight"], head_bias=p["bias"])
        assert blocks
        want = token_stats(p["labels"], hidden=p["hidden"].double(), head_weight=p["weight"].double(),
                           head_bias=p["bias"].double())
        z = torch.addmm(p["bias"], p["hidden"].reshape(-1, 32), p["weight"].T).float()   # PyTorch's own bfloat16 logits
        theirs = token_stats(p["labels"], logits=z.view(*p["labels"].shape, -1))
        err = lambda a, b: (a.double() - b.double()).norm().item()
        for i in (0, 1):
            assert err(got[i], want[i]) <= 2 * err(theirs[i], want[i]) + 1e-6, f"statistic {i}"
        assert torch.equal(got[2], want[2])
        return
    chunks(3 if path == "one-pass-sub-chunks" else 10 ** 6)
    blocks.clear()
    got, _ = run(p, "dpo", lam, "cpp", device="cpu", one_pass_=path != "recompute")
    assert blocks
    want = reference_run(p, "dpo", lam)
    theirs = bf16_pytorch_run(p, "dpo", lam)
    err = lambda a, b: (a.double() - b).norm().item()
    for i in range(4):
        assert err(got[i], want[i]) <= 2 * err(theirs[i], want[i]) + 1e-6, f"output {i}"
