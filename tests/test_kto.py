"""KTO and unpaired APO-zero: one labelled completion per sample, checked against TRL 1.16's own
``KTOTrainer._compute_loss`` (run on a stand-in trainer whose model returns given per-token
log-probs), and the unpaired layout's errors and distributed reference point."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import robalign
from robalign import objectives
from robalign.losses.unpaired import reference_point
from conftest import run_on_gloo_ranks

D = torch.float64


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(t):
        return t.reshape(-1) if t.dim() == 0 else t


class _Outputs:
    def __init__(self, per_token_logps):
        self.log_probs = per_token_logps
        zeros = torch.zeros_like(per_token_logps.detach())
        self.entropy, self.mean_logits = zeros, zeros


def trl_kto_loss(loss_type, token_logps, kl_token_logps, mask, kl_mask, label, ref, kl_ref, *, beta, desirable_weight,
                 undesirable_weight):
    """TRL 1.16's ``KTOTrainer._compute_loss`` itself, with precomputed reference log-probs; the
    stand-in model returns ``token_logps`` for the completion rows, ``kl_token_logps`` for the KL rows."""
    from trl import KTOTrainer

    calculate_kl = loss_type == "kto"
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=calculate_kl, loss_type=loss_type, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    ids = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.long)
    kl_ids = torch.ones(kl_mask.shape[0], kl_mask.shape[1] + 1, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": torch.cat([torch.zeros_like(mask[:, :1]), mask], 1),
              "label": label, "ref_logps": ref}
    if calculate_kl:
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids),
                      KL_completion_mask=torch.cat([torch.zeros_like(kl_mask[:, :1]), kl_mask], 1), ref_KL_logps=kl_ref)

    def model(**kwargs):
        return _Outputs(kl_token_logps if kwargs["input_ids"] is kl_ids else token_logps)

    return KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False), trainer._metrics["train"]


def unpaired_batch(b=7, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=gen) < 0.8).long()
    kl_mask = (torch.rand(b, t, generator=gen) < 0.8).long()
    token_logps = -torch.rand(b, t, generator=gen, dtype=D) * 3 * mask
    kl_token_logps = -torch.rand(b, t, generator=gen, dtype=D) * 3 * kl_mask
    label = torch.tensor([True, False, True, True, False, False, True][:b])
    ref = token_logps.sum(1) + torch.randn(b, generator=gen, dtype=D)
    kl_ref = kl_token_logps.sum(1) + torch.randn(b, generator=gen, dtype=D) - 1.0    # z₀ > 0 here
    return token_logps, kl_token_logps, mask, kl_mask, label, ref, kl_ref


SETTINGS = [("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 1.0), ("kto", 2.0, 1.0, 0.7),
            ("apo_zero_unpaired", 0.1, 1.0, 1.0), ("apo_zero_unpaired", 0.5, 1.0, 1.5)]


@pytest.mark.parametrize("loss_type,beta,dw,uw", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_gradients_and_rewards_equal_trls_kto_trainer(loss_type, beta, dw, uw, seed):
    """TRL's KTO loss (its mean over the batch, desirable and undesirable alike) equals DoRALoss's
    with λ = ∞ and no weights, and its gradient with respect to every token's log-prob, to 1e-12 in
    float64; the reference point z₀ (TRL's ``kl`` metric) and the reward means agree too."""
    pytest.importorskip("trl")
    token_logps, kl_token_logps, mask, kl_mask, label, ref, kl_ref = unpaired_batch(seed=seed)
    theirs = token_logps.clone().requires_grad_(True)
    trl_loss, metrics = trl_kto_loss(loss_type, theirs, kl_token_logps, mask, kl_mask, label, ref, kl_ref, beta=beta,
                                     desirable_weight=dw, undesirable_weight=uw)
    (trl_grad,) = torch.autograd.grad(trl_loss, theirs)

    mine = token_logps.clone().requires_grad_(True)
    loss_fn = robalign.DoRALoss(loss_type, beta=beta, lam=float("inf"), desirable_weight=dw, undesirable_weight=uw)
    kl = dict(kl_logps=kl_token_logps.sum(1), kl_ref_logps=kl_ref) if loss_type == "kto" else {}
    out = loss_fn.from_logps(mine.sum(1), mask.sum(1), ref_logps=ref, scores=label.to(D), **kl)
    (my_grad,) = torch.autograd.grad(out.loss, mine)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(my_grad, trl_grad, rtol=1e-12, atol=1e-14)
    assert float(out.kl if out.kl is not None else 0.0) == pytest.approx(metrics["kl"][0], rel=1e-12, abs=1e-15)
    assert out.chosen_rewards.nanmean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-12)
    assert out.rejected_rewards.nanmean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-12)
    assert out.reward_margin.item() == pytest.approx(metrics["rewards/margins"][0], rel=1e-12)


def test_the_reference_point_shifts_the_log_ratio_and_is_clamped_at_zero():
    """ℓ = λ_D(1 − σ(β(r − z₀))) for a desirable completion, λ_U(1 − σ(β(z₀ − r))) for an undesirable
    one; z₀ = max(0, mean(kl_logps − kl_ref_logps)), detached; apo_zero_unpaired is KTO at z₀ = 0."""
    r = torch.tensor([[0.5], [-1.0]], dtype=D)
    label = torch.tensor([[1.0], [0.0]], dtype=D)
    got = objectives.kto(r, torch.zeros_like(r), scores=label, kl=0.25, beta=2.0, desirable_weight=1.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))                                     # noqa: E731
    want = torch.tensor([1.5 * sigmoid(-2.0 * 0.25), sigmoid(-2.0 * 1.25)], dtype=D)   # 1 − σ(x) = σ(−x)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(objectives.kto(r, torch.zeros_like(r), scores=label, kl=0.0),
                               objectives.apo_zero_unpaired(r, torch.zeros_like(r), scores=label), rtol=1e-15, atol=0)
    assert reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-1.0, -2.0])).item() == 0.0   # mean −2.5 → 0
    kl_logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = reference_point(kl_logps, torch.tensor([-3.0, -3.0]))
    assert z0.item() == 1.5 and not z0.requires_grad


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired", "apo_zero", "apo_down"])
def test_saturated_samples_keep_their_digits_in_float32(name):
    """1 − σ(x) is computed as σ(−x) and σ as exp(log σ): at saturated samples (σ(x) ≈ 1 − 3e-4
    here) the float32 losses and gradients stay within 1e-6 of float64 (1 − σ(x), or
    torch.sigmoid's backward, was 1e-4 off: of float32's 24 bits of σ(x) ≈ 1, 12 survive the
    subtraction)."""
    k = 2 if name.startswith("apo_") and not name.endswith("unpaired") else 1
    logps = torch.tensor([[40.0, -40.0][:k], [-40.0, 40.0][:k]], dtype=D)     # β·r = ±8 at β = 0.2
    labels = torch.tensor([[1.0, 0.0][:k], [0.0, 1.0][:k]], dtype=D)      # desirable/chosen first

    def loss_and_grad(dtype):
        x = logps.to(dtype).requires_grad_(True)
        kl = {"kl": 0.0} if name == "kto" else {}
        loss = objectives.get(name)(x, torch.zeros_like(x), beta=0.2, scores=labels.to(dtype), **kl)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.double(), grad.double()

    (loss32, grad32), (loss64, grad64) = loss_and_grad(torch.float32), loss_and_grad(D)
    torch.testing.assert_close(loss32, loss64, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad32, grad64, rtol=1e-6, atol=1e-12)


def _reference_point_worker(rank):
    import torch.distributed as dist

    rows = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0])][rank]
    return reference_point(rows, torch.zeros_like(rows), group=dist.group.WORLD).item()


def test_the_reference_point_spans_the_ranks():
    """Across ranks z₀ is the mean over every rank's mismatched rows (one SUM all-reduce)."""
    assert run_on_gloo_ranks(_reference_point_worker, 2) == [pytest.approx(13 / 4)] * 2


def test_unpaired_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="group_size` must be 1"):
        robalign.DoRALoss("kto", group_size=2)
    with pytest.raises(ValueError, match="`ld_alpha` compares the candidates"):
        robalign.DoRALoss("kto", ld_alpha=0.5)
    with pytest.raises(ValueError, match="`wpo` compares the candidates"):
        robalign.DoRALoss("apo_zero_unpaired", wpo=True)
    with pytest.raises(ValueError, match="combines with no other objective"):
        robalign.DoRALoss("kto+sft")
    loss_fn = robalign.DoRALoss("kto")
    logps, counts, ref = torch.randn(4), torch.ones(4, dtype=torch.long), torch.randn(4)
    with pytest.raises(ValueError, match="needs `scores`: the label"):
        loss_fn.from_logps(logps, counts, ref_logps=ref, kl_logps=logps, kl_ref_logps=ref)
    with pytest.raises(ValueError, match="1 \\(desirable\\) or 0 \\(undesirable\\)"):
        loss_fn.from_logps(logps, counts, ref_logps=ref, scores=torch.tensor([1.0, 0.0, 2.0, 1.0]),
                           kl_logps=logps, kl_ref_logps=ref)
    with pytest.raises(ValueError, match="needs `kl_logps` and `kl_ref_logps`"):
        loss_fn.from_logps(logps, counts, ref_logps=ref, scores=torch.ones(4))
    with pytest.raises(ValueError, match="takes none"):
        robalign.DoRALoss("dpo").from_logps(logps, counts, ref_logps=ref, kl_logps=logps[:2], kl_ref_logps=ref[:2])
    with pytest.raises(ValueError, match=r"\[B, 1\] for an unpaired objective"):
        objectives.kto(torch.randn(3, 2), torch.randn(3, 2), scores=torch.ones(3, 2), kl=0.0)
    with pytest.raises(ValueError, match="`kl` is required"):
        objectives.kto(torch.randn(3, 1), torch.randn(3, 1), scores=torch.ones(3, 1))


def test_weights_and_the_dro_reduction_apply_to_unpaired_losses():
    """The DoRA weights and KL-DRO act on KTO's per-sample losses as on any objective's."""
    gen = torch.Generator().manual_seed(4)
    logps, ref = torch.randn(6, generator=gen, dtype=D), torch.randn(6, generator=gen, dtype=D)
    label = torch.tensor([1.0, 0, 1, 0, 1, 1], dtype=D)
    weights = torch.rand(6, generator=gen, dtype=D) + 0.5
    kl = dict(kl_logps=torch.randn(6, generator=gen, dtype=D), kl_ref_logps=torch.randn(6, generator=gen, dtype=D))
    out = robalign.DoRALoss("kto", beta=0.3, lam=0.5).from_logps(logps, torch.ones(6, dtype=torch.long), ref_logps=ref,
                                                                 scores=label, weights=weights, **kl)
    losses = objectives.kto(logps[:, None], ref[:, None], scores=label[:, None], kl=out.kl, beta=0.3)
    torch.testing.assert_close(out.loss, robalign.ground_truth.kl_dro(losses, weights, 0.5), rtol=1e-12, atol=0)
