"""The one configuration of training: :class:`DoRAConfig` (the alignment settings that
:class:`~robalign.app.training.trainer.DoRATrainer` reads) and :class:`TrainSettings` (those plus the run:
model, data, optimisation, output), which is what ``robalign train`` and its YAML config take —
one set of keys, one check (:func:`check_settings`) naming the key (and the file) of a bad value.
Light on purpose: nothing heavy is imported here, so the command line can check a config before
it loads torch or transformers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .settings import (FLAG, MAPPING, NON_NEGATIVE, PATH, POSITIVE, POSITIVE_INT, TEXT, Check, between,
                       check_fields, one_of, setting)
from .settings import _is_int as _int, _is_real as _real

__all__ = ["DoRAConfig", "TrainSettings", "MODEL_DEFAULTS", "EMBEDDED_DEFAULTS", "check_settings", "describe",
           "load_settings", "reduction_of", "resolve_defaults", "settings_markdown"]


DRO_PARAMETER = {"kl": "lam", "kl-ball": "eta", "chi2": "rho", "cvar": "level", "group": "group_step"}
DRO_SETS = tuple(DRO_PARAMETER)


@dataclass
class DoRAConfig:
    """The alignment settings; ``transformers.TrainingArguments`` holds the optimisation ones.

    objective, beta: the :class:`robalign.Objective`; lam: KL-DRO's λ (:class:`robalign.KLDRO`). alpha: the target fraction, needed only
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
    see ``LossParams(reference_free=True)``.
    wpo: WPO's weighting (each sample's weight times its responses' ω, see ``LossParams(wpo=True)``).
    fused: the fused linear path (False: materialise logits, for models whose logits robalign cannot
    form from ``hidden @ Wᵀ + b`` and the head's known transforms). one_pass: on the fused linear path, the
    one-pass fused loss (False: the recompute path, for comparison). shuffle: shuffle the training samples.
    padding_free: pack each batch's rows into one row without padding (``position_ids`` restart at
    each row; the attention stays within each row), see :class:`~robalign.app.data.preferences.PreferenceCollator`.
    token_stats: log the policy's per-token entropy, mean logit and top-1 accuracy (TRL's ``entropy``,
    ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``) from the first micro-batch of each
    optimizer step and every evaluation batch. The one-pass loss forms them from its own products
    (a head without bias or soft-cap); elsewhere, and in evaluation, they take one more pass over the
    LM head, without gradient (:func:`robalign.ops.token_stats.token_stats`).
    objective_kwargs: the objective's other hyper-parameters.
    allow_zero_weight_steps: let an optimizer step whose samples all have DoRA weight 0 pass (it
    trains on nothing); by default such a step is an error, with ``use_weights``.
    average_logps: the objective reads per-token mean log-probs (``Objective(name, average_logps=True)``).
    """

    objective: str = setting(
        "dpo", "the base objective: a registered name, or a weighted sum such as dpo+0.5*sft",
        Check(lambda v, s: isinstance(v, (str, dict)), "an objective's name or {name: coefficient}"), parse="objective")
    beta: float = setting(0.1, "the objective's β", POSITIVE)
    lam: float = setting(1.0, "DRO temperature λ of dro=kl; inf: the weighted mean, < 0: a soft minimum", Check(
        lambda v, s: _real(v) and not math.isnan(v) and v != 0 and v != -math.inf,
        "a non-zero number (inf for the weighted mean)"))
    alpha: float | None = setting(None, "the target fraction α (needed with probs and no weights)",
                                  between(0, 1, low_open=True, optional=True))
    use_weights: bool = setting(True, "train on the data's `weights` or `probs`, the DoRA weights (off: unweighted)", FLAG,
                                flag="--no-weights", negated=True)
    exact_dro: bool = setting(True, "the DRO normaliser exact across micro-batches (off: per micro-batch, the cheaper approximation)", FLAG,
                              flag="--no-dro-exact", negated=True)
    dro: str = setting("kl", "the ambiguity set: kl (temperature --lam, DoRA's), kl-ball (radius --eta), chi2 "
                       "(radius --rho), cvar (--level, the worst fraction), group (group DRO over the data's "
                       "`group` field or sources, step --group-step)", one_of(*DRO_SETS), choices=DRO_SETS)
    eta: float = setting(0.1, "radius of the KL ball", NON_NEGATIVE)
    rho: float = setting(0.5, "radius of the χ² ball", NON_NEGATIVE)
    level: float = setting(0.2, "CVaR level: the worst fraction of the batch", between(0, 1, low_open=True))
    group_step: float = setting(0.01, "group DRO's exponentiated-gradient step η_q", NON_NEGATIVE)
    ld_alpha: float | None = setting(None, "LD-DPO: weight of the tokens past the shorter response of each pair",
                                     between(0, 1, optional=True))
    wpo: bool = setting(False, "WPO: weigh each sample by its responses' probability under the policy (per token)",
                        FLAG)
    fused: bool = setting(True, "the fused linear path (off: materialised logits, for models whose logits are not "
                          "hidden @ Wᵀ + b with a known transform)", FLAG, flag="--no-fused", negated=True)
    one_pass: bool = setting(True, "the one-pass fused loss (off: the recompute path, for comparison)", FLAG,
                             flag="--recompute", negated=True)
    shuffle: bool = setting(True, "shuffle the training samples (off: the data's order)", FLAG, flag="--no-shuffle",
                            negated=True)
    padding_free: bool = setting(False, "pack each batch's rows into one without padding (the attention stays "
                                 "within each row)", FLAG)
    token_stats: bool = setting(True, "log entropy, mean logits and token accuracy (off: one fewer pass over the "
                                "head where the one-pass loss cannot form them)", FLAG, flag="--no-token-stats",
                                negated=True)
    reference_free: bool = setting(False, "no reference model: the objective's reference log-probs are 0 (the DPO "
                                   "family)", FLAG)
    objective_kwargs: dict = setting(None, "another hyper-parameter of the objective, e.g. label_smoothing=0.1 or, "
                                     "for kto, desirable_weight=1.33 (repeatable)", MAPPING, flag="--objective-arg",
                                     parse="objective_hparam", metavar="NAME=VALUE", cli={"action": "append"},
                                     factory=dict)
    allow_zero_weight_steps: bool = setting(False, "let an optimizer step whose samples all have DoRA weight 0 "
                                            "pass (by default an error: it trains on nothing)", FLAG)
    average_logps: bool = setting(False, "the objective reads per-token mean log-probs, logp/|y| (Liger's "
                                  "average_log_prob; dpo with it is dpo_norm)", FLAG)

    def build_loss(self, *, reduction=None, group_names=(), data: str = "the training data", group_size=None,
                   head=None):
        """The :class:`~robalign.FusedLinearDoRALoss` these settings describe — the one place a loss is
        built from settings (the trainer, every TRL drop-in and the demo call it); it takes hidden
        states and the head, and, as every :class:`~robalign.DoRALoss`, log-probs (``per_sample``).

        reduction: a reduction object in place of the one ``dro`` and its parameter name (the TRL
        drop-ins' ``reduction=``); group_names and data: the groups of ``dro="group"`` and the data
        named when there are none; group_size: candidates per sample (``None``: the objective's);
        head: the model's LM-head transform, a :class:`robalign.HeadTransform` (see
        :func:`robalign.app.training.causal_lm.head_transform`)."""
        from ...losses.loss import FusedLinearDoRALoss
        from ...losses.objectives import Objective, hyperparameters, resolve
        from ...losses.options import LossParams
        from ...losses.weights import DoRAWeights

        if reduction is None:
            reduction = reduction_of(self, group_names, data)
        hparams = dict(self.objective_kwargs)
        if "beta" in hyperparameters(resolve(self.objective)):
            hparams["beta"] = self.beta
        return FusedLinearDoRALoss(
            Objective(self.objective, average_logps=self.average_logps, **hparams), reduction,
            None if self.alpha is None else DoRAWeights(self.alpha), head,
            LossParams(group_size=group_size, one_pass=self.one_pass, ld_alpha=self.ld_alpha, wpo=self.wpo,
                       reference_free=self.reference_free))



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

    out: str = setting("out/train", "output folder", TEXT)
    model: str | None = setting(None, "local Hugging Face model folder (none: the embedded tiny Llama)", PATH)
    data: str | None = setting(None, "listwise, pairwise or unpaired (KTO) JSONL, or a saved dataset folder (none: "
                               "the embedded toy preferences)", PATH)
    lr: float | None = setting(None, "learning rate", POSITIVE, per_model=True)
    optim: str = setting("adamw_torch", "the Trainer's optimizer (TrainingArguments.optim)", TEXT)
    epochs: float = setting(1.0, "passes over the data", POSITIVE)
    max_steps: int = setting(-1, "optimizer steps, overriding --epochs (-1: by epochs)", Check(
        lambda v, s: _int(v) and (v == -1 or v >= 1), "-1 (train for `epochs`) or an integer >= 1"))
    batch_size: int | None = setting(None, "samples per device per micro-batch", POSITIVE_INT, per_model=True)
    grad_accum: int | None = setting(None, "micro-batches per optimizer step", POSITIVE_INT, per_model=True)
    max_length: int | None = setting(None, "tokens per row, prompt included", Check(
        lambda v, s: _int(v) and v > (s.max_prompt_length or 0),
        "an integer above max_prompt_length ({settings.max_prompt_length})"), per_model=True)
    max_prompt_length: int | None = setting(None, "prompt tokens kept", POSITIVE_INT, per_model=True)
    lora: bool = setting(False, "train LoRA adapters (needs peft)", FLAG)
    merge: bool = setting(False, "with --lora: merge the adapter into the model, so final/ loads as a plain model",
                          FLAG)
    bf16: bool = setting(False, "bfloat16 mixed precision (autocast; the fused LM head runs in bfloat16)", FLAG)
    fsdp: str = setting("", "FSDP options for TrainingArguments, e.g. 'full_shard auto_wrap'; launch with "
                        "torchrun or accelerate", TEXT)
    fsdp_config: dict = setting(None, "FSDP's fsdp_config as a JSON object, e.g. '{\"min_num_params\": 1000}'",
                                MAPPING, parse="json", metavar="JSON", factory=dict)
    deepspeed: str | None = setting(None, "DeepSpeed JSON config for TrainingArguments (ZeRO-3 heads use the "
                                    "logits path)", PATH)
    seed: int = setting(0, "the run's seed", Check(lambda v, s: _int(v) and v >= 0, "an integer >= 0"))
    logging_steps: int = setting(5, "log every N optimizer steps; the first and last are always logged",
                                 POSITIVE_INT)
    save_steps: int = setting(50, "checkpoint every N optimizer steps", POSITIVE_INT)
    max_grad_norm: float = setting(1.0, "clip the gradient's global norm at this value each optimizer step (0: no "
                                   "clipping)", between(0, math.inf))
    warmup_ratio: float = setting(0.0, "the share of the optimizer steps over which the learning rate rises "
                                  "linearly from 0 (then constant)", between(0, 1, high_open=True))
    resume: str | None = setting(None, "resume from a checkpoint folder (the flag alone: the latest)", PATH,
                                 cli={"nargs": "?", "const": "latest"})
    eval_data: str | None = setting(None, "held-out preference file: eval loss and reward accuracy/margin at the "
                                    "end (and every --eval-steps)", PATH, metavar="FILE")
    eval_steps: int | None = setting(None, "evaluate every N optimizer steps (none: at the end only)", Check(
        lambda v, s: v is None or (_int(v) and v >= 1), "an integer >= 1 (or null: at the end only)"))
    report_to: str = setting("none", "experiment tracker (its package must be installed)",
                             one_of("none", "tensorboard", "wandb", "all"),
                             choices=("none", "tensorboard", "wandb", "all"))
    chat_as_text: bool = setting(False, "conversational prompts as 'role: content' lines when the tokenizer has no "
                                 "chat template (without it such data is refused)", FLAG)


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
    from ...losses import objectives

    check_fields(settings, where)
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


def settings_markdown(cls=None) -> str:
    """``docs/settings.md``: every setting of ``robalign train`` (and of ``DoRAConfig``, the first
    rows), generated from the fields (``make settings-table`` writes it; a test checks it is current)."""
    from .settings import settings_table

    cls = cls or TrainSettings
    return ("# Settings\n\nEvery setting of `robalign train`: its YAML key, its flag (a flag wins over the "
            "file), its default, what it accepts and what it does. The alignment settings — `objective` to "
            "`average_logps` — are also `DoRAConfig`'s, which `DoRATrainer` takes. Generated from the fields "
            "of `robalign/app/training/config.py` by `make settings-table`; do not edit by hand.\n\n"
            + settings_table(cls, MODEL_DEFAULTS, EMBEDDED_DEFAULTS))


def load_settings(config_path=None, cls=None, **overrides) -> TrainSettings:
    """Settings (a ``cls``, default :class:`TrainSettings`) from a YAML file (optional) with
    ``overrides`` (non-None values) on top, checked (:func:`check_settings`); errors name the file
    and the key."""
    cls = cls or TrainSettings
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(loaded) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = resolve_defaults(cls(**values))
    check_settings(settings, where)
    return settings


def reduction_of(settings: DoRAConfig, group_names=(), data: str = "the training data"):
    """The :class:`~robalign.losses.reductions.Reduction` that ``settings.dro`` names, with its
    parameter; ``group`` is over ``group_names`` (the dataset's, which ``data`` names in the error
    when there are none)."""
    from ...losses.reductions import REDUCTIONS, GroupDRO

    if settings.dro == "group":
        if not group_names:
            raise ValueError(f"dro=group: every sample of {data} needs a group (a `group` field, or the "
                             "responses' `sources` / `source`)")
        return GroupDRO(len(group_names), settings.group_step, names=group_names)
    return REDUCTIONS[settings.dro](getattr(settings, DRO_PARAMETER[settings.dro]))
