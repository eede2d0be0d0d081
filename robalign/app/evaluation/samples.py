"""What the policy writes, measured as the field measures it (the generation study's tools).

    sample_responses(model, prompt, n=..)   n responses sampled at temperature T (or greedy), each
                                            with its log-prob under the sampling model at T = 1
    response_logps(model, prompt, ys)       log π(y | x) of given responses (the reference's, say)
    win_rate(a, b)                          P(a > b) + ½·P(a = b) over paired scores
    kl_from_samples(logp_pi, logp_ref)      KL(π ‖ π_ref) ≈ mean(log π(y) − log π_ref(y)), y ~ π
    bootstrap_ci(values)                    the mean and a percentile bootstrap interval over prompts
    paired_bootstrap_ci(a, b)               the same for the mean difference a − b on the same prompts

A causal LM here is anything called as ``model(input_ids=ids).logits`` (a Hugging Face model, or a
table in the tests); prompts and responses are lists of token ids. Sampling is a plain loop without
a cache: the study's models are small, and the log-prob of each sampled token comes with it.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["sample_responses", "response_logps", "win_rate", "kl_from_samples", "bootstrap_ci",
           "paired_bootstrap_ci"]


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")


@torch.no_grad()
def sample_responses(model, prompt: Sequence[int], *, n: int, max_new_tokens: int, eos_token_id: int | None,
                     temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None):
    """``n`` responses to ``prompt`` and their log-probs: ``(responses, logps)`` with ``responses`` a
    list of n token lists (the eos, when drawn, ends a response and is its last token) and ``logps``
    ``[n]`` float64, ``Σ_t log softmax(z_t)[y_t]`` at temperature 1 — log π(y | x) of the model
    itself, whatever ``temperature`` drew y. ``greedy``: the argmax at each step (n identical rows).
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_responses: need n >= 1 and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"sample_responses: temperature must be > 0 (or greedy=True), got {temperature}")
    device = _device(model)
    ids = torch.tensor([list(prompt)] * n, dtype=torch.long, device=device)
    logps = torch.zeros(n, dtype=torch.float64, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1].double()
        log_p = torch.log_softmax(logits, -1)
        if greedy:
            token = log_p.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            token = torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(-1).to(device)
        logps += torch.where(alive, log_p.gather(-1, token[:, None]).squeeze(-1), 0.0)
        steps.append(torch.where(alive, token, -1))
        ids = torch.cat([ids, token[:, None]], 1)
        if eos_token_id is not None:
            alive &= token != eos_token_id
        if not alive.any():
            break
    tokens = torch.stack(steps, 1).tolist()
    return [[t for t in row if t >= 0] for row in tokens], logps.cpu()


@torch.no_grad()
def response_logps(model, prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[len(responses)]`` float64: ``log π(y | x) = Σ_t log softmax(z_t)[y_t]`` of each response
    after ``prompt`` under ``model`` (one forward per response)."""
    device = _device(model)
    out = []
    for y in responses:
        ids = torch.tensor([list(prompt) + list(y)], dtype=torch.long, device=device)
        log_p = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(y), device=device)
        out.append(log_p[positions, ids[0, len(prompt):]].sum() if len(y) else torch.zeros((), dtype=torch.float64))
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def win_rate(a, b) -> float:
    """``mean(1[a_i > b_i] + ½·1[a_i = b_i])`` over paired scores (ties count half)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"win_rate: need two non-empty score lists of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def kl_from_samples(policy_logps, ref_logps) -> float:
    """KL(π ‖ π_ref) estimated from responses sampled from π: ``mean(log π(y) − log π_ref(y))``,
    unbiased (both log-probs of the same sampled responses, at temperature 1)."""
    p, r = torch.as_tensor(policy_logps, dtype=torch.float64), torch.as_tensor(ref_logps, dtype=torch.float64)
    if p.shape != r.shape or p.numel() == 0:
        raise ValueError("kl_from_samples: need the policy's and the reference's log-probs of the same samples")
    return float((p - r).mean())


def _check_level(level):
    if not 0 < level < 1:
        raise ValueError(f"the interval's level must lie in (0, 1), got {level}")


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-prompt ``values`` and its percentile bootstrap interval
    (prompts resampled with replacement ``n_boot`` times, seeded)."""
    _check_level(level)
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap_ci: no values")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.numel(), (n_boot, x.numel()), generator=gen)
    means = x[idx].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(x.mean()), low, high


def paired_bootstrap_ci(a, b, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """:func:`bootstrap_ci` of the per-prompt differences ``a − b`` (two arms on the same prompts and
    seeds: the pairing removes the prompts' shared difficulty from the interval)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_ci: the arms must be scored on the same prompts, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return bootstrap_ci(a - b, level=level, n_boot=n_boot, seed=seed)
