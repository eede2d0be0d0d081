"""The fused linear path under FSDP2 (``fully_shard``; gloo, 2 processes on CPU).

:func:`robalign.app.training.trainer.policy_logps` runs the LM head through ``linear_sequence_logps`` inside
the head's forward, while FSDP has gathered its weight. Each rank trains on its half of the
batch with ``LossParams(process_group=WORLD)``; the sharded gradients, gathered, must equal one process's
gradient of the whole batch. Two wrappings: the head inside the root's FSDP group (kept
gathered after the forward), and the head sharded on its own (resharded right after its
forward: reading ``head.weight`` after the model's forward would see a shard). A third case
splits each rank's half into two micro-batches under ``KLDROAccumulator``: FSDP reduce-scatters
after each backward and the accumulator rescales the sharded ``.grad``. Each case runs twice:
through the recompute path (``policy_logps`` then ``DoRALoss.from_logps``) and through the
one-pass fused loss (:func:`robalign.app.training.trainer.one_pass_loss`, what ``DoRATrainer`` runs).
Tolerance: float32, 1e-5 relative (the two runs differ in summation order: per-rank sums and
reduce-scatter against one batch).
"""


import pytest
import torch
import torch.distributed as dist

from robalign import KLDRO, DoRALoss, FusedLinearDoRALoss, KLDROAccumulator, LossParams, Objective
from robalign.app.commands.train import embedded_model
from robalign.app.training.causal_lm import one_pass_loss, policy_logps
from conftest import run_on_gloo_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD, ROWS, T = 2, 8, 12          # ROWS per rank: 4 pairs
WRAPPINGS = ("head_in_root", "head_sharded", "accumulated")
PATHS = ("recompute", "one_pass")
MICRO = 2


def make_batch(vocab):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (WORLD * ROWS, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0                                             # right padding on some rows
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                                           # the prompt
    ref = -torch.rand(WORLD * ROWS, generator=gen) * 10 - 20
    weights = torch.rand(WORLD * ROWS // 2, generator=gen) * 2     # one per pair
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, ref, weights


def dora_grads(model, batch, ref, weights, group=None):
    loss_fn = DoRALoss(Objective("dpo", beta=0.5), KLDRO(0.5), params=LossParams(process_group=group))
    logps, counts = policy_logps(model, batch)
    out = loss_fn.from_logps(logps, counts, ref, weights=weights)
    out.loss.backward()
    return out.loss.detach()


def one_pass_grads(model, batch, ref, weights, group=None):
    loss_fn = FusedLinearDoRALoss(Objective("dpo", beta=0.5), KLDRO(0.5), params=LossParams(process_group=group))
    out = one_pass_loss(model, dict(batch, ref_logps=ref, weights=weights), loss_fn)
    out.loss.backward()
    return out.loss.detach()


def one_pass_accumulated_grads(model, batch, ref, weights):
    loss_fn = FusedLinearDoRALoss(Objective("dpo", beta=0.5), KLDRO(0.5))
    acc = loss_fn.reduction.accumulator(list(model.parameters()), group=dist.group.WORLD)
    rows, pairs = ROWS // MICRO, ROWS // 2 // MICRO
    for j in range(MICRO):
        micro = {k: v[j * rows:(j + 1) * rows] for k, v in batch.items()}
        micro.update(ref_logps=ref[j * rows:(j + 1) * rows], weights=weights[j * pairs:(j + 1) * pairs])
        one_pass_loss(model, micro, loss_fn, accumulator=acc).loss.backward()
    return torch.tensor(acc.loss)


def accumulated_grads(model, batch, ref, weights):
    loss_fn = DoRALoss(objective="dpo", beta=0.5, lam=0.5)
    acc = KLDROAccumulator(model.parameters(), lam=0.5, group=dist.group.WORLD)
    rows, pairs = ROWS // MICRO, ROWS // 2 // MICRO
    for j in range(MICRO):
        micro = {k: v[j * rows:(j + 1) * rows] for k, v in batch.items()}
        logps, counts = policy_logps(model, micro)
        out = loss_fn.from_logps(logps, counts, ref_logps=ref[j * rows:(j + 1) * rows],
                                 weights=weights[j * pairs:(j + 1) * pairs])
        acc(out.losses, out.weights).backward()
    return torch.tensor(acc.loss)


def full_grads(param):
    g = param.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def _worker(rank):
    from torch.distributed.fsdp import fully_shard

    results = {}
    for wrapping, path in [(w, p) for w in WRAPPINGS for p in PATHS]:
        model, _ = embedded_model(seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        if wrapping == "head_sharded":
            fully_shard(model.lm_head, reshard_after_forward=True)
        fully_shard(model)
        batch, ref, weights = make_batch(model.config.vocab_size)
        rows, pairs = slice(rank * ROWS, (rank + 1) * ROWS), slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
        mine = {k: v[rows] for k, v in batch.items()}
        if wrapping == "accumulated":
            run = accumulated_grads if path == "recompute" else one_pass_accumulated_grads
            loss = run(model, mine, ref[rows], weights[pairs])
        else:
            run = dora_grads if path == "recompute" else one_pass_grads
            loss = run(model, mine, ref[rows], weights[pairs], group=dist.group.WORLD)
        results[wrapping, path] = (loss, {n: full_grads(p) for n, p in model.named_parameters()})
    return results


@pytest.fixture(scope="module")
def rank_results():
    return run_on_gloo_ranks(_worker, WORLD)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_fsdp_sharded_gradients_equal_the_full_batch_gradient(rank_results, wrapping, path):
    model, _ = embedded_model(seed=0)
    batch, ref, weights = make_batch(model.config.vocab_size)
    want_loss = dora_grads(model, batch, ref, weights)
    want = {n: p.grad for n, p in model.named_parameters()}
    assert want["lm_head.weight"].abs().max() > 0
    for rank in range(WORLD):
        loss, got = rank_results[rank][wrapping, path]
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
