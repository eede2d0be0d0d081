"""``robalign demo --study``: does DoRA make the policy *write* better? The generation study.

The demo's shift (:mod:`robalign.app.commands.demo`), judged as the field judges aligned policies:
by samples. For every shift setting, seed and arm, a copy of the seed's SFT model trains ``steps``
steps; every ``eval_every`` steps :class:`~robalign.app.commands.experiment.SampleJudge` samples
``n_samples`` responses per test prompt at temperature 1 and scores them with the known target
reward r0:

    reward   mean r0 of the samples                     (per prompt, [S, P] over seeds × prompts)
    win      win rate against the SFT model's samples   (ties count half)
    kl       KL(π ‖ π_SFT) from the same samples        (mean log π(y) − log π_SFT(y))

Outputs in ``out``: ``study.json`` (settings, versions, machine, every checkpoint's means per seed,
the final per-prompt values), ``study.md`` (the tables) and ``study.png`` (the reward–KL frontier).

Two readings of each arm, both without looking at r0 to choose: **at the end** of training, and
**within a KL budget** (the last checkpoint whose sampled KL stays ≤ ``kl_budget``, chosen per seed
from the KL alone). Intervals are percentile bootstraps over seeds and, within each seed, prompts
(:func:`~robalign.app.evaluation.samples.seeds_bootstrap_ci`); differences between arms are paired
(same seeds, prompts and sampling stream).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.toy import topic_share
from ..evaluation.samples import paired_seeds_bootstrap_ci, seeds_bootstrap_ci, text_stats
from .experiment import (ARMS, DESCRIPTIONS, ExperimentSettings, SampleJudge, prepare_seed, preference_accuracy,
                         train_arm, weight_variants)

__all__ = ["StudySettings", "run_study", "STUDY_ARMS"]

STUDY_ARMS = ["dpo", "iw_dpo", "dora", "dora_lam3", "dora_ess50", "dora_floor"]
#: the paired differences the study reports: (arm, against)
COMPARISONS = [("dora", "dpo"), ("dora", "iw_dpo"), ("iw_dpo", "dpo"), ("dora_lam3", "dora"), ("dora_ess50", "dora"),
               ("dora_floor", "dora")]
METRICS = ("reward", "win", "kl")


@dataclass
class StudySettings(ExperimentSettings):
    seeds: int = 5
    target_fractions: list = field(default_factory=lambda: [0.25, 0.1])   # the second: 60 target samples of 600
    steps: int = 200
    eval_every: int = 10
    n_prompts: int = 100
    n_samples: int = 8
    kl_budget: float = 5.0
    arms: list = field(default_factory=lambda: list(STUDY_ARMS))
    out: str = "out/study"

    def check(self):
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown arms {unknown}; expected some of {list(ARMS)}")
        if self.seeds < 1 or self.steps < 1 or not 1 <= self.eval_every <= self.steps:
            raise ValueError(f"need seeds >= 1, steps >= 1 and 1 <= eval_every <= steps, got {self.seeds}, "
                             f"{self.steps} and {self.eval_every}")
        if not self.target_fractions or not all(0 < a < 1 for a in self.target_fractions):
            raise ValueError(f"target_fractions must lie in (0, 1), got {self.target_fractions}")
        if self.n_samples < 1 or not 1 <= self.n_prompts <= self.n_test:
            raise ValueError(f"need n_samples >= 1 and 1 <= n_prompts <= n_test ({self.n_test}), got "
                             f"{self.n_samples} and {self.n_prompts}")


def _data_stats(records, tokenizer):
    """The training responses' own statistics (every sample's top response): what fluent means here."""
    ids = [tokenizer(r["responses"][0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for r in records]
    return {**text_stats(ids, tokenizer.eos_token_id),
            "topic_share": topic_share([r["topic"] for r in records], [r["responses"][0] for r in records])}


def _run_seed(seed, alpha, settings, workdir, log):
    prepared = prepare_seed(seed, settings.toy(alpha, seed), workdir, features=settings.features,
                            sft_steps=settings.sft_steps, variants=weight_variants(settings.arms), log=log)
    judge = SampleJudge(prepared, n_prompts=settings.n_prompts, n_samples=settings.n_samples,
                        max_new_tokens=settings.max_new_tokens)
    seed_out = {"classifier": {v: {k: r[k] for k in ("auc", "ess_fraction")} for v, r in prepared.reports.items()},
                "data_stats": _data_stats(prepared.train_records, prepared.tokenizer),
                "sft": {"reward": judge.sft_rewards.mean(1).tolist(), "stats": judge.sft_stats}, "arms": {}}
    for name in settings.arms:
        start = time.perf_counter()
        looks = {0: {"reward": seed_out["sft"]["reward"], "win": [0.5] * settings.n_prompts,
                     "kl": [0.0] * settings.n_prompts}}

        def look(step, model):
            looks[step] = judge(model, stream=step)

        model, _ = train_arm(prepared, ARMS[name], steps=settings.steps, batch_size=settings.batch_size,
                             lr=settings.lr, beta=settings.beta, every=settings.eval_every, look=look)
        look(settings.steps, model)
        greedy = judge(model, stream=settings.steps, greedy=True)["reward"]
        final = looks[settings.steps]
        seed_out["arms"][name] = {
            "steps": sorted(looks),
            "curve": {m: [statistics.mean(looks[s][m]) for s in sorted(looks)] for m in METRICS},
            "per_prompt": {s: {m: looks[s][m] for m in METRICS} for s in sorted(looks)},
            "greedy_reward": greedy, "pref_acc": preference_accuracy(model, prepared), "stats": final["stats"]}
        log(f"  α {alpha} seed {seed} {name:<10} r0 {statistics.mean(final['reward']):+.3f}  win "
            f"{statistics.mean(final['win']):.3f}  KL {statistics.mean(final['kl']):6.2f}  "
            f"({time.perf_counter() - start:.1f}s)")
    return seed_out


def _rounded(values):
    return [round(v, 5) for v in values]


def _kept(seeds_out, summary, settings):
    """What study.json keeps of each seed: the per-prompt values of the two checkpoints the tables
    read (the end, the last within the KL budget), rounded to 5 decimals; every checkpoint's means."""
    kept = []
    for i, seed in enumerate(seeds_out):
        arms = {}
        for name, arm in seed["arms"].items():
            steps = {settings.steps, summary["arms"][name]["budget_steps"][i]}
            arms[name] = {**arm, "greedy_reward": _rounded(arm["greedy_reward"]),
                          "per_prompt": {step: {m: _rounded(arm["per_prompt"][step][m]) for m in METRICS}
                                         for step in sorted(steps)}}
        kept.append({**seed, "arms": arms, "sft": {**seed["sft"], "reward": _rounded(seed["sft"]["reward"])}})
    return kept


def _within_budget(arm_seed, budget):
    """The last checkpoint whose mean sampled KL is ≤ budget (the SFT model, step 0, at worst)."""
    ok = [s for s, kl in zip(arm_seed["steps"], arm_seed["curve"]["kl"]) if kl <= budget]
    return ok[-1] if ok else 0


def _summarise(seeds_out, settings):
    """Intervals of each arm's final and within-budget values, and the paired differences."""
    arms, pairs = {}, {}
    picks = {name: [_within_budget(s["arms"][name], settings.kl_budget) for s in seeds_out] for name in settings.arms}

    def matrix(name, metric, when):
        steps = [settings.steps] * len(seeds_out) if when == "final" else picks[name]
        return torch.tensor([s["arms"][name]["per_prompt"][step][metric] for s, step in zip(seeds_out, steps)])

    for name in settings.arms:
        entry = {"description": DESCRIPTIONS[name], "budget_steps": picks[name]}
        for when in ("final", "budget"):
            for metric in METRICS:
                entry[f"{when}_{metric}"] = seeds_bootstrap_ci(matrix(name, metric, when))
        entry["greedy_reward"] = seeds_bootstrap_ci(torch.tensor([s["arms"][name]["greedy_reward"] for s in seeds_out]))
        accs = [s["arms"][name]["pref_acc"] for s in seeds_out]
        entry["pref_acc"] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
        entry["frontier"] = {m: [statistics.mean(v) for v in zip(*(s["arms"][name]["curve"][m] for s in seeds_out))]
                             for m in METRICS}
        entry["frontier"]["steps"] = seeds_out[0]["arms"][name]["steps"]
        entry["stats"] = {k: statistics.mean(s["arms"][name]["stats"][k] for s in seeds_out)
                          for k in seeds_out[0]["arms"][name]["stats"]}
        arms[name] = entry
    for a, b in COMPARISONS:
        if a in arms and b in arms:
            pairs[f"{a} - {b}"] = {f"{when}_{metric}": paired_seeds_bootstrap_ci(matrix(a, metric, when),
                                                                                  matrix(b, metric, when))
                                   for when in ("final", "budget") for metric in ("reward", "win")}
    sft_reward = seeds_bootstrap_ci(torch.tensor([s["sft"]["reward"] for s in seeds_out]))
    mean_of = lambda key: {k: statistics.mean(s[key][k] for s in seeds_out) for k in seeds_out[0][key]}
    fluency = {"data": mean_of("data_stats"), "sft": {k: statistics.mean(s["sft"]["stats"][k] for s in seeds_out)
                                                      for k in seeds_out[0]["sft"]["stats"]}}
    classifier = {"auc": statistics.mean(s["classifier"]["default"]["auc"] for s in seeds_out),
                  "ess_fraction": {v: statistics.mean(s["classifier"][v]["ess_fraction"] for s in seeds_out)
                                   for v in seeds_out[0]["classifier"]}}
    return {"arms": arms, "pairs": pairs, "sft_reward": sft_reward, "fluency": fluency, "classifier": classifier}




def _versions():
    import transformers

    from ... import __version__

    commit = None
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"robalign": __version__, "commit": commit, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}"}


def run_study(settings: StudySettings, log=print) -> dict:
    """Every shift setting × seed × arm; writes study.json, study.md and study.png to ``settings.out``."""
    settings.check()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"robalign demo --study: target fractions {settings.target_fractions} × {settings.seeds} seeds × "
        f"{len(settings.arms)} arms ({', '.join(settings.arms)}), {settings.steps} steps, a look every "
        f"{settings.eval_every}: {settings.n_samples} samples on each of {settings.n_prompts} test prompts")
    start = time.perf_counter()
    shifts = {}
    for alpha in settings.target_fractions:
        seeds_out = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(settings.seeds):
                seeds_out.append(_run_seed(seed, alpha, settings, Path(tmp), log))
        summary = _summarise(seeds_out, settings)
        shifts[str(alpha)] = {"summary": summary, "per_seed": _kept(seeds_out, summary, settings)}
    summary = {"settings": asdict(settings), "versions": _versions(), "seconds": round(time.perf_counter() - start, 1),
               "shifts": shifts}
    from ..._io import write_atomic

    text = _tables(summary)
    write_atomic(out / "study.json", lambda h: h.write(json.dumps(summary).encode()))
    write_atomic(out / "study.md", lambda h: h.write(text.encode()))
    _plot(out / "study.png", summary)
    log("\n" + text)
    return summary


def _ci(triple, fmt="{:+.3f}"):
    mean, low, high = triple
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def _tables(summary) -> str:
    s = summary["settings"]
    lines = [f"Generation study: {s['seeds']} seeds, {s['steps']} steps (lr {s['lr']}, β {s['beta']}), "
             f"{s['n_samples']} samples at T = 1 on {s['n_prompts']} test prompts per seed; 95 % intervals "
             f"(bootstrap over seeds and prompts). {summary['seconds']:.0f} s; {summary['versions']['machine']}.", ""]
    for alpha, shift in summary["shifts"].items():
        sm = shift["summary"]
        c = sm["classifier"]
        lines += [f"### Target fraction α = {alpha} (classifier AUC {c['auc']:.3f}, weights' ESS "
                  + ", ".join(f"{v} {100 * e:.0f} %" for v, e in c["ess_fraction"].items()) + ")", "",
                  f"SFT model: r0 {_ci(sm['sft_reward'])}.", "",
                  "| arm | what | r0 at the end | win vs SFT | KL | r0 within KL ≤ "
                  f"{s['kl_budget']:g} | win within KL ≤ {s['kl_budget']:g} | greedy r0 | pref. acc. |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, a in sm["arms"].items():
            lines.append(f"| {name} | {a['description']} | {_ci(a['final_reward'])} | {_ci(a['final_win'], '{:.3f}')} | "
                         f"{_ci(a['final_kl'], '{:.1f}')} | {_ci(a['budget_reward'])} | {_ci(a['budget_win'], '{:.3f}')} "
                         f"| {_ci(a['greedy_reward'])} | {100 * a['pref_acc'][0]:.1f} ± {100 * a['pref_acc'][1]:.1f} |")
        lines += ["", "| paired difference | r0 at the end | win at the end | r0 within the KL budget | "
                  "win within the KL budget |", "| --- | ---: | ---: | ---: | ---: |"]
        for pair, d in sm["pairs"].items():
            lines.append(f"| {pair} | {_ci(d['final_reward'])} | {_ci(d['final_win'])} | {_ci(d['budget_reward'])} | "
                         f"{_ci(d['budget_win'])} |")
        f = sm["fluency"]
        keys = ("end_rate", "mean_length", "repeat_rate", "distinct_2", "topic_share")
        lines += ["", "| samples | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys),
                  "| training responses | " + " | ".join(f"{f['data'][k]:.3f}" for k in keys) + " |",
                  "| SFT model, T = 1 | " + " | ".join(f"{f['sft'][k]:.3f}" for k in keys) + " |"]
        lines += [f"| {name} at the end | " + " | ".join(f"{a['stats'][k]:.3f}" for k in keys) + " |"
                  for name, a in sm["arms"].items()]
        lines.append("")
    return "\n".join(lines)


def _plot(path, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._io import write_atomic

    shifts = summary["shifts"]
    fig, axes = plt.subplots(1, len(shifts), figsize=(6.2 * len(shifts), 5.0), squeeze=False)
    for ax, (alpha, shift) in zip(axes[0], shifts.items()):
        sm = shift["summary"]
        for name, a in sm["arms"].items():
            fr = a["frontier"]
            style = "-" if name in ("dpo", "iw_dpo", "dora") else "--"
            line, = ax.plot(fr["kl"], fr["reward"], style, marker="o", markersize=3, label=a["description"])
            ax.annotate(f"{fr['steps'][-1]}", (fr["kl"][-1], fr["reward"][-1]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7, color=line.get_color())
        ax.axvline(summary["settings"]["kl_budget"], color="grey", linestyle=":", linewidth=1,
                   label=f"KL budget ({summary['settings']['kl_budget']:g} nats)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set(xlabel="KL(π ‖ π_SFT), nats (from samples; symlog)", ylabel="gold reward r0 of samples (T = 1)",
               title=f"α = {alpha}: mean over {summary['settings']['seeds']} seeds, a point every "
                     f"{summary['settings']['eval_every']} steps (the last labelled)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    write_atomic(path, lambda h: fig.savefig(h, format="png", dpi=110))
    plt.close(fig)
