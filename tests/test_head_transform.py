"""The LM head's logit transform on the fused paths (robalign.ops.head): soft-cap (Gemma 2/3), a
logit scale (Cohere, Granite) and a temperature, z' = c·tanh(s·z/c)/T, against the float64
reference that materialises the transformed logits, on every kernel backend (Triton under the
interpreter), forward and every gradient, with holes, an all-ignored row, float32 and bfloat16;
and Hugging Face models that transform their logits, on the trainer's fused path.

Tolerances as in test_linear_backends: float32 1e-5 relative (the transform adds a few float32
roundings per logit, far below the matmul's); bfloat16 within twice the error of PyTorch doing the
same in bfloat16, as the models run it (the row kernels apply the transform in float32, so they are
nearer the float64 value than that).
"""

import pytest
import torch

import robalign
from robalign import ground_truth
from robalign.ops import linear, one_pass, shift_labels
from test_linear_backends import BACKENDS, assert_close, problem, ref_run, run

TRANSFORMS = [pytest.param(dict(logit_softcap=2.0), id="softcap"), pytest.param(dict(logit_scale=0.6), id="scale"),
              pytest.param(dict(logit_temperature=0.7), id="temperature"),
              pytest.param(dict(logit_softcap=1.5, logit_scale=1.3, logit_temperature=0.8), id="all")]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear, "chunk_tokens", lambda *args, **kwargs: 3)
    monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_float32_forward_and_all_gradients(backend, transform, small_chunks):
    args = problem(3, 7, 24, 1000, all_ignored=(1,))
    coeff = torch.tensor([2.5, -1.0, 0.5])
    got = run(backend, *args, coeff, **transform)
    assert got[0][1] == 0 and (got[2][1] == 0).all()
    want = ref_run(*args, coeff, **transform)
    assert_close(got, want)
    plain = ref_run(*args, coeff)
    assert (want[0] - plain[0]).abs().max() > 1e-2                   # the transform changes the result


KERNEL_TRANSFORMS = [pytest.param(dict(scale=0.7, softcap=2.0), id="softcap"),
                     pytest.param(dict(scale=1.0, softcap=30.0), id="gemma-cap"),
                     pytest.param(dict(scale=1.3, softcap=0.0), id="scale")]


def transformed_rows_reference(logits, labels, coeff, scale, cap):
    """The row kernels' contract in float64 autograd: ``(lse [N], target [N], grad [N, V])`` of the
    logits ``[B, T, V]`` transformed by ``cap·tanh(scale·z/cap)`` (``scale·z`` for ``cap`` 0), the
    gradient of ``Σ_n coeff_n·(target_n − lse_n)`` with respect to the raw logits; ignored rows
    (label −100) are 0."""
    n, v = labels.numel(), logits.shape[-1]
    z = logits.double().requires_grad_(True)
    zt = (cap * torch.tanh(scale * z / cap) if cap else scale * z).reshape(n, v)
    keep = labels != -100
    lse = torch.where(keep, torch.logsumexp(zt, -1), 0.0)
    target = torch.where(keep, zt.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    torch.where(keep, (target - lse) * coeff.double(), 0.0).nansum().backward()
    return lse.detach(), target.detach(), z.grad.reshape(n, v)


def _rows(backend):
    from robalign.ops.registry import get

    return get(backend[0]).load_rows()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", KERNEL_TRANSFORMS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_row_kernels_apply_the_transform(backend, transform, inplace):
    """The row kernels' own transform (what the fused paths hand them: raw logits, ``scale``,
    ``softcap``) on a strided ``[B, T, V]`` view with V one past a Triton block (a masked tail that
    must stay −inf after the transform), an ignored row, ±inf logits (finite once capped) and a NaN
    row: lse, label logit and the gradient with respect to the raw logits, against float64 autograd."""
    scale, cap = transform["scale"], transform["softcap"]
    gen = torch.Generator().manual_seed(3)
    v = 4097
    base = torch.randn(2, 4, v, generator=gen) * 6
    base[0, 1, 5], base[1, 0, 7] = float("inf"), -float("inf")
    logits = base[:, :-1]                                              # [2, 3, V], strided rows
    labels = torch.randint(v, (6,), generator=gen)
    labels[2] = -100
    if cap:
        logits[1, 2, 11] = float("nan")
    coeff = torch.randn(6, generator=gen)
    lse_want, tgt_want, want = transformed_rows_reference(logits, labels, coeff, scale, cap)
    keep = labels != -100

    name, device = backend
    rows = _rows(backend)
    x = logits.clone().to(device) if inplace else logits.to(device)
    lse, target, _ = rows.rows_lse_target(x, labels.to(device), -100, scale=scale, softcap=cap)
    out = x if inplace else torch.empty_like(x)
    rows.rows_softmax_grad(x, labels.to(device), lse, coeff.to(device), -100, out, scale=scale, softcap=cap)
    finite = torch.isfinite(lse_want)
    assert torch.equal(finite, torch.isfinite(lse.cpu())), "the same rows are finite"
    torch.testing.assert_close(lse.cpu().double()[finite], lse_want[finite], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.cpu().double()[finite], tgt_want[finite], rtol=1e-6, atol=1e-5)
    g = out.cpu().double().reshape(6, v)
    rows_ok = finite & keep
    torch.testing.assert_close(g[rows_ok], want[rows_ok], rtol=1e-5, atol=1e-6)
    assert (g[~keep] == 0).all()
    if cap:                                                            # a NaN logit: that row is NaN
        assert torch.isnan(lse[5]) and torch.isnan(g[5]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_twice_pytorch_error(backend, small_chunks):
    args = problem(3, 6, 32, 500, dtype=torch.bfloat16, all_ignored=(2,))
    coeff = torch.tensor([1.0, -2.0, 0.5])
    got, want = run(backend, *args, coeff, logit_softcap=3.0), ref_run(*args, coeff, logit_softcap=3.0)
    leaves = [x.detach().clone().requires_grad_(True) for x in args[:3]]
    labels = args[3]
    z = leaves[0] @ leaves[1].T + leaves[2]
    z = 3.0 * torch.tanh(z / 3.0)                                     # Gemma's order, in bfloat16
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    (tok.sum(-1) * coeff.to(z.dtype)).sum().backward()
    theirs = [tok.sum(-1).detach(), None, *[x.grad for x in leaves]]
    err = lambda a, b: (a.double() - b).norm().item()                # noqa: E731
    for i in (0, 2, 3, 4):
        assert err(got[i], want[i]) <= 2 * err(theirs[i], want[i]) + 1e-6, f"output {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_pass_", [True, False])
def test_dora_loss_one_pass_and_recompute_with_a_soft_cap(backend, one_pass_, small_chunks):
    """The one-pass fused loss and the recompute path with a soft-capped, scaled head equal the
    float64 reference (materialised transformed logits, the objective, KL-DRO, autograd)."""
    name, device = backend
    hidden, weight, bias, labels = problem(4, 5, 16, 97)
    ref = -torch.rand(4, dtype=torch.float64) * 10
    weights = torch.tensor([0.5, 1.5])
    kw = dict(logit_softcap=2.5, logit_scale=0.8)
    leaves = [x.detach().clone().to(device).requires_grad_(True) for x in (hidden, weight, bias)]
    out = robalign.DoRALoss("dpo", lam=0.5, backend=name, one_pass=one_pass_, **kw)(
        hidden=leaves[0], head_weight=leaves[1], head_bias=leaves[2], labels=labels.to(device),
        ref_logps=ref.float().to(device), weights=weights.to(device))
    out.loss.backward()
    assert (out.policy_logps.grad_fn is None) == one_pass_
    d = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    logps, _ = ground_truth.linear_sequence_logps(d[0], d[1], labels, bias=d[2], **kw)
    loss = ground_truth.kl_dro(ground_truth.objectives.dpo(logps.view(-1, 2), ref.view(-1, 2)), weights.double(), 0.5)
    loss.backward()
    torch.testing.assert_close(out.loss.double().cpu(), loss.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, d):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-5, atol=1e-5 * want.grad.abs().max().item())


def test_wpo_weights_see_the_transform():
    hidden, weight, _, labels = problem(2, 5, 8, 40, dtype=torch.float64, bias=False)
    from robalign.ops.head import HeadTransform
    from robalign.ops.wpo import wpo_weights

    transform = HeadTransform(softcap=2.0, temperature=0.9)
    z = 2.0 * torch.tanh(hidden @ weight.T / 2.0) / 0.9
    torch.testing.assert_close(wpo_weights(labels, hidden=hidden, head_weight=weight, transform=transform),
                               wpo_weights(labels, logits=z), rtol=1e-12, atol=0)


def test_bad_transforms_are_clear_errors():
    h, w, y = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    for kw, message in ((dict(logit_softcap=0.0), r"`logit_softcap` must lie in \(0, inf\)"),
                        (dict(logit_temperature=-1.0), "`logit_temperature`"),
                        (dict(logit_scale=float("inf")), "`logit_scale` must be finite")):
        with pytest.raises(ValueError, match=message):
            robalign.linear_sequence_logps(h, w, y, **kw)
    with pytest.raises(ValueError, match="the head transform .* applies to hidden states"):
        robalign.DoRALoss("dpo", logit_softcap=30.0)(logits=torch.randn(2, 3, 5), labels=y, ref_logps=torch.zeros(2))


def _tiny(kind):
    import transformers

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    config = {"gemma2": lambda: transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **common),
              "cohere": lambda: transformers.CohereConfig(logit_scale=0.3, **common),
              "granite": lambda: transformers.GraniteConfig(logits_scaling=4.0, **common)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).double()


@pytest.mark.parametrize("kind,expected", [("gemma2", dict(softcap=0.5)), ("cohere", dict(scale=0.3)),
                                           ("granite", dict(scale=0.25))])
def test_models_that_transform_their_logits_keep_the_fused_path(kind, expected):
    """Gemma 2's soft-cap, Cohere's logit scale and Granite's logits scaling are read from the
    config; the trainer's fused log-probs (and the one-pass loss's gradient) equal those of the
    model's own logits to 1e-12 in float64."""
    from robalign.app.training.causal_lm import _plain_logits, head_transform, one_pass_loss, policy_logps
    from robalign.ops.head import HeadTransform

    model = _tiny(kind)
    assert head_transform(model) == HeadTransform(**expected) and not _plain_logits(model, True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 7), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    fused, _ = policy_logps(model, batch, fused=True)
    y = shift_labels(labels)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    tok = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)
    torch.testing.assert_close(fused, tok.sum(1), rtol=1e-12, atol=1e-12)

    ref = tok.sum(1).detach() + torch.randn(4, generator=gen, dtype=torch.float64)
    t = head_transform(model)
    loss_fn = robalign.FusedLinearDoRALoss("dpo", robalign.KLDRO(1.0), head=t)
    out = one_pass_loss(model, dict(batch, ref_logps=ref), loss_fn)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    want = ground_truth.kl_dro(ground_truth.objectives.dpo(tok.sum(1).view(-1, 2), ref.view(-1, 2)), None, 1.0)
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss.double(), want.double(), rtol=1e-6, atol=0)    # one-pass value: float32
    for g, w in zip(grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [dict(logit_temperature=1e-6), dict(logit_temperature=1e-2),
                                       dict(logit_scale=1e4), dict(logit_softcap=50.0, logit_scale=30.0)],
                         ids=["T=1e-6", "T=1e-2", "scale=1e4", "softcap-50-scale-30"])
@pytest.mark.parametrize("one_pass_", [True, False], ids=["one-pass", "recompute"])
def test_transforms_that_magnify_the_logits_keep_float32s_digits(backend, transform, one_pass_):
    """|z'| ~ 1e6: the backward must form z' exactly as the forward did, or the exponent z' − lse is
    |z'|·2⁻²⁴ off (the C++ kernels' compiler fused scale·z − lse into one multiply-add: the hidden
    gradient was 2.4e-2 off at T = 1e-6 there, 8e-8 on the other backends). Against float64, the
    relative error of the whole gradient (its norm) within 1e-6: float32's few roundings per logit."""
    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(4, 6, 8, generator=gen), torch.randn(40, 8, generator=gen) * 0.3
    labels = torch.randint(40, (4, 6), generator=gen)
    labels[:, :2] = -100
    refs = torch.randn(4, generator=gen) - 10
    name, device = backend
    grads = []
    for kernel, dtype, one, where in (("reference", torch.float64, False, "cpu"), (name, torch.float32, one_pass_, device)):
        h = hidden.to(where, dtype).requires_grad_(True)
        out = robalign.DoRALoss("ipo", beta=0.1, lam=float("inf"), backend=kernel, one_pass=one, **transform)(
            hidden=h, head_weight=head.to(where, dtype), labels=labels.to(where), ref_logps=refs.to(where, dtype))
        out.loss.backward()
        grads.append(h.grad.double().cpu())
    want, got = grads
    assert float((got - want).norm() / want.norm()) < 1e-6
