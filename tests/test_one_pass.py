"""The one-pass fused loss (robalign.ops.one_pass) against the float64 reference and the recompute path.

The reference materialises the logits in float64, sums log-probs, applies the objective
(robalign.ground_truth.objectives) and the KL-DRO (robalign.ground_truth.kl_dro), and autograd gives the
gradients. Tolerances, float32: the loss and the three gradients within 1e-5 relative (plus
1e-5·scale absolute), as for the fused linear path (tests/test_linear_backends.py): the
chunk's logits come from a float32 matmul, the per-sequence sums are float64, the DRO
coefficients are formed in float64 and applied in float32. bfloat16: within twice the error of
PyTorch computing the same loss in bfloat16 (materialised logits, log_softmax, autograd).

Chunks are pinned through ``robalign.ops.one_pass.chunk_tokens``: one chunk for the whole batch,
two, or 3 tokens (smaller than a group, so every group takes the sub-chunk path).
"""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import robalign
from robalign import ground_truth
from robalign.losses.reductions import Reduction
from robalign.ops import one_pass
from robalign.ground_truth.objectives import OBJECTIVES
from conftest import backend_id, kernel_backends, packed_from_padded, run_on_gloo_ranks

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# every kernel backend of the registry, on this run's device (the CPU-only ones skipped on a GPU machine)
BACKENDS = [pytest.param(name, id=backend_id((name, dev)) if name != "torch" else "torch",
                         marks=pytest.mark.skipif(dev != DEVICE, reason=f"a {dev} backend"))
            for name, dev in kernel_backends()]
OBJECTIVE_K = {name: 1 if spec.unpaired else 2 if spec.pairwise else 3 for name, spec in OBJECTIVES.items()}
#: what the one-pass loss runs: every objective whose losses are per sample (AOT's sort the batch)
ONE_PASS_OBJECTIVES = sorted(name for name, spec in OBJECTIVES.items() if not spec.batch_coupled)
HPARAMS = {"dpo": {"beta": 0.5, "label_smoothing": 0.1}, "robust": {"beta": 0.5, "label_smoothing": 0.1},
           "simpo": {"beta": 2.0, "gamma": 0.3}, "rrhf": {"sft_weight": 0.7}, "lire": {"temperature": 1.5}}


def problem(objective, *, groups=4, t=5, h=12, v=37, dtype=torch.float32, bias=True, seed=0):
    k = OBJECTIVE_K[objective]
    s = groups * k
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    labels = torch.randint(v, (s, t), generator=gen)
    labels[:, :1] = -100                                             # a prompt token
    labels[torch.rand(s, t, generator=gen) < 0.25] = -100            # holes
    labels[min(1, s - 1)] = -100                                     # an all-ignored sequence (the only one of one)
    ref = -torch.rand(s, generator=gen, dtype=torch.float64) * 3 * t
    weights = torch.rand(groups, generator=gen, dtype=torch.float64) + 0.1
    cast = lambda x: None if x is None else x.to(dtype)
    p = dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), labels=labels, ref=ref.float(),
             weights=weights.float(), k=k)
    if OBJECTIVES[objective].unpaired:                  # labels 0/1; KTO's mismatched rows' log-probs
        p["scores"] = (torch.arange(s) % 3 != 1).float()
        p["kl"] = dict(kl_logps=-torch.rand(s, generator=gen) * 3 * t, kl_ref_logps=-torch.rand(s, generator=gen) * 3 * t)
    return p


def unpaired_inputs(p, objective, device="cpu"):
    """The labels (``scores``) of an unpaired problem, and KTO's mismatched rows."""
    if not OBJECTIVES[objective].unpaired:
        return {}
    extra = {"scores": p["scores"].to(device)}
    if OBJECTIVES[objective].kl_reference:
        extra.update({k: v.to(device) for k, v in p["kl"].items()})
    return extra


def loss_fn(objective, lam, k, backend, **kw):
    hp = {n: v for n, v in HPARAMS.get(objective, {}).items() if n in OBJECTIVES[objective].params}
    if "beta" in hp:
        kw["beta"] = hp.pop("beta")
    return robalign.DoRALoss(objective, lam=lam, group_size=k, backend=backend, **hp, **kw)


def run(p, objective, lam, backend, *, one_pass_=True, device=DEVICE, cu_seqlens=None, **kw):
    leaves = [None if p[n] is None else p[n].detach().clone().to(device).requires_grad_(True)
              for n in ("hidden", "weight", "bias")]
    fn = loss_fn(objective, lam, p["k"], backend, one_pass=one_pass_, **kw)
    out = fn(hidden=leaves[0], head_weight=leaves[1], head_bias=leaves[2], labels=p["labels"].to(device),
             ref_logps=p["ref"].to(device), weights=p["weights"].to(device),
             cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device), **unpaired_inputs(p, objective, device))
    (1.5 * out.loss).backward()
    return [out.loss.detach().cpu(), *[None if x is None else x.grad.cpu() for x in leaves]], out


def reference_run(p, objective, lam, cu_seqlens=None):
    d = lambda x: None if x is None else x.detach().double().clone().requires_grad_(True)
    h, w, b = d(p["hidden"]), d(p["weight"]), d(p["bias"])
    logps, counts = ground_truth.linear_sequence_logps(h, w, p["labels"], bias=b, cu_seqlens=cu_seqlens)
    k = p["k"]
    hp = {n: v for n, v in HPARAMS.get(objective, {}).items() if n in OBJECTIVES[objective].params}
    extra = unpaired_inputs(p, objective)
    if "kl_logps" in extra:               # z₀ = max(0, mean(kl_logps − kl_ref_logps)), as written
        hp["kl"] = (extra.pop("kl_logps").double() - extra.pop("kl_ref_logps").double()).mean().clamp(min=0)
    scores = extra.get("scores")
    losses = OBJECTIVES[objective].fn(logps.view(-1, k), p["ref"].double().view(-1, k), counts=counts.view(-1, k),
                                      scores=None if scores is None else scores.double().view(-1, k), **hp)
    loss = ground_truth.kl_dro(losses, p["weights"].double(), lam)
    (1.5 * loss).backward()
    return [loss.detach(), h.grad, w.grad, None if b is None else b.grad]


def assert_close(got, want, rtol=1e-5):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"output {i}: {m}")


CHUNKS = {"one": 10 ** 6, "two": 20, "many": 3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ONE_PASS_OBJECTIVES)
def test_every_objective_matches_the_reference(backend, objective, chunks):
    chunks(CHUNKS["many"])
    p = problem(objective)
    got, out = run(p, objective, 1.0, backend)
    assert out.policy_logps.grad_fn is None                         # the one-pass path ran
    assert_close(got, reference_run(p, objective, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunking", sorted(CHUNKS))
@pytest.mark.parametrize("lam", [1.0, 0.05, float("inf"), -0.5])
def test_chunkings_and_temperatures(backend, chunking, lam, chunks):
    chunks(CHUNKS[chunking])
    p = problem("dpo", groups=6)
    got, _ = run(p, "dpo", lam, backend)
    assert_close(got, reference_run(p, "dpo", lam))
    chunks(10 ** 6)
    assert_close(got, run(p, "dpo", lam, backend, one_pass_=False)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_later_chunk_raises_the_maximum(backend, chunks):
    """The last group's loss is by far the largest, so the running maximum grows at the last chunk
    and everything accumulated before is rescaled (checked: the first chunk's max is not the final)."""
    chunks(8)
    p = problem("dpo", groups=5)
    p["ref"][-2] = 40.0                                              # chosen far below the reference
    got, out = run(p, "dpo", 0.2, backend)
    a = out.weights * out.losses / 0.2
    assert a[0] < a.max() - 5
    assert_close(got, reference_run(p, "dpo", 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.2, -0.5, float("inf")])
@pytest.mark.parametrize("empty", [4, 5], ids=["then-a-chunk", "last"])
def test_groups_without_scored_tokens(backend, lam, empty, chunks):
    """Groups with no scored token have a loss (their log-probs are 0) but no gradient; group
    ``empty`` has the largest w·ℓ/λ, in a chunk of its own, so the maximum grows at a chunk that
    adds nothing to the gradients: the rescaling of the head's gradients waits for the next chunk
    that does — or, when that group is the last (every candidate of the batch's last prompt
    truncated away), happens after the loop."""
    chunks(3)
    p = problem("dpo", groups=6)
    for g in (2, empty):
        p["labels"][2 * g:2 * g + 2] = -100
    if lam > 0:
        p["ref"][2 * empty] = 40.0                                      # chosen far below the reference
    else:
        p["weights"][empty] = 1e-3                                      # w·ℓ ≈ 0, the others > 0
    group_tokens = (p["labels"] != -100).sum(1).view(6, 2).sum(1).tolist()
    assert (empty, empty + 1) in one_pass.plan_chunks(group_tokens, 3)     # a chunk of its own
    got, out = run(p, "dpo", lam, backend)
    if math.isfinite(lam):
        assert (out.weights * out.losses / lam).argmax() == empty
    assert_close(got, reference_run(p, "dpo", lam))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_input(backend, chunks):
    chunks(4)
    p = problem("plackett_luce", groups=2, t=6)
    h, y, cu = packed_from_padded(p["hidden"], p["labels"], [6, 0, 3, 5, 6, 2])
    packed = dict(p, hidden=h, labels=y)
    got, _ = run(packed, "plackett_luce", 0.5, backend, cu_seqlens=cu)
    assert_close(got, reference_run(packed, "plackett_luce", 0.5, cu_seqlens=cu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_no_bias(backend, chunks):
    chunks(5)
    p = problem("dpo", bias=False)
    h = p["hidden"].clone().to(DEVICE).requires_grad_(True)
    out = loss_fn("dpo", 1.0, 2, backend)(hidden=h, head_weight=p["weight"].to(DEVICE), labels=p["labels"].to(DEVICE),
                                           ref_logps=p["ref"].to(DEVICE), weights=p["weights"].to(DEVICE))
    (1.5 * out.loss).backward()
    want = reference_run(p, "dpo", 1.0)
    assert_close([out.loss.detach().cpu(), h.grad.cpu()], want[:2])


def bf16_pytorch_run(p, objective, lam):
    """PyTorch in bfloat16: materialised logits, log_softmax, the objective, KL-DRO, autograd."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (p["hidden"], p["weight"], p["bias"])]
    z = leaves[0] @ leaves[1].T + leaves[2]
    labels = p["labels"]
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    k = p["k"]
    losses = OBJECTIVES[objective].fn(tok.sum(-1).view(-1, k), p["ref"].to(z.dtype).view(-1, k),
                                      counts=(labels != -100).sum(-1).view(-1, k), scores=None)
    loss = ground_truth.kl_dro(losses, p["weights"].to(z.dtype), lam)
    (1.5 * loss).backward()
    return [loss.detach(), *[x.grad for x in leaves]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp32_head_grad", [True, False])
def test_bfloat16_within_twice_pytorch_error(backend, fp32_head_grad, chunks):
    chunks(7)
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16)
    p["weights"] = p["weights"].bfloat16().float()                    # the same weights in both
    got, _ = run(p, "dpo", 1.0, backend, fp32_head_grad=fp32_head_grad)
    assert got[2].dtype == torch.bfloat16
    want = reference_run(p, "dpo", 1.0)
    theirs = bf16_pytorch_run(p, "dpo", 1.0)
    err = lambda a, b: (a.double() - b).norm().item()
    for i in range(4):
        assert err(got[i], want[i]) <= 2 * err(theirs[i], want[i]) + 1e-6, f"output {i}"


def test_one_chunk_half_head_gradient_is_the_float32_buffers_bit_for_bit(chunks, monkeypatch):
    """bfloat16 on CPU, every token in one chunk: grad_W is formed by one GEMM in bfloat16 and scaled in
    place — bit for bit what the float32 buffer gave with the product formed in bfloat16 then added
    (rounded once, widened, scaled in float32, rounded once); the other outputs do not change either.
    (MKL's GEMM into the float32 buffer, ``gemm_into_``, skips the first rounding: see
    test_head_gradient_added_by_mkl_in_float32_is_closer_to_float64; the backward's scaling inside that
    GEMM, which leaves one rounding: tests/test_deferred_product.py.)"""
    from robalign.ops import cpu

    monkeypatch.setattr(one_pass, "_defers", lambda *a: False)
    chunks(10 ** 6)
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16)
    got, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    monkeypatch.setattr(one_pass, "_grad_weight_dtype", lambda weight, *args: torch.float32)
    monkeypatch.setattr(cpu, "gemm_into_", lambda *args: False)
    want, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output {i}"


def test_float16_head_gradient_summed_beyond_float16_range_stays_finite(chunks, monkeypatch):
    """float16 on CPU, every token in one chunk: the unscaled head gradient (a sum over the batch's
    tokens) can leave float16's range where the scaled one does not — here one hidden unit of 60000
    on every chosen token, all labels the same, no logit depending on that unit — so it is summed in
    the float32 buffer, scaled, then rounded: finite, and within 1e-2 of float64 relative to the
    largest entry (float16's half-ulp 2⁻¹¹, a few roundings). Formed by one float16 GEMM (as a
    bfloat16 head, with float32's range, is) the same gradient overflows."""
    chunks(10 ** 6)
    p = problem("dpo", groups=4, t=20, h=16, v=50, dtype=torch.float64, bias=False, seed=4)
    p["hidden"] = p["hidden"] * 0.1
    p["hidden"][0::2, :, 0] = 60000.0                               # the chosen sequences
    p["weight"][:, 0] = 0.0
    p["labels"] = torch.where(p["labels"] == -100, p["labels"], torch.full_like(p["labels"], 7))
    half = dict(p, hidden=p["hidden"].half(), weight=p["weight"].half())
    got, _ = run(half, "dpo", math.inf, "cpp", device="cpu")
    want = reference_run(dict(half, hidden=half["hidden"].double(), weight=half["weight"].double()), "dpo", math.inf)
    assert got[2].dtype == torch.float16 and torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-2, atol=1e-2 * want[2].abs().max().item())
    monkeypatch.setattr(one_pass, "_grad_weight_dtype", lambda weight, *args: weight.dtype)
    assert not torch.isfinite(run(half, "dpo", math.inf, "cpp", device="cpu")[0][2]).all()


@pytest.mark.parametrize("h, one_chunk", [(32, True), (8, True), (4, False)])
def test_a_half_head_call_within_the_float32_buffers_room_is_one_chunk(h, one_chunk, chunks, monkeypatch):
    """The default chunk on CPU (``one_pass.default_chunk``), bfloat16: several chunks would hold a
    float32 [V, H] buffer, the logits of 2H tokens, so a call whose scored tokens (``plan_tokens``:
    19–22 of the call's 40 here) are at most 2H more than the chunk (8 tokens by the rule) runs as one
    chunk: bit for bit the pinned one chunk at H 32 (8 + 64 ≥ 40) and at H 8 (8 + 16 < 40, but not
    below the scored count: the masked tokens are not counted), the pinned 8-token chunks at H 4
    (8 + 8 below it) and, at any H, with ``fp32_head_grad=False`` (no float32 buffer, no room). The
    chunk each run plans with is recorded too."""
    from robalign.ops import linear
    monkeypatch.delenv("ROBALIGN_CHUNK_MB", raising=False)
    monkeypatch.setitem(linear.TARGET_TOKENS, "cpu", 4)                 # 8 bfloat16 tokens a chunk
    planned = []
    plan = one_pass.plan_chunks
    monkeypatch.setattr(one_pass, "plan_chunks", lambda tokens, chunk: planned.append(chunk) or plan(tokens, chunk))
    p = problem("dpo", groups=4, h=h, v=500, dtype=torch.bfloat16)
    scored = int((p["labels"] != -100).sum())
    room = 8 + 2 * h
    assert p["hidden"].shape[:2].numel() == 40 and one_chunk == (scored <= room) and (h != 8 or room < 40)
    by_rule = run(p, "dpo", 1.0, "cpp", device="cpu")[0]
    by_rule_bf16_sums = run(p, "dpo", 1.0, "cpp", device="cpu", fp32_head_grad=False)[0]
    assert planned == ([scored] if one_chunk else [8]) + [8]
    chunks(10 ** 6)
    one = run(p, "dpo", 1.0, "cpp", device="cpu")[0]
    chunks(8)
    several = run(p, "dpo", 1.0, "cpp", device="cpu")[0]
    several_bf16_sums = run(p, "dpo", 1.0, "cpp", device="cpu", fp32_head_grad=False)[0]
    for i, (g, w) in enumerate(zip(by_rule + by_rule_bf16_sums, (one if one_chunk else several) + several_bf16_sums)):
        assert torch.equal(g, w), f"output {i}"


def test_the_plan_counts_all_tokens_where_it_must_be_static(monkeypatch):
    """``plan_tokens``: the scored tokens on CPU in eager mode; all tokens while torch.compile traces
    (the fake sees no labels' values) and off the CPU (no wait for the device)."""
    hidden, labels = torch.zeros(2, 5, 3), torch.tensor([[-100, 1, 2, -100, 3], [4, -100, -100, -100, -100]])
    assert one_pass.plan_tokens(hidden, labels, -100) == 4
    assert one_pass.plan_tokens(hidden, labels, 1) == 9
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert one_pass.plan_tokens(hidden, labels, -100) == 10
    monkeypatch.undo()
    assert one_pass.plan_tokens(hidden.to("meta"), labels, -100) == 10


def test_head_gradient_added_in_tiles_equals_one_product(chunks, monkeypatch):
    """bfloat16 in several chunks, where no GEMM adds into float32 (``gemm_into_`` off): each chunk's
    grad_W product formed and added to the float32 buffer in row tiles (here of 64 rows over V 500:
    seven tiles and a part) gives what the whole product at once gives: the same dot products, bit
    for bit."""
    from robalign.ops import cpu

    monkeypatch.setattr(cpu, "gemm_into_", lambda *args: False)
    chunks(3)
    p = problem("dpo", groups=4, h=32, v=500, dtype=torch.bfloat16)
    want, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    monkeypatch.setattr(one_pass, "_TILE_ELEMENTS", 64 * 32)
    got, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i}"


def test_head_gradient_added_by_mkl_in_float32_is_closer_to_float64(chunks, monkeypatch):
    """bfloat16 in several chunks: MKL's bf16bf16f32 GEMM adds each chunk's grad_W product into the
    float32 buffer unrounded (``gemm_into_``), the fallback rounds each product to bfloat16 before
    adding it. Both against float64 from the same bfloat16 inputs through the same one-pass loss: the
    GEMM's head gradient is at least as close, and the other outputs are the same bit for bit (only
    grad_W's sums change)."""
    from robalign.ops import cpu

    chunks(4)
    p = problem("dpo", groups=8, t=9, h=64, v=700, dtype=torch.bfloat16, seed=3)
    probe = torch.zeros(2, 2)
    if not cpu.gemm_into_(probe, torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16), 0.0):
        pytest.skip("this torch build exports no MKL bf16bf16f32 GEMM")
    mkl, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    monkeypatch.setattr(cpu, "gemm_into_", lambda *args: False)
    rounded, _ = run(p, "dpo", 1.0, "cpp", device="cpu")
    want = reference_run(p, "dpo", 1.0)[2]
    error = lambda g: float((g.double() - want).norm() / want.norm())                # noqa: E731
    assert torch.equal(mkl[0], rounded[0]) and torch.equal(mkl[1], rounded[1]) and torch.equal(mkl[3], rounded[3])
    assert error(mkl[2]) <= error(rounded[2]) and error(mkl[2]) < 1e-2, (error(mkl[2]), error(rounded[2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_the_bfloat16_result_to_float32_leaves(backend, chunks):
    """Under autocast the head runs in bfloat16, as ``F.linear`` would; float32 leaves get that
    computation's gradients before their last rounding (bfloat16 leaves get them rounded)."""
    chunks(6)
    p = problem("dpo")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, _ = run(p, "dpo", 1.0, backend)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    want, _ = run(dict(p, hidden=p["hidden"].bfloat16(), weight=p["weight"].bfloat16(), bias=p["bias"].bfloat16()),
                  "dpo", 1.0, backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.to(w.dtype), w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_with_the_accumulator_equal_one_batch(backend, chunks):
    """Two micro-batches through the accumulator equal the whole batch at once (the second
    micro-batch is the harder one, so the accumulated gradient is rescaled)."""
    chunks(6)
    p = problem("dpo", groups=6)
    p["ref"][8:] += 15.0
    whole, _ = run(p, "dpo", 0.5, backend)
    head = torch.nn.Linear(p["hidden"].shape[-1], p["weight"].shape[0]).to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(p["weight"]), head.bias.copy_(p["bias"])
    h = p["hidden"].clone().to(DEVICE).requires_grad_(True)
    fn = loss_fn("dpo", 0.5, 2, backend)
    acc = fn.reduction.accumulator([h, *head.parameters()])
    for rows in (slice(0, 6), slice(6, 12)):
        out = fn(hidden=h[rows], head_weight=head.weight, head_bias=head.bias, labels=p["labels"][rows].to(DEVICE),
                 ref_logps=p["ref"][rows].to(DEVICE), weights=p["weights"][rows.start // 2:rows.stop // 2].to(DEVICE),
                 accumulator=acc)
        (1.5 * out.loss).backward()
    torch.testing.assert_close(out.loss.detach().cpu().double(), whole[0].double(), rtol=1e-6, atol=1e-7)
    assert_close([torch.tensor(acc.loss), h.grad.cpu(), head.weight.grad.cpu(), head.bias.grad.cpu()], whole)


@pytest.mark.parametrize("lam", [0.5, -0.7, math.inf])
@pytest.mark.parametrize("one_pass", [True, False])
def test_the_prepared_accumulator_needs_no_rescaling(lam, one_pass, chunks):
    """``accumulator(prepass=True)`` (what DoRATrainer uses under DeepSpeed, whose gradients do not
    live in ``param.grad``): a no-grad pass fixes the step's weights, then each micro-batch's
    gradient is final as it is formed — given no parameters to rescale, it still sums to the
    whole batch's gradient, on the one-pass and the recompute path."""
    chunks(6)
    p = problem("dpo", groups=6)
    p["ref"][8:] += 15.0
    whole, _ = run(p, "dpo", lam, "cpp")
    h = p["hidden"].clone().requires_grad_(True)
    w, b = p["weight"].clone().requires_grad_(True), p["bias"].clone().requires_grad_(True)
    fn = loss_fn("dpo", lam, 2, "cpp", one_pass=one_pass)
    acc = fn.reduction.accumulator([], accumulation_steps=2, prepass=True)
    parts = (slice(0, 6), slice(6, 12))
    batch = lambda rows: dict(labels=p["labels"][rows], ref_logps=p["ref"][rows],               # noqa: E731
                              weights=p["weights"][rows.start // 2:rows.stop // 2])
    with torch.no_grad():
        seen = [fn(hidden=h[r], head_weight=w, head_bias=b, **batch(r)) for r in parts]
    acc.prepare([o.losses for o in seen], [o.weights for o in seen])
    for rows in parts:
        out = fn(hidden=h[rows], head_weight=w, head_bias=b, accumulator=acc, **batch(rows))
        assert (out.policy_logps.grad_fn is None) == one_pass
        (1.5 * out.loss).backward()                                  # `run` backwards 1.5 × the loss too
    torch.testing.assert_close(torch.tensor(acc.loss, dtype=torch.float64), whole[0].double(), rtol=1e-6, atol=1e-7)
    assert_close([torch.tensor(acc.loss), h.grad, w.grad, b.grad], whole)


def test_the_recompute_path_where_one_pass_cannot_run(chunks):
    chunks(5)
    p = problem("dpo")
    h, w = p["hidden"].clone().requires_grad_(True), p["weight"].clone().requires_grad_(True)
    args = dict(hidden=h, head_weight=w, labels=p["labels"], ref_logps=p["ref"])
    assert loss_fn("dpo", 1.0, 2, "cpp", one_pass=False)(**args).policy_logps.grad_fn is not None
    assert loss_fn("dpo", 1.0, 2, "reference")(**args).policy_logps.grad_fn is not None
    with torch.no_grad():                                            # no gradient wanted: forward only
        no_grad = loss_fn("dpo", 1.0, 2, "cpp")(**args)
    one = loss_fn("dpo", 1.0, 2, "cpp")(**args)
    torch.testing.assert_close(no_grad.loss, one.loss.detach(), rtol=1e-6, atol=0)

    class Worst(Reduction):
        name = "worst"

        def reduce(self, losses, weights=None, *, group=None, ddp_average=True):
            return losses.max(), None

        def accumulator(self, params, **kw):
            raise NotImplementedError

    out = robalign.DoRALoss("dpo", reduction=Worst())(**args)
    assert out.policy_logps.grad_fn is not None
    torch.testing.assert_close(out.loss, out.losses.max())


def test_backward_twice_is_a_clear_error(chunks):
    chunks(5)
    p = problem("dpo")
    h = p["hidden"].clone().requires_grad_(True)
    out = loss_fn("dpo", 1.0, 2, "cpp")(hidden=h, head_weight=p["weight"], labels=p["labels"], ref_logps=p["ref"])
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="holds its gradients once.*one_pass=False"):
        out.loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [5, 10 ** 6], ids=["chunks", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_traces_the_one_pass_loss(chunks, chunk, dtype, monkeypatch):
    """The op is opaque to torch.compile (its fake implementation gives the shapes and dtypes, the
    head gradient's in bfloat16 too, with one chunk or several); the compiled step gives the eager
    gradients bit for bit (the traced backward takes ATen's ops, not the C++ narrowing, which gives the
    same float32 product and rounding). On CPU with the C++ backend (the Triton path needs a GPU).
    Compiled, the op forms the whole head gradient in its forward; so does the eager step here. Eager
    by default leaves the last product to the backward, where a bfloat16 head gradient is rounded once
    instead of twice (tests/test_deferred_product.py: nearer float64)."""
    monkeypatch.setattr(one_pass, "_defers", lambda *a: False)
    chunks(chunk)
    p = problem("dpo", dtype=dtype)
    fn = loss_fn("dpo", 1.0, 2, "cpp")

    def step(h, w, b):
        return fn(hidden=h, head_weight=w, head_bias=b, labels=p["labels"], ref_logps=p["ref"], weights=p["weights"]).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, step):
        leaves = [p[n].clone().requires_grad_(True) for n in ("hidden", "weight", "bias")]
        f(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_large_groups_split_into_equal_pieces():
    assert one_pass._pieces(896, 442) == [(0, 298), (298, 597), (597, 896)]
    assert one_pass._pieces(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert one_pass._pieces(5, 8) == [(0, 5)] and one_pass._pieces(0, 8) == [(0, 0)]


def test_plan_chunks_keeps_groups_whole():
    assert one_pass.plan_chunks([3, 4, 2, 9, 1, 0, 1], 6) == [(0, 1), (1, 3), (3, 4), (4, 7)]
    assert one_pass.plan_chunks([], 6) == []
    assert one_pass.plan_chunks([0, 0], 6) == [(0, 2)]


# -- 2 gloo ranks × 2 micro-batches = one process over the whole batch -------------------------

WORLD, MICRO = 2, 2


class _Policy(torch.nn.Module):
    """A body that makes hidden states, and an LM head the loss reads directly (as the trainer does)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(6, 10), torch.nn.Linear(10, 41)

    def forward(self, x):
        return torch.tanh(self.body(x))


def _gloo_problem():
    torch.manual_seed(5)
    p = problem("plackett_luce", groups=8, t=4, h=6, v=41, seed=3)
    p["ref"][12:] += 10.0                                            # rank 1's second half is harder
    return _Policy(), p


def _loss(model, head, p, rows, acc=None, group=None):
    fn = robalign.DoRALoss("plackett_luce", beta=0.5, lam=0.3, group_size=3, backend="cpp", process_group=group)
    g = slice(rows.start // 3, rows.stop // 3)
    return fn(hidden=model(p["hidden"][rows]), head_weight=head.weight, head_bias=head.bias, labels=p["labels"][rows],
              ref_logps=p["ref"][rows], weights=p["weights"][g], accumulator=acc)


def _one_pass_worker(rank):
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel as DDP

    one_pass.chunk_tokens = lambda *args, **kwargs: 5
    model, p = _gloo_problem()
    ddp = DDP(model)
    fn = robalign.DoRALoss("plackett_luce", lam=0.3, group_size=3)
    acc = fn.reduction.accumulator(list(model.parameters()), group=dist.group.WORLD)
    per_rank = p["hidden"].shape[0] // WORLD
    per_micro = per_rank // MICRO
    for j in range(MICRO):
        start = rank * per_rank + j * per_micro
        with ddp.no_sync() if j < MICRO - 1 else nullcontext():
            _loss(ddp, model.head, p, slice(start, start + per_micro), acc=acc, group=dist.group.WORLD).loss.backward()
    return acc.loss, [q.grad.clone() for q in model.parameters()]


@pytest.mark.distributed
def test_two_ranks_two_micro_batches_equal_one_process(monkeypatch):
    monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: 5)
    model, p = _gloo_problem()
    whole = _loss(model, model.head, p, slice(0, p["hidden"].shape[0]))
    whole.loss.backward()
    want = [q.grad for q in model.parameters()]
    for rank_loss, rank_grads in run_on_gloo_ranks(_one_pass_worker, WORLD):
        assert math.isclose(rank_loss, whole.loss.item(), rel_tol=1e-6)
        for g, w in zip(rank_grads, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


# -- memory ------------------------------------------------------------------------------------

PEAK_SCRIPT = r"""
import gc, json, sys, torch, robalign
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(field + ':')) / 1024
torch.manual_seed(0)
s, t, h, v = 16, 128, 64, 32000
hidden = torch.randn(s, t, h, requires_grad=True)
weight = (torch.randn(v, h) * 0.1).requires_grad_()
labels = torch.randint(v, (s, t))
ref = torch.randn(s) - 1300
one_pass = sys.argv[1] == "one_pass"
fn = robalign.DoRALoss("dpo", backend="cpp", one_pass=one_pass)
fn(hidden=hidden[:2, :4], head_weight=weight, labels=labels[:2, :4], ref_logps=ref[:2]).loss.backward()
hidden.grad = weight.grad = None
gc.collect(); Path('/proc/self/clear_refs').write_text('5'); base = status('VmRSS')
fn(hidden=hidden, head_weight=weight, labels=labels, ref_logps=ref).loss.backward()
print(json.dumps({"peak_mb": status('VmHWM') - base}))
"""


@pytest.mark.slow
def test_peak_memory_is_the_gradients_plus_one_chunk():
    """Fresh process, float32, 2048 tokens, V = 32000, H = 64, chunks of 256 tokens (32 MiB of
    logits): the resident growth of forward + backward is at most the returned gradients (8.3 MB
    for the head and hidden) plus one chunk of logits and its rows (31.3 MB) and 8 MB of small
    buffers — far below the 250 MB of one [N, V] logits tensor. glibc's malloc is told to map
    every block above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so that a freed chunk leaves
    the resident set: with its adaptive default, the same run measured 35 to 97 MB."""
    import os

    env = dict(os.environ, ROBALIGN_CHUNK_MB="32", MALLOC_MMAP_THRESHOLD_="65536")
    peak = {}
    for mode in ("one_pass", "recompute"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env=env)
        peak[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    grads_mb = (32000 * 64 + 16 * 128 * 64) * 4 / 2**20
    chunk_mb = 256 * 32000 * 4 / 2**20 + 256 * 64 * 4 / 2**20
    assert peak["one_pass"] <= grads_mb + chunk_mb + 8, peak


# -- property: drawn problems -------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

THOROUGH = __import__("os").environ.get("HYPOTHESIS_PROFILE") == "thorough"
PROPERTY_SETTINGS = settings(max_examples=300 if THOROUGH else 25, deadline=None, derandomize=not THOROUGH,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(data=st.data())
def test_drawn_problems_match_the_reference(data, monkeypatch):
    """Any objective, group count, sequence length, vocabulary, hole rate, chunk size, λ (either
    sign or ∞), with or without weights and bias, padded or packed, on the C++ or chunked-PyTorch
    backend (Triton is covered above): the loss and every gradient equal the float64 reference."""
    objective = data.draw(st.sampled_from(ONE_PASS_OBJECTIVES), label="objective")
    groups = data.draw(st.integers(1, 5), label="groups")
    t = data.draw(st.integers(1, 7), label="seqlen")
    v = data.draw(st.sampled_from([2, 5, 37, 300]), label="vocab")
    h = data.draw(st.sampled_from([1, 4, 16]), label="hidden")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    p = problem(objective, groups=groups, t=t, h=h, v=v, bias=data.draw(st.booleans(), label="bias"), seed=seed)
    holes = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="extra_holes")
    gen = torch.Generator().manual_seed(seed + 1)
    p["labels"][torch.rand(p["labels"].shape, generator=gen) < holes] = -100
    if not data.draw(st.booleans(), label="weighted"):
        p["weights"] = torch.ones_like(p["weights"])
    lam = data.draw(st.sampled_from([1.0, 0.3, -2.0, float("inf")]), label="lam")
    chunk = data.draw(st.integers(1, 12), label="chunk_tokens")
    backend = data.draw(st.sampled_from(["cpp", "torch"] if not CUDA else ["torch"]), label="backend")
    monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: chunk)
    cu = None
    if data.draw(st.booleans(), label="packed"):
        lengths = [int(x) for x in torch.randint(0, t + 1, (p["labels"].shape[0],), generator=gen)]
        h_, y_, cu = packed_from_padded(p["hidden"], p["labels"], lengths)
        p = dict(p, hidden=h_, labels=y_)
    got, _ = run(p, objective, lam, backend, cu_seqlens=cu)
    assert_close(got, reference_run(p, objective, lam, cu_seqlens=cu))
