"""The classifier stage on hostile input: duplicated records, two-source multiclass, numbers and
bytes JSON allows but a float or UTF-8 does not, and output paths checked before any work."""

import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the classifier stage needs the `weigh` extra (scikit-learn)")

from robalign.app.commands.cli import main  # noqa: E402
from robalign.app.ratio import DataError, weigh_file  # noqa: E402
from test_ratio import write_dataset  # noqa: E402


def test_content_groups_join_samples_with_identical_responses():
    from robalign.app.ratio.classifier import content_groups

    samples = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    texts = ["p\n\na", "p\n\nb", "q\n\nc", "q\n\nd", "r\n\nb", "r\n\ne", "p\n\nb", "s\n\nf"]
    groups, duplicates = content_groups(samples, texts)
    assert duplicates == 1                                   # "p\n\nb" in samples 0 and 3
    assert groups[0] == groups[6] and len(set(groups.tolist())) == 3


def test_duplicated_lines_do_not_leak_across_folds(tmp_path):
    data = write_dataset(tmp_path / "mix.jsonl", n=200, alpha=0.4, separable=False)
    doubled = tmp_path / "doubled.jsonl"
    lines = data.read_text().splitlines()
    doubled.write_text("".join(line + "\n" + line + "\n" for line in lines))
    base = weigh_file(data, "human", tmp_path / "a.jsonl", features="tfidf", progress=False)
    twice = weigh_file(doubled, "human", tmp_path / "b.jsonl", features="tfidf", progress=False)
    assert base["duplicates"] == 0 and twice["duplicates"] == 2 * len(lines)
    assert twice["fold_groups"] == base["fold_groups"] == len(lines)
    # indistinguishable sources: a leak would let the copies score their twins (AUC → 1)
    assert base["auc"] < 0.7 and twice["auc"] < 0.7
    assert abs(twice["ess_fraction"] - base["ess_fraction"]) < 0.15


def test_multiclass_with_exactly_two_sources(tmp_path):
    data = write_dataset(tmp_path / "two.jsonl", n=200, alpha=0.4, sources=("gpt",))
    report = weigh_file(data, "human", tmp_path / "w.jsonl", features="tfidf", multiclass=True, progress=False)
    assert report["auc"] > 0.9
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert all(0 <= p <= 1 for r in rows for p in r["probs"])


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, ' + "9" * 400 + '], "sources": ["gpt", "gpt"]}',
     r"bad.jsonl:2: field `scores` must hold finite numbers, got an integer of 400 digits"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b", "source": "gpt"}',
     r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
])
def test_numbers_and_bytes_that_json_allows(tmp_path, line, match):
    listwise = isinstance(line, str)
    first = ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0], "sources": ["human", "gpt"]}' if listwise
             else '{"prompt": "p", "chosen": "a", "rejected": "b", "source": "human"}')
    data = tmp_path / "bad.jsonl"
    data.write_bytes(first.encode() + b"\n" + (line.encode() if listwise else line) + b"\n")
    with pytest.raises(DataError, match=match):
        weigh_file(data, "human", tmp_path / "out.jsonl", features="tfidf", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    data = write_dataset(tmp_path / "mix.jsonl", n=60)
    out = tmp_path / "w.jsonl"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(out), "--features", "tfidf",
                 "--report", str(a_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"robalign weigh: --report {a_file} is a file; give a folder for weigh_report.json and .png"
    assert not out.exists() and a_file.read_text() == "mine"
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(tmp_path), "--features", "tfidf"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"robalign weigh: --out {tmp_path} is a folder; give a file path"
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(a_file / "w.jsonl"),
                 "--features", "tfidf"])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(out), "--folds", "1"])
    assert code == 2 and "--folds must be an int >= 2, got 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.jsonl", "notes.txt"]
