"""``DoRALoss(average_logps=True)``: every objective that does not already divide by length reads
per-token mean log-probs ``logp/|y|`` (policy and reference) — Liger-Kernel's ``average_log_prob``
— on every path (materialised logits, the recompute linear path, the one-pass loss) and kernel
backend, as one option of the log-prob step rather than per-objective ``*_norm`` variants.

Checked three ways: (1) on log-probs, float64, the option equals the plain objective fed averaged
log-probs by hand, and ``dpo``/``ipo`` with it equal TRL's ``dpo_norm``/``ipo_norm`` (to rounding);
(2) every path and backend, float32, against the float64 reference backend with the option (the
loss and the hidden-state gradient within 1e-5 relative, as tests/test_linear_backends.py: float32
sums over at most 7·11 terms per sequence); (3) objectives that already normalise are refused with a
clear error; (4) KTO's, whose reference point z₀ is formed from mismatched rows, read those rows'
mean log-probs too (their ``kl_counts``).
"""

import pytest
import torch

import robalign
from robalign.ground_truth.objectives import OBJECTIVES
from test_linear_backends import BACKENDS

AVERAGED = sorted(n for n, e in OBJECTIVES.items()
                  if "+" not in n and ":" not in n and "/" not in n and not e.counts and not e.kl_reference)
# KTO's reference point reads mismatched rows: tested on its own below


def _k(name):
    entry = OBJECTIVES[name]
    return 1 if entry.unpaired else 2 if entry.pairwise else 3


def _scores(name, rows, gen):
    if OBJECTIVES[name].unpaired:
        return (torch.arange(rows) % 2).double()
    return torch.randn(rows, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", AVERAGED)
def test_the_option_is_the_objective_on_mean_log_probs(name):
    k = _k(name)
    gen = torch.Generator().manual_seed(3)
    logps = -torch.rand(4 * k, generator=gen, dtype=torch.float64) * 20 - 1
    ref = -torch.rand(4 * k, generator=gen, dtype=torch.float64) * 20 - 1
    counts = torch.randint(0, 9, (4 * k,), generator=gen)                  # 0: a truncated response
    scores = _scores(name, 4 * k, gen)
    extra = {"ref_logps": ref} if OBJECTIVES[name].reference else {}
    length = counts.clamp(min=1).double()
    x1, x2 = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    got = robalign.DoRALoss(name, lam=0.7, group_size=k if k > 1 else None, average_logps=True).from_logps(
        x1, counts, scores=scores, **extra)
    by_hand = robalign.DoRALoss(name, lam=0.7, group_size=k if k > 1 else None).from_logps(
        x2 / length, counts, scores=scores, **({"ref_logps": ref / length} if extra else {}))
    got.loss.backward()
    by_hand.loss.backward()
    torch.testing.assert_close(got.loss, by_hand.loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("plain,norm", [("dpo", "dpo_norm"), ("ipo", "ipo_norm")])
def test_dpo_and_ipo_averaged_are_trls_norm_loss_types(plain, norm):
    gen = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(8, generator=gen, dtype=torch.float64) * 30, -torch.rand(8, generator=gen) * 30
    counts = torch.randint(1, 12, (8,), generator=gen)
    a = robalign.DoRALoss(plain, average_logps=True).from_logps(logps, counts, ref_logps=ref.double())
    b = robalign.DoRALoss(norm).from_logps(logps, counts, ref_logps=ref.double())
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-14, atol=1e-15)   # (l − r)/n against l/n − r/n


@pytest.mark.parametrize("name", ["dpo", "plackett_luce", "apo_down", "cpo", "lire", "aot"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "recompute", "one_pass"])
def test_every_path_and_backend_averages(name, backend, path):
    kernel, device = backend
    k = _k(name)
    gen = torch.Generator().manual_seed(5)
    s, t, h, v = 3 * k, 7, 6, 11
    hidden, head = torch.randn(s, t, h, generator=gen), torch.randn(v, h, generator=gen)
    labels = torch.randint(v, (s, t), generator=gen)
    labels[torch.rand(s, t, generator=gen) < 0.3] = -100
    labels[1] = -100                                                      # an all-ignored sequence
    ref, scores = torch.randn(s, generator=gen) * 3 - 10, _scores(name, s, gen)
    results = []
    for which, dtype, where in (("reference", torch.float64, "cpu"), (kernel, torch.float32, device)):
        x = hidden.to(where, dtype).requires_grad_(True)
        loss_fn = robalign.DoRALoss(name, lam=0.5, backend=which, one_pass=path == "one_pass",
                                    group_size=k if k > 1 else None, average_logps=True)
        extra = {"ref_logps": ref.to(where, dtype)} if OBJECTIVES[name].reference else {}
        inputs = dict(labels=labels.to(where), scores=scores.to(where, dtype), **extra)
        out = (loss_fn(logits=x @ head.to(where, dtype).T, **inputs) if path == "logits"
               else loss_fn(hidden=x, head_weight=head.to(where, dtype), **inputs))
        out.loss.backward()
        results.append((out.loss.detach().double().cpu(), x.grad.double().cpu()))
    (want_loss, want_grad), (loss, grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("name,why", [("dpo_norm", "already reads length-normalised"),
                                      ("simpo", "already reads length-normalised"),
                                      ("dpo+0.5*sft", "already reads length-normalised")])
def test_objectives_that_normalise_already_are_refused(name, why):
    with pytest.raises(ValueError, match=rf"robalign.DoRALoss: `average_logps`: objective .* {why}"):
        robalign.DoRALoss(name, average_logps=True)
    with pytest.raises(ValueError, match=rf"robalign.Objective: `average_logps`: objective .* {why}"):
        robalign.Objective(name, average_logps=True)


def test_kto_averages_its_rows_and_its_reference_point(name="kto"):
    """KTO with averaged log-probs: the samples' log-ratios and z₀ (from the mismatched rows) are
    per-token means — the plain objective fed both averaged by hand, loss and gradient."""
    gen = torch.Generator().manual_seed(5)
    n = 6
    logps = -torch.rand(n, generator=gen, dtype=torch.float64) * 20 - 1
    ref = -torch.rand(n, generator=gen, dtype=torch.float64) * 20 - 1
    counts, kl_counts = torch.randint(0, 9, (n,), generator=gen), torch.randint(1, 9, (n,), generator=gen)
    kl_logps = -torch.rand(n, generator=gen, dtype=torch.float64) * 20
    kl_ref = -torch.rand(n, generator=gen, dtype=torch.float64) * 20
    labels = (torch.arange(n) % 2).double()
    length, kl_length = counts.clamp(min=1).double(), kl_counts.double()
    x1, x2 = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    reduction = robalign.KLDRO(0.7)
    averaged = robalign.DoRALoss(robalign.Objective(name, beta=0.2, average_logps=True), reduction)
    got = averaged.from_logps(x1, counts, ref, extras=robalign.BatchExtras(
        scores=labels, kl_logps=kl_logps, kl_ref_logps=kl_ref, kl_counts=kl_counts))
    kl_by_hand = robalign.BatchExtras(scores=labels, kl_logps=kl_logps / kl_length, kl_ref_logps=kl_ref / kl_length)
    by_hand = robalign.DoRALoss(robalign.Objective(name, beta=0.2), reduction).from_logps(
        x2 / length, counts, ref / length, extras=kl_by_hand)
    got.loss.backward()
    by_hand.loss.backward()
    torch.testing.assert_close(got.loss, by_hand.loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got.kl, by_hand.kl, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match=r"averaged log-probs need `kl_counts`"):
        averaged.from_logps(x1, counts, ref, extras=robalign.BatchExtras(scores=labels, kl_logps=kl_logps,
                                                                          kl_ref_logps=kl_ref))


@pytest.mark.slow
def test_the_trainer_gives_kto_its_rows_counts(tmp_path):
    """`robalign train --objective kto --average-logps`: the trainer passes the mismatched rows' token
    counts with their log-probs (without them the loss refuses: "averaged log-probs need
    `kl_counts`"), and the run trains."""
    import math

    from robalign.app.commands.train import run_training
    from robalign.app.training.config import TrainSettings

    summary = run_training(TrainSettings(objective="kto", average_logps=True, max_steps=2, out=str(tmp_path / "k")),
                           log=lambda *args: None)
    assert summary["settings"]["average_logps"] is True
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"]) and math.isfinite(summary["last_log"]["loss"])
