"""DoRADPOTrainer (robalign.trl): DoRA in a TRL script, against TRL's own DPOTrainer and
against a float64 reference trajectory written by hand.

Set-up: the embedded tiny Llama in float64, 8 toy pairs, one batch of 8 per step (so every step
sees every sample and the sampler's order cannot matter), SGD at lr 0.5, TRL's default gradient
clipping at norm 1, 3 steps.

Tolerances: against the hand-made float64 trajectory (plain PyTorch: full logits, log-softmax,
the DPO loss, robalign.ground_truth.kl_dro, clip, SGD) 1e-12 — both are float64 throughout (measured: 6e-17). Against
TRL's DPOTrainer, the per-step losses to rtol 5e-4: TRL's fused LM head returns float32
log-probs even for a float64 model (measured: 5.5e-6 off the float64 values on these rows,
robalign's 1.4e-14), and at the reference point the DPO gradient cancels each chosen term against
its rejected one, which amplifies that rounding in the first update (measured: 9e-5 on the
second step's loss).
"""

import copy
import math

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs TRL (robalign[bench])")

from robalign import ground_truth  # noqa: E402
from robalign.app.data.toy import ToySettings, make_toy_data  # noqa: E402
from robalign.app.commands.train import embedded_model  # noqa: E402
from robalign.ops import shift_labels  # noqa: E402

COMMON = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=3, learning_rate=0.5,
              optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, seed=0,
              save_strategy="no", beta=0.1, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def setup():
    from datasets import Dataset

    records, _ = make_toy_data(ToySettings(n_train=8, n_test=0, seed=2, target_fraction=0.5))
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "weight": 0.4 + 0.3 * (i % 4)}
            for i, r in enumerate(records)]
    model, tokenizer = embedded_model(0)
    return Dataset.from_list(rows), model.double(), tokenizer


def _train(cls, config, setup, tmp_path):
    dataset, model, tokenizer = setup
    policy = copy.deepcopy(model)
    trainer = cls(model=policy, ref_model=copy.deepcopy(model), args=config, train_dataset=dataset,
                  processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, policy, batch


def _sgd_steps(model, loss_of, steps=3):
    """``steps`` of SGD at lr 0.5 with TRL's default clipping (norm 1) on ``loss_of(model)``, in place."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model


def _by_hand(model, batch, lam, weights):
    """3 steps of SGD on the DoRA loss of the whole batch, in plain float64 PyTorch."""
    model = copy.deepcopy(model).train()
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = shift_labels(ids.masked_fill(completion == 0, -100))
    scored = labels >= 0

    def logps(m):
        lp = torch.log_softmax(m(input_ids=ids, attention_mask=attention).logits, -1)
        return (lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored).sum(1)

    with torch.no_grad():
        ref = logps(model)
    b = ids.shape[0] // 2

    def loss_of(m):
        lp = logps(m)
        delta = (lp[:b] - ref[:b]) - (lp[b:] - ref[b:])
        return ground_truth.kl_dro(-torch.nn.functional.logsigmoid(0.1 * delta), weights, lam=lam)

    return _sgd_steps(model, loss_of)


def _assert_params(got, want, tol):
    worst = max((a - b).abs().max().item() for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert worst < tol, worst


def test_with_lambda_inf_and_no_weights_it_is_trls_dpo(setup, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    theirs, _, _ = _train(DPOTrainer, DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON), setup, tmp_path)
    mine, policy, batch = _train(DoRADPOTrainer, DoRADPOConfig(output_dir=str(tmp_path / "dora"), dora_lam=math.inf,
                                                               dora_weights_column=None, **COMMON), setup, tmp_path)
    assert len(mine) == len(theirs) == 3 and mine[0] == pytest.approx(math.log(2), rel=1e-7)
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=5e-4)
    _assert_params(policy, _by_hand(setup[1], batch, math.inf, None), 1e-12)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_losses_step_for_step_with_trl(setup, tmp_path, loss_type):
    """TRL's batch-sorting AOT losses through DoRADPOTrainer (λ = ∞, no weights: the recompute path)
    equal TRL's DPOTrainer's, step for step (rtol 5e-4 as above)."""
    from trl import DPOConfig, DPOTrainer

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    common = dict(COMMON, loss_type=[loss_type])
    theirs, _, _ = _train(DPOTrainer, DPOConfig(output_dir=str(tmp_path / "trl"), **common), setup, tmp_path)
    mine, _, _ = _train(DoRADPOTrainer, DoRADPOConfig(output_dir=str(tmp_path / "dora"), dora_lam=math.inf,
                                                      dora_weights_column=None, **common), setup, tmp_path)
    assert len(mine) == 3 and mine[-1] != pytest.approx(mine[0], rel=1e-3)
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=5e-4)


@pytest.mark.parametrize("one_pass", [True, False])
def test_weights_and_kl_dro_follow_the_reference_trajectory(setup, tmp_path, one_pass):
    """The `weight` column and λ = 1, on the one-pass and the recompute path."""
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    config = DoRADPOConfig(output_dir=str(tmp_path / "w"), dora_lam=1.0, dora_weights_column="weight",
                           dora_one_pass=one_pass, **COMMON)
    losses, policy, batch = _train(DoRADPOTrainer, config, setup, tmp_path)
    assert "dora_weights" in batch and float(batch["dora_weights"].std()) > 0
    want = _by_hand(setup[1], batch, 1.0, batch["dora_weights"].double())
    _assert_params(policy, want, 1e-12)
    assert losses[0] != pytest.approx(math.log(2), abs=1e-3)        # the weights enter the DRO value


def test_what_is_not_supported_is_refused(setup, tmp_path):
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    dataset, model, tokenizer = setup
    for extra, message in (({"ld_alpha": 0.5, "precompute_ref_log_probs": True},
                            "`ld_alpha` with `precompute_ref_log_probs=True` is not supported yet"),
                           ({"loss_type": ["sigmoid", "nca_pairs"]}, "TRL loss type .nca_pairs. has no robalign objective")):
        config = DoRADPOConfig(output_dir=str(tmp_path / "x"), **{**COMMON, **extra})
        with pytest.raises(ValueError, match=message):
            DoRADPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config,
                           train_dataset=dataset, processing_class=tokenizer)


def test_a_weights_column_that_is_not_there_is_never_silent(setup, tmp_path):
    """A misspelled weights column trained unweighted without a word before (``weights/mean 1``)."""
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    dataset, model, tokenizer = setup

    def build(column, data):
        config = DoRADPOConfig(output_dir=str(tmp_path / "c"), dora_weights_column=column, **COMMON)
        return DoRADPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config,
                              train_dataset=data, processing_class=tokenizer)

    with pytest.raises(ValueError, match=r"dora_weights_column='wieghts': the training dataset has no such column"):
        build("wieghts", dataset)
    with pytest.warns(UserWarning, match=r"has no 'weight' column: training without DoRA weights"):
        trainer = build("weight", dataset.remove_columns("weight"))
    assert "dora_weights" not in next(iter(trainer.get_train_dataloader()))
    assert "dora_weights" in next(iter(build("weight", dataset).get_train_dataloader()))


def test_loss_lists_become_mixtures():
    from types import SimpleNamespace

    from robalign.trl import objective_of

    args = SimpleNamespace(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], label_smoothing=0.0,
                           f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False, padding_free=False)
    assert objective_of(args) == ("0.8*dpo+0.2*bco_pair+sft", {})
    args.loss_type, args.loss_weights, args.label_smoothing = ["ipo"], None, 0.1
    assert objective_of(args) == ("ipo_norm", {})
    args.loss_type = ["robust"]
    assert objective_of(args) == ("robust", {"label_smoothing": 0.1})
    args.loss_type, args.loss_weights, args.label_smoothing = ["sigmoid", "sft"], [1.0, 0.5], 0.0
    args.f_divergence_type, args.f_alpha_divergence_coef = "alpha_divergence", 0.3
    assert objective_of(args) == ("dpo:alpha_divergence=0.3+0.5*sft", {})     # TRL leaves sft as it is


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    """The README's TRL example, verbatim, on a weighted file like `robalign weigh`'s output."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- trl-example -->\s*```python\n(.*?)```\s*<!-- /trl-example -->", readme, re.S).group(1)
    records, _ = make_toy_data(ToySettings(n_train=24, n_test=0, seed=1, target_fraction=0.5))
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "weighted.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "source": r["source"],
                    "weights": [1.5, 1.5] if r["source"] == "human" else [0.5, 0.5]}) + "\n" for r in records))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'train_loss'" in out.stdout + out.stderr


def test_evaluation_in_a_trl_script(setup, tmp_path):
    """`evaluate()` on an eval set (one batch of 8): the weighted DoRA loss and the reward metrics,
    under TRL's names too."""
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    dataset, model, tokenizer = setup
    config = DoRADPOConfig(output_dir=str(tmp_path / "e"), dora_lam=1.0, **{**COMMON, "max_steps": 1})
    trainer = DoRADPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config,
                             train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    metrics = trainer.evaluate()
    # untrained: policy = reference, every ℓ_i = log 2, so the loss is λ·log mean exp(w_i·log 2/λ), λ = 1
    w = torch.tensor(dataset["weight"], dtype=torch.float64)
    assert metrics["eval_loss"] == pytest.approx(float(torch.log(torch.exp(w * math.log(2)).mean())), rel=1e-9)
    assert metrics["eval_rewards/accuracies"] == 0.0 and "eval_rewards/accuracy" not in metrics


def test_tr_dpo_reference_sync_reaches_the_loss(setup, tmp_path):
    """TR-DPO (TRL's ``sync_ref_model``): TRL's own callback updates the reference model, and
    DoRADPOTrainer's loss reads that model every step — with a hard copy every step (α = 1), the
    reference after training is the policy, so a fresh evaluation sees log-ratios of 0 (loss log 2)."""
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    dataset, model, tokenizer = setup
    config = DoRADPOConfig(output_dir=str(tmp_path / "tr"), dora_lam=math.inf, dora_weights_column=None,
                           sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0,
                           **{**COMMON, "max_steps": 2})
    trainer = DoRADPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config,
                             train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    policy, ref = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator.unwrap_model(trainer.ref_model)
    assert max((a - b).abs().max().item() for a, b in zip(policy.parameters(), ref.parameters())) == 0
    assert max((a - b).abs().max().item() for a, b in zip(policy.parameters(), model.parameters())) > 1e-3
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), rel=1e-12)


def test_use_weighting_gives_trls_wpo_losses(setup, tmp_path):
    """TRL's ``use_weighting`` (WPO) through DoRADPOTrainer (ω on the one-pass path, from the same
    forward) against TRL's own DPOTrainer with it: the per-step losses agree (rtol 5e-4, as above)
    and differ from the unweighted run's."""
    from trl import DPOConfig, DPOTrainer

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    theirs, _, _ = _train(DPOTrainer, DPOConfig(output_dir=str(tmp_path / "t"), use_weighting=True, **COMMON),
                          setup, tmp_path)
    mine, _, _ = _train(DoRADPOTrainer, DoRADPOConfig(output_dir=str(tmp_path / "m"), use_weighting=True,
                                                      dora_lam=math.inf, dora_weights_column=None, **COMMON),
                        setup, tmp_path)
    plain, _, _ = _train(DoRADPOTrainer, DoRADPOConfig(output_dir=str(tmp_path / "p"), dora_lam=math.inf,
                                                       dora_weights_column=None, **COMMON), setup, tmp_path)
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=5e-4)
    assert abs(mine[0] - plain[0]) > 1e-3


# -- KTO: DoRAKTOTrainer against TRL's KTOTrainer --------------------------------------------------
# measured: TRL's and DoRAKTOTrainer's KTO losses 0.52500004/0.52499998, 0.4654056/0.4654025, 0.4413896/0.4414148
KTO_COMMON = dict(COMMON)


@pytest.fixture(scope="module")
def unpaired_setup(setup):
    """The same 8 toy prompts, each with one completion: the chosen one for even rows (desirable),
    the rejected one for odd rows (undesirable)."""
    from datasets import Dataset

    records, _ = make_toy_data(ToySettings(n_train=8, n_test=0, seed=2, target_fraction=0.5))
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0,
             "weight": 0.4 + 0.3 * (i % 4)} for i, r in enumerate(records)]
    return Dataset.from_list(rows), setup[1], setup[2]


def _kto_by_hand(model, batch, lam, weights, *, beta=0.1, desirable=1.0, undesirable=1.0):
    """3 steps of SGD on the DoRA-KTO loss of the whole batch, in plain float64 PyTorch: the
    mismatched rows' log-probs under the current policy without gradient give z0 each step."""
    model = copy.deepcopy(model).train()

    def rows(prefix):
        ids = batch[f"{prefix}input_ids"]
        labels = shift_labels(ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100))
        return ids, batch[f"{prefix}attention_mask"], labels

    def logps(m, prefix=""):
        ids, attention, labels = rows(prefix)
        lp = torch.log_softmax(m(input_ids=ids, attention_mask=attention).logits, -1)
        return (lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels >= 0)).sum(1)

    with torch.no_grad():
        ref, kl_ref = logps(model), logps(model, "KL_")
    label = batch["label"].bool()

    def loss_of(m):
        with torch.no_grad():
            z0 = (logps(m, "KL_") - kl_ref).mean().clamp(min=0)
        r = logps(m) - ref
        losses = torch.where(label, desirable * (1 - torch.sigmoid(beta * (r - z0))),
                             undesirable * (1 - torch.sigmoid(beta * (z0 - r))))
        return ground_truth.kl_dro(losses, weights, lam=lam)

    return _sgd_steps(model, loss_of)


def test_dora_kto_with_lambda_inf_and_no_weights_is_trls_kto(unpaired_setup, tmp_path):
    """DoRAKTOTrainer with λ = ∞ and no weights column: TRL's KTOTrainer's losses step for step
    (rtol 5e-4: TRL's fused head gives float32 log-probs, see the module docstring) and the float64
    hand-written KTO trajectory to 1e-12."""
    from trl import KTOConfig, KTOTrainer

    from robalign.trl import DoRAKTOConfig, DoRAKTOTrainer

    extra = dict(desirable_weight=1.2, undesirable_weight=0.9)
    theirs, _, _ = _train(KTOTrainer, KTOConfig(output_dir=str(tmp_path / "trl"), **KTO_COMMON, **extra),
                          unpaired_setup, tmp_path)
    mine, policy, batch = _train(DoRAKTOTrainer, DoRAKTOConfig(output_dir=str(tmp_path / "dora"), dora_lam=math.inf,
                                                               dora_weights_column=None, **KTO_COMMON, **extra),
                                 unpaired_setup, tmp_path)
    assert len(mine) == len(theirs) == 3
    assert mine[0] == pytest.approx((4 * 1.2 + 4 * 0.9) / 2 / 8, rel=1e-7)    # at the reference: every loss ½λ
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=5e-4)
    _assert_params(policy, _kto_by_hand(unpaired_setup[1], batch, math.inf, None, desirable=1.2, undesirable=0.9),
                   1e-12)


@pytest.mark.parametrize("one_pass", [True, False])
def test_dora_kto_weights_and_kl_dro_follow_the_reference_trajectory(unpaired_setup, tmp_path, one_pass):
    from robalign.trl import DoRAKTOConfig, DoRAKTOTrainer

    config = DoRAKTOConfig(output_dir=str(tmp_path / "w"), dora_lam=1.0, dora_weights_column="weight",
                           dora_one_pass=one_pass, **KTO_COMMON)
    _, policy, batch = _train(DoRAKTOTrainer, config, unpaired_setup, tmp_path)
    assert float(batch["dora_weights"].std()) > 0
    _assert_params(policy, _kto_by_hand(unpaired_setup[1], batch, 1.0, batch["dora_weights"].double()), 1e-12)


# -- CPO and ORPO (trl.experimental) ---------------------------------------------------------------
PAIR_COMMON = {k: v for k, v in COMMON.items() if k != "beta"} | {"max_length": 64}


def _train_pairs(cls, config, dataset, model, tokenizer):
    policy = copy.deepcopy(model)
    trainer = cls(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], policy, batch


@pytest.fixture(scope="module")
def equal_length_setup(setup):
    """The toy pairs with every chosen response cut to its first 5 words (5 tokens + eos): the
    per-response and the batch token-mean NLL then coincide."""
    from datasets import Dataset

    records, _ = make_toy_data(ToySettings(n_train=8, n_test=0, seed=2, target_fraction=0.5))
    rows = [{"prompt": r["prompt"], "chosen": " ".join(r["chosen"].split()[:5]), "rejected": r["rejected"],
             "weight": 0.4 + 0.3 * (i % 4)} for i, r in enumerate(records)]
    return Dataset.from_list(rows), setup[1], setup[2]


@pytest.mark.parametrize("kind", ["cpo-simpo", "cpo-sigmoid"])
def test_cpo_drop_in_step_for_step_with_trl(equal_length_setup, tmp_path, kind):
    """With λ = ∞ and no weights: TRL's CPOTrainer (SimPO with cpo_alpha = 0; sigmoid with its
    default cpo_alpha = 1) gives the same losses step for step (rtol 1e-6; both float64, TRL through
    materialised logits, robalign through its fused path). The NLL terms agree because the chosen
    responses have equal lengths (see DoRACPOTrainer's docstring). TRL's ORPOTrainer's NLL also
    covers the prompt, so ORPO is checked against its hand-written trajectory below instead."""
    from robalign.app.training.trl import _CPOConfig, _CPOTrainer
    from robalign.trl import DoRACPOConfig, DoRACPOTrainer

    dataset, model, tokenizer = equal_length_setup
    extra = {"cpo-simpo": dict(loss_type="simpo", cpo_alpha=0.0), "cpo-sigmoid": dict(loss_type="sigmoid", beta=0.3)}[kind]
    theirs_cls, mine_cls = (_CPOConfig, _CPOTrainer), (DoRACPOConfig, DoRACPOTrainer)
    theirs, _, _ = _train_pairs(theirs_cls[1], theirs_cls[0](output_dir=str(tmp_path / "trl"), **PAIR_COMMON, **extra),
                                dataset, model, tokenizer)
    mine, _, batch = _train_pairs(mine_cls[1], mine_cls[0](output_dir=str(tmp_path / "dora"), dora_lam=math.inf,
                                                           dora_weights_column=None, **PAIR_COMMON, **extra),
                                  dataset, model, tokenizer)
    assert batch["labels"].shape[0] == 16 and mine[-1] != pytest.approx(mine[0], rel=1e-4)
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=1e-6)


def test_orpo_drop_in_with_weights_follows_the_reference_trajectory(equal_length_setup, tmp_path):
    """The weights column and λ = 1: the parameters equal 3 hand-written float64 SGD steps on
    KL-DRO of ORPO's per-sample loss (NLL per chosen token − β·log σ(log odds)), to 1e-12."""
    from robalign.trl import DoRAORPOConfig, DoRAORPOTrainer

    dataset, model, tokenizer = equal_length_setup
    config = DoRAORPOConfig(output_dir=str(tmp_path / "w"), dora_lam=1.0, dora_weights_column="weight", beta=0.2,
                            **PAIR_COMMON)
    _, policy, batch = _train_pairs(DoRAORPOTrainer, config, dataset, model, tokenizer)
    weights = batch["weights"].view(-1, 2)[:, 0].double()
    assert float(weights.std()) > 0
    labels = shift_labels(batch["labels"])

    def loss_of(m):
        lp = torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels >= 0)
        mean = (tok.sum(1) / (labels >= 0).sum(1)).view(-1, 2)
        log_odds = (mean[:, 0] - mean[:, 1]) - (torch.log1p(-mean[:, 0].exp()) - torch.log1p(-mean[:, 1].exp()))
        losses = -mean[:, 0] - 0.2 * torch.nn.functional.logsigmoid(log_odds)
        return ground_truth.kl_dro(losses, weights, lam=1.0)

    _assert_params(policy, _sgd_steps(copy.deepcopy(model).train(), loss_of), 1e-12)


@pytest.mark.parametrize("kind", ["cpo", "orpo"])
def test_cpo_and_orpo_drop_ins_log_trls_keys_with_trls_values(equal_length_setup, tmp_path, kind):
    """The drop-ins log TRL's keys (``nll_loss``; ORPO's ``log_odds_ratio``, ``log_odds_chosen``,
    not logged before) and nothing else outside ``dora/``; at the first step, before the paths
    diverge, the log-prob and odds metrics equal TRL's (1e-6; both float64 models) — and ``nll_loss``
    for CPO, whose NLL is the chosen response's (ORPO's TRL counts the prompt too)."""
    from robalign.app.training.trl import _CPOConfig, _CPOTrainer, _ORPOConfig, _ORPOTrainer
    from robalign.trl import DoRACPOConfig, DoRACPOTrainer, DoRAORPOConfig, DoRAORPOTrainer

    dataset, model, tokenizer = equal_length_setup
    classes = {"cpo": (_CPOConfig, _CPOTrainer, DoRACPOConfig, DoRACPOTrainer),
               "orpo": (_ORPOConfig, _ORPOTrainer, DoRAORPOConfig, DoRAORPOTrainer)}[kind]
    common = PAIR_COMMON | {"max_steps": 1, "beta": 0.2}
    logs = []
    for config_cls, trainer_cls, extra in ((classes[0], classes[1], {}),
                                           (classes[2], classes[3], {"dora_lam": math.inf, "dora_weights_column": None})):
        trainer = trainer_cls(model=copy.deepcopy(model), args=config_cls(output_dir=str(tmp_path / config_cls.__name__),
                                                                          **common, **extra),
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    theirs, mine = logs
    generic = {"loss", "grad_norm", "learning_rate", "epoch", "num_tokens", "entropy", "mean_token_accuracy"}
    trl_keys = set(theirs) - generic
    assert trl_keys <= set(mine) and not {k for k in set(mine) - generic - trl_keys if not k.startswith("dora/")}
    compared = ["logps/chosen", "logps/rejected"] + (["nll_loss"] if kind == "cpo" else
                                                     ["log_odds_ratio", "log_odds_chosen"])
    for key in compared:     # 1e-6 absolute too: TRL's logged metrics pass through float32 (the log odds
        # is a difference of terms near 4.5, so float32's 2⁻²⁴ of them is 3e-7 of a value near 0.035)
        assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-6, abs=1e-6), key
