"""Reading preference files for the classifier stage, with errors that name file, line and field.

Two formats, one JSON object a line (README, "The classifier stage"):
    listwise   ``prompt`` (or ``query``), ``responses`` [K], ``scores`` [K], optional ``sources`` [K],
               ``probs`` [K]
    pairwise   ``prompt``, ``chosen``, ``rejected``, and ``chosen_source``/``rejected_source`` or one
               ``source`` for both
    unpaired   ``prompt``, ``completion``, ``label`` (true: desirable, false: undesirable), optional
               ``source`` and ``probs`` [1] — TRL's unpaired preference layout, what KTO trains on
    either     optional ``group`` (a string or an integer): the sample's group for group DRO; without
               it a sample's group is its responses' source (``a+b`` when they differ), see
               :func:`sample_group`

TRL's other dataset layouts are read too: **conversational** (``prompt`` a list of messages
``{"role", "content"}``, ``chosen``/``rejected`` lists of messages — the assistant's reply), the
**implicit prompt** (no ``prompt``: ``chosen`` and ``rejected`` are whole conversations; their
common leading messages are the prompt), and a **saved Hugging Face dataset** (a folder written by
``Dataset.save_to_disk``; its rows are numbered like lines). A prompt given as messages goes through
the tokenizer's chat template as it is; the classifier reads it as ``role: content`` lines.

Every line is checked as it is parsed (JSON, required fields, equal list lengths, finite
numbers), then the records become a :class:`datasets.Dataset` of one row per response.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "PreferenceFile", "read_preference_file", "sample_group"]


class DataError(ValueError):
    """Bad input: the message starts with ``file:line:`` and names the field."""


@dataclass
class PreferenceFile:
    """A parsed preference file.

    path, format ("listwise", "pairwise" or "unpaired"), records (the original JSON objects, in order),
    and ``responses``: a :class:`datasets.Dataset` with one row per candidate — ``sample``
    (index of the record), ``position`` (index in the record), ``text`` (prompt and response),
    ``source`` (or None). ``samples``: each record's prompt (a string, or the messages of a
    conversational record) and response texts, whatever layout the record had.
    """

    path: Path
    format: str
    records: list
    responses: object
    samples: list = None        # (prompt — a string or a list of messages —, [response texts]) per record


def _fail(path, line, message):
    raise DataError(f"{path}:{line}: {message}")


def _text(path, line, obj, field, *, required=True):
    value = obj.get(field)
    if value is None:
        if required:
            _fail(path, line, f"missing field `{field}`")
        return None
    if not isinstance(value, str):
        _fail(path, line, f"field `{field}` must be a string, got {type(value).__name__}")
    return value


def _numbers(path, line, obj, field, k, *, low=None, high=None):
    values = obj.get(field)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != k:
        _fail(path, line, f"field `{field}` must be a list of {k} numbers (one per response), got "
                          f"{len(values) if isinstance(values, list) else type(values).__name__}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(path, line, f"field `{field}` must hold finite numbers, got {v!r}")
        try:
            finite = math.isfinite(v)
        except OverflowError:                      # an integer too large for a float (JSON allows it)
            finite = False
        if not finite:
            shown = repr(v) if len(repr(v)) <= 24 else f"an integer of {len(str(v))} digits"
            _fail(path, line, f"field `{field}` must hold finite numbers, got {shown}")
        if (low is not None and v < low) or (high is not None and v > high):
            _fail(path, line, f"field `{field}` must lie in [{low}, {high}], got {v!r}")
    return [float(v) for v in values]


def _listwise(path, line, obj):
    prompt = obj.get("prompt", obj.get("query"))
    if prompt is None:
        _fail(path, line, "missing field `prompt` (or `query`)")
    if not isinstance(prompt, str):
        _fail(path, line, f"field `prompt` must be a string, got {type(prompt).__name__}")
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        _fail(path, line, "field `responses` must be a non-empty list of strings")
    k = len(responses)
    if obj.get("scores") is None:
        _fail(path, line, "missing field `scores`")
    _numbers(path, line, obj, "scores", k)
    _numbers(path, line, obj, "probs", k, low=0.0, high=1.0)
    sources = obj.get("sources")
    if sources is not None and (not isinstance(sources, list) or len(sources) != k
                                or not all(isinstance(s, str) for s in sources)):
        _fail(path, line, f"field `sources` must be a list of {k} strings (one per response)")
    return prompt, responses, sources


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def prompt_text(prompt) -> str:
    """A prompt as the classifier reads it: the string, or a conversation's ``role: content`` lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _conversation(path, line, obj):
    """``(prompt messages, [chosen text, rejected text])`` of a conversational pairwise record, with
    the prompt given or implicit (the common leading messages of ``chosen`` and ``rejected``)."""
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_messages(value):
            _fail(path, line, f"field `{field}` must be a string or a list of messages "
                              "({\"role\": ..., \"content\": ...}) like `prompt`")
    prompt = obj.get("prompt")
    if prompt is None:                                  # implicit prompt: the shared leading messages
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            _fail(path, line, "no `prompt`, and `chosen` and `rejected` share no leading message to take as one")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif not _is_messages(prompt):
        _fail(path, line, "field `prompt` must be a list of messages when `chosen` and `rejected` are")
    return prompt, ["\n".join(m["content"] for m in chosen), "\n".join(m["content"] for m in rejected)]


def _pairwise(path, line, obj):
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("prompt"), list):
        prompt, responses = _conversation(path, line, obj)
    else:
        prompt = _text(path, line, obj, "prompt")
        responses = [_text(path, line, obj, "chosen"), _text(path, line, obj, "rejected")]
    if "chosen_source" in obj or "rejected_source" in obj:
        sources = [_text(path, line, obj, "chosen_source"), _text(path, line, obj, "rejected_source")]
    elif "source" in obj:
        sources = [_text(path, line, obj, "source")] * 2
    else:
        sources = None
    _numbers(path, line, obj, "probs", 2, low=0.0, high=1.0)
    return prompt, responses, sources


def _unpaired(path, line, obj):
    """``(prompt, [completion text], sources)`` of an unpaired record; the label is checked here and
    read from the record (``label``) by the training data."""
    label = obj.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        _fail(path, line, f"field `label` must be true (desirable) or false (undesirable), got {label!r}")
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if _is_messages(prompt) or isinstance(completion, list):
        if not _is_messages(prompt):
            _fail(path, line, "field `prompt` must be a list of messages when `completion` is")
        if not _is_messages(completion):
            _fail(path, line, "field `completion` must be a string or a list of messages "
                              "({\"role\": ..., \"content\": ...}) like `prompt`")
        completion = "\n".join(m["content"] for m in completion)
    else:
        prompt = _text(path, line, obj, "prompt")
        completion = _text(path, line, obj, "completion")
    sources = [_text(path, line, obj, "source")] if "source" in obj else None
    _numbers(path, line, obj, "probs", 1, low=0.0, high=1.0)
    return prompt, [completion], sources


_READERS = {"listwise": _listwise, "pairwise": _pairwise, "unpaired": _unpaired}


def record_format(obj) -> str | None:
    """The format of one record by its fields: ``listwise`` (``responses``), ``pairwise``
    (``chosen``), ``unpaired`` (``completion`` and ``label``), or ``None``."""
    if "responses" in obj:
        return "listwise"
    if "chosen" in obj:
        return "pairwise"
    if "completion" in obj and "label" in obj:
        return "unpaired"
    return None


def read_preference_file(path, *, need_sources: bool = False) -> PreferenceFile:
    """Parse and check ``path``; the format is decided by the first record's fields.

    ``path``: a JSONL file, or a folder saved by ``datasets.Dataset.save_to_disk``. Raises
    :class:`DataError` (``file:line: message``; a saved dataset's rows count as lines) on the first
    bad record, or when the file holds no record, mixes formats, or (with ``need_sources``) lacks a
    source for a response.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records, rows, fmt, samples = [], [], None, []
    for line, obj in _objects(path):
        this = record_format(obj)
        if this is None:
            _fail(path, line, "expected a listwise record (`responses`), a pairwise one (`chosen`, `rejected`) or an "
                              "unpaired one (`completion`, `label`)")
        if fmt is None:
            fmt = this
        elif this != fmt:
            _fail(path, line, f"a {this} record in a {fmt} file")
        prompt, responses, sources = _READERS[fmt](path, line, obj)
        group = obj.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
            _fail(path, line, f"field `group` must be a string or an integer, got {type(group).__name__}")
        if need_sources and sources is None:
            field = {"listwise": "sources", "pairwise": "chosen_source`/`rejected_source` or `source",
                     "unpaired": "source"}[fmt]
            _fail(path, line, f"missing field `{field}` (the classifier needs each response's source)")
        for position, response in enumerate(responses):
            rows.append({"sample": len(records), "position": position, "line": line,
                         "text": f"{prompt_text(prompt)}\n\n{response}",
                         "source": None if sources is None else sources[position]})
        records.append(obj)
        samples.append((prompt, responses))
    if not records:
        raise DataError(f"{path}: the file holds no record")
    return PreferenceFile(path=path, format=fmt, records=records, responses=datasets.Dataset.from_list(rows),
                          samples=samples)


def _objects(path: Path):
    """``(line, record)`` of a JSONL file (blank lines skipped), or ``(row + 1, record)`` of a folder
    written by ``datasets.Dataset.save_to_disk``."""
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as err:  # not a saved dataset: say what the folder should be
            raise DataError(f"{path}: a folder must be a dataset saved with Dataset.save_to_disk "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataError(f"{path}: a saved DatasetDict needs a `train` split, it has {sorted(dataset)}")
            dataset = dataset["train"]
        for row, obj in enumerate(dataset, start=1):
            yield row, {k: v for k, v in obj.items() if v is not None}
        return
    with path.open("rb") as handle:
        for line, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                _fail(path, line, f"not valid UTF-8 (byte 0x{raw_bytes[err.start]:02x} at column {err.start + 1}); "
                                  "save the file as UTF-8")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                _fail(path, line, f"not valid JSON ({err.msg} at column {err.colno})")
            if not isinstance(obj, dict):
                _fail(path, line, "each line must be a JSON object")
            yield line, obj


def sample_group(record: dict) -> str | None:
    """The group of a checked record (for group DRO): its ``group`` field as a string; else the
    source of its responses (``sources``, ``chosen_source``/``rejected_source`` or ``source``),
    their sorted distinct names joined by ``+`` when they differ; else ``None``."""
    if record.get("group") is not None:
        return str(record["group"])
    sources = record.get("sources")
    if sources is None and ("chosen_source" in record or "rejected_source" in record):
        sources = [record["chosen_source"], record["rejected_source"]]
    if sources is None and "source" in record:
        sources = [record["source"]]
    return None if sources is None else "+".join(sorted(set(sources)))
