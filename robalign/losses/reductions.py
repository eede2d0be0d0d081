"""The reduction protocol: how the per-sample losses ℓ_i (with weights w_i) of the effective
batch — every micro-batch on every data-parallel rank — become the one scalar that is trained.

A reduction is an object with two methods, and nothing else in robalign knows its formula:

    reduce(losses, weights, *, group, ddp_average)  → (loss, DROStats)   one batch, exact over the
                                                                          ranks of ``group``
    accumulator(params, *, group, ddp_average, exact, accumulation_steps) → Accumulator
                                                    the same objective exact across micro-batches

A reduction whose gradient with respect to ℓ_i is ``w_i·e^{a_i}`` up to one batch-wide scalar
(``a_i = w_i·ℓ_i/λ``) can take a gradient formed ahead of it, as the one-pass fused loss
(:mod:`robalign.ops.one_pass`) forms it: it names that λ in ``one_pass_temperature`` and gives
the scalar in ``gradient_scale`` (and its accumulator likewise). Others leave
``one_pass_temperature`` ``None``; ``DoRALoss`` then takes the recompute path.

An :class:`Accumulator` is called once per micro-batch with its losses and weights and returns
the surrogate to ``backward()``; after the last micro-batch the parameters' gradients are those
of the full-batch loss, ``.loss`` is its value and ``.stats()`` its sample-weight statistics.
``DoRALoss`` and ``DoRATrainer`` take any reduction; adding an ambiguity set is one class here.

    name     class     formula (x_i = w_i·ℓ_i)
    kl       KLDRO     λ·log mean_i exp(x_i/λ)   (λ = ∞: mean(x); λ < 0: soft minimum)
    kl-ball  KLBall    sup of E_q[x] over KL(q ‖ uniform) ≤ η = min_λ λη + λ·log mean exp(x/λ)
    chi2     Chi2Ball  sup over ½·N·Σ(q_i − 1/N)² ≤ ρ  = min_c c + √(1+2ρ)·√mean((x − c)₊²)
    cvar     CVaR      the mean of the worst ``level`` fraction = min_c c + mean((x − c)₊)/level
    group    GroupDRO  Σ_g q_g·L_g over known groups, q by exponentiated gradient across steps

The last three are solved exactly per batch (:mod:`robalign.losses.ambiguity`) on the values of
every rank (gathered), and the gradient is the maximising q (∂L/∂ℓ_i = q_i·w_i). Their weights
need the whole batch's losses, so their exact accumulator over several micro-batches has a
``prepare`` step: a no-grad forward pass over the step's micro-batches fixes q, then each
micro-batch's gradient pass uses it (``DoRATrainer`` does this in ``get_batch_samples``);
``exact=False`` is the per-micro-batch approximation.

``GroupDRO`` is stateful: its q over the G groups moves once per optimizer step (once per
``prepare``, or per ``reduce`` with gradients enabled) and is saved with ``state_dict()``. It is the
one reduction that reads ``group_ids`` (``[n]`` integer group of each sample; ``takes_group_ids``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import math

import torch
import torch.distributed as dist

from .. import _validation as V
from . import ambiguity, groups
from .dro import (DROStats, KLDROAccumulator, _check, _is_weighted_mean, _log_mean_exp, _scaled, _world,
                  effective_lam, kl_dro_gradient_scale, kl_dro_with_stats)

__all__ = ["Reduction", "Accumulator", "KLDRO", "KLBall", "Chi2Ball", "CVaR", "GroupDRO", "REDUCTIONS"]


class Accumulator(Protocol):
    """One effective batch folded in micro-batch by micro-batch (see the module docstring)."""

    loss: float | None

    def __call__(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def stats(self) -> DROStats: ...

    def gradient_scale(self, losses: torch.Tensor, weights: torch.Tensor | None,
                       shift: torch.Tensor) -> torch.Tensor: ...


class Reduction(ABC):
    """An ambiguity set over the effective batch, as a reduction of per-sample losses."""

    name: ClassVar[str]
    #: λ of the exponents ``w·ℓ/λ`` a one-pass gradient is formed with; ``None``: no one-pass path
    one_pass_temperature: ClassVar[float | None] = None
    #: whether ``reduce``/the accumulator read ``group_ids`` (the group of each sample)
    takes_group_ids: ClassVar[bool] = False

    def gradient_scale(self, losses, weights, shift, *, group=None, ddp_average=True):
        """``(value, κ, stats)`` for a gradient formed ahead as ``Σ_i w_i·e^{a_i − shift}·∇ℓ_i``: the
        loss value and the scalar that makes it the exact gradient (see :func:`robalign.kl_dro_gradient_scale`)."""
        raise NotImplementedError(f"reduction {self.name!r} takes no gradient formed ahead of it")

    @abstractmethod
    def reduce(self, losses: torch.Tensor, weights: torch.Tensor | None = None, *, group=None,
               ddp_average: bool = True) -> tuple[torch.Tensor, DROStats]:
        """The loss of one batch ``losses`` ``[n]`` (weights ``[n]``), exact over ``group``'s ranks."""

    @abstractmethod
    def accumulator(self, params, *, group=None, ddp_average: bool = True, exact: bool = True,
                    accumulation_steps: int | None = None, prepass: bool = False) -> Accumulator:
        """The same objective, exact across gradient-accumulation micro-batches of ``params``.

        ``prepass=True`` asks for the two-pass form even where an online one exists: a no-grad
        pass over the step's micro-batches (``prepare``) fixes every sample's weight, so nothing
        rescales ``param.grad`` afterwards — for engines that keep the accumulated gradient
        elsewhere (DeepSpeed ZeRO reduces each micro-batch's gradient into its own buffers)."""


@dataclass(frozen=True)
class KLDRO(Reduction):
    """KL-DRO with temperature λ (DoRA, arXiv 2504.05831, Eq. 8): ``λ·log mean_i exp(w_i·ℓ_i/λ)``.

    The dual of the worst case over a KL ball around the weighted data; λ = ∞ is the weighted
    mean, λ > 0 up-weights hard samples, λ < 0 is Dr.DPO's soft minimum. See :func:`robalign.kl_dro`
    and :class:`robalign.KLDROAccumulator`.
    """

    lam: float = 1.0
    name: ClassVar[str] = "kl"

    def __post_init__(self):
        V.check_lam("robalign.KLDRO", self.lam)

    @property
    def one_pass_temperature(self) -> float:
        return effective_lam(self.lam)

    def reduce(self, losses, weights=None, *, group=None, ddp_average=True):
        return kl_dro_with_stats(losses, weights, lam=self.lam, group=group, ddp_average=ddp_average)

    def gradient_scale(self, losses, weights, shift, *, group=None, ddp_average=True):
        return kl_dro_gradient_scale(losses, weights, shift, lam=self.lam, group=group, ddp_average=ddp_average)

    def solve(self, x):
        """``(value, q, None)`` over the values ``x = w·ℓ`` of the whole batch: the loss and the
        sample weights ``q = softmax(x/λ)`` (uniform for λ = ∞), float64 (for the two-pass form)."""
        n, lam = x.numel(), effective_lam(self.lam)
        if _is_weighted_mean(lam):
            return x.mean(), torch.full_like(x, 1 / n), None
        a = x.double() / lam
        m = a.max()
        value = _log_mean_exp(lam, m, torch.expm1(a - m).sum(), n)
        return value.to(x.dtype), torch.softmax(a, 0).to(x.dtype), None

    def solve_global(self, x_local, group, group_ids=None, update=True):
        """:meth:`solve` over every rank's ``x_local`` (gathered), as the per-batch sets do."""
        return _solve_gathered(self, x_local, group, group_ids)

    def accumulator(self, params, *, group=None, ddp_average=True, exact=True, accumulation_steps=None,
                    prepass=False):
        if exact and prepass and accumulation_steps != 1:
            return _TwoPass(self, group, ddp_average)
        return KLDROAccumulator(params, lam=self.lam, group=group, ddp_average=ddp_average, exact=exact,
                                accumulation_steps=accumulation_steps)


def _gather(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` ``[n_r]`` concatenated in rank order (the same on every rank), and where
    this rank's values start."""
    if group is None:
        return x, 0
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor(x.numel(), device=x.device), group=group)
    sizes = [int(n) for n in sizes]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def _solve_gathered(reduction, x_local: torch.Tensor, group, group_ids=None):
    """``reduction.solve`` over every rank's ``x_local`` (gathered): ``(value, this rank's q, stats)``."""
    if group_ids is not None:
        V.fail(f"robalign.{type(reduction).__name__}", "takes no `group_ids` (GroupDRO does)")
    x, offset = _gather(x_local.detach().double(), group)
    value, q, dual = reduction.solve(x)
    stats = DROStats(ess=1.0 / (q * q).sum(), max_share=q.max(), num_samples=torch.tensor(x.numel()),
                     dual=None if dual is None else torch.tensor(float(dual), dtype=torch.float64))
    return value, q[offset:offset + x_local.numel()], stats


class _WorstCase(Reduction):
    """An ambiguity set solved per batch: ``solve(x)`` gives ``(value, q, dual)`` for the values
    ``x = w·ℓ`` of every rank; the loss is the value with gradient ``q_i·w_i`` to each ℓ_i."""

    def solve(self, x: torch.Tensor):
        raise NotImplementedError

    def solve_global(self, x_local: torch.Tensor, group, group_ids=None,
                     update: bool = True) -> tuple[torch.Tensor, torch.Tensor, DROStats]:
        """Solve over every rank's ``x_local`` (gathered): ``(value, this rank's q, stats)``."""
        return _solve_gathered(self, x_local, group, group_ids)

    def reduce(self, losses, weights=None, *, group_ids=None, group=None, ddp_average=True):
        where = f"robalign.{type(self).__name__}"
        _check(where, losses, weights, 1.0, group)
        _, wl, _ = _scaled(losses, weights, math.inf, where)
        value, q, stats = self.solve_global(wl, group, group_ids, update=torch.is_grad_enabled())
        scale = _world(group) if ddp_average else 1
        loss = value.to(wl.dtype) + scale * (q.to(wl.dtype) * (wl - wl.detach())).sum()
        return loss.to(losses.dtype), stats

    def accumulator(self, params, *, group=None, ddp_average=True, exact=True, accumulation_steps=None,
                    prepass=False):
        if exact and accumulation_steps != 1:
            return _TwoPass(self, group, ddp_average)
        return _PerMicroBatch(self, group, ddp_average, 1 if exact else accumulation_steps)


class _TwoPass:
    """The exact worst case over several micro-batches: :meth:`prepare` takes every micro-batch's
    per-sample losses of the step (a no-grad forward pass), gathers them over the ranks and
    solves the set once; then each call, in the same order, returns the micro-batch's surrogate
    ``scale·Σ_i q_i·w_i·ℓ_i`` with q fixed, so the accumulated gradient is the whole batch's."""

    needs_prepare = True

    def __init__(self, reduction, group, ddp_average):
        self.reduction, self.group, self.ddp_average = reduction, group, ddp_average
        self.reset()

    def reset(self):
        self._q, self._next, self._stats, self.loss_value = None, 0, None, None

    @property
    def loss(self):
        return None if self.loss_value is None else float(self.loss_value)

    @torch.no_grad()
    def prepare(self, losses: list, weights: list | None = None, group_ids: list | None = None) -> None:
        """Solve the set over the step's micro-batches: ``losses[j]`` ``[n_j]`` (and ``weights[j]``,
        ``group_ids[j]``) of micro-batch j on this rank, from the pass whose forward the gradient
        pass repeats."""
        weights = weights or [None] * len(losses)
        where = f"robalign.{type(self.reduction).__name__} accumulator"
        values = [_scaled(l.detach(), None if w is None else w.detach(), math.inf, where)[1]
                  for l, w in zip(losses, weights)]
        ids = None if group_ids is None else torch.cat(list(group_ids))
        self.loss_value, q, self._stats = self.reduction.solve_global(torch.cat(values), self.group, ids, update=True)
        self._q = list(torch.split(q, [v.numel() for v in values]))
        self._next = 0

    def _take(self, losses) -> torch.Tensor:
        """The prepared q of the next micro-batch (checked against ``losses``)."""
        where = f"robalign.{type(self.reduction).__name__} accumulator"
        if self._q is None or self._next >= len(self._q):
            V.fail(where, "call prepare(losses, weights) with every micro-batch of the step (a no-grad pass) "
                          "before their gradient pass", RuntimeError)
        q = self._q[self._next]
        if q.numel() != losses.numel():
            V.fail(where, f"micro-batch {self._next} has {losses.numel()} samples, prepare() saw {q.numel()}")
        self._next += 1
        return q

    def __call__(self, losses, weights=None, group_ids=None):
        """The micro-batch's surrogate with the q that :meth:`prepare` fixed (``group_ids`` were
        read there)."""
        q = self._take(losses)
        _, wl, _ = _scaled(losses, weights, math.inf, f"robalign.{type(self.reduction).__name__} accumulator")
        scale = _world(self.group) if self.ddp_average else 1
        return scale * (q.to(wl.dtype) * wl).sum()

    def gradient_scale(self, losses, weights, shift) -> torch.Tensor:
        """κ for the one-pass loss's gradient ``Σ_i w_i·e^{a_i − shift}·∇ℓ_i`` of the next
        micro-batch (KL-DRO only), such that each sample's coefficient is its prepared ``q_i·w_i``
        (times the world size under ``ddp_average``); nothing already accumulated is touched.

        The mean (λ = ∞): ``κ = e^{shift}/N``. Otherwise κ is matched at the micro-batch's largest
        exponent a_j (``a = w·ℓ/λ`` from the losses this pass formed, as the op formed them):
        ``κ = q_j·e^{shift − a_j}``, and then every other sample's coefficient is ``q_j·w_i·e^{a_i −
        a_j} = q_i·w_i`` too. Not ``e^{shift − log Z}`` with ``log Z = log N + value/λ``: the value
        comes from the prepare pass, whose float32 losses differ from this pass's in the last bits,
        and at λ = 1e-200 that difference times 1/λ made κ 0 or inf."""
        lam = self.reduction.one_pass_temperature
        if lam is None:
            V.fail(f"robalign.{type(self.reduction).__name__} accumulator", "takes no gradient formed ahead of it")
        q = self._take(losses)
        scale = _world(self.group) if self.ddp_average else 1
        if _is_weighted_mean(lam):
            log_z = torch.tensor(math.log(float(self._stats.num_samples)), dtype=torch.float64, device=shift.device)
            return torch.exp(shift.double() - log_z) * scale
        _, _, a = _scaled(losses.detach(), None if weights is None else weights.detach(), lam,   # λ as the op took it
                          f"robalign.{type(self.reduction).__name__} accumulator")
        if a.numel() == 0:
            return torch.zeros((), dtype=torch.float64, device=shift.device)
        j = torch.argmax(a)
        return q.double()[j] * torch.exp(shift.double() - a[j]) * scale

    def stats(self):
        if self._stats is None:
            raise RuntimeError("the accumulator has not been prepared since reset()")
        return self._stats


class _PerMicroBatch:
    """Each micro-batch reduced on its own, divided by the number of micro-batches (exact when
    there is one)."""

    def __init__(self, reduction, group, ddp_average, steps):
        self.reduction, self.group, self.ddp_average, self.steps = reduction, group, ddp_average, steps
        self.reset()

    def reset(self):
        self._values, self._stats, self.loss_value = [], None, None

    @property
    def loss(self):
        return None if self.loss_value is None else float(self.loss_value)

    def __call__(self, losses, weights=None, group_ids=None):
        loss, self._stats = self.reduction.reduce(losses, weights, group_ids=group_ids, group=self.group,
                                                  ddp_average=self.ddp_average)
        self._values.append(loss.detach().double())
        self.loss_value = torch.stack(self._values).mean()
        return loss / self.steps

    def stats(self):
        if self._stats is None:
            raise RuntimeError("the accumulator has folded in no micro-batch since reset()")
        return self._stats


def _radius(where, name, value):
    V.check_number(where, name, value, low=0)
    if not math.isfinite(value):
        V.fail(where, f"`{name}` must be finite, got {value}")


@dataclass(frozen=True)
class KLBall(_WorstCase):
    """The worst case over a KL ball of radius η around the weighted batch:
    ``sup {E_q[x] : KL(q ‖ uniform) ≤ η} = min_{λ>0} λη + λ·log mean exp(x/λ)``, λ* solved each
    batch (reported as ``dual``); η = 0 is the weighted mean, a large η the maximum."""

    eta: float = 0.1
    name: ClassVar[str] = "kl-ball"

    def __post_init__(self):
        _radius("robalign.KLBall", "eta", self.eta)

    def solve(self, x):
        return ambiguity.kl_ball(x, self.eta)


@dataclass(frozen=True)
class Chi2Ball(_WorstCase):
    """The worst case over a χ² ball of radius ρ (Cressie–Read, Duchi & Namkoong 2021):
    ``min_c c + √(1+2ρ)·√mean((x − c)₊²)``, weights ∝ (x − c*)₊ (c* reported as ``dual``)."""

    rho: float = 0.5
    name: ClassVar[str] = "chi2"

    def __post_init__(self):
        _radius("robalign.Chi2Ball", "rho", self.rho)

    def solve(self, x):
        return ambiguity.chi2_ball(x, self.rho)


@dataclass(frozen=True)
class CVaR(_WorstCase):
    """Conditional value at risk at ``level`` (not DoRA's α): the mean of the worst ``level``
    fraction of the batch, ``min_c c + mean((x − c)₊)/level``; level = 1 is the weighted mean."""

    level: float = 0.2
    name: ClassVar[str] = "cvar"

    def __post_init__(self):
        V.check_number("robalign.CVaR", "level", self.level, low=0, high=1, low_open=True)

    def solve(self, x):
        return ambiguity.cvar(x, self.level)


class GroupDRO(_WorstCase):
    """Group DRO over G known groups (Sagawa et al. 2020; Ramesh et al. 2024 for preferences):
    ``Σ_g q_g·L_g`` with ``L_g`` the mean of ``w_i·ℓ_i`` over the batch's samples of group g and
    q moved by exponentiated gradient, ``q ← q·exp(step_size·L)/Z``, once per optimizer step
    before the loss (:mod:`robalign.losses.groups`). The gradient to ℓ_i is ``q_g(i)·w_i/n_g(i)``.

    Stateful: q persists across steps, on the device of the losses; ``state_dict()`` /
    ``load_state_dict()`` carry it through checkpoints. q moves when the loss is computed with
    gradients enabled (training) or in an exact accumulator's ``prepare``; under ``no_grad``
    (evaluation) the current q is used as it is. One group is plain ERM; step_size 0 keeps q
    uniform (the mean of the group means).

    Args:
        num_groups: G; ``group_ids`` take values in ``0 … G−1``.
        step_size: η_q of the exponentiated-gradient step (Sagawa et al. use 0.01).
        names: optional G names, for logs (``dro/q/<name>``).
    """

    name: ClassVar[str] = "group"
    takes_group_ids: ClassVar[bool] = True

    def __init__(self, num_groups: int, step_size: float = 0.01, names=None):
        where = "robalign.GroupDRO"
        V.check_int(where, "num_groups", num_groups, low=1)
        _radius(where, "step_size", step_size)
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != num_groups:
                V.fail(where, f"`names` must hold num_groups={num_groups} names, got {len(names)}")
        self.num_groups, self.step_size, self.names = int(num_groups), float(step_size), names
        self.log_q = torch.full((self.num_groups,), -math.log(self.num_groups), dtype=torch.float64)

    def __repr__(self):
        return f"GroupDRO(num_groups={self.num_groups}, step_size={self.step_size}, names={self.names})"

    @property
    def q(self) -> torch.Tensor:
        """The current weights ``[G]`` of the groups (float64, on the simplex)."""
        return self.log_q.exp()

    def state_dict(self) -> dict:
        """``{"log_q": [G], "names": [G] or None}``: q goes back to the groups by name."""
        names = None if self.names is None else list(self.names)
        return {"log_q": self.log_q.detach().cpu().tolist(), "names": names}

    def load_state_dict(self, state: dict) -> None:
        """q from :meth:`state_dict`. With names on both sides each group takes its own q, by name
        (whatever the order); a group new to this run or gone from it is an error. Without names
        (on either side) q is taken by position."""
        log_q = state["log_q"]
        saved_names, where = state.get("names"), "robalign.GroupDRO.load_state_dict"
        if saved_names is not None and self.names is not None:
            new, gone = sorted(set(self.names) - set(saved_names)), sorted(set(saved_names) - set(self.names))
            if new or gone or len(saved_names) != len(log_q):
                V.fail(where, f"the saved groups {list(saved_names)} are not this run's {list(self.names)} (new: {new}, "
                              f"gone: {gone}); group DRO's q belongs to its groups by name")
            by_name = dict(zip(saved_names, log_q))
            log_q = [by_name[name] for name in self.names]
        log_q = torch.tensor(log_q, dtype=torch.float64)
        usable = (~torch.isnan(log_q) & ~torch.isposinf(log_q)).all() and torch.isfinite(log_q).any()
        if log_q.shape != (self.num_groups,) or not bool(usable):
            V.fail(where, f"`log_q` must be {self.num_groups} numbers, finite or -inf (q = 0), one finite at least, "
                          f"got {state['log_q']!r}")
        self.log_q = torch.log_softmax(log_q, 0)

    def solve_global(self, x_local, group, group_ids=None, update=True):
        where = "robalign.GroupDRO"
        if group_ids is None:
            V.fail(where, "needs `group_ids` ([n] integer group of each sample)")
        V.check_tensor(where, "group_ids", group_ids, ndim=1, integer=True)
        if group_ids.shape != x_local.shape:
            V.fail(where, f"`group_ids` must have the shape of `losses` {tuple(x_local.shape)}, "
                          f"got {tuple(group_ids.shape)}")
        g = self.num_groups
        V.check_values(where, (group_ids >= 0) & (group_ids < g),
                       lambda lazy: f"`group_ids` must lie in 0 … {g - 1} (num_groups={g})")
        sums, counts = groups.group_sums(x_local, group_ids, g, group)
        value, per_group, losses, log_q = groups.group_dro_step(sums, counts, self.log_q.to(x_local.device),
                                                                self.step_size, update)
        self.log_q = log_q
        q = log_q.exp()
        total = torch.where(counts > 0, q, 0.0).sum()
        sum_sq = torch.where(counts > 0, q * per_group, 0.0).sum()          # Σ_i p_i² = Σ_g q_g²/n_g
        stats = DROStats(ess=total * total / sum_sq, max_share=per_group.max() / total,
                         num_samples=counts.sum().round().long(), group_weights=q.clone(),
                         group_losses=torch.where(counts > 0, losses, math.nan))
        return value, per_group[group_ids.to(per_group.device).long()], stats


REDUCTIONS = {cls.name: cls for cls in (KLDRO, KLBall, Chi2Ball, CVaR, GroupDRO)}
