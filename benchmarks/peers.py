"""What the benchmarks compare against, shared by the CPU and GPU scripts: the naive path and
TRL 1.16's current code paths (the baseline: what TRL users run today), each returning
per-sequence log-probs ``[S]`` from ``[S, T, V]`` logits or ``[S, T, H]`` hidden states."""

from __future__ import annotations

import torch


def naive_logps(logits, labels):
    """float32 log_softmax + gather + masked sum (TRL before selective_log_softmax)."""
    mask = labels != -100
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return (lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def trl_logps(logits, labels):
    """TRL 1.16's DPO trainer on materialised logits: selective_log_softmax (its fused Triton
    kernel where it applies), then the masked sum per sequence."""
    from trl.trainer.utils import selective_log_softmax

    mask = labels != -100
    return selective_log_softmax(logits, labels.clamp(min=0), row_mask=mask).sum(-1)


UNCAPPED = "_uncapped"           # a provider's suffix: the same provider without the run's soft-cap


def split_uncapped(provider: str, softcap):
    """``(provider, softcap)`` of a provider name: ``X_uncapped`` is provider ``X`` without the
    soft-cap (gated without it), so a cap's cost is a ratio of one interleaved run."""
    return (provider.removesuffix(UNCAPPED), None) if provider.endswith(UNCAPPED) else (provider, softcap)


def trl_fused_logps(hidden, weight, labels, softcap=None):
    """TRL 1.16's fused LM head (trl.kernels.ChunkedLogProbFunction) as ``add_fused_lm_head``
    calls it (trl/trainer/utils.py): the scored tokens only where Triton runs, every position
    elsewhere; ``softcap``: its ``final_logit_softcapping`` (Gemma's)."""
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    mask = labels != -100
    compact = _use_triton(hidden.device)
    h = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
    y = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
    tok = _ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0, ())[0]
    tok = tok.new_zeros(mask.shape).masked_scatter(mask, tok) if compact else tok.view(mask.shape).masked_fill(~mask, 0)
    return tok.sum(-1)


def reference_dora_dpo(hidden, weight, labels, ref_logps, *, beta=0.1, lam=1.0, softcap=None):
    """The float64 ground truth of the loss providers' gate: ``(loss, grad_hidden, grad_weight)``
    of the DoRA loss of the rows as pairs (DPO, KL-DRO λ, no weights), from robalign.ground_truth
    (with the head's soft-cap ``softcap``)."""
    from robalign import ground_truth

    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logps, _ = ground_truth.linear_sequence_logps(h, w, labels, logit_softcap=softcap)
    losses = ground_truth.objectives.dpo(logps.view(-1, 2), ref_logps.double().view(-1, 2), beta=beta)
    loss = ground_truth.kl_dro(losses, None, lam)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def reference_dora_chunked(hidden, weight, labels, ref_logps, weights, *, objective="dpo", group=2, lam=1.0,
                           chunk=512, **hparams):
    """The float64 ground truth of the sweep's gate at any size: ``(loss, grad_hidden, grad_weight)``
    of ``λ·log mean_i exp(w_i·ℓ_i/λ)`` over groups of ``group`` rows (the registered ``objective``
    with ``hparams``), the logits formed ``chunk`` scored tokens at a time in float64, never all:

        logp_s = Σ_t log_softmax(h_t·Wᵀ)[y_t];   c_s = ∂L/∂logp_s (autograd on [S] float64)
        G_t = c_{s(t)}·(onehot(y_t) − softmax(h_t·Wᵀ));   grad_h_t = G_t·W;   grad_W = Σ_t G_tᵀ·h_t

    ``hidden`` [S, T, H], ``weight`` [V, H], ``labels`` [S, T] (-100 masked), ``ref_logps`` [S],
    ``weights`` [S / group]."""
    from robalign import ground_truth
    from robalign.ground_truth.objectives import OBJECTIVES

    num_seqs, seqlen, size = hidden.shape
    h = hidden.detach().reshape(-1, size).double()
    w = weight.detach().double()
    y = labels.reshape(-1)
    seq = torch.arange(num_seqs).repeat_interleave(seqlen)
    idx = (y != -100).nonzero().squeeze(1)
    pieces = [idx[i:i + chunk] for i in range(0, idx.numel(), chunk)]
    logps = torch.zeros(num_seqs, dtype=torch.float64)
    for i in pieces:
        lsm = torch.log_softmax(h[i] @ w.T, -1)
        logps.index_add_(0, seq[i], lsm.gather(1, y[i, None]).squeeze(1))
    lp = logps.requires_grad_(True)
    counts = torch.zeros(num_seqs, dtype=torch.int64).index_add_(0, seq[idx], torch.ones_like(idx))
    losses = OBJECTIVES[objective].fn(lp.view(-1, group), ref_logps.double().view(-1, group),
                                      counts=counts.view(-1, group), scores=None, **hparams)
    loss = ground_truth.kl_dro(losses, weights.double(), lam)
    (dlp,) = torch.autograd.grad(loss, lp)
    grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w)
    for i in pieces:
        g = torch.softmax(h[i] @ w.T, -1).neg_()
        g[torch.arange(i.numel()), y[i]] += 1.0
        g.mul_(dlp[seq[i]][:, None])
        grad_h[i] = g @ w
        grad_w += g.T @ h[i]
    return loss.detach(), grad_h.view(hidden.shape), grad_w
