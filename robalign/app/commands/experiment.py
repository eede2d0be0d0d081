"""The pipeline that ``robalign demo`` and its generation study share, one seed at a time.

    prepare_seed(seed, ...)        toy data → classifier weights (one file per weight variant) →
                                   SFT of the embedded model → reference log-probs
    train_arm(prepared, arm, ...)  a copy of the SFT model trained with one arm's loss, with an
                                   optional look at the model every few steps (checkpoints)
    SampleJudge                    the gold-reward evaluation of what a model writes on test prompts
                                   (r0 of samples at temperature 1, the win rate against the SFT
                                   model's samples, KL(π ‖ π_SFT) from the same samples)
    preference_accuracy(...)       the implicit reward's accuracy on held-out target pairs
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.preferences import PreferenceCollator, PreferenceDataset, prepare_tokenizer
from ..data.toy import ToySettings, make_toy_data, reward_target, topic_share, write_jsonl
from ..evaluation.samples import sample_prompts, score_responses, text_stats, win_rate
from ..training.causal_lm import one_pass_loss, policy_logps
from ..training.config import DoRAConfig

__all__ = ["ARMS", "DESCRIPTIONS", "WEIGHT_VARIANTS", "ExperimentSettings", "arm_settings", "weight_variants",
           "prepare_seed", "Prepared", "train_arm", "SampleJudge", "preference_accuracy"]

INF = float("inf")
#: each arm: its alignment settings (:class:`~robalign.app.training.config.DoRAConfig` fields; β is the
#: experiment's), whether it trains on the DoRA weights (and which variant of them, default
#: ``"default"``), and whether it reads whole candidate lists
ARMS = {
    "dpo": dict(objective="dpo", lam=INF, weighted=False, listwise=False),
    "iw_dpo": dict(objective="dpo", lam=INF, weighted=True, listwise=False),
    "dro_only": dict(objective="dpo", lam=1.0, weighted=False, listwise=False),
    "dora": dict(objective="dpo", lam=1.0, weighted=True, listwise=False),
    "dr_dpo": dict(objective="dpo", lam=-1.0, weighted=False, listwise=False),
    "dora_pl": dict(objective="plackett_luce", lam=1.0, weighted=True, listwise=True),
    # the other ambiguity sets, with the DoRA weights (robalign.losses.reductions)
    "kl_ball": dict(objective="dpo", dro="kl-ball", eta=0.5, weighted=True, listwise=False),
    "chi2": dict(objective="dpo", dro="chi2", rho=1.0, weighted=True, listwise=False),
    "cvar": dict(objective="dpo", dro="cvar", level=0.3, weighted=True, listwise=False),
    # the sources as known groups instead of a classifier's weights
    "group_dro": dict(objective="dpo", dro="group", group_step=0.5, weighted=False, listwise=False),
    # DoRA's remedies for sharp weights (the generation study's extra arms)
    "dora_lam3": dict(objective="dpo", lam=3.0, weighted=True, listwise=False),
    "dora_ess50": dict(objective="dpo", lam=1.0, weighted=True, weights="ess50", listwise=False),
    "dora_floor": dict(objective="dpo", lam=1.0, weighted=True, weights="floor20", listwise=False),
}
#: each arm in a few words, for tables and charts
DESCRIPTIONS = {
    "dpo": "DPO, λ = ∞, no weights",
    "iw_dpo": "importance-weighted DPO, λ = ∞",
    "dro_only": "KL-DRO, λ = 1, no weights",
    "dora": "DoRA: weights + KL-DRO, λ = 1",
    "dr_dpo": "Dr.DPO, λ = −1",
    "dora_pl": "listwise DoRA (Plackett–Luce, K = 4)",
    "kl_ball": "weights + KL ball, η = 0.5",
    "chi2": "weights + χ² ball, ρ = 1",
    "cvar": "weights + CVaR, worst 30 %",
    "group_dro": "group DRO over the sources, no weights",
    "dora_lam3": "DoRA, softer DRO, λ = 3",
    "dora_ess50": "DoRA, weights tempered to ESS 50 %",
    "dora_floor": "DoRA, weights floored at 20 % of the mean",
}
#: ``weigh_file`` options of each weight variant an arm may train on
WEIGHT_VARIANTS = {
    "default": {},
    "ess50": {"target_ess": 0.5},         # tempered until the weights' ESS is half the samples
    "floor20": {"weight_floor": 0.2},     # no response weighs less than 20 % of an average one
}
_NOT_LOSS_FIELDS = ("weighted", "weights", "listwise")


@dataclass
class ExperimentSettings:
    """What the demo and the study share: the shift's flip rate, the data's size, the classifier's
    features, SFT, the arms' training, and the sample judge's sizes (prompts, samples a prompt,
    tokens a sample)."""

    flip_rate: float = 0.2
    sft_steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    beta: float = 0.1
    n_train: int = 600
    n_test: int = 200
    features: str = "tfidf"
    n_prompts: int = 48
    n_samples: int = 4
    max_new_tokens: int = 24

    def toy(self, target_fraction: float, seed: int) -> ToySettings:
        """The toy data of one seed at ``target_fraction`` (groups of K = 4 candidates)."""
        return ToySettings(n_train=self.n_train, n_test=self.n_test, group_size=4, target_fraction=target_fraction,
                           flip_rate=self.flip_rate, seed=seed)


def weight_variants(arm_names) -> tuple:
    """The weight variants the arms train on, ``"default"`` first (the classifier report shown)."""
    return ("default", *sorted({ARMS[name].get("weights", "default") for name in arm_names} - {"default"}))


def arm_settings(arm: dict, beta: float) -> DoRAConfig:
    """An arm's alignment settings, from which its loss is built like the trainer's."""
    return DoRAConfig(beta=beta, use_weights=arm["weighted"],
                      **{k: v for k, v in arm.items() if k not in _NOT_LOSS_FIELDS})


def rows(dataset, indices, listwise):
    """Groups for the given samples: all K candidates (listwise) or the best and the worst."""
    groups = []
    for i in indices:
        g = dataset.groups[i]
        keep = range(len(g.input_ids)) if listwise else (0, len(g.input_ids) - 1)    # sorted best first
        weights = None if g.weights is None else [sum(g.weights) / len(g.weights)] * len(keep)
        groups.append(type(g)([g.input_ids[j] for j in keep], [g.labels[j] for j in keep],
                              [g.scores[j] for j in keep], weights=weights,
                              ref_logps=None if g.ref_logps is None else [g.ref_logps[j] for j in keep],
                              group_id=g.group_id))
    return groups


def sft(model, dataset, collate, steps, batch_size, lr, gen):
    """Supervised fine-tuning on every sample's top-ranked response (mean token NLL)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(dataset), (batch_size,), generator=gen).tolist()
        groups = [type(g)([g.input_ids[0]], [g.labels[0]], [g.scores[0]]) for g in (dataset.groups[i] for i in idx)]
        logps, counts = policy_logps(model, collate(groups))
        loss = -logps.sum() / counts.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def logps_of(model, groups, collate, batch=64):
    out = []
    for start in range(0, len(groups), batch):
        logps, _ = policy_logps(model, collate(groups[start:start + batch]))
        out.append(logps.float())
    return torch.cat(out)


@dataclass
class Prepared:
    """One seed's ingredients: the SFT model (also the reference), its tokenizer, the training set
    under each weight variant (reference log-probs attached), the test records and pairs."""

    seed: int
    sft: object
    tokenizer: object
    train_sets: dict
    reports: dict
    test: list
    test_pairs: list
    ref_test: torch.Tensor
    collate: PreferenceCollator
    train_records: list = field(default_factory=list)


def prepare_seed(seed: int, toy: ToySettings, workdir: Path, *, features: str, sft_steps: int,
                 variants=("default",), log=print) -> Prepared:
    """Data, classifier weights (one ``weigh_file`` run per weight variant), SFT and reference log-probs."""
    from ..ratio import weigh_file
    from .train import embedded_model

    train, test = make_toy_data(toy)
    train_file = write_jsonl(workdir / f"train-{seed}.jsonl", train, fields=("prompt", "responses", "scores", "sources"))
    log(f"seed {seed}: toy data ({toy.n_train} training, {toy.n_test} test samples), classifier ...")
    reports, files = {}, {}
    for variant in variants:
        files[variant] = workdir / f"train-{seed}-{variant}.jsonl"
        reports[variant] = weigh_file(train_file, "human", files[variant], features=features, progress=False,
                                      seed=seed, log=lambda *_: None, **WEIGHT_VARIANTS[variant])
    report = reports[variants[0]]
    log(f"seed {seed}: classifier AUC {report['auc']:.3f}, weights' ESS {report['ess_fraction']:.0%}; "
        f"SFT ({sft_steps} steps) and reference log-probs ...")
    test_file = write_jsonl(workdir / f"test-{seed}.jsonl", test, fields=("prompt", "responses", "scores"))

    model, tokenizer = embedded_model(seed)
    prepare_tokenizer(tokenizer, log=lambda *_: None)
    sets = {v: PreferenceDataset.from_file(f, tokenizer, max_length=48, max_prompt_length=16) for v, f in files.items()}
    test_set = PreferenceDataset.from_file(test_file, tokenizer, max_length=48, max_prompt_length=16)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    first = sets[variants[0]]
    sft(model, first, collate, sft_steps, 32, 3e-3, torch.Generator().manual_seed(seed))

    ref_train = logps_of(model, rows(first, range(len(first)), True), collate).reshape(len(first), -1)
    for dataset in sets.values():
        for g, r in zip(dataset.groups, ref_train):
            g.ref_logps = r.tolist()
    test_pairs = rows(test_set, range(len(test_set)), False)
    ref_test = logps_of(model, test_pairs, collate).reshape(-1, 2)
    return Prepared(seed, model, tokenizer, sets, reports, test, test_pairs, ref_test, collate, train)


def train_arm(prepared: Prepared, arm: dict, *, steps: int, batch_size: int, lr: float, beta: float,
              every: int | None = None, look=None):
    """A copy of the SFT model trained ``steps`` AdamW steps of ``batch_size`` samples with the arm's
    loss through the one-pass fused path; ``look(step, model)`` (the model in eval mode) after every
    ``every`` steps. Returns ``(model, reduction)`` (the reduction keeps group DRO's q)."""
    seed = prepared.seed
    torch.manual_seed(seed)
    train_set = prepared.train_sets[arm.get("weights", "default")]
    model = copy.deepcopy(prepared.sft).train()
    k = train_set.group_size if arm["listwise"] else 2
    loss_fn = arm_settings(arm, beta).build_loss(group_names=train_set.group_names, group_size=k)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(len(train_set), (batch_size,), generator=gen).tolist()
        batch = prepared.collate(rows(train_set, idx, arm["listwise"]))
        opt.zero_grad()
        out = one_pass_loss(model, batch, loss_fn, use_weights=arm["weighted"])
        out.loss.backward()
        opt.step()
        if look is not None and every and step % every == 0 and step < steps:
            look(step, model.eval())
            model.train()
    return model.eval(), loss_fn.reduction


@torch.no_grad()
def preference_accuracy(model, prepared: Prepared) -> float:
    """Share of held-out target pairs whose implicit reward log π/π_SFT ranks r0's best response first."""
    ratios = logps_of(model, prepared.test_pairs, prepared.collate).reshape(-1, 2) - prepared.ref_test
    return float((ratios[:, 0] > ratios[:, 1]).float().mean())


class SampleJudge:
    """The gold-reward evaluation of a model's samples on ``n_prompts`` test prompts of one seed.

    ``judge(model, stream)`` samples ``n_samples`` responses per prompt at temperature 1 (the
    generator seeded by ``stream``, so arms judged with one stream draw from the same random
    numbers) and returns per-prompt ``[P]`` lists:

        reward   mean r0 of the samples (the known target reward)
        win      P(r0(y) > r0(y_SFT)) + ½·P(=) over the n × n pairs of the policy's and the SFT
                 model's samples
        kl       mean(log π(y) − log π_SFT(y)) over the samples: KL(π ‖ π_SFT), unbiased
    plus ``stats`` (:func:`~robalign.app.evaluation.samples.text_stats` and the topic share) of all
    samples. ``judge(model, stream, greedy=True)``: the reward of one greedy response per prompt.
    """

    def __init__(self, prepared: Prepared, *, n_prompts: int, n_samples: int, max_new_tokens: int):
        tok = prepared.tokenizer
        records = prepared.test[:n_prompts]
        if len(records) < n_prompts:
            raise ValueError(f"SampleJudge: {n_prompts} prompts asked, the test set holds {len(records)}")
        self.tokenizer, self.sft, self.eos = tok, prepared.sft, tok.eos_token_id
        self.topics = [r["topic"] for r in records]
        self.prompts = [tok(r["prompt"])["input_ids"] for r in records]
        self.n, self.max_new_tokens, self.seed = n_samples, max_new_tokens, prepared.seed
        rewards, self.sft_stats = self._rewards(self._sample(self.sft, stream=-1)[0])
        self.sft_rewards = torch.tensor(rewards, dtype=torch.float64)

    def _sample(self, model, stream, greedy=False):
        gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + stream)
        return sample_prompts(model, self.prompts, n=1 if greedy else self.n, max_new_tokens=self.max_new_tokens,
                              eos_token_id=self.eos, greedy=greedy, generator=gen)

    def _rewards(self, responses):
        """``([P][n] r0 of the responses, their text statistics and topic share)``."""
        texts = [[self.tokenizer.decode(y, skip_special_tokens=True) for y in ys] for ys in responses]
        stats = {**text_stats([y for ys in responses for y in ys], self.eos),
                 "topic_share": topic_share([t for t, ts in zip(self.topics, texts) for _ in ts],
                                            [x for ts in texts for x in ts])}
        return [[reward_target(topic, t) for t in ts] for topic, ts in zip(self.topics, texts)], stats

    def __call__(self, model, stream: int, *, greedy: bool = False) -> dict:
        responses, logps = self._sample(model, stream, greedy)
        rewards, stats = self._rewards(responses)
        rewards = torch.tensor(rewards, dtype=torch.float64)
        if greedy:
            return {"reward": rewards[:, 0].tolist()}
        flat_prompts = [p for p, ys in zip(self.prompts, responses) for _ in ys]
        ref = score_responses(self.sft, flat_prompts, [y for ys in responses for y in ys]).reshape(logps.shape)
        wins = [win_rate(r[:, None].expand(-1, len(s)), s[None, :].expand(len(r), -1))
                for r, s in zip(rewards, self.sft_rewards)]
        return {"reward": rewards.mean(1).tolist(), "win": wins, "kl": (logps - ref).mean(1).tolist(), "stats": stats}
