"""A seeded generator of preference data with known ground truth (the embedded default).

Prompts ask about a topic. Responses are word sequences from one of two sources:
    target (``human``)   short, a human-style word now and then;
    synthetic (``synthetic``) longer, with its own style words ("certainly", "furthermore", ...).
Content words are either on topic (good) or filler (bad). Two rewards:
    r0 (the target preference)  = (on-topic words − filler words) / length
    r1 (the biased labeller)    = (1 − 2·bias)·r0 + bias·(style-word share + length/20)
Target pairs are labelled by r0; synthetic pairs by r1, then flipped with ``flip_rate``. A
held-out test set holds target pairs labelled by r0.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToySettings", "make_toy_data", "reward_target", "reward_biased", "write_jsonl", "toy_tokenizer",
           "topic_share"]

TOPICS = {
    "ocean": "wave tide coral reef salt current whale shore deep fish".split(),
    "forest": "tree leaf moss pine oak root branch fern bark trail".split(),
    "city": "street tower bridge traffic market subway square crowd lamp avenue".split(),
    "space": "star orbit planet comet rocket moon galaxy crater nebula gravity".split(),
    "kitchen": "bread oven spoon flour butter knife pan salt soup herb".split(),
    "music": "song drum guitar rhythm chord melody piano choir tempo verse".split(),
}
FILLER = "thing stuff whatever something anyway basically really very just quite".split()
HUMAN_STYLE = "honestly maybe guess think perhaps".split()
SYNTH_STYLE = "certainly furthermore comprehensive delve crucial moreover additionally".split()
SOURCES = ("human", "synthetic")
_ANY_TOPIC = {w for words in TOPICS.values() for w in words}


@dataclass
class ToySettings:
    """n_train samples (a fraction ``target_fraction`` from the target source), n_test target
    samples, K candidates each, the synthetic labeller's ``bias`` and ``flip_rate``."""

    n_train: int = 600
    n_test: int = 300
    group_size: int = 2
    target_fraction: float = 0.25
    flip_rate: float = 0.2
    bias: float = 0.7
    seed: int = 0


PROMPT_WORDS = "tell me about the .".split()
SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def toy_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the generator's vocabulary (lower-cased,
    punctuation split off, ``[BOS]`` prepended to every text it encodes with special tokens).
    About a hundred tokens, so the embedded model's LM head is tiny and its samples readable."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL) + sorted({*PROMPT_WORDS, *TOPICS, *FILLER, *HUMAN_STYLE, *SYNTH_STYLE,
                                    *(w for ws in TOPICS.values() for w in ws)})
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def _words(response: str) -> list[str]:
    return response.split()


def reward_target(prompt_topic: str, response: str) -> float:
    """r0: the share of on-topic words minus the share of filler words."""
    words = _words(response)
    good = sum(w in TOPICS[prompt_topic] for w in words)
    bad = sum(w in FILLER for w in words)
    return (good - bad) / max(len(words), 1)


def topic_share(topics, responses) -> float:
    """Of all topic words in ``responses`` (any topic's), the share that belong to the topic asked
    for (``topics[i]`` for ``responses[i]``): 1 for the generator's own responses, about 1/6 for a
    model that has not learnt to follow the prompt."""
    if len(topics) != len(responses):
        raise ValueError(f"topic_share: {len(topics)} topics for {len(responses)} responses")
    on = every = 0
    for topic, response in zip(topics, responses):
        words = [w for w in _words(response) if w in _ANY_TOPIC]
        every += len(words)
        on += sum(w in TOPICS[topic] for w in words)
    return on / every if every else 0.0


def reward_biased(prompt_topic: str, response: str, bias: float) -> float:
    """r1 = (1 − 2·bias)·r0 + bias·(style share + length/20): prefers long, synthetic-style
    responses and, for bias > 1/2, is partly at odds with r0."""
    words = _words(response)
    style = sum(w in SYNTH_STYLE for w in words) / max(len(words), 1)
    return (1 - 2 * bias) * reward_target(prompt_topic, response) + bias * (style + len(words) / 20)


def _response(rng: random.Random, topic: str, source: str) -> str:
    quality = rng.random()
    length = rng.randint(6, 10) if source == "human" else rng.randint(10, 16)
    style_pool, style_rate = (HUMAN_STYLE, 0.1) if source == "human" else (SYNTH_STYLE, 0.3)
    words = []
    for _ in range(length):
        if rng.random() < style_rate:
            words.append(rng.choice(style_pool))
        elif rng.random() < quality:
            words.append(rng.choice(TOPICS[topic]))
        else:
            words.append(rng.choice(FILLER))
    return " ".join(words)


def _sample(rng: random.Random, settings: ToySettings, source: str, index: int) -> dict:
    topic = rng.choice(sorted(TOPICS))
    prompt = f"Tell me about the {topic}."
    responses = [_response(rng, topic, source) for _ in range(settings.group_size)]
    r0 = [reward_target(topic, r) for r in responses]
    if source == "human":
        scores = r0
    else:
        scores = [reward_biased(topic, r, settings.bias) for r in responses]
        if rng.random() < settings.flip_rate:
            scores = [-s for s in scores]
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    record = {"id": index, "prompt": prompt, "topic": topic, "source": source,
              "responses": [responses[i] for i in order], "scores": [round(scores[i], 6) for i in order],
              "sources": [source] * len(responses), "target_rewards": [round(r0[i], 6) for i in order]}
    if settings.group_size == 2:
        record["chosen"], record["rejected"] = record["responses"]
    return record


def make_toy_data(settings: ToySettings) -> tuple[list, list]:
    """``(train, test)`` records: listwise fields always (``responses``, ``scores``, ``sources``),
    plus ``chosen``/``rejected`` for pairs, and the ground truth (``topic``, ``target_rewards``)."""
    rng = random.Random(settings.seed)
    train = []
    for i in range(settings.n_train):
        source = "human" if rng.random() < settings.target_fraction else "synthetic"
        train.append(_sample(rng, settings, source, i))
    test = [_sample(rng, settings, "human", settings.n_train + i) for i in range(settings.n_test)]
    return train, test


def write_jsonl(path, records, *, fields=None) -> Path:
    """Write records (optionally only ``fields``) as JSON lines, atomically."""
    from ..._io import write_atomic

    path = Path(path)
    keep = (lambda r: {k: r[k] for k in fields if k in r}) if fields else (lambda r: r)
    write_atomic(path, lambda h: h.write("".join(json.dumps(keep(r)) + "\n" for r in records).encode()))
    return path
