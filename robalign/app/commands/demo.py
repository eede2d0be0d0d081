"""``robalign demo``: a controlled distribution-shift experiment that shows what DoRA does.

Data (:mod:`robalign.app.data.toy`, seeded): a fraction α of the training samples come from the target
(``human``) source and are ranked by the target reward r0; the rest come from a ``synthetic``
source with its own style, ranked by a biased reward r1 and partly flipped. The test set holds
target samples ranked by r0.

Pipeline per seed, through the public API (:mod:`robalign.app.commands.experiment`):
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
       (best vs worst response by r0), and what the policy writes: the gold reward r0 of samples at
       temperature 1, their win rate against the SFT model's samples and KL(π ‖ π_SFT)
       (:class:`~robalign.app.commands.experiment.SampleJudge`). The generation study
       (``robalign demo --study``, :mod:`robalign.app.commands.study`) measures the same with
       intervals, along training, on more seeds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .experiment import (ARMS, DESCRIPTIONS, ExperimentSettings, SampleJudge, prepare_seed, preference_accuracy,
                         train_arm, weight_variants)

__all__ = ["ARMS", "DEMO_ARMS", "DemoSettings", "run_demo"]

#: the arms the demo runs by default (``ARMS`` also holds the generation study's remedies)
DEMO_ARMS = ["dpo", "iw_dpo", "dro_only", "dora", "dr_dpo", "dora_pl", "kl_ball", "chi2", "cvar", "group_dro"]


@dataclass
class DemoSettings(ExperimentSettings):
    seeds: int = 3
    target_fraction: float = 0.25
    steps: int = 80
    arms: list = field(default_factory=lambda: list(DEMO_ARMS))
    out: str = "out/demo"


def _run_seed(seed, settings, workdir, log):
    prepared = prepare_seed(seed, settings.toy(settings.target_fraction, seed), workdir, features=settings.features,
                            sft_steps=settings.sft_steps, variants=weight_variants(settings.arms), log=log)
    judge = SampleJudge(prepared, n_prompts=min(settings.n_prompts, settings.n_test), n_samples=settings.n_samples,
                        max_new_tokens=settings.max_new_tokens)
    results = {}
    for name in settings.arms:
        start = time.perf_counter()
        model, reduction = train_arm(prepared, ARMS[name], steps=settings.steps, batch_size=settings.batch_size,
                                     lr=settings.lr, beta=settings.beta)
        acc = preference_accuracy(model, prepared)
        samples = judge(model, stream=settings.steps)
        results[name] = {"target_pref_acc": acc, "target_reward": statistics.mean(samples["reward"]),
                         "win_rate": statistics.mean(samples["win"]), "kl": statistics.mean(samples["kl"])}
        final_q = ""
        if getattr(reduction, "names", None):                          # group DRO: where q ended
            results[name]["group_q"] = dict(zip(reduction.names, reduction.q.tolist()))
            final_q = "  q " + ", ".join(f"{k} {v:.2f}" for k, v in results[name]["group_q"].items())
        r = results[name]
        log(f"  seed {seed} {name:<9} target pref. acc {acc:.3f}  sampled r0 {r['target_reward']:+.3f}  "
            f"win vs SFT {r['win_rate']:.3f}  KL {r['kl']:.2f}{final_q}  ({time.perf_counter() - start:.1f}s)")
    return results, prepared.reports["default"], statistics.mean(judge.sft_rewards.mean(1).tolist())


def run_demo(settings: DemoSettings, log=print) -> dict:
    """Run every arm for every seed; write results.json and results.png to ``settings.out``."""
    unknown = sorted(set(settings.arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected some of {list(ARMS)}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, reports, sft_rewards = [], [], []
    log(f"robalign demo: {settings.seeds} seed(s) × {len(settings.arms)} arms ({', '.join(settings.arms)}), "
        f"{settings.steps} steps each; target fraction {settings.target_fraction}, flip rate {settings.flip_rate} "
        f"(about {40 * settings.seeds} s on 2 cores)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(settings.seeds):
            results, report, sft_reward = _run_seed(seed, settings, Path(tmp), log)
            per_seed.append(results)
            reports.append(report)
            sft_rewards.append(sft_reward)
    arms = {}
    for name in settings.arms:
        accs = [r[name]["target_pref_acc"] for r in per_seed]
        arms[name] = {"target_pref_acc": accs, "target_pref_acc_mean": statistics.mean(accs),
                      "target_pref_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "description": DESCRIPTIONS[name]}
        for key in ("target_reward", "win_rate", "kl"):
            values = [r[name][key] for r in per_seed]
            arms[name][key], arms[name][f"{key}_mean"] = values, statistics.mean(values)
        if "group_q" in per_seed[0][name]:
            arms[name]["group_q"] = [r[name]["group_q"] for r in per_seed]
    summary = {
        "settings": asdict(settings),
        "arms": arms,
        "sft_target_reward": sft_rewards,
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




def _print_table(summary, log):
    arms = summary["arms"]
    s = summary["settings"]
    log(f"\nTarget-distribution test set, {s['seeds']} seed(s); target fraction {s['target_fraction']}, "
        f"flip rate {s['flip_rate']}, {s['steps']} steps. Classifier AUC "
        f"{statistics.mean(summary['classifier']['auc']):.3f}, weights' ESS "
        f"{100 * statistics.mean(summary['classifier']['ess_fraction']):.0f}% of samples.\n")
    log(f"| {'arm':<9} | {'what':<38} | {'preference accuracy':>21} | {'sampled r0':>10} | {'win vs SFT':>10} "
        f"| {'KL':>5} |")
    log(f"| {'-' * 9} | {'-' * 38} | {'-' * 20}: | {'-' * 9}: | {'-' * 9}: | {'-' * 4}: |")
    log(f"| {'sft':<9} | {'the SFT model (reference)':<38} | {'':>21} | "
        f"{statistics.mean(summary['sft_target_reward']):>+10.3f} | {0.5:>10.3f} | {0.0:>5.2f} |")
    for name, a in arms.items():
        log(f"| {name:<9} | {a['description']:<38} | {100 * a['target_pref_acc_mean']:>8.1f} ± "
            f"{100 * a['target_pref_acc_std']:<4.1f} points | {a['target_reward_mean']:>+10.3f} | "
            f"{a['win_rate_mean']:>10.3f} | {a['kl_mean']:>5.2f} |")
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
        log(f"Samples at temperature 1 (r0, the target reward): DoRA wins {arms['dora']['win_rate_mean']:.1%} against "
            f"the SFT model's, DPO {arms['dpo']['win_rate_mean']:.1%}. The generation study (robalign demo --study) "
            "gives the intervals and the reward-KL frontier.")


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
