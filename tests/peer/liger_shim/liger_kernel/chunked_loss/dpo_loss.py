"""Liger-Kernel's ``LigerFusedLinearDPOLoss`` / ``LigerFusedLinearDPOFunction`` interface over
robalign: the preference loss is ``robalign.FusedLinearDoRALoss`` (the one-pass fused loss) with the
weighted mean (λ = ∞) and no DoRA weights — plain DPO, as Liger computes it; Liger's
``average_log_prob`` is ``Objective(..., average_logps=True)``; its optional NLL term is the chosen
rows' token-mean cross-entropy through ``robalign.linear_sequence_logps``.

Rows: Liger stacks every chosen row before every rejected one; robalign is group-major, so the rows
are reordered with ``pairs_to_group_major`` on the way in and the per-pair outputs are read per pair.
The auxiliary outputs are Liger's: the chosen and rejected log-probs (averaged when it averages),
the mean of every chosen and rejected logit (all positions, all of V: Liger's definition, formed
here as ``(Σ_t h_t)·(Σ_v W_v) + rows·T·Σ b`` without the logits), the NLL, and the rewards.
"""

import math

import torch

import robalign
from robalign import FusedLinearDoRALoss, KLDRO, LossParams, Objective, pairs_to_group_major

#: Liger's loss types → robalign's objectives, and which of Liger's knobs each one reads
LOSS_TYPES = {
    "sigmoid": ("dpo", ()), "hinge": ("hinge", ()), "exo_pair": ("exo_pair", ("label_smoothing",)),
    "nca_pair": ("nca_pair", ()), "robust": ("robust", ("label_smoothing",)), "bco_pair": ("bco_pair", ()),
    "sppo_hard": ("sppo_hard", ()), "apo_zero": ("apo_zero", ()), "apo_down": ("apo_down", ()),
    "discopop": ("discopop", ("tau",)),
}


def _check(loss_type, label_smoothing):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {', '.join(LOSS_TYPES)}")
    if loss_type == "exo_pair" and label_smoothing <= 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'.")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")


def _logits_mean(hidden, weight, bias, rows, positions):
    """Σ of every logit of ``hidden @ Wᵀ + b`` over all positions and V, divided as Liger divides."""
    total = hidden.float().sum(dim=(0, 1)) @ weight.float().sum(0)
    if bias is not None:
        total = total + hidden.shape[0] * hidden.shape[1] * bias.float().sum()
    return total / (rows * positions * weight.shape[0])


def dpo(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, ignore_index=-100,
        beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False, chunk_size=1,
        loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05, alpha=1.0):
    _check(loss_type, label_smoothing)
    name, knobs = LOSS_TYPES[loss_type]
    hparams = {"beta": beta}
    if "label_smoothing" in knobs:
        hparams["label_smoothing"] = label_smoothing
    if "tau" in knobs:
        hparams["tau"] = discopop_tau
    pairs = _input.shape[0] // 2
    labels = pairs_to_group_major(target)
    ref_logps = None
    if use_ref_model:
        with torch.no_grad():
            ref_logps, _ = robalign.linear_sequence_logps(pairs_to_group_major(ref_input), ref_weight, labels,
                                                          bias=ref_bias, ignore_index=ignore_index)
    loss_fn = FusedLinearDoRALoss(Objective(name, average_logps=average_log_prob, **hparams), KLDRO(math.inf),
                                  params=LossParams(ignore_index=ignore_index, reference_free=not use_ref_model))
    out = loss_fn(pairs_to_group_major(_input), weight, labels, ref_logps, bias=bias)
    loss = out.loss
    nll = torch.zeros((), device=_input.device)
    if compute_nll_loss:
        logps, counts = robalign.linear_sequence_logps(_input[:pairs], weight, target[:pairs], bias=bias,
                                                       ignore_index=ignore_index)
        nll = -logps.sum() / counts.sum()
        loss = loss + alpha * nll
    logps = out.policy_logps.detach().view(pairs, 2)
    if average_log_prob:
        logps = logps / out.counts.view(pairs, 2).clamp(min=1)
    with torch.no_grad():
        aux = (logps[:, 0], logps[:, 1],
               _logits_mean(_input[:pairs], weight, bias, pairs, _input.shape[1]),
               _logits_mean(_input[pairs:], weight, bias, pairs, _input.shape[1]),
               nll.detach(), out.chosen_rewards, out.rejected_rewards)
    return loss, tuple(a.to(_input.dtype) if a.dim() == 0 else a.to(_input.dtype) for a in aux)


class LigerFusedLinearDPOFunction:
    """``LigerFusedLinearDPOFunction.apply(...)``: Liger's positional contract, robalign's loss."""

    @staticmethod
    def apply(*args, **kwargs):
        return dpo(*args, **kwargs)


class LigerFusedLinearDPOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True,
                 use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
                 discopop_tau=0.05):
        super().__init__()
        _check(loss_type, label_smoothing)
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return dpo(_input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, self.ignore_index, self.beta,
                   self.compute_nll_loss, self.compiled, self.use_ref_model, self.average_log_prob, self.chunk_size,
                   self.loss_type, self.label_smoothing, self.discopop_tau, self.alpha)
