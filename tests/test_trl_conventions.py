"""Conventions that differ between robalign and TRL, each with the mapping tested: IPO and DPO on
length-normalised log-ratios (TRL 1.16's `ipo` and `sigmoid_norm`, transcribed below from
trl/trainer/dpo_trainer.py, `DPOTrainer._compute_loss`), and the row order of a batch of pairs."""

import pytest
import torch
import torch.nn.functional as F

import robalign
from robalign import objectives

D = torch.float64


def batch(b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logps = torch.randn(b, 2, generator=gen, dtype=D) * 5 - 20
    ref = torch.randn(b, 2, generator=gen, dtype=D) * 5 - 20
    counts = torch.randint(1, 40, (b, 2), generator=gen)
    return logps, ref, counts


def trl_scores(logps, ref, counts):
    """TRL's chosen/rejected log-ratio scores (reverse KL, its default f-divergence), averaged by
    the completion length as its `ipo` and `sigmoid_norm` branches do."""
    chosen_scores, rejected_scores = logps[:, 0] - ref[:, 0], logps[:, 1] - ref[:, 1]
    chosen_avg = chosen_scores / counts[:, 0].to(D).clamp(min=1.0)
    rejected_avg = rejected_scores / counts[:, 1].to(D).clamp(min=1.0)
    return chosen_avg - rejected_avg


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_ipo_norm_is_trls_ipo(beta):
    logps, ref, counts = batch()
    want = (trl_scores(logps, ref, counts) - 1 / (2 * beta)) ** 2                    # TRL 1.16, loss_type="ipo"
    torch.testing.assert_close(objectives.ipo_norm(logps, ref, counts=counts, beta=beta), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_dpo_norm_is_trls_sigmoid_norm(beta):
    logps, ref, counts = batch(seed=1)
    want = -F.logsigmoid(beta * trl_scores(logps, ref, counts))                        # loss_type="sigmoid_norm"
    torch.testing.assert_close(objectives.dpo_norm(logps, ref, counts=counts, beta=beta), want, rtol=1e-12, atol=0)


def test_the_token_summed_forms_differ_by_length_and_agree_at_length_one():
    logps, ref, counts = batch(seed=2)
    ones = torch.ones_like(counts)
    torch.testing.assert_close(objectives.ipo_norm(logps, ref, counts=ones), objectives.ipo(logps, ref))
    torch.testing.assert_close(objectives.dpo_norm(logps, ref, counts=ones), objectives.dpo(logps, ref))
    assert not torch.allclose(objectives.ipo_norm(logps, ref, counts=counts), objectives.ipo(logps, ref))


def test_row_order_helpers():
    chosen_first = torch.arange(12).reshape(6, 2)               # rows c1 c2 c3 r1 r2 r3
    group_major = robalign.pairs_to_group_major(chosen_first)
    assert group_major[:, 0].tolist() == [0, 6, 2, 8, 4, 10]    # c1 r1 c2 r2 c3 r3
    assert torch.equal(robalign.pairs_to_chosen_first(group_major), chosen_first)
    with pytest.raises(ValueError, match=r"`x` must have an even number of rows"):
        robalign.pairs_to_group_major(torch.zeros(3, 2))


def test_dora_loss_on_trl_ordered_rows():
    """A batch laid out as TRL does gives the same DoRA loss once converted."""
    logps, ref, counts = batch(seed=3)
    trl_rows = lambda t: torch.cat([t[:, 0], t[:, 1]])                                 # noqa: E731
    loss_fn = robalign.DoRALoss("dpo_norm", beta=0.1, lam=0.5)
    want = loss_fn.from_logps(logps.reshape(-1), counts.reshape(-1), ref_logps=ref.reshape(-1)).loss
    got = loss_fn.from_logps(robalign.pairs_to_group_major(trl_rows(logps)), robalign.pairs_to_group_major(trl_rows(counts)),
                             ref_logps=robalign.pairs_to_group_major(trl_rows(ref))).loss
    torch.testing.assert_close(got, want)
