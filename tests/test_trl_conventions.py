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


# -- TRL's own loss code -----------------------------------------------------------------------

class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


class _Outputs:
    """What TRL's fused LM head returns, for given per-token log-probs (the rest only feeds metrics;
    ``log_sum_sq_probs`` only WPO's weights)."""

    def __init__(self, per_token_logps, log_sum_sq_probs=None):
        self.log_probs = per_token_logps
        self.log_sum_sq_probs = log_sum_sq_probs
        zeros = torch.zeros_like(per_token_logps.detach())
        self.entropy, self.mean_logits, self.is_top1 = zeros, zeros, zeros.bool()


def trl_compute_loss(loss_type, per_token_logps, completion_mask, ref_logps, *, beta, label_smoothing=0.0,
                     loss_weights=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
                     log_sum_sq_probs=None):
    """TRL 1.16's ``DPOTrainer._compute_loss`` itself, run on a stand-in trainer whose model returns
    ``per_token_logps`` ([2B, T − 1], chosen rows first) and with precomputed reference log-probs;
    ``loss_type`` a name or TRL's list of names (with ``loss_weights``)."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=label_smoothing, use_weighting=log_sum_sq_probs is not None, args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    b = per_token_logps.shape[0] // 2
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_logps[:b], "ref_rejected_logps": ref_logps[b:]}
    model = lambda **kwargs: _Outputs(per_token_logps, log_sum_sq_probs)   # noqa: E731
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


TRL_PAIRS = [("sigmoid", "dpo", {}), ("hinge", "hinge", {}), ("ipo", "ipo_norm", {}),
             ("robust", "robust", {"label_smoothing": 0.2}), ("sigmoid_norm", "dpo_norm", {}),
             ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", "nca_pair", {}),
             ("bco_pair", "bco_pair", {}), ("sppo_hard", "sppo_hard", {}), ("apo_zero", "apo_zero", {}),
             ("apo_down", "apo_down", {}), ("discopop", "discopop", {})]        # τ: 0.05 in both


def _both(trl_type, name, extra, beta, *, loss_weights=None, weights=None, chosen_length=None, trl_extra=None,
          dtype=D):
    """``((TRL loss, its gradient), (robalign loss, its gradient))`` on one random batch of pairs
    (``weights``: a function of the chosen rows' token counts giving robalign's sample weights;
    ``chosen_length``: every chosen completion that long). robalign's sequence log-probs sum the
    completion's tokens (what its ops score); TRL's sum every position of the row, except in
    ``sft``, which selects the completion's."""
    gen = torch.Generator().manual_seed(3)
    b, t = 5, 9
    completion = torch.zeros(2 * b, t + 1, dtype=torch.long)
    for row in range(2 * b):                                   # a prompt of 2–4 tokens, a completion after it
        start = int(torch.randint(2, 5, (1,), generator=gen))
        end = int(torch.randint(start + 1, t + 2, (1,), generator=gen))
        if chosen_length is not None and row < b:
            end = start + chosen_length
        completion[row, start:end] = 1
    mask = completion[:, 1:]                                  # TRL's shifted completion mask
    token_logps = (-torch.rand(2 * b, t, generator=gen, dtype=D) * 4 * mask).to(dtype).requires_grad_(True)
    ref = (token_logps.detach().double().sum(1) + torch.randn(2 * b, generator=gen, dtype=D)).to(dtype)
    trl_loss = trl_compute_loss(trl_type, token_logps, completion, ref, beta=beta, loss_weights=loss_weights, **extra,
                                **(trl_extra or {}))
    (trl_grad,) = torch.autograd.grad(trl_loss, token_logps)

    mine = token_logps.detach().clone().requires_grad_(True)
    selects = "sft" in ([trl_type] if isinstance(trl_type, str) else trl_type)
    logps = robalign.pairs_to_group_major((mine * mask).sum(1) if selects else mine.sum(1))
    counts = robalign.pairs_to_group_major(mask.sum(1))
    sample_weights = None if weights is None else weights(mask[:b].sum(1).to(dtype))
    out = robalign.DoRALoss(name, beta=beta, lam=float("inf"), **extra).from_logps(
        logps, counts, ref_logps=robalign.pairs_to_group_major(ref), weights=sample_weights)
    (my_grad,) = torch.autograd.grad(out.loss, mine)
    if selects:                           # off the completion neither side's log-probs are a token's
        trl_grad, my_grad = trl_grad * mask, my_grad * mask
    return (trl_loss, trl_grad), (out.loss, my_grad)


@pytest.mark.parametrize("trl_type,name,extra", TRL_PAIRS, ids=[p[0] for p in TRL_PAIRS])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_gradients_equal_trls_own_code(trl_type, name, extra, beta):
    """For every loss type both libraries have, TRL 1.16's ``DPOTrainer._compute_loss`` and
    ``DoRALoss`` (no weights, λ = ∞: the mean) give the same loss and the same gradient with respect
    to the per-token log-probs, in float64, on TRL's chosen-rows-first batch converted to
    robalign's group-major order."""
    pytest.importorskip("trl")
    (trl_loss, trl_grad), (my_loss, my_grad) = _both(trl_type, name, extra, beta)
    # TRL's exo_pair makes ε a float32 tensor (torch.tensor(label_smoothing)), so its log ε and
    # log(1 − ε) carry float32 rounding (~1e-7 relative); everything else is float64 in both
    tol = dict(rtol=1e-7, atol=1e-9) if trl_type == "exo_pair" else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_loss, trl_loss, **tol)
    torch.testing.assert_close(my_grad, trl_grad, **tol)


def test_trls_ipo_is_not_robaligns_token_summed_ipo():
    pytest.importorskip("trl")
    (trl_loss, trl_grad), (my_loss, my_grad) = _both("ipo", "ipo", {}, 0.1)
    assert abs(my_loss - trl_loss) > 1e-2 * trl_loss and not torch.allclose(my_grad, trl_grad, rtol=1e-2)


# -- the supervised term and weighted sums of objectives ----------------------------------------

def test_sft_is_trls_sft_under_the_documented_weights():
    """TRL's ``sft`` is the batch's token mean of the chosen NLL; robalign's ``sft`` is per sample
    (−logp_c/|y_c|), so the same number is its weighted mean with weights |y_i|·B/Σ|y_j|."""
    pytest.importorskip("trl")
    (trl_loss, trl_grad), (my_loss, my_grad) = _both("sft", "sft", {}, 0.1, weights=lambda n: n * n.numel() / n.sum())
    torch.testing.assert_close(my_loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_grad, trl_grad, rtol=1e-12, atol=1e-14)
    (trl_loss, _), (unweighted, _) = _both("sft", "sft", {}, 0.1)                  # unequal lengths: they differ
    assert abs(float(unweighted - trl_loss)) > 1e-3


MIXTURES = [(["sigmoid", "hinge", "bco_pair"], [0.7, 0.2, 1.3], "0.7*dpo+0.2*hinge+1.3*bco_pair", None),
            (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "0.8*dpo+0.2*bco_pair+sft", 4),       # MPO
            (["ipo", "sigmoid_norm"], [1.0, 0.5], "ipo_norm+0.5*dpo_norm", None)]


@pytest.mark.parametrize("types,coefs,name,chosen_length", MIXTURES, ids=[m[2] for m in MIXTURES])
def test_mixtures_equal_trls_weighted_loss_lists(types, coefs, name, chosen_length):
    """TRL's ``loss_type=[...]`` with ``loss_weights`` and robalign's mixture of the same terms (with
    ``sft`` the chosen completions share one length, where both conventions agree)."""
    pytest.importorskip("trl")
    (trl_loss, trl_grad), (my_loss, my_grad) = _both(types, name, {}, 0.3, loss_weights=coefs,
                                                     chosen_length=chosen_length)
    torch.testing.assert_close(my_loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_grad, trl_grad, rtol=1e-12, atol=1e-14)


DIVERGENCES = [("forward_kl", {}), ("js_divergence", {}), ("alpha_divergence", {"f_alpha_divergence_coef": 0.3}),
               ("alpha_divergence", {"f_alpha_divergence_coef": 1.7})]
F_TYPES = [("sigmoid", "dpo", {}), ("hinge", "hinge", {}), ("ipo", "ipo_norm", {}), ("sigmoid_norm", "dpo_norm", {}),
           ("robust", "robust", {"label_smoothing": 0.2}), ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}),
           ("discopop", "discopop", {})]


@pytest.mark.parametrize("divergence,coef", DIVERGENCES, ids=["fkl", "js", "alpha0.3", "alpha1.7"])
@pytest.mark.parametrize("trl_type,name,extra", F_TYPES, ids=[t[0] for t in F_TYPES])
def test_f_divergences_equal_trls(trl_type, name, extra, divergence, coef):
    """TRL's ``f_divergence_type`` (f'(e^r) in place of each log-ratio r) and robalign's
    ``with_divergence``, for every loss type TRL allows it on. TRL's α-divergence has no float64
    (its clamp table lists float16, bfloat16 and float32: a KeyError), so it is compared in float32
    (both sides float32: 1e-5); the others in float64 (1e-12; exo_pair 1e-7 as above)."""
    pytest.importorskip("trl")
    alpha = coef.get("f_alpha_divergence_coef", 0.5)
    variant = objectives.with_divergence(name, divergence, alpha)
    dtype = torch.float32 if divergence == "alpha_divergence" else D
    (trl_loss, trl_grad), (my_loss, my_grad) = _both(trl_type, variant, extra, 0.3, dtype=dtype,
                                                     trl_extra=dict(f_divergence_type=divergence, **coef))
    if dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-6)
    else:
        tol = dict(rtol=1e-7, atol=1e-9) if trl_type == "exo_pair" else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_loss, trl_loss, **tol)
    torch.testing.assert_close(my_grad, trl_grad, **tol)
    if divergence != "alpha_divergence" or abs(alpha - 1) > 1e-6:                   # it is not the plain objective
        (_, _), (plain, _) = _both(trl_type, name, extra, 0.3, dtype=dtype)
        assert abs(float(plain - my_loss)) > 1e-4


# -- TRL's CPOTrainer (trl.experimental.cpo): CPO, SimPO with label smoothing, AlphaPO -------------

def trl_cpo_loss(loss_type, chosen, rejected, *, beta, label_smoothing=0.0, alpha=0.0, gamma=0.5):
    """TRL 1.16's ``CPOTrainer.cpo_loss`` itself on a stand-in trainer (per-sample losses)."""
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(alpha=alpha, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                              simpo_gamma=gamma, accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]


CPO_CASES = [("sigmoid", "cpo", dict(beta=0.3)), ("sigmoid", "cpo", dict(beta=0.3, label_smoothing=0.2)),
             ("sigmoid", "cpo", dict(beta=0.3, alpha=0.25)),
             ("simpo", "simpo", dict(beta=2.0, gamma=0.5)), ("simpo", "simpo", dict(beta=2.0, gamma=0.5, label_smoothing=0.1)),
             ("simpo", "simpo", dict(beta=2.5, gamma=0.3, alpha=0.25)), ("simpo", "simpo", dict(beta=2.5, gamma=0.3, alpha=-0.5))]


@pytest.mark.parametrize("trl_type,name,hp", CPO_CASES, ids=[f"{c[1]}-{'-'.join(map(str, c[2].values()))}" for c in CPO_CASES])
def test_cpo_simpo_and_alphapo_equal_trls_cpo_trainer(trl_type, name, hp):
    """Per-sample losses and their gradients with respect to the sequence log-probs, float64; TRL
    feeds SimPO the token-mean log-probs (``average_log_prob``), robalign the sums and counts."""
    pytest.importorskip("trl")
    logps, _, counts = batch(b=7, seed=5)
    logps = (logps / 4).requires_grad_(True)                         # AlphaPO's p^(−α) stays moderate
    per_token = name == "simpo"
    mean = logps / counts.to(D) if per_token else logps
    want = trl_cpo_loss(trl_type, mean[:, 0], mean[:, 1], **hp)
    got = objectives.get(name)(logps, counts=counts, **hp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), logps)[0], torch.autograd.grad(want.sum(), logps)[0],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_equals_trls_odds_ratio_loss(beta):
    """ORPO's odds-ratio term against TRL 1.16's own ``ORPOTrainer.odds_ratio_loss`` (which works
    in float32: ``.float()`` first), on token-mean log-probs; both sides float32 (1e-6)."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logps, _, counts = batch(b=7, seed=6)
    logps = logps.float().requires_grad_(True)
    mean = logps / counts.float()
    stand_in = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    want = -ORPOTrainer.odds_ratio_loss(stand_in, mean[:, 0], mean[:, 1])[0]            # TRL subtracts its mean
    got = objectives.orpo(logps, counts=counts, beta=beta)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), logps)[0], torch.autograd.grad(want.sum(), logps)[0],
                               rtol=1e-6, atol=1e-7)


def _logits_batch(seed, b, t, v):
    """A TRL batch of pairs from random float64 logits: ``(completion_mask [2B, T+1], logits
    [2B, T, V] (a leaf), shifted labels [2B, T], per-token log-probs (0 off the completion),
    reference log-probs [2B])``, chosen rows first."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * b, t + 1, dtype=torch.long)
    for row in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=gen))
        completion[row, start:start + int(torch.randint(1, t - 2, (1,), generator=gen))] = 1
    ids = torch.randint(v, (2 * b, t + 1), generator=gen)
    logits = torch.randn(2 * b, t, v, generator=gen, dtype=D, requires_grad=True)
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)               # TRL's shifted completion
    per_token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = torch.randn(2 * b, generator=gen, dtype=D) - 15
    return completion, logits, labels, per_token * (labels != -100), ref


def _assert_doraloss_equals(trl_loss, logits, labels, ref, name, **options):
    """DoRALoss (λ = ∞, reference backend) on the same logits in group-major order gives TRL's loss
    and its gradient with respect to the logits (float64, 1e-12); returns robalign's output."""
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    mine = logits.detach().clone().requires_grad_(True)
    gm = robalign.pairs_to_group_major
    out = robalign.DoRALoss(name, lam=float("inf"), backend="reference", **options)(
        logits=gm(mine), labels=gm(labels), ref_logps=gm(ref))
    (my_grad,) = torch.autograd.grad(out.loss, mine)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_grad, trl_grad, rtol=1e-12, atol=1e-14)
    return out


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("trl_type,name", [("sigmoid", "dpo"), ("ipo", "ipo_norm")])
def test_ld_dpo_equals_trls_ld_alpha(trl_type, name, ld_alpha):
    """LD-DPO (``DoRALoss(ld_alpha=α)``, on logits, two fused passes) against TRL 1.16's own
    ``_compute_loss`` with ``ld_alpha`` on the same per-token log-probs (float64, 1e-12): loss and
    gradient with respect to the logits. The reference log-probs are given precomputed, as TRL
    takes them then (unsplit)."""
    pytest.importorskip("trl")
    completion, logits, labels, per_token, ref = _logits_batch(seed=9, b=4, t=8, v=11)
    trl_loss = trl_compute_loss(trl_type, per_token, completion, ref, beta=0.2, ld_alpha=ld_alpha)
    _assert_doraloss_equals(trl_loss, logits, labels, ref, name, beta=0.2, ld_alpha=ld_alpha)


@pytest.mark.parametrize("trl_type,name", [("sigmoid", "dpo"), ("ipo", "ipo_norm")])
def test_wpo_weights_equal_trls_use_weighting(trl_type, name):
    """WPO (``DoRALoss(wpo=True)``: ω from the logits, without gradient, multiplied into the sample
    weights) against TRL 1.16's own ``use_weighting`` on the same logits (float64, 1e-12). (TRL's
    ``hinge`` with ``use_weighting`` fails in its backward: it scales the ReLU's output in place.)"""
    pytest.importorskip("trl")
    completion, logits, labels, per_token, ref = _logits_batch(seed=12, b=4, t=7, v=9)
    logp = torch.log_softmax(logits, -1)
    trl_loss = trl_compute_loss(trl_type, per_token, completion, ref, beta=0.3,
                                log_sum_sq_probs=torch.logsumexp(2 * logp, -1))
    out = _assert_doraloss_equals(trl_loss, logits, labels, ref, name, beta=0.3, wpo=True)
    assert float(out.weights.max()) < 1                                   # ω < 1: a real reweighting


@pytest.mark.parametrize("trl_type", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_equals_trls_sorted_losses(trl_type, beta, label_smoothing):
    """AOT sorts across the batch: TRL's ``aot``/``aot_unpaired`` (its ``_compute_loss``) equal
    robalign's objectives of the same names — their mean over the sorted positions and its gradient
    with respect to every token's log-prob — to 1e-12 in float64."""
    pytest.importorskip("trl")
    extra = {"label_smoothing": label_smoothing} if label_smoothing else {}
    (trl_loss, trl_grad), (my_loss, my_grad) = _both(trl_type, trl_type, extra, beta)
    torch.testing.assert_close(my_loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_grad, trl_grad, rtol=1e-12, atol=1e-14)


def test_aot_couples_the_batch_and_refuses_per_sample_weights():
    """AOT's losses belong to the sorted positions: a sample's loss depends on the others (moving one
    sample's log-prob changes another position's loss), so DoRALoss refuses weights and groups, and
    never takes the one-pass chunks (which split the batch)."""
    logps, ref, _ = batch(b=5)
    base = objectives.aot(logps, ref)
    moved = logps.clone()
    moved[0, 0] -= 60.0                                               # sample 0: from the largest gap to the least
    assert (objectives.aot(moved, ref) - base).abs().gt(1e-9).sum() > 1
    loss_fn = robalign.DoRALoss("aot", lam=1.0)
    assert not loss_fn.takes_one_pass
    flat = robalign.pairs_to_group_major(torch.cat([logps[:, 0], logps[:, 1]]))
    with pytest.raises(ValueError, match="per-sample `probs`/`weights` do not apply"):
        loss_fn.from_logps(flat, torch.ones(10, dtype=torch.long), ref_logps=flat, weights=torch.ones(5))
    with pytest.raises(ValueError, match="`wpo` weighs samples"):
        robalign.DoRALoss("aot_unpaired", wpo=True)
    with pytest.raises(ValueError, match="belong to no sample's group"):
        robalign.DoRALoss("aot", reduction=robalign.GroupDRO(2)).from_logps(
            flat, torch.ones(10, dtype=torch.long), ref_logps=flat, group_ids=torch.zeros(5, dtype=torch.long))
