"""The distribution-shift demo: its generator's ground truth and a quick end-to-end run."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo needs the `weigh` extra")
pytest.importorskip("transformers", reason="the demo needs the `train` extra")

from robalign.app.data.toy import ToySettings, make_toy_data, reward_biased, reward_target  # noqa: E402


def test_generator_ground_truth():
    settings = ToySettings(n_train=2000, n_test=200, group_size=2, target_fraction=0.25, flip_rate=0.2, seed=1)
    train, test = make_toy_data(settings)
    human = [r for r in train if r["source"] == "human"]
    synthetic = [r for r in train if r["source"] == "synthetic"]
    assert abs(len(human) / len(train) - 0.25) < 0.03
    # target samples and the test set are ranked by r0
    for r in human + test:
        r0 = [reward_target(r["topic"], x) for x in r["responses"]]
        assert r0[0] >= r0[1]
    # synthetic samples: ranked by r1, except a flip_rate share whose order r1 disagrees with
    flipped = sum(reward_biased(r["topic"], r["responses"][0], 0.7) < reward_biased(r["topic"], r["responses"][1], 0.7)
                  for r in synthetic)
    assert abs(flipped / len(synthetic) - 0.2) < 0.03
    # r1 is partly at odds with r0: on synthetic pairs it disagrees with r0 far more than chance allows for a proxy
    disagree = sum((reward_target(r["topic"], r["responses"][0]) < reward_target(r["topic"], r["responses"][1]))
                   for r in synthetic) / len(synthetic)
    assert disagree > 0.4
    # the sources are distinguishable: different style words and lengths
    mean_len = lambda rs: sum(len(x.split()) for r in rs for x in r["responses"]) / (2 * len(rs))
    assert mean_len(synthetic) > mean_len(human) + 3


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "robalign", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| dora " in result.stdout and "DoRA vs DPO" in result.stdout
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["arms"]) == {"dpo", "iw_dpo", "dro_only", "dora", "dr_dpo", "dora_pl", "kl_ball", "chi2", "cvar",
                                     "group_dro"}
    for arm in summary["arms"].values():
        assert len(arm["target_pref_acc"]) == 1 and 0 <= arm["target_pref_acc_mean"] <= 1
        assert {"target_pref_acc_std", "target_reward_mean"} <= set(arm)
    assert summary["settings"]["seeds"] == 1 and min(summary["classifier"]["auc"]) > 0.9
    assert (out / "results.png").stat().st_size > 1000


def test_demo_bad_arguments():
    from robalign.app.commands.cli import main

    assert main(["demo", "--arms", "dpo,nope"]) == 2
    assert main(["demo", "--target-fraction", "1.5"]) == 2


def test_demo_is_deterministic_for_a_seed(tmp_path):
    from robalign.app.commands.demo import DemoSettings, run_demo

    def once(name):
        settings = DemoSettings(seeds=1, steps=5, sft_steps=5, n_train=120, n_test=40, arms=["dpo", "dora"],
                                out=str(tmp_path / name))
        return run_demo(settings, log=lambda *_: None)["arms"]

    first, second = once("a"), once("b")
    for arm in first:
        assert first[arm]["target_pref_acc"] == second[arm]["target_pref_acc"]
        assert first[arm]["target_reward"] == second[arm]["target_reward"]
