"""The one-pass loss's last head-gradient product, left to the backward (``robalign.ops.one_pass._defers``).

For a float32 head on CPU the forward leaves the last chunk's ``Uᵀ·(c ⊙ h)`` to the backward, which
adds it with the scale in one ``addmm`` (``alpha``, ``beta``) instead of one more pass over the
``[V, H]`` gradient; the chunk's ``Uᵀ`` stays in the logits workspace, lent to the backward.

Tolerance: the gradients with and without the deferral within 1e-6 relative (plus 1e-6·scale
absolute): the same float32 products, the scale applied by the GEMM's ``alpha`` in float32 instead
of a multiplication after it — a few float32 roundings apart, ten times tighter than the 1e-5 the
one-pass loss meets against float64 (tests/test_one_pass.py, which runs this path too).
"""

import math

import pytest
import torch

from robalign.ops import one_pass, workspace
from test_one_pass import assert_close, loss_fn, problem, reference_run, run

RTOL = 1e-6


@pytest.fixture
def lent(monkeypatch):
    """The loans :func:`workspace.lend` made (a call that deferred its product makes one)."""
    loans = []
    real = workspace.lend

    def spy(name):
        loan = real(name)
        loans.append(loan)
        return loan

    monkeypatch.setattr(workspace, "lend", spy)
    return loans


def _without_deferral(monkeypatch, p, objective, lam, **kw):
    with monkeypatch.context() as m:
        m.setattr(one_pass, "_defers", lambda *a: False)
        return run(p, objective, lam, "cpp", device="cpu", **kw)[0]


@pytest.mark.parametrize("chunking", [10 ** 6, 20, 3], ids=["one-chunk", "two-chunks", "sub-chunks"])
@pytest.mark.parametrize("lam", [1.0, 0.05, math.inf, -0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_deferred_equals_formed_in_the_forward(chunking, lam, bias, chunks, lent, monkeypatch):
    chunks(chunking)
    p = problem("dpo", bias=bias)
    want = _without_deferral(monkeypatch, p, "dpo", lam)
    assert not lent
    got, _ = run(p, "dpo", lam, "cpp", device="cpu")
    assert_close(got, want, rtol=RTOL)
    assert_close(got, reference_run(p, "dpo", lam), rtol=1e-5)
    # a sub-chunked last group forms its product in pieces, in the forward
    assert bool(lent) == (chunking != 3)


@pytest.mark.parametrize("lam", [0.2, -0.5])
def test_the_maximum_rising_after_the_last_product(lam, chunks, lent, monkeypatch):
    """The last group has no scored token and the largest w·ℓ/λ, in a chunk of its own (as in
    tests/test_one_pass.py's groups without scored tokens, but with chunks that hold whole groups):
    the running maximum rises after the product was left to the backward, whose ``alpha`` and
    ``beta`` then carry that rescaling too."""
    chunks(8)
    p = problem("dpo", groups=6)
    for g in (2, 5):
        p["labels"][2 * g:2 * g + 2] = -100
    if lam > 0:
        p["ref"][10] = 40.0                                             # chosen far below the reference
    else:
        p["weights"][5] = 1e-3                                          # w·ℓ ≈ 0, the others > 0
    group_tokens = (p["labels"] != -100).sum(1).view(6, 2).sum(1).tolist()
    assert one_pass.plan_chunks(group_tokens, 8)[-2:] == [(4, 5), (5, 6)] and group_tokens[4] <= 8
    want = _without_deferral(monkeypatch, p, "dpo", lam)
    got, out = run(p, "dpo", lam, "cpp", device="cpu")
    assert lent
    assert (out.weights * out.losses / lam).argmax() == 5
    assert_close(got, want, rtol=RTOL)
    assert_close(got, reference_run(p, "dpo", lam), rtol=1e-5)


def _call(p, shift=0.0):
    h = (p["hidden"] + shift).clone().requires_grad_(True)
    w = p["weight"].clone().requires_grad_(True)
    out = loss_fn("dpo", 1.0, 2, "cpp")(hidden=h, head_weight=w, labels=p["labels"], ref_logps=p["ref"],
                                        weights=p["weights"])
    return out.loss, h, w


def test_a_second_call_before_the_backward_leaves_the_first_product_intact(chunks, lent):
    """Two calls, then one backward of their sum: the second call's chunk goes into a buffer of its
    own, so the first call's lent ``Uᵀ`` is what its backward reads."""
    chunks(10 ** 6)
    p = problem("dpo")
    separate = []
    for shift in (0.0, 0.3):
        loss, h, w = _call(p, shift)
        loss.backward()
        separate.append(w.grad)
    a, _, w1 = _call(p, 0.0)
    b, _, w2 = _call(p, 0.3)
    (a + b).backward()
    assert len([loan for loan in lent if loan is not None]) >= 3
    torch.testing.assert_close(w1.grad, separate[0], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(w2.grad, separate[1], rtol=RTOL, atol=RTOL)


def test_the_workspace_is_lent_then_given_back(chunks):
    chunks(10 ** 6)
    p = problem("dpo")
    _call(p)[0].backward()                              # the workspace now exists
    kept = workspace._KEPT.logits
    loss, _, _ = _call(p)
    assert workspace._KEPT.logits is None               # lent: a call now would get a buffer of its own
    loss.backward()
    assert workspace._KEPT.logits is kept               # given back, warm for the next call


def test_a_release_between_forward_and_backward_frees_the_chunk(chunks):
    """A training step releases the workspaces before the model's backward: the lent chunk is then
    freed after the loss's backward, not kept again."""
    chunks(10 ** 6)
    p = problem("dpo")
    loss, _, w = _call(p)
    workspace.release()
    loss.backward()
    assert getattr(workspace._KEPT, "logits", None) is None
    assert torch.isfinite(w.grad).all()


def test_only_the_hidden_gradient_asked(chunks, lent, monkeypatch):
    chunks(10 ** 6)
    p = problem("dpo")
    loss, h, w = _call(p)
    (grad_h,) = torch.autograd.grad(loss, h)
    assert lent and w.grad is None
    assert workspace._KEPT.logits is not None           # the lent chunk given back all the same
    with monkeypatch.context() as m:
        m.setattr(one_pass, "_defers", lambda *a: False)
        loss, h, _ = _call(p)
        (want,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(grad_h, want, rtol=0, atol=0)


def test_a_zero_incoming_gradient(chunks):
    chunks(10 ** 6)
    loss, h, w = _call(problem("dpo"))
    (0.0 * loss).backward()
    assert torch.equal(w.grad, torch.zeros_like(w.grad)) and torch.equal(h.grad, torch.zeros_like(h.grad))


@pytest.mark.parametrize("chunking, fp32_head_grad, defers", [
    (10 ** 6, True, True),          # one chunk: one GEMM forms grad_W in bfloat16
    (8, True, False),               # several: a float32 buffer, narrowed in the backward
    (8, False, True),               # several, accumulated in bfloat16 (LossParams(fp32_head_grad=False))
], ids=["one-chunk", "float32-buffer", "bfloat16-accumulation"])
def test_bfloat16_head(chunking, fp32_head_grad, defers, chunks, lent, monkeypatch):
    """Where a bfloat16 head's gradient is formed in bfloat16, the backward's ``addmm`` rounds it once,
    from the float32 sum times the scale, where it was rounded before the scaling and after: the
    head's gradient is nearer float64; the other outputs are the same bit for bit."""
    chunks(chunking)
    p = problem("dpo", groups=4, h=64, v=1000, dtype=torch.bfloat16)
    want = _without_deferral(monkeypatch, p, "dpo", 1.0, fp32_head_grad=fp32_head_grad)
    got, _ = run(p, "dpo", 1.0, "cpp", device="cpu", fp32_head_grad=fp32_head_grad)
    assert bool(lent) == defers
    for i in (0, 1, 3):
        assert torch.equal(got[i], want[i]), f"output {i}"
    truth = reference_run(p, "dpo", 1.0)[2]
    err = lambda g: ((g.double() - truth).norm() / truth.norm()).item()
    if defers:
        assert err(got[2]) < err(want[2]), (err(got[2]), err(want[2]))
    else:
        assert torch.equal(got[2], want[2])


def test_not_deferred_for_a_float16_head(chunks, lent):
    chunks(10 ** 6)
    run(problem("dpo", dtype=torch.float16), "dpo", 1.0, "cpp", device="cpu", fp32_head_grad=False)
    assert not lent
