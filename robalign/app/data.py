"""The training data pipeline: preference files → tokenised groups → group-major batches.

A sample is a prompt with K candidate responses (pairs: chosen, then rejected). Each candidate
becomes one row ``prompt tokens + response tokens + eos``; ``labels`` copy the response tokens
and mask the prompt and padding with -100 (Hugging Face convention: labels at the positions of
``input_ids``; the loss aligns them with :func:`robalign.shift_labels`).

Truncation rules (counted, and reported by the trainer):
    1. the prompt keeps its last ``max_prompt_length`` tokens (truncated from the left);
    2. the response keeps its first ``max_length − len(prompt)`` tokens (truncated from the right,
       the eos token included in the count).

The prompt goes through the tokenizer's chat template when it has one (a single user turn with
the generation prompt), else it is used as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ratio.data import read_preference_file, sample_group

__all__ = ["TokenizedGroup", "PreferenceDataset", "PreferenceCollator", "prepare_tokenizer", "tokenize_prompt"]


def prepare_tokenizer(tokenizer, log=print):
    """Give a tokenizer without a pad (or eos) token one, saying so; returns the tokenizer."""
    if tokenizer.eos_token is None:
        candidate = tokenizer.sep_token or tokenizer.cls_token
        if candidate is None:
            raise ValueError("the tokenizer has neither an eos nor a sep token to end responses with")
        tokenizer.eos_token = candidate
        log(f"robalign: the tokenizer has no eos token; using {candidate!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log(f"robalign: the tokenizer has no pad token; using eos {tokenizer.eos_token!r} (padding is masked)")
    return tokenizer


def tokenize_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt — a string (one user turn) or a list of messages — through the
    tokenizer's chat template with the generation prompt; without a template, the text (a
    conversation as ``role: content`` lines)."""
    from .ratio.data import prompt_text

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt_text(prompt), add_special_tokens=True)["input_ids"]


@dataclass
class TokenizedGroup:
    """One sample: K rows of ``input_ids`` and ``labels`` (-100 on the prompt), and its metadata
    (``group_id``: index of the sample's group in its dataset's ``group_names``, for group DRO)."""

    input_ids: list
    labels: list
    scores: list
    probs: list | None = None
    weights: list | None = None
    ref_logps: list | None = None
    group_id: int | None = None


@dataclass
class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised preference samples of one file; every sample has the same K. ``group_names``:
    the sorted distinct groups of the samples (:func:`robalign.app.ratio.data.sample_group`);
    empty when some sample has none."""

    groups: list
    group_size: int
    truncated_prompts: int = 0
    truncated_responses: int = 0
    path: str = ""
    group_names: tuple = ()

    def __len__(self):
        return len(self.groups)

    def unknown_share(self, unk_token_id) -> float:
        """The fraction of the tokens (prompts and responses) that are the tokenizer's unknown
        token: high when a tokenizer does not cover the data's vocabulary."""
        if unk_token_id is None:
            return 0.0
        total = unknown = 0
        for group in self.groups:
            for ids in group.input_ids:
                total += len(ids)
                unknown += sum(1 for t in ids if t == unk_token_id)
        return unknown / max(total, 1)

    def __getitem__(self, index):
        return self.groups[index]

    @classmethod
    def from_file(cls, path, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256) -> PreferenceDataset:
        """Read ``path`` (listwise or pairwise JSONL) and tokenise it with ``tokenizer``."""
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        pref = read_preference_file(path)
        eos = tokenizer.eos_token_id
        groups, cut_prompts, cut_responses, k_seen, names = [], 0, 0, None, []
        for line_index, (record, (prompt, responses)) in enumerate(zip(pref.records, pref.samples)):
            # the prompt: a string, or a conversation's messages (any layout TRL documents, see ratio.data)
            scores = [1.0, 0.0] if pref.format == "pairwise" else [float(s) for s in record["scores"]]
            if k_seen is None:
                k_seen = len(responses)
            elif len(responses) != k_seen:
                raise ValueError(f"{path}: record {line_index + 1} has {len(responses)} responses, the first had "
                                 f"{k_seen}; every sample of a training file needs the same number")
            prompt_ids = tokenize_prompt(tokenizer, prompt)
            if len(prompt_ids) > max_prompt_length:
                prompt_ids = prompt_ids[-max_prompt_length:]
                cut_prompts += 1
            rows_ids, rows_labels, cut = [], [], 0
            budget = max_length - len(prompt_ids)
            for response in responses:
                ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
                if len(ids) > budget:
                    ids = ids[:budget]
                    cut += 1
                rows_ids.append(prompt_ids + ids)
                rows_labels.append([-100] * len(prompt_ids) + ids)
            cut_responses += cut
            weights = record.get("weights")
            groups.append(TokenizedGroup(rows_ids, rows_labels, scores, probs=record.get("probs"), weights=weights))
            names.append(sample_group(record))
        group_names = () if None in names else tuple(sorted(set(names)))
        if group_names:
            index = {name: i for i, name in enumerate(group_names)}
            for group, name in zip(groups, names):
                group.group_id = index[name]
        return cls(groups, k_seen, cut_prompts, cut_responses, str(pref.path), group_names)


@dataclass
class PreferenceCollator:
    """Pads a list of :class:`TokenizedGroup` into one group-major batch:

        input_ids, attention_mask, labels   [B·K, T]   (labels: HF convention, -100 masked)
        scores                              [B·K]      float32
        probs / weights / ref_logps         [B·K]      when every sample has them
        group_ids                           [B]        int64, when every sample has one
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    fields: tuple = field(default=("probs", "weights", "ref_logps"))

    def __call__(self, groups):
        rows_ids = [ids for g in groups for ids in g.input_ids]
        rows_labels = [lab for g in groups for lab in g.labels]
        width = max(len(r) for r in rows_ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows_ids), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows_ids), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows_ids), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                 "scores": torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)}
        for name in self.fields:
            values = [getattr(g, name) for g in groups]
            if all(v is not None for v in values):
                batch[name] = torch.tensor([x for v in values for x in v], dtype=torch.float32)
        if all(g.group_id is not None for g in groups):
            batch["group_ids"] = torch.tensor([g.group_id for g in groups], dtype=torch.long)
        return batch
