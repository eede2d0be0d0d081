"""The dataset layouts TRL documents, read by `robalign weigh` and `robalign train`: standard
prompt/chosen/rejected, conversational (messages), implicit prompt (whole conversations), and a
saved Hugging Face dataset folder. The same sample in any layout must become the same tokens."""

import json

import pytest

from robalign.app.data.preferences import PreferenceDataset, tokenize_prompt
from robalign.app.ratio.data import DataError, read_preference_file
from robalign.app.data.toy import ToySettings, make_toy_data, toy_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


def layouts(record):
    """One pairwise toy record in each layout."""
    user = [{"role": "user", "content": record["prompt"]}]
    say = lambda text: [{"role": "assistant", "content": text}]                       # noqa: E731
    return {
        "standard": {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"],
                     "source": record["source"]},
        "conversational": {"prompt": user, "chosen": say(record["chosen"]), "rejected": say(record["rejected"]),
                           "source": record["source"]},
        "implicit": {"chosen": user + say(record["chosen"]), "rejected": user + say(record["rejected"]),
                     "source": record["source"]},
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def records():
    return make_toy_data(ToySettings(n_train=40, n_test=0, seed=4, target_fraction=0.5))[0]


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["no-template", "chat-template"])
def test_every_layout_gives_the_same_tokens(tmp_path, records, template):
    from datasets import Dataset

    tokenizer = toy_tokenizer()
    tokenizer.chat_template = template
    datasets = {}
    for name in ("standard", "conversational", "implicit"):
        rows = [layouts(r)[name] for r in records]
        datasets[name] = PreferenceDataset.from_file(write(tmp_path / f"{name}.jsonl", rows), tokenizer,
                                                     max_length=64, max_prompt_length=32, chat_as_text=True)
    Dataset.from_list([layouts(r)["standard"] for r in records]).save_to_disk(str(tmp_path / "saved"))
    datasets["saved"] = PreferenceDataset.from_file(tmp_path / "saved", tokenizer, max_length=64, max_prompt_length=32)
    want = [(g.input_ids, g.labels) for g in datasets["standard"].groups]
    if template is None:                          # no template: a conversation reads as `role: content` lines
        want_conv = [(g.input_ids, g.labels) for g in datasets["conversational"].groups]
        assert want_conv != want
        assert [(g.input_ids, g.labels) for g in datasets["implicit"].groups] == want_conv
    else:                                         # the template gives one user turn either way
        for name in ("conversational", "implicit"):
            assert [(g.input_ids, g.labels) for g in datasets[name].groups] == want, name
        assert tokenize_prompt(tokenizer, records[0]["prompt"]) == tokenize_prompt(
            tokenizer, [{"role": "user", "content": records[0]["prompt"]}])
    assert [(g.input_ids, g.labels) for g in datasets["saved"].groups] == want
    assert datasets["saved"].group_names == ("human", "synthetic")


def test_bad_layouts_name_the_line(tmp_path):
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "no `prompt`, and `chosen` and `rejected` share no leading message"),
        ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "field `prompt` must be a list of messages when `chosen` and `rejected` are"),
        ({"prompt": user, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "field `chosen` must be a string or a list of messages"),
    ]
    for record, message in cases:
        with pytest.raises(DataError, match=r"d.jsonl:2: " + message.replace("(", r"\(").replace(")", r"\)")):
            read_preference_file(write(tmp_path / "d.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record]))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="a folder must be a dataset saved with Dataset.save_to_disk"):
        read_preference_file(tmp_path / "folder")


@pytest.mark.slow
def test_weigh_and_train_read_conversational_data_and_a_saved_folder(tmp_path, records):
    """`robalign weigh` on conversational records keeps their layout and adds the weights;
    `robalign train` trains on the weighed file and on a saved dataset folder."""
    from datasets import Dataset

    from robalign.app.training.config import TrainSettings
    from robalign.app.ratio.weigh import weigh_file
    from robalign.app.commands.train import run_training

    data = write(tmp_path / "conv.jsonl", [layouts(r)["conversational"] for r in records])
    weighed = tmp_path / "weighed.jsonl"
    report = weigh_file(data, "human", weighed, features="tfidf", folds=3, progress=False, log=lambda *_: None)
    assert report["samples"] == len(records)
    rows = [json.loads(line) for line in weighed.read_text().splitlines()]
    assert isinstance(rows[0]["prompt"], list) and len(rows[0]["weights"]) == 2
    with pytest.raises(ValueError, match=r"record 1 is a conversation and the tokenizer has no chat template: .*"
                                         r"--chat-as-text"):
        run_training(TrainSettings(out=str(tmp_path / "refused"), data=str(weighed), max_steps=2), log=lambda *_: None)
    summary = run_training(TrainSettings(out=str(tmp_path / "run"), data=str(weighed), max_steps=2, batch_size=4,
                                         grad_accum=1, save_steps=100, chat_as_text=True), log=lambda *_: None)
    assert summary["steps"] == 2
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    summary = run_training(TrainSettings(out=str(tmp_path / "run2"), data=str(tmp_path / "saved"), max_steps=2,
                                         batch_size=4, grad_accum=1, save_steps=100, chat_as_text=True),
                           log=lambda *_: None)
    assert summary["steps"] == 2 and summary["samples"] == len(records)


# -- unpaired data (KTO) ------------------------------------------------------------------------
def unpaired_rows(records, conversational=False):
    """Each toy record as one unpaired sample: its chosen response (desirable) on even rows, its
    rejected one (undesirable) on odd rows."""
    rows = []
    for i, r in enumerate(records):
        completion = r["chosen"] if i % 2 == 0 else r["rejected"]
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                         "completion": [{"role": "assistant", "content": completion}], "label": i % 2 == 0,
                         "source": r["source"]})
        else:
            rows.append({"prompt": r["prompt"], "completion": completion, "label": i % 2 == 0, "source": r["source"]})
    return rows


def test_unpaired_files_give_one_labelled_row_and_its_mismatched_row(tmp_path, records):
    """A sample of an unpaired file is one row labelled 1/0 in `scores`; with `kl_rows` its
    mismatched row is its own prompt with the previous sample's completion (the first: the last's).
    A pairwise file unpairs into every chosen response (label 1), then every rejected one (0)."""
    tok = toy_tokenizer()
    path = write(tmp_path / "u.jsonl", unpaired_rows(records[:6]))
    data = PreferenceDataset.from_file(path, tok, max_length=64, max_prompt_length=16, unpaired=True, kl_rows=True)
    assert data.group_size == 1 and len(data) == 6 and data.unpaired
    assert [g.scores for g in data.groups] == [[1.0], [0.0]] * 3
    for i, g in enumerate(data.groups):
        prompt = [t for t, lab in zip(g.input_ids[0], g.labels[0]) if lab == -100]
        before = data.groups[i - 1]
        completion = [lab for lab in before.labels[0] if lab != -100]
        assert g.kl_input_ids == [prompt + completion] and g.kl_labels == [[-100] * len(prompt) + completion]
    pairs = write(tmp_path / "p.jsonl", [layouts(r)["standard"] for r in records[:3]])
    unpaired = PreferenceDataset.from_file(pairs, tok, max_length=64, max_prompt_length=16, unpaired=True)
    paired = PreferenceDataset.from_file(pairs, tok, max_length=64, max_prompt_length=16)
    assert [g.scores for g in unpaired.groups] == [[1.0]] * 3 + [[0.0]] * 3
    assert [g.input_ids[0] for g in unpaired.groups] == ([g.input_ids[0] for g in paired.groups]
                                                         + [g.input_ids[1] for g in paired.groups])
    assert unpaired.groups[0].kl_input_ids is None
    conversational = write(tmp_path / "c.jsonl", unpaired_rows(records[:6], conversational=True))
    assert read_preference_file(conversational).samples[1][1] == [records[1]["rejected"]]


def test_unpaired_data_errors_name_the_line_and_the_objective(tmp_path, records):
    tok = toy_tokenizer()
    rows = unpaired_rows(records[:3])
    rows[1]["label"] = "yes"
    with pytest.raises(DataError, match=r"u\.jsonl:2: field `label` must be true \(desirable\) or false"):
        read_preference_file(write(tmp_path / "u.jsonl", rows))
    good = write(tmp_path / "g.jsonl", unpaired_rows(records[:3]))
    with pytest.raises(ValueError, match="unpaired data .* trains an unpaired objective: kto"):
        PreferenceDataset.from_file(good, tok, max_length=64, max_prompt_length=16)
    listwise = write(tmp_path / "l.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]}])
    with pytest.raises(ValueError, match="not listwise"):
        PreferenceDataset.from_file(listwise, tok, max_length=64, max_prompt_length=16, unpaired=True)
    one = write(tmp_path / "one.jsonl", unpaired_rows(records[:1]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        PreferenceDataset.from_file(one, tok, max_length=64, max_prompt_length=16, unpaired=True, kl_rows=True)


def test_robalign_train_runs_kto_on_weighed_unpaired_data(tmp_path, records):
    """`robalign weigh` reads an unpaired file (one response per sample); `robalign train
    --objective kto` trains on it: the first loss is KTO's at the reference (each completion ½·λ),
    z0 is logged as `kl`, the reference log-probs of the mismatched rows are cached with the others
    (a second run reads them), and the one-pass and recompute paths agree."""
    from robalign.app.training.config import TrainSettings
    from robalign.app.ratio.weigh import weigh_file
    from robalign.app.commands.train import run_training

    data = write(tmp_path / "u.jsonl", unpaired_rows(records))
    weighed = tmp_path / "w.jsonl"
    report = weigh_file(data, "human", weighed, features="tfidf", folds=3, progress=False, log=lambda *_: None)
    assert report["format"] == "unpaired" and report["responses"] == len(records)
    settings = dict(out=str(tmp_path / "run"), data=str(data), objective="kto", lam=float("inf"), max_steps=2,
                    batch_size=8, grad_accum=1, save_steps=100, logging_steps=1, shuffle=False,
                    objective_kwargs={"desirable_weight": 1.5})
    summary = run_training(TrainSettings(**settings), log=lambda *_: None)
    first = summary["first_log"]
    labels = [i % 2 == 0 for i in range(8)]
    assert first["loss"] == pytest.approx(sum(1.5 if d else 1.0 for d in labels) / 2 / 8, rel=1e-6)
    assert "kl" in summary["last_log"] and summary["reference_cache"] == "computed"
    again = run_training(TrainSettings(**dict(settings, one_pass=False)), log=lambda *_: None)
    assert again["reference_cache"].startswith("used ")
    assert again["last_log"]["loss"] == pytest.approx(summary["last_log"]["loss"], rel=1e-5)   # float32 paths
    weighted = run_training(TrainSettings(**dict(settings, data=str(weighed), out=str(tmp_path / "w"), lam=1.0)),
                            log=lambda *_: None)
    assert weighted["first_log"]["weights/max"] > weighted["first_log"]["weights/mean"]
