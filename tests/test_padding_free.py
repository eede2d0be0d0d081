"""Padding-free batches: the rows of a batch packed into one (``position_ids`` restarting at each
row, no attention mask, ``cu_seqlens`` for the ops). A packed batch must give the padded batch's
log-probs (float64: 1e-12; the attention of a packed row sees only its own tokens) and the same
training, through DoRATrainer, ``robalign train --padding-free`` and the TRL drop-ins."""

import copy
import math

import pytest
import torch

from robalign.app.training.config import DoRAConfig, TrainSettings, check_settings
from robalign.app.data.preferences import PreferenceCollator, PreferenceDataset, pack_padded
from robalign.app.data.toy import ToySettings, make_toy_data
from robalign.app.commands.train import embedded_model, run_training
from robalign.app.training.causal_lm import one_pass_loss, policy_logps
from robalign.losses.loss import FusedLinearDoRALoss
from robalign.losses.reductions import KLDRO


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import json

    records, _ = make_toy_data(ToySettings(n_train=16, n_test=0, seed=3, target_fraction=0.5))
    path = tmp_path_factory.mktemp("pf") / "pairs.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected", "source")}) + "\n"
                            for r in records))
    model, tokenizer = embedded_model(0)
    return path, model.double(), tokenizer


def test_the_collator_packs_rows_without_padding(data):
    path, _, tokenizer = data
    groups = PreferenceDataset.from_file(path, tokenizer, max_length=48, max_prompt_length=16).groups[:3]
    padded = PreferenceCollator(tokenizer.pad_token_id)(groups)
    packed = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(groups)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    rows = [ids for g in groups for ids in g.input_ids]
    assert packed["cu_seqlens"].tolist() == [0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()]
    assert packed["input_ids"][0].tolist() == [t for r in rows for t in r]
    assert packed["position_ids"][0].tolist() == [p for r in rows for p in range(len(r))]
    again = pack_padded(padded)
    assert set(again) == set(packed) and all(torch.equal(packed[k], again[k]) for k in packed)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_log_probs_equal_padded_ones(data, fused):
    path, model, tokenizer = data
    groups = PreferenceDataset.from_file(path, tokenizer, max_length=48, max_prompt_length=16).groups[:4]
    padded = PreferenceCollator(tokenizer.pad_token_id)(groups)
    packed = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(groups)
    want, counts = policy_logps(model, padded, fused=fused)
    got, got_counts = policy_logps(model, packed, fused=fused)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got_counts, counts)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])   # no restarts: rows see
    assert (policy_logps(model, leaky, fused=fused)[0] - want).abs().max() > 1e-3           # each other, so differ


def test_the_one_pass_loss_on_a_packed_batch(data):
    path, model, tokenizer = data
    groups = PreferenceDataset.from_file(path, tokenizer, max_length=48, max_prompt_length=16).groups[:4]
    ref = torch.randn(8, dtype=torch.float64) - 20
    losses, grads = [], []
    for padding_free in (False, True):
        batch = PreferenceCollator(tokenizer.pad_token_id, padding_free=padding_free)(groups)
        out = one_pass_loss(model, dict(batch, ref_logps=ref), FusedLinearDoRALoss("dpo", KLDRO(1.0)))
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_robalign_train_padding_free_trains_the_same_model(data, tmp_path, objective):
    """Three SGD steps with and without --padding-free (the embedded model in float32, sequential
    batches): the same losses to float32 rounding (rtol 1e-5)."""
    path = data[0]
    runs = []
    for padding_free in (False, True):
        settings = TrainSettings(out=str(tmp_path / f"run{padding_free}"), data=str(path), objective=objective,
                                 max_steps=3, batch_size=4, grad_accum=2, save_steps=100, logging_steps=1,
                                 optim="sgd", lr=0.5, shuffle=False, padding_free=padding_free)
        runs.append(run_training(settings, log=lambda *_: None))
    first, second = runs
    assert first["last_log"]["loss"] == pytest.approx(second["last_log"]["loss"], rel=1e-5)
    assert first["last_log"]["loss"] != pytest.approx(first["first_log"]["loss"], rel=1e-3)   # training moved


def test_padding_free_refuses_what_needs_padded_rows():
    with pytest.raises(ValueError, match="`padding_free` packs the rows; `ld_alpha` and `wpo`"):
        check_settings(DoRAConfig(padding_free=True, wpo=True))


def test_dora_dpo_trainer_padding_free(tmp_path):
    """TRL 1.16's DPOTrainer ignores ``padding_free`` (it warns and pads); DoRADPOTrainer packs, and
    trains the float64 model as it does padded (1e-12)."""
    pytest.importorskip("trl")
    from datasets import Dataset

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    records, _ = make_toy_data(ToySettings(n_train=8, n_test=0, seed=2, target_fraction=0.5))
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    model, tokenizer = embedded_model(0)
    model = model.double()
    trained = []
    for padding_free in (False, True):
        policy = copy.deepcopy(model)
        args = DoRADPOConfig(output_dir=str(tmp_path / str(padding_free)), dora_lam=1.0, dora_weights_column=None,
                             per_device_train_batch_size=8, max_steps=3, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                             padding_free=padding_free)
        trainer = DoRADPOTrainer(model=policy, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                                 processing_class=tokenizer)
        assert args.padding_free == padding_free
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert ("cu_seqlens" in batch) == padding_free
        trainer.train()
        trained.append(policy)
    worst = max((a - b).abs().max().item() for a, b in zip(*(m.state_dict().values() for m in trained)))
    assert worst < 1e-12 and not math.isnan(worst)
