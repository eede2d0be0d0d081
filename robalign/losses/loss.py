"""``DoRALoss``: sequence log-probabilities → base objective → DoRA weights → a reduction.

Two parts, separately callable: :meth:`DoRALoss.per_sample` gives what is per sample (losses ℓ,
weights w, log-ratios, rewards); the :class:`~robalign.losses.reductions.Reduction` (KL-DRO by
default) turns ℓ and w into the trained scalar, exactly over ranks (``reduce``) or micro-batches
(``accumulator``). :meth:`from_logps` and :meth:`forward` compose both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from .. import _validation as V
from ..ops import linear_sequence_logps, sequence_logps, sequence_logps_with_ref
from ..ops.api import check_linear_inputs
from ..ops.head import HeadTransform
from ..ops.one_pass import fused_dora_loss
from ..ops.token_stats import token_stats as per_token_stats
from ..ops.wpo import wpo_weights
from ..ops.registry import resolve
from . import objectives as _objectives
from .dro import DROStats
from .layout import ld_logps
from .objectives import Objective
from .options import BatchExtras, LossParams
from .reductions import KLDRO, Reduction
from .unpaired import reference_point, unpaired_rewards
from .weights import DoRAWeights

__all__ = ["DoRALoss", "FusedLinearDoRALoss", "fused_linear_dora_loss", "DoRAOutput", "DoRASamples"]

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
    to ``backward()``) and ``dro`` (:class:`robalign.DROStats` of the reduction's sample weights);
    ``token_stats``: where :class:`FusedLinearDoRALoss` was asked for them, the policy's per-token
    statistics ``(entropy [S], mean_logit [S], counts [S], top1 [S])`` summed per sequence
    (:func:`robalign.ops.token_stats.token_stats`), else ``None``."""

    loss: torch.Tensor = None
    dro: DROStats = None
    token_stats: tuple | None = None

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


#: the 0.2 flat constructor arguments and where each now lives
_FLAT_ARGS = {
    "beta": "Objective(name, beta=...)", "average_logps": "Objective(name, average_logps=True)",
    "lam": "reduction=KLDRO(lam)", "alpha": "weighting=DoRAWeights(alpha, ...)",
    "synthetic_fraction": "weighting=DoRAWeights(alpha, synthetic_fraction=...)",
    "class_ratio": "weighting=DoRAWeights(alpha, class_ratio=...)",
    "logit_scale": "FusedLinearDoRALoss(..., head=HeadTransform(scale=...))",
    "logit_softcap": "FusedLinearDoRALoss(..., head=HeadTransform(softcap=...))",
    "logit_temperature": "FusedLinearDoRALoss(..., head=HeadTransform(temperature=...))",
    **{name: f"params=LossParams({name}=...)" for name in (f.name for f in fields(LossParams))},
}
#: the 0.2 flat forward arguments: BatchExtras fields, and the hidden-state path's three
_FLAT_INPUTS = {f.name for f in fields(BatchExtras)} | {"extra_weights"}
_HIDDEN_INPUTS = ("hidden", "head_weight", "head_bias")


def _deprecated(where: str, given, moves: str) -> None:
    if torch.compiler.is_compiling():          # a warning would break the graph; the eager call warned
        return
    warnings.warn(f"{where}: flat arguments {sorted(given)} are deprecated and go away in 0.3: {moves}",
                  DeprecationWarning, stacklevel=3)


class DoRALoss(nn.Module):
    """Distribution-aware robust alignment loss (DoRA, arXiv 2504.05831), from log-probs or logits.

        ℓ_i = objective(logp_policy, logp_ref)_i          per sample i (K candidates)
        w_i = mean_k dora_weights(p_ik, α, β_mix, class_ratio)    (or given ``weights``; 1 without)
        L   = reduction(ℓ, w)      default KL-DRO: λ · log( (1/N) Σ_i exp(w_i·ℓ_i/λ) ) over the
                                   whole batch (and every rank of the process group)

    ::

        loss_fn = DoRALoss(Objective("dpo", beta=0.1), KLDRO(lam=1.0), DoRAWeights(alpha=0.3))
        out = loss_fn(logits, labels, ref_logps, probs=probs)        # logits [S, T, V], labels [S, T]
        out.loss.backward()

    From hidden states and the LM head, without materialising logits: :class:`FusedLinearDoRALoss`.

    Args:
        objective: an :class:`~robalign.objectives.Objective` (the base loss and its hyper-parameters),
            or a name, taken with its defaults (``"dpo"`` is ``Objective("dpo", beta=0.1)``).
        reduction: a :class:`~robalign.losses.reductions.Reduction` over the batch's weighted losses
            (default ``KLDRO(1.0)``; ``KLDRO(float("inf"))`` is the weighted mean; KLBall, Chi2Ball,
            CVaR, GroupDRO).
        weighting: a :class:`~robalign.losses.weights.DoRAWeights`, which turns the classifier's
            ``probs`` into per-sample weights; needed only when ``probs`` are given.
        params: a :class:`~robalign.losses.options.LossParams`: candidates per sample, ignore_index,
            backend, one-pass or recompute, LD-DPO, WPO, reference-free, process group.

    Release 0.2's flat arguments (``beta=``, ``lam=``, ``alpha=``, ``group_size=``, ...) still work,
    with a DeprecationWarning naming where each now lives; they go away in 0.3.
    """

    def __init__(self, objective="dpo", reduction: Reduction | None = None, weighting: DoRAWeights | None = None,
                 params: LossParams | None = None, **flat):
        super().__init__()
        head = HeadTransform()
        if flat:
            objective, reduction, weighting, params, head = self._from_flat(objective, reduction, weighting, params,
                                                                            flat)
        self._configure(objective, reduction, weighting, params, head)

    @staticmethod
    def _from_flat(objective, reduction, weighting, params, flat):
        """The objects of the 0.2 flat arguments, with a DeprecationWarning that names the new ones."""
        where = "robalign.DoRALoss"
        name = objective.base if isinstance(objective, Objective) else objective
        hparams = dict(objective.hparams) if isinstance(objective, Objective) else {}
        moves = {key: _FLAT_ARGS.get(key, f"Objective(name, {key}=...)") for key in flat}
        average = bool(flat.pop("average_logps", False)) or (isinstance(objective, Objective) and objective.average_logps)
        resolved = None
        try:
            resolved = _objectives.resolve(name)
        except ValueError:
            pass
        takes = _objectives.hyperparameters(resolved) if resolved else {}
        beta = flat.pop("beta", None)
        if beta is not None and (resolved is None or "beta" in takes):
            hparams["beta"] = beta
        hparams.update({key: flat.pop(key) for key in list(flat) if key not in _FLAT_ARGS})
        lam = flat.pop("lam", None)
        if lam is not None:
            if reduction is not None:
                V.fail(where, "pass `lam` or `reduction`, not both (`lam` is short for reduction=KLDRO(lam))")
            V.check_lam(where, lam)
            reduction = KLDRO(lam)
        mix = {key: flat.pop(key) for key in ("alpha", "synthetic_fraction", "class_ratio") if key in flat}
        if mix:
            if weighting is not None:
                V.fail(where, "pass `weighting` or the flat `alpha`, `synthetic_fraction`, `class_ratio`, not both")
            if mix.get("alpha") is not None:
                weighting = DoRAWeights(**mix)
            else:
                for key, value in mix.items():
                    if key == "synthetic_fraction" and value is not None:
                        V.check_number(where, key, value, low=0, allow_tensor=True)
                    elif key == "class_ratio":
                        V.check_number(where, key, value, low=0, low_open=True)
                        if value == float("inf"):
                            V.fail(where, "`class_ratio` must be finite")
        head = HeadTransform.checked(where, flat.pop("logit_scale", 1.0), flat.pop("logit_softcap", None),
                                     flat.pop("logit_temperature", 1.0))
        if flat:
            if params is not None:
                V.fail(where, f"pass `params` or the flat {sorted(flat)}, not both")
            params = LossParams(**flat)
        _deprecated(where, moves, "; ".join(f"{key} → {value}" for key, value in moves.items()))
        objective = Objective.checked(where, name, average, **hparams) if resolved else objective
        return objective, reduction, weighting, params, head

    def _configure(self, objective, reduction, weighting, params, head: HeadTransform):
        where = "robalign.DoRALoss"
        if not isinstance(objective, Objective):
            if not isinstance(objective, (str, dict)):
                V.fail(where, f"`objective` must be a robalign.Objective or a name, got {type(objective).__name__}",
                       TypeError)
            objective = Objective.checked(where, objective)
        if reduction is None:
            reduction = KLDRO(1.0)
        elif not isinstance(reduction, Reduction):
            hint = (" (λ of KL-DRO: reduction=robalign.KLDRO(lam); β belongs to the objective: "
                    "Objective('dpo', beta=...))") if isinstance(reduction, (int, float)) else ""
            V.fail(where, f"`reduction` must be a robalign.losses.reductions.Reduction, got "
                          f"{type(reduction).__name__}{hint}", TypeError)
        if weighting is not None and not isinstance(weighting, DoRAWeights):
            V.fail(where, f"`weighting` must be a robalign.DoRAWeights, got {type(weighting).__name__}", TypeError)
        params = LossParams() if params is None else params
        if not isinstance(params, LossParams):
            V.fail(where, f"`params` must be a robalign.LossParams, got {type(params).__name__}", TypeError)
        self.reduction = reduction
        self.weighting = weighting
        self.params = params
        name = objective.name
        self.objective, self.hparams, self.average_logps = name, dict(objective.hparams), objective.average_logps
        self.objective_fn = _objectives.get(name)
        self.beta = objective.beta if objective.beta is not None else _objectives.DEFAULT_BETA
        self.alpha = None if weighting is None else weighting.alpha
        self.synthetic_fraction = None if weighting is None else weighting.synthetic_fraction
        self.class_ratio = 1.0 if weighting is None else weighting.class_ratio
        group_size, ignore_index, ld_alpha, wpo = params.group_size, params.ignore_index, params.ld_alpha, params.wpo
        V.check_int(where, "ignore_index", ignore_index)
        self.unpaired = _objectives.is_unpaired(name)
        self.batch_coupled = _objectives.is_batch_coupled(name)
        if self.batch_coupled and wpo:
            V.fail(where, f"`wpo` weighs samples; objective {name!r} sorts the batch, so its losses are not "
                          "per sample")
        if group_size is None:
            group_size = 1 if self.unpaired else 2
        if self.unpaired:
            if group_size != 1:
                V.fail(where, f"objective {name!r} reads unpaired data (one completion per sample): "
                              f"`group_size` must be 1, got {group_size!r}")
            for key, value in (("ld_alpha", ld_alpha), ("wpo", wpo or None)):
                if value is not None:
                    V.fail(where, f"`{key}` compares the candidates of a sample; objective {name!r} has one")
        elif not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
            V.fail(where, f"`group_size` must be an int ≥ 2 (candidates per sample), got {group_size!r}")
        if _objectives.is_pairwise(name) and group_size != 2:
            V.fail(where, f"objective {name!r} is pairwise: `group_size` must be 2, got {group_size}")
        self.group_size, self.ignore_index = group_size, ignore_index
        self.process_group, self.ddp_average, self.backend = params.process_group, params.ddp_average, params.backend
        self.one_pass, self.fp32_head_grad = bool(params.one_pass), bool(params.fp32_head_grad)
        if ld_alpha is not None:
            V.check_number(where, "ld_alpha", ld_alpha, low=0, high=1)
        self.ld_alpha = ld_alpha
        self.wpo = bool(wpo)
        if not isinstance(head, HeadTransform):
            V.fail(where, f"`head` must be a robalign.HeadTransform, got {type(head).__name__}", TypeError)
        self.head_transform = head
        reference_free = params.reference_free
        if reference_free and not _objectives.needs_reference(name):
            V.fail(where, f"`reference_free`: objective {name!r} takes no reference model already")
        if reference_free and self.unpaired:
            V.fail(where, f"`reference_free`: objective {name!r} compares with its reference point; keep the "
                          "reference model")
        self.reference_free = bool(reference_free)
        self.needs_reference = _objectives.needs_reference(name) and not self.reference_free
        self.needs_kl = _objectives.needs_kl_reference(name)

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

    def forward(self, logits=None, labels=None, ref_logps=None, *, probs=None, weights=None,
                extras: BatchExtras | None = None, **flat) -> DoRAOutput:
        """The loss of one batch of S = B·K sequences from the policy's logits, rows group-major.

        Args:
            logits: ``[S, T, V]`` policy logits (or ``[N, V]`` packed, with ``extras.cu_seqlens``).
            labels: ``[S, T]`` (``[N]`` packed), aligned with the logits (:func:`robalign.shift_labels`);
                ``ignore_index`` marks unscored tokens.
            ref_logps: ``[S]`` the reference's sequence log-probs (or ``extras.ref_logits``), without gradient.
            probs: ``[S]`` or ``[B, K]`` classifier probabilities P(target | candidate), turned into weights
                by the ``weighting``; or
            weights: ``[B]`` per-sample or ``[S]``/``[B, K]`` per-candidate weights.
            extras: a :class:`~robalign.losses.options.BatchExtras` (scores, group ids, packed rows, the
                micro-batch accumulator, KTO's mismatched rows, reference logits).

        Returns a :class:`DoRAOutput`: ``loss`` (0-d, to ``backward()``) and the per-sample losses,
        weights, log-ratios and rewards. With ``extras.accumulator``, ``loss`` is this micro-batch's share
        of the accumulated step's loss, whose value so far is ``accumulator.loss``.
        """
        inputs = self._inputs("robalign.DoRALoss", extras, flat, hidden_ok=True)
        return self._compute(labels=labels, logits=logits, ref_logps=ref_logps, probs=probs, weights=weights, **inputs)

    def _inputs(self, where, extras, flat, *, hidden_ok=False, logps=False) -> dict:
        """``extras`` as keyword arguments, with 0.2's flat forward arguments merged in (deprecated)."""
        if extras is not None and not isinstance(extras, BatchExtras):
            V.fail(where, f"`extras` must be a robalign.BatchExtras, got {type(extras).__name__}", TypeError)
        inputs = {} if extras is None else {k: v for k, v in extras.as_dict().items() if v is not None}
        if not flat:
            return self._logps_inputs(where, inputs) if logps else inputs
        allowed = _FLAT_INPUTS | (set(_HIDDEN_INPUTS) if hidden_ok else set())
        unknown = set(flat) - allowed
        if unknown:
            V.fail(where, f"unexpected argument(s) {sorted(unknown)}", TypeError)
        if "extra_weights" in flat:
            flat["weight_factors"] = flat.pop("extra_weights")
        moves = [f"{key} → extras=BatchExtras({key}=...)" for key in sorted(flat) if key not in _HIDDEN_INPUTS]
        if any(key in flat for key in _HIDDEN_INPUTS):
            moves.append("hidden, head_weight, head_bias → FusedLinearDoRALoss(...)(hidden, head_weight, labels, "
                         "..., bias=...)")
        _deprecated(where, flat, "; ".join(moves))
        clash = set(inputs) & set(flat)
        if clash:
            V.fail(where, f"{sorted(clash)} given twice: in `extras` and as arguments")
        inputs.update({k: v for k, v in flat.items() if v is not None})
        return self._logps_inputs(where, inputs) if logps else inputs

    @staticmethod
    def _logps_inputs(where, inputs) -> dict:
        if inputs.get("token_stats"):
            V.fail(where, "`extras.token_stats` needs the logits or the hidden states and head; the loss from "
                          "log-probs has neither")
        inputs.pop("token_stats", None)
        for key in ("cu_seqlens", "ref_logits", "ref_hidden", "ref_head_weight", "ref_head_bias"):
            if inputs.get(key) is not None:
                V.fail(where, f"`extras.{key}` is an input of the logits or hidden-state paths; the loss from "
                              "log-probs reads per-sequence values only")
        return inputs

    def _compute(self, *, token_stats=False, **inputs) -> DoRAOutput:
        """The loss of one batch from any of its sources (every public entry ends here), with the
        token statistics where ``token_stats`` asks for them: formed by the one-pass loss, else a pass
        of their own, without gradient."""
        if not isinstance(token_stats, bool):
            V.fail("robalign.DoRALoss", f"`extras.token_stats` must be True or False, got {token_stats!r}",
                   TypeError)
        out = self._loss_of(token_stats=token_stats, **inputs)
        if token_stats and out.token_stats is None:
            logits, hidden, bias = inputs.get("logits"), inputs.get("hidden"), inputs.get("head_bias")
            head = {} if logits is not None else dict(
                hidden=hidden.detach(), head_weight=inputs["head_weight"].detach(), transform=self.head_transform,
                head_bias=None if bias is None else bias.detach())
            out.token_stats = per_token_stats(inputs["labels"], logits=None if logits is None else logits.detach(),
                                              ignore_index=self.ignore_index, cu_seqlens=inputs.get("cu_seqlens"),
                                              **head)
        return out

    def _loss_of(self, *, labels, logits=None, hidden=None, head_weight=None, head_bias=None, ref_logps=None,
                 ref_logits=None, ref_hidden=None, ref_head_weight=None, ref_head_bias=None, probs=None,
                 weights=None, scores=None, group_ids=None, cu_seqlens=None, accumulator=None,
                 kl_logps=None, kl_ref_logps=None, kl_counts=None, weight_factors=None,
                 token_stats=False) -> DoRAOutput:
        """The loss itself (``token_stats``: asks the one-pass operator to form the statistics)."""
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
        extra = weight_factors
        if self.wpo:
            if cu_seqlens is not None:
                V.fail(where, "`wpo` takes padded rows ([S, T] labels), not packed ones (`cu_seqlens`)")
            omega = wpo_weights(labels, logits=None if logits is None else logits.detach(),
                                hidden=None if hidden is None else hidden.detach(), head_weight=head_weight,
                                head_bias=head_bias, ignore_index=self.ignore_index, transform=self.head_transform)
            omega = omega.view(-1, self.group_size).prod(-1)
            extra = omega if extra is None else extra * omega.to(extra)
        kernel = self._one_pass_kernel(where, logits, hidden, head_weight, head_bias)
        if kernel is not None:
            return self._forward_one_pass(where, kernel, hidden, head_weight, head_bias, labels, cu_seqlens,
                                          ref_logps, probs, weights, scores, group_ids, accumulator, extra,
                                          self._kl(where, kl_logps, kl_ref_logps, kl_counts), token_stats)
        if with_ref:
            policy_logps, ref_logps, counts = sequence_logps_with_ref(
                logits, ref_logits, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens, backend=self.backend)
        else:
            policy_logps, counts = self._logps(where, "", logits, hidden, head_weight, head_bias, labels, cu_seqlens)
        if missing_ref and not given:
            V.fail(where, "pass exactly one of `ref_logits` or `ref_hidden` (with `ref_head_weight`)")
        return self._from_logps(policy_logps, counts, ref_logps, probs, weights, dict(
            scores=scores, group_ids=group_ids, accumulator=accumulator, weight_factors=extra, kl_logps=kl_logps,
            kl_ref_logps=kl_ref_logps, kl_counts=kl_counts))

    def from_logps(self, policy_logps, counts, ref_logps=None, *, probs=None, weights=None,
                   extras: BatchExtras | None = None, **flat) -> DoRAOutput:
        """The loss from per-sequence log-probabilities computed elsewhere.

        Args:
            policy_logps: ``[S]`` the policy's sequence log-probs (with their graph).
            counts: ``[S]`` integer scored tokens per sequence (needed by length-normalised objectives
                and averaged log-probs; ``None`` otherwise allowed).
            ref_logps, probs, weights, extras: as in :meth:`forward` (``extras`` without the
                logits-path fields).

        :meth:`per_sample`, then the reduction over the batch (and ranks), or the accumulator's step.
        """
        inputs = self._inputs("robalign.DoRALoss.from_logps", extras, flat, logps=True)
        return self._from_logps(policy_logps, counts, ref_logps, probs, weights, inputs)

    def _from_logps(self, policy_logps, counts, ref_logps, probs, weights, inputs) -> DoRAOutput:
        accumulator = inputs.pop("accumulator", None)
        samples = self._per_sample(policy_logps, counts, ref_logps, probs, weights, **inputs)
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
                          probs, weights, scores, group_ids, accumulator, extra=None, kl=None,
                          token_stats=False) -> DoRAOutput:
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

        loss, logps, counts, losses, formed_stats = fused_dora_loss(
            hidden, head_weight, labels, scale=scale, bias=head_bias, ignore_index=self.ignore_index,
            cu_seqlens=cu_seqlens, ref_logps=shifted_ref, sample_weights=sample_weights,
            scores=None if scores_g is None else scores_g.reshape(-1), objective=self.objective,
            hparams=self.hparams, group_size=k, lam=self.reduction.one_pass_temperature, kernel=kernel, need=need,
            fp32_grad_weight=self.fp32_head_grad, transform=self.head_transform, token_stats=token_stats)
        stats = dro["stats"]
        logratios = None if ref_logps is None else logps - ref_logps
        rewards = self._rewards(logps, logratios, counts, scores_g, kl)
        return DoRAOutput(losses=losses, weights=sample_weights, policy_logps=logps, logratios=logratios, **rewards,
                          group_ids=group_ids, kl=kl, counts=counts, loss=loss, dro=stats, token_stats=formed_stats)

    def per_sample(self, policy_logps, counts, ref_logps=None, *, probs=None, weights=None,
                   extras: BatchExtras | None = None, **flat) -> DoRASamples:
        """The per-sample losses, weights, log-ratios and rewards of one batch, before any
        reduction: what a reduction's accumulator takes micro-batch by micro-batch. Arguments as
        :meth:`from_logps` (``extras.accumulator`` is not read here)."""
        inputs = self._inputs("robalign.DoRALoss.per_sample", extras, flat, logps=True)
        inputs.pop("accumulator", None)
        return self._per_sample(policy_logps, counts, ref_logps, probs, weights, **inputs)

    def _per_sample(self, policy_logps, counts, ref_logps=None, probs=None, weights=None, *, scores=None,
                    group_ids=None, weight_factors=None, kl_logps=None, kl_ref_logps=None,
                    kl_counts=None) -> DoRASamples:
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
        kl = self._kl(where, kl_logps, kl_ref_logps, kl_counts)
        extra = {} if kl is None else {"kl": kl.to(policy_logps.dtype)}
        losses = self.objective_fn(grouped, ref_grouped, counts=counts_g, scores=scores_g, **extra, **self.hparams)
        sample_weights = self._weights(where, probs, weights, num_seqs, losses)
        if weight_factors is not None:
            sample_weights = sample_weights * weight_factors.to(sample_weights)
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

    def _kl(self, where, kl_logps, kl_ref_logps, kl_counts=None):
        """KTO's reference point from the mismatched rows (``None`` for other objectives); with
        averaged log-probs, from their per-token means (``kl_counts`` their scored tokens)."""
        given = kl_logps is not None or kl_ref_logps is not None or kl_counts is not None
        if not self.needs_kl:
            if given:
                V.fail(where, f"`kl_logps`/`kl_ref_logps` feed KTO's reference point; objective {self.objective!r} "
                              "takes none")
            return None
        if kl_logps is None or kl_ref_logps is None:
            V.fail(where, f"objective {self.objective!r} needs `kl_logps` and `kl_ref_logps` ([B] policy and "
                          "reference log-probs of mismatched completions) for its reference point")
        if self.average_logps:
            if kl_counts is None:
                V.fail(where, "averaged log-probs need `kl_counts` ([B] scored tokens of the mismatched completions) "
                              "for KTO's reference point")
            V.check_tensor(where, "kl_counts", kl_counts, ndim=1, integer=True)
            length = kl_counts.clamp(min=1)
            kl_logps, kl_ref_logps = kl_logps / length.to(kl_logps.dtype), kl_ref_logps / length.to(kl_ref_logps.dtype)
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
            if self.weighting is None:
                V.fail(where, "`probs` needs a weighting with `alpha` (the target fraction of the training mixture): "
                              "DoRALoss(..., weighting=DoRAWeights(alpha=...))")
            V.check_probs(where, "probs", probs)
            return self.weighting(self._per_row(where, "probs", probs, num_seqs).to(losses.dtype))
        if weights is None:
            return torch.ones_like(losses)
        V.check_tensor(where, "weights", weights, floating=True)
        if weights.dim() == 1 and weights.shape[0] == num_samples:
            return weights.to(losses.dtype)
        return self._per_row(where, "weights", weights, num_seqs).to(losses.dtype).mean(-1)


class FusedLinearDoRALoss(DoRALoss):
    """:class:`DoRALoss` from the decoder's hidden states and the LM head, never materialising the
    ``[N, V]`` logits: the head's matmul, log-softmax and the objective run chunk by chunk, and with
    a KL-DRO reduction (and gradients wanted) the loss **and** its gradients form in one forward
    (:mod:`robalign.ops.one_pass`: three matmul passes over the scored tokens; ``backward`` only scales).

    ::

        loss_fn = FusedLinearDoRALoss(Objective("dpo", beta=0.1), KLDRO(1.0), DoRAWeights(alpha=0.3))
        out = loss_fn(hidden, lm_head.weight, labels, ref_logps, probs=probs)   # hidden [S, T, H]
        out.loss.backward()                                                     # → hidden.grad, weight.grad

    Args:
        objective, reduction, weighting, params: as :class:`DoRALoss`.
        head: the model's logit transform after the head's matmul, a :class:`robalign.HeadTransform`
            (Gemma's soft-cap, Cohere's scale; default the identity).
    """

    def __init__(self, objective="dpo", reduction: Reduction | None = None, weighting: DoRAWeights | None = None,
                 head: HeadTransform | None = None, params: LossParams | None = None):
        nn.Module.__init__(self)
        self._configure(objective, reduction, weighting, params, HeadTransform() if head is None else head)

    def forward(self, hidden, head_weight, labels, ref_logps=None, *, probs=None, weights=None,
                extras: BatchExtras | None = None, bias=None) -> DoRAOutput:
        """The loss of one batch of S = B·K sequences from hidden states, rows group-major.

        Args:
            hidden: ``[S, T, H]`` the decoder's last hidden states (``[N, H]`` packed, with
                ``extras.cu_seqlens``), aligned with ``labels``.
            head_weight: ``[V, H]`` the LM head's weight; bias: its ``[V]`` bias, if any.
            labels: ``[S, T]`` (``[N]`` packed); ``ignore_index`` marks unscored tokens.
            ref_logps, probs, weights, extras: as in :meth:`DoRALoss.forward` (the reference may come as
                ``extras.ref_hidden`` with ``extras.ref_head_weight``).

        Returns a :class:`DoRAOutput`. On the one-pass path its ``policy_logps`` and ``logratios``
        carry no graph; only ``loss`` does.
        """
        inputs = self._inputs("robalign.FusedLinearDoRALoss", extras, {})
        return self._compute(labels=labels, hidden=hidden, head_weight=head_weight, head_bias=bias,
                             ref_logps=ref_logps, probs=probs, weights=weights, **inputs)


def fused_linear_dora_loss(hidden, head_weight, labels, ref_logps=None, *, objective="dpo", reduction=None,
                           weighting=None, probs=None, weights=None, bias=None, head=None, params=None,
                           extras=None) -> DoRAOutput:
    """:class:`FusedLinearDoRALoss` as a function: ``FusedLinearDoRALoss(objective, reduction,
    weighting, head, params)(hidden, head_weight, labels, ref_logps, probs=..., weights=..., extras=...,
    bias=...)``. Shapes and arguments as there; returns a :class:`DoRAOutput` whose ``loss`` is
    differentiable with respect to ``hidden``, ``head_weight`` and ``bias``."""
    loss_fn = FusedLinearDoRALoss(objective, reduction, weighting, head, params)
    return loss_fn(hidden, head_weight, labels, ref_logps, probs=probs, weights=weights, extras=extras, bias=bias)
