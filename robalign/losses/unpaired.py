"""Unpaired data (KTO): one completion per sample, labelled desirable or undesirable.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) compares each completion's log-ratio
r = log π(y|x) − log π_ref(y|x) with a reference point z₀, an estimate of KL(π‖π_ref) formed from
**mismatched** pairs: the prompt x_i with the completion y_{i−1} of another sample,

    z₀ = max(0, mean_i [log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)])        detached

The mismatched rows need no gradient (z₀ is a constant of the step), so they are passed apart from
the trained rows: ``kl_logps`` and ``kl_ref_logps`` ``[B]``, one per sample. z₀ couples the batch only
through one detached number; the per-sample losses, the weights and every reduction stay as for
paired data. Its batch is the micro-batch on every rank (one SUM all-reduce of two numbers), as in
TRL's ``KTOTrainer`` (which averages the ranks' means: the same when ranks hold equal batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validation as V

__all__ = ["reference_point", "unpaired_rewards"]


@torch.no_grad()
def reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor, *, group=None) -> torch.Tensor:
    """KTO's reference point ``z₀ = max(0, mean(kl_logps − kl_ref_logps))``, a detached 0-d float64
    tensor, the mean over every rank of ``group`` (when distributed).

    Args:
        kl_logps: ``[B]`` policy log-probs of the mismatched completions (prompt i, completion of another sample).
        kl_ref_logps: ``[B]`` the reference model's log-probs of the same rows.
        group: the process group whose ranks share the batch (``None``: this process only).
    """
    where = "robalign.losses.unpaired.reference_point"
    V.check_tensor(where, "kl_logps", kl_logps, ndim=1, floating=True)
    V.check_tensor(where, "kl_ref_logps", kl_ref_logps, ndim=1, floating=True)
    if kl_logps.shape != kl_ref_logps.shape:
        V.fail(where, f"`kl_ref_logps` must have the shape of `kl_logps` {tuple(kl_logps.shape)}, "
                      f"got {tuple(kl_ref_logps.shape)}")
    diff = kl_logps.detach().double() - kl_ref_logps.detach().double()
    totals = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)])
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)


@torch.no_grad()
def unpaired_rewards(rewards: torch.Tensor, labels: torch.Tensor, shift) -> dict:
    """The reward metrics of unpaired samples: ``chosen_rewards`` ``[B]`` the implicit reward of each
    desirable completion (NaN where undesirable), ``rejected_rewards`` likewise for the undesirable
    ones, ``reward_margin`` the difference of their means (NaN when one class is absent) and
    ``reward_accuracy`` the fraction of completions on their label's side of the reference point
    (reward above β·z₀ when desirable, below when undesirable: the loss is then below half its weight)."""
    desirable = labels > 0.5
    nan = torch.full_like(rewards, float("nan"))
    chosen, rejected = torch.where(desirable, rewards, nan), torch.where(desirable, nan, rewards)
    right = torch.where(desirable, rewards > shift, rewards < shift)
    return dict(chosen_rewards=chosen, rejected_rewards=rejected, reward_accuracy=right.float().mean(),
                reward_margin=chosen.nanmean() - rejected.nanmean())
