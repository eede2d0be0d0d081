"""Infinite log-probs — a response the policy (or the reference) cannot produce, log-prob −∞, e.g. a
token masked by a −∞ head-bias entry, which robalign supports — on every objective, path and
kernel backend.

The rule (docs/reliability.md): each objective's per-sample loss is its **limit** as the log-prob
goes to −∞, and its gradient the limit of the gradient. Where the limit is finite (the sigmoid
family, EXO, APO, NCA/BCO's bounded side, Plackett–Luce's worst candidate, ...) the loss trains on;
where it is +∞ (a chosen response the policy cannot produce under DPO, IPO's squares, ...) every
reduction refuses the batch with an error naming the samples — the objective is +∞ and has no
gradient. A log-prob of +∞, and a sequence with both log-probs −∞ (no log-ratio), are refused.

The oracle is independent of the limits written in robalign: the plain formula evaluated at finite
stand-ins −M for M = 1e6 and 1e7 (float64); where the two agree the limit is finite and must be
robalign's value and gradient, where they diverge robalign's loss must be +∞.
"""

import math

import pytest
import torch

import robalign
from robalign.losses.reductions import CVaR, Chi2Ball, GroupDRO, KLBall, KLDRO
from robalign.ground_truth.objectives import OBJECTIVES, mixture, with_divergence
from test_linear_backends import BACKENDS

inf = math.inf
# registered when a test runs, not at import: other test modules parametrize over the registry
VARIANTS = {"dpo:js_divergence": lambda: with_divergence("dpo", "js_divergence"),
            "hinge:forward_kl": lambda: with_divergence("hinge", "forward_kl"),
            "ipo:alpha_divergence=0.5": lambda: with_divergence("ipo", "alpha_divergence", 0.5),
            "dpo+0.5*sft": lambda: mixture("dpo+0.5*sft"), "dpo+0*ipo": lambda: mixture("dpo+0*ipo")}
NAMES = sorted(n for n in OBJECTIVES if "+" not in n and ":" not in n) + list(VARIANTS)


def _base(name):
    """The registered objective a variant's name starts with (``dpo:js_divergence`` → ``dpo``)."""
    return name.split(":")[0].split("+")[0]


def _problem(name, seed=0):
    if name in VARIANTS:
        assert VARIANTS[name]() == name
    entry = OBJECTIVES[name]
    k = 1 if entry.unpaired else 2 if entry.pairwise else 3
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, k, generator=gen, dtype=torch.float64) * 5 - 1
    ref = -torch.rand(4, k, generator=gen, dtype=torch.float64) * 5 - 1
    counts = torch.randint(2, 6, (4, k), generator=gen)
    kw = {"counts": counts}
    if entry.unpaired:
        kw["scores"] = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)
    if entry.kl_reference:
        kw["kl"] = 0.1
    return entry, k, logps, ref, kw


def _loss_and_grad(entry, logps, ref, kw):
    x = logps.clone().requires_grad_(True)
    loss = entry.fn(x, ref if entry.reference else None, **kw)
    grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _positions(name):
    entry = OBJECTIVES[_base(name)]
    k = 1 if entry.unpaired else 2 if entry.pairwise else 3
    return [("logps", j) for j in range(k)] + ([("ref", j) for j in range(k)] if entry.reference else [])


@pytest.mark.parametrize("name,side,j", [(n, side, j) for n in NAMES for side, j in _positions(n)])
def test_every_objective_takes_its_limit(name, side, j):
    """Sample 0's candidate j has log-prob (policy or reference) −∞; the other samples are untouched."""
    entry, k, logps, ref, kw = _problem(name)
    # stand-ins: 1e6 and 1e7, or 300 and 600 under an f-divergence, whose f′(e^r) overflows beyond e^709
    near, far = (-300.0, -600.0) if ":" in name else (-1e6, -1e7)
    at = {}
    for m in (-inf, near, far):
        lp, rf = logps.clone(), ref.clone()
        (lp if side == "logps" else rf)[0, j] = m
        at[m] = _loss_and_grad(entry, lp, rf, kw)
    (loss, grad), (loss6, grad6), (loss7, _) = at[-inf], at[near], at[far]
    finite = torch.isclose(loss6, loss7, rtol=1e-6, atol=1e-9) & torch.isfinite(loss7)   # elementwise: AOT's
    assert not torch.isnan(loss).any()                               # losses are per sorted position
    torch.testing.assert_close(loss[finite], loss7[finite], rtol=1e-9, atol=1e-9)
    assert bool((loss[~finite] == inf).all() and (loss6[~finite] < loss7[~finite]).all())
    if entry.batch_coupled and not finite.all():
        return                                                      # the gradient of +∞ is no limit
    rows = slice(None) if finite.all() else slice(1, None)         # +∞ in sample 0: the others' rows
    assert not torch.isnan(grad[rows]).any()
    torch.testing.assert_close(grad[rows], grad6[rows], rtol=1e-6, atol=1e-6)


def _dora(name, k):
    return robalign.DoRALoss(name, lam=1.0, group_size=k)


@pytest.mark.parametrize("name", [n for n in NAMES if not OBJECTIVES[_base(n)].unpaired])
def test_doraloss_trains_on_finite_limits_and_refuses_infinite_ones(name):
    """DoRALoss (float32) on the batch whose worst candidate of sample 0 has log-prob −∞: the
    float64 objective's limit is finite for most objectives, and then the loss and gradient are
    the float64 ones (5e-6 relative: float32 of a handful of terms); +∞ raises and names sample 0."""
    entry, k, logps, ref, kw = _problem(name)
    logps[0, k - 1] = -inf
    dora = _dora(name, k)
    want = entry.fn(logps, ref if entry.reference else None, **kw, **dora.hparams)
    x = logps.float().reshape(-1).requires_grad_(True)
    extra = {"ref_logps": ref.float().reshape(-1)} if entry.reference else {}
    if not torch.isfinite(want).all():
        with pytest.raises(ValueError, match=r"must be finite.*samples \[0\]"):
            dora.from_logps(x, kw["counts"].reshape(-1), **extra)
        return
    out = dora.from_logps(x, kw["counts"].reshape(-1), **extra)
    out.loss.backward()
    x64 = logps.clone().requires_grad_(True)
    ref_out = robalign.ground_truth.kl_dro(entry.fn(x64, ref if entry.reference else None, **kw, **dora.hparams), lam=1.0)
    ref_out.backward()
    assert out.loss.item() == pytest.approx(ref_out.item(), rel=5e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad.reshape(-1), rtol=5e-6, atol=5e-7)


def test_the_issue_example():
    logps = torch.tensor([-5.0, -math.inf, -3.0, -4.0], requires_grad=True)
    out = robalign.DoRALoss("dpo", beta=0.1, lam=1.0).from_logps(logps, torch.tensor([3, 4, 3, 3]),
                                                               ref_logps=torch.tensor([-6.0, -7.0, -3.5, -3.5]))
    out.loss.backward()
    assert out.losses[0].item() == 0.0 and out.losses[1].item() == pytest.approx(0.6444, abs=1e-4)
    assert out.loss.item() == pytest.approx(0.3732, abs=1e-4) and bool(torch.isfinite(logps.grad).all())
    smoothed = OBJECTIVES["dpo"].fn(logps.detach().view(2, 2), torch.tensor([[-6.0, -7.0], [-3.5, -3.5]]),
                                    label_smoothing=0.1)
    assert smoothed[0].item() == math.inf                        # −ε·log σ(−∞): the limit
    with pytest.raises(ValueError, match=r"robalign.kl_dro: every per-sample loss must be finite.*samples \[0\]"):
        robalign.DoRALoss("dpo", beta=0.1, lam=1.0, label_smoothing=0.1).from_logps(
            logps.detach(), torch.tensor([3, 4, 3, 3]), ref_logps=torch.tensor([-6.0, -7.0, -3.5, -3.5]))


@pytest.mark.parametrize("bad", ["both", "plus"])
def test_log_probs_without_a_limit_are_refused(bad):
    logps, ref = torch.tensor([-5.0, -2.0, -3.0, -4.0]), torch.tensor([-6.0, -7.0, -3.5, -3.5])
    if bad == "both":                                # neither model produces sequence 1: no log-ratio
        logps[1], ref[1] = -inf, -inf
        match = r"both -inf has no log-ratio.*sequences \[1\]"
    else:
        ref[2] = inf
        match = r"log-probs must be < \+inf.*sequences \[2\]"
    with pytest.raises(ValueError, match=match):
        robalign.DoRALoss("dpo", lam=1.0).from_logps(logps, torch.tensor([3, 4, 3, 3]), ref_logps=ref)


@pytest.mark.parametrize("reduction", [KLDRO(1.0), KLDRO(inf), KLDRO(-2.0), KLBall(0.1), Chi2Ball(0.5), CVaR(0.3),
                                       GroupDRO(2)], ids=lambda r: f"{type(r).__name__}")
@pytest.mark.parametrize("value", [inf, math.nan])
def test_every_reduction_refuses_a_non_finite_loss(reduction, value):
    """NaN before (every reduction but the mean, which gave +∞ and a gradient for an objective of +∞)."""
    losses = torch.tensor([0.5, value, 2.0, 1.0], requires_grad=True)
    kw = {"group_ids": torch.tensor([0, 1, 0, 1])} if isinstance(reduction, GroupDRO) else {}
    with pytest.raises(ValueError, match=r"every per-sample loss must be finite.*samples \[1\]"):
        reduction.reduce(losses, None, **kw)
    acc = reduction.accumulator([losses], exact=True, accumulation_steps=2)
    with pytest.raises(ValueError, match=r"accumulator: every per-sample loss must be finite"):
        if getattr(acc, "needs_prepare", False):
            acc.prepare([losses.detach()], None, [kw["group_ids"]] if kw else None)
        else:
            acc(losses, None)


@pytest.mark.parametrize("objective", ["dpo", "robust", "cpo", "simpo", "exo_pair", "hinge", "discopop", "nca_pair"])
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "recompute"])
def test_an_infinite_limit_is_refused_on_every_path(backend, one_pass):
    """IPO's loss at an infinite margin is +∞ (a square): every path raises, naming the sample,
    instead of a NaN or infinite step (the one-pass op forms its gradient first: it is discarded)."""
    name, device = backend
    gen = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(4, 5, 6, generator=gen, device="cpu"), torch.randn(11, 6, generator=gen)
    bias = torch.zeros(11)
    bias[7] = -math.inf
    labels = torch.randint(7, (4, 5), generator=gen)
    labels[:, :2] = -100
    labels[3, 4] = 7                                   # the second pair's rejected response
    loss = robalign.DoRALoss("ipo", lam=1.0, backend=name, one_pass=one_pass)
    with pytest.raises(ValueError, match=r"every per-sample loss must be finite.*samples \[1\] have losses \[inf\]"):
        loss(hidden=hidden.to(device).requires_grad_(True), head_weight=head.to(device), head_bias=bias.to(device),
             labels=labels.to(device), ref_logps=(torch.randn(4, generator=gen) - 8).to(device))
