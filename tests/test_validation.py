"""Every documented validation error is raised with a message naming the argument."""

import pytest
import torch

import robalign

D = torch.float64


def logits_labels(s=2, t=3, v=5):
    return torch.randn(s, t, v, dtype=D), torch.randint(v, (s, t))


@pytest.mark.parametrize("make,exc,match", [
    (lambda z, y: (z[0], y), ValueError, r"padded input needs `logits` \[S, T, V\]"),
    (lambda z, y: (z, y.float()), TypeError, r"`labels` must be an integer tensor"),
    (lambda z, y: (z.long(), y), TypeError, r"`logits` must be a floating tensor"),
    (lambda z, y: (z, torch.full_like(y, 5)), ValueError, r"`labels` must lie in \[0, 5\) or equal ignore_index=-100, found 5"),
    (lambda z, y: (z, torch.full_like(y, -1)), ValueError, r"found -1"),
    (lambda z, y: ("logits", y), TypeError, r"`logits` must be a torch.Tensor"),
])
def test_sequence_logps_errors(make, exc, match):
    z, y = make(*logits_labels())
    with pytest.raises(exc, match=match):
        robalign.sequence_logps(z, y)


def test_cu_seqlens_errors():
    z, y = torch.randn(6, 4, dtype=D), torch.randint(4, (6,))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must start at 0 and end at the number of tokens 6"):
        robalign.sequence_logps(z, y, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must be non-decreasing"):
        robalign.sequence_logps(z, y, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"`cu_seqlens` must be an integer tensor"):
        robalign.sequence_logps(z, y, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match=r"packed input \(with cu_seqlens\) needs `logits` \[N, V\]"):
        robalign.sequence_logps(z[None], y[None], cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))


def test_linear_sequence_logps_errors():
    h, w, y = torch.randn(2, 3, 4, dtype=D), torch.randn(5, 4, dtype=D), torch.randint(5, (2, 3))
    with pytest.raises(ValueError, match=r"`weight` must be \[V, H\] with H = hidden.shape\[-1\] = 4"):
        robalign.linear_sequence_logps(h, w[:, :3], y)
    with pytest.raises(ValueError, match=r"`bias` must be \[V\] with V = weight.shape\[0\] = 5"):
        robalign.linear_sequence_logps(h, w, y, bias=torch.zeros(4, dtype=D))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\)"):
        robalign.linear_sequence_logps(h, w, y + 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(probs=torch.tensor([0.5, 1.5]), alpha=0.5), r"`probs` must be finite probabilities in \[0, 1\]"),
    (dict(probs=torch.tensor([0.5, float("nan")]), alpha=0.5), r"`probs` must be finite probabilities"),
    (dict(probs=torch.tensor([0.5]), alpha=0.0), r"`alpha` must lie in \(0, 1\]"),
    (dict(probs=torch.tensor([0.5]), alpha=1.5), r"`alpha` must lie in \(0, 1\]"),
    (dict(probs=torch.tensor([0.5]), alpha=0.5, beta=-0.1), r"`beta` must lie in \[0, inf\)"),
    (dict(probs=torch.tensor([0.5]), alpha=0.5, class_ratio=0.0), r"`class_ratio` must lie in \(0, inf\)"),
])
def test_dora_weights_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        robalign.dora_weights(**kwargs)


def test_kl_dro_errors():
    losses = torch.randn(4)
    with pytest.raises(ValueError, match=r"`lam` must be non-zero"):
        robalign.kl_dro(losses, lam=0.0)
    with pytest.raises(ValueError, match=r"`lam` must be a real number"):
        robalign.kl_dro(losses, lam=float("nan"))
    with pytest.raises(ValueError, match=r"`weights` must have the shape of `losses` \(4,\)"):
        robalign.kl_dro(losses, torch.ones(3))
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative"):
        robalign.kl_dro(losses, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"`losses` must have 1 dimensions"):
        robalign.kl_dro(losses[None])
    with pytest.raises(RuntimeError, match=r"`group` was given but torch.distributed is not initialised"):
        robalign.kl_dro(losses, group=object())


def test_objective_errors():
    from robalign import objectives
    x = torch.randn(3, 2, dtype=D)
    with pytest.raises(ValueError, match=r"`ref_logps` is required"):
        objectives.dpo(x)
    with pytest.raises(ValueError, match=r"`logps` must be \[B, 2\] \(chosen, rejected\)"):
        objectives.dpo(torch.randn(3, 3, dtype=D), torch.randn(3, 3, dtype=D))
    with pytest.raises(ValueError, match=r"`counts` .* is required"):
        objectives.simpo(x)
    with pytest.raises(ValueError, match=r"`ref_logps` must have the shape of `logps` \(3, 2\)"):
        objectives.dpo(x, torch.randn(3, dtype=D))
    with pytest.raises(ValueError, match=r"`beta` must lie in \(0, inf\)"):
        objectives.dpo(x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"`label_smoothing` must lie in \[0, 0.5\)"):
        objectives.robust(x, x, label_smoothing=0.5)
    with pytest.raises(TypeError, match=r"unknown hyper-parameter `gamma`"):
        objectives.dpo(x, x, gamma=1.0)
    with pytest.raises(ValueError, match=r"`scores` must be finite"):
        objectives.lire(x, scores=torch.tensor([[0.0, float("nan")]] * 3, dtype=D))


def test_dora_loss_errors():
    z, y = logits_labels(s=4)
    ref = torch.randn(4, dtype=D)
    with pytest.raises(ValueError, match=r"`probs` needs a weighting with `alpha`"):
        robalign.DoRALoss()(logits=z, labels=y, ref_logps=ref, probs=torch.rand(4, dtype=D))
    with pytest.raises(ValueError, match=r"`group_size`=3 must divide the number of sequences, got 4"):
        robalign.DoRALoss("plackett_luce", group_size=3)(logits=z, labels=y, ref_logps=ref)
    with pytest.raises(ValueError, match=r"objective 'dpo' is pairwise: `group_size` must be 2"):
        robalign.DoRALoss("dpo", group_size=4)
    with pytest.raises(ValueError, match=r"`lam` must be non-zero"):
        robalign.DoRALoss(lam=0)
    with pytest.raises(ValueError, match=r"`alpha` must lie in \(0, 1\]"):
        robalign.DoRALoss(alpha=2.0)
    with pytest.raises(ValueError, match=r"pass exactly one of `logits` or `hidden`"):
        robalign.DoRALoss()(labels=y, ref_logps=ref)
    with pytest.raises(ValueError, match=r"`hidden` needs `head_weight`"):
        robalign.DoRALoss()(hidden=torch.randn(4, 3, 2, dtype=D), labels=y, ref_logps=ref)
    with pytest.raises(ValueError, match=r"pass exactly one of `ref_logits` or `ref_hidden`"):
        robalign.DoRALoss()(logits=z, labels=y)
    with pytest.raises(ValueError, match=r"`ref_logps` must be \[S\] = \[4\]"):
        robalign.DoRALoss()(logits=z, labels=y, ref_logps=ref[:2])
    with pytest.raises(ValueError, match=r"`probs` must be \[S\] = \[4\] or \[B, K\] = \[2, 2\]"):
        robalign.DoRALoss(alpha=0.5)(logits=z, labels=y, ref_logps=ref, probs=torch.rand(3, dtype=D))
    with pytest.raises(TypeError, match=r"objective 'lire' has no hyper-parameter \['gamma'\]"):
        robalign.DoRALoss("lire", group_size=4, gamma=1.0)
    with pytest.raises(ValueError, match=r"unknown objective 'nope'"):
        robalign.DoRALoss("nope")
