"""Cross-fitted, calibrated probabilities that a response comes from the target distribution.

Every response's probability comes from a model that did not train on it: responses are split
into K folds by group (the candidates of one prompt stay together, so a shared prompt cannot
leak, and so do samples with identical responses, :func:`content_groups`), a logistic regression is fitted on K − 1 folds and scores the held-out fold. Calibration
is cross-fitted too: fold k's scores are mapped by a calibrator fitted on the other folds'
out-of-fold scores.

    binary       target vs all synthetic sources:  p = P(target | z)
    multiclass   one class per source (softmax);   p = P(target | z), the target's class probability

Calibrators: ``temperature`` (p = σ(s/T), or softmax(s/T)), ``platt`` (a logistic regression
on the scores), ``isotonic`` (monotone, for the target-vs-rest probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CALIBRATIONS", "CrossFit", "content_groups", "cross_fit", "expected_calibration_error"]

CALIBRATIONS = ("temperature", "platt", "isotonic")


@dataclass
class CrossFit:
    """Out-of-fold calibrated ``probs`` [n] = P(target | response), the ``classes`` (target first),
    the responses' class ids ``y`` [n] (0 = target) and the raw out-of-fold ``scores``."""

    probs: np.ndarray
    classes: list
    y: np.ndarray
    scores: np.ndarray


def _softmax(s):
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def _as_logits(scores):
    """Binary decision scores [n] → two-class logits [n, 2] (target first)."""
    return scores if scores.ndim == 2 else np.stack([scores, np.zeros_like(scores)], axis=1)


class _Calibrator:
    """Maps out-of-fold scores to P(target); fitted on other folds' scores only."""

    def __init__(self, method: str):
        self.method = method

    def fit(self, scores, y):
        logits = _as_logits(scores)
        if self.method == "temperature":
            from scipy.optimize import minimize_scalar

            def nll(log_t):
                p = _softmax(logits / np.exp(log_t))
                return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()
            self.temperature = float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))
        elif self.method == "platt":
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=1e4, max_iter=1000).fit(logits, y == 0)
        else:
            from sklearn.isotonic import IsotonicRegression

            margin = logits[:, 0] - np.log(np.exp(logits[:, 1:]).sum(1))
            self.model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(margin, y == 0)
        return self

    def __call__(self, scores):
        logits = _as_logits(scores)
        if self.method == "temperature":
            return _softmax(logits / self.temperature)[:, 0]
        if self.method == "platt":
            return self.model.predict_proba(logits)[:, list(self.model.classes_).index(True)]
        margin = logits[:, 0] - np.log(np.exp(logits[:, 1:]).sum(1))
        return self.model.predict(margin)


def cross_fit(features, sources, target: str, groups, *, folds: int = 5, calibration: str = "temperature",
              multiclass: bool = False, seed: int = 0, C: float = 1.0) -> CrossFit:
    """Cross-fitted calibrated P(target | response) for every response.

    Args:
        features: ``[n, D]`` dense or sparse features. sources: ``[n]`` source names.
        target: the target source's name. groups: ``[n]`` group ids (folds never split a group), e.g.
            from :func:`content_groups`.
        folds: K ≥ 2. calibration: one of :data:`CALIBRATIONS`. multiclass: one class per source.

    Raises ValueError when a class is missing or there are fewer than two samples per fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; expected one of {', '.join(CALIBRATIONS)}")
    sources = np.asarray(sources)
    groups = np.asarray(groups)
    names = sorted(set(sources.tolist()) - {target})
    if target not in set(sources.tolist()):
        raise ValueError(f"no response has the target source {target!r}; sources found: {sorted(set(sources.tolist()))}")
    if not names:
        raise ValueError(f"every response has source {target!r}: the classifier needs a synthetic source too")
    classes = [target] + (names if multiclass else ["synthetic"])
    y = np.array([0 if s == target else (1 + names.index(s) if multiclass else 1) for s in sources])
    num_groups = len(np.unique(groups))
    if folds < 2 or num_groups < 2 * folds:
        raise ValueError(f"fewer than two samples per fold: {num_groups} samples for {folds} folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    split = list(splitter.split(np.zeros(len(y)), y, groups))
    width = len(classes) if multiclass else 1
    scores = np.zeros((len(y), width) if multiclass else len(y))
    for train, test in split:
        if len(np.unique(y[train])) < len(classes):
            raise ValueError("a training fold lacks a class: use fewer folds or more data per source")
        model = LogisticRegression(C=C, max_iter=2000).fit(features[train], y[train])
        if multiclass:
            logits = model.decision_function(features[test])
            # with two classes scikit-learn returns the logit of class 1 alone: [n], not [n, 2]
            scores[test] = logits if logits.ndim == 2 else np.stack([np.zeros_like(logits), logits], axis=1)
        else:
            # decision_function is the logit of class 1 (synthetic); the target's logit is its negative
            scores[test] = -model.decision_function(features[test])
    probs = np.zeros(len(y))
    for k, (_, test) in enumerate(split):
        others = np.concatenate([t for j, (_, t) in enumerate(split) if j != k])
        probs[test] = _Calibrator(calibration).fit(scores[others], y[others])(scores[test])
    return CrossFit(probs=np.clip(probs, 0.0, 1.0), classes=classes, y=y, scores=scores)


def content_groups(samples, texts) -> tuple[np.ndarray, int]:
    """Fold groups that keep identical content together: ``(group id per response, duplicates)``.

    Responses of one sample share a group (their prompt is shared), and so does every sample
    holding a response whose text (prompt and response) is identical to one in another sample,
    transitively (union-find). Folds split by these groups, so no response is scored by a model
    that trained on an identical copy of it. ``duplicates`` counts the responses whose text
    appeared earlier in the file.
    """
    samples = np.asarray(samples)
    parent = list(range(int(samples.max()) + 1 if len(samples) else 0))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen, duplicates = {}, 0
    for sample, text in zip(samples.tolist(), texts):
        if text in first_seen:
            duplicates += 1
            a, b = root(sample), root(first_seen[text])
            parent[max(a, b)] = min(a, b)
        else:
            first_seen[text] = sample
    return np.array([root(s) for s in samples.tolist()]), duplicates


def expected_calibration_error(probs, is_target, bins: int = 10) -> float:
    """Σ_b (n_b/n)·|mean(p in b) − fraction of targets in b| over equal-width bins of p."""
    probs = np.asarray(probs, dtype=float)
    is_target = np.asarray(is_target, dtype=float)
    index = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.mean() * abs(probs[sel].mean() - is_target[sel].mean())
    return float(total)
