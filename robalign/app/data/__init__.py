"""robalign.app.data — preference files to training batches, and the embedded toy data.

    preferences.py  JSONL groups → tokenised groups → group-major batches (PreferenceDataset,
                    PreferenceCollator, prepare_tokenizer, pack_padded)
    toy.py          the embedded default: a synthetic target/source shift with a known reward r0

The names of ``preferences`` are importable from here (``from robalign.app.data import
PreferenceCollator``, this package's path before the application was grouped into folders),
loaded on first use.
"""

import importlib

_PREFERENCES = ("TokenizedGroup", "PreferenceDataset", "PreferenceCollator", "prepare_tokenizer", "tokenize_prompt",
                "pack_padded")
__all__ = list(_PREFERENCES)


def __getattr__(name: str):
    if name in _PREFERENCES:
        return getattr(importlib.import_module(".preferences", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
