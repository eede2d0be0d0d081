"""The generation study's tools (robalign.app.evaluation.samples): win rates and bootstrap intervals on
hand-made inputs, and the sampled KL(π ‖ π_ref) against its exact value on a language model with a
tiny vocabulary (a bigram table: 2 words and an end token, responses of at most 3 tokens, every
response enumerable)."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from robalign.app.evaluation.samples import (bootstrap_ci, kl_from_samples, paired_bootstrap_ci, response_logps,
                                  sample_responses, win_rate)

EOS = 2


class Bigram(torch.nn.Module):
    """logits of the next token = ``table[last token]``."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float64))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def _responses(max_len=3):
    """Every response: ended by the end token, or cut at ``max_len`` tokens."""
    out = []
    for length in range(1, max_len + 1):
        for body in itertools.product((0, 1), repeat=length - 1):
            out.append(list(body) + [EOS])
        if length == max_len:
            out += [list(t) for t in itertools.product((0, 1), repeat=length)]
    return out


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3, 3], [0, 2, 4, 3]) == 0.5
    assert win_rate([3.0, 3.0], [1.0, 1.0]) == 1.0 and win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="one shape"):
        win_rate([1, 2], [1])


def test_bootstrap_intervals():
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25, 0.25)
    x = [0.0, 1.0] * 50                                     # mean ½, standard error 0.05
    mean, low, high = bootstrap_ci(x, n_boot=4000)
    assert mean == 0.5 and low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.015) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.015)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)             # seeded
    a = torch.arange(10.0)
    assert paired_bootstrap_ci(a + 2, a) == (2.0, 2.0, 2.0)                # the prompts' own spread cancels
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=1.0)


def test_sampled_log_probs_and_kl_match_the_exact_values():
    policy = Bigram([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [0.0, 0.0, 0.0]])
    ref = Bigram([[0.2, 0.1, 0.4], [-0.3, 0.5, 0.1], [0.0, 0.0, 0.0]])
    prompt = [0, 1]
    everything = _responses()
    pi, pr = response_logps(policy, prompt, everything), response_logps(ref, prompt, everything)
    assert float(pi.exp().sum()) == pytest.approx(1.0, abs=1e-12)          # the responses are all of them
    exact = float((pi.exp() * (pi - pr)).sum())
    gen = torch.Generator().manual_seed(0)
    ys, logps = sample_responses(policy, prompt, n=20000, max_new_tokens=3, eos_token_id=EOS, generator=gen)
    torch.testing.assert_close(logps[:50], response_logps(policy, prompt, ys[:50]), rtol=0, atol=1e-12)
    diff = logps - response_logps(ref, prompt, ys)
    estimate, se = kl_from_samples(logps, logps - diff), float(diff.std() / math.sqrt(len(ys)))
    assert exact > 0.01 and abs(estimate - exact) < 4 * se, (estimate, exact, se)
    frequency = sum(y == [0, EOS] for y in ys) / len(ys)                     # one response's probability
    assert frequency == pytest.approx(math.exp(float(response_logps(policy, prompt, [[0, EOS]]))), abs=0.01)
    greedy, _ = sample_responses(policy, prompt, n=2, max_new_tokens=3, eos_token_id=EOS, greedy=True)
    assert greedy == [[1, 1, 1]] * 2                                         # argmax after 1 is 1
