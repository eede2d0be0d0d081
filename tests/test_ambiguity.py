"""The ambiguity sets (robalign.losses.ambiguity, the reductions KLBall, Chi2Ball, CVaR) against the
primal problem ``max_q Σ q_i·x_i`` over each set, solved by a general-purpose solver (scipy:
SLSQP for the KL and χ² balls from several starts, linprog for CVaR).

Tolerances: the values to 1e-7 (SLSQP's ftol is 1e-14 on values of order 1); the maximising q to
1e-5 (SLSQP stops on the objective, so q carries the square root of its precision), exactly for
the LP. The gradient of each reduction with respect to ℓ_i must be q_i·w_i (the envelope theorem).
"""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

import robalign
from robalign.losses import ambiguity
from robalign.losses.reductions import CVaR, Chi2Ball, KLBall
from conftest import run_on_gloo_ranks, trainer_accumulation_gaps

scipy_optimize = pytest.importorskip("scipy.optimize")


def values(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * 2


def primal(x, inside):
    """``max_q q·x`` over the simplex with ``inside(q) ≥ 0``, best of five SLSQP starts."""
    xn, n = x.numpy(), x.numel()
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1}, {"type": "ineq", "fun": inside}]
    best = None
    for seed in range(5):
        q0 = np.random.default_rng(seed).dirichlet(np.ones(n))
        r = scipy_optimize.minimize(lambda q: -q @ xn, q0, jac=lambda q: -xn, constraints=cons, bounds=[(0, 1)] * n,
                                    method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
        best = r if best is None or r.fun < best.fun else best
    return -best.fun, torch.from_numpy(best.x)


def kl_inside(eta, n):
    return lambda q: eta - float(np.sum(np.where(q > 1e-300, q * np.log(np.maximum(q, 1e-300) * n), 0.0)))


def chi2_inside(rho, n):
    return lambda q: rho - 0.5 * n * float(np.sum((q - 1 / n) ** 2))


@pytest.mark.parametrize("eta", [0.01, 0.1, 0.5, 1.5])
def test_kl_ball_is_the_primal_optimum(eta):
    x = values()
    value, q, lam = ambiguity.kl_ball(x, eta)
    want, q_star = primal(x, kl_inside(eta, x.numel()))
    assert abs(float(value) - want) < 1e-7 and 0 < lam < math.inf
    torch.testing.assert_close(q, q_star, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rho", [0.05, 0.5, 2.0, 4.0])
def test_chi2_ball_is_the_primal_optimum(rho):
    x = values(seed=1)
    value, q, c = ambiguity.chi2_ball(x, rho)
    want, q_star = primal(x, chi2_inside(rho, x.numel()))
    assert abs(float(value) - want) < 1e-7
    torch.testing.assert_close(q, q_star, rtol=0, atol=1e-5)


@pytest.mark.parametrize("level", [0.1, 0.25, 0.3, 0.5, 1.0])
def test_cvar_is_the_linear_programs_optimum(level):
    x = values(n=10, seed=2)
    value, q, _ = ambiguity.cvar(x, level)
    n = x.numel()
    r = scipy_optimize.linprog(-x.numpy(), A_eq=np.ones((1, n)), b_eq=[1], bounds=[(0, 1 / (level * n))] * n)
    assert abs(float(value) + r.fun) < 1e-12
    torch.testing.assert_close(q, torch.from_numpy(r.x), rtol=0, atol=1e-12)


def test_the_limits():
    x = values()
    for value, q, _ in (ambiguity.kl_ball(x, 0.0), ambiguity.chi2_ball(x, 0.0), ambiguity.cvar(x, 1.0)):
        torch.testing.assert_close(value, x.mean())                      # the radius 0 / level 1: the mean
        torch.testing.assert_close(q, torch.full_like(x, 1 / x.numel()))
    for value, q, _ in (ambiguity.kl_ball(x, math.log(x.numel())), ambiguity.chi2_ball(x, 100.0),
                        ambiguity.cvar(x, 1 / x.numel())):
        assert float(value) == float(x.max()) and float(q.max()) == 1.0  # a radius that holds the point mass
    equal = torch.full((5,), 2.5, dtype=torch.float64)
    for fn, r in ((ambiguity.kl_ball, 0.3), (ambiguity.chi2_ball, 0.3), (ambiguity.cvar, 0.3)):
        assert float(fn(equal, r)[0]) == pytest.approx(2.5)
    value, _, lam = ambiguity.kl_ball(x, 1e-6)                           # a small radius: near the mean
    assert abs(float(value) - float(x.mean())) < 0.01 and lam > 10


SETS = [KLBall(0.2), Chi2Ball(0.8), CVaR(0.3)]


@pytest.mark.parametrize("reduction", SETS, ids=lambda r: r.name)
def test_the_gradient_is_the_maximising_q_times_the_weight(reduction):
    losses = values(n=9, seed=4).requires_grad_(True)
    weights = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    loss, stats = reduction.reduce(losses, weights)
    (grad,) = torch.autograd.grad(loss, losses)
    value, q, dual = reduction.solve(weights * losses.detach())
    torch.testing.assert_close(loss.detach(), value)
    torch.testing.assert_close(grad, q * weights)
    assert float(stats.dual) == pytest.approx(dual) and int(stats.num_samples) == 9
    assert float(stats.ess) == pytest.approx(1 / float((q * q).sum()))


def test_bad_radii_are_clear_errors():
    with pytest.raises(ValueError, match="robalign.KLBall: `eta`"):
        KLBall(-0.1)
    with pytest.raises(ValueError, match="robalign.Chi2Ball: `rho`"):
        Chi2Ball(float("inf"))
    with pytest.raises(ValueError, match="robalign.CVaR: `level`"):
        CVaR(0.0)


@pytest.mark.parametrize("reduction", SETS, ids=lambda r: r.name)
def test_two_micro_batches_prepared_equal_one_batch(reduction):
    """The exact accumulator: a no-grad pass over both micro-batches (prepare) fixes q, then each
    micro-batch's gradient pass uses it; the accumulated gradient is the whole batch's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    w = torch.rand(10, dtype=torch.float64) + 0.5
    per_sample = lambda rows: model(x[rows]).squeeze(-1) ** 2          # noqa: E731
    whole, _ = reduction.reduce(per_sample(slice(0, 10)), w)
    want = torch.autograd.grad(whole, list(model.parameters()))
    acc = reduction.accumulator(list(model.parameters()), accumulation_steps=2)
    parts = (slice(0, 3), slice(3, 10))
    with torch.no_grad():
        acc.prepare([per_sample(r) for r in parts], [w[r] for r in parts])
    for r in parts:
        acc(per_sample(r), w[r]).backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert acc.loss == pytest.approx(float(whole.detach()))
    with pytest.raises(RuntimeError, match="call prepare"):
        acc(per_sample(parts[0]), w[parts[0]])


def test_per_micro_batch_approximation_and_one_micro_batch():
    acc = CVaR(0.3).accumulator([], exact=True, accumulation_steps=1)
    losses = values(n=6).requires_grad_(True)
    loss = acc(losses)
    torch.testing.assert_close(loss.detach(), ambiguity.cvar(losses.detach(), 0.3)[0])
    approx = CVaR(0.3).accumulator([], exact=False, accumulation_steps=2)
    half = approx(losses[:3])
    torch.testing.assert_close(half.detach(), ambiguity.cvar(losses.detach()[:3], 0.3)[0] / 2)


@pytest.mark.parametrize("reduction", SETS, ids=lambda r: r.name)
def test_doraloss_takes_the_set_through_the_recompute_path(reduction):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 5, 6, generator=gen, requires_grad=True)
    head = torch.randn(11, 6, generator=gen)
    labels = torch.randint(11, (8, 5), generator=gen)
    ref = torch.randn(8, generator=gen) - 12
    out = robalign.DoRALoss("dpo", beta=0.5, reduction=reduction, backend="cpp")(
        hidden=hidden, head_weight=head, labels=labels, ref_logps=ref)
    assert out.policy_logps.grad_fn is not None                         # no one-pass form: the recompute path
    want, _ = reduction.reduce(out.losses.detach(), out.weights)
    torch.testing.assert_close(out.loss.detach(), want)
    out.loss.backward()
    assert hidden.grad.abs().sum() > 0


# -- 2 gloo ranks = one process ------------------------------------------------------------------

def _problem():
    gen = torch.Generator().manual_seed(11)
    losses = torch.randn(2 * 7, generator=gen, dtype=torch.float64) + torch.arange(14, dtype=torch.float64) / 7
    weights = torch.rand(14, generator=gen, dtype=torch.float64) + 0.2
    return losses, weights


def _rank_worker(rank):
    losses, weights = _problem()
    shard = slice(0, 5) if rank == 0 else slice(5, 14)              # unequal shards
    out = {}
    for reduction in SETS:
        mine = losses[shard].clone().requires_grad_(True)
        loss, stats = reduction.reduce(mine, weights[shard], group=dist.group.WORLD, ddp_average=False)
        (grad,) = torch.autograd.grad(loss, mine)
        out[reduction.name] = (float(loss.detach()), grad, float(stats.dual))
        # the same shard as two micro-batches through the exact accumulator (prepare, then gradients)
        mine = losses[shard].clone().requires_grad_(True)
        acc = reduction.accumulator([mine], group=dist.group.WORLD, ddp_average=False, accumulation_steps=2)
        cut = 2 if rank == 0 else 4
        micro = [slice(0, cut), slice(cut, mine.numel())]
        acc.prepare([mine.detach()[m] for m in micro], [weights[shard][m] for m in micro])
        for m in micro:
            acc(mine[m], weights[shard][m]).backward()
        out[reduction.name + "/micro"] = (acc.loss, mine.grad.clone(), float(acc.stats().dual))
    return out


@pytest.mark.distributed
def test_two_ranks_and_two_micro_batches_reduce_the_same_global_batch_as_one_process():
    losses, weights = _problem()
    results = run_on_gloo_ranks(_rank_worker, 2)
    for reduction in SETS:
        whole = losses.clone().requires_grad_(True)
        loss, stats = reduction.reduce(whole, weights)
        (grad,) = torch.autograd.grad(loss, whole)
        for key in (reduction.name, reduction.name + "/micro"):         # one pass; 2 micro-batches a rank
            got_grad = torch.cat([results[0][key][1], results[1][key][1]])
            for rank in (0, 1):
                assert results[rank][key][0] == pytest.approx(float(loss.detach()), rel=1e-12)
                assert results[rank][key][2] == pytest.approx(float(stats.dual), rel=1e-9)
            torch.testing.assert_close(got_grad, grad, rtol=1e-12, atol=1e-14)


# -- everywhere a user meets it -----------------------------------------------------------------

def test_robalign_train_takes_each_set_and_logs_its_dual(tmp_path):
    from robalign.app.training.config import TrainSettings
    from robalign.app.commands.train import run_training

    for dro, key in (("kl-ball", "eta"), ("chi2", "rho"), ("cvar", "level")):
        settings = TrainSettings(out=str(tmp_path / dro), dro=dro, **{key: 0.3}, grad_accum=1, max_steps=3,
                                 logging_steps=1, save_steps=100)
        summary = run_training(settings, log=lambda *_: None)
        assert summary["steps"] == 3 and summary["settings"]["dro"] == dro
        assert math.isfinite(summary["last_log"]["dro/dual"])


def test_bad_settings_name_the_key():
    from robalign.app.training.config import load_settings

    assert load_settings(dro="chi2", grad_accum=4).dro == "chi2"
    with pytest.raises(ValueError, match="`level` must be a number in \\(0, 1\\]"):
        load_settings(dro="cvar", level=1.5)
    with pytest.raises(ValueError, match="`dro` must be one of kl, kl-ball, chi2, cvar"):
        load_settings(dro="wasserstein")


@pytest.mark.parametrize("dro,key", [("cvar", "level"), ("chi2", "rho")])
def test_trainer_accumulation_is_exact_for_sets_that_need_the_whole_batch(tmp_path, dro, key):
    """2 micro-batches of 4 (with the no-grad pre-pass) give the parameters of 1 batch of 8 (SGD,
    3 steps); the per-micro-batch approximation does not."""
    exact, approx = trainer_accumulation_gaps(tmp_path, dro=dro, **{key: 0.3})
    assert exact < 1e-5
    assert approx > 10 * max(exact, 1e-7)


# -- the edges of the radii: each in closed form (a solver cannot resolve them) ---------------------

@pytest.mark.parametrize("eta", [1e-32, 1e-20, 1e-12])
def test_kl_ball_at_a_tiny_radius_is_the_mean_plus_its_first_order_term(eta):
    """sup over KL(q‖u) ≤ η is mean + √(2η·var) + O(η) (the dual's λ·log-mean-exp cancelled to 0
    at η = 1e-32 before: 2.3e-16 for a mean of 1.175)."""
    x = values()
    value, q, _ = ambiguity.kl_ball(x, eta)
    want = float(x.mean()) + math.sqrt(2 * eta * float(x.var(unbiased=False)))
    assert abs(float(value) - want) < 1e-9 and abs(float(q.sum()) - 1) < 1e-12
    issue = KLBall(1e-32).reduce(torch.tensor([0.3, 1.2, 0.7, 2.5]))[0]
    assert float(issue) == pytest.approx(1.175, rel=1e-6)


@pytest.mark.parametrize("rho", [1e-300, 1e-17, 1e-9, 0.05])
def test_chi2_ball_at_a_small_radius_is_in_closed_form(rho):
    """While every q_i stays ≥ 0 the supremum is mean + √(2ρ·var) exactly (ρ ≤ 1e-16 divided by
    zero before)."""
    x = values(seed=1)
    value, q, c = ambiguity.chi2_ball(x, rho)
    want = float(x.mean()) + math.sqrt(2 * rho * float(x.var(unbiased=False)))
    assert float(value) == pytest.approx(want, rel=1e-13, abs=1e-15)
    assert float(q.min()) >= 0 and abs(float(q.sum()) - 1) < 1e-12 and c < float(x.min())
    assert 0.5 * x.numel() * float(((q - 1 / x.numel()) ** 2).sum()) == pytest.approx(rho, rel=1e-9)


@pytest.mark.parametrize("level", [5e-324, 1e-300, 0.05])
def test_cvar_below_one_sample_is_the_maximum(level):
    """level·N < 1: the cap 1/(level·N) (inf at 5e-324) binds nothing, q is one-hot on the worst
    sample (0 and a zero gradient before)."""
    x = values(n=10, seed=2).requires_grad_(True)
    loss, stats = CVaR(level).reduce(x)
    (grad,) = torch.autograd.grad(loss, x)
    x = x.detach()
    assert float(loss) == float(x.max())
    assert grad.tolist() == (x == x.max()).double().tolist()
