"""``DoRALoss``: sequence log-probabilities → base objective → DoRA weights → KL-DRO."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _validation as V
from . import objectives as _objectives
from .dro import DROStats, kl_dro_with_stats
from ..ops import linear_sequence_logps, sequence_logps, sequence_logps_with_ref
from .weights import dora_weights

__all__ = ["DoRALoss", "DoRAOutput"]


@dataclass
class DoRAOutput:
    """What :class:`DoRALoss` returns. B samples of K candidates, S = B·K sequences.

    loss: the scalar to ``backward()``. losses ``[B]``: the base objective per sample.
    weights ``[B]``: the DoRA weight per sample (1 without probs or weights).
    policy_logps ``[S]``; logratios ``[S]`` (``None`` for reference-free objectives).
    chosen_rewards / rejected_rewards ``[B]``: implicit rewards (β·logratio, or β·logp/|y|
    without a reference) of the best and worst candidate; reward_accuracy and reward_margin:
    their batch mean comparison. dro: :class:`robalign.DROStats` of the DRO weights.
    The reward statistics are detached.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    weights: torch.Tensor
    policy_logps: torch.Tensor
    logratios: torch.Tensor | None
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    dro: DROStats


class DoRALoss(nn.Module):
    """Distribution-aware robust alignment loss (DoRA, arXiv 2504.05831), as a module.

        ℓ_i = objective(logp_policy, logp_ref)_i          per sample i (K candidates)
        w_i = mean_k dora_weights(p_ik, α, β_mix, class_ratio)
        L   = λ · log( (1/N) Σ_i exp(w_i·ℓ_i/λ) )           over the whole batch (and ``group``)

    Args:
        objective: a name from :mod:`robalign.objectives`.
        beta: the objective's β (ignored by objectives without one: rrhf, lire).
        lam: the DRO temperature λ (``float('inf')``: weighted mean; < 0: soft minimum).
        alpha: the target fraction α of the training mixture; required with ``probs``.
        synthetic_fraction: the mixture's β (default ``1 − α``); a number or a tensor per
            candidate position.
        class_ratio: ``n_target / n_source`` of the classifier's training set.
        group_size: K, the candidates per sample (rows are group-major).
        ignore_index: label value of unscored tokens.
        group, ddp_average: the process group of the DRO normaliser (see :func:`robalign.kl_dro`).
        backend: backend of the heavy op (see :func:`robalign.sequence_logps`).
        **objective_kwargs: the objective's other hyper-parameters (e.g. ``label_smoothing``).
    """

    def __init__(self, objective: str = "dpo", beta: float = 0.1, lam: float = 1.0, alpha=None,
                 synthetic_fraction=None, class_ratio: float = 1.0, group_size: int = 2,
                 ignore_index: int = -100, *, group=None, ddp_average: bool = True,
                 backend: str | None = None, **objective_kwargs):
        super().__init__()
        where = "robalign.DoRALoss"
        self.objective_fn = _objectives.get(objective)
        V.check_lam(where, lam)
        if alpha is not None:
            V.check_number(where, "alpha", alpha, low=0, high=1, low_open=True)
        if synthetic_fraction is not None:
            V.check_number(where, "synthetic_fraction", synthetic_fraction, low=0, allow_tensor=True)
        V.check_number(where, "class_ratio", class_ratio, low=0, low_open=True)
        if class_ratio == float("inf"):
            V.fail(where, "`class_ratio` must be finite")
        V.check_int(where, "ignore_index", ignore_index)
        if not isinstance(group_size, int) or group_size < 2:
            V.fail(where, f"`group_size` must be an int ≥ 2 (candidates per sample), got {group_size!r}")
        if _objectives.is_pairwise(objective) and group_size != 2:
            V.fail(where, f"objective {objective!r} is pairwise: `group_size` must be 2, got {group_size}")
        self.objective = objective
        self.beta, self.lam, self.alpha = beta, lam, alpha
        self.synthetic_fraction, self.class_ratio = synthetic_fraction, class_ratio
        self.group_size, self.ignore_index = group_size, ignore_index
        self.group, self.ddp_average, self.backend = group, ddp_average, backend
        self.needs_reference = _objectives.needs_reference(objective)
        takes = _objectives.hyperparameters(objective)
        self.hparams = dict(objective_kwargs)
        if "beta" in takes:
            self.hparams["beta"] = beta
        unknown = set(self.hparams) - set(takes)
        if unknown:
            V.fail(where, f"objective {objective!r} has no hyper-parameter {sorted(unknown)}; "
                          f"it takes {sorted(takes)}", TypeError)
        _objectives.check_hyperparameters(objective, self.hparams, where)     # at construction, not first use

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, lam={self.lam}, alpha={self.alpha}, group_size={self.group_size}, hparams={self.hparams}"

    def _logps(self, where, prefix, logits, hidden, weight, bias, labels, cu_seqlens):
        if (logits is None) == (hidden is None):
            V.fail(where, f"pass exactly one of `{prefix}logits` or `{prefix}hidden` (with `{prefix}weight`)")
        if logits is not None:
            return sequence_logps(logits, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
                                  backend=self.backend)
        if weight is None:
            V.fail(where, f"`{prefix}hidden` needs `{prefix}weight` (the LM head, [V, H])")
        return linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                     cu_seqlens=cu_seqlens, backend=self.backend)

    def _per_row(self, where, name, t, num_seqs):
        """``t`` given per sequence ``[S]`` or per sample ``[B, K]``, as ``[B, K]``."""
        k = self.group_size
        if t.dim() == 1 and t.shape[0] == num_seqs:
            return t.reshape(-1, k)
        if t.dim() == 2 and tuple(t.shape) == (num_seqs // k, k):
            return t
        V.fail(where, f"`{name}` must be [S] = [{num_seqs}] or [B, K] = [{num_seqs // k}, {k}], got {tuple(t.shape)}")

    def forward(self, *, labels, logits=None, hidden=None, weight=None, bias=None, ref_logps=None,
                ref_logits=None, ref_hidden=None, ref_weight=None, ref_bias=None, probs=None,
                weights=None, scores=None, cu_seqlens=None) -> DoRAOutput:
        """Compute the loss of one batch of S = B·K sequences, rows group-major.

        Args:
            labels: ``[S, T]`` (or ``[N]`` packed with ``cu_seqlens``), aligned with the logits.
            logits: ``[S, T, V]`` / ``[N, V]`` policy logits; or ``hidden`` ``[S, T, H]`` /
                ``[N, H]`` with ``weight`` ``[V, H]`` (and ``bias``) for the fused linear path.
            ref_logps: ``[S]`` precomputed reference log-probs; or ``ref_logits``, or
                ``ref_hidden`` with ``ref_weight`` (and ``ref_bias``), evaluated without gradient.
            probs: ``[S]`` or ``[B, K]`` classifier probabilities P(target | candidate).
            weights: ``[B]`` per-sample or ``[S]``/``[B, K]`` per-candidate weights (instead of
                ``probs``).
            scores: ``[S]`` or ``[B, K]`` candidate scores, higher is better.
        """
        where = "robalign.DoRALoss"
        given = [name for name, t in (("ref_logits", ref_logits), ("ref_hidden", ref_hidden)) if t is not None]
        if ref_logps is not None and given:
            V.fail(where, f"pass `ref_logps` or `{given[0]}`, not both (one source of reference log-probs)")
        if self.needs_reference and ref_logps is None and logits is not None and ref_logits is not None \
                and hidden is None and ref_hidden is None:
            # both logits in hand: one pass (one launch on the Triton backend) for policy and reference
            policy_logps, ref_logps, counts = sequence_logps_with_ref(
                logits, ref_logits, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, backend=self.backend)
        else:
            policy_logps, counts = self._logps(where, "", logits, hidden, weight, bias, labels, cu_seqlens)
        if self.needs_reference and ref_logps is None:
            with torch.no_grad():
                ref_logps, _ = self._logps(where, "ref_", ref_logits, ref_hidden, ref_weight, ref_bias, labels,
                                           cu_seqlens)
        return self.from_logps(policy_logps, counts, ref_logps=ref_logps, probs=probs, weights=weights, scores=scores)

    def from_logps(self, policy_logps, counts, *, ref_logps=None, probs=None, weights=None, scores=None) -> DoRAOutput:
        """The same loss from per-sequence log-probabilities ``[S]`` (and token ``counts`` ``[S]``)
        computed elsewhere, e.g. by a trainer that runs the model itself."""
        where = "robalign.DoRALoss"
        V.check_tensor(where, "policy_logps", policy_logps, ndim=1, floating=True)
        num_seqs, k = policy_logps.shape[0], self.group_size
        if num_seqs % k:
            V.fail(where, f"`group_size`={k} must divide the number of sequences, got {num_seqs}")
        num_samples = num_seqs // k
        if counts is None:
            if _objectives.needs_counts(self.objective) or not self.needs_reference:
                V.fail(where, f"`counts` (scored tokens per sequence, [S]) is required: objective {self.objective!r} "
                              "is length-normalised or its rewards are")
        else:
            V.check_tensor(where, "counts", counts, ndim=1)
            if counts.is_floating_point() or counts.dtype == torch.bool or counts.is_complex():
                V.fail(where, f"`counts` must be an integer tensor [S], got {counts.dtype}", TypeError)
            if counts.shape[0] != num_seqs:
                V.fail(where, f"`counts` must be [S] = [{num_seqs}] like `policy_logps`, got {tuple(counts.shape)}")
            _objectives.check_counts(where, counts)

        logratios = None
        if self.needs_reference:
            if ref_logps is None:
                V.fail(where, "`ref_logps` is required: the objective compares with a reference model")
            V.check_tensor(where, "ref_logps", ref_logps, ndim=1, floating=True)
            if ref_logps.shape[0] != num_seqs:
                V.fail(where, f"`ref_logps` must be [S] = [{num_seqs}], got {tuple(ref_logps.shape)}")
            logratios = policy_logps - ref_logps.detach().to(policy_logps.dtype)

        grouped = policy_logps.reshape(num_samples, k)
        ref_grouped = None if ref_logps is None or not self.needs_reference else \
            ref_logps.detach().to(policy_logps.dtype).reshape(num_samples, k)
        counts_g = None if counts is None else counts.reshape(num_samples, k)
        scores_g = None if scores is None else self._per_row(where, "scores", scores, num_seqs).to(policy_logps.dtype)
        losses = self.objective_fn(grouped, ref_grouped, counts=counts_g, scores=scores_g, **self.hparams)

        sample_weights = self._weights(where, probs, weights, num_seqs, losses)
        loss, stats = kl_dro_with_stats(losses, sample_weights, lam=self.lam, group=self.group,
                                        ddp_average=self.ddp_average)

        with torch.no_grad():
            beta = self.hparams.get("beta", self.beta)
            rewards = beta * (logratios if logratios is not None else policy_logps / counts.clamp(min=1))
            rewards = rewards.reshape(num_samples, k)
            if scores_g is not None:
                order = torch.sort(scores_g, dim=-1, descending=True, stable=True).indices
                rewards = rewards.gather(-1, order)
            chosen, rejected = rewards[:, 0], rewards[:, -1]
        return DoRAOutput(loss=loss, losses=losses, weights=sample_weights, policy_logps=policy_logps,
                          logratios=logratios, chosen_rewards=chosen, rejected_rewards=rejected,
                          reward_accuracy=(chosen > rejected).float().mean(),
                          reward_margin=(chosen - rejected).mean(), dro=stats)

    def _weights(self, where, probs, weights, num_seqs, losses):
        num_samples = num_seqs // self.group_size
        if probs is not None and weights is not None:
            V.fail(where, "pass `probs` or `weights`, not both")
        if probs is not None:
            if self.alpha is None:
                V.fail(where, "`probs` needs `alpha` (the target fraction of the training mixture) "
                              "set on DoRALoss(alpha=...)")
            V.check_probs(where, "probs", probs)
            p = self._per_row(where, "probs", probs, num_seqs)
            w = dora_weights(p.to(losses.dtype), self.alpha, self.synthetic_fraction, class_ratio=self.class_ratio)
            return w.mean(-1)
        if weights is None:
            return torch.ones_like(losses)
        V.check_tensor(where, "weights", weights, floating=True)
        if weights.dim() == 1 and weights.shape[0] == num_samples:
            return weights.to(losses.dtype)
        return self._per_row(where, "weights", weights, num_seqs).to(losses.dtype).mean(-1)
