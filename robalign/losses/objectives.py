"""Base preference objectives ℓ_i, each returning unreduced per-sample losses ``[B]``.

All share one signature, ``fn(logps, ref_logps=None, *, counts=None, scores=None, **hparams)``,
on group-major ``[B, K]`` tensors (K candidates per sample; for pairs K = 2, chosen first).
The formulas and papers are in each function's docstring; the math lives in
:mod:`robalign.reference.objectives` and these wrappers validate the arguments first.

    name            reference model   K        hyper-parameters
    dpo             yes               2        beta, label_smoothing (cDPO)
    robust          yes               2        beta, label_smoothing (flip rate ε < 1/2)
    ipo             yes               2        beta
    hinge           yes               2        beta
    simpo           no                2        beta, gamma
    plackett_luce   yes               any      beta
    rrhf            no                any      sft_weight
    lire            no                any      temperature
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _validation as V
from ..reference import objectives as _ref

__all__ = list(_ref.OBJECTIVES) + ["get", "needs_reference", "needs_counts", "is_pairwise", "hyperparameters",
                                   "check_hyperparameters", "NAMES"]

NAMES = tuple(_ref.OBJECTIVES)

# hyper-parameter -> (low, high, low_open, high_open)
_RANGES = {
    "beta": (0, None, True, False),
    "label_smoothing": (0, 0.5, False, True),
    "gamma": (None, None, False, False),
    "sft_weight": (0, None, False, False),
    "temperature": (0, None, True, False),
}


def needs_reference(name: str) -> bool:
    """Whether objective ``name`` uses reference-model log-probabilities."""
    return _ref.OBJECTIVES[_check_name(name)][1]


def is_pairwise(name: str) -> bool:
    """Whether objective ``name`` takes exactly two candidates per sample."""
    return _ref.OBJECTIVES[_check_name(name)][2]


def hyperparameters(name: str) -> dict:
    """The hyper-parameters of objective ``name`` and their defaults."""
    defaults = _ref.OBJECTIVES[_check_name(name)][0].__kwdefaults__
    return {k: v for k, v in defaults.items() if k not in ("counts", "scores")}


def _check_name(name):
    if name not in _ref.OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(NAMES)}")
    return name


def needs_counts(name: str) -> bool:
    """Whether objective ``name`` is length-normalised (needs the scored tokens per candidate)."""
    return "counts" not in _ref.OBJECTIVES[_check_name(name)][0].__kwdefaults__


def check_hyperparameters(name: str, hparams: dict, where: str | None = None) -> None:
    """Every key of ``hparams`` is a hyper-parameter of objective ``name`` and lies in its range."""
    where = where or f"robalign.objectives.{name}"
    takes = hyperparameters(name)
    for key, value in hparams.items():
        if key not in takes:
            V.fail(where, f"unknown hyper-parameter `{key}`; objective {name!r} takes {sorted(takes)}", TypeError)
        low, high, low_open, high_open = _RANGES[key]
        V.check_number(where, key, value, low=low, high=high, low_open=low_open, high_open=high_open)
        if not math.isfinite(value):
            V.fail(where, f"`{key}` must be finite, got {value}")


def _check_group(where, name, t, shape, *, floating=False):
    if t is None:
        return
    V.check_tensor(where, name, t, floating=floating)
    if not floating and not (t.is_floating_point() or t.dtype in V._INTEGER_DTYPES):
        V.fail(where, f"`{name}` must be a real (integer or floating) tensor, got {t.dtype}", TypeError)
    if tuple(t.shape) != shape:
        V.fail(where, f"`{name}` must have the shape of `logps` {shape}, got {tuple(t.shape)}")


def check_counts(where, counts):
    """Token counts are non-negative (read only outside torch.compile traces)."""
    if counts is not None and not torch.compiler.is_compiling() and bool((counts < 0).any()):
        V.fail(where, f"`counts` must be non-negative token counts, got {counts.min().item()}")


def _public(name):
    ref_fn, uses_ref, pairwise = _ref.OBJECTIVES[name]
    length_normalised = needs_counts(name)

    @functools.wraps(ref_fn)
    def objective(logps, ref_logps=None, *, counts=None, scores=None, **hparams):
        where = f"robalign.objectives.{name}"
        V.check_tensor(where, "logps", logps, ndim=2, floating=True)
        shape = tuple(logps.shape)
        if pairwise and shape[1] != 2:
            V.fail(where, f"`logps` must be [B, 2] (chosen, rejected) for a pairwise objective, got {shape}")
        if shape[1] < 2:
            V.fail(where, f"`logps` must be [B, K] with K >= 2 candidates to compare, got {shape}")
        if uses_ref and ref_logps is None:
            V.fail(where, "`ref_logps` is required: this objective compares with a reference model")
        if length_normalised and counts is None:
            V.fail(where, "`counts` (tokens per candidate) is required: this objective is length-normalised")
        _check_group(where, "ref_logps", ref_logps, shape, floating=True)
        _check_group(where, "counts", counts, shape)
        _check_group(where, "scores", scores, shape)
        check_counts(where, counts)
        if scores is not None and not torch.compiler.is_compiling() and not bool(torch.isfinite(scores).all()):
            V.fail(where, "`scores` must be finite")
        check_hyperparameters(name, hparams, where)
        return ref_fn(logps, ref_logps, counts=counts, scores=scores, **hparams)

    return objective


def get(name: str):
    """The public objective called ``name``."""
    return globals()[_check_name(name)]


dpo = _public("dpo")
robust = _public("robust")
ipo = _public("ipo")
hinge = _public("hinge")
simpo = _public("simpo")
plackett_luce = _public("plackett_luce")
rrhf = _public("rrhf")
lire = _public("lire")
