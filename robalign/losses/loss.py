"""``DoRALoss``: sequence log-probabilities → base objective → DoRA weights → a reduction.

Two parts, separately callable: :meth:`DoRALoss.per_sample` gives what is per sample (losses ℓ,
weights w, log-ratios, rewards); the :class:`~robalign.losses.reductions.Reduction` (KL-DRO by
default) turns ℓ and w into the trained scalar, exactly over ranks (``reduce``) or micro-batches
(``accumulator``). :meth:`from_logps` and :meth:`forward` compose both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .. import _validation as V
from ..ops import linear_sequence_logps, sequence_logps, sequence_logps_with_ref
from ..ops.api import check_linear_inputs
from ..ops.head import HeadTransform
from ..ops.one_pass import fused_dora_loss
from ..ops.wpo import wpo_weights
from ..ops.registry import resolve
from . import objectives as _objectives
from .dro import DROStats
from .layout import ld_logps
from .reductions import KLDRO, Reduction
from .unpaired import reference_point, unpaired_rewards
from .weights import dora_weights

__all__ = ["DoRALoss", "DoRAOutput", "DoRASamples"]

@dataclass
class DoRASamples:
    """The per-sample part of :class:`DoRALoss`. B samples of K candidates, S = B·K sequences.

    losses ``[B]``: the base objective per sample. weights ``[B]``: the DoRA weight per sample
    (1 without probs or weights). policy_logps ``[S]``; logratios ``[S]`` (``None`` for
    reference-free objectives). chosen_rewards / rejected_rewards ``[B]``: implicit rewards
    (β·logratio, or β·logp/|y| without a reference) of the best and worst candidate;
    reward_accuracy and reward_margin: their batch mean comparison. The rewards are detached.
    group_ids ``[B]``: the group of each sample, as given (for :class:`robalign.GroupDRO`), or ``None``.
    kl: KTO's reference point z₀ (0-d, detached) for an objective that takes one, else ``None``.
    counts ``[S]``: the scored tokens of each sequence, when known (``None`` from :meth:`per_sample`
    without them). Unpaired samples (KTO) have one completion: ``chosen_rewards`` holds the rewards of the desirable
    ones (NaN elsewhere), ``rejected_rewards`` those of the undesirable ones
    (:func:`robalign.losses.unpaired.unpaired_rewards`).
    """

    losses: torch.Tensor
    weights: torch.Tensor
    policy_logps: torch.Tensor
    logratios: torch.Tensor | None
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    group_ids: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    counts: torch.Tensor | None = None


@dataclass
class DoRAOutput(DoRASamples):
    """What :class:`DoRALoss` returns: :class:`DoRASamples` and the reduction's ``loss`` (the scalar
    to ``backward()``) and ``dro`` (:class:`robalign.DROStats` of the reduction's sample weights)."""

    loss: torch.Tensor = None
    dro: DROStats = None

    @classmethod
    def of(cls, samples: DoRASamples, loss: torch.Tensor, dro: DROStats) -> DoRAOutput:
        """``samples`` with ``loss`` and ``dro``. Field by field: ``torch.compile`` on torch 2.11
        cannot trace ``vars()`` of a dataclass (``fullgraph`` fails)."""
        return cls(**{f.name: getattr(samples, f.name) for f in fields(samples)}, loss=loss, dro=dro)


def _check_log_probs(where, logps, ref_logps) -> None:
    """A log-prob may be −∞ (a response the model cannot produce: the objective then takes its limit)
    but not +∞; a sequence that neither the policy nor the reference can produce has no log-ratio
    (−∞ − (−∞)). NaN passes (it comes from NaN logits and is refused with the losses)."""
    ok = logps != math.inf
    if ref_logps is not None:
        ok = ok & (ref_logps != math.inf) & ~((logps == -math.inf) & (ref_logps == -math.inf))

    def message(lazy):
        text = ("log-probs must be < +inf, and a sequence whose policy and reference log-probs are both -inf has "
                "no log-ratio (-inf - -inf): drop it, or unmask its tokens in one of the models")
        return text if lazy else text + f"; sequences {(~ok).nonzero().flatten()[:4].tolist()}"
    V.check_values(where, ok, message)


class DoRALoss(nn.Module):
    """Distribution-aware robust alignment loss (DoRA, arXiv 2504.05831), as a module.

        ℓ_i = objective(logp_policy, logp_ref)_i          per sample i (K candidates)
        w_i = mean_k dora_weights(p_ik, α, β_mix, class_ratio)
        L   = reduction(ℓ, w)      default KL-DRO: λ · log( (1/N) Σ_i exp(w_i·ℓ_i/λ) ) over the
                                   whole batch (and every rank of ``process_group``)

    Args:
        objective: a name from :mod:`robalign.objectives`, or a weighted sum of them
            (``"dpo+0.5*sft"`` or ``{"dpo": 1.0, "sft": 0.5}``, see :func:`robalign.objectives.mixture`).
        beta: the objective's β (ignored by objectives without one: rrhf, lire).
        lam: the KL-DRO temperature λ (``float('inf')``: weighted mean; < 0: soft minimum);
            default 1. Shorthand for ``reduction=KLDRO(lam)``.
        alpha: the target fraction α of the training mixture; required with ``probs``.
        synthetic_fraction: the mixture's β (default ``1 − α``); a number or a tensor per
            candidate position.
        class_ratio: ``n_target / n_source`` of the classifier's training set.
        group_size: K, the candidates per sample (rows are group-major); default 2, and 1 for an
            unpaired objective (KTO: one labelled completion per sample, see
            :mod:`robalign.losses.unpaired`).
        ignore_index: label value of unscored tokens.
        reduction: a :class:`~robalign.losses.reductions.Reduction` (instead of ``lam``).
        process_group, ddp_average: the process group whose ranks share the reduction's batch
            (see :func:`robalign.kl_dro`); ``group`` is the 0.1 name of ``process_group``.
        backend: backend of the heavy op (see :func:`robalign.sequence_logps`).
        one_pass: with ``hidden`` and the LM head, form the loss **and** its gradients in one
            forward (:mod:`robalign.ops.one_pass`: three matmul passes instead of four, the
            backward only scales). It is used when gradients are wanted, the reduction takes a
            gradient formed ahead (KL-DRO does) and the backend is a kernel one; the outputs'
            ``policy_logps`` and ``logratios`` then carry no graph (only ``loss`` does). False
            selects the recompute path: log-probs with a graph, autograd through the objective.
        fp32_head_grad: in the one-pass path, accumulate the head's gradient in float32 for a
            bfloat16/float16 head (one extra [V, H] float32 buffer); False keeps the head's dtype
            (one rounding per chunk).
        ld_alpha: LD-DPO's length desensitisation (Liu et al. 2024, arXiv 2409.06411; TRL's
            ``ld_alpha``), α ∈ [0, 1]: a response's log-prob counts its first ``min_k |y_k|`` scored
            tokens (the length its group shares) fully and the rest times α,
            ``logp = logp_shared + α·logp_tail``; for the policy and for a reference given as logits
            or hidden states (``ref_logps`` given directly are taken as they are). Padded rows only;
            the recompute path (two fused log-prob passes, one per part).
        wpo: WPO's weighting (Zhou et al. 2024, arXiv 2406.11827; TRL's ``use_weighting``): each
            sample's weight is multiplied by ``Π_k ω_k``, ``ω = exp(mean_t(log p(y_t) − log Σ_v p(v)²))``
            of the policy, without gradient (:func:`robalign.ops.wpo.wpo_weights`: one more pass over
            the head, chunked). Padded rows only.
        logit_scale, logit_softcap, logit_temperature: the LM head's logit transform on the
            hidden-state paths, ``z' = c·tanh(s·z/c)/T`` (``s·z/T`` without a soft-cap c;
            :mod:`robalign.ops.head`): Gemma 2/3's ``final_logit_softcapping`` is ``logit_softcap``,
            Cohere's ``logit_scale`` is ``logit_scale``.
            Logits given as ``logits`` are taken as the head's output, so they refuse a transform.
        reference_free: for an objective with a reference model, take the reference's log-probs as 0
            (``r = logp``; the DPO family without a reference, as TRL's former ``reference_free``);
            reference inputs are then refused.
        average_logps: read every candidate's log-probs (policy and reference) as per-token means
            ``logp/|y|`` — Liger-Kernel's ``average_log_prob`` — for any objective that does not
            already normalise by length, on every path (``dpo`` with it is ``dpo_norm``); the
            rewards reported are then β times the mean log-ratios. Not for KTO's objectives.
        **objective_kwargs: the objective's other hyper-parameters (e.g. ``label_smoothing``).
    """

    def __init__(self, objective: str = "dpo", beta: float = 0.1, lam: float | None = None, alpha=None,
                 synthetic_fraction=None, class_ratio: float = 1.0, group_size: int | None = None,
                 ignore_index: int = -100, *, reduction: Reduction | None = None, process_group=None,
                 ddp_average: bool = True, backend: str | None = None, one_pass: bool = True,
                 fp32_head_grad: bool = True, ld_alpha: float | None = None, wpo: bool = False,
                 logit_scale: float = 1.0, logit_softcap: float | None = None, logit_temperature: float = 1.0,
                 reference_free: bool = False, average_logps: bool = False, **objective_kwargs):
        super().__init__()
        where = "robalign.DoRALoss"
        objective = _objectives.resolve(objective)
        if average_logps:
            try:
                objective = _objectives.with_mean_logps(objective)
            except ValueError as err:
                V.fail(where, f"`average_logps`: {err}")
        self.average_logps = bool(average_logps)
        self.objective_fn = _objectives.get(objective)
        if reduction is None:
            if lam is not None:
                V.check_lam(where, lam)
            reduction = KLDRO(1.0 if lam is None else lam)
        elif lam is not None:
            V.fail(where, "pass `lam` or `reduction`, not both (`lam` is short for reduction=KLDRO(lam))")
        elif not isinstance(reduction, Reduction):
            V.fail(where, f"`reduction` must be a robalign.losses.reductions.Reduction, got {type(reduction).__name__}",
                   TypeError)
        self.reduction = reduction
        if alpha is not None:
            V.check_number(where, "alpha", alpha, low=0, high=1, low_open=True)
        if synthetic_fraction is not None:
            V.check_number(where, "synthetic_fraction", synthetic_fraction, low=0, allow_tensor=True)
        V.check_number(where, "class_ratio", class_ratio, low=0, low_open=True)
        if class_ratio == float("inf"):
            V.fail(where, "`class_ratio` must be finite")
        V.check_int(where, "ignore_index", ignore_index)
        self.unpaired = _objectives.is_unpaired(objective)
        self.batch_coupled = _objectives.is_batch_coupled(objective)
        if self.batch_coupled and wpo:
            V.fail(where, f"`wpo` weighs samples; objective {objective!r} sorts the batch, so its losses are not "
                          "per sample")
        if group_size is None:
            group_size = 1 if self.unpaired else 2
        if self.unpaired:
            if group_size != 1:
                V.fail(where, f"objective {objective!r} reads unpaired data (one completion per sample): "
                              f"`group_size` must be 1, got {group_size!r}")
            for name, value in (("ld_alpha", ld_alpha), ("wpo", wpo or None)):
                if value is not None:
                    V.fail(where, f"`{name}` compares the candidates of a sample; objective {objective!r} has one")
        elif not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
            V.fail(where, f"`group_size` must be an int ≥ 2 (candidates per sample), got {group_size!r}")
        if _objectives.is_pairwise(objective) and group_size != 2:
            V.fail(where, f"objective {objective!r} is pairwise: `group_size` must be 2, got {group_size}")
        self.objective = objective
        self.beta, self.alpha = beta, alpha
        self.synthetic_fraction, self.class_ratio = synthetic_fraction, class_ratio
        self.group_size, self.ignore_index = group_size, ignore_index
        self.process_group, self.ddp_average, self.backend = process_group, ddp_average, backend
        self.one_pass, self.fp32_head_grad = bool(one_pass), bool(fp32_head_grad)
        if ld_alpha is not None:
            V.check_number(where, "ld_alpha", ld_alpha, low=0, high=1)
        self.ld_alpha = ld_alpha
        self.wpo = bool(wpo)
        self.head_transform = HeadTransform.checked(where, logit_scale, logit_softcap, logit_temperature)
        if reference_free and not _objectives.needs_reference(objective):
            V.fail(where, f"`reference_free`: objective {objective!r} takes no reference model already")
        if reference_free and self.unpaired:
            V.fail(where, f"`reference_free`: objective {objective!r} compares with its reference point; keep the "
                          "reference model")
        self.reference_free = bool(reference_free)
        self.needs_reference = _objectives.needs_reference(objective) and not self.reference_free
        self.needs_kl = _objectives.needs_kl_reference(objective)
        takes = _objectives.hyperparameters(objective)
        self.hparams = dict(objective_kwargs)
        if "beta" in takes:
            self.hparams["beta"] = beta
        unknown = set(self.hparams) - set(takes)
        if unknown:
            V.fail(where, f"objective {objective!r} has no hyper-parameter {sorted(unknown)}; "
                          f"it takes {sorted(takes)}", TypeError)
        _objectives.check_hyperparameters(objective, self.hparams, where)     # at construction, not first use

    @property
    def lam(self) -> float | None:
        """λ of a KL-DRO reduction (``None`` for another reduction)."""
        return getattr(self.reduction, "lam", None)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, reduction={self.reduction!r}, alpha={self.alpha}, "
                f"group_size={self.group_size}, hparams={self.hparams}")

    def _logps(self, where, prefix, logits, hidden, head_weight, head_bias, labels, cu_seqlens):
        if self.ld_alpha is not None:
            if cu_seqlens is not None:
                V.fail(where, "`ld_alpha` takes padded rows ([S, T] labels), not packed ones (`cu_seqlens`)")
            return ld_logps(lambda part: self._plain_logps(where, prefix, logits, hidden, head_weight, head_bias,
                                                           part, None),
                            labels, self.ld_alpha, self.group_size, self.ignore_index)
        return self._plain_logps(where, prefix, logits, hidden, head_weight, head_bias, labels, cu_seqlens)

    def _plain_logps(self, where, prefix, logits, hidden, head_weight, head_bias, labels, cu_seqlens):
        if (logits is None) == (hidden is None):
            V.fail(where, f"pass exactly one of `{prefix}logits` or `{prefix}hidden` (with `{prefix}head_weight`)")
        if logits is not None:
            if not self.head_transform.identity:
                V.fail(where, f"`{prefix}logits` are the head's output; the head transform (logit_scale, logit_softcap, "
                              "logit_temperature) applies to hidden states: pass `hidden` and `head_weight`, or no transform")
            return sequence_logps(logits, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
                                  backend=self.backend)
        if head_weight is None:
            V.fail(where, f"`{prefix}hidden` needs `{prefix}head_weight` (the LM head's weight, [V, H])")
        return linear_sequence_logps(hidden, head_weight, labels, bias=head_bias, ignore_index=self.ignore_index,
                                     cu_seqlens=cu_seqlens, backend=self.backend, **self.head_transform.kwargs)

    def _per_row(self, where, name, t, num_seqs):
        """``t`` given per sequence ``[S]`` or per sample ``[B, K]``, as ``[B, K]``."""
        k = self.group_size
        if t.dim() == 1 and t.shape[0] == num_seqs:
            return t.reshape(-1, k)
        if t.dim() == 2 and tuple(t.shape) == (num_seqs // k, k):
            return t
        V.fail(where, f"`{name}` must be [S] = [{num_seqs}] or [B, K] = [{num_seqs // k}, {k}], got {tuple(t.shape)}")

    def forward(self, *, labels, logits=None, hidden=None, head_weight=None, head_bias=None, ref_logps=None,
                ref_logits=None, ref_hidden=None, ref_head_weight=None, ref_head_bias=None, probs=None,
                weights=None, scores=None, group_ids=None, cu_seqlens=None, accumulator=None,
                kl_logps=None, kl_ref_logps=None) -> DoRAOutput:
        """Compute the loss of one batch of S = B·K sequences, rows group-major.

        The policy's log-probs come from ``logits``, or from ``hidden`` and the LM head
        (``head_weight``, ``head_bias``) through the fused linear path; the reference's from
        exactly one of ``ref_logps``, ``ref_logits``, or ``ref_hidden`` with ``ref_head_weight``
        (``ref_head_bias``), without gradient. With both ``logits`` and ``ref_logits`` one pass
        reads the two (one launch on the Triton backend).

        Args:
            labels: ``[S, T]`` (or ``[N]`` packed with ``cu_seqlens``), aligned with the logits.
            logits: ``[S, T, V]`` / ``[N, V]`` policy logits; or ``hidden`` ``[S, T, H]`` /
                ``[N, H]`` with ``head_weight`` ``[V, H]`` (and ``head_bias`` ``[V]``).
            ref_logps: ``[S]`` precomputed reference log-probs; or ``ref_logits``, or
                ``ref_hidden`` with ``ref_head_weight`` (and ``ref_head_bias``).
            probs: ``[S]`` or ``[B, K]`` classifier probabilities P(target | candidate).
            weights: ``[B]`` per-sample or ``[S]``/``[B, K]`` per-candidate weights (instead of
                ``probs``).
            scores: ``[S]`` or ``[B, K]`` candidate scores, higher is better.
            group_ids: ``[B]`` integer group of each sample, for a reduction that reads them
                (:class:`robalign.GroupDRO`).
            kl_logps, kl_ref_logps: ``[B]`` policy and reference log-probs of mismatched completions
                (prompt i with another sample's completion, no gradient), for KTO's reference point
                (:func:`robalign.losses.unpaired.reference_point`); unpaired objectives read their labels
                (1 desirable, 0 undesirable) from ``scores``.
            accumulator: the reduction's accumulator (``loss_fn.reduction.accumulator(params)``)
                when this batch is one micro-batch of a gradient-accumulation step: ``loss`` is
                then this micro-batch's share to ``backward()``, with the value of the full-batch
                loss folded in so far (``accumulator.loss``).

        With ``hidden`` and the head, and gradients wanted, the one-pass fused loss runs (see
        ``one_pass``): the loss and every gradient in this forward.
        """
        where = "robalign.DoRALoss"
        given = [name for name, t in (("ref_logits", ref_logits), ("ref_hidden", ref_hidden)) if t is not None]
        if self.reference_free and (given or ref_logps is not None):
            V.fail(where, "this loss is `reference_free`: pass no reference (`ref_logps`, `ref_logits`, `ref_hidden`)")
        if ref_logps is not None and given:
            V.fail(where, f"pass `ref_logps` or `{given[0]}`, not both (one source of reference log-probs)")
        missing_ref = self.needs_reference and ref_logps is None
        # policy and reference logits read in one pass; else the reference first, without gradient
        with_ref = (missing_ref and logits is not None and ref_logits is not None and hidden is None and ref_hidden is None
                    and self.ld_alpha is None)
        if missing_ref and given and not with_ref:
            with torch.no_grad():
                ref_logps, _ = self._logps(where, "ref_", ref_logits, ref_hidden, ref_head_weight, ref_head_bias,
                                           labels, cu_seqlens)
        extra = None
        if self.wpo:
            if cu_seqlens is not None:
                V.fail(where, "`wpo` takes padded rows ([S, T] labels), not packed ones (`cu_seqlens`)")
            omega = wpo_weights(labels, logits=None if logits is None else logits.detach(),
                                hidden=None if hidden is None else hidden.detach(), head_weight=head_weight,
                                head_bias=head_bias, ignore_index=self.ignore_index, transform=self.head_transform)
            extra = omega.view(-1, self.group_size).prod(-1)
        kernel = self._one_pass_kernel(where, logits, hidden, head_weight, head_bias)
        if kernel is not None:
            return self._forward_one_pass(where, kernel, hidden, head_weight, head_bias, labels, cu_seqlens,
                                          ref_logps, probs, weights, scores, group_ids, accumulator, extra,
                                          self._kl(where, kl_logps, kl_ref_logps))
        if with_ref:
            policy_logps, ref_logps, counts = sequence_logps_with_ref(
                logits, ref_logits, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, backend=self.backend)
        else:
            policy_logps, counts = self._logps(where, "", logits, hidden, head_weight, head_bias, labels, cu_seqlens)
        if missing_ref and not given:
            V.fail(where, "pass exactly one of `ref_logits` or `ref_hidden` (with `ref_head_weight`)")
        return self.from_logps(policy_logps, counts, ref_logps=ref_logps, probs=probs, weights=weights, scores=scores,
                               group_ids=group_ids, accumulator=accumulator, extra_weights=extra,
                               kl_logps=kl_logps, kl_ref_logps=kl_ref_logps)

    def from_logps(self, policy_logps, counts, *, ref_logps=None, probs=None, weights=None, scores=None,
                   group_ids=None, accumulator=None, extra_weights=None, kl_logps=None,
                   kl_ref_logps=None) -> DoRAOutput:
        """The loss from per-sequence log-probabilities ``[S]`` (and token ``counts`` ``[S]``)
        computed elsewhere: :meth:`per_sample`, then the reduction over the batch (and ranks), or
        the ``accumulator``'s step (see :meth:`forward`)."""
        samples = self.per_sample(policy_logps, counts, ref_logps=ref_logps, probs=probs, weights=weights,
                                  scores=scores, group_ids=group_ids, extra_weights=extra_weights,
                                  kl_logps=kl_logps, kl_ref_logps=kl_ref_logps)
        grouped = self.group_kwargs(samples)
        if accumulator is not None:
            surrogate = accumulator(samples.losses, samples.weights, **grouped)
            loss = surrogate + (accumulator.loss_value.to(surrogate) - surrogate).detach()
            return DoRAOutput.of(samples, loss, accumulator.stats())
        loss, stats = self.reduction.reduce(samples.losses, samples.weights, group=self.process_group,
                                            ddp_average=self.ddp_average, **grouped)
        return DoRAOutput.of(samples, loss, stats)

    def group_kwargs(self, samples: DoRASamples) -> dict:
        """``{"group_ids": ...}`` for a reduction that reads them (:class:`robalign.GroupDRO`), else
        ``{}``; what to pass, with ``samples.losses`` and ``samples.weights``, to the reduction or
        its accumulator."""
        return {"group_ids": samples.group_ids} if self.reduction.takes_group_ids else {}

    # -- the one-pass fused loss ----------------------------------------------------------------
    @property
    def takes_one_pass(self) -> bool:
        """Whether this loss forms its gradient in one pass when given hidden states and a head:
        ``one_pass`` on, a reduction with a one-pass form, no LD-DPO split (two log-prob parts), and an
        objective whose losses are per sample (not AOT's, which sort the whole batch)."""
        return (self.one_pass and self.ld_alpha is None and not self.batch_coupled
                and getattr(self.reduction, "one_pass_temperature", None) is not None)

    def _one_pass_kernel(self, where, logits, hidden, head_weight, head_bias) -> str | None:
        """The kernel backend that runs the one-pass loss here, or ``None`` for the recompute path:
        it needs hidden states and a head, gradients wanted, a reduction that takes a gradient
        formed ahead (``one_pass_temperature``) and a kernel backend (not the reference)."""
        if not self.takes_one_pass or logits is not None or hidden is None or head_weight is None:
            return None
        if not torch.is_grad_enabled():
            return None
        if not any(t is not None and t.requires_grad for t in (hidden, head_weight, head_bias)):
            return None
        name = resolve(where, self.backend, hidden).name
        return None if name == "reference" else name

    def _forward_one_pass(self, where, kernel, hidden, head_weight, head_bias, labels, cu_seqlens, ref_logps,
                          probs, weights, scores, group_ids, accumulator, extra=None, kl=None) -> DoRAOutput:
        check_linear_inputs(where, hidden, head_weight, labels, head_bias, self.ignore_index, cu_seqlens)
        num_seqs = labels.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        k = self.group_size
        if num_seqs % k:
            V.fail(where, f"`group_size`={k} must divide the number of sequences, got {num_seqs}")
        self._check_group_ids(where, group_ids, num_seqs // k)
        ref_logps = self._reference(where, ref_logps, num_seqs, torch.float32, hidden.device)
        scores_g = self._scores(where, scores, num_seqs, torch.float32)
        sample_weights = self._weights(where, probs, weights, num_seqs,
                                       torch.empty(num_seqs // k, dtype=torch.float32, device=hidden.device))
        if extra is not None:
            sample_weights = sample_weights * extra.to(sample_weights)
        need = (hidden.requires_grad, head_weight.requires_grad, head_bias is not None and head_bias.requires_grad)
        # KTO's r − z₀ is the log-ratio against the reference shifted by z₀ (a constant of the step)
        shifted_ref = ref_logps if kl is None else ref_logps + kl      # KTO needs a reference
        dro = {}

        def scale(logps, losses, shift):
            """The reduction's value and κ for the gradient the op formed (the log-probs checked first)."""
            _check_log_probs(where, logps, ref_logps)
            if accumulator is not None:
                kappa = accumulator.gradient_scale(losses, sample_weights, shift)
                dro["stats"] = accumulator.stats()
                return accumulator.loss_value, kappa
            value, kappa, dro["stats"] = self.reduction.gradient_scale(
                losses, sample_weights, shift, group=self.process_group, ddp_average=self.ddp_average)
            return value, kappa

        loss, logps, counts, losses = fused_dora_loss(
            hidden, head_weight, labels, scale=scale, bias=head_bias, ignore_index=self.ignore_index,
            cu_seqlens=cu_seqlens, ref_logps=shifted_ref, sample_weights=sample_weights,
            scores=None if scores_g is None else scores_g.reshape(-1), objective=self.objective,
            hparams=self.hparams, group_size=k, lam=self.reduction.one_pass_temperature, kernel=kernel, need=need,
            fp32_grad_weight=self.fp32_head_grad, transform=self.head_transform)
        stats = dro["stats"]
        logratios = None if ref_logps is None else logps - ref_logps
        rewards = self._rewards(logps, logratios, counts, scores_g, kl)
        return DoRAOutput(losses=losses, weights=sample_weights, policy_logps=logps, logratios=logratios, **rewards,
                          group_ids=group_ids, kl=kl, counts=counts, loss=loss, dro=stats)

    def per_sample(self, policy_logps, counts, *, ref_logps=None, probs=None, weights=None,
                   scores=None, group_ids=None, extra_weights=None, kl_logps=None, kl_ref_logps=None) -> DoRASamples:
        """The per-sample losses, weights, log-ratios and rewards of one batch, before any
        reduction: what a reduction's accumulator takes micro-batch by micro-batch.
        ``extra_weights`` ``[B]`` multiply the sample weights (WPO's, see ``wpo``); ``kl_logps`` and
        ``kl_ref_logps`` give KTO's reference point (see :meth:`forward`)."""
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

        ref_logps = self._reference(where, ref_logps, num_seqs, policy_logps.dtype, policy_logps.device)
        _check_log_probs(where, policy_logps, ref_logps)
        logratios = None if ref_logps is None else policy_logps - ref_logps

        grouped = policy_logps.reshape(num_samples, k)
        ref_grouped = None if ref_logps is None else ref_logps.reshape(num_samples, k)
        counts_g = None if counts is None else counts.reshape(num_samples, k)
        scores_g = self._scores(where, scores, num_seqs, policy_logps.dtype)
        kl = self._kl(where, kl_logps, kl_ref_logps)
        extra = {} if kl is None else {"kl": kl.to(policy_logps.dtype)}
        losses = self.objective_fn(grouped, ref_grouped, counts=counts_g, scores=scores_g, **extra, **self.hparams)
        sample_weights = self._weights(where, probs, weights, num_seqs, losses)
        if extra_weights is not None:
            sample_weights = sample_weights * extra_weights.to(sample_weights)
        self._check_group_ids(where, group_ids, num_samples)

        return DoRASamples(losses=losses, weights=sample_weights, policy_logps=policy_logps, logratios=logratios,
                           **self._rewards(policy_logps, logratios, counts, scores_g, kl), group_ids=group_ids, kl=kl,
                           counts=counts)

    def _reference(self, where, ref_logps, num_seqs, dtype, device):
        """The reference log-probs ``[S]`` the objective reads, detached, in ``dtype``: the given ones
        (checked), zeros with ``reference_free``, ``None`` for an objective without a reference."""
        if self.needs_reference:
            self._check_ref_logps(where, ref_logps, num_seqs)
            return ref_logps.detach().to(dtype)
        if not self.reference_free:
            return None
        if ref_logps is not None:
            V.fail(where, "this loss is `reference_free`: pass no `ref_logps`")
        return torch.zeros(num_seqs, dtype=dtype, device=device)

    def _scores(self, where, scores, num_seqs, dtype):
        """``scores`` as ``[B, K]`` in ``dtype``, checked (finite; 0/1 labels for unpaired data)."""
        if scores is None:
            if self.unpaired:
                V.fail(where, f"objective {self.objective!r} needs `scores`: the label of each completion, "
                              "1 desirable or 0 undesirable")
            return None
        scores_g = self._per_row(where, "scores", scores, num_seqs).to(dtype)
        V.check_values(where, torch.isfinite(scores_g), lambda lazy: "`scores` must be finite")
        if self.unpaired:
            _objectives.check_labels(where, scores_g)
        return scores_g

    def _kl(self, where, kl_logps, kl_ref_logps):
        """KTO's reference point from the mismatched rows (``None`` for other objectives)."""
        given = kl_logps is not None or kl_ref_logps is not None
        if not self.needs_kl:
            if given:
                V.fail(where, f"`kl_logps`/`kl_ref_logps` feed KTO's reference point; objective {self.objective!r} "
                              "takes none")
            return None
        if kl_logps is None or kl_ref_logps is None:
            V.fail(where, f"objective {self.objective!r} needs `kl_logps` and `kl_ref_logps` ([B] policy and "
                          "reference log-probs of mismatched completions) for its reference point")
        return reference_point(kl_logps, kl_ref_logps, group=self.process_group)

    def _check_group_ids(self, where, group_ids, num_samples):
        if group_ids is None:
            if self.reduction.takes_group_ids:
                V.fail(where, f"reduction {self.reduction.name!r} needs `group_ids` ([B] integer group of each "
                              "sample)")
            return
        if not self.reduction.takes_group_ids:
            V.fail(where, f"`group_ids` was given but reduction {self.reduction.name!r} reads no groups "
                          "(use reduction=robalign.GroupDRO(num_groups))")
        if self.batch_coupled:
            V.fail(where, f"objective {self.objective!r} sorts the batch: its losses belong to no sample's group")
        V.check_tensor(where, "group_ids", group_ids, ndim=1, integer=True)
        if group_ids.shape[0] != num_samples:
            V.fail(where, f"`group_ids` must be [B] = [{num_samples}] (one per sample), got {tuple(group_ids.shape)}")

    def _check_ref_logps(self, where, ref_logps, num_seqs):
        if ref_logps is None:
            V.fail(where, "`ref_logps` is required: the objective compares with a reference model")
        V.check_tensor(where, "ref_logps", ref_logps, ndim=1, floating=True)
        if ref_logps.shape[0] != num_seqs:
            V.fail(where, f"`ref_logps` must be [S] = [{num_seqs}], got {tuple(ref_logps.shape)}")

    @torch.no_grad()
    def _rewards(self, policy_logps, logratios, counts, scores_g, kl=None) -> dict:
        """The implicit rewards of the best and worst candidate and their batch comparison."""
        beta = self.hparams.get("beta", self.beta)
        if logratios is not None and self.average_logps:                 # the log-ratios the objective read
            logratios = logratios / counts.clamp(min=1)
        rewards = beta * (logratios if logratios is not None else policy_logps / counts.clamp(min=1))
        if self.unpaired:
            return unpaired_rewards(rewards, scores_g[:, 0], 0.0 if kl is None else beta * kl)
        rewards = rewards.reshape(-1, self.group_size)
        if scores_g is not None:
            order = torch.sort(scores_g, dim=-1, descending=True, stable=True).indices
            rewards = rewards.gather(-1, order)
        chosen, rejected = rewards[:, 0], rewards[:, -1]
        return dict(chosen_rewards=chosen, rejected_rewards=rejected,
                    reward_accuracy=(chosen > rejected).float().mean(), reward_margin=(chosen - rejected).mean())

    def _weights(self, where, probs, weights, num_seqs, losses):
        """The per-sample weights ``[B]`` in the dtype (and on the device) of ``losses``."""
        num_samples = num_seqs // self.group_size
        if probs is not None and weights is not None:
            V.fail(where, "pass `probs` or `weights`, not both")
        if self.batch_coupled and (probs is not None or weights is not None):
            V.fail(where, f"objective {self.objective!r} sorts the batch: its losses belong to the sorted positions, "
                          "not to samples, so per-sample `probs`/`weights` do not apply")
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
