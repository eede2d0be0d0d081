"""A short end-to-end DoRA run on random data: the loss with every objective, then training.

A toy policy (token embedding → linear LM head) is trained with :class:`robalign.DoRALoss`
on random pairwise and listwise batches whose candidates carry classifier probabilities.
It exercises the public API end to end (heavy op, objective, weights, KL-DRO, backward)
and prints the loss and gradient norms; it is not the distribution-shift experiment.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from . import objectives
from .loss import DoRALoss


class TinyLM(nn.Module):
    """Embedding + LM head: ``hidden = E[x]``, ``logits = hidden @ Wᵀ``."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        return self.embed(tokens)


def _batch(gen, num_samples, group_size, seqlen, vocab):
    rows = num_samples * group_size
    tokens = torch.randint(vocab, (rows, seqlen), generator=gen)
    labels = tokens.roll(-1, dims=1)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (rows,), generator=gen)
    labels[torch.arange(seqlen)[None, :] >= lengths[:, None]] = -100
    labels[:, :2] = -100                                   # the "prompt"
    probs = torch.rand(rows, generator=gen)
    scores = torch.randn(rows, generator=gen)
    return tokens, labels, probs, scores


def run(steps: int = 30, seed: int = 0, log=print) -> dict:
    """Evaluate every objective once, then train the toy policy with DoRA-DPO for ``steps``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab, dim, seqlen = 512, 64, 24
    policy = TinyLM(vocab, dim)
    ref = copy.deepcopy(policy).requires_grad_(False)

    log(f"{'objective':<14} {'K':>2} {'loss':>9} {'|grad E|':>10} {'|grad W|':>10} {'DRO ESS':>8}")
    for name in objectives.NAMES:
        k = 2 if objectives.is_pairwise(name) else 4
        tokens, labels, probs, scores = _batch(gen, 8, k, seqlen, vocab)
        loss_fn = DoRALoss(name, beta=0.5, lam=1.0, alpha=0.25, group_size=k)
        policy.zero_grad()
        with torch.no_grad():
            ref_logits = ref.head(ref(tokens))
        out = loss_fn(hidden=policy(tokens), weight=policy.head.weight, labels=labels,
                      ref_logits=ref_logits, probs=probs, scores=scores)
        out.loss.backward()
        log(f"{name:<14} {k:>2} {out.loss.item():>9.4f} {policy.embed.weight.grad.norm().item():>10.3e} "
            f"{policy.head.weight.grad.norm().item():>10.3e} {out.dro.ess.item():>8.2f}")

    loss_fn = DoRALoss("dpo", beta=0.5, lam=1.0, alpha=0.25)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    fixed = _batch(gen, 16, 2, seqlen, vocab)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        tokens, labels, probs, _ = fixed
        with torch.no_grad():
            ref_logits = ref.head(ref(tokens))
        out = loss_fn(hidden=policy(tokens), weight=policy.head.weight, labels=labels,
                      ref_logits=ref_logits, probs=probs)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(out.loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"step {step:3d}  loss {out.loss.item():.4f}  reward acc {out.reward_accuracy.item():.2f}  "
                f"margin {out.reward_margin.item():+.3f}  ESS {out.dro.ess.item():.1f}/{out.dro.num_samples.item()}")
    log(f"trained {steps} steps in {time.perf_counter() - start:.1f}s: loss {history[0]:.4f} -> {history[-1]:.4f}")
    return {"loss_first": history[0], "loss_last": history[-1]}
