"""Exact KL-DRO across data-parallel ranks (gloo, 2 processes) and accumulation micro-batches.

One spawn runs every distributed case and saves each rank's results; the tests compare them
with a single process over the concatenated batch. Tolerances: float64 ≤ 1e-10 relative (the
two computations differ only in summation order); float32 ≤ 1e-5 (a few ulps of the float32
sums over a few dozen samples).
"""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import robalign
from conftest import run_on_gloo_ranks

pytestmark = pytest.mark.distributed

WORLD, PER_RANK, MICRO = 2, 8, 4
LAMS = (1.0, float("inf"), -0.7)
DTYPES = (torch.float64, torch.float32)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def make_problem(dtype):
    """A 2-layer model and a batch whose rank-1 half is much harder than the rank-0 half, so a
    per-rank normaliser would give a visibly different gradient."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD * PER_RANK, 5, generator=gen, dtype=torch.float64)
    x[PER_RANK:] *= 3.0
    y = torch.randint(3, (WORLD * PER_RANK,), generator=gen)
    w = torch.rand(WORLD * PER_RANK, generator=gen, dtype=torch.float64) * 2
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    return model, x.to(dtype), y, w.to(dtype)


def per_sample_losses(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank):
    group = dist.group.WORLD
    results = {}
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for dtype in DTYPES:
        for lam in LAMS:
            model, x, y, w = make_problem(dtype)
            ddp = DDP(model)
            loss = robalign.kl_dro(per_sample_losses(ddp, x[shard], y[shard]), w[shard], lam=lam, group=group)
            loss.backward()
            results[("ddp", dtype, lam)] = (loss.item(), grads(model))

            model.zero_grad()
            acc = robalign.KLDROAccumulator(model.parameters(), lam=lam, group=group)
            xs, ys, ws = x[shard].chunk(MICRO), y[shard].chunk(MICRO), w[shard].chunk(MICRO)
            for j in range(MICRO):
                with ddp.no_sync() if j < MICRO - 1 else nullcontext():
                    acc(per_sample_losses(ddp, xs[j], ys[j]), ws[j]).backward()
            results[("acc", dtype, lam)] = (acc.loss, grads(model), acc.stats())
    return results


@pytest.fixture(scope="module")
def rank_results():
    return run_on_gloo_ranks(_worker, WORLD)


def full_batch(dtype, lam):
    model, x, y, w = make_problem(dtype)
    loss, stats = robalign.kl_dro_with_stats(per_sample_losses(model, x, y), w, lam=lam)
    loss.backward()
    return loss.item(), grads(model), stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", LAMS)
def test_loss_on_every_rank_is_the_global_loss(rank_results, dtype, lam):
    want, _, _ = full_batch(dtype, lam)
    for rank in range(WORLD):
        assert rank_results[rank][("ddp", dtype, lam)][0] == pytest.approx(want, rel=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", LAMS)
def test_ddp_gradient_is_the_full_batch_gradient(rank_results, dtype, lam):
    _, want, _ = full_batch(dtype, lam)
    for rank in range(WORLD):
        for got, ref in zip(rank_results[rank][("ddp", dtype, lam)][1], want):
            torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", LAMS)
def test_accumulated_micro_batches_on_two_ranks_give_the_full_batch_gradient(rank_results, dtype, lam):
    want_loss, want, want_stats = full_batch(dtype, lam)
    for rank in range(WORLD):
        loss, got_grads, stats = rank_results[rank][("acc", dtype, lam)]
        assert loss == pytest.approx(want_loss, rel=TOL[dtype]["rtol"])
        for got, ref in zip(got_grads, want):
            torch.testing.assert_close(got, ref, **TOL[dtype])
        assert stats.num_samples.item() == WORLD * PER_RANK
        assert stats.ess.item() == pytest.approx(want_stats.ess.item(), rel=1e-5)
        assert stats.max_share.item() == pytest.approx(want_stats.max_share.item(), rel=1e-5)


def test_per_rank_normaliser_would_differ():
    """What the official code computes (a log-mean-exp per device) is another objective here."""
    _, want, _ = full_batch(torch.float64, 1.0)
    model, x, y, w = make_problem(torch.float64)
    for r in range(WORLD):
        shard = slice(r * PER_RANK, (r + 1) * PER_RANK)
        (robalign.kl_dro(per_sample_losses(model, x[shard], y[shard]), w[shard], lam=1.0) / WORLD).backward()
    diff = max((g - ref).abs().max().item() / ref.abs().max().item() for g, ref in zip(grads(model), want))
    assert diff > 0.05


@pytest.mark.parametrize("lam", [1.0, -0.7])
def test_single_process_accumulator_exact_and_documented_approximation(lam):
    _, want, _ = full_batch(torch.float64, lam)
    model, x, y, w = make_problem(torch.float64)
    results = {}
    for exact in (True, False):
        model.zero_grad()
        acc = robalign.KLDROAccumulator(model.parameters(), lam=lam, exact=exact, accumulation_steps=MICRO)
        for xj, yj, wj in zip(x.chunk(MICRO), y.chunk(MICRO), w.chunk(MICRO)):
            acc(per_sample_losses(model, xj, yj), wj).backward()
        results[exact] = grads(model)
    for got, ref in zip(results[True], want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    diff = max((g - ref).abs().max().item() / ref.abs().max().item() for g, ref in zip(results[False], want))
    assert diff > 0.05, "the per-micro-batch approximation should visibly differ on this batch"


def test_accumulator_rescales_only_its_parameters_and_reset_starts_over():
    model, x, y, w = make_problem(torch.float64)
    acc = robalign.KLDROAccumulator(model.parameters(), lam=0.5)
    acc(per_sample_losses(model, x[:4], y[:4]), w[:4]).backward()
    first = acc.loss
    acc.reset()
    with pytest.raises(RuntimeError, match="no micro-batch"):
        acc.stats()
    model.zero_grad()
    acc(per_sample_losses(model, x[:4], y[:4]), w[:4]).backward()
    assert acc.loss == pytest.approx(first)
    assert math.isfinite(acc.loss)
