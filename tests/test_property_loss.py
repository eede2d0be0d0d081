"""Combinatorial, at the level of the loss: seeded compositions of ``DoRALoss`` — objective,
reduction, padded or packed rows, head transform, bias, reference source (log-probs, logits, its
own head or none), WPO / LD-DPO / reference-free, DoRA weights from probabilities or given
weights, float32 or bfloat16, one chunk of tokens or several, the head gradient accumulated in
float32 or the head's dtype, a token masked by a −∞ head bias in one sample's worst candidate (an
infinite log-prob: the limit, or the same refusal everywhere where the limit is +∞), every
reduction also at the edge of its parameter (λ = 1e-250 and 1e250, a ball of radius 1e-32 or
1e-18, CVaR below one sample, a group-DRO step of 1e308), group DRO's q loaded by group name with
the names in either order — on every path (materialised logits, the recompute linear path, the
one-pass loss) and every kernel backend give the loss and every gradient (hidden states, head
weight, bias) of the float64 reference backend on the same values; and, split into two
micro-batches through the reduction's exact accumulator, the whole batch's. The per-axis tests
(test_one_pass, test_head_transform, test_loss, test_weights_dro, test_ambiguity, ...) pin each
feature; this one looks for a wrong interaction (it found one: the one-pass loss's head gradients
when the last samples have no scored token, see test_one_pass). With the masked tokens, the edges
and the group names drawn, it fails 35 of its cases on e62d3a8, before the second reliability pass.

Tolerances, with the reason:
- float32: the kernels accumulate in float32 over at most V·T = 40·7 terms per sequence, the
  reduction over at most 12 samples, and the accumulator rescales sums already formed, so errors
  stay within a few hundred float32 roundings (2⁻²⁴ ≈ 6e-8 each) of the values' scale: 5e-5 of
  max(|loss|, 1) for the loss and of each gradient's largest element for the gradient, plus 1e-7
  absolute where a gradient cancels to zero (``GRAD_FLOOR``) (measured over the 1,152 cases of
  the thorough run: 4.2e-7 and 1.5e-5);
- bfloat16: the head's logits are rounded to 8 significant bits (relative 2⁻⁹) before the row
  kernels read them, as in any bfloat16 head, and every gradient is rounded once to bfloat16, so
  against float64 only 5e-2 of the scale is promised (measured: 5.5e-3 loss, 2.2e-2 gradients) — or
  twice the error of the loss from materialised bfloat16 logits (the reference backend on the logits
  path: what PyTorch computes in bfloat16) where that is larger: an objective with a steep gate
  (DiscoPOP's σ(ρ/0.05)) multiplies the logits' rounding by 20, and case 4006 puts every path and
  backend, that reference included, 7.7 % off. The
  backends on one device are then compared with one another on the same path, where they read
  the same bfloat16 logits (one ATen matmul): 1e-5 for the loss (float32 accumulation) and 2⁻⁷ of each
  gradient's largest element (two bfloat16 roundings of one float32 value, 2⁻⁸ each; measured:
  3.5e-7 and 8.6e-4). AOT sorts the batch's log-ratios, so its gradient jumps where two of them
  tie: bfloat16's rounding can swap a near tie (seen: −1.1460 and −1.1459), so in bfloat16 its
  gradients are compared only between backends, which sort the same values.
Three cases per objective (78 and 66 accumulated, ~30 s), each case's choices seeded by its number
so every run tests the same ones; ``HYPOTHESIS_PROFILE=thorough`` (the property tests' switch)
makes 24 (~2.5 min).
"""

import os
import random

import pytest
import torch

import robalign
from robalign.losses import objectives as O
from robalign.losses.reductions import CVaR, Chi2Ball, GroupDRO, KLBall, KLDRO
from robalign.ops import linear, one_pass
from conftest import packed_from_padded

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
CASES_PER_OBJECTIVE = 24 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 3
TRANSFORMS = [{}, {}, dict(logit_softcap=3.0), dict(logit_scale=0.7, logit_temperature=1.3)]
# objective -> candidates per sample (1: unpaired, the label in `scores`)
OBJECTIVES = {"dpo": 2, "ipo": 2, "robust": 2, "hinge": 2, "exo_pair": 2, "nca_pair": 2, "bco_pair": 2,
              "sppo_hard": 2, "apo_zero": 2, "apo_down": 2, "discopop": 2, "dpo_norm": 2, "ipo_norm": 2,
              "simpo": 2, "cpo": 2, "orpo": 2, "sft": 2, "dpo+0.5*sft": 2, "dpo:js_divergence": 2,
              "aot": 2, "aot_unpaired": 2, "plackett_luce": 3, "rrhf": 3, "lire": 3, "kto": 1,
              "apo_zero_unpaired": 1}
REDUCTIONS = {"kl 1": lambda: KLDRO(1.0), "kl 0.5": lambda: KLDRO(0.5), "kl inf": lambda: KLDRO(float("inf")),
              "kl -2": lambda: KLDRO(-2.0), "kl ball": lambda: KLBall(0.5), "chi2 ball": lambda: Chi2Ball(1.0),
              "cvar": lambda: CVaR(0.4), "group dro": lambda names: GroupDRO(2, step_size=0.5, names=names),
              # the edges of each set, where their limits hold (the second reliability pass): the max and
              # the mean of KL-DRO, balls that are nearly a point, CVaR below one sample, a step past float64
              "kl 1e-250": lambda: KLDRO(1e-250), "kl 1e250": lambda: KLDRO(1e250),
              "kl ball 1e-32": lambda: KLBall(1e-32), "chi2 ball 1e-18": lambda: Chi2Ball(1e-18),
              "cvar 1e-300": lambda: CVaR(1e-300),
              "group dro 1e308": lambda names: GroupDRO(2, step_size=1e308, names=names)}
#: group DRO's groups by name: the reference runs with these, and a "renamed" case gives the kernel
#: paths the names in the other order, the ids swapped and q loaded by name from the same state
GROUP_NAMES = ("m", "o")
LISTWISE = ("plackett_luce", "rrhf", "lire")
LD_OBJECTIVES = ("dpo", "ipo", "robust")                 # LD-DPO on a few pairwise objectives
KERNELS = [("cpp", "cpu"), ("torch", DEV), ("triton", DEV)]
#: a gradient that cancels to zero exactly (APO-down with an empty rejected response: σ(x) + σ(−x) = 1)
#: keeps a float32 residual of an ulp or two of the terms that cancel (β·σ' ≤ 0.075; measured 6e-9)
GRAD_FLOOR = 1e-7


def make_case(objective: str, n: int) -> dict:
    """Case ``n`` of ``objective``: the reduction cycles with ``n``; the rest of the composition,
    the shapes and the values are drawn from generators seeded with ``n``. Tensors are float64,
    rounded once to the case's dtype."""
    rng = random.Random(n)
    gen = torch.Generator().manual_seed(n)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)    # noqa: E731
    uniform = lambda size: torch.rand(size, generator=gen, dtype=torch.float64)       # noqa: E731
    k = OBJECTIVES[objective]
    b, t, h, v = rng.randint(2, 4), rng.randint(1, 7), rng.randint(3, 12), rng.randint(2, 40)
    s = b * k
    packed = rng.random() < 0.4
    transform = rng.choice(TRANSFORMS)
    refs = ["ref_logps", "ref_hidden"] + ([] if transform else ["ref_logits"])     # logits are transformed
    if k > 1 and O.needs_reference(O.resolve(objective)):
        refs.append("reference_free")
    ref = rng.choice(refs)
    coupled = O.is_batch_coupled(O.resolve(objective))          # sorts the batch: no sample weights
    pairwise_padded = not packed and k > 1 and objective not in LISTWISE and not coupled
    labels = torch.randint(v, (s, t), generator=gen)
    labels[torch.rand(s, t, generator=gen) < rng.choice([0.0, 0.3, 0.7])] = -100
    if rng.random() < 0.25:
        labels[rng.randrange(s)] = -100                                    # an all-ignored row
    truncated = rng.choice([b - 1, rng.randrange(b)]) if rng.random() < 0.25 else None
    if truncated is not None:                   # a sample whose candidates were all truncated away
        labels[truncated * k:(truncated + 1) * k] = -100
    weighting = "none" if coupled else rng.choice(["none", "probs", "weights"])
    reductions = [r for r in sorted(REDUCTIONS) if not (coupled and r.startswith("group dro"))]   # no sample, no group
    case = dict(objective=objective, k=k, b=b, reduction=reductions[n % len(reductions)], ref=ref,
                transform=transform, chunk=rng.choice([10 ** 6, 7, 2]),
                dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16]), fp32_head_grad=rng.random() < 0.7,
                wpo=pairwise_padded and ref != "reference_free" and rng.random() < 0.4,
                ld_alpha=0.5 if pairwise_padded and objective in LD_OBJECTIVES and rng.random() < 0.5 else None)
    case.update(labels=labels, truncated_last=truncated == b - 1, cu=None,
                hidden=randn(s, t, h), weight=randn(v, h) * 0.5, bias=randn(v) * 0.1 if rng.random() < 0.35 else None,
                ref_hidden=randn(s, t, h), ref_weight=randn(v, h) * 0.5, ref_logps=randn(s) * 3,
                scores=(torch.rand(s, generator=gen) < 0.5).double() if k == 1 else randn(s),
                group_ids=torch.randint(2, (b,), generator=gen),
                kl=(randn(b), randn(b)) if objective == "kto" else None,
                probs=uniform(s) * 0.9 + 0.05 if weighting == "probs" else None,
                weights=uniform(b) * 2 if weighting == "weights" else None)
    case["renamed"] = case["reduction"].startswith("group dro") and rng.random() < 0.5
    case["log_q"] = torch.log_softmax(randn(2), 0).tolist()          # group DRO's q, non-uniform
    case["masked"] = k > 1 and v >= 3 and rng.random() < 0.3
    if case["masked"]:
        # a token masked by a −∞ head bias in one sample's worst candidate: its log-prob is −∞ and the
        # objective takes its limit (or every path refuses the +∞ one, test_infinite_logps)
        mask = v - 1
        labels[labels == mask] = 0
        sample = rng.randrange(b)
        worst = sample * k + int(case["scores"][sample * k:(sample + 1) * k].argmin())
        labels[worst, rng.randrange(t)] = mask
        bias = torch.zeros(v, dtype=torch.float64) if case["bias"] is None else case["bias"].clone()
        bias[mask] = -float("inf")
        case["bias"] = bias
    if packed:
        lengths = [rng.randint(0, t) for _ in range(s)]
        case["hidden"], case["labels"], case["cu"] = packed_from_padded(case["hidden"], labels, lengths)
        case["ref_hidden"] = packed_from_padded(case["ref_hidden"], labels, lengths)[0]
    rounded = lambda x: x if x is None else x.to(case["dtype"]).double()            # noqa: E731
    for name in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_logps", "probs", "weights"):
        case[name] = rounded(case[name])
    case["kl"] = case["kl"] and tuple(rounded(x) for x in case["kl"])
    return case


CASES = [(objective, i * CASES_PER_OBJECTIVE + j) for i, objective in enumerate(sorted(OBJECTIVES))
         for j in range(CASES_PER_OBJECTIVE)]


def make_reduction(case, renamed):
    make = REDUCTIONS[case["reduction"]]
    if not case["reduction"].startswith("group dro"):
        return make()
    reduction = make(GROUP_NAMES[::-1] if renamed else GROUP_NAMES)
    reduction.load_state_dict({"log_q": case["log_q"], "names": list(GROUP_NAMES)})
    return reduction


def make_loss(case, backend, path):
    renamed = case["renamed"] and backend != "reference"
    return robalign.DoRALoss(case["objective"], beta=0.3, reduction=make_reduction(case, renamed),
                             alpha=0.3 if case["probs"] is not None else None, backend=backend,
                             one_pass=path == "one_pass", group_size=case["k"] if case["k"] > 1 else None,
                             wpo=case["wpo"], ld_alpha=case["ld_alpha"], fp32_head_grad=case["fp32_head_grad"],
                             reference_free=case["ref"] == "reference_free", **case["transform"])


def call(loss_fn, case, path, leaves, dtype, device, samples=None, **extra):
    """``loss_fn`` on samples ``[lo, hi)`` of the case (all by default), the head's leaves
    ``(hidden, weight, bias)`` shared, so micro-batches accumulate into one gradient."""
    lo, hi = samples or (0, case["b"])
    k, cu = case["k"], case["cu"]
    rows = slice(lo * k, hi * k)                                         # rows of the samples
    tokens = rows if cu is None else slice(int(cu[lo * k]), int(cu[hi * k]))
    to = lambda x, part=rows: None if x is None else x[part].to(device, dtype)       # noqa: E731
    hidden, weight, bias = leaves
    reference = {"ref_logps": dict(ref_logps=to(case["ref_logps"])), "reference_free": {},
                 "ref_hidden": dict(ref_hidden=to(case["ref_hidden"], tokens),
                                    ref_head_weight=case["ref_weight"].to(device, dtype)),
                 "ref_logits": dict(ref_logits=to(case["ref_hidden"], tokens) @ case["ref_weight"].to(device, dtype).T)}
    kl = case["kl"] and dict(kl_logps=to(case["kl"][0], slice(lo, hi)), kl_ref_logps=to(case["kl"][1], slice(lo, hi)))
    inputs = dict(labels=case["labels"][tokens].to(device),
                  cu_seqlens=None if cu is None else (cu[lo * k:hi * k + 1] - cu[lo * k]).to(device),
                  probs=to(case["probs"]), weights=to(case["weights"], slice(lo, hi)), scores=to(case["scores"]),
                  group_ids=group_ids(case, loss_fn)[lo:hi].to(device) if case["reduction"].startswith("group dro")
                  else None,
                  **reference[case["ref"]], **(kl or {}), **extra)
    if path == "logits":
        logits = hidden[tokens] @ weight.T if bias is None else hidden[tokens] @ weight.T + bias
        return loss_fn(logits=logits, **inputs)
    return loss_fn(hidden=hidden[tokens], head_weight=weight, head_bias=bias, **inputs)


def group_ids(case, loss_fn):
    """The case's group ids in the numbering of ``loss_fn``'s group names."""
    names = loss_fn.reduction.names
    return torch.tensor([names.index(GROUP_NAMES[i]) for i in case["group_ids"].tolist()], dtype=torch.long)


def leaves_of(case, dtype, device):
    return [None if x is None else x.to(device, dtype, copy=True).requires_grad_(True)
            for x in (case["hidden"], case["weight"], case["bias"])]


def grads_of(leaves):
    return [x.grad.double().cpu() for x in leaves if x is not None]


REFUSED = "every per-sample loss must be finite"


def run(case, backend, path, dtype, device):
    """``(loss, [grad hidden, grad weight, grad bias])`` of the whole batch, float64 on the CPU, or
    :data:`REFUSED` where the objective's limit is +∞ (a masked token in a response it must prefer)."""
    leaves = leaves_of(case, dtype, device)
    try:
        out = call(make_loss(case, backend, path), case, path, leaves, dtype, device)
    except ValueError as err:
        if case["masked"] and REFUSED in str(err):
            return REFUSED
        raise
    out.loss.backward()
    return out.loss.detach().double().cpu(), grads_of(leaves)


def _error(x, ref) -> float:
    """The largest absolute difference, NaN where both are NaN counted as none."""
    return (x.double() - ref.double()).nan_to_num().abs().max().item() if ref.numel() else 0.0


def assert_close(got, want, rtol_loss, rtol_grad, what, baseline=None):
    """Loss within ``rtol_loss`` of max(|loss|, 1); each gradient within ``rtol_grad`` of its
    largest element (not compared when ``rtol_grad`` is None); NaN only where the reference has NaN.
    ``baseline`` (the reference backend's result on the same low-precision inputs): each bound is at
    least twice its error, the error the dtype itself brings to this case."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    floor_loss = 0.0 if baseline is None else 2 * _error(baseline[0], ref_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=0, equal_nan=True, msg=lambda m: f"{what} loss: {m}",
                               atol=max(rtol_loss * max(ref_loss.abs().nan_to_num().item(), 1.0), floor_loss))
    if rtol_grad is None:
        return
    for i, (name, g, r) in enumerate(zip(("hidden", "weight", "bias")[:len(ref_grads)], grads, ref_grads,
                                         strict=True)):
        scale = r.abs().nan_to_num().max().item() if r.numel() else 0.0
        floor = 0.0 if baseline is None else 2 * _error(baseline[1][i], r)
        torch.testing.assert_close(g, r, rtol=0, atol=max(rtol_grad * scale, floor) + GRAD_FLOOR, equal_nan=True,
                                   msg=lambda m, name=name: f"{what} grad {name}: {m}")


def prepared(objective, n, monkeypatch):
    """``(case, float64 reference result, paths)`` of case ``n``, its chunk size pinned."""
    case = make_case(objective, n)
    for module in (linear, one_pass):        # one chunk, or several: the one-pass loss's rescaling
        monkeypatch.setattr(module, "chunk_tokens", lambda *args, **kwargs: case["chunk"])
    paths = (["logits"] if not case["transform"] else []) + ["recompute", "one_pass"]   # logits: no transform
    return case, run(case, "reference", "recompute", torch.float64, "cpu"), paths


@pytest.mark.parametrize("objective,n", CASES, ids=[f"{o}-{n}" for o, n in CASES])
def test_every_path_and_backend_gives_the_reference_loss_and_gradients(objective, n, monkeypatch):
    case, want, paths = prepared(objective, n, monkeypatch)
    bf16 = case["dtype"] == torch.bfloat16
    sorts = O.is_batch_coupled(O.resolve(objective))
    # bfloat16: the error of the loss from materialised bfloat16 logits (the reference backend on the
    # logits path, as PyTorch would compute it), which every path's bound is at least twice of
    baseline = run(case, "reference", "logits", case["dtype"], "cpu") if bf16 and "logits" in paths and \
        want != REFUSED else None
    for path in paths:
        results = {}
        if want == REFUSED:                     # +∞ in float64: refused on every path and backend alike
            assert all(run(case, backend, path, case["dtype"], device) == REFUSED for backend, device in KERNELS)
            continue
        for backend, device in KERNELS:
            got = results[backend] = run(case, backend, path, case["dtype"], device)
            assert_close(got, want, 5e-2 if bf16 else 5e-5, None if bf16 and sorts else 5e-2 if bf16 else 5e-5,
                         (backend, path), baseline)
        if bf16:                                 # backends on one device read the same logits
            first = {}
            for backend, device in KERNELS:
                if device in first:
                    assert_close(results[backend], results[first[device]], 1e-5, 2.0 ** -7, (backend, path))
                first.setdefault(device, backend)


def test_the_cases_cover_the_compositions():
    """The cases hold every objective and reduction, both dtypes and layouts, each head
    transform, reference source, weighting and chunk size, a bias, WPO, LD-DPO and a last sample
    with no scored token — so the test above is not vacuous for any of them."""
    cases = [make_case(objective, n) for objective, n in CASES]
    seen = lambda key: {repr(c[key]) for c in cases}                                 # noqa: E731
    assert set(O.NAMES) <= set(OBJECTIVES), f"new objectives to add to OBJECTIVES: {set(O.NAMES) - set(OBJECTIVES)}"
    assert seen("objective") == {repr(o) for o in OBJECTIVES} and seen("reduction") == {repr(r) for r in REDUCTIONS}
    assert seen("dtype") == {"torch.float32", "torch.bfloat16"} and {c["cu"] is None for c in cases} == {True, False}
    assert seen("transform") == {repr(t) for t in TRANSFORMS} and seen("wpo") == {"True", "False"}
    assert seen("ref") == {repr(r) for r in ("ref_logps", "ref_hidden", "ref_logits", "reference_free")}
    assert {c["chunk"] for c in cases} == {10 ** 6, 7, 2} and {c["ld_alpha"] for c in cases} == {None, 0.5}
    assert {c["bias"] is None for c in cases} == {True, False}
    assert {(c["dtype"], c["fp32_head_grad"]) for c in cases} >= {(torch.bfloat16, True), (torch.bfloat16, False)}
    assert {c["truncated_last"] for c in cases} == {True, False}
    assert {(c["probs"] is None, c["weights"] is None) for c in cases} == {(True, True), (False, True), (True, False)}
    assert {c["masked"] for c in cases} == {True, False} and {c["renamed"] for c in cases} == {True, False}
    refused = {o for o, n in CASES if make_case(o, n)["masked"]
               and run(make_case(o, n), "reference", "recompute", torch.float64, "cpu") == REFUSED}
    trained = {o for o, n in CASES if make_case(o, n)["masked"]} - refused
    assert refused and trained, (refused, trained)          # both outcomes of an infinite log-prob occur


ACCUMULATED = [(o, n) for o, n in CASES if not O.is_unpaired(O.resolve(o)) and not O.is_batch_coupled(O.resolve(o))]


@pytest.mark.parametrize("objective,n", ACCUMULATED, ids=[f"{o}-{n}" for o, n in ACCUMULATED])
def test_micro_batches_through_the_accumulator_equal_one_batch(objective, n, monkeypatch):
    """The same compositions as two micro-batches through the reduction's exact accumulator — online
    rescaling for KL-DRO, or with a no-grad pre-pass (``prepare``) for the sets, group DRO and
    KL-DRO's ``prepass=True`` — give the whole batch's loss and gradients (C++ backend, float32,
    the tolerances above). Not for unpaired objectives (KTO's z₀ is the micro-batch's, as TRL's)
    nor those that sort the batch (AOT: their losses belong to no sample)."""
    case, want, paths = prepared(objective, n, monkeypatch)
    parts = [(0, case["b"] // 2), (case["b"] // 2, case["b"])]
    for path in paths:
        if want == REFUSED:
            with pytest.raises(ValueError, match=REFUSED):
                accumulate(case, path, parts, n)
            continue
        leaves, acc = accumulate(case, path, parts, n)
        assert_close((torch.tensor(acc.loss, dtype=torch.float64), grads_of(leaves)), want, 5e-5, 5e-5, path)


def accumulate(case, path, parts, n):
    """The case's micro-batches ``parts`` through the exact accumulator: ``(leaves, accumulator)``."""
    leaves = leaves_of(case, torch.float32, "cpu")
    loss_fn = make_loss(case, "cpp", path)
    acc = loss_fn.reduction.accumulator([x for x in leaves if x is not None], accumulation_steps=len(parts),
                                        prepass=n % 2 == 1)
    if getattr(acc, "needs_prepare", False):
        with torch.no_grad():
            seen = [call(loss_fn, case, path, leaves, torch.float32, "cpu", part) for part in parts]
        groups = None
        if case["reduction"].startswith("group dro"):
            groups = [group_ids(case, loss_fn)[lo:hi] for lo, hi in parts]
        acc.prepare([o.losses for o in seen], [o.weights for o in seen], groups)
    for part in parts:
        call(loss_fn, case, path, leaves, torch.float32, "cpu", part, accumulator=acc).loss.backward()
    return leaves, acc
