"""``robalign weigh``: a raw mixed-source preference file → the same file with ``probs`` and
``weights``, a JSON calibration report and a PNG (reliability diagram, weight histogram).

The mixture fractions are estimated from the data: α = n_target / n (responses), β_k = n_k / n,
``class_ratio = n_target / n_synthetic`` of the classifier's training set; each response's
weight is ``dora_weights(p, α, 1 − α, class_ratio)`` (= p/α with these estimates, in [0, 1/α]) and a
sample's weight is the mean over its candidates. ``alpha`` overrides the estimate. Outputs are
written to a temporary file and renamed, so a failure leaves no partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..._io import write_atomic
from .classifier import CALIBRATIONS, content_groups, cross_fit, expected_calibration_error
from .data import read_preference_file
from .features import FEATURES, embed, load_array, tfidf

__all__ = ["weigh_file"]


def _features(kind, texts, encoder, feature_array, progress):
    if kind == "minilm":
        return embed(texts, encoder, progress=progress)
    if kind == "tfidf":
        return tfidf(texts)
    return load_array(feature_array, len(texts))


def _plot(path: Path, probs, is_target, sample_weights, alpha):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    index = np.minimum((probs * 10).astype(int), 9)
    bins = [b for b in range(10) if (index == b).any()]
    means = [probs[index == b].mean() for b in bins]
    fracs = [is_target[index == b].mean() for b in bins]
    sizes = [int((index == b).sum()) for b in bins]
    left.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    left.plot(means, fracs, "-", color="tab:blue", alpha=0.5)
    left.scatter(means, fracs, s=[20 + 200 * n / max(sizes) for n in sizes], color="tab:blue",
                 label="classifier (cross-fitted); area ∝ responses")
    for x, y, n in zip(means, fracs, sizes):
        left.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7)
    left.set(xlabel="predicted P(target)", ylabel="fraction from target", title="Reliability",
             xlim=(-0.03, 1.05), ylim=(-0.03, 1.08))
    left.legend(loc="lower right", fontsize=8)
    right.hist(sample_weights, bins=30, color="tab:orange")
    right.axvline(1 / alpha, color="grey", linestyle="--", label=f"1/α = {1 / alpha:.2f}")
    right.set(xlabel="DoRA weight per sample", ylabel="samples", title="Weights")
    right.legend()
    fig.tight_layout()
    write_atomic(path, lambda h: fig.savefig(h, format="png", dpi=110))
    plt.close(fig)


def _writable_file(what: str, path: Path) -> None:
    """``path`` can be created or replaced as a file: not a folder, under a folder we may write."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {path}: no permission to write in {parent}")


def _check_arguments(data, out, report_dir, features, feature_array, folds, calibration, alpha, weight_floor=0.0,
                     temper=1.0, target_ess=None):
    """Every argument and output path, before any work (nothing is read, fitted or written yet)."""
    if Path(out).resolve() == Path(data).resolve():
        raise ValueError(f"--out {out} is the input file; write the weighted file elsewhere")
    _writable_file("--out", Path(out))
    if report_dir is not None:
        report_dir = Path(report_dir)
        if report_dir.exists() and not report_dir.is_dir():
            raise ValueError(f"--report {report_dir} is a file; give a folder for weigh_report.json and .png")
        for name in ("weigh_report.json", "weigh_report.png"):
            _writable_file("--report", report_dir / name)
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; expected one of {', '.join(FEATURES)}")
    if features == "array" and feature_array is None:
        raise ValueError("--features array needs --feature-array FILE.npy")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds must be an int >= 2, got {folds!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; expected one of {', '.join(CALIBRATIONS)}")
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"--alpha must lie in (0, 1], got {alpha}")
    if not 0 <= weight_floor < 1:
        raise ValueError(f"--weight-floor must lie in [0, 1), got {weight_floor}")
    if not 0 < temper <= 1:
        raise ValueError(f"--temper must lie in (0, 1], got {temper}")
    if target_ess is not None and not 0 < target_ess <= 1:
        raise ValueError(f"--target-ess must lie in (0, 1], got {target_ess}")


WEIGHT_FLOOR = 0.01       # default guard: no response weighs less than 1 % of an average one
WARN_ESS = 0.5            # warn when the weights' ESS falls below this fraction of the samples


def _ess_fraction(sample_weights) -> float:
    return float(sample_weights.sum() ** 2 / (sample_weights ** 2).sum() / len(sample_weights))


def guard_weights(weights, samples, *, floor: float, temper: float, target_ess: float | None):
    """The standard guards of importance weighting, on the per-response density ratios:

        w ← w^γ        tempering (γ = ``temper`` ∈ (0, 1]; with ``target_ess``, the largest γ whose
                        sample weights reach that effective-sample-size fraction, by bisection)
        w ← max(w, f)  a floor (``floor`` ≥ 0): no response is dropped entirely

    Returns ``(weights, γ used)``."""
    import numpy as np

    def apply(gamma):
        w = np.maximum(np.power(weights, gamma), floor)
        per_sample = np.zeros(samples.max() + 1)
        np.add.at(per_sample, samples, w)
        return w, per_sample / np.bincount(samples)

    gamma = temper
    if target_ess is not None and _ess_fraction(apply(gamma)[1]) < target_ess:
        low, high = 0.0, gamma                       # γ = 0 gives equal weights: ESS 100 %
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if _ess_fraction(apply(mid)[1]) >= target_ess else (low, mid)
        gamma = low
    return apply(gamma)[0], gamma


def weigh_file(data, target_source: str, out, *, features: str = "minilm", encoder=None, feature_array=None,
               folds: int = 5, calibration: str = "temperature", multiclass: bool = False, alpha: float | None = None,
               report_dir=None, seed: int = 0, progress: bool = True, weight_floor: float = WEIGHT_FLOOR,
               temper: float = 1.0, target_ess: float | None = None, log=print) -> dict:
    """Run the classifier stage on ``data`` and write ``out`` (and the report); returns the report.

    Folds keep identical content together (:func:`robalign.app.ratio.classifier.content_groups`); the
    report counts the duplicate responses found (``duplicates``). The weights pass the guards of
    :func:`guard_weights` (default: a floor of 1 % of an average weight, no tempering), and a
    warning with the fix is logged when their effective sample size falls below half the samples."""
    import torch

    from ...losses.weights import dora_weights

    _check_arguments(data, out, report_dir, features, feature_array, folds, calibration, alpha, weight_floor, temper,
                     target_ess)
    pref = read_preference_file(data, need_sources=True)
    rows = pref.responses
    sources = np.array(rows["source"])
    samples = np.array(rows["sample"])
    groups, duplicates = content_groups(samples, rows["text"])
    if target_source not in set(sources.tolist()):
        raise ValueError(f"{pref.path}: no response has source {target_source!r} (--target-source); "
                         f"sources found: {sorted(set(sources.tolist()))}")
    if len(set(sources.tolist())) < 2:
        raise ValueError(f"{pref.path}: the source field has one class only ({target_source!r}); "
                         "the classifier needs target and synthetic responses")
    feats = _features(features, rows["text"], encoder, feature_array, progress)
    fit = cross_fit(feats, sources, target_source, groups, folds=folds, calibration=calibration,
                    multiclass=multiclass, seed=seed)
    is_target = (fit.y == 0).astype(float)
    n_target = int(is_target.sum())
    counts = {s: int((sources == s).sum()) for s in sorted(set(sources.tolist()))}
    alpha_est = n_target / len(sources)
    alpha_used = alpha_est if alpha is None else float(alpha)
    class_ratio = n_target / (len(sources) - n_target)
    # with β = 1 − α, dora_weights gives p/α when class_ratio = α/(1 − α) (the estimates here)
    raw = dora_weights(torch.from_numpy(fit.probs), alpha_used, class_ratio=class_ratio).numpy()
    raw_samples = np.zeros(len(pref.records))
    np.add.at(raw_samples, samples, raw)
    raw_ess = _ess_fraction(raw_samples / np.bincount(samples))
    weights, gamma = guard_weights(raw, samples, floor=weight_floor, temper=temper, target_ess=target_ess)
    sample_weights = np.zeros(len(pref.records))
    np.add.at(sample_weights, samples, weights)
    sample_weights /= np.bincount(samples)
    if _ess_fraction(sample_weights) < WARN_ESS:
        log(f"robalign weigh: WARNING: the weights' effective sample size is {_ess_fraction(sample_weights):.0%} of "
            f"the samples (before the guards {raw_ess:.0%}): a few samples carry the training. The classifier "
            f"separates the sources sharply (many weights near {weight_floor:g}); to keep more of the data, raise "
            "--weight-floor (e.g. 0.1), temper with --temper 0.5, or ask for --target-ess 0.5")

    from sklearn.metrics import brier_score_loss, roc_auc_score

    report = {
        "data": str(pref.path), "format": pref.format, "samples": len(pref.records), "responses": len(sources),
        "target_source": target_source, "source_counts": counts, "duplicates": duplicates,
        "fold_groups": int(len(np.unique(groups))), "features": features, "folds": folds,
        "calibration": calibration, "multiclass": multiclass,
        "alpha": alpha_used, "alpha_estimated": alpha_est, "alpha_from_probs": float(fit.probs.mean()),
        "beta": {s: c / len(sources) for s, c in counts.items() if s != target_source},
        "class_ratio": class_ratio,
        "auc": float(roc_auc_score(is_target, fit.probs)), "brier": float(brier_score_loss(is_target, fit.probs)),
        "ece": expected_calibration_error(fit.probs, is_target),
        "weight_floor": weight_floor, "temper": gamma, "target_ess": target_ess, "ess_fraction_unguarded": raw_ess,
        "ess": float(sample_weights.sum() ** 2 / (sample_weights ** 2).sum()),
        "weight_min": float(sample_weights.min()), "weight_max": float(sample_weights.max()),
        "weight_mean": float(sample_weights.mean()),
    }
    report["ess_fraction"] = report["ess"] / len(pref.records)

    def write_records(handle):
        for i, record in enumerate(pref.records):
            sel = samples == i
            order = np.argsort(np.array(rows["position"])[sel])
            enriched = dict(record, probs=[round(float(p), 6) for p in fit.probs[sel][order]],
                            weights=[round(float(w), 6) for w in weights[sel][order]],
                            weight=round(float(sample_weights[i]), 6))
            handle.write((json.dumps(enriched, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(Path(out), write_records)
    if report_dir is not None:
        report_dir = Path(report_dir)
        write_atomic(report_dir / "weigh_report.json", lambda h: h.write(json.dumps(report, indent=2).encode()))
        _plot(report_dir / "weigh_report.png", fit.probs, is_target, sample_weights, alpha_used)
    return report
