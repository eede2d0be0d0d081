"""Group DRO (robalign.GroupDRO, robalign.losses.groups) against the plain reference of Sagawa et
al.'s online algorithm (robalign.ground_truth.group_dro, written group by group with Python loops),
its limits, the exact accumulator over micro-batches and gloo ranks, and every place a user meets it.

Tolerances: float64 throughout; the vectorised step and the reference differ only in summation
order, so values, gradients and q agree to 1e-12. The linear program's optimum over the simplex
(scipy linprog, exact for an LP) is reached to 1e-9 once q has concentrated (step size 50).
"""

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist

import robalign
from robalign import ground_truth
from robalign.losses.reductions import GroupDRO
from conftest import run_on_gloo_ranks, trainer_accumulation_gaps


def problem(n=10, groups=3, seed=0, absent=None):
    gen = torch.Generator().manual_seed(seed)
    losses = torch.randn(n, generator=gen, dtype=torch.float64) + 1
    weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    ids = torch.randint(groups, (n,), generator=gen)
    if absent is not None:
        ids[ids == absent] = (absent + 1) % groups
    ids[0] = (absent + 1) % groups if absent is not None else 0
    return losses, weights, ids


def test_steps_follow_the_reference_algorithm():
    """Four steps (group 2 absent from the third): value, gradient ∂L/∂ℓ_i = q_g·w_i/n_g and q."""
    reduction, q = GroupDRO(3, step_size=0.3), torch.full((3,), 1 / 3, dtype=torch.float64)
    for step in range(4):
        losses, weights, ids = problem(seed=step, absent=2 if step == 2 else None)
        mine = losses.clone().requires_grad_(True)
        loss, stats = reduction.reduce(mine, weights, group_ids=ids)
        (grad,) = torch.autograd.grad(loss, mine)
        theirs = losses.clone().requires_grad_(True)
        want, q = ground_truth.group_dro(theirs, ids, q, 0.3, weights)
        (want_grad,) = torch.autograd.grad(want, theirs)
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reduction.q, q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.group_weights, q, rtol=1e-12, atol=1e-12)
        assert int(stats.num_samples) == 10 and stats.dual is None
        assert math.isnan(float(stats.group_losses[2])) == (step == 2)   # no sample: no loss, not 0
        p = grad / weights                                               # the per-sample weights
        assert float(stats.ess) == pytest.approx(float(p.sum() ** 2 / (p * p).sum()), rel=1e-12)
        assert float(stats.max_share) == pytest.approx(float(p.max() / p.sum()), rel=1e-12)


def test_the_limits():
    losses, weights, ids = problem()
    # one group: ERM, the weighted mean
    one = GroupDRO(1, step_size=1.0)
    x = losses.clone().requires_grad_(True)
    loss, _ = one.reduce(x, weights, group_ids=torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(loss.detach(), (weights * losses).mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], weights / 10, rtol=1e-14, atol=0)
    # step 0: q stays uniform; the mean of the group means
    flat = GroupDRO(3, step_size=0.0)
    for _ in range(3):
        loss, _ = flat.reduce(losses, weights, group_ids=ids)
    means = torch.stack([(weights * losses)[ids == g].mean() for g in range(3)])
    torch.testing.assert_close(loss, means.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(flat.q, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-15)
    # a large step: q concentrates on the worst group, the value on the primal max_{q∈Δ} Σ q_g·L_g
    scipy_optimize = pytest.importorskip("scipy.optimize")
    lp = scipy_optimize.linprog(-means.numpy(), A_eq=[[1.0, 1.0, 1.0]], b_eq=[1], bounds=[(0, 1)] * 3)
    sharp = GroupDRO(3, step_size=50.0)
    for _ in range(3):
        loss, _ = sharp.reduce(losses, weights, group_ids=ids)
    assert abs(float(loss) + lp.fun) < 1e-9
    torch.testing.assert_close(sharp.q, torch.from_numpy(lp.x), rtol=0, atol=1e-9)


def test_q_moves_only_with_gradients_and_round_trips_through_state_dict():
    losses, weights, ids = problem()
    reduction = GroupDRO(3, step_size=0.5, names=["a", "b", "c"])
    with torch.no_grad():
        reduction.reduce(losses, weights, group_ids=ids)                 # evaluation: q as it is
    torch.testing.assert_close(reduction.q, torch.full((3,), 1 / 3, dtype=torch.float64))
    reduction.reduce(losses.clone().requires_grad_(True), weights, group_ids=ids)
    moved = reduction.q.clone()
    assert float((moved - 1 / 3).abs().max()) > 0.01
    state = json.loads(json.dumps(reduction.state_dict()))               # what a checkpoint holds
    again = GroupDRO(3, step_size=0.5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.q, moved, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="GroupDRO.load_state_dict: `log_q` must be 3 numbers, finite or -inf"):
        again.load_state_dict({"log_q": [0.0, 1.0]})


def test_bad_input_is_a_clear_error():
    losses, weights, ids = problem()
    reduction = GroupDRO(3)
    with pytest.raises(ValueError, match="robalign.GroupDRO: needs `group_ids`"):
        reduction.reduce(losses, weights)
    with pytest.raises(ValueError, match=r"`group_ids` must lie in 0 … 2 \(num_groups=3\)"):
        reduction.reduce(losses, weights, group_ids=ids + 1)
    with pytest.raises(TypeError, match="`group_ids` must be an integer tensor"):
        reduction.reduce(losses, weights, group_ids=ids.double())
    with pytest.raises(ValueError, match="`group_ids` must have the shape of `losses`"):
        reduction.reduce(losses, weights, group_ids=ids[:4])
    with pytest.raises(ValueError, match="robalign.CVaR: takes no `group_ids`"):
        robalign.CVaR(0.5).reduce(losses, weights, group_ids=ids)
    with pytest.raises(ValueError, match="`num_groups` must be an int >= 1"):
        GroupDRO(0)
    with pytest.raises(ValueError, match="`step_size`"):
        GroupDRO(2, step_size=-1.0)
    with pytest.raises(ValueError, match="`names` must hold num_groups=2 names"):
        GroupDRO(2, names=["x"])


def test_two_micro_batches_prepared_equal_one_batch():
    """The exact accumulator: the pre-pass folds both micro-batches' group sums into one q step;
    the per-micro-batch approximation takes one q step per micro-batch and differs."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    _, w, ids = problem(n=12)
    per_sample = lambda rows: model(x[rows]).squeeze(-1) ** 2           # noqa: E731
    start = GroupDRO(3, step_size=2.0)
    whole_reduction = copy.deepcopy(start)
    whole, _ = whole_reduction.reduce(per_sample(slice(0, 12)), w, group_ids=ids)
    want = torch.autograd.grad(whole, list(model.parameters()))
    parts = (slice(0, 5), slice(5, 12))
    reduction = copy.deepcopy(start)
    acc = reduction.accumulator(list(model.parameters()), accumulation_steps=2)
    with torch.no_grad():
        acc.prepare([per_sample(r) for r in parts], [w[r] for r in parts], [ids[r] for r in parts])
    for r in parts:
        acc(per_sample(r), w[r], group_ids=ids[r]).backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        p.grad = None
    assert acc.loss == pytest.approx(float(whole.detach()), rel=1e-12)
    torch.testing.assert_close(reduction.q, whole_reduction.q, rtol=1e-12, atol=0)
    approx_reduction = copy.deepcopy(start)
    approx = approx_reduction.accumulator(list(model.parameters()), exact=False, accumulation_steps=2)
    for r in parts:
        approx(per_sample(r), w[r], group_ids=ids[r]).backward()
    gap = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), want))
    assert gap > 1e-3


def _rank_worker(rank):
    losses, weights, ids = problem(n=14, seed=3)
    shard = slice(0, 5) if rank == 0 else slice(5, 14)                 # unequal shards
    reduction = GroupDRO(3, step_size=1.5)
    mine = losses[shard].clone().requires_grad_(True)
    loss, stats = reduction.reduce(mine, weights[shard], group_ids=ids[shard], group=dist.group.WORLD,
                                   ddp_average=False)
    (grad,) = torch.autograd.grad(loss, mine)
    out = {"one": (float(loss.detach()), grad, reduction.q.clone())}
    reduction = GroupDRO(3, step_size=1.5)                              # the same shard as two micro-batches
    mine = losses[shard].clone().requires_grad_(True)
    acc = reduction.accumulator([mine], group=dist.group.WORLD, ddp_average=False, accumulation_steps=2)
    cut = 2 if rank == 0 else 4
    micro = [slice(0, cut), slice(cut, mine.numel())]
    acc.prepare([mine.detach()[m] for m in micro], [weights[shard][m] for m in micro], [ids[shard][m] for m in micro])
    for m in micro:
        acc(mine[m], weights[shard][m]).backward()
    out["micro"] = (acc.loss, mine.grad.clone(), reduction.q.clone())
    return out


@pytest.mark.distributed
def test_two_ranks_and_two_micro_batches_equal_one_process():
    losses, weights, ids = problem(n=14, seed=3)
    reduction = GroupDRO(3, step_size=1.5)
    whole = losses.clone().requires_grad_(True)
    loss, _ = reduction.reduce(whole, weights, group_ids=ids)
    (grad,) = torch.autograd.grad(loss, whole)
    results = run_on_gloo_ranks(_rank_worker, 2)
    for key in ("one", "micro"):
        torch.testing.assert_close(torch.cat([results[0][key][1], results[1][key][1]]), grad, rtol=1e-12, atol=1e-14)
        for rank in (0, 1):
            assert results[rank][key][0] == pytest.approx(float(loss.detach()), rel=1e-12)
            torch.testing.assert_close(results[rank][key][2], reduction.q, rtol=1e-12, atol=0)


def test_doraloss_passes_group_ids_and_refuses_them_elsewhere():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 5, 6, generator=gen, requires_grad=True)
    head = torch.randn(11, 6, generator=gen)
    labels = torch.randint(11, (8, 5), generator=gen)
    ref = torch.randn(8, generator=gen) - 12
    ids = torch.tensor([0, 1, 1, 0])
    reduction = GroupDRO(2, step_size=0.5)
    loss_fn = robalign.DoRALoss("dpo", beta=0.5, reduction=reduction, backend="cpp")
    out = loss_fn(hidden=hidden, head_weight=head, labels=labels, ref_logps=ref, group_ids=ids)
    assert out.policy_logps.grad_fn is not None                         # no one-pass form: the recompute path
    with torch.no_grad():
        want, _ = copy.deepcopy(reduction).reduce(out.losses.detach(), out.weights, group_ids=ids)
    torch.testing.assert_close(out.loss.detach(), want)
    assert out.group_ids is ids and out.dro.group_weights is not None
    out.loss.backward()
    assert hidden.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction 'group' needs `group_ids`"):
        loss_fn(hidden=hidden, head_weight=head, labels=labels, ref_logps=ref)
    with pytest.raises(ValueError, match=r"`group_ids` must be \[B\] = \[4\]"):
        loss_fn(hidden=hidden, head_weight=head, labels=labels, ref_logps=ref, group_ids=ids[:3])
    kl = robalign.DoRALoss("dpo", beta=0.5, backend="cpp")
    for path in ({"hidden": hidden, "head_weight": head}, {"logits": torch.randn(8, 5, 11)}):   # one-pass, logits
        with pytest.raises(ValueError, match="`group_ids` was given but reduction 'kl' reads no groups"):
            kl(labels=labels, ref_logps=ref, group_ids=ids, **path)


# -- the data and the trainer --------------------------------------------------------------------

def test_a_samples_group_is_its_group_field_else_its_sources(tmp_path):
    from robalign.app.data.preferences import PreferenceCollator, PreferenceDataset
    from robalign.app.ratio.data import DataError, sample_group
    from robalign.app.data.toy import toy_tokenizer

    assert sample_group({"group": 3, "sources": ["a", "b"]}) == "3"
    assert sample_group({"sources": ["synthetic", "human", "synthetic"]}) == "human+synthetic"
    assert sample_group({"chosen_source": "human", "rejected_source": "human"}) == "human"
    assert sample_group({"source": "synthetic"}) == "synthetic" and sample_group({}) is None
    rows = [{"prompt": "tell me about the ocean .", "chosen": "wave", "rejected": "thing", "source": s}
            for s in ("synthetic", "human", "synthetic")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = toy_tokenizer()
    dataset = PreferenceDataset.from_file(path, tokenizer, max_length=16, max_prompt_length=8)
    assert dataset.group_names == ("human", "synthetic")
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(dataset.groups)
    assert batch["group_ids"].tolist() == [1, 0, 1] and batch["group_ids"].dtype == torch.long
    rows[1].pop("source")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = PreferenceDataset.from_file(path, tokenizer, max_length=16, max_prompt_length=8)
    assert dataset.group_names == () and "group_ids" not in PreferenceCollator(0)(dataset.groups)
    rows[1]["group"] = [1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"d.jsonl:2: field `group` must be a string or an integer, got list"):
        PreferenceDataset.from_file(path, tokenizer)


def _mixed_data(tmp_path, n=64):
    from robalign.app.data.toy import ToySettings, make_toy_data, write_jsonl

    train, _ = make_toy_data(ToySettings(n_train=n, n_test=0, target_fraction=0.5, seed=1))
    return str(write_jsonl(tmp_path / "mixed.jsonl", train, fields=("prompt", "chosen", "rejected", "source")))


def test_robalign_train_logs_q_and_resumes_it(tmp_path):
    """`--dro group` over the sources: q and each group's loss in the logs; a run resumed from its
    step-2 checkpoint ends with the q and the parameters of the uninterrupted run."""
    from safetensors.torch import load_file

    from robalign.app.training.config import TrainSettings
    from robalign.app.commands.train import run_training

    data = _mixed_data(tmp_path)
    base = dict(data=data, dro="group", group_step=0.5, batch_size=4, grad_accum=2, max_steps=4, logging_steps=1,
                save_steps=2, optim="sgd", lr=0.5, shuffle=False)
    straight = run_training(TrainSettings(out=str(tmp_path / "straight"), **base), log=lambda *_: None)
    last = straight["last_log"]
    assert last["dro/q/human"] + last["dro/q/synthetic"] == pytest.approx(1.0, abs=1e-6)
    assert last["dro/q/human"] != pytest.approx(0.5, abs=1e-4) and math.isfinite(last["dro/group_loss/human"])
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["robalign.DoRATrainer"]["reduction"]
    assert saved["name"] == "group" and len(saved["log_q"]) == 2

    # stop after step 2 (its checkpoint), then resume to step 4
    run_training(TrainSettings(out=str(tmp_path / "resumed"), **{**base, "max_steps": 2}), log=lambda *_: None)
    resumed = run_training(TrainSettings(out=str(tmp_path / "resumed"), **{**base, "resume": "latest"}),
                           log=lambda *_: None)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    for key in ("dro/q/human", "dro/q/synthetic"):
        assert resumed["last_log"][key] == pytest.approx(last[key], rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_trainer_accumulation_is_exact_for_group_dro(tmp_path):
    """2 micro-batches of 4 (with the no-grad pre-pass) give the parameters of 1 batch of 8 (SGD,
    3 steps); the per-micro-batch approximation does not."""
    exact, approx = trainer_accumulation_gaps(tmp_path, data=_mixed_data(tmp_path), dro="group", group_step=2.0)
    assert exact < 1e-5
    assert approx > 10 * max(exact, 1e-7)


def test_group_dro_without_groups_in_the_data_names_the_file(tmp_path):
    from robalign.app.training.config import TrainSettings, load_settings
    from robalign.app.commands.train import run_training

    with pytest.raises(ValueError, match=r"dro=group: every sample of .*train.jsonl needs a group"):
        run_training(TrainSettings(out=str(tmp_path / "o"), dro="group", max_steps=1), log=lambda *_: None)
    with pytest.raises(ValueError, match="`group_step` must be a finite number >= 0"):
        load_settings(dro="group", group_step=-0.1)


@pytest.mark.parametrize("step_size", [1e308, 1e300])
def test_a_step_past_float64s_range_takes_its_limit(step_size):
    """η·L_g overflowing gives q one-hot on the worst group (NaN for the rest of training before);
    the next steps and a checkpoint's round trip keep it."""
    from robalign.losses.reductions import GroupDRO

    dro = GroupDRO(3, step_size=step_size)
    x = torch.tensor([0.3, 1.2, 0.7, 2.5, 0.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 0])
    for _ in range(3):
        loss, stats = dro.reduce(x, group_ids=ids)
        assert float(loss.detach()) == 2.5 and dro.q.tolist() == [0.0, 0.0, 1.0]
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    again = GroupDRO(3, step_size=step_size)
    again.load_state_dict(dro.state_dict())
    assert again.q.tolist() == [0.0, 0.0, 1.0]
    # two groups overflow (L = 2.0 and 2.5): the limit is still the worst one alone (uniform on both
    # before, found by tests/test_hunt_reductions.py); a tie shares q in proportion to its prior q
    both = GroupDRO(3, step_size=step_size)
    loss, _ = both.reduce(torch.tensor([2.0, 2.5, 0.1], dtype=torch.float64), group_ids=torch.tensor([0, 1, 2]))
    assert float(loss) == 2.5 and both.q.tolist() == [0.0, 1.0, 0.0]
    tied = GroupDRO(3, step_size=step_size)
    tied.log_q = torch.log(torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64))
    tied.reduce(torch.tensor([2.5, 2.5, 0.1], dtype=torch.float64), group_ids=torch.tensor([0, 1, 2]))
    assert tied.q.tolist() == pytest.approx([0.25, 0.75, 0.0], abs=1e-15)


def test_q_goes_back_to_its_groups_by_name():
    """A checkpoint's q is restored by group name, in any order (by position before: a renamed or
    reordered group silently took another's q); a group new or gone is an error."""
    saved = GroupDRO(3, step_size=0.5, names=["a", "b", "c"])
    saved.log_q = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    state = json.loads(json.dumps(saved.state_dict()))
    reordered = GroupDRO(3, step_size=0.5, names=["c", "a", "b"])
    reordered.load_state_dict(state)
    assert dict(zip(reordered.names, reordered.q.tolist())) == pytest.approx(dict(zip(saved.names, saved.q.tolist())))
    with pytest.raises(ValueError, match=r"saved groups \['a', 'b', 'c'\] are not this run's \['a', 'b', 'd'\] "
                                         r"\(new: \['d'\], gone: \['c'\]\)"):
        GroupDRO(3, step_size=0.5, names=["a", "b", "d"]).load_state_dict(state)
    unnamed = GroupDRO(3, step_size=0.5)                                   # no names: by position, as stated
    unnamed.load_state_dict(state)
    torch.testing.assert_close(unnamed.q, saved.q)


def test_evaluation_reads_group_ids_by_name(tmp_path):
    """Trained on groups human and synthetic (q ≈ 1 on synthetic after a large step), an evaluation
    file holding only one group is weighed by that group's q: its ids index the training data's
    names, not the evaluation file's own (synthetic-only evaluated with human's q ≈ 0 before)."""
    from robalign.app.training.config import TrainSettings
    from robalign.app.data.toy import ToySettings, make_toy_data, write_jsonl
    from robalign.app.commands.train import run_training

    train, _ = make_toy_data(ToySettings(n_train=64, n_test=0, target_fraction=0.5, seed=1))
    data = write_jsonl(tmp_path / "mixed.jsonl", train, fields=("prompt", "chosen", "rejected", "source"))
    evals = {}
    for group in ("human", "synthetic"):
        only = write_jsonl(tmp_path / f"{group}.jsonl", [r for r in train if r["source"] == group],
                           fields=("prompt", "chosen", "rejected", "source"))
        summary = run_training(TrainSettings(out=str(tmp_path / group), data=str(data), eval_data=str(only), dro="group",
                                             group_step=200.0, batch_size=4, grad_accum=2, max_steps=4, save_steps=100,
                                             optim="sgd", lr=0.5, shuffle=False), log=lambda *_: None)
        evals[group] = summary["eval"]["eval_loss"]
    assert summary["last_log"]["dro/q/synthetic"] > 0.9
    assert evals["synthetic"] > 0.3 and evals["human"] < 1e-6, evals
