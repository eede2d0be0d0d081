"""``torch.compile`` of a DoRALoss step across its configurations, on CPU with the C++ backend (a
Triton op is traced only on a GPU: ``tests/test_logits_backends.py`` runs that one there).

What is one graph (``fullgraph=True``) — the KL-DRO family, the accumulator, group DRO, every path
into the ops — must stay one under both version sets (``make test-gpu-versions``: torch 2.11's
Dynamo refused a step that torch 2.13's took). What reads values on the host by design compiles
with graph breaks: the ambiguity sets solve for their dual on the host, and WPO's weights come from
a chunked pass over the scored tokens. Every compiled step gives the eager loss and gradients.
"""

import pytest
import torch

import robalign
from robalign import (KLDRO, BatchExtras, CVaR, Chi2Ball, DoRAWeights, FusedLinearDoRALoss, GroupDRO, HeadTransform,
                      KLBall, KLDROAccumulator, LossParams)

pytestmark = pytest.mark.slow

S, T, V, H = 8, 5, 33, 12
GROUP_IDS = torch.tensor([0, 1, 0, 1])


def batch():
    """Hidden states and a head for S = 8 sequences (4 pairs): a 2-token prompt everywhere, one
    all-ignored row, reference log-probs, DoRA probabilities and scores."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(V, (S, T), generator=gen)
    labels[:, :2] = -100
    labels[5] = -100
    return dict(hidden=torch.randn(S, T, H, generator=gen), weight=torch.randn(V, H, generator=gen) / 4,
                labels=labels, ref_logps=torch.randn(S, generator=gen), probs=torch.rand(S, generator=gen),
                scores=torch.randn(S, generator=gen))


def loss(objective="dpo", backend="cpp", reduction=None, alpha=None, softcap=None, logits=False, **params):
    """A maker of fresh losses (and of a fresh ``reduction()``: group DRO keeps state across steps):
    a FusedLinearDoRALoss, or with ``logits`` a DoRALoss."""
    def make():
        args = (objective, reduction and reduction(), alpha and DoRAWeights(alpha))
        if logits:
            return robalign.DoRALoss(*args, LossParams(backend=backend, **params))
        return FusedLinearDoRALoss(*args, HeadTransform(softcap=softcap), LossParams(backend=backend, **params))
    return make


# name: (a fresh loss, the batch's extra inputs, logits instead of hidden states, an accumulator)
ONE_GRAPH = {
    "one-pass, a mixture, DoRA weights": (loss("dpo+0.5*sft", alpha=0.3), ("probs",), False, False),
    "one-pass, reference-free, weighted mean": (loss("simpo", reduction=lambda: KLDRO(float("inf"))), (), False, False),
    "one-pass, soft minimum, soft-capped head": (loss(reduction=lambda: KLDRO(-0.5), softcap=3.0), (), False, False),
    "one-pass, exact accumulator": (loss(reduction=lambda: KLDRO(0.7)), (), False, True),
    "recompute path, exact accumulator": (loss(reduction=lambda: KLDRO(0.7), one_pass=False), (), False, True),
    "logits path, listwise with scores": (loss("plackett_luce", group_size=4, logits=True), ("scores",), True, False),
    "group DRO": (loss(reduction=lambda: GroupDRO(2, 0.1)), ("group_ids",), False, False),
    "chunked PyTorch backend": (loss(backend="torch", alpha=0.3), ("probs",), False, False),
}
GRAPH_BREAKS = {
    "KL ball": (loss(reduction=lambda: KLBall(0.5)), (), False, False),
    "chi-square ball": (loss(reduction=lambda: Chi2Ball(0.5)), (), False, False),
    "CVaR": (loss(reduction=lambda: CVaR(0.3)), (), False, False),
    "WPO weights": (loss(wpo=True), (), False, False),
}


def run(case, compiled, fullgraph):
    """The loss and the gradients of hidden states and head of one step of ``case``."""
    make, extra, from_logits, with_acc = case
    b = batch()
    loss_fn = make()
    inputs = {name: GROUP_IDS if name == "group_ids" else b[name] for name in extra}
    probs = inputs.pop("probs", None)
    if with_acc:
        inputs["accumulator"] = KLDROAccumulator([torch.nn.Parameter(torch.zeros(()))], lam=0.7)

    def step(h, w):
        extras = BatchExtras(**inputs)
        if from_logits:
            return loss_fn(h @ w.T, b["labels"], b["ref_logps"], probs=probs, extras=extras).loss
        return loss_fn(h, w, b["labels"], b["ref_logps"], probs=probs, extras=extras).loss

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=fullgraph, backend="aot_eager")
    h, w = b["hidden"].requires_grad_(True), b["weight"].requires_grad_(True)
    value = step(h, w)
    (2.0 * value).backward()
    return value.detach(), h.grad, w.grad


def assert_compiled_equals_eager(case, fullgraph):
    # aot_eager runs the traced float32 ATen ops (the kernel op opaque, as in eager): the same
    # arithmetic up to the order of a few sums, hence 1e-6 and not 0
    for got, want in zip(run(case, True, fullgraph), run(case, False, fullgraph)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ONE_GRAPH)
def test_one_graph(name):
    assert_compiled_equals_eager(ONE_GRAPH[name], fullgraph=True)


@pytest.mark.parametrize("name", GRAPH_BREAKS)
def test_with_graph_breaks(name):
    assert_compiled_equals_eager(GRAPH_BREAKS[name], fullgraph=False)


def test_what_reads_the_host_is_not_one_graph():
    """The graph-break cases do break the graph: were one of them to trace whole, it belongs in
    ONE_GRAPH (and the docs' list of what compiles as one graph, docs/kernels.md)."""
    for name, case in GRAPH_BREAKS.items():
        with pytest.raises(Exception, match="data-dependent"):
            run(case, True, fullgraph=True)


def test_losses_with_other_lambdas_compile_one_after_another():
    """Dynamo turns a float that changed between two compiles of the same code into a SymFloat: a
    second DoRALoss with another λ (and the functional kl_dro) must still be one graph (the λ check
    called math.isnan on it: `torch.* op returned non-Tensor` before). No reset between them."""
    b = batch()
    torch._dynamo.reset()
    for lam in (1.0, 0.5, -2.0, float("inf"), 3e-201):
        loss_fn = FusedLinearDoRALoss("dpo", KLDRO(lam), params=LossParams(backend="cpp"))

        def step(h, w):
            return loss_fn(h, w, b["labels"], b["ref_logps"]).loss

        got = torch.compile(step, fullgraph=True, backend="aot_eager")(b["hidden"], b["weight"])
        torch.testing.assert_close(got, step(b["hidden"], b["weight"]), rtol=1e-6, atol=1e-6)
        losses = b["scores"].abs()
        got = torch.compile(lambda x: robalign.kl_dro(x, lam=lam), fullgraph=True, backend="aot_eager")(losses)
        torch.testing.assert_close(got, robalign.kl_dro(losses, lam=lam), rtol=1e-6, atol=1e-6)


def test_flat_arguments_still_compile_as_one_graph():
    """0.2's flat arguments warn in eager and stay one graph under torch.compile (a warning inside
    the compiled region would break it)."""
    b = batch()
    with pytest.warns(DeprecationWarning):
        loss_fn = robalign.DoRALoss("dpo", lam=0.5, backend="cpp")

    def step(h, w):
        return loss_fn(hidden=h, head_weight=w, labels=b["labels"], ref_logps=b["ref_logps"]).loss

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(b["hidden"], b["weight"])
    with pytest.warns(DeprecationWarning, match="FusedLinearDoRALoss"):
        want = step(b["hidden"], b["weight"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
