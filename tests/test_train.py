"""Training: data pipeline rules, DoRATrainer against the DoRALoss composition, end-to-end runs
with checkpoints and resume, exactness across gradient accumulation (across processes and engines:
test_engines.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="training needs the `train` extra (transformers)")

from robalign import ground_truth  # noqa: E402
from robalign.app.data.preferences import PreferenceCollator, PreferenceDataset, prepare_tokenizer  # noqa: E402
from robalign.app.commands.train import TrainSettings, embedded_model, load_settings, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    _, tok = embedded_model()
    return prepare_tokenizer(tok, log=lambda *_: None)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tokenisation_masking_and_truncation(tmp_path, tokenizer):
    data = write(tmp_path / "pairs.jsonl", [
        {"prompt": "tell me about the ocean .", "chosen": "wave tide", "rejected": "coral reef salt current whale"},
    ])
    ds = PreferenceDataset.from_file(data, tokenizer, max_length=9, max_prompt_length=4)
    group = ds[0]
    prompt = tokenizer("tell me about the ocean .")["input_ids"]           # [BOS] + 6 words
    kept = prompt[-4:]                                                      # left-truncated prompt
    assert ds.truncated_prompts == 1
    chosen = tokenizer("wave tide", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert group.input_ids[0] == kept + chosen
    assert group.labels[0] == [-100] * 4 + chosen
    rejected = tokenizer("coral reef salt current whale", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert group.input_ids[1] == kept + rejected[:5]                         # right-truncated response
    assert ds.truncated_responses == 1 and group.scores == [1.0, 0.0]


def test_listwise_and_collator(tmp_path, tokenizer):
    data = write(tmp_path / "list.jsonl", [
        {"prompt": "hi", "responses": ["a", "b c", "d"], "scores": [0.1, 0.9, 0.5], "probs": [0.2, 0.3, 0.4]},
        {"prompt": "yo", "responses": ["e", "f", "g h i"], "scores": [1.0, 0.0, 0.5], "probs": [0.5, 0.6, 0.7]},
    ])
    ds = PreferenceDataset.from_file(data, tokenizer, max_length=32, max_prompt_length=8)
    assert ds.group_size == 3
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 6 and batch["scores"].tolist()[:3] == pytest.approx([0.1, 0.9, 0.5])
    assert batch["probs"].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert "weights" not in batch
    widths = batch["attention_mask"].sum(1)
    assert (batch["labels"][torch.arange(6), widths - 1] == tokenizer.eos_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    bad = write(tmp_path / "bad.jsonl", [
        {"prompt": "hi", "responses": ["a", "b"], "scores": [0.1, 0.9]},
        {"prompt": "yo", "responses": ["e", "f", "g"], "scores": [1.0, 0.0, 0.5]},
    ])
    with pytest.raises(ValueError, match="record 2 has 3 responses, the first had 2"):
        PreferenceDataset.from_file(bad, tokenizer)


def test_trainer_loss_and_gradients_equal_the_reference_composition(tmp_path, tokenizer):
    from transformers import TrainingArguments

    from robalign.app.training.trainer import DoRAConfig, DoRATrainer

    model, _ = embedded_model(seed=3)
    model = model.double()
    records = [{"prompt": f"p{i}", "chosen": "tree leaf moss", "rejected": "thing stuff", "weights": [0.5 + i, 1.0]}
               for i in range(4)]
    ds = PreferenceDataset.from_file(write(tmp_path / "d.jsonl", records), tokenizer, max_length=24,
                                     max_prompt_length=8)
    for g in ds.groups:
        g.ref_logps = [-3.0, -2.0]
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    trainer = DoRATrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                          dora=DoRAConfig(objective="dpo", beta=0.3, lam=0.7))
    batch = trainer.data_collator(ds.groups)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = ground_truth.sequence_logps(logits, ground_truth.shift_labels(batch["labels"]))
    losses = ground_truth.objectives.dpo(logps.reshape(4, 2), batch["ref_logps"].double().reshape(4, 2), beta=0.3)
    want_loss = ground_truth.kl_dro(losses, batch["weights"].double().reshape(4, 2).mean(-1), lam=0.7)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def _settings(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), max_steps=6, batch_size=4, grad_accum=2, logging_steps=2, save_steps=3,
                lr=5e-3, shuffle=False)
    base.update(kw)
    return TrainSettings(**base)


def _params(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def test_end_to_end_checkpoints_and_resume(tmp_path):
    quiet = lambda *_: None
    summary = run_training(_settings(tmp_path, "run"), log=quiet)
    assert summary["steps"] == 6
    assert summary["last_log"]["loss"] < summary["first_log"]["loss"]
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and (tmp_path / "run" / "checkpoint-6").is_dir()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6
    resumed = run_training(_settings(tmp_path, "run", max_steps=9, resume=str(tmp_path / "run" / "checkpoint-6")),
                           log=quiet)
    assert resumed["steps"] == 9
    with pytest.raises(FileNotFoundError, match="--resume: checkpoint folder not found"):
        run_training(_settings(tmp_path, "run", resume=str(tmp_path / "nope")), log=quiet)


def test_bf16_mixed_precision_trains(tmp_path):
    """bfloat16 autocast (on CUDA when there is one, else on CPU): the fused head runs in
    bfloat16 and the loss still falls."""
    summary = run_training(_settings(tmp_path, "bf16", bf16=True, save_steps=100), log=lambda *_: None)
    assert summary["steps"] == 6
    first, last = summary["first_log"]["loss"], summary["last_log"]["loss"]
    assert math.isfinite(last) and last < first


def test_gradient_accumulation_is_exact(tmp_path):
    """2 micro-batches of 4 with the exact accumulator = 1 batch of 8; the approximation differs.
    SGD, as in the distributed test: Adam's m/√v turns float32 reduction-order noise (other on
    CUDA for batches of 4 and 8) into parameter steps of lr size for parameters with ~0 gradient."""
    quiet = lambda *_: None
    kw = dict(max_steps=3, lam=0.5, save_steps=100, optim="sgd", lr=0.5)
    run_training(_settings(tmp_path, "acc", batch_size=4, grad_accum=2, **kw), log=quiet)
    run_training(_settings(tmp_path, "full", batch_size=8, grad_accum=1, **kw), log=quiet)
    run_training(_settings(tmp_path, "approx", batch_size=4, grad_accum=2, exact_dro=False, **kw), log=quiet)
    acc, full, approx = _params(tmp_path / "acc"), _params(tmp_path / "full"), _params(tmp_path / "approx")
    worst = max((acc[k] - full[k]).abs().max().item() for k in full)
    assert worst < 1e-5
    assert max((approx[k] - full[k]).abs().max().item() for k in full) > 10 * max(worst, 1e-7)


@pytest.mark.parametrize("wpo", [False, True], ids=["plain", "wpo"])
def test_one_pass_and_recompute_paths_train_the_same_model(tmp_path, monkeypatch, wpo):
    """The trainer's default, the one-pass fused loss, gives the parameters of the recompute path
    (3 SGD steps, 2 micro-batches, λ = 0.5) within float32 noise; a spy shows which path ran. With
    WPO both paths take ω from the same forward (the one-pass path in DoRALoss, the recompute path
    in policy_logps), and WPO changes the result."""
    import robalign.ops.one_pass as one_pass_module

    calls = []
    real = one_pass_module.linear_dora_loss
    monkeypatch.setattr(one_pass_module, "linear_dora_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    quiet = lambda *_: None
    kw = dict(max_steps=3, lam=0.5, save_steps=100, optim="sgd", lr=0.5, batch_size=4, grad_accum=2, wpo=wpo)
    run_training(_settings(tmp_path, "one", **kw), log=quiet)
    assert len(calls) == 6                                  # 3 steps × 2 micro-batches
    run_training(_settings(tmp_path, "re", one_pass=False, **kw), log=quiet)
    assert len(calls) == 6
    one, re_ = _params(tmp_path / "one"), _params(tmp_path / "re")
    assert max((one[k] - re_[k]).abs().max().item() for k in one) < 1e-5
    if wpo:
        run_training(_settings(tmp_path, "plain", **{**kw, "wpo": False}), log=quiet)
        plain = _params(tmp_path / "plain")
        assert max((one[k] - plain[k]).abs().max().item() for k in one) > 1e-4


def test_the_loss_buffers_are_freed_before_the_models_backward(tmp_path, monkeypatch):
    """The one-pass loss keeps its chunk of logits for its next call (robalign.ops.workspace); a training
    step frees it once its forward is done, so the model's backward, where the step's memory peaks,
    has that memory: when the loss's backward runs, the thread keeps no buffer."""
    from robalign.ops import one_pass, workspace

    held = []
    real = one_pass.FormedGradient.backward

    def spy(ctx, grad_out):
        held.append(sorted(name for name, buffer in vars(workspace._KEPT).items() if buffer is not None))
        return real(ctx, grad_out)

    monkeypatch.setattr(one_pass.FormedGradient, "backward", staticmethod(spy))
    run_training(_settings(tmp_path, "free", max_steps=2, save_steps=100), log=lambda *_: None)
    assert held == [[]] * 4                                 # 2 steps × 2 micro-batches


def test_bad_inputs(tmp_path, capsys):
    from robalign.app.commands.cli import main

    assert main(["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x")]) == 2
    assert "model path not found" in capsys.readouterr().err
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "bad.jsonl:1: missing field `rejected`" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        load_settings(cfg)


# Launchers (torchrun, accelerate, two nodes, DeepSpeed ZeRO-2/3) against one process: tests/test_engines.py


def test_lora_trains_only_the_adapters(tmp_path):
    pytest.importorskip("peft", reason="--lora needs peft")
    summary = run_training(_settings(tmp_path, "lora", lora=True, max_steps=4, save_steps=100, lr=1e-2),
                           log=lambda *_: None)
    assert summary["steps"] == 4
    assert summary["last_log"]["rewards/accuracy"] >= 0.0
    saved = list((tmp_path / "lora" / "final").glob("adapter_model.safetensors"))
    assert saved, "a LoRA run saves the adapter"
    from safetensors.torch import load_file

    adapter = load_file(str(saved[0]))
    assert all("lora_" in k for k in adapter) and any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_an_evaluation_set_and_the_model_card(tmp_path):
    """`--eval-data`: the held-out file's reference log-probs come from the initial policy, its
    loss and reward metrics are logged during training and in `summary.json`, and the evaluation
    equals the DoRA loss of the trained policy on that file computed directly; `final/README.md`
    records the run."""
    from robalign.app.data.toy import ToySettings, make_toy_data, write_jsonl

    train, test = make_toy_data(ToySettings(n_train=64, n_test=16, seed=5))
    data = write_jsonl(tmp_path / "train.jsonl", train, fields=("prompt", "chosen", "rejected"))
    held = write_jsonl(tmp_path / "test.jsonl", test, fields=("prompt", "chosen", "rejected"))
    summary = run_training(_settings(tmp_path, "ev", data=str(data), eval_data=str(held), eval_steps=2, max_steps=4,
                                     save_steps=100), log=lambda *_: None)
    evaluation = summary["eval"]
    assert {"eval_loss", "eval_rewards/accuracy", "eval_rewards/margin"} <= set(evaluation)
    assert math.isfinite(evaluation["eval_loss"]) and 0 <= evaluation["eval_rewards/accuracy"] <= 1
    state = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert state["eval"]["eval_loss"] == pytest.approx(evaluation["eval_loss"])
    # directly: the trained policy against the initial model on the held-out file, batches of 8 in order
    from transformers import AutoModelForCausalLM

    from robalign import DoRALoss
    from robalign.app.training.causal_lm import policy_logps

    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ev" / "final")).eval()
    initial, tokenizer = embedded_model(seed=0)
    held_set = PreferenceDataset.from_file(held, prepare_tokenizer(tokenizer, log=lambda *_: None), max_length=64,
                                           max_prompt_length=32)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    losses, accuracies = [], []
    with torch.no_grad():
        for start in range(0, len(held_set), 8):
            batch = collate(held_set.groups[start:start + 8])
            ref, _ = policy_logps(initial.eval(), batch)
            logps, counts = policy_logps(policy, batch)
            out = DoRALoss("dpo", beta=0.1, lam=1.0).from_logps(logps, counts, ref_logps=ref)
            losses.append(float(out.loss))
            accuracies.append(float(out.reward_accuracy))
    assert evaluation["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert evaluation["eval_rewards/accuracy"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-6)
    card = (tmp_path / "ev" / "final" / "README.md").read_text()
    assert "library_name: transformers" in card and "| objective | dpo |" in card and "eval_loss" in card
    with pytest.raises(FileNotFoundError, match="--eval-data: no such file"):
        run_training(_settings(tmp_path, "bad", eval_data=str(tmp_path / "nope.jsonl")), log=lambda *_: None)


def test_ld_alpha_in_the_trainer_is_doralosss(tmp_path, tokenizer):
    """`DoRAConfig(ld_alpha=α)`: the trainer's log-probs (fused head, two passes) and its loss equal
    DoRALoss(ld_alpha=α) on the logits of the same batch (float64 model, 1e-9)."""
    from robalign import DoRALoss
    from robalign.app.training.config import DoRAConfig
    from robalign.app.training.trainer import DoRATrainer, policy_logps
    from robalign.ops import shift_labels
    from transformers import TrainingArguments

    path = write(tmp_path / "d.jsonl", [{"prompt": "tell me about the ocean .", "chosen": "wave tide coral reef",
                                         "rejected": "thing"}, {"prompt": "tell me about the city .",
                                         "chosen": "street", "rejected": "stuff whatever really"}])
    dataset = PreferenceDataset.from_file(path, tokenizer, max_length=32, max_prompt_length=16)
    model = embedded_model(seed=0)[0].double()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    trainer = DoRATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          dora=DoRAConfig(ld_alpha=0.3, lam=0.5))
    trainer.compute_reference_logps(progress=False)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(dataset.groups)
    samples = trainer.dora_samples(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = DoRALoss("dpo", beta=0.1, lam=0.5, ld_alpha=0.3, backend="reference")(
        logits=logits, labels=shift_labels(batch["labels"]), ref_logps=batch["ref_logps"].double())
    torch.testing.assert_close(samples.policy_logps, want.policy_logps, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(samples.losses, want.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batch["ref_logps"].double(), want.policy_logps.detach(), rtol=1e-6, atol=1e-5)
    plain, _ = policy_logps(model, batch)
    assert not torch.allclose(samples.policy_logps, plain)                       # the tails are down-weighted


def test_evaluate_before_training_takes_the_reference_first(tmp_path, tokenizer):
    """`DoRATrainer.evaluate()` on a fresh trainer: the evaluation set's reference log-probs come
    from the initial policy, so every log-ratio is 0 and the loss is log 2; after training without a
    `ref_model` the reference can no longer be taken, which is a clear error."""
    from transformers import TrainingArguments

    from robalign.app.training.config import DoRAConfig
    from robalign.app.training.trainer import DoRATrainer

    path = write(tmp_path / "d.jsonl", [{"prompt": "tell me about the ocean .", "chosen": "wave tide", "rejected": "thing"}
                                        for _ in range(4)])
    dataset = PreferenceDataset.from_file(path, tokenizer, max_length=32, max_prompt_length=16)
    held = PreferenceDataset.from_file(path, tokenizer, max_length=32, max_prompt_length=16)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                             max_steps=1, save_strategy="no", learning_rate=0.5, optim="sgd")
    trainer = DoRATrainer(model=embedded_model(seed=0)[0], args=args, train_dataset=dataset, eval_dataset=held,
                          processing_class=tokenizer, dora=DoRAConfig(lam=float("inf")))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)
    fresh = PreferenceDataset.from_file(path, tokenizer, max_length=32, max_prompt_length=16)
    trainer.train()
    with pytest.raises(RuntimeError, match="reference log-probs must be computed before training moves the policy"):
        trainer.evaluate(fresh)


def test_reference_free_training_runs_no_reference(tmp_path):
    """`robalign train --reference-free`: no reference log-probs are computed or cached, the first
    loss is KL-DRO of DPO at r = logp (not log 2), and the policy trains."""
    summary = run_training(_settings(tmp_path, "free", reference_free=True, max_steps=3, logging_steps=1, lam=1.0),
                           log=lambda *_: None)
    assert summary["reference_cache"].startswith("not needed")
    assert not list((tmp_path / "free").glob("ref_logps-*.pt"))
    first, last = summary["first_log"], summary["last_log"]
    assert first["loss"] != pytest.approx(math.log(2), rel=1e-3) and last["loss"] != first["loss"]
