"""What the policy writes, measured as the field measures it (the generation study's tools).

    sample_responses(model, prompt, n=..)    n responses sampled at temperature T (or greedy), each
                                             with its log-prob under the sampling model at T = 1
    sample_prompts(model, prompts, n=..)     the same for many prompts in batches: [P][n] responses,
                                             [P, n] log-probs
    response_logps(model, prompt, ys)        log π(y | x) of given responses (the reference's, say)
    score_responses(model, prompts, ys)      the same for (prompt, response) pairs, in batches
    text_stats(ys, eos)                      length, end rate, repetitions and distinct-n of samples
    win_rate(a, b)                           P(a > b) + ½·P(a = b) over paired scores
    kl_from_samples(logp_pi, logp_ref)       KL(π ‖ π_ref) ≈ mean(log π(y) − log π_ref(y)), y ~ π
    bootstrap_ci(values)                     the mean and a percentile bootstrap interval over prompts
    paired_bootstrap_ci(a, b)                the same for the mean difference a − b on the same prompts
    seeds_bootstrap_ci(values)               [S, P] values: seeds and, within each, prompts resampled
    paired_seeds_bootstrap_ci(a, b)          the same for a − b, two arms on the same seeds and prompts

A causal LM here is anything called as ``model(input_ids=ids).logits`` (a Hugging Face model, or a
table in the tests); prompts and responses are lists of token ids. Sampling is a plain loop, so the
log-prob of each sampled token comes with it; a Hugging Face model keeps its key-value cache
between steps (``cache``, ``past_key_values`` before transformers 5.25), any other model sees the
whole row each step.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

__all__ = ["sample_responses", "sample_prompts", "response_logps", "score_responses", "text_stats", "win_rate",
           "kl_from_samples", "bootstrap_ci", "paired_bootstrap_ci", "seeds_bootstrap_ci", "paired_seeds_bootstrap_ci"]


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")


def _cache_argument(model) -> str | None:
    """For a Hugging Face causal LM that caches keys and values, the name its forward and output give
    the cache (``cache`` from transformers 5.25, ``past_key_values`` before); otherwise None."""
    if not getattr(getattr(model, "config", None), "use_cache", False) or not hasattr(model, "generate"):
        return None
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _by_length(prompts, keep=lambda i: True) -> dict:
    """``{prompt length: [indices]}`` of the prompts ``keep`` accepts: rows of one length batch
    without padding the prompt."""
    groups: dict = {}
    for i, prompt in enumerate(prompts):
        if keep(i):
            groups.setdefault(len(prompt), []).append(i)
    return groups


def _check_sampling(n, max_new_tokens, temperature, greedy, who):
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"{who}: need n >= 1 and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"{who}: temperature must be > 0 (or greedy=True), got {temperature}")


@torch.no_grad()
def _sample_rows(model, ids, *, max_new_tokens, eos_token_id, temperature, greedy, generator):
    """Continue every row of ``ids`` ``[R, P]`` (prompts of one length); ``(responses, logps [R])``."""
    rows = ids.shape[0]
    logps = torch.zeros(rows, dtype=torch.float64, device=ids.device)
    alive = torch.ones(rows, dtype=torch.bool, device=ids.device)
    steps = []
    cache_name = _cache_argument(model)
    past, fed = None, ids
    for _ in range(max_new_tokens):
        if cache_name:
            out = model(input_ids=fed, use_cache=True, **{cache_name: past})
            past = out[cache_name]
        else:
            out = model(input_ids=ids)
        logits = out.logits[:, -1].double()
        log_p = torch.log_softmax(logits, -1)
        if greedy:
            token = log_p.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            token = torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(-1).to(ids.device)
        logps += torch.where(alive, log_p.gather(-1, token[:, None]).squeeze(-1), 0.0)
        steps.append(torch.where(alive, token, -1))
        ids, fed = torch.cat([ids, token[:, None]], 1), token[:, None]
        if eos_token_id is not None:
            alive &= token != eos_token_id
        if not alive.any():
            break
    tokens = torch.stack(steps, 1).tolist()
    return [[t for t in row if t >= 0] for row in tokens], logps.cpu()


def sample_responses(model, prompt: Sequence[int], *, n: int, max_new_tokens: int, eos_token_id: int | None,
                     temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None):
    """``n`` responses to ``prompt`` and their log-probs: ``(responses, logps)`` with ``responses`` a
    list of n token lists (the eos, when drawn, ends a response and is its last token) and ``logps``
    ``[n]`` float64, ``Σ_t log softmax(z_t)[y_t]`` at temperature 1 — log π(y | x) of the model
    itself, whatever ``temperature`` drew y. ``greedy``: the argmax at each step (n identical rows).
    """
    _check_sampling(n, max_new_tokens, temperature, greedy, "sample_responses")
    ids = torch.tensor([list(prompt)] * n, dtype=torch.long, device=_device(model))
    return _sample_rows(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        temperature=temperature, greedy=greedy, generator=generator)


def sample_prompts(model, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int,
                   eos_token_id: int | None, temperature: float = 1.0, greedy: bool = False,
                   generator: torch.Generator | None = None, batch_rows: int = 512):
    """:func:`sample_responses` for every prompt: ``(responses, logps)``, ``responses[p]`` the n
    responses to ``prompts[p]`` and ``logps`` ``[P, n]`` float64. Prompts of one length share batches
    of at most ``batch_rows`` rows (no padding, so each row's samples are those of a lone prompt)."""
    _check_sampling(n, max_new_tokens, temperature, greedy, "sample_prompts")
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_prompts: need at least one prompt, and no empty prompt")
    responses: list = [None] * len(prompts)
    logps = torch.zeros(len(prompts), n, dtype=torch.float64)
    per_batch = max(1, batch_rows // n)
    for members in _by_length(prompts).values():
        for start in range(0, len(members), per_batch):
            chunk = members[start:start + per_batch]
            ids = torch.tensor([list(prompts[p]) for p in chunk for _ in range(n)], dtype=torch.long,
                               device=_device(model))
            ys, lp = _sample_rows(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  temperature=temperature, greedy=greedy, generator=generator)
            for k, p in enumerate(chunk):
                responses[p] = ys[k * n:(k + 1) * n]
                logps[p] = lp[k * n:(k + 1) * n]
    return responses, logps


def response_logps(model, prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[len(responses)]`` float64: ``log π(y | x) = Σ_t log softmax(z_t)[y_t]`` of each response
    after ``prompt`` under ``model``."""
    return score_responses(model, [prompt] * len(responses), responses)


@torch.no_grad()
def score_responses(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                    batch_rows: int = 256) -> torch.Tensor:
    """``[N]`` float64: ``log π(y_i | x_i) = Σ_t log softmax(z_t)[y_t]`` of ``responses[i]`` after
    ``prompts[i]``. Rows with prompts of one length share a forward, responses padded on the right
    (a causal model's earlier positions do not see the padding); an empty response scores 0."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_responses: {len(prompts)} prompts for {len(responses)} responses")
    out = torch.zeros(len(responses), dtype=torch.float64)
    device = _device(model)
    for length, members in _by_length(prompts, keep=lambda i: len(responses[i]) > 0).items():
        if length == 0:
            raise ValueError("score_responses: an empty prompt (a response needs a position to be predicted from)")
        for start in range(0, len(members), batch_rows):
            chunk = members[start:start + batch_rows]
            width = length + max(len(responses[i]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
            for r, i in enumerate(chunk):
                ids[r, :length] = torch.as_tensor(list(prompts[i]))
                ids[r, length:length + len(responses[i])] = torch.as_tensor(list(responses[i]))
                scored[r, length - 1:length - 1 + len(responses[i])] = True
            ids = ids.to(device)
            log_p = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
            token = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
            out[chunk] = torch.where(scored, token, 0.0).sum(1)
    return out


def text_stats(responses: Sequence[Sequence[int]], eos_token_id: int | None) -> dict:
    """What samples look like, to compare with the training responses (a model that degenerates
    loops on a token, never ends, or repeats its bigrams):

        end_rate       share of responses that end with ``eos_token_id`` (not cut at the cap)
        mean_length    tokens before the end token
        repeat_rate    share of adjacent token pairs that are one token twice
        distinct_1/2   per response, distinct unigrams (bigrams) / unigrams (bigrams); the mean
        corpus_distinct_2   distinct bigrams over all responses / all bigrams
    """
    if len(responses) == 0:
        raise ValueError("text_stats: no responses")
    ends = [len(y) > 0 and y[-1] == eos_token_id for y in responses]
    bodies = [list(y[:-1]) if end else list(y) for y, end in zip(responses, ends)]
    pairs = [list(zip(b, b[1:])) for b in bodies]
    every_pair = [p for ps in pairs for p in ps]

    def distinct(items):
        rated = [len(set(x)) / len(x) for x in items if x]
        return sum(rated) / len(rated) if rated else 0.0

    return {"responses": len(responses), "end_rate": sum(ends) / len(ends),
            "mean_length": sum(map(len, bodies)) / len(bodies),
            "repeat_rate": sum(a == b for a, b in every_pair) / len(every_pair) if every_pair else 0.0,
            "distinct_1": distinct(bodies), "distinct_2": distinct(pairs),
            "corpus_distinct_2": len(set(every_pair)) / len(every_pair) if every_pair else 0.0}


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


def _percentiles(means: torch.Tensor, level: float) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates' ``means`` at ``level``."""
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-prompt ``values`` and its percentile bootstrap interval
    (prompts resampled with replacement ``n_boot`` times, seeded)."""
    _check_level(level)
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap_ci: no values")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.numel(), (n_boot, x.numel()), generator=gen)
    return (float(x.mean()), *_percentiles(x[idx].mean(1), level))


def paired_bootstrap_ci(a, b, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """:func:`bootstrap_ci` of the per-prompt differences ``a − b`` (two arms on the same prompts and
    seeds: the pairing removes the prompts' shared difficulty from the interval)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_ci: the arms must be scored on the same prompts, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return bootstrap_ci(a - b, level=level, n_boot=n_boot, seed=seed)


def seeds_bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """``(mean, low, high)`` of ``values`` ``[S, P]`` (S training seeds × P prompts): each bootstrap
    replicate draws S seeds with replacement and, within each drawn seed, P prompts with
    replacement, so the interval holds both the training's and the prompts' randomness."""
    _check_level(level)
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"seeds_bootstrap_ci: need values [seeds, prompts], got shape {tuple(x.shape)}")
    seeds, prompts = x.shape
    gen = torch.Generator().manual_seed(seed)
    pick_seed = torch.randint(seeds, (n_boot, seeds, 1), generator=gen)
    pick_prompt = torch.randint(prompts, (n_boot, seeds, prompts), generator=gen)
    return (float(x.mean()), *_percentiles(x[pick_seed, pick_prompt].mean((1, 2)), level))


def paired_seeds_bootstrap_ci(a, b, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """:func:`seeds_bootstrap_ci` of ``a − b``: two arms trained on the same seeds and evaluated on
    the same prompts with the same sampling stream."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_seeds_bootstrap_ci: the arms must share seeds and prompts, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return seeds_bootstrap_ci(a - b, level=level, n_boot=n_boot, seed=seed)
