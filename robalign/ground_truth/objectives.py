"""Base preference objectives, written from their papers. Each returns unreduced losses ``[B]``.

Every objective takes the same arguments so that :class:`robalign.DoRALoss` can swap them:

    logps      [B, K]  policy log-probabilities of the K candidates of each sample
    ref_logps  [B, K]  reference-model log-probabilities (objectives with a reference only)
    counts     [B, K]  scored tokens per candidate (used by length-normalised objectives)
    scores     [B, K]  candidate quality, higher is better; ``None`` means the candidates are
                       already in preference order, best first (for pairs: chosen, rejected)

For pairs, write ``Δ = (logp_c − ref_c) − (logp_r − ref_r)`` for the log-ratio margin.

Each objective is registered where it is written, with what it needs and its hyper-parameters'
defaults and ranges (``@objective``, read into :data:`OBJECTIVES`); the public, validating
functions of :mod:`robalign.objectives`, DoRALoss, the trainer and the command line all read that
one registry. Adding an objective is one decorated function here plus its test.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["with_mean_logps", "dpo", "robust", "ipo", "ipo_norm", "dpo_norm", "hinge", "simpo", "cpo", "orpo", "plackett_luce", "rrhf", "lire", "sft",
           "kto", "apo_zero_unpaired", "aot", "aot_unpaired", "DATA_KEYWORDS",
           "OBJECTIVES", "Objective", "Param", "objective", "mixture", "parse_mixture", "with_divergence",
           "F_DIVERGENCES"]


@dataclass(frozen=True)
class Param:
    """A hyper-parameter: its default and the interval it must lie in (``None``: unbounded)."""

    default: float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class Objective:
    """What an objective needs, read by the public wrappers, DoRALoss, the trainer and the CLI.

    reference: uses reference-model log-probs. counts: length-normalised (needs the scored
    tokens per candidate). pairwise: exactly 2 candidates (else any K ≥ 2). scores: ``"order"``
    when scores only put the candidates in order, ``"values"`` when their values enter the loss.
    params: the hyper-parameters with their defaults and ranges. unpaired: one labelled
    completion per sample (K = 1, ``scores`` its label: 1 desirable, 0 undesirable), as KTO
    reads; kl_reference: the loss takes a batch-level reference point ``kl`` (KTO's z₀), formed
    from mismatched completions (:func:`robalign.losses.unpaired.reference_point`). batch_coupled:
    the losses are not per sample but per position of the batch's sorted values (AOT), so
    per-sample weights and groups do not apply and the loss is formed on the whole batch at once.
    """

    name: str
    fn: Callable
    reference: bool
    counts: bool
    pairwise: bool
    scores: str
    params: dict = field(default_factory=dict)
    unpaired: bool = False
    kl_reference: bool = False
    batch_coupled: bool = False


OBJECTIVES: dict[str, Objective] = {}


#: keyword arguments of an objective that carry data, not hyper-parameters
DATA_KEYWORDS = ("counts", "scores", "kl")


def objective(*, reference: bool, pairwise: bool, counts: bool = False, scores: str = "order",
              unpaired: bool = False, kl_reference: bool = False, batch_coupled: bool = False, **params: Param):
    """Register the decorated function as an objective (one function, one place). The function's
    keyword defaults must be the ``params``' defaults."""

    def register(fn):
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.kind is p.KEYWORD_ONLY and k not in DATA_KEYWORDS}
        if defaults != {k: p.default for k, p in params.items()}:
            raise TypeError(f"objective {fn.__name__}: keyword defaults {defaults} differ from its params {params}")
        OBJECTIVES[fn.__name__] = Objective(fn.__name__, fn, reference, counts, pairwise, scores, dict(params),
                                            unpaired=unpaired, kl_reference=kl_reference, batch_coupled=batch_coupled)
        return fn

    return register


BETA = Param(0.1, low=0, low_open=True)
SMOOTHING = Param(0.0, low=0, high=0.5, high_open=True)


def rank_scores(scores: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The given scores, or ``−k`` for candidate k when candidates are given best first."""
    if scores is not None:
        return scores.to(like.dtype)
    k = like.shape[-1]
    return -torch.arange(k, dtype=like.dtype, device=like.device).expand_as(like)


def sort_by_scores(x: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """Reorder the candidates of every row best first (stable, so ties keep their order)."""
    if scores is None:
        return x
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return x.gather(-1, order)


#: |h| beyond which every bounded objective of h (a σ, log σ or e^{−h} of it) has reached its limit
#: in float64 (e^{−1e4} underflows to 0): infinite margins are stood in for by ±this
SATURATED = 1e4


def _saturated(h: torch.Tensor) -> torch.Tensor:
    """``h`` clamped to ±:data:`SATURATED`: an infinite margin gives the loss's limit, and its
    gradient 0 (the limit too), where ``σ(±∞)·log σ(∓∞)`` would form 0·∞ = NaN."""
    return h.clamp(-SATURATED, SATURATED)


def _pair_margin(logps, ref_logps, scores):
    ratios = sort_by_scores(logps - ref_logps, scores)
    return ratios[:, 0] - ratios[:, 1]


def _length_normalised(logps, counts):
    return logps / counts.clamp(min=1).to(logps.dtype)


def _smoothed_sigmoid_loss(h: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1 − ε)·log σ(h) − ε·log σ(−h)``; without smoothing (ε = 0) the second term is left out
    rather than multiplied by 0, so an infinite margin h = +∞ gives the limit 0 (not 0·∞ = NaN)."""
    loss = -(1 - label_smoothing) * F.logsigmoid(h)
    return loss if label_smoothing == 0 else loss - label_smoothing * F.logsigmoid(-h)


@objective(reference=True, pairwise=True, beta=BETA, label_smoothing=SMOOTHING)
def dpo(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """DPO, sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290), with cDPO smoothing ε:

        ℓ = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)
    """
    return _smoothed_sigmoid_loss(beta * _pair_margin(logps, ref_logps, scores), label_smoothing)


@objective(reference=True, pairwise=True, beta=BETA, label_smoothing=SMOOTHING)
def robust(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """Robust DPO for preference labels flipped with rate ε < 1/2 (Chowdhury et al. 2024,
    arXiv 2403.00409), an unbiased estimate of the clean DPO loss:

        ℓ = [(1 − ε)·(−log σ(β·Δ)) − ε·(−log σ(−β·Δ))] / (1 − 2ε)
    """
    h = beta * _pair_margin(logps, ref_logps, scores)
    eps = label_smoothing
    clean = -(1 - eps) * F.logsigmoid(h)                   # ε = 0: no 0·∞ at an infinite margin
    return (clean if eps == 0 else clean + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


@objective(reference=True, pairwise=True, beta=BETA)
def ipo(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """IPO (Azar et al. 2023, arXiv 2310.12036), τ = β, on token-summed log-ratios:
    ℓ = (Δ − 1/(2β))². Its loss grows with the square of the responses' length; TRL's ``ipo``
    (and the IPO authors' runs) normalise by length: that is :func:`ipo_norm`."""
    return (_pair_margin(logps, ref_logps, scores) - 1 / (2 * beta)) ** 2


def _normalised_margin(logps, ref_logps, counts, scores):
    """``Δ̄ = (logp_c − ref_c)/|y_c| − (logp_r − ref_r)/|y_r|`` (lengths clamped at 1)."""
    ratios = sort_by_scores(_length_normalised(logps - ref_logps, counts), scores)
    return ratios[:, 0] - ratios[:, 1]


@objective(reference=True, pairwise=True, counts=True, beta=BETA)
def ipo_norm(logps, ref_logps, *, counts, scores=None, beta=0.1):
    """IPO on length-normalised log-ratios, as TRL's ``loss_type="ipo"`` computes it (the IPO
    authors confirmed this form to TRL):  ℓ = (Δ̄ − 1/(2β))²  with per-token mean log-ratios Δ̄."""
    return (_normalised_margin(logps, ref_logps, counts, scores) - 1 / (2 * beta)) ** 2


@objective(reference=True, pairwise=True, counts=True, beta=BETA)
def dpo_norm(logps, ref_logps, *, counts, scores=None, beta=0.1):
    """DPO on length-normalised log-ratios, TRL's ``loss_type="sigmoid_norm"`` (Liger's
    ``average_log_prob``):  ℓ = −log σ(β·Δ̄)."""
    return -F.logsigmoid(beta * _normalised_margin(logps, ref_logps, counts, scores))


@objective(reference=True, pairwise=True, beta=BETA)
def hinge(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """Hinge / SLiC-HF loss (Zhao et al. 2023, arXiv 2305.10425):  ℓ = max(0, 1 − β·Δ)."""
    return F.relu(1 - beta * _pair_margin(logps, ref_logps, scores))


def _pair_ratios(logps, ref_logps, scores):
    """The chosen and the rejected log-ratio ``(logp − ref)`` of every pair, best first."""
    ratios = sort_by_scores(logps - ref_logps, scores)
    return ratios[:, 0], ratios[:, 1]


@objective(reference=True, pairwise=True, beta=BETA,
           label_smoothing=Param(1e-3, low=0, high=0.5, low_open=True, high_open=True))
def exo_pair(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=1e-3):
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, Eq. 16; TRL's ``exo_pair``): the reverse KL
    from the model's preference p = σ(β·Δ) to the smoothed label (1 − ε, ε):

        ℓ = p·(log p − log(1 − ε)) + (1 − p)·(log(1 − p) − log ε),   ε > 0
    """
    h = _saturated(beta * _pair_margin(logps, ref_logps, scores))
    eps = label_smoothing
    return (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
            + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))


@objective(reference=True, pairwise=True, beta=BETA)
def nca_pair(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369; TRL's ``nca_pair``), on the implicit
    rewards r = β·(logp − ref):  ℓ = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)."""
    chosen, rejected = _pair_ratios(logps, ref_logps, scores)
    r_c, r_r = beta * chosen, beta * rejected
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


@objective(reference=True, pairwise=True, beta=BETA)
def bco_pair(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656), as TRL 1.16's ``bco_pair`` computes it
    (without the running reward mean of the unpaired BCO):  ℓ = −log σ(r_c) − log σ(−r_r)."""
    chosen, rejected = _pair_ratios(logps, ref_logps, scores)
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)


@objective(reference=True, pairwise=True, beta=BETA)
def sppo_hard(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675; TRL's ``sppo_hard``): the winner's
    log-ratio pulled to 1/(2β), the loser's to −1/(2β):  ℓ = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²."""
    chosen, rejected = _pair_ratios(logps, ref_logps, scores)
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """σ(x) as exp(log σ(x)): the same values, and a gradient σ(x)·σ(−x) that keeps its digits at
    both tails in float32 (``torch.sigmoid``'s backward forms 1 − σ(x), 1e-4 off where σ(x) ≈
    1 − 3e-4 and 0 beyond x ≈ 17). With σ(−x) for 1 − σ(x), the losses written with σ below are
    as exact as their inputs."""
    return torch.exp(F.logsigmoid(x))


@objective(reference=True, pairwise=True, beta=BETA)
def apo_zero(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7; TRL's ``apo_zero``), when the
    chosen responses are better than the model's own:  ℓ = 1 − σ(r_c) + σ(r_r), computed as
    σ(−r_c) + σ(r_r) (see :func:`_sigmoid`)."""
    chosen, rejected = _pair_ratios(logps, ref_logps, scores)
    return _sigmoid(-beta * chosen) + _sigmoid(beta * rejected)


@objective(reference=True, pairwise=True, beta=BETA)
def apo_down(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8; TRL's ``apo_down``), when the
    chosen responses are worse than the model's own:  ℓ = σ(r_c) + 1 − σ(β·Δ), computed as
    σ(r_c) + σ(−β·Δ) (see :func:`_sigmoid`)."""
    chosen, rejected = _pair_ratios(logps, ref_logps, scores)
    return _sigmoid(beta * chosen) + _sigmoid(-beta * (chosen - rejected))


@objective(reference=True, pairwise=True, beta=BETA, tau=Param(0.05, low=0, low_open=True))
def discopop(logps, ref_logps, *, counts=None, scores=None, beta=0.1, tau=0.05):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, Eq. 5; TRL's
    ``discopop`` with ``discopop_tau`` = τ): with h = β·Δ and m = σ(h/τ),

        ℓ = (1 − m)·(−log σ(h)) + m·e^{−h}
    """
    h = beta * _pair_margin(logps, ref_logps, scores)
    infinite = torch.isinf(h)                # limits: 0 at h = +∞, +∞ at h = −∞ (the log σ term)
    hs = torch.where(infinite, 0.0, h)
    # m·e^{−h} as e^{log σ(h/τ) − h}: the plain product is 0·∞ = NaN once e^{−h} overflows (h < −709)
    loss = torch.sigmoid(-hs / tau) * -F.logsigmoid(hs) + torch.exp(F.logsigmoid(hs / tau) - hs)
    return torch.where(infinite, torch.where(h > 0, 0.0, math.inf), loss)


def _alpha_reward(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward ``(1 − p^{−α})/α = −expm1(−α·logp)/α`` of a (mean) log-prob; α = 0: logp."""
    return logp if alpha == 0 else -torch.expm1(-alpha * logp) / alpha


@objective(reference=False, pairwise=True, counts=True, beta=Param(2.0, low=0, low_open=True), gamma=Param(0.5),
           label_smoothing=SMOOTHING, alpha=Param(0.0))
def simpo(logps, ref_logps=None, *, counts, scores=None, beta=2.0, gamma=0.5, label_smoothing=0.0, alpha=0.0):
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free and length-normalised, with
    label smoothing ε and AlphaPO's reward shape α (Gupta et al. 2025, arXiv 2501.03884; α = 0 is SimPO):

        r_k = (1 − p̄_k^{−α})/α  with  log p̄_k = logp_k/|y_k|      (α = 0: r_k = logp_k/|y_k|)
        ℓ  = −(1 − ε)·log σ(β·(r_c − r_r) − γ) − ε·log σ(−β·(r_c − r_r) + γ)

    TRL's CPOTrainer with ``loss_type="simpo"`` (``simpo_gamma`` = γ, ``alpha``, ``label_smoothing``).
    """
    r = _alpha_reward(sort_by_scores(_length_normalised(logps, counts), scores), alpha)
    return _smoothed_sigmoid_loss(beta * (r[:, 0] - r[:, 1]) - gamma, label_smoothing)


@objective(reference=False, pairwise=True, beta=BETA, label_smoothing=SMOOTHING, alpha=Param(0.0))
def cpo(logps, ref_logps=None, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0, alpha=0.0):
    """CPO's preference term (Xu et al. 2024, arXiv 2401.08417, Eq. 3), reference-free on token sums,
    with label smoothing ε and AlphaPO's reward shape α:

        ℓ = −(1 − ε)·log σ(β·(r_c − r_r)) − ε·log σ(−β·(r_c − r_r)),   r_k = (1 − p_k^{−α})/α (α = 0: logp_k)

    TRL's CPOTrainer ``loss_type="sigmoid"``; its NLL term (``cpo_alpha``) is ``sft`` in a mixture,
    ``"cpo+sft"`` (TRL averages the NLL over the batch's tokens: ``sft`` under weights |y_i|·B/Σ|y_j|).
    """
    r = _alpha_reward(sort_by_scores(logps, scores), alpha)
    return _smoothed_sigmoid_loss(beta * (r[:, 0] - r[:, 1]), label_smoothing)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for x < 0, without cancellation (the branch at −log 2, Mächler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@objective(reference=False, pairwise=True, counts=True, beta=BETA)
def orpo(logps, ref_logps=None, *, counts, scores=None, beta=0.1):
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv 2403.07691, Eqs. 4–7), reference-free, on
    the token-mean log-probs ``log p̄_k = logp_k/|y_k|`` with odds ``p̄/(1 − p̄)``:

        ℓ = −β·log σ( log odds_c − log odds_r )

    The full ORPO objective adds the chosen NLL: ``"orpo+sft"`` (TRL's ORPOTrainer averages that
    over the batch's tokens: ``sft`` under weights |y_i|·B/Σ|y_j|). A response with no scored token
    has no odds (p̄ = 1): its sample's loss is 0, without gradient (TRL's gives inf or NaN there).
    """
    lp = sort_by_scores(_length_normalised(logps, counts), scores)
    scored = (sort_by_scores(counts, scores) > 0).all(-1)
    lp = torch.where(scored[:, None], lp, -1.0)                     # finite stand-ins: no NaN in the backward
    log_odds = (lp[:, 0] - lp[:, 1]) - (_log1mexp(lp[:, 0]) - _log1mexp(lp[:, 1]))
    return torch.where(scored, -beta * F.logsigmoid(log_odds), 0.0)


@objective(reference=True, pairwise=False, beta=BETA)
def plackett_luce(logps, ref_logps, *, counts=None, scores=None, beta=0.1):
    """Listwise DPO under the Plackett–Luce model (Rafailov et al. 2023, Appendix A.3).

    With implicit rewards ``r_k = β·(logp_k − ref_k)`` ordered best first (by ``scores``),

        ℓ = −Σ_{j=1..K} [ r_(j) − log Σ_{l ≥ j} exp r_(l) ]

    which equals :func:`dpo` for K = 2.
    """
    r = sort_by_scores(beta * (logps - ref_logps), scores)
    # infinite rewards, by their limits: a term whose candidate is impossible (r = −∞), or that
    # trails an infinite reward, is −∞ (the loss +∞); the n infinite rewards of a tail share its
    # mass equally, so an infinite reward's own term is −log n (0 when it is alone). The sums run
    # over finite stand-ins, so no NaN reaches the backward; the last term (r − r = 0) is left out.
    up, down = r == math.inf, r == -math.inf
    tiny = torch.finfo(r.dtype).min / 4
    finite_r = torch.where(up, 0.0, torch.where(down, tiny, r))
    terms = finite_r - torch.logcumsumexp(finite_r.flip(-1), dim=-1).flip(-1)
    ups_in_tail = torch.cumsum(up.flip(-1).to(r.dtype), dim=-1).flip(-1)
    terms = torch.where(up, -torch.log(ups_in_tail.clamp(min=1)),
                        torch.where(down | (ups_in_tail > 0), -math.inf, terms))
    return -terms[:, :-1].sum(-1)


@objective(reference=False, pairwise=False, counts=True, scores="values", sft_weight=Param(1.0, low=0))
def rrhf(logps, ref_logps=None, *, counts, scores=None, sft_weight=1.0):
    """RRHF (Yuan et al. 2023, arXiv 2304.05302), reference-free.

    With length-normalised ``p_k = logp_k/|y_k|`` and scores ``s``:

        ℓ = Σ_{s_i < s_j} max(0, p_i − p_j)  +  sft_weight · (−p_best)

    The fine-tuning term is the best-scored response's token-mean NLL, as in the authors'
    released code (the paper's equation writes the token sum).
    """
    p = _length_normalised(logps, counts)
    s = rank_scores(scores, logps)
    worse = s[:, :, None] < s[:, None, :]                                  # [B, K, K] s_i < s_j
    # an impossible worse response (p_i = −∞) costs nothing, whatever p_j (no ∞ − ∞ formed)
    counted = worse & (p[:, :, None] > -math.inf)
    finite_p = torch.where(p == -math.inf, 0.0, p)
    gap = torch.where(p[:, None, :] == -math.inf, math.inf, finite_p[:, :, None] - finite_p[:, None, :])
    rank = torch.where(counted, F.relu(gap), 0.0).sum((-2, -1))
    best = s.argmax(-1, keepdim=True)
    return rank - sft_weight * p.gather(-1, best).squeeze(-1)


@objective(reference=False, pairwise=False, scores="values", temperature=Param(2.0, low=0, low_open=True))
def lire(logps, ref_logps=None, *, counts=None, scores=None, temperature=2.0):
    """LIRE, listwise reward enhancement (Zhu et al. 2024, arXiv 2405.13516), reference-free:

        ℓ = −Σ_k softmax(logp / T)_k · softmax(scores)_k
    """
    target = torch.softmax(rank_scores(scores, logps), dim=-1)
    return -(torch.softmax(logps / temperature, dim=-1) * target).sum(-1)


@objective(reference=False, pairwise=False, counts=True)
def sft(logps, ref_logps=None, *, counts, scores=None):
    """The best candidate's negative log-likelihood per token, the supervised term that RPO
    (Pang et al. 2024, arXiv 2404.19733), CPO and MPO add to a preference loss:

        ℓ = −logp_best / |y_best|

    Per sample (so weights and every reduction apply to it); TRL's ``sft`` loss type divides the
    batch's token sum by the batch's token count instead — the same as weights ``|y_i|·B/Σ|y_j|``.
    Use it in a :func:`mixture`, e.g. ``"dpo+0.5*sft"``.
    """
    best = sort_by_scores(logps, scores)[:, 0]
    n = sort_by_scores(counts, scores)[:, 0]
    return -best / n.clamp(min=1).to(best.dtype)


def _sorted_pair_loss(u, v, beta, label_smoothing):
    """The cDPO-smoothed loss of ``β·(sort(u) − sort(v))``, position by position of the sorted batch."""
    h = beta * (torch.sort(u, dim=0).values - torch.sort(v, dim=0).values)
    return _smoothed_sigmoid_loss(h, label_smoothing)


@objective(reference=True, pairwise=True, batch_coupled=True, beta=BETA, label_smoothing=SMOOTHING)
def aot(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv 2406.05882; TRL's ``aot``): the policy's chosen-minus-rejected log-prob gaps
    u_i = logp_c − logp_r should dominate the reference's v_i = ref_c − ref_r in distribution, a
    1-D optimal transport solved by sorting **across the batch**:

        ℓ_(k) = −(1 − ε)·log σ(β·(u_(k) − v_(k))) − ε·log σ(−β·(u_(k) − v_(k)))      k-th smallest

    One loss per position k of the sorted batch, not per sample (``batch_coupled``).
    """
    x = sort_by_scores(logps, scores)
    r = sort_by_scores(ref_logps, scores)
    return _sorted_pair_loss(x[:, 0] - x[:, 1], r[:, 0] - r[:, 1], beta, label_smoothing)


@objective(reference=True, pairwise=True, batch_coupled=True, beta=BETA, label_smoothing=SMOOTHING)
def aot_unpaired(logps, ref_logps, *, counts=None, scores=None, beta=0.1, label_smoothing=0.0):
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882; TRL's ``aot_unpaired``): the chosen
    log-ratios r_c should dominate the rejected ones r_r in distribution, the pairs ignored:

        ℓ_(k) = −(1 − ε)·log σ(β·(r_c,(k) − r_r,(k))) − ε·log σ(−β·(r_c,(k) − r_r,(k)))

    sorting each side **across the batch** (``batch_coupled``).
    """
    ratios = sort_by_scores(logps - ref_logps, scores)
    return _sorted_pair_loss(ratios[:, 0], ratios[:, 1], beta, label_smoothing)


CLASS_WEIGHT = Param(1.0, low=0, low_open=True)


def _unpaired_losses(h, desirable, desirable_weight, undesirable_weight):
    """``λ_D·(1 − σ(h))`` for a desirable completion, ``λ_U·(1 − σ(−h))`` for an undesirable one,
    computed as σ(−h) and σ(h) (see :func:`_sigmoid`; TRL writes 1 − σ, so a saturated sample's
    float32 loss and gradient there are 1e-4 off)."""
    desirable = desirable > 0.5
    return torch.where(desirable, desirable_weight * _sigmoid(-h), undesirable_weight * _sigmoid(h))


@objective(reference=True, pairwise=False, unpaired=True, kl_reference=True, scores="label", beta=BETA,
           desirable_weight=CLASS_WEIGHT, undesirable_weight=CLASS_WEIGHT)
def kto(logps, ref_logps, *, counts=None, scores=None, kl=0.0, beta=0.1, desirable_weight=1.0,
        undesirable_weight=1.0):
    """KTO, Kahneman–Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7; TRL's
    ``KTOTrainer``), on unpaired data: one completion per sample (``logps`` ``[B, 1]``) labelled
    desirable (``scores`` 1) or undesirable (0). With r = logp − ref and the reference point z₀ =
    ``kl`` (a detached batch estimate of KL(π‖π_ref), ≥ 0: the mean log-ratio of mismatched
    prompt–completion pairs, :func:`robalign.losses.unpaired.reference_point`):

        ℓ = λ_D·(1 − σ(β·(r − z₀)))    desirable
        ℓ = λ_U·(1 − σ(β·(z₀ − r)))    undesirable
    """
    r = (logps - ref_logps)[:, 0]
    return _unpaired_losses(beta * (r - kl), scores[:, 0], desirable_weight, undesirable_weight)


@objective(reference=True, pairwise=False, unpaired=True, scores="label", beta=BETA,
           desirable_weight=CLASS_WEIGHT, undesirable_weight=CLASS_WEIGHT)
def apo_zero_unpaired(logps, ref_logps, *, counts=None, scores=None, beta=0.1, desirable_weight=1.0,
                      undesirable_weight=1.0):
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 per completion; TRL's
    KTO ``loss_type="apo_zero_unpaired"``): KTO with the reference point at 0,

        ℓ = λ_D·(1 − σ(β·r))    desirable;    ℓ = λ_U·σ(β·r)    undesirable
    """
    r = (logps - ref_logps)[:, 0]
    return _unpaired_losses(beta * r, scores[:, 0], desirable_weight, undesirable_weight)


_TERM = re.compile(r"^\s*(?:(?P<coef>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?"
                   r"(?P<name>[a-z_][a-z0-9_]*(?::[a-z_]+(?:=[0-9.eE+-]+)?)?)\s*$")


def parse_mixture(text: str) -> dict[str, float]:
    """``"dpo+0.5*sft"`` → ``{"dpo": 1.0, "sft": 0.5}`` (raises ValueError naming the bad term)."""
    terms = {}
    for term in text.split("+"):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"objective {text!r}: cannot read the term {term.strip()!r}; write terms like "
                             "`dpo` or `0.5*sft` joined by `+`")
        name = match.group("name")
        if name in terms:
            raise ValueError(f"objective {text!r}: {name!r} appears twice")
        terms[name] = float(match.group("coef") or 1.0)
    return terms


def _mixture_name(terms: dict[str, float]) -> str:
    return "+".join(name if coef == 1.0 else f"{coef:g}*{name}" for name, coef in terms.items())


def mixture(terms) -> str:
    """Register the weighted sum of objectives ``Σ_k c_k·ℓ^{(k)}`` (TRL's list of loss types with
    ``loss_weights``; MPO is ``dpo + bco_pair + sft``) as one objective; returns its name, e.g.
    ``"dpo+0.5*sft"``. ``terms``: ``{name: c_k}`` or that name. Hyper-parameters are shared by
    name (one β for every term that takes one, as in TRL), so terms must agree on each one's
    default and range; the sum needs what any term needs (a reference, counts, exactly 2
    candidates, score values)."""
    if isinstance(terms, str):
        terms = parse_mixture(terms)
    terms = {str(k): float(v) for k, v in dict(terms).items()}
    if not terms:
        raise ValueError("a mixture needs at least one objective")
    for name in list(terms):
        if ":" in name and name not in OBJECTIVES:
            base, _, kind = name.partition(":")
            kind, _, alpha = kind.partition("=")
            registered = with_divergence(base, kind, float(alpha) if alpha else 0.5)
            terms = {registered if k == name else k: v for k, v in terms.items()}
    for name, coef in terms.items():
        if name not in OBJECTIVES or "+" in name:
            raise ValueError(f"unknown objective {name!r} in the mixture; expected one of "
                             f"{', '.join(n for n in OBJECTIVES if '+' not in n)}")
        if not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"the coefficient of {name!r} must be a finite number >= 0, got {coef}")
        if OBJECTIVES[name].unpaired and len(terms) > 1:
            raise ValueError(f"{name!r} reads unpaired data (one labelled completion per sample) and combines "
                             "with no other objective")
    name = _mixture_name(terms)
    if name in OBJECTIVES:
        return name
    parts = [(OBJECTIVES[n], c) for n, c in terms.items()]
    params = {}
    for entry, _ in parts:
        for key, param in entry.params.items():
            if params.setdefault(key, param) != param:
                raise ValueError(f"objective {name!r}: {key!r} means different things in its terms "
                                 f"({params[key]} and {param} in {entry.name!r}); mix objectives that agree on it")

    def fn(logps, ref_logps=None, *, counts=None, scores=None, **hparams):
        total = 0.0
        for entry, coef in parts:
            if coef == 0:                                    # 0·ℓ is 0, also where ℓ = +∞
                continue
            own = {k: v for k, v in hparams.items() if k in entry.params}
            total = total + coef * entry.fn(logps, ref_logps, counts=counts, scores=scores, **own)
        if isinstance(total, float):                         # every coefficient 0: a zero loss, still a graph
            return (logps.nan_to_num(0.0, 0.0, 0.0) * 0).sum(-1)
        return total

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = "Σ_k c_k·ℓ^{(k)} of " + ", ".join(f"{c:g}·{e.name}" for e, c in parts)
    OBJECTIVES[name] = Objective(name, fn, any(e.reference for e, _ in parts), any(e.counts for e, _ in parts),
                                 any(e.pairwise for e, _ in parts),
                                 "values" if any(e.scores == "values" for e, _ in parts) else "order", params,
                                 batch_coupled=any(e.batch_coupled for e, _ in parts))
    return name


#: TRL's ``f_divergence_type`` values other than the default reverse KL (Wang et al. 2023, "Beyond
#: Reverse KL", arXiv 2309.16240): the log-ratio ``r = log(π/π_ref)`` of each response is replaced by
#: ``f'(e^r)`` of the divergence's generator before the objective compares the responses
F_DIVERGENCES = ("forward_kl", "js_divergence", "alpha_divergence")
#: the objectives whose margin the f-divergence may replace (TRL's f-divergence loss types)
F_OBJECTIVES = ("dpo", "dpo_norm", "hinge", "ipo", "ipo_norm", "exo_pair", "robust", "discopop")


def _f_score(kind: str, alpha: float, r: torch.Tensor) -> torch.Tensor:
    """``f'(e^r)``: forward KL ``1 − e^{−r}``; Jensen–Shannon ``log 2 + log σ(r)``; α-divergence
    ``(e^{(α−1)·r} − 1)/(α − 1)`` (α = 1: r, the reverse KL)."""
    if kind == "forward_kl":
        return -torch.expm1(-r)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(r)
    if abs(alpha - 1.0) < 1e-6:
        return r
    return torch.expm1((alpha - 1.0) * r) / (alpha - 1.0)


def with_divergence(name: str, kind: str, alpha: float = 0.5) -> str:
    """Register objective ``name`` with the log-ratios replaced by ``f'(e^r)`` of an f-divergence
    (``kind`` one of :data:`F_DIVERGENCES`, ``alpha`` for the α-divergence); returns its name, e.g.
    ``"dpo:js_divergence"`` or ``"dpo:alpha_divergence=0.5"`` (usable in a mixture too). Only for
    the objectives of :data:`F_OBJECTIVES`, as in TRL."""
    if name not in F_OBJECTIVES:
        raise ValueError(f"objective {name!r} takes no f-divergence; those that do: {', '.join(F_OBJECTIVES)}")
    if kind not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {kind!r}; expected one of {', '.join(F_DIVERGENCES)} "
                         "(the reverse KL is the objective itself)")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the α of the α-divergence must be a finite number > 0, got {alpha}")
    registered = f"{name}:{kind}" + (f"={alpha:g}" if kind == "alpha_divergence" else "")
    if registered in OBJECTIVES:
        return registered
    base = OBJECTIVES[name]

    def fn(logps, ref_logps=None, *, counts=None, scores=None, **hparams):
        r = logps - ref_logps
        # an infinite log-ratio takes f′'s limit there, with no gradient (f′(e^r)'s derivative is
        # infinite there, and 0·∞ would reach the backward)
        infinite = torch.isinf(r)
        score = torch.where(infinite, _f_score(kind, alpha, r.detach()),
                            _f_score(kind, alpha, torch.where(infinite, 0.0, r)))
        return base.fn(score, torch.zeros_like(score), counts=counts, scores=scores, **hparams)

    fn.__name__ = fn.__qualname__ = registered
    fn.__doc__ = f"{name} on f'(e^r) of the {kind} instead of the log-ratio r"
    OBJECTIVES[registered] = Objective(registered, fn, base.reference, base.counts, base.pairwise, base.scores,
                                       dict(base.params))
    return registered


#: the suffix of an objective read on per-token mean log-probs (:func:`with_mean_logps`)
MEAN_LOGPS = "/mean"


def with_mean_logps(name: str) -> str:
    """Register objective ``name`` read on length-averaged log-probs — each candidate's policy and
    reference log-prob divided by its scored tokens ``|y|`` (at least 1) before the objective sees
    them, as Liger-Kernel's ``average_log_prob`` and TRL's ``*_norm`` loss types do — and return its
    name, ``name + "/mean"``: ``dpo/mean`` is ``dpo_norm``, ``ipo/mean`` is ``ipo_norm``. Not for an
    objective that already divides by length (it would divide twice). KTO's reference point ``kl`` is
    passed through: the caller forms it from the mismatched rows' mean log-probs
    (:class:`robalign.DoRALoss` does, from their ``kl_counts``)."""
    if name.endswith(MEAN_LOGPS) and name in OBJECTIVES:
        return name
    base = OBJECTIVES[name]
    if base.counts:
        raise ValueError(f"objective {name!r} already reads length-normalised log-probs; averaging them again "
                         "would divide by the length twice")
    registered = name + MEAN_LOGPS

    def fn(logps, ref_logps=None, *, counts, scores=None, **hparams):
        length = counts.clamp(min=1).to(logps.dtype)
        return base.fn(logps / length, None if ref_logps is None else ref_logps / length, counts=counts,
                       scores=scores, **hparams)

    fn.__name__ = fn.__qualname__ = registered
    fn.__doc__ = f"{name} on per-token mean log-probs logp/|y| (and ref/|y|)"
    OBJECTIVES[registered] = Objective(registered, fn, base.reference, True, base.pairwise, base.scores,
                                       dict(base.params), unpaired=base.unpaired, kl_reference=base.kl_reference,
                                       batch_coupled=base.batch_coupled)
    return registered
