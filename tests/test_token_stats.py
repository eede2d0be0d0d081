"""The per-token statistics logged beside the loss (robalign.ops.token_stats): the entropy of the
policy's next-token distribution and the mean logit, summed per sequence over the scored tokens,
from logits or chunk by chunk from hidden states and the head (with its transform), padded or
packed — against the materialised float64 computation (1e-12) — and as the trainer logs them,
against TRL's DPOTrainer (its fused head: float32; see the test for the bounds)."""

import copy

import pytest
import torch

from robalign.ops.head import HeadTransform
from robalign.ops.token_stats import token_stats
from conftest import packed_from_padded

D = torch.float64


def materialised(z, labels):
    scored = labels != -100
    h = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    top1 = (z.argmax(-1) == labels) & scored
    return (h * scored).sum(-1), (z.mean(-1) * scored).sum(-1), scored.sum(-1), top1.sum(-1)


@pytest.mark.parametrize("transform", [None, HeadTransform(softcap=2.0, scale=0.7, temperature=1.3)])
def test_entropy_and_mean_logit_from_logits_and_from_the_head(transform):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=gen, dtype=D)
    weight = torch.randn(50, 8, generator=gen, dtype=D)
    bias = torch.randn(50, generator=gen, dtype=D)
    labels = torch.randint(50, (3, 6), generator=gen)
    labels[:, :2] = -100
    labels[1] = -100                                                       # an all-ignored row
    z = hidden @ weight.T + bias
    if transform is not None:
        z = transform.apply_(z.clone())
    labels[2, 2:5] = z[2, 2:5].argmax(-1)                                  # three top-1 tokens
    want = materialised(z, labels)
    assert int(want[3][2]) >= 3
    for got in (token_stats(labels, logits=z), token_stats(labels, hidden=hidden, head_weight=weight, head_bias=bias,
                                                           transform=transform, chunk_rows=4)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.to(g.device).double(), rtol=1e-6, atol=1e-6)
    assert got[2][1] == 0 and got[0][1] == 0
    h_packed, y_packed, cu = packed_from_padded(hidden, labels, [6, 3, 5])
    packed = token_stats(y_packed, hidden=h_packed, head_weight=weight, head_bias=bias, transform=transform,
                         cu_seqlens=cu)
    lengths = [6, 3, 5]
    cut = labels.clone()
    for row, n in enumerate(lengths):
        cut[row, n:] = -100
    for g, w in zip(packed, materialised(z, cut)):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [None, HeadTransform(softcap=2.0, scale=0.7, temperature=1.3)])
def test_the_cpp_kernel_gives_the_aten_statistics(dtype, transform, monkeypatch):
    """On CPU float32/bfloat16 tensors the C++ backend's ``rows_token_stats`` reads each chunk's logits
    in their dtype, once: the same sums as the ATen path (which upcasts each chunk to float32 first),
    from logits and from the head, chunks of 5 rows, V 3001 (a tail of every vector width), ties for
    the top-1 (the first maximum counts, as argmax) and a row whose label is a later maximum. Within
    float32 summation order (rtol 1e-5); the top-1 counts exactly."""
    from robalign.ops import token_stats as module

    if module._cpp_rows(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C++ extension here")
    gen = torch.Generator().manual_seed(3)
    v = 3001
    hidden = torch.randn(4, 7, 16, generator=gen).to(dtype)
    weight = (torch.randn(v, 16, generator=gen) / 4).to(dtype)
    logits = (torch.randn(4, 7, v, generator=gen) * 3).to(dtype)
    labels = torch.randint(v, (4, 7), generator=gen)
    labels[:, :2] = -100
    labels[3] = -100
    logits[0, 2, [10, 20]] = 50.0                                          # a tie: the label is the first maximum
    logits[0, 3, [10, 20]] = 50.0                                          # ... and the second: not top-1
    labels[0, 2], labels[0, 3] = 10, 20
    labels[1, 4] = int(logits[1, 4].float().argmax())
    cases = [dict(logits=logits), dict(hidden=hidden, head_weight=weight)]
    for kwargs in cases:
        got = token_stats(labels, **kwargs, transform=transform, chunk_rows=5)
        with monkeypatch.context() as m:
            m.setattr(module, "_cpp_rows", lambda source: None)
            want = token_stats(labels, **kwargs, transform=transform, chunk_rows=5)
        for g, w in zip(got[:2], want[:2]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    if transform is None:
        assert int(token_stats(labels, logits=logits)[3][0]) >= 1


def test_the_cpp_kernel_keeps_non_finite_rows_non_finite():
    """A NaN logit, an infinite one, a −inf logit: NaN entropy and the infinite mean that float
    arithmetic gives, as the ATen path (0·(−inf) is NaN in its Σ p·z too)."""
    from robalign.ops import cpu

    z = torch.randn(1, 4, 100)
    z[0, 0, 3], z[0, 1, 5], z[0, 2, 7] = float("nan"), float("inf"), -float("inf")
    labels = torch.tensor([3, 5, 1, 2])
    _, entropy, mean, top1 = cpu.rows_token_stats(z, labels, -100)
    assert entropy[:3].isnan().all() and torch.isfinite(entropy[3])
    assert mean[0].isnan() and mean[1] == float("inf") and mean[2] == -float("inf")
    assert top1[0] and top1[1] and not top1[2]


def test_the_trainer_logs_trls_entropy_and_mean_logits(tmp_path):
    """DoRADPOTrainer logs TRL's DPOTrainer's keys — `entropy`, `logits/*`, `logps/*`, `rewards/*`,
    `num_tokens`, `mean_token_accuracy` — as TRL does (first step, the same batch): equal to rtol
    1e-4 (TRL's fused head works in float32), the counts exactly."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from robalign.app.data.toy import ToySettings, make_toy_data
    from robalign.app.commands.train import embedded_model
    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    records, _ = make_toy_data(ToySettings(n_train=8, n_test=0, seed=2, target_fraction=0.5))
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    model, tokenizer = embedded_model(0)
    model = model.double()
    common = dict(per_device_train_batch_size=8, max_steps=1, learning_rate=0.5, optim="sgd", report_to=[],
                  use_cpu=True, save_strategy="no", logging_steps=1)
    logs = []
    for cls, config in ((DPOTrainer, DPOConfig(output_dir=str(tmp_path / "trl"), **common)),
                        (DoRADPOTrainer, DoRADPOConfig(output_dir=str(tmp_path / "dora"), dora_lam=float("inf"),
                                                       dora_weights_column=None, **common))):
        trainer = cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config, train_dataset=dataset,
                      processing_class=tokenizer)
        trainer.train()
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    theirs, mine = logs
    assert mine["entropy"] == pytest.approx(theirs["entropy"], rel=1e-4)
    # the mean logits nearly cancel (~1e-3 from logits of order 1): TRL's float32 sum over the
    # vocabulary is off by up to V·ulp(1) ≈ 1e-5 (measured: 6e-6 on chosen; robalign's is the float64
    # value to 2e-10), so an absolute bound
    for name in ("logits/chosen", "logits/rejected"):
        assert mine[name] == pytest.approx(theirs[name], abs=1e-5), name
    assert mine["logits/chosen"] != pytest.approx(mine["logits/rejected"], rel=1e-3)
    # exactly TRL's keys with TRL's meaning (rewards/accuracy and rewards/margin were logged beside
    # TRL's names, logps/*, num_tokens and mean_token_accuracy were missing), robalign's own under dora/
    common = {"loss", "grad_norm", "learning_rate", "epoch", "step"}
    assert {k for k in mine if k not in common and not k.startswith("dora/")} == set(theirs) - common
    assert {"dora/weights/mean", "dora/dro/ess"} <= set(mine)
    assert mine["num_tokens"] == theirs["num_tokens"] and mine["mean_token_accuracy"] == pytest.approx(
        theirs["mean_token_accuracy"], abs=1e-12)
    for name in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins"):
        assert mine[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
