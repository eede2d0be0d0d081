"""The distribution-shift demo and its generation study: the generator's ground truth, the sample
judge's self-consistency, and quick end-to-end runs."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo needs the `weigh` extra")
pytest.importorskip("transformers", reason="the demo needs the `train` extra")

from robalign.app.data.toy import (ToySettings, make_toy_data, reward_biased, reward_target,  # noqa: E402
                                   topic_share)


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
        assert 0 <= arm["win_rate_mean"] <= 1 and arm["kl_mean"] > -0.5        # an estimate: ≥ 0 in expectation
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


def test_topic_share():
    assert topic_share(["ocean", "kitchen"], ["wave salt thing", "salt bread wave"]) == pytest.approx(4 / 5)
    assert topic_share(["ocean"], ["thing stuff"]) == 0.0                       # no topic word at all
    _, test = make_toy_data(ToySettings(n_train=10, n_test=50, seed=2))
    assert topic_share([r["topic"] for r in test], [r["responses"][0] for r in test]) == 1.0
    with pytest.raises(ValueError, match="2 topics for 1"):
        topic_share(["ocean", "city"], ["wave"])


def test_the_sample_judge_judges_the_sft_model_as_itself(tmp_path):
    """The SFT model against itself with the SFT samples' own stream: the same samples, so every
    prompt's win rate is ½ exactly and the sampled KL is 0 (two float32 forwards of one row)."""
    import torch

    from robalign.app.commands.experiment import SampleJudge, prepare_seed

    prepared = prepare_seed(0, ToySettings(n_train=80, n_test=20, group_size=4, seed=0), tmp_path, features="tfidf",
                            sft_steps=5, log=lambda *_: None)
    judge = SampleJudge(prepared, n_prompts=6, n_samples=3, max_new_tokens=10)
    same = judge(prepared.sft, stream=-1)
    assert same["win"] == [0.5] * 6 and max(map(abs, same["kl"])) < 1e-4
    assert same["reward"] == pytest.approx(judge.sft_rewards.mean(1).tolist(), abs=1e-12)
    other = judge(prepared.sft, stream=5)                                    # fresh samples of the same model
    assert other["reward"] != same["reward"] and abs(sum(other["kl"]) / 6) < 1e-4
    assert 0.0 <= other["stats"]["end_rate"] <= 1.0 and len(judge(prepared.sft, 5, greedy=True)["reward"]) == 6
    with pytest.raises(ValueError, match="21 prompts asked"):
        SampleJudge(prepared, n_prompts=21, n_samples=1, max_new_tokens=4)
    assert torch.equal(judge.sft_rewards, SampleJudge(prepared, n_prompts=6, n_samples=3, max_new_tokens=10).sft_rewards)


def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "-m", "robalign", "demo", "--study", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    study = json.loads((out / "study.json").read_text())
    assert study["settings"]["seeds"] == 1 and set(study["shifts"]) == {"0.25"}
    assert {"torch", "transformers", "commit", "machine"} <= set(study["versions"])
    summary = study["shifts"]["0.25"]["summary"]
    assert set(summary["arms"]) == {"dpo", "iw_dpo", "dora"}
    assert set(summary["pairs"]) == {"dora - dpo", "dora - iw_dpo", "iw_dpo - dpo"}
    for arm in summary["arms"].values():
        assert arm["frontier"]["steps"] == [0, 10, 20] and arm["frontier"]["kl"][0] == 0.0
        for key in ("final_reward", "final_win", "final_kl", "budget_reward", "budget_win", "greedy_reward"):
            mean, low, high = arm[key]
            assert low <= mean <= high, (key, arm[key])
        assert 0 <= arm["final_win"][0] <= 1 and arm["budget_steps"][0] in (0, 10, 20)
    per_seed = study["shifts"]["0.25"]["per_seed"][0]
    assert len(per_seed["arms"]["dora"]["per_prompt"]["20"]["reward"]) == 16
    text = (out / "study.md").read_text()
    assert "| dora - dpo |" in text and "training responses" in text and "| dora |" in result.stdout
    assert (out / "study.png").stat().st_size > 1000


def test_the_study_checks_its_settings():
    from robalign.app.commands.cli import main
    from robalign.app.commands.study import StudySettings, _within_budget

    with pytest.raises(ValueError, match="eval_every"):
        StudySettings(steps=5, eval_every=10).check()
    with pytest.raises(ValueError, match="n_prompts"):
        StudySettings(n_prompts=500).check()
    with pytest.raises(ValueError, match="unknown arms"):
        StudySettings(arms=["dpo", "nope"]).check()
    assert main(["demo", "--study", "--steps", "5"]) == 2
    assert main(["demo", "--study", "--target-fraction", "0"]) == 2
    curve = {"steps": [0, 10, 20, 30], "curve": {"kl": [0.0, 4.0, 6.0, 4.5]}}
    assert _within_budget(curve, 5.0) == 30 and _within_budget(curve, 4.2) == 10 and _within_budget(curve, 1.0) == 0
