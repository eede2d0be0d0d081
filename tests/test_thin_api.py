"""The public surface: ``DoRALoss(objective, reduction, weighting, params)`` from log-probs or logits,
``FusedLinearDoRALoss`` / ``fused_linear_dora_loss`` from hidden states and the head, and the small
objects they take (Objective, DoRAWeights, HeadTransform, LossParams, BatchExtras).

Release 0.2's flat arguments run the same engine, so a flat loss and its new-surface twin must agree
**exactly** (the same float operations): checked on every path — logits, the recompute linear path
and the one-pass loss — for a grid of settings, loss and every gradient. The flat form warns once per
call with where each argument now lives.
"""

import inspect
import warnings

import pytest
import torch

import robalign
from robalign import (BatchExtras, DoRALoss, DoRAWeights, FusedLinearDoRALoss, HeadTransform, KLDRO, LossParams,
                      Objective)

V, H = 13, 6


def _batch(k=2, b=3, t=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s = b * k
    labels = torch.randint(V, (s, t), generator=gen)
    labels[:, :2] = -100
    labels[1, 3:] = -100                                        # one short response
    return dict(logits=torch.randn(s, t, V, generator=gen, dtype=dtype),
                hidden=torch.randn(s, t, H, generator=gen, dtype=dtype),
                weight=torch.randn(V, H, generator=gen, dtype=dtype) / 2,
                labels=labels, ref=-torch.rand(s, generator=gen, dtype=dtype) * 10,
                probs=torch.rand(s, generator=gen, dtype=dtype).clamp(0.05, 0.95),
                scores=torch.randn(s, generator=gen, dtype=dtype))


def _public_args(fn):
    return [n for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def test_the_surface_is_small():
    """The common call — objective, β, reduction, weights — in at most 6 constructor and 6 forward
    arguments, each named for what it is; the rare ones grouped in LossParams and BatchExtras."""
    assert _public_args(DoRALoss.__init__) == ["objective", "reduction", "weighting", "params"]
    assert _public_args(DoRALoss.forward) == ["logits", "labels", "ref_logps", "probs", "weights", "extras"]
    assert _public_args(DoRALoss.from_logps) == ["policy_logps", "counts", "ref_logps", "probs", "weights", "extras"]
    assert _public_args(FusedLinearDoRALoss.__init__) == ["objective", "reduction", "weighting", "head", "params"]
    assert _public_args(FusedLinearDoRALoss.forward) == ["hidden", "head_weight", "labels", "ref_logps", "probs",
                                                         "weights", "extras", "bias"]
    for name in ("DoRALoss", "FusedLinearDoRALoss", "fused_linear_dora_loss", "Objective", "DoRAWeights",
                 "LossParams", "BatchExtras", "HeadTransform", "KLDRO"):
        assert name in robalign.__all__ and getattr(robalign, name).__doc__


# (flat 0.2 arguments, the same loss on the new surface, the fused head transform)
CASES = [
    (dict(beta=0.3, lam=0.7, alpha=0.4),
     lambda: (Objective("dpo", beta=0.3), KLDRO(0.7), DoRAWeights(0.4), None), None),
    (dict(beta=0.2, lam=float("inf"), label_smoothing=0.1),
     lambda: (Objective("dpo", beta=0.2, label_smoothing=0.1), KLDRO(float("inf")), None, None), None),
    (dict(objective="ipo", beta=0.5, lam=2.0, alpha=0.3, synthetic_fraction=0.5, class_ratio=2.0, average_logps=True),
     lambda: (Objective("ipo", beta=0.5, average_logps=True), KLDRO(2.0), DoRAWeights(0.3, 0.5, 2.0), None), None),
    (dict(objective="plackett_luce", beta=0.1, lam=0.5, group_size=3, alpha=0.5),
     lambda: (Objective("plackett_luce"), KLDRO(0.5), DoRAWeights(0.5), LossParams(group_size=3)), None),
    (dict(beta=0.1, lam=1.0, ld_alpha=0.5, wpo=True),
     lambda: (Objective("dpo"), None, None, LossParams(ld_alpha=0.5, wpo=True)), None),
    (dict(objective="simpo", beta=2.0, gamma=0.5, lam=0.8, one_pass=False),
     lambda: (Objective("simpo", beta=2.0, gamma=0.5), KLDRO(0.8), None, LossParams(one_pass=False)), None),
    (dict(beta=0.1, lam=1.0, reference_free=True, logit_softcap=3.0, logit_temperature=0.7),
     lambda: (Objective("dpo"), KLDRO(1.0), None, LossParams(reference_free=True)),
     HeadTransform(softcap=3.0, temperature=0.7)),
]


def _inputs(flat, b):
    k = flat.get("group_size", 2)
    x = dict(ref=None if flat.get("reference_free") or flat.get("objective") == "simpo" else b["ref"])
    x["probs"] = b["probs"] if "alpha" in flat else None
    x["scores"] = b["scores"] if k > 2 else None
    return x


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_flat_arguments_and_the_new_surface_give_the_same_loss(case, path):
    flat, new, head = CASES[case]
    flat = dict(flat)
    if path == "logits" and head is not None:
        pytest.skip("a head transform applies to hidden states")
    k = flat.get("group_size", 2)
    b = _batch(k=k)
    x = _inputs(flat, b)
    extras = BatchExtras(scores=x["scores"]) if x["scores"] is not None else None
    results = []
    for surface in ("flat", "new"):
        src = (b["logits"] if path == "logits" else b["hidden"]).clone().requires_grad_(True)
        w = b["weight"].clone().requires_grad_(True)
        if surface == "flat":
            with pytest.warns(DeprecationWarning, match=r"flat arguments .* go away in 0.3"):
                loss_fn = DoRALoss(flat.pop("objective", "dpo"), **flat) if not results else None
            if path == "logits":
                kw = dict(logits=src)
            else:
                kw = dict(hidden=src, head_weight=w)
            with pytest.warns(DeprecationWarning) if (path == "hidden" or extras) else warnings.catch_warnings():
                out = loss_fn(labels=b["labels"], ref_logps=x["ref"], probs=x["probs"],
                              **({"scores": x["scores"]} if extras else {}), **kw)
        else:
            objective, reduction, weighting, params = new()
            if path == "logits":
                out = DoRALoss(objective, reduction, weighting, params)(src, b["labels"], x["ref"], probs=x["probs"],
                                                                       extras=extras)
            else:
                out = FusedLinearDoRALoss(objective, reduction, weighting, head, params)(
                    src, w, b["labels"], x["ref"], probs=x["probs"], extras=extras)
        out.loss.backward()
        results.append((out.loss.detach(), src.grad, None if path == "logits" else w.grad, out.losses.detach()))
    for got, want in zip(*results):
        if want is not None:
            assert torch.equal(got, want)


def test_the_fused_function_is_the_module():
    b = _batch()
    objective, reduction, weighting = Objective("dpo", beta=0.2), KLDRO(0.5), DoRAWeights(0.5)
    outs = []
    for call in ("module", "function"):
        h = b["hidden"].clone().requires_grad_(True)
        if call == "module":
            out = FusedLinearDoRALoss(objective, reduction, weighting)(h, b["weight"], b["labels"], b["ref"],
                                                                      probs=b["probs"])
        else:
            out = robalign.fused_linear_dora_loss(h, b["weight"], b["labels"], b["ref"], objective=objective,
                                                  reduction=reduction, weighting=weighting, probs=b["probs"])
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad))
    assert all(torch.equal(a, c) for a, c in zip(*outs))


def test_the_fused_loss_equals_materialised_logits_on_the_ground_truth():
    """The one-pass entry against plain logits = hidden @ Wᵀ through the float64 ground-truth backend."""
    b = _batch()
    h1, h2 = (b["hidden"].clone().requires_grad_(True) for _ in range(2))
    args = (Objective("dpo", beta=0.2), KLDRO(0.5), DoRAWeights(0.4))
    fused = FusedLinearDoRALoss(*args)(h1, b["weight"], b["labels"], b["ref"], probs=b["probs"])
    plain = DoRALoss(*args, LossParams(backend="reference"))(h2 @ b["weight"].T, b["labels"], b["ref"],
                                                             probs=b["probs"])
    fused.loss.backward()
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)


def test_the_warning_names_the_new_home_of_every_flat_argument():
    with pytest.warns(DeprecationWarning) as record:
        DoRALoss("dpo", beta=0.2, lam=0.5, alpha=0.3, label_smoothing=0.1, average_logps=True, group_size=2,
                 logit_softcap=3.0)
    text = str(record[0].message)
    for move in ("beta → Objective(name, beta=...)", "lam → reduction=KLDRO(lam)", "alpha → weighting=DoRAWeights",
                 "label_smoothing → Objective(name, label_smoothing=...)",
                 "average_logps → Objective(name, average_logps=True)", "group_size → params=LossParams(group_size",
                 "logit_softcap → FusedLinearDoRALoss(..., head=HeadTransform(softcap=...))"):
        assert move in text, move


def test_flat_forward_arguments_warn_and_mixing_them_with_extras_is_refused():
    b = _batch(k=3)
    loss_fn = DoRALoss("plackett_luce", KLDRO(1.0), params=LossParams(group_size=3))
    with pytest.warns(DeprecationWarning, match=r"scores → extras=BatchExtras\(scores=...\)"):
        loss_fn(logits=b["logits"], labels=b["labels"], ref_logps=b["ref"], scores=b["scores"])
    with pytest.raises(ValueError, match=r"\['scores'\] given twice"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss_fn(b["logits"], b["labels"], b["ref"], extras=BatchExtras(scores=b["scores"]), scores=b["scores"])
    with pytest.warns(DeprecationWarning, match=r"hidden, head_weight, head_bias → FusedLinearDoRALoss"):
        DoRALoss()(hidden=_batch()["hidden"], head_weight=b["weight"], labels=_batch()["labels"],
                   ref_logps=_batch()["ref"])
    with pytest.raises(ValueError, match=r"`extras.cu_seqlens` is an input of the logits"):
        DoRALoss().from_logps(b["ref"][:4], None, b["ref"][:4], extras=BatchExtras(cu_seqlens=torch.tensor([0, 1])))


@pytest.mark.parametrize("make, error, match", [
    (lambda: DoRALoss("dpo", 0.1), TypeError, r"`reduction` must be a .*Reduction, got float \(λ of KL-DRO: "
                                              r"reduction=robalign.KLDRO\(lam\); β belongs to the objective"),
    (lambda: DoRALoss("dpo", weighting=0.3), TypeError, r"`weighting` must be a robalign.DoRAWeights, got float"),
    (lambda: DoRALoss("dpo", params={"group_size": 2}), TypeError, r"`params` must be a robalign.LossParams"),
    (lambda: DoRALoss(3), TypeError, r"`objective` must be a robalign.Objective or a name, got int"),
    (lambda: DoRALoss()(torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), extras={"scores": 1}), TypeError,
     r"`extras` must be a robalign.BatchExtras, got dict"),
    (lambda: FusedLinearDoRALoss(head={"softcap": 30.0}), TypeError, r"`head` must be a robalign.HeadTransform"),
    (lambda: Objective("dpo", beta=0.1, gamma=1.0), TypeError, r"robalign.Objective: objective 'dpo' has no "
                                                                r"hyper-parameter \['gamma'\]"),
    (lambda: Objective("dpo", beta=-1.0), ValueError, r"robalign.Objective: `beta` must lie in \(0, inf\)"),
    (lambda: Objective("nope"), ValueError, r"robalign.Objective: `name`: unknown objective 'nope'"),
    (lambda: DoRAWeights(alpha=0.0), ValueError, r"robalign.DoRAWeights: `alpha` must lie in \(0, 1\]"),
    (lambda: DoRAWeights(0.5, class_ratio=float("inf")), ValueError, r"`class_ratio` must be finite"),
    (lambda: HeadTransform(softcap=-1.0), ValueError, r"robalign.HeadTransform: `softcap` must lie in \[0, inf\)"),
    (lambda: HeadTransform(scale=float("nan")), ValueError, r"robalign.HeadTransform: `scale`"),
    (lambda: DoRALoss("dpo", KLDRO(1.0), lam=1.0), ValueError, r"pass `lam` or `reduction`, not both"),
    (lambda: DoRALoss("dpo", weighting=DoRAWeights(0.5), alpha=0.5), ValueError, r"pass `weighting` or the flat"),
])
def test_wrong_objects_get_errors_that_name_the_argument(make, error, match):
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        make()


def test_the_small_objects():
    dpo = Objective("dpo")
    assert dpo.hparams == {"beta": 0.1} and dpo.beta == 0.1 and dpo == Objective("dpo", beta=0.1)
    assert repr(Objective("dpo", beta=0.2, average_logps=True)) == "Objective('dpo', average_logps=True, beta=0.2)"
    assert Objective("dpo", average_logps=True).name == "dpo/mean" and Objective("rrhf").beta is None
    assert Objective("dpo+0.5*sft").base == "dpo+0.5*sft"
    with pytest.raises(AttributeError, match="immutable"):
        dpo.name = "ipo"
    p = torch.rand(4, 2, dtype=torch.float64)
    torch.testing.assert_close(DoRAWeights(0.3, 0.5, 2.0)(p),
                               robalign.dora_weights(p, 0.3, 0.5, class_ratio=2.0).mean(-1), rtol=0, atol=0)
    assert HeadTransform(softcap=None) == HeadTransform() and HeadTransform().identity
    assert DoRALoss().reduction == KLDRO(1.0) and DoRALoss().objective == "dpo"
