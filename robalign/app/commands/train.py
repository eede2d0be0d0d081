"""``robalign train``: a causal LM, a preference file → a DoRA-trained policy and a summary.

With no model and no data it trains the embedded default: a small Llama-architecture model
built from ``assets/tiny_llama.json`` with a word-level tokenizer of the toy vocabulary, on a
seeded toy preference set (:mod:`robalign.app.data.toy`), in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..training.config import TrainSettings, check_settings, describe, load_settings, resolve_defaults

__all__ = ["TrainSettings", "run_training", "load_settings", "embedded_model"]

ASSETS = Path(__file__).parents[1] / "assets"
UNKNOWN_WARN, UNKNOWN_REFUSE = 0.02, 0.5       # shares of unknown tokens: warn, and refuse on the embedded default


def embedded_model(seed: int = 0):
    """The embedded default: (a tiny Llama from ``assets/tiny_llama.json``, the word-level
    tokenizer of the toy data's vocabulary), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data.toy import toy_tokenizer

    tokenizer = toy_tokenizer()
    config = LlamaConfig(**{k: v for k, v in json.loads((ASSETS / "tiny_llama.json").read_text()).items()
                            if k not in ("architectures", "model_type")}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def _load_model(settings: TrainSettings, log):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.model is None:
        return embedded_model(settings.seed)
    path = Path(settings.model)
    attn = "sdpa"
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            attn = "flash_attention_2"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation=attn)
    except Exception as err:  # a loader's error on a user's folder: name the folder, keep its first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {path}: could not load the model or its tokenizer ({first})") from None
    log(f"robalign: loaded {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"attention: {attn})")
    return model, tokenizer


def _embedded_data(out: Path, seed: int) -> Path:
    from ..data.toy import ToySettings, make_toy_data, write_jsonl

    train, _ = make_toy_data(ToySettings(n_train=400, n_test=0, seed=seed, target_fraction=1.0, flip_rate=0.0))
    return write_jsonl(out / "data" / "train.jsonl", train, fields=("prompt", "chosen", "rejected"))


def _deepspeed_config(path, log):
    """The DeepSpeed configuration of ``--deepspeed PATH`` as a dict (checked: a JSON object), with
    ZeRO-3's ``stage3_gather_16bit_weights_on_model_save`` set when the file leaves it out, so that
    ``final/`` holds a model that ``from_pretrained`` loads rather than sharded optimizer state."""
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--deepspeed: no such file: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {path}: expected a JSON object (DeepSpeed's configuration)")
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3 and "stage3_gather_16bit_weights_on_model_save" not in zero:
        config["zero_optimization"] = dict(zero, stage3_gather_16bit_weights_on_model_save=True)
        log(f"robalign: {path}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save; setting it so the "
            "final model is saved whole")
    return config


def model_card(summary: dict) -> str:
    """``final/README.md``: what was trained, on what, how, and how it ended (from ``summary.json``)."""
    s, last, evaluation = summary["settings"], summary["last_log"] or {}, summary.get("eval") or {}
    dro = s["dro"] + (f" (λ = {s['lam']:g})" if s["dro"] == "kl" else "")
    lines = ["---", "library_name: transformers", "tags: [robalign, dora, preference-alignment]", "---", "",
             f"# {Path(summary['out']).name}", "",
             f"Trained with robalign (`robalign train`) from {summary['model']} on "
             f"{summary['data']} ({summary['samples']} samples of {summary['group_size']} responses).", "",
             "| setting | value |", "| --- | --- |"]
    for key, value in (("objective", s["objective"]), ("β", s["beta"]), ("DRO", dro), ("learning rate", s["lr"]),
                       ("batch", f"{s['batch_size']} × {s['grad_accum']} accumulation × {summary['world_size']} "
                                 "processes"),
                       ("steps", summary["steps"]), ("seed", s["seed"])):
        lines.append(f"| {key} | {value} |")
    lines += ["", "| result | value |", "| --- | --- |",
              f"| final training loss (full batch) | {last.get('loss', float('nan')):.4f} |",
              f"| reward accuracy (last logged) | {last.get('rewards/accuracy', float('nan')):.3f} |"]
    for key in ("eval_loss", "eval_rewards/accuracy", "eval_rewards/margin"):
        if key in evaluation:
            lines.append(f"| {key} | {evaluation[key]:.4f} |")
    return "\n".join(lines) + "\n"


def data_layout(objective) -> dict:
    """How the data must be laid out for ``objective``: ``{"unpaired": ..., "kl_rows": ...}`` for
    :meth:`PreferenceDataset.from_file` (KTO: unpaired samples with their mismatched rows)."""
    from ...losses import objectives

    name = objectives.resolve(objective)
    return {"unpaired": objectives.is_unpaired(name), "kl_rows": objectives.needs_kl_reference(name)}


ESS_WARN = 0.25          # below this effective-sample-size fraction the weights are called collapsed


def _check_weighting(settings, dataset, log):
    """``(settings, weighting)``: the weights the run will use, said before training. Data with no
    ``weights`` or ``probs`` trains unweighted, said so (and ``use_weights`` is then False in the
    summary); weights that are all zero are refused; collapsed ones (ESS below 25 % of the
    samples, or some zero) are warned about."""
    weighting = dataset.weighting()
    if not settings.use_weights:
        return settings, {"source": None, "ignored": weighting["source"]}
    if weighting["source"] is None:
        log(f"robalign: {dataset.path or 'the data'} has no `weights` or `probs` field (`robalign weigh` adds them): "
            "training without DoRA weights")
        return dataclasses.replace(settings, use_weights=False), weighting
    if weighting["source"] == "weights":
        ess, zeros = weighting["ess_fraction"], weighting["zero_share"]
        if zeros == 1:
            raise ValueError(f"--data {dataset.path}: every sample's weight is 0: nothing would be trained (weigh "
                             "again with a --weight-floor above 0, or train without weights: use_weights false)")
        line = f"DoRA weights: effective sample size {ess:.0%} of {len(dataset)} samples, {zeros:.0%} of them at 0"
        if ess < ESS_WARN or zeros > 0:
            log(f"robalign: WARNING: {line}: a few samples carry the loss (weigh with --weight-floor or "
                "--target-ess to spread it)")
        else:
            log(f"robalign: {line}")
    return settings, weighting


def run_training(settings: TrainSettings, log=print) -> dict:
    """Train; write checkpoints, the final model and ``summary.json`` to ``settings.out``."""
    from ..training.checkpoints import check_model_folder, resolve_resume
    from ..ratio.data import read_preference_file

    settings = resolve_defaults(settings)
    check_settings(settings)
    if settings.merge and not settings.lora:
        raise ValueError("--merge merges a LoRA adapter: it needs --lora")
    log(describe(settings))
    out = Path(settings.out)
    # every file is checked, its records included, before transformers is imported or anything loaded
    if settings.model is not None:
        if not Path(settings.model).is_dir():
            raise FileNotFoundError(f"model path not found: {settings.model} (a local folder; nothing is downloaded)")
        check_model_folder(Path(settings.model))
    parsed = {}                                  # path -> its records, read once
    for flag, path in (("--data", settings.data), ("--eval-data", settings.eval_data)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag}: no such file: {path}")
        if path is not None:
            parsed[path] = read_preference_file(path)
    resume = None if settings.resume is None else resolve_resume(out, settings.resume, log)

    import torch
    from transformers import TrainingArguments

    from ..data.preferences import PreferenceDataset, prepare_tokenizer
    from ..training.launch import check_engine, describe_engine
    from ..training.trainer import DoRATrainer

    model, tokenizer = _load_model(settings, log)
    prepare_tokenizer(tokenizer, log)
    data = Path(settings.data) if settings.data is not None else _embedded_data(out, settings.seed)
    layout = data_layout(settings.objective)
    dataset = PreferenceDataset.from_file(data, tokenizer, max_length=settings.max_length,
                                          max_prompt_length=settings.max_prompt_length,
                                          chat_as_text=settings.chat_as_text, parsed=parsed.get(settings.data), **layout)
    eval_set = None if settings.eval_data is None else PreferenceDataset.from_file(
        settings.eval_data, tokenizer, max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
        chat_as_text=settings.chat_as_text, parsed=parsed[settings.eval_data], **layout)
    if eval_set is not None and eval_set.group_size != dataset.group_size:
        raise ValueError(f"--eval-data {settings.eval_data}: {eval_set.group_size} responses per sample, the training "
                         f"data has {dataset.group_size}")
    if eval_set is not None and dataset.group_names:
        eval_set = eval_set.with_group_names(dataset.group_names)          # group ids by name, not position
    settings, weighting = _check_weighting(settings, dataset, log)
    unknown = dataset.unknown_share(getattr(tokenizer, "unk_token_id", None))
    if unknown > UNKNOWN_REFUSE and settings.model is None:
        raise ValueError(f"--data {data}: {unknown:.0%} of its tokens are unknown to the embedded default's toy "
                         "tokenizer, which knows only the toy vocabulary; train your own model with --model PATH")
    if unknown > UNKNOWN_WARN:
        log(f"robalign: WARNING: {unknown:.1%} of the data's tokens are the tokenizer's unknown token "
            f"({getattr(tokenizer, 'unk_token', None)!r}): the model cannot tell those words apart")
    if settings.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("--lora needs the `peft` package: pip install peft") from None
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(settings.batch_size, 8), gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr, num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        logging_steps=settings.logging_steps, logging_first_step=True, save_steps=settings.save_steps,
        save_total_limit=2, max_grad_norm=settings.max_grad_norm,
        report_to=[] if settings.report_to == "none" else [settings.report_to], seed=settings.seed,
        eval_strategy="steps" if eval_set is not None and settings.eval_steps else "no",
        eval_steps=settings.eval_steps, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        optim=settings.optim, bf16=settings.bf16, fsdp=settings.fsdp, fsdp_config=settings.fsdp_config or None,
        deepspeed=_deepspeed_config(settings.deepspeed, log), dataloader_drop_last=True, disable_tqdm=False,
        # a float warmup_steps in (0, 1) is a share of the steps (transformers 5)
        lr_scheduler_type="constant_with_warmup" if settings.warmup_ratio else "constant",
        warmup_steps=float(settings.warmup_ratio) if settings.warmup_ratio else 0,
    )
    trainer = DoRATrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_set,
                          processing_class=tokenizer, dora=settings)
    check_engine(trainer, settings)            # no silent fallback to another engine or to N independent runs
    if dataset.truncated_prompts or dataset.truncated_responses:
        log(f"robalign: truncated {dataset.truncated_prompts} prompts (from the left) and "
            f"{dataset.truncated_responses} responses (from the right) to max_length={settings.max_length}")
    start = time.perf_counter()
    if resume is not None:
        log(f"robalign: resuming from {resume}")
    try:
        result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    except (RuntimeError, ValueError, KeyError) as err:
        if resume is not None:
            raise ValueError(f"--resume {resume}: the checkpoint does not fit this model or run "
                             f"({str(err).splitlines()[0]})") from None
        raise
    evaluation = trainer.evaluate() if eval_set is not None else None
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    if settings.lora and settings.merge:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(str(out / "final"))
        (out / "final" / "adapter_model.safetensors").unlink(missing_ok=True)
        (out / "final" / "adapter_config.json").unlink(missing_ok=True)
        log(f"robalign: merged the LoRA adapter into the model: {out / 'final'} loads with "
            "AutoModelForCausalLM.from_pretrained")
    elif settings.lora:
        log(f"robalign: {out / 'final'} holds a LoRA adapter: load it with "
            "peft.AutoPeftModelForCausalLM.from_pretrained, or rerun with --merge for a plain model")
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "out": str(out), "data": str(data), "model": settings.model or "embedded tiny Llama",
        "samples": len(dataset), "group_size": dataset.group_size, "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size, "engine": describe_engine(trainer), "resumed_from": None if resume is None else str(resume),
        "reference_cache": trainer.reference_cache,
        "train_loss": result.training_loss, "seconds": round(time.perf_counter() - start, 1),
        "first_log": history[0] if history else None, "last_log": history[-1] if history else None,
        "truncated_prompts": dataset.truncated_prompts, "truncated_responses": dataset.truncated_responses,
        "settings": dataclasses.asdict(settings), "weighting": weighting, "eval": evaluation,
    }
    from ..._io import write_atomic

    if trainer.is_world_process_zero():
        write_atomic(out / "summary.json", lambda h: h.write(json.dumps(summary, indent=2, default=str).encode()))
        write_atomic(out / "final" / "README.md", lambda h: h.write(model_card(summary).encode()))
    return summary
