"""dora_weights and kl_dro: closed forms, limits and gradients (public and reference)."""

import math

import pytest
import torch

import robalign
from robalign import ground_truth


def test_dora_weights_closed_form_and_limits():
    p = torch.tensor([0.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    w = robalign.dora_weights(p, 0.25)
    assert w[0].item() == 0.0                                   # p = 0: exactly 0, not NaN
    assert w[1].item() == pytest.approx(1 / (0.25 + 0.75))
    assert w[2].item() == pytest.approx(4.0)                    # p = 1: 1/α
    assert w[3].item() == pytest.approx(1 / (0.25 + 0.75 * 4))
    w2 = robalign.dora_weights(p, 0.25, class_ratio=2.0)
    assert w2[1].item() == pytest.approx(1 / (0.25 + 1.5))
    assert torch.isfinite(w).all() and ((w >= 0) & (w <= 4)).all()


def test_dora_weights_range_on_random_probs():
    p = torch.rand(1000, dtype=torch.float64)
    for alpha in (0.1, 0.5, 1.0):
        w = robalign.dora_weights(p, alpha)
        assert ((w >= 0) & (w <= 1 / alpha + 1e-12)).all()


def test_dora_weights_alpha_one_is_uniform_even_at_p_zero():
    p = torch.tensor([0.0, 0.3, 1.0])
    assert robalign.dora_weights(p, 1.0).tolist() == [1.0, 1.0, 1.0]


def test_dora_weights_broadcast_beta_per_position():
    p = torch.full((3, 2), 0.5, dtype=torch.float64)
    beta = torch.tensor([0.5, 0.25], dtype=torch.float64)
    w = robalign.dora_weights(p, 0.25, beta)
    torch.testing.assert_close(w[0], torch.tensor([1 / 0.75, 1 / 0.5], dtype=torch.float64))


def test_dora_weights_gradcheck():
    p = (torch.rand(6, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: robalign.dora_weights(p, 0.3, class_ratio=1.7), (p,))


def test_kl_dro_hand_computed():
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert robalign.kl_dro(losses, weights, lam=1.0).item() == pytest.approx(1.0)
    want = 2.0 * math.log((math.exp(0.5) + math.exp(1.0)) / 2)
    assert robalign.kl_dro(losses, lam=2.0).item() == pytest.approx(want)


def test_kl_dro_limits():
    losses = torch.randn(9, dtype=torch.float64)
    w = torch.rand(9, dtype=torch.float64) * 2
    wl = w * losses
    assert robalign.kl_dro(losses, w, lam=float("inf")).item() == pytest.approx(wl.mean().item(), abs=1e-14)
    assert robalign.kl_dro(losses, w, lam=1e7).item() == pytest.approx(wl.mean().item(), abs=1e-6)
    assert robalign.kl_dro(losses, w, lam=1e-4).item() == pytest.approx(wl.max().item(), abs=1e-3)
    assert robalign.kl_dro(losses, w, lam=-1e-4).item() == pytest.approx(wl.min().item(), abs=1e-3)
    # monotone in λ between min and max: λ log mean exp(x/λ) decreases as λ grows
    values = [robalign.kl_dro(losses, w, lam=lam).item() for lam in (0.1, 1.0, 10.0)]
    assert values[0] > values[1] > values[2] > wl.mean().item()


@pytest.mark.parametrize("lam", [0.7, 3.0, -0.5, float("inf")])
def test_kl_dro_gradient_closed_form(lam):
    losses = torch.randn(7, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, dtype=torch.float64) + 0.1).requires_grad_(True)
    robalign.kl_dro(losses, w, lam=lam).backward()
    a = (w * losses).detach() / lam if math.isfinite(lam) else torch.zeros(7, dtype=torch.float64)
    soft = torch.softmax(a, 0)
    torch.testing.assert_close(losses.grad, w.detach() * soft, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.grad, losses.detach() * soft, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lam", [0.7, -1.3, float("inf")])
def test_kl_dro_gradcheck_and_matches_reference(lam):
    losses = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, w: robalign.kl_dro(l, w, lam=lam), (losses, w))
    assert torch.autograd.gradcheck(lambda l, w: ground_truth.kl_dro(l, w, lam=lam), (losses, w))
    torch.testing.assert_close(robalign.kl_dro(losses, w, lam=lam), ground_truth.kl_dro(losses, w, lam=lam))


def test_kl_dro_is_stable_for_large_losses():
    losses = torch.tensor([1000.0, 1001.0])
    out = robalign.kl_dro(losses, lam=0.5)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(1001.0 + 0.5 * math.log((math.exp(-2) + 1) / 2), rel=1e-6)


def test_dro_stats():
    losses = torch.zeros(5, dtype=torch.float64)
    _, stats = robalign.kl_dro_with_stats(losses, lam=1.0)
    assert stats.ess.item() == pytest.approx(5.0) and stats.max_share.item() == pytest.approx(0.2) and stats.num_samples.item() == 5
    _, stats = robalign.kl_dro_with_stats(torch.tensor([0.0, 50.0], dtype=torch.float64), lam=1.0)
    assert stats.ess.item() == pytest.approx(1.0, abs=1e-6) and stats.max_share.item() == pytest.approx(1.0)
