"""Every alignment setting reaches the loss through every builder: ``DoRAConfig.build_loss`` (the
one place a loss is built from settings), ``DoRATrainer``, the TRL drop-ins (their own argument
names, and ``reduction=``) and the demo's arms. Before ``build_loss``, the loss was built in three
places: the TRL drop-in rebuilt it when given a ``reduction`` and dropped LD-DPO's α and WPO
without a word.

Each setting of :class:`DoRAConfig` is either read by the loss (``LOSS``: where it lands) or by the
trainer around it (``TRAINER``); a new field fails ``test_every_setting_is_accounted_for`` until it
is placed in one of them and so checked below.
"""

import dataclasses
import json
import math

import pytest

from robalign.app.training.config import DoRAConfig
from robalign.losses.reductions import CVaR, Chi2Ball, GroupDRO, KLBall, KLDRO

#: setting -> (a value other than the default, how to read it back from a DoRALoss)
LOSS = {
    "objective": ("ipo", lambda loss: loss.objective.removesuffix("/mean")),
    "beta": (0.37, lambda loss: loss.hparams["beta"]),
    "lam": (2.5, lambda loss: loss.reduction.lam),
    "alpha": (0.3, lambda loss: loss.alpha),
    "ld_alpha": (0.4, lambda loss: loss.ld_alpha),
    "wpo": (True, lambda loss: loss.wpo),
    "one_pass": (False, lambda loss: loss.one_pass),
    "reference_free": (True, lambda loss: loss.reference_free),
    "average_logps": (True, lambda loss: loss.average_logps and loss.objective.endswith("/mean")),
    "objective_kwargs": ({"label_smoothing": 0.2}, lambda loss: {"label_smoothing": loss.hparams["label_smoothing"]}),
}
#: the ambiguity set and its parameters: (settings, the reduction they must give)
SETS = [
    (dict(dro="kl", lam=-3.0), KLDRO(-3.0)),
    (dict(dro="kl-ball", eta=0.7), KLBall(0.7)),
    (dict(dro="chi2", rho=0.9), Chi2Ball(0.9)),
    (dict(dro="cvar", level=0.35), CVaR(0.35)),
]
#: read by the trainer, not the loss
TRAINER = {"use_weights", "exact_dro", "fused", "shuffle", "padding_free", "token_stats", "allow_zero_weight_steps"}
SET_FIELDS = {"dro", "eta", "rho", "level", "group_step"}


def test_every_setting_is_accounted_for():
    names = {f.name for f in dataclasses.fields(DoRAConfig)}
    assert names == set(LOSS) | TRAINER | SET_FIELDS, names ^ (set(LOSS) | TRAINER | SET_FIELDS)


def _check(loss, **settings):
    """Each loss setting of ``settings`` as ``loss`` holds it (λ where the reduction is KL-DRO's)."""
    for name, value in settings.items():
        if name == "lam" and not isinstance(loss.reduction, KLDRO):
            continue
        if name in LOSS:
            assert LOSS[name][1](loss) == value, name


@pytest.mark.parametrize("name", sorted(LOSS))
def test_build_loss_carries_each_setting(name):
    value = LOSS[name][0]
    settings = {name: value}
    if name == "objective_kwargs":
        settings["objective"] = "dpo"                       # an objective with label smoothing
    if name in ("reference_free", "average_logps"):
        settings["objective"] = "dpo"
    _check(DoRAConfig(**settings).build_loss(), **settings)


@pytest.mark.parametrize("settings,reduction", SETS, ids=[s["dro"] for s, _ in SETS])
def test_build_loss_carries_the_ambiguity_set(settings, reduction):
    assert DoRAConfig(**settings).build_loss().reduction == reduction
    groups = DoRAConfig(dro="group", group_step=0.25).build_loss(group_names=("a", "b")).reduction
    assert isinstance(groups, GroupDRO) and (groups.step_size, groups.names) == (0.25, ("a", "b"))
    with pytest.raises(ValueError, match="dro=group: every sample of my.jsonl needs a group"):
        DoRAConfig(dro="group").build_loss(data="my.jsonl")


ALL = dict(objective="dpo", beta=0.37, lam=2.5, alpha=0.3, ld_alpha=0.4, wpo=True, one_pass=False,
           objective_kwargs={"label_smoothing": 0.2})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from robalign.app.data.preferences import PreferenceDataset
    from robalign.app.commands.train import embedded_model

    model, tokenizer = embedded_model(seed=0)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    records = [{"prompt": f"p{i}", "chosen": "tree leaf moss", "rejected": "thing stuff", "source": "ab"[i % 2],
                "weight": 1.0 + i} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return model, tokenizer, PreferenceDataset.from_file(str(path), tokenizer, max_length=24, max_prompt_length=8)


def test_the_trainer_builds_the_settings_loss(tiny, tmp_path):
    from transformers import TrainingArguments

    from robalign.app.training.trainer import DoRATrainer

    model, tokenizer, dataset = tiny
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = DoRATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          dora=DoRAConfig(**ALL))
    _check(trainer.loss_fn, **ALL)
    assert trainer.loss_fn.reduction == KLDRO(2.5)
    given = DoRATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        dora=DoRAConfig(**ALL), reduction=CVaR(0.3))
    _check(given.loss_fn, **ALL)
    assert given.loss_fn.reduction == CVaR(0.3)


@pytest.mark.parametrize("reduction", [None, CVaR(0.3)], ids=["settings", "given"])
def test_the_trl_drop_in_keeps_every_setting_with_a_reduction(tiny, tmp_path, reduction):
    """TRL's names: ``beta``, ``ld_alpha``, ``use_weighting`` (WPO), ``dora_lam``, ``loss_type``,
    ``label_smoothing``, ``dora_one_pass``; with ``reduction=`` LD-DPO's α and WPO were dropped."""
    pytest.importorskip("trl")
    from datasets import Dataset

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer

    model, tokenizer, _ = tiny
    rows = Dataset.from_list([{"prompt": f"p{i}", "chosen": "tree leaf", "rejected": "thing"} for i in range(4)])
    args = DoRADPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], beta=0.37, ld_alpha=0.4,
                         use_weighting=True, dora_lam=2.5, loss_type="sigmoid", label_smoothing=0.2,
                         dora_one_pass=False, gradient_checkpointing=False)
    import copy

    trainer = DoRADPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                             train_dataset=rows, processing_class=tokenizer, reduction=reduction)
    _check(trainer.loss_fn, **{k: v for k, v in ALL.items() if k != "alpha"})
    assert trainer.loss_fn.reduction == (reduction or KLDRO(2.5))


def test_the_demo_arms_build_their_losses_from_settings():
    from robalign.app.commands.experiment import ARMS, arm_settings

    for name, arm in ARMS.items():
        loss = arm_settings(arm, 0.2).build_loss(group_names=("a", "b"), group_size=3 if arm["listwise"] else 2)
        assert loss.objective == arm["objective"] and loss.hparams["beta"] == 0.2, name
        want = {"kl-ball": ("eta", KLBall), "chi2": ("rho", Chi2Ball), "cvar": ("level", CVaR),
                "group": ("step_size", GroupDRO)}.get(arm.get("dro", "kl"), ("lam", KLDRO))
        assert isinstance(loss.reduction, want[1]), name
        key = {"step_size": "group_step"}.get(want[0], want[0])
        assert getattr(loss.reduction, want[0]) == arm.get(key, 1.0 if key == "lam" else None) or \
            (key == "lam" and math.isinf(arm["lam"]) and math.isinf(loss.reduction.lam)), name
