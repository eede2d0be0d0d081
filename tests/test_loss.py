"""DoRALoss against a hand-assembled composition of reference pieces."""

import pytest
import torch

import robalign
from robalign import ground_truth
from conftest import packed_from_padded, random_batch

D = torch.float64


def _compose(logits, ref_logits, labels, probs, k, alpha, lam, beta, objective):
    logps, counts = ground_truth.sequence_logps(logits, labels)
    ref_logps, _ = ground_truth.sequence_logps(ref_logits, labels)
    fn = getattr(ground_truth.objectives, objective)
    losses = fn(logps.reshape(-1, k), ref_logps.reshape(-1, k), counts=counts.reshape(-1, k), beta=beta)
    w = ground_truth.dora_weights(probs, alpha).reshape(-1, k).mean(-1)
    return ground_truth.kl_dro(losses, w, lam=lam), losses, w


@pytest.mark.parametrize("objective,k", [("dpo", 2), ("plackett_luce", 3)])
@pytest.mark.parametrize("lam", [1.0, -0.5, float("inf")])
def test_matches_reference_composition(objective, k, lam):
    logits, labels = random_batch(4 * k, 5, 7, all_ignored=(1,))
    ref_logits = torch.randn_like(logits)
    probs = torch.rand(4 * k, dtype=D)
    probs[0] = 0.0
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    loss_fn = robalign.DoRALoss(objective, beta=0.3, lam=lam, alpha=0.25, group_size=k)
    out = loss_fn(logits=z1, labels=labels, ref_logits=ref_logits, probs=probs)
    want, losses, w = _compose(z2, ref_logits, labels, probs, k, 0.25, lam, 0.3, objective)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.weights, w)
    (2.5 * out.loss).backward()
    (2.5 * want).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_fused_linear_input_and_precomputed_ref_logps():
    hidden = torch.randn(4, 6, 8, dtype=D, requires_grad=True)
    weight = torch.randn(11, 8, dtype=D, requires_grad=True)
    labels = torch.randint(11, (4, 6))
    ref_logps = torch.randn(4, dtype=D)
    out = robalign.DoRALoss("dpo")(hidden=hidden, head_weight=weight, labels=labels, ref_logps=ref_logps)
    logps, _ = ground_truth.linear_sequence_logps(hidden, weight, labels)
    losses = ground_truth.objectives.dpo(logps.reshape(2, 2), ref_logps.reshape(2, 2), beta=0.1)
    torch.testing.assert_close(out.loss, ground_truth.kl_dro(losses, lam=1.0))
    torch.testing.assert_close(out.weights, torch.ones(2, dtype=D))


def test_packed_input_equals_padded():
    logits, labels = random_batch(4, 6, 9)
    lengths = [6, 2, 4, 5]
    for s, n in enumerate(lengths):
        labels[s, n:] = -100
    z, y, cu = packed_from_padded(logits, labels, lengths)
    ref_logps = torch.randn(4, dtype=D)
    loss_fn = robalign.DoRALoss("ipo", beta=0.5)
    a = loss_fn(logits=logits, labels=labels, ref_logps=ref_logps)
    b = loss_fn(logits=z, labels=y, ref_logps=ref_logps, cu_seqlens=cu)
    torch.testing.assert_close(a.loss, b.loss)


def test_reference_free_objective_needs_no_ref_and_reports_rewards():
    logits, labels = random_batch(4, 5, 7)
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=D)            # rows 1 and 3 are best
    out = robalign.DoRALoss("simpo", beta=2.0)(logits=logits, labels=labels, scores=scores)
    assert out.logratios is None
    logps, counts = ground_truth.sequence_logps(logits, labels)
    avg = 2.0 * logps / counts
    torch.testing.assert_close(out.chosen_rewards, avg[[1, 3]])
    torch.testing.assert_close(out.rejected_rewards, avg[[0, 2]])
    torch.testing.assert_close(out.reward_margin, (avg[[1, 3]] - avg[[0, 2]]).mean())


def test_weights_per_sample_and_per_candidate():
    logits, labels = random_batch(4, 5, 7)
    ref_logps = torch.randn(4, dtype=D)
    loss_fn = robalign.DoRALoss("dpo", lam=2.0)
    per_candidate = torch.tensor([1.0, 3.0, 0.5, 0.5], dtype=D)
    a = loss_fn(logits=logits, labels=labels, ref_logps=ref_logps, weights=per_candidate)
    b = loss_fn(logits=logits, labels=labels, ref_logps=ref_logps, weights=torch.tensor([2.0, 0.5], dtype=D))
    torch.testing.assert_close(a.weights, torch.tensor([2.0, 0.5], dtype=D))
    torch.testing.assert_close(a.loss, b.loss)


def test_objective_kwargs_reach_the_objective():
    logits, labels = random_batch(2, 5, 7)
    ref_logps = torch.randn(2, dtype=D)
    a = robalign.DoRALoss("dpo", label_smoothing=0.2)(logits=logits, labels=labels, ref_logps=ref_logps)
    logps, _ = ground_truth.sequence_logps(logits, labels)
    want = ground_truth.objectives.dpo(logps.reshape(1, 2), ref_logps.reshape(1, 2), beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(a.losses, want)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logps = torch.randn(8, generator=gen, dtype=torch.float64)
    ref = torch.randn(8, generator=gen, dtype=torch.float64)
    return logps, torch.full((8,), 5), ref, torch.rand(4, generator=gen, dtype=torch.float64) + 0.1


def test_reduction_object_and_lam_shorthand_agree():
    logps, counts, ref, w = _batch()
    a = robalign.DoRALoss("dpo", lam=0.5).from_logps(logps, counts, ref_logps=ref, weights=w)
    b = robalign.DoRALoss("dpo", reduction=robalign.KLDRO(0.5)).from_logps(logps, counts, ref_logps=ref, weights=w)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert robalign.DoRALoss("dpo", reduction=robalign.KLDRO(0.5)).lam == 0.5
    with pytest.raises(ValueError, match=r"pass `lam` or `reduction`, not both"):
        robalign.DoRALoss("dpo", lam=0.5, reduction=robalign.KLDRO(0.5))


def test_per_sample_then_reduce_is_from_logps():
    logps, counts, ref, w = _batch(1)
    loss_fn = robalign.DoRALoss("dpo", lam=0.7)
    samples = loss_fn.per_sample(logps, counts, ref_logps=ref, weights=w)
    loss, _ = loss_fn.reduction.reduce(samples.losses, samples.weights)
    torch.testing.assert_close(loss, loss_fn.from_logps(logps, counts, ref_logps=ref, weights=w).loss)


def test_a_new_reduction_is_one_class():
    """An ambiguity set plugs in as one Reduction subclass: here the weighted worst sample."""
    from robalign.losses.dro import DROStats

    class WorstCase(robalign.Reduction):
        name = "worst"

        def reduce(self, losses, weights=None, *, group=None, ddp_average=True):
            x = losses if weights is None else weights * losses
            one = torch.ones(())
            return x.max(), DROStats(ess=one, max_share=one, num_samples=torch.tensor(x.numel()))

        def accumulator(self, params, **kwargs):
            raise NotImplementedError

    logps, counts, ref, w = _batch(2)
    out = robalign.DoRALoss("dpo", reduction=WorstCase()).from_logps(logps, counts, ref_logps=ref, weights=w)
    torch.testing.assert_close(out.loss, (out.losses * w).max())


def test_release_01_argument_names_are_gone():
    """``weight``/``bias``/``ref_weight``/``ref_bias`` and ``group`` warned through release 0.1 and
    are refused in 0.2 (``head_weight``, ... and ``process_group``)."""
    hidden, weight = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    labels, ref = torch.randint(5, (2, 3)), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['weight'\]"):
        robalign.DoRALoss("dpo")(hidden=hidden, weight=weight, labels=labels, ref_logps=ref)
    with pytest.raises(TypeError, match=r"objective 'dpo' has no hyper-parameter \['group'\]"):
        robalign.DoRALoss("dpo", group=None)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("objective", ["dpo", "ipo_norm", "plackett_luce"])
def test_reference_free_is_the_objective_at_a_zero_reference(objective, one_pass):
    """``reference_free=True``: the reference log-probs are 0 (r = logp), on the one-pass and the
    recompute path; the loss, gradient and rewards equal those with ``ref_logps`` = 0 exactly."""
    gen = torch.Generator().manual_seed(7)
    k = 3 if objective == "plackett_luce" else 2
    hidden = torch.randn(2 * k, 5, 8, generator=gen)
    head = torch.randn(31, 8, generator=gen)
    labels = torch.randint(31, (2 * k, 5), generator=gen)
    labels[:, 0] = -100
    outs = []
    for free in (True, False):
        h = hidden.clone().requires_grad_(True)
        loss_fn = robalign.DoRALoss(objective, lam=0.5, group_size=k, one_pass=one_pass, reference_free=free)
        out = loss_fn(hidden=h, head_weight=head, labels=labels, **({} if free else {"ref_logps": torch.zeros(2 * k)}))
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad, out.reward_margin))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_free_refusals():
    with pytest.raises(ValueError, match="takes no reference model already"):
        robalign.DoRALoss("simpo", reference_free=True)
    with pytest.raises(ValueError, match="compares with its reference point"):
        robalign.DoRALoss("kto", reference_free=True)
    with pytest.raises(ValueError, match="pass no reference"):
        robalign.DoRALoss("dpo", reference_free=True)(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long),
                                                      ref_logps=torch.zeros(2))
