"""Training on hostile input: stale and damaged caches, damaged checkpoints and model files,
a resume after a kill, the loss reported across a resume, and config values of the wrong kind —
each a one-line error naming the file or key (exit 2), or the right result."""

import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="training needs the `train` extra (transformers)")

from robalign.app.commands.cli import main  # noqa: E402
from robalign.app.commands.train import TrainSettings, embedded_model, load_settings, run_training  # noqa: E402

QUIET = lambda *_: None  # noqa: E731


def settings(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), max_steps=2, batch_size=4, grad_accum=1, logging_steps=1, save_steps=2,
                lr=5e-3, shuffle=False)
    base.update(kw)
    return TrainSettings(**base)


def cli(capsys, *args):
    code = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip()


# -- the reference log-prob cache -------------------------------------------------------------

def test_reference_cache_follows_the_weights_not_the_names(tmp_path):
    """Same out folder, same data, another seed of the embedded model: the first step's loss is
    log 2 (policy = reference) only if the cache was recomputed for the new weights."""
    first = run_training(settings(tmp_path, max_steps=1, seed=0), log=QUIET)
    assert first["reference_cache"] == "computed"
    assert first["first_log"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    again = run_training(settings(tmp_path, max_steps=1, seed=0), log=QUIET)
    assert again["reference_cache"].startswith("used ref_logps-")
    other = run_training(settings(tmp_path, max_steps=1, seed=1), log=QUIET)
    assert other["reference_cache"] == "computed"
    assert other["first_log"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reference_cache_sees_new_weights_in_the_same_model_folder(tmp_path):
    folder = tmp_path / "model"
    for seed in (0, 1):
        model, tokenizer = embedded_model(seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        summary = run_training(settings(tmp_path, max_steps=1, model=str(folder)), log=QUIET)
        assert summary["reference_cache"] == "computed"
        assert summary["first_log"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_damaged_reference_cache_is_rebuilt(tmp_path):
    run_training(settings(tmp_path, max_steps=1), log=QUIET)
    (cache,) = (tmp_path / "run").glob("ref_logps-*.pt")
    cache.write_bytes(os.urandom(300))
    summary = run_training(settings(tmp_path, max_steps=1), log=QUIET)
    assert summary["reference_cache"] == f"recomputed: {cache.name} was unreadable (UnpicklingError)" or \
        summary["reference_cache"].startswith(f"recomputed: {cache.name} was unreadable")
    assert summary["first_log"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# -- checkpoints and resume -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4, and the same run stopped at 2."""
    tmp = tmp_path_factory.mktemp("trained")
    full = run_training(settings(tmp, "full", max_steps=4), log=QUIET)
    run_training(settings(tmp, "half", max_steps=2), log=QUIET)
    return tmp, full


def test_train_loss_after_a_resume_covers_every_step(trained, tmp_path):
    tmp, full = trained
    half = tmp_path / "half"
    import shutil

    shutil.copytree(tmp / "half", half)
    resumed = run_training(settings(tmp_path, "half", max_steps=4, resume="latest"), log=QUIET)
    assert resumed["resumed_from"] == str(half / "checkpoint-2")
    assert resumed["steps"] == 4
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)


def test_resume_latest_skips_a_checkpoint_cut_off_while_written(trained, tmp_path, capsys):
    import shutil

    tmp, _ = trained
    out = tmp_path / "full"
    shutil.copytree(tmp / "full", out)
    (out / "checkpoint-6").mkdir()                                   # SIGKILL before anything was written
    partial = out / "checkpoint-5"
    shutil.copytree(out / "checkpoint-4", partial)
    (partial / "trainer_state.json").unlink()                        # killed before the state was saved
    logs = []
    summary = run_training(settings(tmp_path, "full", max_steps=5, resume="latest"), log=logs.append)
    assert summary["resumed_from"] == str(out / "checkpoint-4") and summary["steps"] == 5
    assert any("skipping checkpoint-6: " in line and "incomplete checkpoint" in line for line in logs)
    assert any("skipping checkpoint-5: " in line for line in logs)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "model.safetensors",
                                  "trainer_state.json"])
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_checkpoint_file_is_named(trained, tmp_path, capsys, name, damage):
    import shutil

    tmp, _ = trained
    folder = tmp_path / "ck"
    shutil.copytree(tmp / "full" / "checkpoint-2", folder)
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(os.urandom(len(data)) if damage == "random" else data[: len(data) // 2])
    code, err = cli(capsys, "--out", tmp_path / "o", "--max-steps", 4, "--batch-size", 4, "--resume", folder)
    assert code == 2 and "\n" not in err and err.startswith("robalign train: ") and str(path) in err, err


def test_truncated_model_weights_are_named(tmp_path, capsys):
    folder = tmp_path / "model"
    model, tokenizer = embedded_model(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    capsys.readouterr()
    code, err = cli(capsys, "--model", folder, "--out", tmp_path / "o")
    assert code == 2 and err.startswith(f"robalign train: {weights}: truncated") and "\n" not in err


# -- config values ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("lr: [1\n", r"c.yaml: not valid YAML at line 2"),
    ("batch_size: '8'\n", r"c.yaml: `batch_size` must be an integer >= 1, got '8'"),
    ("lr: fast\n", r"c.yaml: `lr` must be a finite number > 0, got 'fast'"),
    ("seed: abc\n", r"c.yaml: `seed` must be an integer >= 0, got 'abc'"),
    ("grad_accum: 0\n", r"c.yaml: `grad_accum` must be an integer >= 1, got 0"),
    ("objective_kwargs: {foo: 1}\n", r"c.yaml: `objective_kwargs`: unknown hyper-parameter `foo`"),
    ("objective_kwargs: [1]\n", r"c.yaml: `objective_kwargs` must be a mapping \(key: value\), got \[1\]"),
    ("objective_kwargs: {label_smoothing: 0.7}\n", r"c.yaml: `objective_kwargs`: `label_smoothing` must lie in"),
    ("use_weights: 'no'\n", r"c.yaml: `use_weights` must be true or false, got 'no'"),
    ("epochs: -1\n", r"c.yaml: `epochs` must be a finite number > 0, got -1"),
    ("max_steps: 0\n", r"c.yaml: `max_steps` must be -1 \(train for `epochs`\) or an integer >= 1, got 0"),
    ("lam: 0\n", r"c.yaml: `lam` must be a non-zero number"),
    ("max_length: 16\nmax_prompt_length: 32\n", r"`max_length` must be an integer above max_prompt_length \(32\)"),
    ("- a\n", r"c.yaml: a config must be a mapping"),
])
def test_config_values_of_the_wrong_kind(tmp_path, capsys, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_settings(cfg)
    code, err = cli(capsys, "--config", cfg, "--out", tmp_path / "o")
    assert code == 2 and "\n" not in err and err.startswith("robalign train: ")
    assert not (tmp_path / "o").exists()


def test_yaml_reads_exponent_floats():
    """YAML 1.1 (PyYAML) reads ``5e-4`` as a string; the config loader reads it as a number."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text("lr: 5e-4\nbeta: 1E-1\n")
        s = load_settings(cfg)
    assert s.lr == 5e-4 and s.beta == 0.1


def test_files_are_checked_before_the_model_loads(tmp_path, capsys):
    code, err = cli(capsys, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert code == 2 and err == f"robalign train: --data: no such file: {tmp_path / 'missing.jsonl'}"
    code, err = cli(capsys, "--out", tmp_path / "o", "--resume")
    assert code == 2 and err == f"robalign train: --resume: no checkpoint-N folder in {tmp_path / 'o'}"
    assert json.dumps(err)                                         # one line, printable


def test_one_configuration_for_the_trainer_and_the_command_line():
    """TrainSettings is a DoRAConfig (no copied fields), and both are checked by one function."""
    import dataclasses

    from robalign.app.training.config import DoRAConfig, check_settings

    assert issubclass(TrainSettings, DoRAConfig)
    names = [f.name for f in dataclasses.fields(TrainSettings)]
    assert len(names) == len(set(names)) and set(f.name for f in dataclasses.fields(DoRAConfig)) <= set(names)
    with pytest.raises(ValueError, match=r"DoRATrainer\(dora=...\): `lam` must be a non-zero number"):
        check_settings(DoRAConfig(lam=0), "DoRATrainer(dora=...)")
