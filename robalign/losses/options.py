"""The options of :class:`robalign.DoRALoss` that a call rarely sets, grouped so that the common
call stays short: :class:`LossParams` (how the loss runs, fixed at construction) and
:class:`BatchExtras` (what some batches carry besides log-probs, labels and weights)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["LossParams", "BatchExtras"]


@dataclass(frozen=True)
class LossParams:
    """How a :class:`robalign.DoRALoss` runs: options most calls leave at their defaults.

    group_size: K, the candidates per sample, rows group-major (``None``: 2, or 1 for an unpaired
        objective such as KTO, one labelled completion per sample, see :mod:`robalign.losses.unpaired`).
    ignore_index: the label of unscored tokens.
    backend: the heavy op's backend (``None``: ``$ROBALIGN_BACKEND``, else the fastest available;
        see :func:`robalign.sequence_logps`).
    one_pass: with hidden states and the head (:class:`robalign.FusedLinearDoRALoss`), form the loss
        **and** its gradients in one forward (:mod:`robalign.ops.one_pass`: three matmul passes
        instead of four, the backward only scales). It runs when gradients are wanted, the reduction
        takes a gradient formed ahead (KL-DRO does) and the backend is a kernel one; the outputs'
        ``policy_logps`` and ``logratios`` then carry no graph (only ``loss`` does). False: the
        recompute path (log-probs with a graph, autograd through the objective).
    fp32_head_grad: in the one-pass path, accumulate a bfloat16/float16 head's gradient in float32
        (one extra ``[V, H]`` float32 buffer); False keeps the head's dtype (one rounding per chunk).
    ld_alpha: LD-DPO's length desensitisation α ∈ [0, 1] (Liu et al. 2024, arXiv 2409.06411; TRL's
        ``ld_alpha``): a response's log-prob counts its first ``min_k |y_k|`` scored tokens (the length
        its group shares) fully and the rest α times, ``logp = logp_shared + α·logp_tail``, for the
        policy and for a reference given as logits or hidden states (``ref_logps`` given directly are
        taken as they are). Padded rows only; the recompute path (two fused log-prob passes).
    wpo: WPO's weighting (Zhou et al. 2024, arXiv 2406.11827; TRL's ``use_weighting``): each sample's
        weight times ``Π_k ω_k``, ``ω = exp(mean_t(log p(y_t) − log Σ_v p(v)²))`` of the policy, without
        gradient (:func:`robalign.ops.wpo.wpo_weights`: one more chunked pass over the head). Padded
        rows only.
    reference_free: for an objective with a reference model, the reference's log-probs are taken as
        0 (``r = logp``; the DPO family without a reference, TRL's former ``reference_free``);
        reference inputs are then refused.
    process_group, ddp_average: the ranks whose samples share the reduction's normaliser (``None``:
        the default group when torch.distributed is initialised) and DDP's averaging convention
        (see :func:`robalign.kl_dro`).

    Logits given to :class:`robalign.DoRALoss` are the head's output, so a head transform
    (:class:`robalign.HeadTransform`) belongs to :class:`robalign.FusedLinearDoRALoss` only.
    """

    group_size: int | None = None
    ignore_index: int = -100
    backend: str | None = None
    one_pass: bool = True
    fp32_head_grad: bool = True
    ld_alpha: float | None = None
    wpo: bool = False
    reference_free: bool = False
    process_group: Any = None
    ddp_average: bool = True


@dataclass(frozen=True)
class BatchExtras:
    """What some batches carry besides the policy's log-probs (or logits), labels, the reference's
    log-probs and the weights: each field is ``None`` unless the batch has it. S sequences, B samples.

    scores: ``[S]`` or ``[B, K]`` candidate scores, higher is better (listwise objectives; an unpaired
        objective's 1 desirable / 0 undesirable labels).
    group_ids: ``[B]`` the group of each sample, for :class:`robalign.GroupDRO`.
    cu_seqlens: ``[S + 1]`` boundaries of packed rows (labels ``[N]``, logits ``[N, V]``).
    accumulator: the reduction's accumulator when the batch is one micro-batch of an accumulated step
        (``loss_fn.reduction.accumulator(params)``): ``loss`` is then this micro-batch's share.
    kl_logps, kl_ref_logps: ``[B]`` policy and reference log-probs of mismatched completions, for KTO's
        reference point; kl_counts: ``[B]`` their scored tokens (needed with averaged log-probs).
    ref_logits, ref_hidden, ref_head_weight, ref_head_bias: the reference's log-probs computed here,
        without gradient, from its logits or hidden states and head (instead of ``ref_logps``).
    weight_factors: ``[B]`` factors multiplying the sample weights (WPO's, computed elsewhere).
    token_stats: also give the policy's per-token statistics, ``DoRAOutput.token_stats`` (entropy, mean
        logit and top-1 hits summed per sequence: TRL's logged ones, :func:`robalign.ops.token_stats.token_stats`),
        from the logits or the hidden states and head. The one-pass loss forms them from its own
        products, with no pass of their own, for a head without bias or soft-cap whose hidden states
        take a gradient; elsewhere they take one more pass, without gradient.
    """

    scores: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    accumulator: Any = None
    kl_logps: torch.Tensor | None = None
    kl_ref_logps: torch.Tensor | None = None
    kl_counts: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    ref_head_weight: torch.Tensor | None = None
    ref_head_bias: torch.Tensor | None = None
    weight_factors: torch.Tensor | None = None
    token_stats: bool = False

    def as_dict(self) -> dict:
        """The fields by name (a dict of the same values, no copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
