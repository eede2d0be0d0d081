"""The blocks of results the one-pass loss hands out, reused once the caller drops them
(robalign.ops.workspace.recycled): never a block anything still holds, never a view (autograd takes
it as ``.grad`` without a copy), never tied to a Python storage object (autograd adds another
gradient into it in place), never for a head tied to the input embedding, and the same values as a
fresh block, call after call."""

from __future__ import annotations

import threading

import pytest
import torch

import robalign
from robalign.ops import one_pass, registry, workspace

CPU = torch.device("cpu")
CPP = registry.get("cpp").missing(CPU) is None
needs_cpp = pytest.mark.skipif(not CPP, reason="recycling counts a block's holders in the C++ backend")


def _rows():
    from robalign.ops import cpu

    return cpu


@pytest.fixture(autouse=True)
def _fresh():
    workspace.release()
    yield
    workspace.release()


@needs_cpp
def test_a_dropped_block_is_reused_and_a_held_one_never():
    a = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)
    a_ptr = a.data_ptr()
    b = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)         # `a` is held: a block of its own
    assert b.data_ptr() != a_ptr
    b_ptr = b.data_ptr()
    del b
    c = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)         # `b` was dropped: its block again
    assert c.data_ptr() == b_ptr
    assert not c._is_view() and c.is_contiguous() and c.shape == (4, 5)
    view = c[1:]
    del c
    d = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)         # a view of it still holds the block
    assert d.data_ptr() != b_ptr
    del view


@needs_cpp
def test_another_shape_dtype_or_name_is_another_block():
    a = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)
    ptr = a.data_ptr()
    del a
    b = workspace.recycled(_rows(), "x", (4, 5), torch.bfloat16, CPU)        # another dtype: another block
    assert b.dtype == torch.bfloat16 and b.shape == (4, 5)
    c = workspace.recycled(_rows(), "y", (4, 5), torch.float32, CPU)
    assert c.data_ptr() != ptr and c.data_ptr() != b.data_ptr()
    b_ptr = b.data_ptr()
    del b
    d = workspace.recycled(_rows(), "x", (10, 2), torch.bfloat16, CPU)       # the same bytes, another shape
    assert d.shape == (10, 2) and d.is_contiguous() and not d._is_view()
    assert workspace._RECYCLED.x.shape == (10, 2)                             # it replaced b's block
    del d
    e = workspace.recycled(_rows(), "x", (10, 2), torch.bfloat16, CPU)
    assert e.data_ptr() == workspace._RECYCLED.x.data_ptr() and b_ptr is not None


@needs_cpp
def test_release_and_the_switch_forget_the_blocks(monkeypatch):
    workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)
    assert getattr(workspace._RECYCLED, "x", None) is not None
    workspace.release()
    assert getattr(workspace._RECYCLED, "x", None) is None
    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")
    t = workspace.recycled(_rows(), "x", (4, 5), torch.float32, CPU)
    assert t.shape == (4, 5) and getattr(workspace._RECYCLED, "x", None) is None


def test_without_the_cpp_count_nothing_is_kept():
    """The torch backend's row kernels have no holder count: a fresh block each call, none kept."""
    import types

    rows = types.SimpleNamespace()
    a = workspace.recycled(rows, "x", (64, 64), torch.float32, CPU)
    assert a.shape == (64, 64) and _kept() == []
    keep = [workspace.recycled(rows, "x", (64, 64), torch.float32, CPU) for _ in range(3)]
    assert len({t.data_ptr() for t in keep + [a]}) == 4 and _kept() == []


@needs_cpp
def test_a_released_block_takes_a_tied_gradient_in_place():
    """Autograd adds a second gradient of the same tensor (a tied embedding's) into the first in
    place only where nothing else holds its storage — a Python storage object made once for it
    would, for good. A recycled block handed to autograd, once ``release`` dropped the thread's
    reference (as the trainers do before the backward), is summed into in place and becomes
    ``.grad``; while the block is kept it is summed out of place, and the sum is right either way."""
    def run(keep):
        made = {}

        class Formed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, w):
                ctx.g = workspace.recycled(_rows(), "x", w.shape, w.dtype, CPU).fill_(1.0)
                made["ptr"] = ctx.g.data_ptr()
                return w.sum()

            @staticmethod
            def backward(ctx, grad_out):
                g, ctx.g = ctx.g, None
                return g

        w = torch.zeros(50, 8, requires_grad=True)
        looked_up = torch.nn.functional.embedding(torch.tensor([1, 2, 2]), w)      # first, as in a model:
        loss = Formed.apply(w) + looked_up.sum()                # the head's backward runs before its own
        if not keep:
            workspace.release()
        loss.backward()
        want = torch.ones(50, 8)
        want[1] += 1
        want[2] += 2
        assert torch.equal(w.grad, want)
        return w.grad.data_ptr() == made["ptr"]

    assert run(keep=False), "the released block was not summed into in place"
    workspace.release()
    assert not run(keep=True)


def _loss_fn(backend):
    return robalign.FusedLinearDoRALoss(robalign.Objective("dpo", beta=0.1), robalign.KLDRO(1.0),
                                        robalign.DoRAWeights(0.25), params=robalign.LossParams(backend=backend))


def _problem(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, 24, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(37, 24, generator=g) / 5).to(dtype).requires_grad_(True)
    labels = torch.randint(37, (4, 9), generator=g)
    labels[:, :2] = -100
    labels[3] = -100                                                  # an all-ignored row
    return hidden, weight, labels, torch.randn(4, generator=g) - 30, torch.rand(2, 1, generator=g).expand(-1, 2)


def _backends():
    return [b for b in ("cpp", "torch") if registry.get(b).missing(CPU) is None]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,chunk", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 7)],
                         ids=["float32", "bfloat16-one-chunk", "bfloat16-float32-buffer"])
def test_held_gradients_keep_their_values_and_match_fresh_blocks(backend, dtype, chunk, monkeypatch):
    """Three calls on different inputs; the first two calls' gradients are held while the next runs,
    the second is dropped before the third, whose head gradient then takes its block (float32; with
    the C++ backend bfloat16 too, narrowed in place in one chunk, from the float32 buffer into a
    recycled block in several; the torch backend keeps none). Each equals, bit for bit, the same call
    with fresh blocks (``ROBALIGN_KEEP_WORKSPACE=0``)."""
    if chunk is not None:                                             # several chunks: the float32 buffer
        monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: chunk)
    fn = _loss_fn(backend)

    def grads(seed):
        hidden, weight, labels, ref, probs = _problem(dtype, seed)
        loss = fn(hidden, weight, labels, ref, probs=probs).loss
        return torch.autograd.grad(loss, (hidden, weight))

    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")
    want = [tuple(g.clone() for g in grads(seed)) for seed in range(3)]
    monkeypatch.delenv("ROBALIGN_KEEP_WORKSPACE")
    first = grads(0)
    second = grads(1)
    second_ptr = second[1].data_ptr()
    _equal(first, want[0])
    _equal(second, want[1])
    del second
    third = grads(2)
    if backend == "cpp":
        assert third[1].data_ptr() == second_ptr, "the dropped head gradient's block is reused"
    else:                                             # no holder count in the torch backend: none kept
        assert _kept() == []
    _equal(first, want[0])
    _equal(third, want[2])


def _kept() -> list:
    return [st for st in vars(workspace._RECYCLED).values() if st is not None]


def _equal(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype,chunk",
                         [(b, torch.float32, None) for b in _backends()] +
                         [("cpp", torch.bfloat16, None), ("cpp", torch.bfloat16, 7)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_backward_into_grad_across_steps(backend, dtype, chunk, set_to_none, monkeypatch):
    """A training loop: ``backward`` puts the head gradient into ``weight.grad``, taken as it is when
    ``.grad`` is None (then its block is kept, to be recycled once ``zero_grad`` drops it), added
    when ``.grad`` exists (then its block is dropped inside the backward and not kept; a half-precision
    head's float32 buffer never is). Every step's ``.grad`` equals the fresh blocks' run."""
    if "cpp" in backend and registry.get("cpp").missing(CPU) is not None:
        pytest.skip("needs the C++ backend")
    if chunk is not None:
        monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: chunk)
    hidden, weight, labels, ref, probs = _problem(dtype, 7)
    fn = _loss_fn(backend)

    def steps(recycling):
        out = []
        weight.grad = None
        for step in range(3):
            fn(hidden, weight, labels, ref, probs=probs).loss.backward()
            kept = _kept()
            if not recycling or backend != "cpp" or (step and not set_to_none):   # added into .grad: not kept
                assert kept == []
            else:                                                     # taken as .grad: kept
                assert [st.data_ptr() for st in kept] == [weight.grad.data_ptr()]
            out.append(weight.grad.clone())
            if set_to_none:
                weight.grad = None
        return out

    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")
    want = steps(recycling=False)
    monkeypatch.delenv("ROBALIGN_KEEP_WORKSPACE")
    got = steps(recycling=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if not set_to_none and dtype == torch.float32:
        torch.testing.assert_close(got[2], 3 * got[0], rtol=1e-6, atol=1e-7)


def test_a_frozen_head_keeps_no_block():
    """Without the head's gradient (a frozen head) no block is made or kept."""
    hidden, weight, labels, ref, probs = _problem(torch.float32, 3)
    weight.requires_grad_(False)
    loss = _loss_fn(_backends()[0])(hidden, weight, labels, ref, probs=probs).loss
    torch.autograd.grad(loss, hidden)
    assert _kept() == []


def test_threads_keep_their_own_blocks(monkeypatch):
    """Two threads calling the loss at once, each holding every gradient it got: no block is handed
    out twice, and every gradient equals the single-threaded run on fresh blocks."""
    backend = _backends()[0]
    fn = _loss_fn(backend)

    def grads(seed):
        hidden, weight, labels, ref, probs = _problem(torch.float32, seed)
        loss = fn(hidden, weight, labels, ref, probs=probs).loss
        return torch.autograd.grad(loss, (hidden, weight))

    seeds = {0: [10, 11, 12], 1: [20, 21, 22]}
    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")
    want = {s: tuple(g.clone() for g in grads(s)) for ss in seeds.values() for s in ss}
    monkeypatch.delenv("ROBALIGN_KEEP_WORKSPACE")
    got, errors = {}, []

    def run(t):
        try:
            held = [grads(s) for s in seeds[t]]             # all held: three blocks of this thread's own
            for s, g in zip(seeds[t], held):
                got[s] = g
            workspace.release()
        except Exception as e:                             # surfaced below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in seeds]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len({g[1].data_ptr() for g in got.values()}) == len(got), "a held block was handed out twice"
    for s, g in got.items():
        _equal(g, want[s])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_head_tied_to_the_input_embedding_gets_a_fresh_block(dtype, monkeypatch):
    """A head that is also the input embedding (SmolLM, Qwen2.5-0.5B) gets two gradients, which
    autograd sums in place only in a block nothing else holds: its gradient is formed in a fresh
    block, none is kept, and ``.grad`` is the fresh-block run's, bit for bit. An untied head of the
    same call keeps its block (the control)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(37, (4, 9), generator=g)
    labels = torch.randint(37, (4, 9), generator=g)
    labels[:, :2] = -100
    ref, probs = torch.randn(4, generator=g) - 30, torch.rand(2, 1, generator=g).expand(-1, 2)
    fn = _loss_fn("cpp")

    def grad(tied):
        weight = (torch.randn(37, 24, generator=torch.Generator().manual_seed(6)) / 5).to(dtype).requires_grad_(True)
        table = weight if tied else weight.detach().clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(ids, table))
        loss = fn(hidden, weight, labels, ref, probs=probs).loss
        kept_in_forward = _kept()
        loss.backward()
        return weight.grad, kept_in_forward

    monkeypatch.setenv("ROBALIGN_KEEP_WORKSPACE", "0")
    want = grad(tied=True)[0]
    monkeypatch.delenv("ROBALIGN_KEEP_WORKSPACE")
    got, kept = grad(tied=True)
    assert kept == [] and _kept() == []
    _equal([got], [want])
    untied, kept = grad(tied=False)
    assert len(kept) == 1
