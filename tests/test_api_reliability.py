"""The per-sample API on hostile input: the DRO value at any λ (against 50-digit arithmetic),
and every invalid argument refused with a message that names it — at construction where the
value is known then, and without rounding the number first."""

import mpmath
import pytest
import torch

import robalign
from robalign import ground_truth, objectives

LAMS = [s * 10.0 ** e for e in range(-6, 13, 2) for s in (1, -1)]


def exact_kl_dro(values, lam):
    """λ·log mean exp(x/λ) with 50 significant digits."""
    with mpmath.workdps(50):
        xs = [mpmath.mpf(float(v)) for v in values]
        m = max(x / lam for x in xs)
        # expm1/log1p: at |λ| = 1e300 the exponents differ by 1e-300, which e^x − then-log would lose
        return float(lam * (m + mpmath.log1p(sum(mpmath.expm1(x / lam - m) for x in xs) / len(xs))))


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_kl_dro_value_for_any_lambda(lam, dtype, rtol):
    gen = torch.Generator().manual_seed(0)
    for losses in (torch.tensor([1.0, 2.0, 3.0]), torch.rand(17, generator=gen) * 4 - 1):
        losses = losses.to(dtype)
        weights = torch.rand(losses.shape, generator=gen, dtype=torch.float64).to(dtype) + 0.2
        want = exact_kl_dro((weights.double() * losses.double()).tolist(), lam)
        # rtol is relative to the value; 1e-6·|λ|·… is below it for these losses at every λ
        assert robalign.kl_dro(losses, weights, lam=lam).item() == pytest.approx(want, rel=rtol, abs=rtol)
        if dtype == torch.float64:
            assert ground_truth.kl_dro(losses, weights, lam=lam).item() == pytest.approx(want, rel=rtol, abs=rtol)


def test_the_issue_examples():
    assert robalign.kl_dro(torch.tensor([1.0, 2.0, 3.0]), lam=1e9).item() == pytest.approx(2.0, rel=1e-6)
    assert robalign.kl_dro(torch.tensor([1.0, 2.0, 3.0]), lam=1e6).item() == pytest.approx(2.0, rel=1e-6)
    half = robalign.kl_dro(torch.tensor([100.0, 5000.0, 60000.0], dtype=torch.float16), lam=0.5)
    assert half.dtype == torch.float16 and half.item() == pytest.approx(60000.0, rel=1e-3)


@pytest.mark.parametrize("lam", [1e-3, 0.7, 1e6, 1e12, -2.0, -1e9])
def test_accumulator_value_for_any_lambda(lam):
    gen = torch.Generator().manual_seed(1)
    losses = torch.rand(12, generator=gen) * 3
    weights = torch.rand(12, generator=gen) + 0.1
    param = torch.nn.Parameter(torch.zeros(()))
    acc = robalign.KLDROAccumulator([param], lam=lam)
    for part, w in zip(losses.chunk(3), weights.chunk(3)):
        acc(part + 0 * param, w).backward()
    want = exact_kl_dro((weights.double() * losses.double()).tolist(), lam)
    assert acc.loss == pytest.approx(want, rel=1e-6, abs=1e-6)


EXTREME_LAMS = [1e300, 1e200, 1e38, 1e-38, 1e-300, 5e-324, -5e-324, -1e-38, -1e38, -1e300]


@pytest.mark.parametrize("lam", EXTREME_LAMS)
def test_lambda_at_float64s_edges_gives_the_limit_on_every_path(lam):
    """λ beyond float32's range, or float64's: the value (against 50 digits), the gradient (the
    softmax weights, uniform or one-hot in the limit) and the same on the accumulator and the
    one-pass and recompute paths (NaN, 0.0 or inf·0 before)."""
    losses = torch.tensor([0.3, 1.2, 0.7, 2.5, 1.9])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8])
    want = exact_kl_dro((weights.double() * losses.double()).tolist(), lam)
    x = losses.clone().requires_grad_(True)
    loss = robalign.kl_dro(x, weights, lam=lam)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    wl = weights * losses
    q = torch.full_like(wl, 1 / wl.numel()) if abs(lam) >= 1 else (wl == (wl.max() if lam > 0 else wl.min())).float()
    torch.testing.assert_close(grad, q * weights, rtol=1e-6, atol=1e-7)
    param = torch.nn.Parameter(torch.zeros(()))
    acc = robalign.KLDROAccumulator([param], lam=lam)
    for part, w in zip(losses.split([2, 3]), weights.split([2, 3])):
        acc(part + param, w).backward()
    assert acc.loss == pytest.approx(want, rel=1e-6)
    assert float(param.grad) == pytest.approx(float((q * weights).sum()), rel=1e-6)
    gen = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(4, 5, 6, generator=gen), torch.randn(11, 6, generator=gen)
    labels, refs = torch.randint(11, (4, 5), generator=gen), torch.randn(4, generator=gen) - 12
    runs = []
    for one_pass in (True, False):
        h = hidden.clone().requires_grad_(True)
        out = robalign.DoRALoss("dpo", beta=0.1, lam=lam, backend="cpp", one_pass=one_pass)(
            hidden=h, head_weight=head, labels=labels, ref_logps=refs)
        out.loss.backward()
        runs.append((out.loss.detach(), h.grad))
    assert all(torch.isfinite(t).all() for run in runs for t in run)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: robalign.KLDROAccumulator([], lam=1.0, exact=False, accumulation_steps=True), TypeError,
     r"`accumulation_steps` must be an int, got bool"),
    (lambda: robalign.KLDROAccumulator([], lam=1.0, exact=False, accumulation_steps=0), ValueError,
     r"`accumulation_steps` must be an int >= 1, got 0"),
    (lambda: robalign.DoRALoss("dpo", beta=-1.0), ValueError, r"DoRALoss: `beta` must lie in \(0, inf\), got -1.0"),
    (lambda: robalign.DoRALoss("dpo", class_ratio=0.0), ValueError, r"`class_ratio` must lie in \(0, inf\)"),
    (lambda: robalign.DoRALoss("dpo", label_smoothing=0.5), ValueError, r"`label_smoothing` must lie in \[0, 0.5\)"),
    (lambda: robalign.DoRALoss("dpo", beta=float("inf")), ValueError, r"`beta` must be finite"),
    (lambda: robalign.DoRALoss("dpo", ignore_index=1.5), TypeError, r"`ignore_index` must be an int"),
    (lambda: robalign.dora_weights(torch.rand(4), alpha=torch.full((3,), 0.5)), ValueError,
     r"`alpha` of shape \(3,\) does not broadcast to `probs` \(4,\)"),
    (lambda: robalign.dora_weights(torch.rand(4), alpha=torch.full((2, 4), 0.5)), ValueError,
     r"`alpha` of shape \(2, 4\) would change the shape of `probs` \(4,\)"),
    (lambda: objectives.dpo(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long)), TypeError,
     r"`ref_logps` must be a floating tensor"),
    (lambda: objectives.plackett_luce(torch.zeros(3, 1), torch.zeros(3, 1)), ValueError,
     r"`logps` must be \[B, K\] with K >= 2 candidates to compare, got \(3, 1\)"),
    (lambda: objectives.rrhf(torch.zeros(3, 2), counts=torch.tensor([[1, -1]] * 3)), ValueError,
     r"`counts` must be non-negative token counts, got -1"),
])
def test_invalid_arguments_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_numbers_are_checked_in_their_own_precision():
    """float32 would round these to 0, 0 and 0.5 and then refuse them with messages that
    contradict themselves ("must lie in (0, inf), got 1e-300")."""
    robalign.DoRALoss("dpo", beta=1e-300)
    robalign.DoRALoss("robust", label_smoothing=0.49999999999)
    robalign.DoRALoss("dpo", alpha=1e-50)
    assert robalign.dora_weights(torch.tensor([0.5], dtype=torch.float64), alpha=1e-50).item() > 0
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.isfinite(objectives.robust(x, x * 0, label_smoothing=0.49999999999)).all()


def from_logps_case(**kw):
    loss = robalign.DoRALoss(kw.pop("objective", "dpo"), alpha=0.5)
    logps = torch.randn(4, dtype=torch.float64)
    args = dict(counts=torch.tensor([3, 4, 5, 6]), ref_logps=torch.randn(4, dtype=torch.float64))
    args.update(kw)
    counts = args.pop("counts")
    return loss.from_logps(logps, counts, **args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(objective="simpo", counts=None), ValueError, r"`counts` \(scored tokens per sequence, \[S\]\) is required"),
    (dict(counts=torch.tensor([3, 4, 5])), ValueError, r"`counts` must be \[S\] = \[4\] like `policy_logps`, got \(3,\)"),
    (dict(counts=torch.tensor([3, -4, 5, 6])), ValueError, r"`counts` must be non-negative token counts, got -4"),
    (dict(counts=torch.ones(4)), TypeError, r"`counts` must be an integer tensor \[S\], got torch.float32"),
    (dict(ref_logps=torch.zeros(4, dtype=torch.long)), TypeError, r"`ref_logps` must be a floating tensor"),
    (dict(probs=torch.tensor([0, 1, 1, 0])), TypeError, r"`probs` must be a floating tensor"),
])
def test_from_logps_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        from_logps_case(**kw)


def test_from_logps_without_counts_for_a_reference_objective():
    out = from_logps_case(counts=None)
    assert torch.isfinite(out.loss)


def test_ref_logits_beside_ref_logps_is_refused():
    loss = robalign.DoRALoss("dpo")
    logits, labels = torch.randn(2, 3, 5), torch.randint(5, (2, 3))
    with pytest.raises(ValueError, match=r"pass `ref_logps` or `ref_logits`, not both"):
        loss(logits=logits, labels=labels, ref_logps=torch.zeros(2), ref_logits=logits)
