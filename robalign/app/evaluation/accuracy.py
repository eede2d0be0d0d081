"""``robalign eval``: how a trained policy ranks the pairs of a preference file.

For a run folder written by ``robalign train`` (its ``final/`` model and ``summary.json``) and a
pairwise or listwise file, the implicit reward of DPO-style training,

    r(y) = β · (logp_policy(y) − logp_ref(y))

with the run's β and its reference model (the model the run started from: the ``--model``
folder, or the embedded default at the run's seed), gives

    reward accuracy = mean over samples of [ r(best) > r(worst) ]      (best/worst by the file's order
                                                                         or scores)
    reward margin   = mean of r(best) − r(worst)

and, for reference, the same accuracy of the log-probs alone (policy, no reference).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["evaluate_run"]


def _load_policy(final: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (final / "adapter_config.json").is_file():
        try:
            from peft import AutoPeftModelForCausalLM
        except ImportError:
            raise ImportError(f"{final} holds a LoRA adapter: loading it needs peft (pip install peft)") from None
        model = AutoPeftModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    return model, AutoTokenizer.from_pretrained(str(final), local_files_only=True)


def evaluate_run(run, data, *, batch_size: int = 16) -> dict:
    """Reward accuracy and margin of the policy in ``run`` on ``data`` (see the module docstring)."""
    import torch

    from ..data.preferences import PreferenceCollator, PreferenceDataset, prepare_tokenizer
    from ..commands.train import embedded_model
    from ..training.causal_lm import policy_logps

    run, data = Path(run), Path(data)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run}: not a run folder of `robalign train` (no summary.json)")
    if not data.exists():
        raise FileNotFoundError(f"--data: no such file: {data}")
    settings = json.loads(summary_path.read_text(encoding="utf-8"))["settings"]
    policy, tokenizer = _load_policy(run / "final")
    if settings.get("model"):
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(settings["model"], local_files_only=True)
    else:
        reference, _ = embedded_model(settings.get("seed", 0))
    prepare_tokenizer(tokenizer, log=lambda *_: None)
    dataset = PreferenceDataset.from_file(data, tokenizer, max_length=settings["max_length"],
                                          max_prompt_length=settings["max_prompt_length"],
                                          chat_as_text=settings.get("chat_as_text", False))
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, fields=())
    k = dataset.group_size
    rewards, plain = [], []
    with torch.no_grad():
        for model in (policy.eval(), reference.eval()):
            values = []
            for start in range(0, len(dataset), batch_size):
                batch = collate(dataset.groups[start:start + batch_size])
                values.append(policy_logps(model, batch)[0].double())
            (rewards if model is policy else plain).append(torch.cat(values).reshape(-1, k))
    logp, ref = rewards[0], plain[0]
    scores = torch.tensor([g.scores for g in dataset.groups], dtype=torch.float64)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    r = (settings.get("beta", 0.1) * (logp - ref)).gather(-1, order)
    by_logp = logp.gather(-1, order)
    return {"run": str(run), "data": str(data), "samples": len(dataset), "beta": settings.get("beta", 0.1),
            "reward_accuracy": float((r[:, 0] > r[:, -1]).double().mean()),
            "reward_margin": float((r[:, 0] - r[:, -1]).mean()),
            "logp_accuracy": float((by_logp[:, 0] > by_logp[:, -1]).double().mean())}
