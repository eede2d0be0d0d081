"""A new user's traps: settings that suit the user's model, weights that collapse, data the
tokenizer cannot read, and a short run that still reports where it began and ended."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("transformers", reason="training needs the `train` extra (transformers)")

from robalign.app.commands.cli import main  # noqa: E402
from robalign.app.training.config import EMBEDDED_DEFAULTS, MODEL_DEFAULTS, TrainSettings, resolve_defaults  # noqa: E402
from robalign.app.commands.train import embedded_model, run_training  # noqa: E402

QUIET = lambda *_: None  # noqa: E731


def test_defaults_follow_the_model():
    """The embedded default's toy settings are never applied to a user's model."""
    mine = resolve_defaults(TrainSettings(model="some/folder"))
    toy = resolve_defaults(TrainSettings())
    assert {k: getattr(mine, k) for k in MODEL_DEFAULTS} == MODEL_DEFAULTS
    assert {k: getattr(toy, k) for k in EMBEDDED_DEFAULTS} == EMBEDDED_DEFAULTS
    assert resolve_defaults(TrainSettings(model="m", lr=3e-6)).lr == 3e-6          # what the user says wins


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "learning rate (default 1e-06 for --model, 0.0005 for the embedded default)" in text
    assert "tokens per row, prompt included (default 1024 for --model, 64 for the embedded default)" in text


def test_a_run_prints_its_settings_and_logs_its_first_and_last_step(tmp_path):
    logs = []
    summary = run_training(TrainSettings(out=str(tmp_path / "o"), max_steps=3, logging_steps=50, save_steps=100),
                           log=logs.append)
    assert any(line.startswith("robalign: settings objective=dpo") and "lr=0.0005" in line for line in logs)
    assert summary["first_log"]["step"] == 1 and summary["last_log"]["step"] == 3
    assert math.isfinite(summary["first_log"]["loss"]) and math.isfinite(summary["last_log"]["loss"])


def test_data_the_embedded_tokenizer_cannot_read_is_refused(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Quelle est la capitale numéro {i} ?", "chosen": "Paris, évidemment.",
                                        "rejected": "Je ne sais vraiment pas."}) + "\n" for i in range(20)))
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "of its tokens are unknown to the embedded default's toy tokenizer" in err and "--model" in err


def test_a_model_whose_tokenizer_misses_words_gets_a_warning(tmp_path):
    folder = tmp_path / "model"
    model, tokenizer = embedded_model(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": "tell me about trees", "chosen": "tree leaf moss zyzzyva",
                                        "rejected": "thing stuff"}) + "\n" for _ in range(8)))
    logs = []
    run_training(TrainSettings(out=str(tmp_path / "o"), model=str(folder), data=str(data), max_steps=1,
                               batch_size=4, grad_accum=1, max_length=32, max_prompt_length=16, save_steps=100),
                 log=logs.append)
    assert any("WARNING" in line and "unknown token" in line for line in logs)


def test_weight_guards():
    from robalign.app.ratio.weigh import _ess_fraction, guard_weights

    samples = np.arange(10)
    raw = np.array([3.0, 3.0, 3.0] + [1e-73] * 7)                 # separable sources: 7 of 10 weigh nothing
    floored, gamma = guard_weights(raw, samples, floor=0.01, temper=1.0, target_ess=None)
    assert floored.min() == 0.01 and gamma == 1.0
    tempered, gamma = guard_weights(raw, samples, floor=0.0, temper=1.0, target_ess=0.5)
    assert 0 < gamma < 1 and _ess_fraction(tempered) >= 0.5 - 1e-6
    assert _ess_fraction(guard_weights(raw, samples, floor=0.0, temper=1.0, target_ess=None)[0]) < 0.31


def test_weigh_warns_when_the_weights_collapse(tmp_path, capsys):
    from test_ratio import write_dataset

    data = write_dataset(tmp_path / "mix.jsonl", n=200, alpha=0.3)      # separable sources
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(tmp_path / "w.jsonl"),
                 "--features", "tfidf", "--weight-floor", "0"])
    captured = capsys.readouterr()
    assert code == 0 and "WARNING: the weights' effective sample size is" in captured.err
    assert "--target-ess 0.5" in captured.err
    code = main(["weigh", str(data), "--target-source", "human", "--out", str(tmp_path / "g.jsonl"),
                 "--features", "tfidf", "--target-ess", "0.6"])
    captured = capsys.readouterr()
    assert code == 0 and "WARNING" not in captured.err
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    w = np.array([r["weight"] for r in rows])
    assert w.sum() ** 2 / (w ** 2).sum() / len(w) >= 0.59


@pytest.mark.parametrize("argv,message", [
    (["train", "--batchsize", "8"], "robalign train: unknown option --batchsize (did you mean --batch-size?)"),
    (["weigh", "d.jsonl", "--target-sorce", "human", "--out", "o.jsonl"],
     "robalign weigh: unknown option --target-sorce (did you mean --target-source?)"),
    (["train", "--frobnicate"], "robalign train: unknown option --frobnicate; `robalign train --help` lists them"),
    # no abbreviations: argparse took --max-step for --max-steps silently
    (["train", "--max-step", "1"], "robalign train: unknown option --max-step (did you mean --max-steps?)"),
    (["train", "--lr-rate", "1e-5"], "robalign train: unknown option --lr-rate (did you mean --lr?)"),
    (["train", "--objective-args", "tau=1"],
     "robalign train: unknown option --objective-args (did you mean --objective-arg?)"),
])
def test_a_mistyped_option_names_the_subcommand_and_the_closest_option(capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_lora_merge_leaves_a_plain_model(tmp_path):
    pytest.importorskip("peft", reason="--lora needs peft")
    import torch
    from transformers import AutoModelForCausalLM

    logs = []
    run_training(TrainSettings(out=str(tmp_path / "o"), lora=True, merge=True, max_steps=2, save_steps=100, lr=1e-2),
                 log=logs.append)
    final = tmp_path / "o" / "final"
    assert not (final / "adapter_config.json").exists() and any("merged the LoRA adapter" in line for line in logs)
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"--merge merges a LoRA adapter: it needs --lora"):
        run_training(TrainSettings(out=str(tmp_path / "p"), merge=True, max_steps=1), log=QUIET)


def test_help_and_argument_errors_import_no_torch():
    """`robalign --help` and argument errors do not wait for torch (26 s on a cold disk)."""
    import subprocess
    import sys

    script = ("import sys; from robalign.app.commands.cli import build_parser, objective_names; build_parser(); "
              "assert 'torch' not in sys.modules, 'torch was imported'; print(','.join(objective_names()))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    import robalign

    assert out.stdout.strip() == ",".join(robalign.objectives.NAMES)     # the names read from the registry's source


def test_a_clone_seen_from_its_parent_folder_is_named(tmp_path):
    """From the folder that contains a clone named `robalign`, `python -m robalign` finds the
    clone's folder before the installed package; it says so in one line (exit 2)."""
    import subprocess
    import sys

    (tmp_path / "robalign" / "benchmarks").mkdir(parents=True)            # a clone: no __init__.py at its root
    out = subprocess.run([sys.executable, "-m", "robalign", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(f"robalign: the folder {tmp_path / 'robalign'} hides the installed package")


@pytest.mark.parametrize("argv", [["--objective-arg", "beta=0.3"], ["--config", "CONFIG"]])
def test_beta_given_as_an_objective_argument_is_a_clear_error(tmp_path, capsys, argv):
    """beta is a setting of its own; as an objective argument it reached DoRALoss twice (a
    TypeError traceback, exit 1, before)."""
    config = tmp_path / "run.yaml"
    config.write_text("objective_kwargs: {beta: 0.3}\n")
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    assert main(["train", "--out", str(tmp_path / "o"), "--max-steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "`beta` is a setting of its own: give it as --beta" in err


def _pairs(path, n=24, **fields):
    from robalign.app.data.toy import ToySettings, make_toy_data

    records, _ = make_toy_data(ToySettings(n_train=n, n_test=0, seed=1, target_fraction=1.0, flip_rate=0.0))
    lines = []
    for i, r in enumerate(records):
        extra = {k: (v(i) if callable(v) else v) for k, v in fields.items()}
        lines.append(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                 **{k: v for k, v in extra.items() if v is not None}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_without_weights_trains_unweighted_and_says_so(tmp_path):
    logs = []
    data = _pairs(tmp_path / "plain.jsonl")
    summary = run_training(TrainSettings(out=str(tmp_path / "o"), data=str(data), max_steps=1, save_steps=100),
                           log=logs.append)
    assert any("has no `weights` or `probs` field" in line and "training without DoRA weights" in line
               for line in logs)
    assert summary["settings"]["use_weights"] is False and summary["weighting"]["source"] is None


def test_weights_on_some_samples_only_are_refused(tmp_path):
    data = _pairs(tmp_path / "some.jsonl", weights=lambda i: [1.0, 1.0] if i % 2 else None)
    with pytest.raises(ValueError, match=r"12 of 24 samples have `weights` and the others do not \(sample 0 first\)"):
        run_training(TrainSettings(out=str(tmp_path / "o"), data=str(data), max_steps=1), log=QUIET)


def test_collapsed_weights_are_warned_about_and_all_zero_refused(tmp_path, capsys):
    logs = []
    data = _pairs(tmp_path / "collapsed.jsonl", weights=lambda i: [3.0, 3.0] if i < 4 else [0.0, 0.0])
    summary = run_training(TrainSettings(out=str(tmp_path / "o"), data=str(data), max_steps=1, save_steps=100),
                           log=logs.append)
    assert any(line.startswith("robalign: WARNING: DoRA weights: effective sample size 17% of 24 samples, 83% of "
                               "them at 0") for line in logs), logs
    assert summary["settings"]["use_weights"] is True and summary["weighting"]["zero_share"] == pytest.approx(20 / 24)
    zeros = _pairs(tmp_path / "zeros.jsonl", weights=[0.0, 0.0])
    assert main(["train", "--data", str(zeros), "--out", str(tmp_path / "z"), "--max-steps", "1"]) == 2
    assert "every sample's weight is 0" in capsys.readouterr().err


def test_a_step_whose_weights_are_all_zero_is_refused_unless_allowed(tmp_path):
    """The first optimizer step (16 samples: 8 × 2 micro-batches, unshuffled) has only zero weights:
    it would train on nothing — an error naming the setting that lets it pass (before: it trained,
    loss 0, without a word)."""
    data = _pairs(tmp_path / "front.jsonl", weights=lambda i: [0.0, 0.0] if i < 16 else [2.0, 2.0])
    settings = dict(data=str(data), max_steps=2, save_steps=100, shuffle=False, batch_size=8, grad_accum=2)
    with pytest.raises(ValueError, match=r"DoRATrainer: every sample of this optimizer step has DoRA weight 0.*"
                                         r"allow_zero_weight_steps"):
        run_training(TrainSettings(out=str(tmp_path / "o"), **settings), log=QUIET)
    summary = run_training(TrainSettings(out=str(tmp_path / "p"), allow_zero_weight_steps=True, **settings), log=QUIET)
    assert summary["settings"]["allow_zero_weight_steps"] is True


def test_warmup_ratio_and_max_grad_norm_reach_the_trainer(tmp_path, monkeypatch):
    """--warmup-ratio (the issue's list of expected flags): a linear warmup, then constant; and
    --max-grad-norm, the gradient clipping (TrainingArguments' default 1 unless given)."""
    import robalign.app.training.trainer as trainer

    seen = {}
    real = trainer.DoRATrainer

    def spy(*args, **kwargs):
        seen["args"] = kwargs["args"]
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, "DoRATrainer", spy)
    data = _pairs(tmp_path / "w.jsonl")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1",
                 "--warmup-ratio", "0.5"]) == 0
    args = seen["args"]
    assert getattr(args.lr_scheduler_type, "value", None) == "constant_with_warmup" and args.get_warmup_steps(10) == 5
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o2"), "--max-steps", "1",
                 "--warmup-ratio", "1"]) == 2
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o3"), "--max-steps", "1",
                 "--max-grad-norm", "0.25"]) == 0
    assert seen["args"].max_grad_norm == 0.25
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o4"), "--max-grad-norm", "-1"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such.jsonl"], "--data: no such file: /no/such.jsonl"),
    (["--model", "/no/such/model"], "model path not found: /no/such/model"),
    (["--data", "BAD"], "bad.jsonl:1: missing field `rejected`"),
    (["--eval-data", "BAD"], "bad.jsonl:1: missing field `rejected`"),
])
def test_files_are_checked_before_transformers_is_imported(tmp_path, argv, message):
    """A wrong path or a bad record is reported before transformers is imported or anything loaded
    (after ~15 s and ~35 s before: ~1.3 s now, the objective registry's torch import)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    argv = [str(bad) if a == "BAD" else a for a in argv]
    probe = ("import sys; from robalign.app.commands.cli import main; code = main(sys.argv[1:]); "
             "print(code, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, "train", "--out", str(tmp_path / "o"), *argv],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1].split() == ["2", "False"], result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]


def test_every_yaml_key_has_a_flag(monkeypatch):
    """Every setting of a YAML config is on the command line too (save_steps, optim, shuffle, ... were
    YAML-only), and reaches the run."""
    import dataclasses

    import robalign.app.commands.train as train
    from robalign.app.commands.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    dests = {a.dest for a in sub._actions}
    assert [f.name for f in dataclasses.fields(TrainSettings) if f.name not in dests] == []
    seen = {}
    monkeypatch.setattr(train, "run_training", lambda settings: seen.setdefault("s", settings) and None)
    with pytest.raises(TypeError):                   # the stand-in returns no summary: the settings are what counts
        main(["train", "--optim", "sgd", "--save-steps", "7", "--fsdp-config", '{"min_num_params": 10}', "--no-shuffle",
              "--no-token-stats", "--no-weights", "--no-fused", "--recompute", "--no-dro-exact"])
    s = seen["s"]
    assert (s.optim, s.save_steps, s.fsdp_config) == ("sgd", 7, {"min_num_params": 10})
    assert not any((s.shuffle, s.token_stats, s.use_weights, s.fused, s.one_pass, s.exact_dro))
