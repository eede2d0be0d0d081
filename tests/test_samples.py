"""The generation study's tools (robalign.app.evaluation.samples): win rates and bootstrap intervals on
hand-made inputs, and the sampled KL(π ‖ π_ref) against its exact value on a language model with a
tiny vocabulary (a bigram table: 2 words and an end token, responses of at most 3 tokens, every
response enumerable)."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from robalign.app.evaluation.samples import (bootstrap_ci, kl_from_samples, paired_bootstrap_ci,
                                             paired_seeds_bootstrap_ci, response_logps, sample_prompts,
                                             sample_responses, score_responses, seeds_bootstrap_ci, text_stats,
                                             win_rate)

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


def test_seed_bootstrap_holds_the_seeds_spread():
    x = torch.tensor([[0.0] * 40, [1.0] * 40])              # two training seeds that disagree
    mean, low, high = seeds_bootstrap_ci(x, n_boot=4000)
    assert (mean, low, high) == (0.5, 0.0, 1.0)             # seeds resampled: 0, ½ or 1
    _, pooled_low, pooled_high = bootstrap_ci(x.flatten(), n_boot=4000)
    assert 0.35 < pooled_low < pooled_high < 0.65           # prompts alone would claim far more
    assert seeds_bootstrap_ci(torch.full((5, 7), 0.25)) == (0.25, 0.25, 0.25)
    y = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    assert paired_seeds_bootstrap_ci(y + 2, y) == pytest.approx((2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="seeds, prompts"):
        seeds_bootstrap_ci([1.0, 2.0])
    with pytest.raises(ValueError, match="share seeds"):
        paired_seeds_bootstrap_ci(torch.zeros(2, 3), torch.zeros(3, 2))


def test_text_stats_on_hand_made_responses():
    stats = text_stats([[5, 5, 6, EOS], [7, 8, 7, 8, 7], [EOS]], eos_token_id=EOS)
    assert stats["responses"] == 3 and stats["end_rate"] == pytest.approx(2 / 3)
    assert stats["mean_length"] == pytest.approx((3 + 5 + 0) / 3)
    assert stats["repeat_rate"] == pytest.approx(1 / 6)                 # (5, 5) among 2 + 4 pairs
    assert stats["distinct_1"] == pytest.approx((2 / 3 + 2 / 5) / 2)     # the empty response has none
    assert stats["distinct_2"] == pytest.approx((2 / 2 + 2 / 4) / 2)
    assert stats["corpus_distinct_2"] == pytest.approx(4 / 6)           # (5,5) (5,6) (7,8) (8,7)
    with pytest.raises(ValueError, match="no responses"):
        text_stats([], eos_token_id=EOS)


def test_batched_sampling_and_scoring_match_one_prompt_at_a_time():
    policy = Bigram([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [0.0, 0.0, 0.0]])
    prompts = [[0, 1], [1], [0, 0], [1, 1, 0]]                          # three lengths
    ys, logps = sample_prompts(policy, prompts, n=3, max_new_tokens=3, eos_token_id=EOS,
                               generator=torch.Generator().manual_seed(0), batch_rows=4)
    assert len(ys) == 4 and all(len(r) == 3 for r in ys) and logps.shape == (4, 3)
    flat_prompts = [p for p, r in zip(prompts, ys) for _ in r]
    flat = [y for r in ys for y in r]
    torch.testing.assert_close(score_responses(policy, flat_prompts, flat, batch_rows=5), logps.flatten(),
                               rtol=0, atol=1e-12)
    for prompt, r in zip(prompts, ys):
        torch.testing.assert_close(score_responses(policy, [prompt] * 3, r),
                                   torch.stack([response_logps(policy, prompt, [y])[0] for y in r]), rtol=0, atol=1e-12)
    # a prompt's samples follow its own last token: after 0 the end token is likelier than after 1
    many, _ = sample_prompts(policy, [[0], [1]], n=4000, max_new_tokens=1, eos_token_id=EOS,
                             generator=torch.Generator().manual_seed(1))
    ends = [sum(y == [EOS] for y in r) / len(r) for r in many]
    assert ends[0] == pytest.approx(math.exp(0.2) / (math.exp(1) + math.exp(-0.5) + math.exp(0.2)), abs=0.03)
    assert ends[1] == pytest.approx(math.exp(-1) / (math.exp(0.3) + math.exp(0.8) + math.exp(-1)), abs=0.03)
    assert score_responses(policy, [[0]], [[]]).tolist() == [0.0]                       # nothing to score
    with pytest.raises(ValueError, match="2 prompts for 1"):
        score_responses(policy, [[0], [1]], [[1]])
    with pytest.raises(ValueError, match="empty prompt"):
        sample_prompts(policy, [[]], n=1, max_new_tokens=1, eos_token_id=EOS)


def test_a_hugging_face_model_samples_the_same_with_its_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    from robalign.app.evaluation import samples

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, eos_token_id=EOS)
    model = LlamaForCausalLM(config).eval()
    prompts = [[1, 4, 5], [3, 3, 7], [9]]
    assert samples._cache_argument(model) in ("cache", "past_key_values")
    cached = sample_prompts(model, prompts, n=5, max_new_tokens=8, eos_token_id=EOS,
                            generator=torch.Generator().manual_seed(3))
    model.config.use_cache = False                               # every step sees the whole row
    assert samples._cache_argument(model) is None
    plain = sample_prompts(model, prompts, n=5, max_new_tokens=8, eos_token_id=EOS,
                           generator=torch.Generator().manual_seed(3))
    assert cached[0] == plain[0]
    torch.testing.assert_close(cached[1], plain[1], rtol=0, atol=1e-5)      # float32 model, summed in float64
    flat = [y for ys in cached[0] for y in ys]
    scored = score_responses(model, [p for p, ys in zip(prompts, cached[0]) for _ in ys], flat)
    torch.testing.assert_close(scored.reshape(3, 5), cached[1], rtol=0, atol=1e-5)
