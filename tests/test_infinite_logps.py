"""An infinite preference margin — a response the policy cannot produce (log-prob −∞, e.g. a
token masked by a −∞ head-bias entry, which the README supports) — in the sigmoid family (dpo,
robust, cpo, simpo), without label smoothing: the loss is its limit, 0 for that sample, and every
gradient is finite, on every path and kernel backend (NaN before: the smoothing term formed
0·∞). Smoothing ε > 0 keeps its limit +∞. The other objectives' infinite margins are not handled
yet (README, Reliability).
"""

import math

import pytest
import torch

import robalign
from test_linear_backends import BACKENDS


def test_the_issue_example():
    logps = torch.tensor([-5.0, -math.inf, -3.0, -4.0], requires_grad=True)
    out = robalign.DoRALoss("dpo", beta=0.1, lam=1.0).from_logps(logps, torch.tensor([3, 4, 3, 3]),
                                                               ref_logps=torch.tensor([-6.0, -7.0, -3.5, -3.5]))
    out.loss.backward()
    assert out.losses[0].item() == 0.0 and out.losses[1].item() == pytest.approx(0.6444, abs=1e-4)
    assert out.loss.item() == pytest.approx(0.3732, abs=1e-4) and bool(torch.isfinite(logps.grad).all())
    smoothed = robalign.DoRALoss("dpo", beta=0.1, lam=math.inf, label_smoothing=0.1).from_logps(
        logps.detach(), torch.tensor([3, 4, 3, 3]), ref_logps=torch.tensor([-6.0, -7.0, -3.5, -3.5]))
    assert smoothed.losses[0].item() == math.inf                 # −ε·log σ(−∞): the limit


@pytest.mark.parametrize("objective", ["dpo", "robust", "cpo", "simpo"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "recompute"])
def test_a_masked_token_in_a_rejected_response(objective, backend, one_pass):
    """The first pair's rejected response takes a token whose head bias is −∞: its log-prob is −∞,
    its margin +∞. Loss and hidden-state gradient as the float64 reference backend's (float32:
    1e-5 relative, as test_linear_backends)."""
    name, device = backend
    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(4, 5, 6, generator=gen), torch.randn(11, 6, generator=gen)
    bias = torch.zeros(11)
    bias[7] = -math.inf
    labels = torch.randint(7, (4, 5), generator=gen)
    labels[:, :2] = -100
    labels[1, 3] = 7
    refs = torch.randn(4, generator=gen) - 8
    results = []
    for kernel, dtype, where in (("reference", torch.float64, "cpu"), (name, torch.float32, device)):
        h = hidden.to(where, dtype).requires_grad_(True)
        extra = {} if objective in ("cpo", "simpo") else {"ref_logps": refs.to(where, dtype)}
        out = robalign.DoRALoss(objective, lam=1.0, backend=kernel, one_pass=one_pass)(
            hidden=h, head_weight=head.to(where, dtype), head_bias=bias.to(where, dtype), labels=labels.to(where),
            **extra)
        out.loss.backward()
        results.append((out.loss.detach().double().cpu(), h.grad.double().cpu()))
    (want_loss, want_grad), (loss, grad) = results
    assert math.isfinite(want_loss) and bool(torch.isfinite(want_grad).all())
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
