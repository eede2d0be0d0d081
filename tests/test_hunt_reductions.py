"""A seeded hunt over the reductions' parameters and inputs, against an independent computation in
50-digit arithmetic (mpmath), not against robalign's own formulas or solvers.

Each case draws a reduction at any parameter the checks accept — KL-DRO's λ of either sign over
10^±300 (and ∞), a KL ball's η and a χ² ball's ρ over 10^−40 … 10^3, CVaR's level over 10^−320 … 1,
group DRO's step over 10^−5 … 10^308 with 1 to 4 groups — and N = 1 … 40 losses spread over
10^−6 … 10^6 (some equal, some negative), with weights that are 1, random or partly 0, in float64
or float32. It checks the value and the gradient to each loss:

    KL-DRO     λ·log mean exp(x/λ) (the mean at λ = ∞), gradient w·softmax(x/λ)
    KL ball    min over λ > 0 of λη + λ·log mean exp(x/λ), by golden-section search on log λ
    χ² ball    min over c of c + √(1+2ρ)·√mean((x − c)₊²), by golden-section search on c
    CVaR       the mean of the worst ``level·N`` values (a fraction of the next one), exactly
    group DRO  q ← q·exp(η·L_g)/Z from uniform, then Σ_g q_g·L_g, with L_g the group means

with x = w·ℓ. Tolerances, with the reason: float64 inputs — 1e-9 of the values' scale for the
value and the gradient (the solvers stop at float64 resolution of a bracket; the searches here run
in 50 digits, so 1e-9 leaves room for the bracket's last steps and nothing else); float32 inputs
— 3e-6 (the reduction returns the value in float32: a handful of roundings of the scale).
Gradients are compared only where the maximiser is unique (no ties among the values that share
the weight; CVaR's and the balls' boundaries are 10^−3 of the scale away from a value).

``HUNT_CASES`` sets the number of cases (default 300, ~15 s; the reliability note's run: 5,000).
"""

import math
import os
import random

import mpmath as mp
import pytest
import torch

from robalign.losses.reductions import CVaR, Chi2Ball, GroupDRO, KLBall, KLDRO

mp.mp.dps = 50
CASES = int(os.environ.get("HUNT_CASES", "300"))


def _golden(f, lo, hi, steps=400):
    """The minimum of a unimodal ``f`` on ``[lo, hi]`` (mpf), by golden-section search."""
    g = (mp.sqrt(5) - 1) / 2
    a, b = mp.mpf(lo), mp.mpf(hi)
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return min(fc, fd), (c if fc <= fd else d)


def _log_mean_exp(x, lam):
    """``log mean exp(x/λ)`` as ``m + log1p(mean(expm1(x/λ − m)))``: at λ = 1e300 the plain form
    needs 1 + 1e-300 in 50 digits."""
    m = max(v / lam for v in x)
    return m + mp.log1p(mp.fsum(mp.expm1(v / lam - m) for v in x) / len(x))


def kl_dro(x, lam):
    if lam == math.inf:
        return mp.fsum(x) / len(x), [mp.mpf(1) / len(x)] * len(x)
    lam = mp.mpf(lam)
    m = max(v / lam for v in x)
    e = [mp.exp(v / lam - m) for v in x]
    return lam * _log_mean_exp(x, lam), [v / mp.fsum(e) for v in e]


def kl_ball(x, eta):
    n = len(x)
    if max(x) == min(x):
        return x[0], None
    if eta >= math.log(n / sum(1 for v in x if v == max(x))):
        return max(x), None
    # λ* lies between spread·e^−40 (where the dual still visibly falls from the max in 50 digits) and
    # spread/√(2η)·e^5 (past the small-radius solution σ/√(2η)): a bracket the search cannot leave
    # on a plateau that 50 digits see as flat
    spread = mp.log(max(x) - min(x))
    lo, hi = spread - 40, spread + 5 + mp.log(1 / mp.sqrt(2 * mp.mpf(eta)))
    value, t = _golden(lambda t: mp.exp(t) * eta + mp.exp(t) * _log_mean_exp(x, mp.exp(t)), lo, hi)
    return min(value, max(x)), kl_dro(x, mp.exp(t))[1]


def chi2_ball(x, rho):
    n, scale = len(x), mp.sqrt(1 + 2 * mp.mpf(rho))

    def dual(c):
        return c + scale * mp.sqrt(mp.fsum(max(v - c, 0) ** 2 for v in x) / n)
    spread = max(x) - min(x)                         # c* ≈ mean − σ/√(2ρ) for a small radius
    lo, hi = min(x) - spread * (1 + 2 / mp.sqrt(2 * mp.mpf(rho))) - 1, max(x)
    value, c = _golden(dual, lo, hi)
    pos = [max(v - c, 0) for v in x]
    return min(value, max(x)), [p / mp.fsum(pos) for p in pos] if mp.fsum(pos) > 0 else None


def cvar(x, level):
    n = len(x)
    k = mp.mpf(level) * n
    order = sorted(range(n), key=lambda i: -x[i])
    if k <= 1:
        return x[order[0]], [mp.mpf(1) if i == order[0] else mp.mpf(0) for i in range(n)]
    whole = int(mp.floor(k))
    q = [mp.mpf(0)] * n
    for i in order[:whole]:
        q[i] = 1 / k
    if whole < n:
        q[order[whole]] = (k - whole) / k
    return mp.fsum(qi * xi for qi, xi in zip(q, x)), q


def group_dro(x, groups, g, step):
    """One step from uniform q: ``q ∝ exp(η·L_g)`` (an absent group's L_g is 0: its factor e⁰)."""
    members = [[i for i in range(len(x)) if groups[i] == j] for j in range(g)]
    means = [mp.fsum(x[i] for i in m) / len(m) if m else mp.mpf(0) for m in members]
    a = [mp.mpf(step) * m for m in means]
    top = max(a)
    e = [mp.exp(v - top) for v in a]
    q = [v / mp.fsum(e) for v in e]
    value = mp.fsum(qj * m for qj, m in zip(q, means))
    return value, [q[groups[i]] / len(members[groups[i]]) for i in range(len(x))]


def draw(n_case):
    rng = random.Random(n_case)
    n = rng.randint(1, 40)
    scale = 10 ** rng.uniform(-6, 6)
    losses = [rng.uniform(-0.2, 1.0) * scale for _ in range(n)]
    if n > 2 and rng.random() < 0.2:
        losses[1] = losses[0]                                       # a tie
    weighting = rng.choice(["none", "random", "zeros"])
    weights = None if weighting == "none" else [rng.uniform(0.1, 3.0) for _ in range(n)]
    if weighting == "zeros":
        weights = [0.0 if rng.random() < 0.4 else w for w in weights]
    kind = rng.choice(["kl", "kl", "kl-ball", "chi2", "cvar", "group"])
    sign = rng.choice([1, 1, -1])
    param = {"kl": (math.inf if rng.random() < 0.1 else sign * 10 ** rng.uniform(-300, 300)),
             "kl-ball": 10 ** rng.uniform(-40, 3), "chi2": 10 ** rng.uniform(-40, 3),
             "cvar": min(1.0, 10 ** rng.uniform(-320, 0)), "group": 10 ** rng.uniform(-5, 308)}[kind]
    groups = [rng.randrange(4) for _ in range(n)]
    return dict(n=n, losses=losses, weights=weights, kind=kind, param=param, groups=groups, g=max(groups) + 1,
                dtype=rng.choice([torch.float64, torch.float64, torch.float32]))


def oracle(case, x):
    kind, p = case["kind"], case["param"]
    if kind == "kl":
        return kl_dro(x, p)
    if kind == "kl-ball":
        return kl_ball(x, p)
    if kind == "chi2":
        return chi2_ball(x, p)
    if kind == "cvar":
        return cvar(x, p)
    return group_dro(x, case["groups"], case["g"], p)


def reduction_of(case):
    kind, p = case["kind"], case["param"]
    return {"kl": lambda: KLDRO(p), "kl-ball": lambda: KLBall(p), "chi2": lambda: Chi2Ball(p),
            "cvar": lambda: CVaR(p), "group": lambda: GroupDRO(case["g"], step_size=p)}[kind]()


@pytest.mark.parametrize("chunk", range(10))
def test_the_reductions_meet_the_50_digit_oracle(chunk):
    failures = []
    for n_case in range(chunk, CASES, 10):
        case = draw(n_case)
        dtype = case["dtype"]
        losses = torch.tensor(case["losses"], dtype=dtype, requires_grad=True)
        weights = None if case["weights"] is None else torch.tensor(case["weights"], dtype=dtype)
        w = [1.0] * case["n"] if weights is None else weights.double().tolist()
        x = [mp.mpf(wi) * mp.mpf(li) for wi, li in zip(w, losses.detach().double().tolist())]
        kw = {"group_ids": torch.tensor(case["groups"])} if case["kind"] == "group" else {}
        out, _ = reduction_of(case).reduce(losses, weights, **kw)
        out.backward()
        want, q = oracle(case, x)
        scale = max(max(abs(v) for v in x), mp.mpf(1e-300))
        tol = 1e-9 if dtype == torch.float64 else 3e-6
        if not abs(mp.mpf(out.item()) - want) <= tol * scale:
            failures.append((n_case, case["kind"], case["param"], "value", float(want), out.item()))
            continue
        distinct = len(set(float(v) for v in x)) == len(x)
        if q is None or not distinct or case["kind"] in ("kl-ball", "chi2", "cvar") and not _clear_of_boundary(case, x):
            continue
        grad = losses.grad.double().tolist()
        for i, (gi, qi) in enumerate(zip(grad, q)):
            if not abs(mp.mpf(gi) - qi * w[i]) <= tol * max(1, max(w)):
                failures.append((n_case, case["kind"], case["param"], f"grad {i}", float(qi * w[i]), gi))
                break
    assert failures == [], failures[:5]


def _clear_of_boundary(case, x):
    """The set's maximiser is stable: no value within 1e-3 of the scale of the threshold where
    the maximiser's support changes (CVaR's cut, the balls' c* or the max's tie)."""
    values = sorted((float(v) for v in x), reverse=True)
    spread = values[0] - values[-1]
    if spread == 0:
        return False
    if case["kind"] == "cvar":
        k = case["param"] * len(values)
        return k <= 1 or k >= len(values) or abs(k - round(k)) > 1e-3
    gaps = [a - b for a, b in zip(values, values[1:])]
    return min(gaps) > 1e-3 * spread
