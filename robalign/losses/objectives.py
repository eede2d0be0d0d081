"""Base preference objectives ℓ_i, each returning unreduced per-sample losses ``[B]``.

All share one signature, ``fn(logps, ref_logps=None, *, counts=None, scores=None, **hparams)``,
on group-major ``[B, K]`` tensors (K candidates per sample; for pairs K = 2, chosen first).
The formulas and papers are in each function's docstring. The math, and what each objective
needs, live in one place: the ``@objective`` registry of :mod:`robalign.ground_truth.objectives`.
Every registered objective appears here as a function of the same name that validates its
arguments (shapes, dtypes, counts, hyper-parameters against their ranges) and then calls it.

    name            reference model   K        length-normalised   hyper-parameters
    dpo             yes               2        no                  beta, label_smoothing (cDPO)
    dpo_norm        yes               2        yes                 beta               (TRL's sigmoid_norm)
    robust          yes               2        no                  beta, label_smoothing (flip rate ε < 1/2)
    ipo             yes               2        no                  beta
    ipo_norm        yes               2        yes                 beta               (TRL's ipo)
    hinge           yes               2        no                  beta
    exo_pair        yes               2        no                  beta, label_smoothing (ε > 0)
    nca_pair        yes               2        no                  beta
    bco_pair        yes               2        no                  beta
    sppo_hard       yes               2        no                  beta
    apo_zero        yes               2        no                  beta
    apo_down        yes               2        no                  beta
    discopop        yes               2        no                  beta, tau
    simpo           no                2        yes                 beta, gamma, label_smoothing, alpha (AlphaPO)
    cpo             no                2        no                  beta, label_smoothing, alpha (AlphaPO)
    orpo            no                2        yes                 beta               (the odds-ratio term)
    plackett_luce   yes               any      no                  beta
    rrhf            no                any      yes                 sft_weight
    lire            no                any      no                  temperature
    sft             no                any      yes                 —                  (the best candidate's NLL)
    kto             yes               1*       no                  beta, desirable_weight, undesirable_weight
    apo_zero_unpaired yes             1*       no                  beta, desirable_weight, undesirable_weight
    aot             yes               2†       no                  beta, label_smoothing
    aot_unpaired    yes               2†       no                  beta, label_smoothing

``*`` unpaired: one completion per sample (``[B, 1]``), its label in ``scores`` (1 desirable, 0
undesirable); KTO also takes ``kl``, its reference point z₀ (see :mod:`robalign.losses.unpaired`).
``†`` batch-coupled: AOT sorts the batch's log-prob gaps (or log-ratios), so its B losses belong to
the positions of the sorted batch, not to samples: no per-sample weights or groups, and the loss
needs the whole batch at once (the recompute path, not the one-pass chunks).

Objectives combine: ``mixture({"dpo": 1.0, "sft": 0.5})`` (or the name ``"dpo+0.5*sft"``, which
``DoRALoss``, the YAML config and ``--objective`` accept directly) registers ``Σ_k c_k·ℓ^{(k)}``
as one objective, with the hyper-parameters of its terms shared by name — TRL's list of loss
types with ``loss_weights``. ``with_divergence("dpo", "js_divergence")`` (the name
``"dpo:js_divergence"``; ``"dpo:alpha_divergence=0.5"``) replaces each log-ratio r by ``f'(e^r)``
of an f-divergence — TRL's ``f_divergence_type``.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _validation as V
from ..ground_truth import objectives as _ref

NAMES = tuple(_ref.OBJECTIVES)
__all__ = [*NAMES, "Objective", "get", "spec", "needs_reference", "needs_counts", "is_pairwise", "is_unpaired",
           "is_batch_coupled", "needs_kl_reference", "check_labels", "hyperparameters",
           "check_hyperparameters", "check_counts", "NAMES", "mixture", "resolve", "with_divergence", "with_mean_logps"]

mixture = _ref.mixture
with_divergence = _ref.with_divergence
with_mean_logps = _ref.with_mean_logps


def resolve(objective) -> str:
    """The registered name of ``objective``: a name, a mixture written ``"dpo+0.5*sft"``, or
    ``{name: coefficient}`` (registered by :func:`mixture`). Raises ValueError for anything else."""
    if isinstance(objective, dict) or (isinstance(objective, str) and objective not in _ref.OBJECTIVES
                                       and any(c in objective for c in "+*:")):
        return mixture(objective)                  # a sum, or one variant term such as "dpo:js_divergence"
    if not isinstance(objective, str):
        raise ValueError(f"an objective is a name or {{name: coefficient}}, got {type(objective).__name__}")
    spec(objective)
    return objective


def spec(name: str) -> _ref.Objective:
    """The registry entry of objective ``name`` (what it needs, its hyper-parameters)."""
    if name not in _ref.OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(NAMES)} "
                         "(or a mixture such as 'dpo+0.5*sft')")
    return _ref.OBJECTIVES[name]


def needs_reference(name: str) -> bool:
    """Whether objective ``name`` uses reference-model log-probabilities."""
    return spec(name).reference


def needs_counts(name: str) -> bool:
    """Whether objective ``name`` is length-normalised (needs the scored tokens per candidate)."""
    return spec(name).counts


def is_pairwise(name: str) -> bool:
    """Whether objective ``name`` takes exactly two candidates per sample."""
    return spec(name).pairwise


def hyperparameters(name: str) -> dict:
    """The hyper-parameters of objective ``name`` and their defaults."""
    return {key: param.default for key, param in spec(name).params.items()}


def check_hyperparameters(name: str, hparams: dict, where: str | None = None) -> None:
    """Every key of ``hparams`` is a hyper-parameter of objective ``name`` and lies in its range."""
    where = where or f"robalign.objectives.{name}"
    params = spec(name).params
    for key, value in hparams.items():
        if key not in params:
            V.fail(where, f"unknown hyper-parameter `{key}`; objective {name!r} takes {sorted(params)}", TypeError)
        p = params[key]
        V.check_number(where, key, value, low=p.low, high=p.high, low_open=p.low_open, high_open=p.high_open)
        if not math.isfinite(value):
            V.fail(where, f"`{key}` must be finite, got {value}")


def _check_group(where, name, t, shape, *, floating=False):
    if t is None:
        return
    V.check_tensor(where, name, t, floating=floating)
    if not floating and not (t.is_floating_point() or t.dtype in V.INTEGER_DTYPES):
        V.fail(where, f"`{name}` must be a real (integer or floating) tensor, got {t.dtype}", TypeError)
    if tuple(t.shape) != shape:
        V.fail(where, f"`{name}` must have the shape of `logps` {shape}, got {tuple(t.shape)}")


def check_counts(where, counts):
    """Token counts are non-negative (a value check: eager or lazy, see robalign._validation)."""
    if counts is not None:
        V.check_values(where, counts >= 0, lambda lazy: "`counts` must be non-negative token counts"
                       + ("" if lazy else f", got {counts.min().item()}"))


def is_batch_coupled(name: str) -> bool:
    """Whether objective ``name``'s losses are per position of the batch's sorted values (AOT), not per
    sample: they need the whole batch at once and take no per-sample weights."""
    return spec(name).batch_coupled


def is_unpaired(name: str) -> bool:
    """Whether objective ``name`` reads unpaired data: one completion per sample (K = 1) labelled
    desirable or undesirable in ``scores`` (KTO)."""
    return spec(name).unpaired


def needs_kl_reference(name: str) -> bool:
    """Whether objective ``name`` takes KTO's batch reference point ``kl`` (from mismatched completions)."""
    return spec(name).kl_reference


def check_labels(where, scores, name="scores"):
    """Unpaired labels are 1 (desirable) or 0 (undesirable) (a value check: eager or lazy)."""
    V.check_values(where, (scores == 0) | (scores == 1),
                   lambda lazy: f"`{name}` must hold the labels of unpaired completions: 1 (desirable) or 0 (undesirable)")


def _check_unpaired(where, entry, shape, scores, kl):
    if shape[1] != 1:
        V.fail(where, f"`logps` must be [B, 1] for an unpaired objective (one labelled completion per sample), "
                      f"got {shape}")
    if scores is None:
        V.fail(where, "`scores` is required: the label of each completion, 1 desirable or 0 undesirable")
    if entry.kl_reference:
        if kl is None:
            V.fail(where, "`kl` is required: KTO's reference point z0 (robalign.losses.unpaired.reference_point "
                          "of mismatched completions' log-probs)")
        if isinstance(kl, torch.Tensor):
            V.check_tensor(where, "kl", kl, floating=True)
            if kl.numel() != 1:
                V.fail(where, f"`kl` must be one number (a 0-d tensor), got shape {tuple(kl.shape)}")
        else:
            V.check_number(where, "kl", kl)
    elif kl is not None:
        V.fail(where, f"objective {entry.name!r} has no reference point (`kl`); KTO has", TypeError)


def _public(entry: _ref.Objective):
    @functools.wraps(entry.fn)
    def objective(logps, ref_logps=None, *, counts=None, scores=None, kl=None, **hparams):
        where = f"robalign.objectives.{entry.name}"
        V.check_tensor(where, "logps", logps, ndim=2, floating=True)
        shape = tuple(logps.shape)
        if entry.pairwise and shape[1] != 2:
            V.fail(where, f"`logps` must be [B, 2] (chosen, rejected) for a pairwise objective, got {shape}")
        if entry.unpaired:
            _check_unpaired(where, entry, shape, scores, kl)
        elif shape[1] < 2:
            V.fail(where, f"`logps` must be [B, K] with K >= 2 candidates to compare, got {shape}")
        elif kl is not None:
            V.fail(where, f"`kl` is KTO's reference point; objective {entry.name!r} takes none", TypeError)
        if entry.reference and ref_logps is None:
            V.fail(where, "`ref_logps` is required: this objective compares with a reference model")
        if entry.counts and counts is None:
            V.fail(where, "`counts` (tokens per candidate) is required: this objective is length-normalised")
        _check_group(where, "ref_logps", ref_logps, shape, floating=True)
        _check_group(where, "counts", counts, shape)
        _check_group(where, "scores", scores, shape)
        check_counts(where, counts)
        if scores is not None:
            V.check_values(where, torch.isfinite(scores), lambda lazy: "`scores` must be finite")
            if entry.unpaired:
                check_labels(where, scores)
        check_hyperparameters(entry.name, hparams, where)
        if entry.kl_reference:
            hparams = dict(hparams, kl=kl)
        return entry.fn(logps, ref_logps, counts=counts, scores=scores, **hparams)

    return objective


#: β of an objective that takes one, when none is given (the DPO family's usual value)
DEFAULT_BETA = 0.1


class Objective:
    """A base objective with its hyper-parameters — what :class:`robalign.DoRALoss` optimises per sample.

        Objective("dpo", beta=0.1)                  ℓ = −log σ(β·(r_chosen − r_rejected)), r = logp − logp_ref
        Objective("dpo", beta=0.1, label_smoothing=0.1)                   cDPO
        Objective("dpo+0.5*sft", beta=0.1)          a weighted sum, hyper-parameters shared by name
        Objective("simpo", beta=2.0, gamma=0.5)
        Objective("plackett_luce", beta=0.1)        K candidates, ranked by the batch's ``scores``
        Objective("dpo", average_logps=True)        every log-prob read as logp/|y| (this is dpo_norm)

    Args:
        name: a registered objective (:data:`NAMES`, the table of :mod:`robalign.objectives`), a
            weighted sum (``"dpo+0.5*sft"`` or ``{"dpo": 1.0, "sft": 0.5}``) or an f-divergence
            variant (``"dpo:js_divergence"``).
        average_logps: read every candidate's policy and reference log-probs as per-token means
            ``logp/|y|`` before the objective (Liger-Kernel's ``average_log_prob``), for any objective
            that does not already normalise by length; the rewards reported are then β times the
            mean log-ratios.
        **hparams: the objective's hyper-parameters, checked here against their ranges (an unknown
            name raises TypeError); ``beta`` is 0.1 when the objective takes one and none is given.

    Attributes: ``name`` (the registered name the loss runs: ``"dpo/mean"`` with ``average_logps``),
    ``base`` (the name given, resolved), ``average_logps`` and ``hparams`` (every hyper-parameter passed).
    """

    __slots__ = ("name", "base", "average_logps", "hparams")

    def __init__(self, name="dpo", *, average_logps: bool = False, **hparams):
        self._set(name, average_logps, hparams, "robalign.Objective")

    @classmethod
    def checked(cls, where: str, name, average_logps: bool = False, **hparams) -> Objective:
        """``Objective(name, average_logps=..., **hparams)``, its errors naming ``where``."""
        objective = cls.__new__(cls)
        objective._set(name, average_logps, hparams, where)
        return objective

    def _set(self, name, average_logps, hparams, where):
        try:
            base = resolve(name)
        except ValueError as err:
            V.fail(where, f"`name`: {err}")
        registered = base
        if average_logps:
            try:
                registered = with_mean_logps(base)
            except ValueError as err:
                V.fail(where, f"`average_logps`: {err}")
        takes = hyperparameters(registered)
        unknown = set(hparams) - set(takes)
        if unknown:
            V.fail(where, f"objective {base!r} has no hyper-parameter {sorted(unknown)}; it takes {sorted(takes)}",
                   TypeError)
        if "beta" in takes:
            hparams.setdefault("beta", DEFAULT_BETA)
        check_hyperparameters(registered, hparams, where)
        for key, value in (("name", registered), ("base", base), ("average_logps", bool(average_logps)),
                           ("hparams", dict(hparams))):
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError(f"robalign.Objective is immutable; build another (setting {key!r})")

    @property
    def beta(self) -> float | None:
        """β, for an objective that takes one."""
        return self.hparams.get("beta")

    def __eq__(self, other) -> bool:
        return isinstance(other, Objective) and (self.name, self.hparams) == (other.name, other.hparams)

    __hash__ = None

    def __repr__(self) -> str:
        args = [repr(self.base)] + (["average_logps=True"] if self.average_logps else [])
        return f"Objective({', '.join(args + [f'{k}={v!r}' for k, v in self.hparams.items()])})"


_PUBLIC: dict = {}


def get(name: str):
    """The public (validating) objective called ``name``, also for one registered after import."""
    entry = spec(name)
    if _PUBLIC.get(name, (None,))[0] is not entry:
        _PUBLIC[name] = (entry, _public(entry))
    return _PUBLIC[name][1]


def __getattr__(name: str):
    if name in _ref.OBJECTIVES:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


globals().update({name: get(name) for name in NAMES})
