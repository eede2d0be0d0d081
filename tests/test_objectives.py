"""Objectives against hand-computed values and each other."""

import math

import pytest
import torch

import robalign
from robalign import objectives

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def softplus(x):
    return math.log1p(math.exp(x))


PAIR = dict(logps=t([-1.0, -2.0]), ref_logps=t([-1.5, -1.5]))       # Δ = 1


def test_dpo_and_cdpo():
    assert objectives.dpo(**PAIR, beta=1.0).item() == pytest.approx(softplus(-1))
    got = objectives.dpo(**PAIR, beta=1.0, label_smoothing=0.1).item()
    assert got == pytest.approx(0.9 * softplus(-1) + 0.1 * softplus(1))


def test_robust_dpo():
    got = objectives.robust(**PAIR, beta=1.0, label_smoothing=0.1).item()
    assert got == pytest.approx((0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8)
    assert objectives.robust(**PAIR, beta=1.0).item() == pytest.approx(softplus(-1))


def test_ipo_and_hinge():
    assert objectives.ipo(**PAIR, beta=0.25).item() == pytest.approx((1 - 2) ** 2)
    assert objectives.hinge(**PAIR, beta=0.5).item() == pytest.approx(0.5)
    assert objectives.hinge(**PAIR, beta=2.0).item() == 0.0


def test_simpo_is_length_normalised_and_reference_free():
    got = objectives.simpo(t([-2.0, -8.0]), counts=torch.tensor([[2, 4]]), beta=2.0, gamma=0.5)
    assert got.item() == pytest.approx(softplus(-1.5))


def test_plackett_luce_hand_computed():
    r = [1.0, 0.0, -1.0]
    got = objectives.plackett_luce(t(r), t([0.0, 0.0, 0.0]), beta=1.0).item()
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))
    assert got == pytest.approx(-((1 - lse(r)) + (0 - lse(r[1:]))))


def test_plackett_luce_k2_equals_dpo():
    logps, ref = torch.randn(16, 2, dtype=D), torch.randn(16, 2, dtype=D)
    torch.testing.assert_close(objectives.plackett_luce(logps, ref, beta=0.3), objectives.dpo(logps, ref, beta=0.3))


@pytest.mark.parametrize("name", ["plackett_luce", "rrhf", "lire", "dpo", "simpo"])
def test_scores_make_candidate_order_irrelevant(name):
    k = 2 if objectives.is_pairwise(name) else 4
    logps, ref = torch.randn(5, k, dtype=D), torch.randn(5, k, dtype=D)
    counts, scores = torch.randint(1, 9, (5, k)), torch.randn(5, k, dtype=D)
    perm = torch.randperm(k)
    fn = objectives.get(name)
    kw = dict(ref_logps=ref) if objectives.needs_reference(name) else {}
    a = fn(logps, counts=counts, scores=scores, **kw)
    kw = dict(ref_logps=ref[:, perm]) if objectives.needs_reference(name) else {}
    b = fn(logps[:, perm], counts=counts[:, perm], scores=scores[:, perm], **kw)
    torch.testing.assert_close(a, b)


def test_rrhf_hand_computed():
    counts, scores = torch.ones(1, 3, dtype=torch.long), t([3.0, 1.0, 2.0])
    assert objectives.rrhf(t([-1.0, -3.0, -2.0]), counts=counts, scores=scores).item() == pytest.approx(1.0)
    # ranking violations: p1 > p0 (2), p1 > p2 (1), p2 > p0 (1); best (index 0) NLL 3
    assert objectives.rrhf(t([-3.0, -1.0, -2.0]), counts=counts, scores=scores).item() == pytest.approx(7.0)
    # length normalisation
    got = objectives.rrhf(t([-4.0, -3.0]), counts=torch.tensor([[4, 1]]), scores=t([1.0, 0.0]))
    assert got.item() == pytest.approx(1.0)


def test_lire_hand_computed():
    assert objectives.lire(t([0.0, 0.0]), scores=t([0.0, 0.0])).item() == pytest.approx(-0.5)
    got = objectives.lire(t([-2.0, -4.0]), scores=t([1.0, 0.0]), temperature=2.0).item()
    p = [math.exp(-1) / (math.exp(-1) + math.exp(-2))]
    q = [math.e / (math.e + 1)]
    assert got == pytest.approx(-(p[0] * q[0] + (1 - p[0]) * (1 - q[0])))


@pytest.mark.parametrize("name", objectives.NAMES)
def test_gradcheck(name):
    k = 1 if objectives.is_unpaired(name) else 2 if objectives.is_pairwise(name) else 3
    logps = (-torch.rand(4, k, dtype=D) * 5 - 0.1).requires_grad_(True)    # log-probabilities: negative
    ref = -torch.rand(4, k, dtype=D) * 5 - 0.1
    counts = torch.randint(1, 6, (4, k))
    scores = torch.randn(4, k, dtype=D) if k > 1 else torch.tensor([[1.0], [0.0], [0.0], [1.0]], dtype=D)
    fn = objectives.get(name)
    kw = dict(ref_logps=ref) if objectives.needs_reference(name) else {}
    if objectives.needs_kl_reference(name):
        kw["kl"] = torch.tensor(0.7, dtype=D)
    assert torch.autograd.gradcheck(lambda x: fn(x, counts=counts, scores=scores, **kw), (logps,))


def test_registry_flags():
    assert objectives.needs_reference("dpo") and not objectives.needs_reference("simpo")
    assert objectives.is_pairwise("ipo") and not objectives.is_pairwise("lire")
    assert objectives.is_unpaired("kto") and objectives.needs_kl_reference("kto")
    assert objectives.is_unpaired("apo_zero_unpaired") and not objectives.needs_kl_reference("apo_zero_unpaired")
    with pytest.raises(ValueError, match="unknown objective 'kto_pair'"):
        objectives.get("kto_pair")


def test_a_registered_objective_is_usable_everywhere_at_once():
    """Adding an objective is one decorated function: the public wrapper (with its range
    checks), DoRALoss and the settings check all read the one registry."""
    from robalign.ground_truth.objectives import OBJECTIVES, Param, objective

    @objective(reference=True, pairwise=True, beta=Param(0.5, low=0, low_open=True))
    def sigmoid_margin_test(logps, ref_logps, *, counts=None, scores=None, beta=0.5):
        """ℓ = −log σ(β·Δ)·2 (a test objective)."""
        ratios = logps - ref_logps
        return -2 * torch.nn.functional.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))

    try:
        x, ref = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        torch.testing.assert_close(objectives.get("sigmoid_margin_test")(x, ref), 2 * objectives.dpo(x, ref, beta=0.5))
        with pytest.raises(ValueError, match=r"`beta` must lie in \(0, inf\)"):
            objectives.sigmoid_margin_test(x, ref, beta=-1.0)
        loss = robalign.DoRALoss("sigmoid_margin_test", beta=0.5, lam=float("inf"))
        out = loss.from_logps(x.reshape(-1), torch.ones(6, dtype=torch.long), ref_logps=ref.reshape(-1))
        torch.testing.assert_close(out.loss, 2 * objectives.dpo(x, ref, beta=0.5).mean())
        with pytest.raises(TypeError, match=r"default"):
            objective(reference=False, pairwise=True, beta=Param(1.0))(lambda logps, ref_logps=None, *, beta=2.0: logps)
    finally:
        OBJECTIVES.pop("sigmoid_margin_test", None)


def test_trl_pair_losses_hand_computed():
    """TRL's other pairwise loss types at Δ = 1 (chosen log-ratio 0.5, rejected −0.5); they are also
    checked against TRL's own code in test_trl_conventions.py."""
    sig = lambda x: 1 / (1 + math.exp(-x))                                   # noqa: E731
    assert objectives.nca_pair(**PAIR, beta=1.0).item() == pytest.approx(
        softplus(-0.5) + 0.5 * softplus(0.5) + 0.5 * softplus(-0.5))
    assert objectives.bco_pair(**PAIR, beta=1.0).item() == pytest.approx(2 * softplus(-0.5))
    assert objectives.sppo_hard(**PAIR, beta=0.5).item() == pytest.approx(0.5)
    assert objectives.apo_zero(**PAIR, beta=1.0).item() == pytest.approx(2 * sig(-0.5))
    assert objectives.apo_down(**PAIR, beta=1.0).item() == pytest.approx(sig(0.5) + 1 - sig(1.0))
    m = sig(1.0 / 0.05)
    assert objectives.discopop(**PAIR, beta=1.0).item() == pytest.approx((1 - m) * softplus(-1.0) + m * math.exp(-1.0))
    p, eps = sig(1.0), 0.1
    assert objectives.exo_pair(**PAIR, beta=1.0, label_smoothing=eps).item() == pytest.approx(
        p * (math.log(p) - math.log(1 - eps)) + (1 - p) * (math.log(1 - p) - math.log(eps)))
    with pytest.raises(ValueError, match="`label_smoothing`"):
        objectives.exo_pair(**PAIR, label_smoothing=0.0)                    # log ε needs ε > 0


def test_sft_is_the_best_candidates_token_mean_nll():
    got = objectives.sft(t([-6.0, -1.0, -9.0]), counts=torch.tensor([[3, 1, 2]]), scores=t([0.0, -1.0, 2.0]))
    assert got.item() == pytest.approx(4.5)                         # the best by score: −(−9)/2
    assert objectives.sft(t([-6.0, -1.0]), counts=torch.tensor([[3, 1]])).item() == pytest.approx(2.0)   # chosen


def test_mixtures_sum_their_terms_and_run_everywhere():
    """``mixture`` registers Σ c_k·ℓ_k once (by name, idempotent); DoRALoss, the one-pass loss and
    the settings take it by name or as {name: c}; terms that disagree on a shared hyper-parameter,
    unknown names and negative coefficients are clear errors."""
    from robalign.ground_truth.objectives import OBJECTIVES

    name = objectives.mixture({"dpo": 1.0, "sft": 0.5})
    assert name == "dpo+0.5*sft" and objectives.resolve("dpo + 0.5 * sft") == name
    assert objectives.needs_reference(name) and objectives.needs_counts(name) and objectives.is_pairwise(name)
    logps, ref = torch.randn(4, 2, dtype=D), torch.randn(4, 2, dtype=D)
    counts = torch.randint(1, 6, (4, 2))
    want = objectives.dpo(logps, ref, beta=0.3) + 0.5 * objectives.sft(logps, counts=counts)
    torch.testing.assert_close(objectives.get(name)(logps, ref, counts=counts, beta=0.3), want)
    # the one-pass fused loss and the recompute path agree on the mixture (C++ rows, float32 inputs;
    # the two paths sum the same float32 products in different orders: 1e-5)
    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(8, 5, 6, generator=gen), torch.randn(11, 6, generator=gen)
    labels = torch.randint(11, (8, 5), generator=gen)
    refs = torch.randn(8, generator=gen) - 12
    grads = []
    for one_pass in (True, False):
        h = hidden.clone().requires_grad_(True)
        out = robalign.DoRALoss({"dpo": 1.0, "sft": 0.5}, beta=0.3, lam=0.7, backend="cpp", one_pass=one_pass)(
            hidden=h, head_weight=head, labels=labels, ref_logps=refs)
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'label_smoothing' means different things"):
        objectives.mixture("exo_pair+dpo")
    with pytest.raises(ValueError, match="unknown objective 'kto_pair' in the mixture"):
        objectives.resolve("dpo+kto_pair")
    with pytest.raises(ValueError, match="'kto' reads unpaired data .* combines with no other objective"):
        objectives.resolve("dpo+kto")
    with pytest.raises(ValueError, match="cannot read the term '2\\*\\*sft'"):
        objectives.resolve("dpo+2**sft")
    with pytest.raises(ValueError, match="the coefficient of 'sft' must be a finite number >= 0"):
        objectives.mixture({"dpo": 1.0, "sft": -1.0})
    OBJECTIVES.pop(name, None)


@pytest.mark.parametrize("kind,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)])
def test_f_divergence_variants(kind, alpha):
    """``with_divergence`` replaces each log-ratio r by f'(e^r): at r = 0 every f' is 0 (the same
    loss as the plain objective there); the one-pass loss and the recompute path agree on it."""
    from robalign.ground_truth.objectives import OBJECTIVES

    name = objectives.with_divergence("dpo", kind, alpha)
    logps = torch.randn(4, 2, dtype=D)
    torch.testing.assert_close(objectives.get(name)(logps, logps.clone()), objectives.dpo(logps, logps.clone()))
    r = torch.tensor([[0.7, -0.4]], dtype=D)
    f = {"forward_kl": lambda x: 1 - math.exp(-x), "js_divergence": lambda x: math.log(2) - math.log1p(math.exp(-x)),
         "alpha_divergence": lambda x: (math.exp((alpha - 1) * x) - 1) / (alpha - 1)}[kind]
    want = softplus(-0.1 * (f(0.7) - f(-0.4)))
    assert objectives.get(name)(r, torch.zeros_like(r)).item() == pytest.approx(want, rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(8, 5, 6, generator=gen), torch.randn(11, 6, generator=gen)
    labels = torch.randint(11, (8, 5), generator=gen)
    # reference log-probs within about 1 nat of the policy's, as at the start of training: f'(e^r)
    # grows like e^|r| (forward KL: e^-r), so at |r| ~ 20 the loss is ~1e10 and any float32 path is
    # ~1e-5 off in relative terms (measured: one-pass 1.0e-5, recompute 5e-6, torch backend 1.4e-5
    # against float64), which would test float32's conditioning rather than the two paths
    policy = torch.log_softmax((hidden @ head.T).double(), -1).gather(-1, labels[..., None]).sum((-2, -1))
    refs = (policy + torch.randn(8, generator=gen, dtype=D)).float()
    results = []
    for one_pass in (True, False):
        h = hidden.clone().requires_grad_(True)
        out = robalign.DoRALoss(name, beta=0.3, lam=0.7, backend="cpp", one_pass=one_pass)(
            hidden=h, head_weight=head, labels=labels, ref_logps=refs)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="objective 'simpo' takes no f-divergence"):
        objectives.with_divergence("simpo", kind)
    with pytest.raises(ValueError, match="unknown f-divergence 'reverse_kl'"):
        objectives.with_divergence("dpo", "reverse_kl")
    OBJECTIVES.pop(name, None)


def test_orpo_hand_computed_and_an_unscored_response():
    p_c, p_r = math.exp(-0.5), math.exp(-2.0)                       # token-mean probabilities
    odds = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    got = objectives.orpo(t([-1.0, -6.0]), counts=torch.tensor([[2, 3]]), beta=0.5)
    assert got.item() == pytest.approx(-0.5 * math.log(odds / (1 + odds)), rel=1e-12)
    logps = t([-1.0, 0.0], [-2.0, -3.0]).requires_grad_(True)
    losses = objectives.orpo(logps, counts=torch.tensor([[2, 0], [1, 2]]))           # no scored token: p̄ = 1
    losses.sum().backward()
    assert losses[0].item() == 0.0 and torch.isfinite(logps.grad).all() and logps.grad[0].abs().sum() == 0


def test_ld_alpha_on_every_path():
    """LD-DPO's split: α = 1 is the plain loss; the C++ and Triton-interpreter backends, on logits
    and on hidden states with the head (float32), equal the float64 reference backend (1e-5: float32
    log-softmax sums of ≤ 6 tokens); a listwise group shares the length of its shortest response."""
    gen = torch.Generator().manual_seed(2)
    s, t, h, v = 6, 7, 5, 13
    hidden, head = torch.randn(s, t, h, generator=gen), torch.randn(v, h, generator=gen)
    labels = torch.randint(v, (s, t), generator=gen)
    labels[:, :2] = -100
    labels[torch.rand(s, t, generator=gen) < 0.2] = -100
    ref = torch.randn(s, generator=gen) - 15
    logits = hidden @ head.T

    def loss(backend, ld_alpha, k=2, objective="dpo", **inputs):
        fn = robalign.DoRALoss(objective, beta=0.3, lam=0.8, ld_alpha=ld_alpha, backend=backend, group_size=k)
        return fn(labels=labels, ref_logps=ref, **inputs).loss.double()

    plain = robalign.DoRALoss("dpo", beta=0.3, lam=0.8, backend="reference")(logits=logits.double(), labels=labels,
                                                                              ref_logps=ref).loss
    torch.testing.assert_close(loss("reference", 1.0, logits=logits.double()), plain)
    want = loss("reference", 0.4, logits=logits.double())
    assert abs(float(want - plain)) > 1e-4
    for backend in ("cpp", "triton"):
        torch.testing.assert_close(loss(backend, 0.4, logits=logits), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss(backend, 0.4, hidden=hidden, head_weight=head), want, rtol=1e-5, atol=1e-6)
    listwise = loss("reference", 0.4, k=3, objective="plackett_luce", logits=logits.double())
    assert torch.isfinite(listwise)
    with pytest.raises(ValueError, match="`ld_alpha` must lie in"):
        robalign.DoRALoss("dpo", ld_alpha=1.5)


def test_wpo_on_every_path():
    """WPO's ω from hidden states and the head (chunked, no [S, T, V] tensor) equals ω from the
    logits; DoRALoss(wpo=True) on the one-pass loss (C++ and the Triton interpreter, float32) equals
    the float64 reference logits path (1e-5); an unscored sequence has ω = 1."""
    from robalign.ops.wpo import wpo_weights

    gen = torch.Generator().manual_seed(3)
    s, t, h, v = 6, 7, 5, 13
    hidden, head, bias = torch.randn(s, t, h, generator=gen), torch.randn(v, h, generator=gen), torch.randn(v, generator=gen)
    labels = torch.randint(v, (s, t), generator=gen)
    labels[:, :2] = -100
    labels[3] = -100
    ref = torch.randn(s, generator=gen) - 15
    logits = hidden.double() @ head.double().T + bias.double()
    omega = wpo_weights(labels, logits=logits)
    torch.testing.assert_close(wpo_weights(labels, hidden=hidden.double(), head_weight=head.double(),
                                           head_bias=bias.double(), chunk_rows=5), omega, rtol=1e-12, atol=0)
    assert omega[3] == 1.0 and bool((omega[:3] < 1).all())
    want = robalign.DoRALoss("dpo", beta=0.3, lam=0.8, wpo=True, backend="reference")(
        logits=logits, labels=labels, ref_logps=ref.double()).loss
    plain = robalign.DoRALoss("dpo", beta=0.3, lam=0.8, backend="reference")(logits=logits, labels=labels,
                                                                              ref_logps=ref.double()).loss
    assert abs(float(want - plain)) > 1e-3
    for backend in ("cpp", "triton"):
        h_ = hidden.clone().requires_grad_(True)
        got = robalign.DoRALoss("dpo", beta=0.3, lam=0.8, wpo=True, backend=backend)(
            hidden=h_, head_weight=head, head_bias=bias, labels=labels, ref_logps=ref)
        assert got.policy_logps.grad_fn is None                                 # the one-pass loss ran
        torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass exactly one of `logits` or `hidden`"):
        wpo_weights(labels)
