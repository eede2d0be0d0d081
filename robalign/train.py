"""``robalign train``: a causal LM, a preference file → a DoRA-trained policy and a summary.

With no model and no data it trains the embedded default: a small Llama-architecture model
built from ``assets/tiny_llama.json`` with a word-level tokenizer of the toy vocabulary, on a
seeded toy preference set (:mod:`robalign.toy`), in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrainSettings", "run_training", "load_settings", "embedded_model"]

ASSETS = Path(__file__).parent / "assets"


@dataclass
class TrainSettings:
    """Everything ``robalign train`` takes (a YAML config uses the same keys); the fields named
    like :class:`robalign.trainer.DoRAConfig`'s are handed to it as they are."""

    out: str = "out/train"
    model: str | None = None
    data: str | None = None
    objective: str = "dpo"
    beta: float = 0.1
    lam: float = 1.0
    alpha: float | None = None
    use_weights: bool = True
    exact_dro: bool = True
    fused: bool = True
    lr: float = 5e-4
    optim: str = "adamw_torch"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 2
    max_length: int = 64
    max_prompt_length: int = 32
    lora: bool = False
    bf16: bool = False
    fsdp: str = ""
    fsdp_config: dict = field(default_factory=dict)
    deepspeed: str | None = None
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 50
    resume: str | None = None
    shuffle: bool = True
    objective_kwargs: dict = field(default_factory=dict)


def load_settings(config_path=None, **overrides) -> TrainSettings:
    """Settings from a YAML file (optional) with ``overrides`` (non-None values) on top."""
    values = {}
    if config_path is not None:
        import yaml

        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of setting: value")
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


def embedded_model(seed: int = 0):
    """The embedded default: (a tiny Llama from ``assets/tiny_llama.json``, the word-level
    tokenizer of the toy data's vocabulary), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .toy import toy_tokenizer

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
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path} (a local folder; nothing is downloaded)")
    attn = "sdpa"
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            attn = "flash_attention_2"
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation=attn)
    log(f"robalign: loaded {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"attention: {attn})")
    return model, tokenizer


def _embedded_data(out: Path, seed: int) -> Path:
    from .toy import ToySettings, make_toy_data, write_jsonl

    train, _ = make_toy_data(ToySettings(n_train=400, n_test=0, seed=seed, target_fraction=1.0, flip_rate=0.0))
    return write_jsonl(out / "data" / "train.jsonl", train, fields=("prompt", "chosen", "rejected"))


def run_training(settings: TrainSettings, log=print) -> dict:
    """Train; write checkpoints, the final model and ``summary.json`` to ``settings.out``."""
    import torch
    from transformers import TrainingArguments

    from .data import PreferenceDataset, prepare_tokenizer
    from .trainer import DoRAConfig, DoRATrainer

    out = Path(settings.out)
    model, tokenizer = _load_model(settings, log)
    prepare_tokenizer(tokenizer, log)
    data = Path(settings.data) if settings.data is not None else _embedded_data(out, settings.seed)
    dataset = PreferenceDataset.from_file(data, tokenizer, max_length=settings.max_length,
                                          max_prompt_length=settings.max_prompt_length)
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
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        report_to=[], seed=settings.seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        optim=settings.optim, bf16=settings.bf16, fsdp=settings.fsdp, fsdp_config=settings.fsdp_config or None,
        deepspeed=settings.deepspeed, lr_scheduler_type="constant", warmup_steps=0, dataloader_drop_last=True, disable_tqdm=False,
    )
    dora = DoRAConfig(**{f.name: copy.copy(getattr(settings, f.name)) for f in dataclasses.fields(DoRAConfig)})
    trainer = DoRATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, dora=dora)
    if dataset.truncated_prompts or dataset.truncated_responses:
        log(f"robalign: truncated {dataset.truncated_prompts} prompts (from the left) and "
            f"{dataset.truncated_responses} responses (from the right) to max_length={settings.max_length}")
    start = time.perf_counter()
    resume = settings.resume
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint folder not found: {resume}")
    try:
        result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    except (RuntimeError, ValueError, KeyError) as err:
        if resume is not None:
            raise ValueError(f"--resume {resume}: the checkpoint does not fit this model or run "
                             f"({str(err).splitlines()[0]})") from None
        raise
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "out": str(out), "data": str(data), "model": settings.model or "embedded tiny Llama",
        "samples": len(dataset), "group_size": dataset.group_size, "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "train_loss": result.training_loss, "seconds": round(time.perf_counter() - start, 1),
        "first_log": history[0] if history else None, "last_log": history[-1] if history else None,
        "truncated_prompts": dataset.truncated_prompts, "truncated_responses": dataset.truncated_responses,
        "settings": dataclasses.asdict(settings),
    }
    from ._io import write_atomic

    write_atomic(out / "summary.json", lambda h: h.write(json.dumps(summary, indent=2, default=str).encode()))
    return summary
