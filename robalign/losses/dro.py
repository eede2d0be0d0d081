"""Exact KL-DRO over the whole effective batch: every micro-batch on every data-parallel rank.

    L = λ · log( (1/N) Σ_i exp(a_i) ),   a_i = w_i·ℓ_i / λ,   ∂L/∂ℓ_i = w_i · softmax_i(a)

The normaliser couples the batch, so a per-device (or per-micro-batch) log-mean-exp is a
different objective. :func:`kl_dro` all-reduces ``max a`` and ``Σ exp(a − max)`` across a process
group in the forward, so every rank sees the global loss and its backward needs no
collective. :class:`KLDROAccumulator` extends the same normaliser across gradient-accumulation
micro-batches by rescaling the gradients already accumulated whenever the running maximum or
sum changes (the online-softmax trick applied to parameter gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _validation as V

__all__ = ["kl_dro", "kl_dro_with_stats", "kl_dro_gradient_scale", "DROStats", "KLDROAccumulator", "effective_lam"]

# λ at float64's edges. |λ| ≥ LAM_MEAN is the weighted mean: the KL-DRO value exceeds it by about
# var(w·ℓ)/(2λ), below float64's resolution for any loss float32 can hold. 0 < |λ| < LAM_MIN is
# taken as ±LAM_MIN: the max (λ > 0; the min for λ < 0) plus λ·log(k/N), within 1e-200·log N of the
# limit, while a = w·ℓ/λ stays finite in float64 for any float32 loss (|w·ℓ|/LAM_MIN ≤ 3.4e238).
LAM_MEAN, LAM_MIN = 1e200, 1e-200


def effective_lam(lam: float) -> float:
    """λ as the computations take it (see LAM_MEAN, LAM_MIN): ``inf`` for ``|λ| ≥ 1e200``,
    ``±1e-200`` for ``0 < |λ| < 1e-200``, else λ itself."""
    if abs(lam) >= LAM_MEAN:     # comparisons only: a SymFloat under torch.compile (see check_lam)
        return math.inf
    if abs(lam) < LAM_MIN:
        return LAM_MIN if lam > 0 else -LAM_MIN
    return lam


@dataclass(frozen=True)
class DROStats:
    """Global statistics of the DRO sample weights ``q_i = w_i·softmax_i(a)``: detached 0-dim
    tensors (no device synchronisation until read, nothing for ``torch.compile`` to guard on).

    ess: effective sample size ``(Σq)² / Σq²`` (N for uniform q, 1 when one sample dominates).
    max_share: the largest ``q_i / Σq``.
    num_samples: N, over all ranks (and micro-batches for the accumulator).
    dual: the dual variable of an ambiguity set solved per batch (λ* of a KL ball, c* of a χ²
    ball or CVaR; :mod:`robalign.losses.ambiguity`), else ``None``.
    group_weights, group_losses: ``[G]`` q and the batch's mean loss of each group (NaN for a
    group with no sample in the batch; group DRO, :mod:`robalign.losses.groups`), else ``None``.
    """

    ess: torch.Tensor
    max_share: torch.Tensor
    num_samples: torch.Tensor
    dual: torch.Tensor | None = None
    group_weights: torch.Tensor | None = None
    group_losses: torch.Tensor | None = None


def _is_weighted_mean(lam: float) -> bool:
    return lam == math.inf


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _check(where, losses, weights, lam, group):
    V.check_tensor(where, "losses", losses, ndim=1, floating=True)
    if losses.numel() == 0 and group is None:
        V.fail(where, "`losses` is empty: the DRO loss of no sample is undefined")
    if weights is not None:
        V.check_tensor(where, "weights", weights, ndim=1, floating=True)
        if weights.shape != losses.shape:
            V.fail(where, f"`weights` must have the shape of `losses` {tuple(losses.shape)}, got {tuple(weights.shape)}")
        V.check_same_device(where, losses=losses, weights=weights)
        V.check_values(where, (weights >= 0) & torch.isfinite(weights),
                       lambda lazy: "`weights` must be finite and non-negative")
    V.check_lam(where, lam)
    if group is not None and not dist.is_initialized():
        V.fail(where, "`group` was given but torch.distributed is not initialised", RuntimeError)


class _BatchMoments:
    """Per-call partial sums over the local samples, relative to a shift ``m``, in float64.

    Holds (all detached) ``m = max a``, ``log max(w·e^a)``, and ``[Σe^{a−m}, n, Σw·e^{a−m},
    Σw²·e^{2(a−m)}, Σexpm1(a−m)]``; with a process group, one MAX and one SUM all-reduce make
    them global.
    The last sum gives the value without cancellation (:func:`_log_mean_exp`).
    """

    def __init__(self, a: torch.Tensor, w: torch.Tensor, group):
        a = a.detach().double()
        w = w.detach().double()
        neg_inf = torch.full((), -math.inf, dtype=a.dtype, device=a.device)
        maxes = torch.stack([a.max() if a.numel() else neg_inf,
                             (a + w.log()).max() if a.numel() else neg_inf])
        if group is not None:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        self.m = maxes[0]
        self.log_max_q = maxes[1]
        d = a - self.m
        e = torch.exp(d)
        count = torch.full((), a.numel(), dtype=a.dtype, device=a.device)
        sums = torch.stack([e.sum(), count, (w * e).sum(), (w * e).square().sum(), torch.expm1(d).sum()])
        if group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        self.sum_exp, self.count, self.sum_q, self.sum_q2, self.sum_expm1 = sums.unbind()

    def stats(self) -> DROStats:
        return _stats(self.sum_q, self.sum_q2, self.log_max_q - self.m, self.count)


def _log_mean_exp(lam: float, m: torch.Tensor, sum_expm1: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``λ·log((1/n) Σ e^{a_i})`` as ``λ·m + λ·log1p(Σ expm1(a_i − m) / n)``, float64.

    The plain form ``λ·(m + log Σe^{a−m} − log n)`` cancels catastrophically for large |λ| (the
    log is ≈ 0, then multiplied by λ: float32 gives 0.0 for kl_dro([1, 2, 3], lam=1e9)); this one
    keeps full relative precision and tends to the weighted mean as |λ| → ∞.
    """
    return lam * m + lam * torch.log1p(sum_expm1 / count)


def _batch_value(lam, wl, moments, group) -> torch.Tensor:
    """The loss value (float64, detached) of one batch with ``moments`` over ``group``'s ranks: the
    global weighted mean for λ = ∞ (one more SUM all-reduce), else :func:`_log_mean_exp`."""
    if not _is_weighted_mean(lam):
        return _log_mean_exp(lam, moments.m, moments.sum_expm1, moments.count)
    total = wl.detach().double().sum()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total / moments.count


def _stats(sum_q, sum_q2, log_max_q, count) -> DROStats:
    ess = torch.where(sum_q2 > 0, sum_q * sum_q / sum_q2, 0.0)
    share = torch.where(sum_q > 0, torch.exp(log_max_q) / sum_q, 0.0)
    return DROStats(ess=ess, max_share=share, num_samples=count.round().long())


def check_finite_losses(where: str, losses: torch.Tensor) -> None:
    """Every per-sample loss must be finite: a +∞ loss (an objective's limit where a response the
    policy must prefer has log-prob −∞, e.g. a token masked by a −∞ head bias) makes every
    reduction +∞, with no gradient to train on; a NaN one comes from NaN inputs."""
    losses = losses.detach()

    def message(lazy):
        text = "every per-sample loss must be finite (a +inf loss — e.g. a chosen response with log-prob -inf — " \
               "makes the objective +inf, with no gradient; NaN comes from NaN inputs)"
        if lazy:
            return text
        bad = (~torch.isfinite(losses)).nonzero().flatten()[:4].tolist()
        return text + f"; samples {bad} have losses {[float(losses[i]) for i in bad]}"
    V.check_values(where, torch.isfinite(losses), message)


def _scaled(losses, weights, lam, where="robalign.kl_dro"):
    """``(w, w·ℓ, a)``: weights (1 when None) and weighted losses in at least float32, and the DRO
    exponents ``a = w·ℓ/λ`` in float64 (all zero for the weighted mean, whose softmax is uniform):
    float16 exponents overflow long before the loss does (kl_dro([100, 5000, 60000], lam=0.5) fits
    float16, its exponents do not), float32 ones at λ = 1e-38. The losses are checked finite."""
    check_finite_losses(where, losses)
    dtype = torch.promote_types(losses.dtype, torch.float32)
    losses = losses.to(dtype)
    w = torch.ones_like(losses) if weights is None else weights.to(dtype)
    wl = w * losses
    a = wl.detach().double()
    return w, wl, torch.zeros_like(a) if _is_weighted_mean(lam) else a / lam


def _scale_gradient(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss`` unchanged in value, its gradient multiplied by ``scale``."""
    return loss if scale == 1 else loss + (scale - 1) * (loss - loss.detach())


def kl_dro_with_stats(losses, weights=None, *, lam=1.0, group=None, ddp_average=True):
    """:func:`kl_dro` and the :class:`DROStats` of its sample weights, from the same collectives."""
    where = "robalign.kl_dro"
    _check(where, losses, weights, lam, group)
    lam = effective_lam(lam)
    w, wl, a = _scaled(losses, weights, lam)
    moments = _BatchMoments(a, w, group)
    if _is_weighted_mean(lam):
        total = wl.sum()
        if group is not None:
            total = _with_global_value(total, group)
        loss = total / moments.count.to(wl.dtype)
    else:
        # the value of the cancellation-free form; the gradient ∂L/∂ℓ_i = w_i·e^{a_i−m}/S with S the
        # global Σ e^{a−m}: that of Σ_i c_i·w_i·ℓ_i with the softmax c held fixed (no λ·(1/λ) to round)
        coeff = (torch.exp(a - moments.m) / moments.sum_exp).to(wl.dtype)
        share = (coeff * wl).sum()
        value = _log_mean_exp(lam, moments.m, moments.sum_expm1, moments.count).to(wl.dtype)
        loss = value + (share - share.detach())
    scale = _world(group) if ddp_average else 1
    return _scale_gradient(loss, scale).to(losses.dtype), moments.stats()


def kl_dro_gradient_scale(losses, weights, shift, *, lam=1.0, group=None, ddp_average=True):
    """For a gradient formed ahead of the reduction (the one-pass fused loss): ``(value, κ, stats)``
    with ``value`` the :func:`kl_dro` loss of ``losses`` (detached) and κ the scalar for which

        ∂L/∂θ = κ · Σ_i w_i·e^{a_i − shift}·∇ℓ_i        (a_i = w_i·ℓ_i/λ; 0 for λ = ∞)

    i.e. ``κ = e^{shift − M}/S`` with M the global ``max a`` and ``S = Σ e^{a − M}`` over every rank
    of ``group`` (times the world size with ``ddp_average``), from the same collectives as
    :func:`kl_dro`. ``shift`` is a 0-dim float64 tensor."""
    where = "robalign.kl_dro"
    _check(where, losses, weights, lam, group)
    lam = effective_lam(lam)
    w, wl, a = _scaled(losses.detach(), None if weights is None else weights.detach(), lam)
    moments = _BatchMoments(a, w, group)
    value = _batch_value(lam, wl, moments, group)
    kappa = torch.exp(shift.to(moments.m) - moments.m) / moments.sum_exp * (_world(group) if ddp_average else 1)
    return value.to(losses.dtype), kappa, moments.stats()


def _with_global_value(local: torch.Tensor, group) -> torch.Tensor:
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return local + (total - local).detach()


def kl_dro(losses, weights=None, *, lam: float = 1.0, group=None, ddp_average: bool = True) -> torch.Tensor:
    """KL-DRO reduction of per-sample losses (DoRA, arXiv 2504.05831, Eq. 8):

        L = λ · log( (1/N) Σ_i exp(w_i·ℓ_i / λ) ),     ∂L/∂ℓ_i = w_i · softmax_i(w·ℓ/λ)

    Args:
        losses: ``[n]`` per-sample losses ℓ of this rank (float).
        weights: ``[n]`` non-negative weights w (default 1), e.g. :func:`dora_weights`.
        lam: λ ≠ 0. ``float('inf')`` gives the weighted mean ``mean(w·ℓ)``; λ > 0 up-weights
            hard samples (DoRA); λ < 0 is a soft minimum (Dr.DPO is λ = −β′).
        group: a ``torch.distributed`` process group. With it, N and the softmax span every
            rank's samples (one MAX and one SUM all-reduce of a few scalars in the forward;
            none in the backward) and every rank returns the same global loss.
        ddp_average: with a group, multiply this rank's gradient by the world size, so that
            after DDP/FSDP average gradients over the ranks the result is the exact gradient
            of the global loss. Pass False when gradients are summed across ranks instead.

    Returns:
        a scalar in the dtype of ``losses``.
    """
    return kl_dro_with_stats(losses, weights, lam=lam, group=group, ddp_average=ddp_average)[0]


class KLDROAccumulator:
    """Exact KL-DRO across gradient-accumulation micro-batches (and ranks).

    Use it in place of ``kl_dro`` inside the accumulation loop::

        acc = KLDROAccumulator(model.parameters(), lam=1.0, group=group)
        for i, batch in enumerate(micro_batches):
            with model.no_sync() if i < len(micro_batches) - 1 else nullcontext():
                losses, weights = ...                  # per-sample, this micro-batch
                acc(losses, weights).backward()
        optimizer.step(); optimizer.zero_grad(); acc.reset()
        acc.loss                                       # the full-batch DRO loss

    After micro-batch j the parameters' ``.grad`` hold the exact gradient of the DRO loss of
    micro-batches 1..j. Each call keeps a running global maximum ``m`` and sum ``S`` of
    ``exp(a − m)``; when they change to ``(m', S')`` the gradients already accumulated are
    multiplied by ``S·e^{m−m'}/S'`` (one pass over the gradients, skipped when the factor is 1),
    and the returned surrogate back-propagates ``w_i·e^{a_i−m'}/S'`` to each ℓ_i. The
    accumulator therefore owns the ``.grad`` of ``params`` between :meth:`reset` calls: add other
    loss terms to ``losses`` rather than back-propagating them separately.

    ``exact=False`` is the cheaper, documented approximation: each micro-batch gets its own
    normaliser (the DRO loss of the micro-batch, divided by ``accumulation_steps``), with no
    rescaling; it optimises a different objective whenever micro-batches differ.

    ``ddp_average`` as in :func:`kl_dro`.
    """

    def __init__(self, params, *, lam: float = 1.0, group=None, ddp_average: bool = True,
                 exact: bool = True, accumulation_steps: int | None = None):
        where = "robalign.KLDROAccumulator"
        V.check_lam(where, lam)
        if not exact:
            if accumulation_steps is None:
                V.fail(where, "`accumulation_steps` (a positive int) is required with exact=False")
            V.check_int(where, "accumulation_steps", accumulation_steps, low=1)
        elif accumulation_steps is not None:
            V.check_int(where, "accumulation_steps", accumulation_steps, low=1)
        self.params = [p for p in params]
        self.lam, self.group, self.ddp_average = effective_lam(lam), group, ddp_average
        self.exact, self.accumulation_steps = exact, accumulation_steps
        self.reset()

    def reset(self) -> None:
        """Start a new effective batch (call after ``optimizer.step()``)."""
        self._m = None          # running max of a (global)
        self._s = None          # running Σ e^{a − m}
        self._n = None          # samples so far; these statistics are 0-dim float64 device tensors
        self._sum_q = self._sum_q2 = self._sum_expm1 = self._log_max_q = None
        self._sum_wl = None
        self._approx_losses: list[torch.Tensor] = []
        self.loss_value: torch.Tensor | None = None

    @property
    def loss(self) -> float | None:
        """The full-batch loss of the micro-batches folded in so far (reading it synchronises;
        ``loss_value`` is the same as a device tensor)."""
        return None if self.loss_value is None else float(self.loss_value)

    @torch.no_grad()
    def _rescale_grads(self, factor: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor.to(p.grad.device, p.grad.dtype))

    def _fold(self, losses: torch.Tensor, weights: torch.Tensor | None):
        """Fold one micro-batch's statistics in (rescaling the gradients already accumulated when
        the running maximum or sum changes); ``(w, wl, a, moments of this micro-batch)``."""
        where = "robalign.KLDROAccumulator"
        _check(where, losses, weights, self.lam, self.group)
        w, wl, a = _scaled(losses, weights, self.lam, "robalign.KLDRO accumulator")
        mom = _BatchMoments(a, w, self.group)
        if self._m is None:
            m, s, factor = mom.m, mom.sum_exp, None
            self._sum_q, self._sum_q2, self._sum_expm1 = mom.sum_q, mom.sum_q2, mom.sum_expm1
            self._n, self._log_max_q = mom.count, mom.log_max_q
        else:
            m = torch.maximum(self._m, mom.m)
            old, new = torch.exp(self._m - m), torch.exp(mom.m - m)
            s = self._s * old + mom.sum_exp * new
            factor = self._s * old / s
            self._sum_q = self._sum_q * old + mom.sum_q * new
            self._sum_q2 = self._sum_q2 * old ** 2 + mom.sum_q2 * new ** 2
            # Σ expm1(a − m') = e^{m−m'}·Σ expm1(a − m) + n·expm1(m − m'), for both parts
            self._sum_expm1 = (self._sum_expm1 * old + self._n * torch.expm1(self._m - m)
                               + mom.sum_expm1 * new + mom.count * torch.expm1(mom.m - m))
            self._n = self._n + mom.count
            self._log_max_q = torch.maximum(self._log_max_q, mom.log_max_q)
        self._m, self._s = m, s
        if not self.exact:
            self._approx_losses.append(_batch_value(self.lam, wl, mom, self.group))
            self.loss_value = torch.stack(self._approx_losses).mean()
            return w, wl, a, mom
        if factor is not None:
            self._rescale_grads(factor)
        total_wl = wl.detach().double().sum()
        if self.group is not None:
            dist.all_reduce(total_wl, group=self.group)
        self._sum_wl = total_wl if self._sum_wl is None else self._sum_wl + total_wl
        if _is_weighted_mean(self.lam):
            self.loss_value = self._sum_wl / self._n
        else:
            self.loss_value = _log_mean_exp(self.lam, m, self._sum_expm1, self._n)
        return w, wl, a, mom

    def _normaliser(self, mom) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(m, S, scale)`` of the coefficients ``w_i·e^{a_i − m}/S·scale`` of this micro-batch."""
        world = _world(self.group) if self.ddp_average else 1
        if self.exact:
            return self._m, self._s, world
        return mom.m, mom.sum_exp, world / self.accumulation_steps

    def __call__(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Fold one micro-batch in; returns the surrogate to ``backward()``. No host
        synchronisation: every running statistic stays on the device."""
        w, _, a, mom = self._fold(losses, weights)
        m, s, scale = self._normaliser(mom)
        # d surrogate / dℓ_i = w_i·e^{a_i − m}/S·(scale); the λ of the loss cancels the 1/λ of a
        coeff = (w * (torch.exp(a - m) / s).to(w.dtype)).detach()
        return (coeff * losses).sum() * scale

    def gradient_scale(self, losses: torch.Tensor, weights: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
        """Fold one micro-batch whose gradient was formed ahead of the reduction (the one-pass fused
        loss, ``Σ_i w_i·e^{a_i − shift}·∇ℓ_i``) in; returns the scalar κ that makes it this
        micro-batch's share of the full-batch gradient (``e^{shift − m}/S·scale``, float64)."""
        _, _, _, mom = self._fold(losses.detach(), None if weights is None else weights.detach())
        m, s, scale = self._normaliser(mom)
        return torch.exp(shift.to(m) - m) / s * scale

    def stats(self) -> DROStats:
        """Global :class:`DROStats` of the micro-batches folded in since :meth:`reset`."""
        if self._m is None:
            raise RuntimeError("robalign.KLDROAccumulator.stats: no micro-batch has been folded in since reset()")
        return _stats(self._sum_q, self._sum_q2, self._log_max_q - self._m, self._n)
