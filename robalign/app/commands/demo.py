"""``robalign demo``: a controlled distribution-shift experiment that shows what DoRA does.

Data (:mod:`robalign.app.data.toy`, seeded): a fraction α of the training samples come from the target
(``human``) source and are ranked by the target reward r0; the rest come from a ``synthetic``
source with its own style, ranked by a biased reward r1 and partly flipped. The test set holds
target samples ranked by r0.

Pipeline per seed, through the public API:
    1. SFT a tiny Llama (embedded default) on every training sample's top-ranked response;
    2. ``weigh_file`` the training set (cross-fitted classifier on the responses) → DoRA weights;
    3. reference log-probs of the SFT model; then, for each arm, train a copy with
       ``FusedLinearDoRALoss`` through the one-pass fused loss (``robalign.app.training.causal_lm.one_pass_loss``):
           dpo       DPO (ERM)                      λ = ∞, no weights
           iw_dpo    importance-weighted DPO        λ = ∞, DoRA weights
           dro_only  KL-DRO without weights         λ = 1
           dora      DoRA: weights and KL-DRO       λ = 1, DoRA weights
           dr_dpo    Dr.DPO (soft-min)              λ = −1
           dora_pl   listwise DoRA, Plackett–Luce on all K = 4 candidates
           kl_ball   DoRA weights, the worst case over a KL ball (η = 0.5)
           chi2      DoRA weights, the worst case over a χ² ball (ρ = 1)
           cvar      DoRA weights, CVaR of the worst 30 %
           group_dro group DRO over the two sources (human, synthetic), no weights (η_q = 0.5)
    4. metrics on the target test set: preference accuracy of the implicit reward β·logratio
       (best vs worst response by r0) and the mean r0 of greedy samples.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.preferences import PreferenceCollator, PreferenceDataset, prepare_tokenizer
from ..training.config import DoRAConfig
from ..data.toy import ToySettings, make_toy_data, reward_target, write_jsonl
from ..training.causal_lm import one_pass_loss, policy_logps

__all__ = ["ARMS", "DemoSettings", "run_demo"]

INF = float("inf")
#: each arm: its alignment settings (:class:`~robalign.app.training.config.DoRAConfig` fields; β is the
#: demo's), whether it trains on the DoRA weights, and whether it reads whole candidate lists
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
}


def arm_settings(arm: dict, beta: float) -> DoRAConfig:
    """An arm's alignment settings, from which its loss is built like the trainer's."""
    return DoRAConfig(beta=beta, use_weights=arm["weighted"],
                      **{k: v for k, v in arm.items() if k not in ("weighted", "listwise")})


@dataclass
class DemoSettings:
    seeds: int = 3
    target_fraction: float = 0.25
    flip_rate: float = 0.2
    steps: int = 80
    sft_steps: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    beta: float = 0.1
    n_train: int = 600
    n_test: int = 200
    features: str = "tfidf"
    arms: list = field(default_factory=lambda: list(ARMS))
    out: str = "out/demo"


def _rows(dataset, indices, listwise):
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


def _sft(model, dataset, collate, steps, batch_size, lr, gen):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(dataset), (batch_size,), generator=gen).tolist()
        groups = [type(g)([g.input_ids[0]], [g.labels[0]], [g.scores[0]]) for g in (dataset.groups[i] for i in idx)]
        batch = collate(groups)
        logps, counts = policy_logps(model, batch)
        loss = -logps.sum() / counts.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def _logps_of(model, groups, collate, batch=64):
    out = []
    for start in range(0, len(groups), batch):
        logps, _ = policy_logps(model, collate(groups[start:start + batch]))
        out.append(logps.float())
    return torch.cat(out)


def _train_arm(sft, arm, train_set, settings, collate, seed):
    torch.manual_seed(seed)
    model = copy.deepcopy(sft).train()
    k = train_set.group_size if arm["listwise"] else 2
    loss_fn = arm_settings(arm, settings.beta).build_loss(group_names=train_set.group_names, group_size=k)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(settings.steps):
        idx = torch.randint(len(train_set), (settings.batch_size,), generator=gen).tolist()
        batch = collate(_rows(train_set, idx, arm["listwise"]))
        opt.zero_grad()
        out = one_pass_loss(model, batch, loss_fn, use_weights=arm["weighted"])
        out.loss.backward()
        opt.step()
    return model.eval(), loss_fn.reduction


@torch.no_grad()
def _greedy_reward(model, tokenizer, test_records, limit=60, new_tokens=12):
    records = test_records[:limit]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in records]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):                                   # left padding for generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return statistics.mean(reward_target(r["topic"], t) for r, t in zip(records, texts))


def _run_seed(seed, settings, workdir, log):
    from ..ratio import weigh_file
    from .train import embedded_model

    toy = ToySettings(n_train=settings.n_train, n_test=settings.n_test, group_size=4,
                      target_fraction=settings.target_fraction, flip_rate=settings.flip_rate, seed=seed)
    train, test = make_toy_data(toy)
    # test samples are ranked by r0 (they are target samples): best first
    train_file = write_jsonl(workdir / f"train-{seed}.jsonl", train,
                             fields=("prompt", "responses", "scores", "sources"))
    weighted_file = workdir / f"train-{seed}-weighted.jsonl"
    log(f"seed {seed}: toy data ({settings.n_train} training, {settings.n_test} test samples), classifier ...")
    report = weigh_file(train_file, "human", weighted_file, features=settings.features, progress=False, seed=seed,
                        log=lambda *_: None)
    log(f"seed {seed}: classifier AUC {report['auc']:.3f}, weights' ESS {report['ess_fraction']:.0%}; "
        f"SFT ({settings.sft_steps} steps) and reference log-probs ...")
    test_file = write_jsonl(workdir / f"test-{seed}.jsonl", test, fields=("prompt", "responses", "scores"))

    sft, tokenizer = embedded_model(seed)
    prepare_tokenizer(tokenizer, log=lambda *_: None)
    train_set = PreferenceDataset.from_file(weighted_file, tokenizer, max_length=48, max_prompt_length=16)
    test_set = PreferenceDataset.from_file(test_file, tokenizer, max_length=48, max_prompt_length=16)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    _sft(sft, train_set, collate, settings.sft_steps, 32, 3e-3, gen)

    ref_train = _logps_of(sft, _rows(train_set, range(len(train_set)), True), collate).reshape(len(train_set), -1)
    for g, r in zip(train_set.groups, ref_train):
        g.ref_logps = r.tolist()
    test_pairs = _rows(test_set, range(len(test_set)), False)
    ref_test = _logps_of(sft, test_pairs, collate).reshape(-1, 2)

    results = {}
    for name in settings.arms:
        start = time.perf_counter()
        model, reduction = _train_arm(sft, ARMS[name], train_set, settings, collate, seed)
        ratios = _logps_of(model, test_pairs, collate).reshape(-1, 2) - ref_test
        acc = float((ratios[:, 0] > ratios[:, 1]).float().mean())
        reward = _greedy_reward(model, tokenizer, test)
        results[name] = {"target_pref_acc": acc, "target_reward": reward}
        final_q = ""
        if getattr(reduction, "names", None):                          # group DRO: where q ended
            results[name]["group_q"] = dict(zip(reduction.names, reduction.q.tolist()))
            final_q = "  q " + ", ".join(f"{k} {v:.2f}" for k, v in results[name]["group_q"].items())
        log(f"  seed {seed} {name:<9} target pref. acc {acc:.3f}  greedy r0 {reward:+.3f}{final_q}  "
            f"({time.perf_counter() - start:.1f}s)")
    return results, report


def run_demo(settings: DemoSettings, log=print) -> dict:
    """Run every arm for every seed; write results.json and results.png to ``settings.out``."""
    unknown = sorted(set(settings.arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected some of {list(ARMS)}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, reports = [], []
    log(f"robalign demo: {settings.seeds} seed(s) × {len(settings.arms)} arms ({', '.join(settings.arms)}), "
        f"{settings.steps} steps each; target fraction {settings.target_fraction}, flip rate {settings.flip_rate} "
        f"(about {25 * settings.seeds} s on 2 cores)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(settings.seeds):
            results, report = _run_seed(seed, settings, Path(tmp), log)
            per_seed.append(results)
            reports.append(report)
    arms = {}
    for name in settings.arms:
        accs = [r[name]["target_pref_acc"] for r in per_seed]
        rewards = [r[name]["target_reward"] for r in per_seed]
        arms[name] = {"target_pref_acc": accs, "target_pref_acc_mean": statistics.mean(accs),
                      "target_pref_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "target_reward": rewards, "target_reward_mean": statistics.mean(rewards),
                      "description": _DESCRIPTIONS[name]}
        if "group_q" in per_seed[0][name]:
            arms[name]["group_q"] = [r[name]["group_q"] for r in per_seed]
    summary = {
        "settings": asdict(settings),
        "arms": arms,
        "classifier": {"auc": [r["auc"] for r in reports], "ess_fraction": [r["ess_fraction"] for r in reports],
                       "alpha": [r["alpha"] for r in reports]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    if "dpo" in arms and "dora" in arms:
        summary["dora_minus_dpo_points"] = 100 * (arms["dora"]["target_pref_acc_mean"] - arms["dpo"]["target_pref_acc_mean"])
    from ..._io import write_atomic

    write_atomic(out / "results.json", lambda h: h.write(json.dumps(summary, indent=2).encode()))
    _plot(out / "results.png", arms, settings)
    _print_table(summary, log)
    return summary


_DESCRIPTIONS = {
    "dpo": "DPO (ERM), λ = ∞, no weights",
    "iw_dpo": "importance-weighted DPO, λ = ∞",
    "dro_only": "KL-DRO, λ = 1, no weights",
    "dora": "DoRA: weights + KL-DRO, λ = 1",
    "dr_dpo": "Dr.DPO, λ = −1",
    "dora_pl": "listwise DoRA (Plackett–Luce, K = 4)",
    "kl_ball": "weights + KL ball, η = 0.5",
    "chi2": "weights + χ² ball, ρ = 1",
    "cvar": "weights + CVaR, worst 30 %",
    "group_dro": "group DRO over the sources, no weights",
}


def _print_table(summary, log):
    arms = summary["arms"]
    s = summary["settings"]
    log(f"\nTarget-distribution test set, {s['seeds']} seed(s); target fraction {s['target_fraction']}, "
        f"flip rate {s['flip_rate']}, {s['steps']} steps. Classifier AUC "
        f"{statistics.mean(summary['classifier']['auc']):.3f}, weights' ESS "
        f"{100 * statistics.mean(summary['classifier']['ess_fraction']):.0f}% of samples.\n")
    log(f"| {'arm':<9} | {'what':<38} | {'preference accuracy':>21} | {'greedy r0':>9} |")
    log(f"| {'-' * 9} | {'-' * 38} | {'-' * 20}: | {'-' * 8}: |")
    for name, a in arms.items():
        log(f"| {name:<9} | {a['description']:<38} | {100 * a['target_pref_acc_mean']:>8.1f} ± "
            f"{100 * a['target_pref_acc_std']:<4.1f} points | {a['target_reward_mean']:>+9.3f} |")
    if "dora_minus_dpo_points" in summary:
        d = summary["dora_minus_dpo_points"]
        verdict = "better" if d > 0 else "worse"
        log(f"\nDoRA vs DPO: {d:+.1f} points of target preference accuracy ({verdict} on the target "
            f"distribution); {summary['seconds']:.0f}s in all.")
        dpo = arms["dpo"]["target_pref_acc_mean"]
        parts = [f"{label} {100 * (arms[name]['target_pref_acc_mean'] - dpo):+.1f}"
                 for name, label in (("iw_dpo", "weights alone"), ("dro_only", "DRO alone")) if name in arms]
        if parts:
            log("Ablations vs DPO (points): " + ", ".join(parts) + ".")


def _plot(path, arms, settings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._io import write_atomic

    names = list(arms)
    means = [100 * arms[n]["target_pref_acc_mean"] for n in names]
    stds = [100 * arms[n]["target_pref_acc_std"] for n in names]
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 4.2))
    colors = ["tab:orange" if n.startswith("dora") else "tab:blue" for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=colors, error_kw={"label": f"± std over {settings.seeds} seeds"})
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("target preference accuracy (%)")
    ax.set_ylim(0, 100)                                   # from 0: bar heights compare as they look
    handles = [Patch(color="tab:orange", label="DoRA (density-ratio weights + KL-DRO)"),
               Patch(color="tab:blue", label="baselines and ablations"),
               plt.Line2D([], [], color="black", marker="_", linestyle="none", markersize=10,
                          label=f"error bar: ± std over {settings.seeds} seed(s)"),
               plt.Line2D([], [], color="grey", linestyle=":", label="chance (50 %)")]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title(f"Toy distribution shift: target fraction {settings.target_fraction}, flip rate "
                 f"{settings.flip_rate}, {settings.seeds} seed(s)")
    fig.tight_layout()
    write_atomic(path, lambda h: fig.savefig(h, format="png", dpi=110))
    plt.close(fig)
