"""The dataset layouts TRL documents, read by `robalign weigh` and `robalign train`: standard
prompt/chosen/rejected, conversational (messages), implicit prompt (whole conversations), and a
saved Hugging Face dataset folder. The same sample in any layout must become the same tokens."""

import json

import pytest

from robalign.app.data import PreferenceDataset, tokenize_prompt
from robalign.app.ratio.data import DataError, read_preference_file
from robalign.app.toy import ToySettings, make_toy_data, toy_tokenizer

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
                                                     max_length=64, max_prompt_length=32)
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

    from robalign.app.config import TrainSettings
    from robalign.app.ratio.weigh import weigh_file
    from robalign.app.train import run_training

    data = write(tmp_path / "conv.jsonl", [layouts(r)["conversational"] for r in records])
    weighed = tmp_path / "weighed.jsonl"
    report = weigh_file(data, "human", weighed, features="tfidf", folds=3, progress=False, log=lambda *_: None)
    assert report["samples"] == len(records)
    rows = [json.loads(line) for line in weighed.read_text().splitlines()]
    assert isinstance(rows[0]["prompt"], list) and len(rows[0]["weights"]) == 2
    summary = run_training(TrainSettings(out=str(tmp_path / "run"), data=str(weighed), max_steps=2, batch_size=4,
                                         grad_accum=1, save_steps=100), log=lambda *_: None)
    assert summary["steps"] == 2
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    summary = run_training(TrainSettings(out=str(tmp_path / "run2"), data=str(tmp_path / "saved"), max_steps=2,
                                         batch_size=4, grad_accum=1, save_steps=100), log=lambda *_: None)
    assert summary["steps"] == 2 and summary["samples"] == len(records)
