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

**Unpaired data** (KTO, ``unpaired=True``): a sample is one completion labelled desirable or
undesirable (``scores`` = [1] or [0]), from an unpaired file or from a pairwise one (each pair gives a
desirable and an undesirable sample: every chosen response first, then every rejected one, as TRL
unpairs). With ``kl_rows=True`` each sample also carries its **mismatched row**, its own prompt with
the completion of the sample before it (the last sample's for the first), truncated by the same
rules: what KTO's reference point is estimated on (:mod:`robalign.losses.unpaired`). The pairing is
fixed by the file's order, so the reference model's log-probs of those rows can be computed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ratio.data import read_preference_file, sample_group

__all__ = ["TokenizedGroup", "PreferenceDataset", "PreferenceCollator", "prepare_tokenizer", "tokenize_prompt",
           "pack_padded"]


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
    from ..ratio.data import prompt_text

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt_text(prompt), add_special_tokens=True)["input_ids"]


@dataclass
class TokenizedGroup:
    """One sample: K rows of ``input_ids`` and ``labels`` (-100 on the prompt), and its metadata
    (``group_id``: index of the sample's group in its dataset's ``group_names``, for group DRO;
    ``kl_input_ids``/``kl_labels``: an unpaired sample's mismatched row, ``kl_ref_logps`` its
    reference log-prob)."""

    input_ids: list
    labels: list
    scores: list
    probs: list | None = None
    weights: list | None = None
    ref_logps: list | None = None
    group_id: int | None = None
    kl_input_ids: list | None = None
    kl_labels: list | None = None
    kl_ref_logps: list | None = None


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
    unpaired: bool = False

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

    def with_group_names(self, names: tuple) -> PreferenceDataset:
        """This dataset with its samples' ``group_id`` indexing ``names`` (another file's, e.g.
        the training data's for an evaluation file): a group id means the same group name in every
        file. A group of this file that ``names`` lacks is a ValueError."""
        if not self.group_names or tuple(names) == self.group_names:
            return self
        unknown = sorted(set(self.group_names) - set(names))
        if unknown:
            raise ValueError(f"{self.path}: groups {unknown} are not among the training data's {list(names)}")
        index = {name: i for i, name in enumerate(names)}
        for group in self.groups:
            group.group_id = index[self.group_names[group.group_id]]
        self.group_names = tuple(names)
        return self

    def weighting(self) -> dict:
        """What the samples carry for DoRA's weights: ``source`` ``"weights"``, ``"probs"`` or
        ``None``; for weights, their effective sample size as a fraction of N,
        ``(Σw)² / (N·Σw²)`` over the per-sample weights (the mean of a sample's per-response
        ones), and the share of samples whose weight is 0. Raises ValueError when only some
        samples carry them: batches would then be weighted or not by chance."""
        n = len(self.groups)
        for name in ("weights", "probs"):
            having = sum(getattr(g, name) is not None for g in self.groups)
            if 0 < having < n:
                first = next(i for i, g in enumerate(self.groups) if getattr(g, name) is None)
                raise ValueError(f"{self.path or 'data'}: {having} of {n} samples have `{name}` and the others do "
                                 f"not (sample {first} first); give every sample one, or none")
        if n and self.groups[0].weights is not None:
            w = torch.tensor([float(torch.tensor(g.weights, dtype=torch.float64).mean()) for g in self.groups],
                             dtype=torch.float64)
            sq = float((w * w).sum())
            return {"source": "weights", "ess_fraction": float(w.sum()) ** 2 / (n * sq) if sq > 0 else 0.0,
                    "zero_share": float((w == 0).double().mean())}
        return {"source": "probs" if n and self.groups[0].probs is not None else None}

    def __getitem__(self, index):
        return self.groups[index]

    @classmethod
    def from_file(cls, path, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256,
                  unpaired: bool = False, kl_rows: bool = False, chat_as_text: bool = False,
                  parsed=None) -> PreferenceDataset:
        """Read ``path`` (listwise, pairwise or unpaired JSONL, or a saved dataset) and tokenise it
        with ``tokenizer``. ``unpaired``: one labelled completion per sample (for KTO; a pairwise
        file is unpaired); ``kl_rows``: each unpaired sample also gets its mismatched row.
        Conversational prompts need the tokenizer's chat template; ``chat_as_text`` reads them as
        ``role: content`` lines instead (ValueError without either). ``parsed``: ``path`` as
        :func:`~robalign.app.ratio.data.read_preference_file` already returned it (not read again)."""
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        pref = parsed if parsed is not None else read_preference_file(path)
        if pref.format == "unpaired" and not unpaired:
            raise ValueError(f"{path}: unpaired data (`completion`, `label`) trains an unpaired objective: "
                             "kto or apo_zero_unpaired")
        if unpaired and pref.format == "listwise":
            raise ValueError(f"{path}: an unpaired objective (kto, apo_zero_unpaired) reads unpaired or pairwise "
                             "data, not listwise (which responses would be desirable?)")
        eos = tokenizer.eos_token_id
        cut = {"prompts": 0, "responses": 0}

        def prompt_ids_of(prompt, line_index):
            if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None) and not chat_as_text:
                raise ValueError(f"{path}: record {line_index + 1} is a conversation and the tokenizer has no chat "
                                 "template: give the model's tokenizer one (`chat_template` in tokenizer_config.json), "
                                 "or pass --chat-as-text (YAML `chat_as_text: true`) to train on its 'role: content' "
                                 "lines")
            ids = tokenize_prompt(tokenizer, prompt)
            if len(ids) > max_prompt_length:
                cut["prompts"] += 1
                ids = ids[-max_prompt_length:]
            return ids

        def response_ids(prompt_ids, response):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
            budget = max_length - len(prompt_ids)
            if len(ids) > budget:
                cut["responses"] += 1
                ids = ids[:budget]
            return ids

        # (group name, prompt ids, responses, scores, probs, weights) per sample
        items = []
        for line_index, (record, (prompt, responses)) in enumerate(zip(pref.records, pref.samples)):
            ids = prompt_ids_of(prompt, line_index)
            probs, weights = record.get("probs"), record.get("weights")
            if not unpaired:
                scores = [1.0, 0.0] if pref.format == "pairwise" else [float(x) for x in record["scores"]]
                if items and len(responses) != len(items[0][2]):
                    raise ValueError(f"{path}: record {line_index + 1} has {len(responses)} responses, the first had "
                                     f"{len(items[0][2])}; every sample of a training file needs the same number")
                items.append((sample_group(record), ids, responses, scores, probs, weights))
            elif pref.format == "unpaired":
                items.append((sample_group(record), ids, responses, [float(record["label"])], probs, weights))
            else:                                           # a pair: a desirable and an undesirable sample
                for k, (label, side) in enumerate(((1.0, "chosen"), (0.0, "rejected"))):
                    own = record.get(f"{side}_source") if record.get("group") is None else None
                    items.append((own or sample_group(record), ids, responses[k:k + 1], [label],
                                  None if probs is None else [probs[k]],
                                  weights if weights is None or not isinstance(weights, list) else [weights[k]]))
        if unpaired and pref.format == "pairwise":
            items = items[0::2] + items[1::2]
        if kl_rows and len(items) < 2:
            raise ValueError(f"{path}: KTO's reference point pairs each prompt with another sample's completion; "
                             f"it needs at least 2 samples, the file has {len(items)}")

        groups, names, completions = [], [], []
        for name, ids, responses, scores, probs, weights in items:
            rows = [response_ids(ids, r) for r in responses]
            completions.append(rows[0])
            groups.append(TokenizedGroup([ids + r for r in rows], [[-100] * len(ids) + r for r in rows], scores,
                                         probs=probs, weights=weights))
            names.append(name)
        if kl_rows:
            for i, (group, item) in enumerate(zip(groups, items)):
                ids = item[1]
                other = completions[i - 1][: max_length - len(ids)]
                group.kl_input_ids, group.kl_labels = [ids + other], [[-100] * len(ids) + other]
        group_names = () if None in names else tuple(sorted(set(names)))
        if group_names:
            index = {name: i for i, name in enumerate(group_names)}
            for group, name in zip(groups, names):
                group.group_id = index[name]
        return cls(groups, len(groups[0].input_ids), cut["prompts"], cut["responses"], str(pref.path), group_names,
                   unpaired)


@dataclass
class PreferenceCollator:
    """Pads a list of :class:`TokenizedGroup` into one group-major batch:

        input_ids, attention_mask, labels   [B·K, T]   (labels: HF convention, -100 masked)
        scores                              [B·K]      float32 (unpaired samples: their labels)
        probs / weights / ref_logps         [B·K]      when every sample has them
        group_ids                           [B]        int64, when every sample has one
        kl_input_ids, kl_attention_mask,    [B, T']    unpaired samples' mismatched rows, when every
        kl_labels; kl_ref_logps             [B]        sample has them

    ``padding_free``: the rows packed into one, no padding: ``input_ids``, ``position_ids``
    (restarting at 0 for each row) and ``labels`` ``[1, N]``, ``cu_seqlens`` ``[B·K + 1]`` int64 (row
    starts), and no ``attention_mask`` — Hugging Face models then keep the attention within each row
    (transformers finds the rows from ``position_ids``; flash-attention takes them as varlen). The
    mismatched rows likewise (``kl_position_ids``, ``kl_cu_seqlens``).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    fields: tuple = field(default=("probs", "weights", "ref_logps", "kl_ref_logps"))
    padding_free: bool = False

    def _pad(self, rows_ids, rows_labels, prefix=""):
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
        padded = {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": attention, f"{prefix}labels": labels}
        return pack_padded(padded, prefix) if self.padding_free else padded

    def __call__(self, groups):
        batch = self._pad([ids for g in groups for ids in g.input_ids], [lab for g in groups for lab in g.labels])
        batch["scores"] = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)
        if all(g.kl_input_ids is not None for g in groups):
            batch.update(self._pad([ids for g in groups for ids in g.kl_input_ids],
                                   [lab for g in groups for lab in g.kl_labels], prefix="kl_"))
        for name in self.fields:
            values = [getattr(g, name) for g in groups]
            if all(v is not None for v in values):
                batch[name] = torch.tensor([x for v in values for x in v], dtype=torch.float32)
        if all(g.group_id is not None for g in groups):
            batch["group_ids"] = torch.tensor([g.group_id for g in groups], dtype=torch.long)
        return batch


def pack_padded(batch: dict, prefix: str = "") -> dict:
    """A padded batch's ``{prefix}input_ids``, ``{prefix}attention_mask`` and ``{prefix}labels``
    ``[R, T]`` packed as :class:`PreferenceCollator` packs rows (``padding_free``): the tokens under
    the mask, row after row, in ``[1, N]`` with ``position_ids`` and ``cu_seqlens``. Other keys stay."""
    mask = batch[f"{prefix}attention_mask"].bool()
    lengths = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    positions = torch.arange(mask.sum(), device=mask.device) - torch.repeat_interleave(cu[:-1], lengths)
    packed = {k: v for k, v in batch.items() if k not in (f"{prefix}input_ids", f"{prefix}attention_mask",
                                                             f"{prefix}labels")}
    packed.update({f"{prefix}input_ids": batch[f"{prefix}input_ids"][mask].unsqueeze(0),
                   f"{prefix}position_ids": positions.unsqueeze(0),
                   f"{prefix}labels": batch[f"{prefix}labels"][mask].unsqueeze(0), f"{prefix}cu_seqlens": cu})
    return packed
