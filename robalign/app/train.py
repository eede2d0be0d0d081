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


# kind and range of every setting; a YAML value of another type is refused with its key named
_BOOL = ("use_weights", "exact_dro", "fused", "lora", "bf16", "shuffle")
_OPTIONAL_STR = ("model", "data", "deepspeed", "resume")
_POSITIVE_INT = ("batch_size", "grad_accum", "max_prompt_length", "logging_steps", "save_steps")
_POSITIVE_FLOAT = ("beta", "lr", "epochs")


def check_settings(settings: TrainSettings, where: str = "settings") -> None:
    """Every field of ``settings`` has its type and lies in its range; ``where`` prefixes the
    message (a config file's path). Raises ValueError naming the key."""
    import math
    import numbers

    from ..losses import objectives

    def bad(key, expected):
        value = getattr(settings, key)
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} of {len(str(value))} characters"
        raise ValueError(f"{where}: `{key}` must be {expected}, got {shown}")

    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    for key in _BOOL:
        if not isinstance(getattr(settings, key), bool):
            bad(key, "true or false")
    for key in ("out", "objective", "optim", "fsdp"):
        if not isinstance(getattr(settings, key), str):
            bad(key, "a string")
    for key in _OPTIONAL_STR:
        if getattr(settings, key) is not None and not isinstance(getattr(settings, key), str):
            bad(key, "a string (a path)")
    for key in _POSITIVE_INT:
        if not is_int(getattr(settings, key)) or getattr(settings, key) < 1:
            bad(key, "an integer >= 1")
    if not is_int(settings.max_length) or settings.max_length <= settings.max_prompt_length:
        bad("max_length", f"an integer above max_prompt_length ({settings.max_prompt_length})")
    if not is_int(settings.max_steps) or not (settings.max_steps == -1 or settings.max_steps >= 1):
        bad("max_steps", "-1 (train for `epochs`) or an integer >= 1")
    if not is_int(settings.seed) or settings.seed < 0:
        bad("seed", "an integer >= 0")
    for key in _POSITIVE_FLOAT:
        value = getattr(settings, key)
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            bad(key, "a finite number > 0")
    if not is_real(settings.lam) or math.isnan(settings.lam) or settings.lam == 0 or settings.lam == -math.inf:
        bad("lam", "a non-zero number (inf for the weighted mean)")
    if settings.alpha is not None and (not is_real(settings.alpha) or not 0 < settings.alpha <= 1):
        bad("alpha", "a number in (0, 1]")
    if settings.objective not in objectives.NAMES:
        bad("objective", f"one of {', '.join(objectives.NAMES)}")
    for key in ("fsdp_config", "objective_kwargs"):
        if not isinstance(getattr(settings, key), dict):
            bad(key, "a mapping (key: value)")
    try:
        objectives.check_hyperparameters(settings.objective, settings.objective_kwargs, where=where)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: `objective_kwargs`: {str(err).split(': ', 1)[-1]}") from None


def _yaml_loader():
    """PyYAML's safe loader, reading ``5e-4`` as a float (YAML 1.2; YAML 1.1 reads it as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def load_settings(config_path=None, **overrides) -> TrainSettings:
    """Settings from a YAML file (optional) with ``overrides`` (non-None values) on top, checked
    (:func:`check_settings`); errors name the file and the key."""
    values = {}
    where = "settings"
    if config_path is not None:
        import yaml

        path = Path(config_path)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader()) or {}
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-8") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of setting: value")
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(str(k) for k in set(loaded) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = TrainSettings(**values)
    check_settings(settings, where)
    return settings


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
    from .toy import ToySettings, make_toy_data, write_jsonl

    train, _ = make_toy_data(ToySettings(n_train=400, n_test=0, seed=seed, target_fraction=1.0, flip_rate=0.0))
    return write_jsonl(out / "data" / "train.jsonl", train, fields=("prompt", "chosen", "rejected"))


def run_training(settings: TrainSettings, log=print) -> dict:
    """Train; write checkpoints, the final model and ``summary.json`` to ``settings.out``."""
    import torch
    from transformers import TrainingArguments

    from .data import PreferenceDataset, prepare_tokenizer
    from .trainer import DoRAConfig, DoRATrainer

    from .checkpoints import check_model_folder, resolve_resume

    check_settings(settings)
    out = Path(settings.out)
    # every file is checked before anything is loaded
    if settings.model is not None:
        if not Path(settings.model).is_dir():
            raise FileNotFoundError(f"model path not found: {settings.model} (a local folder; nothing is downloaded)")
        check_model_folder(Path(settings.model))
    if settings.data is not None and not Path(settings.data).is_file():
        raise FileNotFoundError(f"--data: no such file: {settings.data}")
    resume = None if settings.resume is None else resolve_resume(out, settings.resume, log)
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
    if resume is not None:
        log(f"robalign: resuming from {resume}")
    try:
        result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
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
        "world_size": trainer.args.world_size, "resumed_from": None if resume is None else str(resume),
        "reference_cache": trainer.reference_cache,
        "train_loss": result.training_loss, "seconds": round(time.perf_counter() - start, 1),
        "first_log": history[0] if history else None, "last_log": history[-1] if history else None,
        "truncated_prompts": dataset.truncated_prompts, "truncated_responses": dataset.truncated_responses,
        "settings": dataclasses.asdict(settings),
    }
    from .._io import write_atomic

    write_atomic(out / "summary.json", lambda h: h.write(json.dumps(summary, indent=2, default=str).encode()))
    return summary
