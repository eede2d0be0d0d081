"""The one configuration of training: :class:`DoRAConfig` (the alignment settings that
:class:`~robalign.app.trainer.DoRATrainer` reads) and :class:`TrainSettings` (those plus the run:
model, data, optimisation, output), which is what ``robalign train`` and its YAML config take —
one set of keys, one check (:func:`check_settings`) naming the key (and the file) of a bad value.
Light on purpose: nothing heavy is imported here, so the command line can check a config before
it loads torch or transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DoRAConfig", "TrainSettings", "MODEL_DEFAULTS", "EMBEDDED_DEFAULTS", "check_settings", "describe",
           "load_settings", "reduction_of", "resolve_defaults"]


@dataclass
class DoRAConfig:
    """The alignment settings; ``transformers.TrainingArguments`` holds the optimisation ones.

    objective, beta, lam: as :class:`robalign.DoRALoss`. alpha: the target fraction, needed only
    when the data carries ``probs`` and no ``weights``. use_weights: use the data's ``weights``
    (from ``robalign weigh``) or ``probs``; False trains without DoRA weights.
    exact_dro: the exact accumulator (False: the per-micro-batch approximation).
    dro: the ambiguity set (:data:`robalign.losses.reductions.REDUCTIONS`): ``kl`` (temperature
    ``lam``, DoRA's), ``kl-ball`` (radius ``eta``), ``chi2`` (radius ``rho``), ``cvar`` (``level``,
    the worst fraction; not DoRA's α). The last three weigh each sample against the whole batch:
    with several micro-batches a no-grad forward over the step's micro-batches fixes the weights
    first (one extra forward per micro-batch), or ``exact_dro`` False approximates per micro-batch.
    ``group``: group DRO over the data's groups (each sample's ``group`` field, else its source),
    q moved by exponentiated gradient with step ``group_step`` once per optimizer step (the same
    pre-pass with several micro-batches).
    ld_alpha: LD-DPO's weight of the tokens past the shorter response (``None``: plain log-probs).
    reference_free: the objective's reference log-probs taken as 0 (no reference model is run),
    see ``DoRALoss(reference_free=True)``.
    wpo: WPO's weighting (each sample's weight times its responses' ω, see ``DoRALoss(wpo=True)``).
    fused: the fused linear path (False: materialise logits, for models whose logits robalign cannot
    form from ``hidden @ Wᵀ + b`` and the head's known transforms). one_pass: on the fused linear path, the
    one-pass fused loss (False: the recompute path, for comparison). shuffle: shuffle the training samples.
    padding_free: pack each batch's rows into one row without padding (``position_ids`` restart at
    each row; the attention stays within each row), see :class:`~robalign.app.data.PreferenceCollator`.
    token_stats: log the policy's per-token entropy and mean logit (TRL's ``entropy``, ``logits/chosen``,
    ``logits/rejected``) from the first micro-batch of each optimizer step and every evaluation batch:
    one more pass over the LM head there, without gradient (:func:`robalign.ops.token_stats.token_stats`).
    objective_kwargs: the objective's other hyper-parameters.
    allow_zero_weight_steps: let an optimizer step whose samples all have DoRA weight 0 pass (it
    trains on nothing); by default such a step is an error, with ``use_weights``.
    average_logps: the objective reads per-token mean log-probs (``DoRALoss(average_logps=True)``).
    """

    objective: str = "dpo"
    beta: float = 0.1
    lam: float = 1.0
    alpha: float | None = None
    use_weights: bool = True
    exact_dro: bool = True
    dro: str = "kl"
    eta: float = 0.1
    rho: float = 0.5
    level: float = 0.2
    group_step: float = 0.01
    ld_alpha: float | None = None
    wpo: bool = False
    fused: bool = True
    one_pass: bool = True
    shuffle: bool = True
    padding_free: bool = False
    token_stats: bool = True
    reference_free: bool = False
    objective_kwargs: dict = field(default_factory=dict)
    allow_zero_weight_steps: bool = False
    average_logps: bool = False

    def build_loss(self, *, reduction=None, group_names=(), data: str = "the training data", group_size=None,
                   head: dict | None = None):
        """The :class:`~robalign.DoRALoss` these settings describe — the one place a loss is built
        from settings (the trainer, every TRL drop-in and the demo call it).

        reduction: a reduction object in place of the one ``dro`` and its parameter name (the TRL
        drop-ins' ``reduction=``); group_names and data: the groups of ``dro="group"`` and the data
        named when there are none; group_size: candidates per sample (``None``: the objective's);
        head: the model's LM-head transform as ``DoRALoss`` keyword arguments (see
        :func:`robalign.ops.head.head_transform`)."""
        from ..losses.loss import DoRALoss

        if reduction is None:
            reduction = reduction_of(self, group_names, data)
        return DoRALoss(self.objective, beta=self.beta, reduction=reduction, alpha=self.alpha, group_size=group_size,
                        one_pass=self.one_pass, ld_alpha=self.ld_alpha, wpo=self.wpo,
                        reference_free=self.reference_free, average_logps=self.average_logps, **(head or {}),
                        **self.objective_kwargs)


DRO_PARAMETER = {"kl": "lam", "kl-ball": "eta", "chi2": "rho", "cvar": "level", "group": "group_step"}
DRO_SETS = tuple(DRO_PARAMETER)

# Settings whose sensible value depends on the model: a real model (``--model``) gets the usual
# values for DPO-style fine-tuning of a 1–8B model (TRL's DPO default learning rate, an effective
# batch of 32 sequences pairs, 1024-token rows); the embedded 0.1M-parameter default its own.
MODEL_DEFAULTS = {"lr": 1e-6, "batch_size": 4, "grad_accum": 8, "max_length": 1024, "max_prompt_length": 512}
EMBEDDED_DEFAULTS = {"lr": 5e-4, "batch_size": 8, "grad_accum": 2, "max_length": 64, "max_prompt_length": 32}


@dataclass
class TrainSettings(DoRAConfig):
    """Everything ``robalign train`` takes (a YAML config uses the same keys): the alignment
    settings of :class:`DoRAConfig`, which the trainer reads from this object as they are, and
    the run's. ``None`` in a field of :data:`MODEL_DEFAULTS` means "the default for this model"
    (:func:`resolve_defaults`): :data:`MODEL_DEFAULTS` with ``--model``, else
    :data:`EMBEDDED_DEFAULTS`. ``chat_as_text``: conversational prompts (lists of messages) as
    ``role: content`` lines when the tokenizer has no chat template (without it such data is
    refused: the model would learn a format it is never prompted with). ``warmup_ratio``: the share
    of the optimizer steps over which the learning rate rises linearly from 0 (then constant)."""

    out: str = "out/train"
    model: str | None = None
    data: str | None = None
    lr: float | None = None
    optim: str = "adamw_torch"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int | None = None
    grad_accum: int | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    lora: bool = False
    merge: bool = False
    bf16: bool = False
    fsdp: str = ""
    fsdp_config: dict = field(default_factory=dict)
    deepspeed: str | None = None
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 50
    warmup_ratio: float = 0.0
    resume: str | None = None
    eval_data: str | None = None
    eval_steps: int | None = None
    report_to: str = "none"
    chat_as_text: bool = False


def resolve_defaults(settings: TrainSettings) -> TrainSettings:
    """``settings`` with every ``None`` of :data:`MODEL_DEFAULTS`'s fields filled for its model."""
    defaults = MODEL_DEFAULTS if settings.model is not None else EMBEDDED_DEFAULTS
    return dataclasses.replace(settings, **{k: v for k, v in defaults.items() if getattr(settings, k) is None})


def describe(settings: TrainSettings) -> str:
    """One line of the settings that shape a run, for the log at its start."""
    keys = ("objective", "beta", "dro", DRO_PARAMETER.get(settings.dro, "lam"), "lr", "batch_size", "grad_accum", "max_length", "max_prompt_length",
            "epochs", "max_steps", "seed")
    return "robalign: settings " + ", ".join(f"{k}={getattr(settings, k)}" for k in keys)


def check_settings(settings: DoRAConfig, where: str = "settings") -> None:
    """Every field of ``settings`` (a :class:`DoRAConfig` or :class:`TrainSettings`) has its type
    and lies in its range; ``where`` prefixes the message (a config file's path). Raises
    ValueError naming the key."""
    import math
    import numbers

    from ..losses import objectives

    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    positive_int = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
    positive_float = (lambda v: is_real(v) and math.isfinite(v) and v > 0, "a finite number > 0")
    flag = (lambda v: isinstance(v, bool), "true or false")
    text = (lambda v: isinstance(v, str), "a string")
    path = (lambda v: v is None or isinstance(v, str), "a string (a path)")
    mapping = (lambda v: isinstance(v, dict), "a mapping (key: value)")
    prompt = getattr(settings, "max_prompt_length", 0) or 0
    rules = {
        "objective": (lambda v: isinstance(v, (str, dict)), "an objective's name or {name: coefficient}"),
        "beta": positive_float, "lr": positive_float, "epochs": positive_float,
        "lam": (lambda v: is_real(v) and not math.isnan(v) and v != 0 and v != -math.inf,
                "a non-zero number (inf for the weighted mean)"),
        "alpha": (lambda v: v is None or (is_real(v) and 0 < v <= 1), "a number in (0, 1]"),
        "use_weights": flag, "wpo": flag, "exact_dro": flag, "fused": flag, "one_pass": flag, "shuffle": flag, "padding_free": flag, "token_stats": flag, "reference_free": flag, "lora": flag, "merge": flag, "bf16": flag,
        "chat_as_text": flag, "allow_zero_weight_steps": flag, "average_logps": flag,
        "warmup_ratio": (lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
        "dro": (lambda v: v in DRO_SETS, f"one of {', '.join(DRO_SETS)}"),
        "eta": (lambda v: is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "rho": (lambda v: is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "level": (lambda v: is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
        "group_step": (lambda v: is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "ld_alpha": (lambda v: v is None or (is_real(v) and 0 <= v <= 1), "a number in [0, 1] (or null)"),
        "objective_kwargs": mapping, "fsdp_config": mapping,
        "out": text, "optim": text, "fsdp": text,
        "model": path, "data": path, "deepspeed": path, "resume": path, "eval_data": path,
        "eval_steps": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1 (or null: at the end only)"),
        "report_to": (lambda v: isinstance(v, str) and v in ("none", "tensorboard", "wandb", "all"),
                      "one of none, tensorboard, wandb, all"),
        "batch_size": positive_int, "grad_accum": positive_int, "max_prompt_length": positive_int,
        "logging_steps": positive_int, "save_steps": positive_int,
        "max_length": (lambda v: is_int(v) and v > prompt, f"an integer above max_prompt_length ({prompt})"),
        "max_steps": (lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (train for `epochs`) or an integer >= 1"),
        "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    }
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        ok, expected = rules[f.name]
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} of {len(str(value))} characters"
            raise ValueError(f"{where}: `{f.name}` must be {expected}, got {shown}")
    try:
        name = objectives.resolve(settings.objective)
    except ValueError as err:
        raise ValueError(f"{where}: `objective`: {err}") from None
    if "beta" in settings.objective_kwargs:       # DoRALoss takes beta once: as the setting
        raise ValueError(f"{where}: `objective_kwargs`: `beta` is a setting of its own: give it as --beta (YAML "
                         f"`beta: {settings.objective_kwargs['beta']}`), not as an objective argument")
    try:
        objectives.check_hyperparameters(name, settings.objective_kwargs, where=where)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: `objective_kwargs`: {str(err).split(': ', 1)[-1]}") from None
    if settings.padding_free and (settings.ld_alpha is not None or settings.wpo):
        raise ValueError(f"{where}: `padding_free` packs the rows; `ld_alpha` and `wpo` read padded ones (use one or "
                         "the other)")


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
    settings = resolve_defaults(TrainSettings(**values))
    check_settings(settings, where)
    return settings


def reduction_of(settings: DoRAConfig, group_names=(), data: str = "the training data"):
    """The :class:`~robalign.losses.reductions.Reduction` that ``settings.dro`` names, with its
    parameter; ``group`` is over ``group_names`` (the dataset's, which ``data`` names in the error
    when there are none)."""
    from ..losses.reductions import REDUCTIONS, GroupDRO

    if settings.dro == "group":
        if not group_names:
            raise ValueError(f"dro=group: every sample of {data} needs a group (a `group` field, or the "
                             "responses' `sources` / `source`)")
        return GroupDRO(len(group_names), settings.group_step, names=group_names)
    return REDUCTIONS[settings.dro](getattr(settings, DRO_PARAMETER[settings.dro]))
