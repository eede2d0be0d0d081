"""DoRA in a TRL script: ``DoRADPOTrainer`` and ``DoRADPOConfig`` replace TRL's ``DPOTrainer`` and
``DPOConfig``, ``DoRAKTOTrainer`` and ``DoRAKTOConfig`` its ``KTOTrainer`` and ``KTOConfig`` (written
against TRL 1.16), keeping TRL's data handling (datasets, tokenisation, chat templates, its
collator), reference model, logging and callbacks. What changes:

    the loss      TRL's loss types (``loss_type``, ``loss_weights``, ``beta``, ``label_smoothing``) as
                  robalign objectives (:data:`TRL_LOSS_TYPES`; several types: a mixture), with the
                  per-sample weights of a dataset column and the DRO reduction — exact across
                  gradient accumulation and data-parallel ranks (:class:`~robalign.app.training.trainer.DoRATrainer`'s steps)
    the log-probs robalign's fused paths on the decoder's hidden states and the LM head (the
                  one-pass loss by default), on TRL's batch reordered to robalign's group-major rows

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer
    args = DoRADPOConfig(output_dir="out", dora_lam=1.0, dora_weights_column="weight")   # any DPOConfig field too
    DoRADPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

One deliberate difference: ``label_smoothing`` with ``loss_type="sigmoid"`` applies cDPO's
smoothing here; TRL 1.16's ``sigmoid`` ignores it. With ``dora_lam=inf`` and no weights column the
objective is TRL's own (tested: the same losses
and parameters as TRL's ``DPOTrainer``, step for step). TRL options robalign does not implement
yet (vision data, ``ld_alpha`` with precomputed reference log-probs) are refused at
construction with a clear error; ``f_divergence_type`` maps to :func:`robalign.objectives.with_divergence`.
``padding_free`` packs each batch's rows into one without padding (:func:`robalign.app.data.preferences.pack_padded`),
which TRL 1.16's own DPOTrainer has switched off ("temporarily unavailable").

KTO (``loss_type`` ``kto`` or ``apo_zero_unpaired``): TRL's unpaired batch (one completion per row,
its ``label``, the mismatched ``KL_`` rows) becomes robalign's unpaired layout (:mod:`robalign.losses.unpaired`);
``desirable_weight`` and ``undesirable_weight`` are the objective's. TRL's pairing of the mismatched rows
(each completion with the previous example's prompt, in its fixed-order batches) is kept as it is.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from ...losses.layout import pairs_to_group_major
from ...losses.objectives import hyperparameters, resolve, with_divergence
from ...ground_truth.objectives import _log1mexp
from .config import DoRAConfig
from ..data.preferences import pack_padded
from .causal_lm import mismatched_batch, policy_logps
from .trainer import DoRATrainer

try:
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
except ImportError as err:                      # the `bench` extra pins TRL; say so instead of a bare ImportError
    raise ImportError("robalign.trl needs TRL (pip install 'trl==1.16.0', or robalign[bench])") from err

__all__ = ["DoRADPOConfig", "DoRADPOTrainer", "DoRAKTOConfig", "DoRAKTOTrainer", "DoRACPOConfig", "DoRACPOTrainer",
           "DoRAORPOConfig", "DoRAORPOTrainer", "TRL_LOSS_TYPES", "TRL_KTO_LOSS_TYPES", "objective_of",
           "cpo_objective_of"]

#: TRL 1.16 DPO loss type → robalign objective (``sigmoid`` is DPO; TRL's ``ipo`` and ``sigmoid_norm``
#: divide log-ratios by the completion length: robalign's ``ipo_norm`` and ``dpo_norm``)
TRL_LOSS_TYPES = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo_norm", "robust": "robust", "exo_pair": "exo_pair",
                  "nca_pair": "nca_pair", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "apo_zero": "apo_zero",
                  "apo_down": "apo_down", "discopop": "discopop", "sigmoid_norm": "dpo_norm", "sft": "sft",
                  "aot": "aot", "aot_unpaired": "aot_unpaired"}
#: TRL 1.16 KTO loss type → robalign objective (the same names)
TRL_KTO_LOSS_TYPES = {"kto": "kto", "apo_zero_unpaired": "apo_zero_unpaired"}


@dataclass
class DoRAArguments:
    """DoRA's settings, added to a TRL config.

    dora_lam: the KL-DRO temperature λ (``inf``: the weighted mean; TRL's objective when no weights).
    dora_weights_column: the dataset column of per-sample weights (a number, or one per response:
        their mean) — e.g. ``robalign weigh``'s ``weights``; ``None`` or a missing column: no weights.
    dora_exact: the exact accumulator across micro-batches (False: per micro-batch).
    dora_one_pass: the one-pass fused loss (False: the recompute path).
    """

    dora_lam: float = field(default=1.0, metadata={"help": "KL-DRO temperature λ (inf: the weighted mean)"})
    dora_weights_column: str | None = field(default="weight", metadata={"help": "per-sample weight column"})
    dora_exact: bool = field(default=True, metadata={"help": "exact DRO across gradient accumulation"})
    dora_one_pass: bool = field(default=True, metadata={"help": "the one-pass fused loss"})


@dataclass
class DoRADPOConfig(DoRAArguments, DPOConfig):
    """TRL's ``DPOConfig`` and DoRA's settings (:class:`DoRAArguments`)."""


@dataclass
class DoRAKTOConfig(DoRAArguments, KTOConfig):
    """TRL's ``KTOConfig`` and DoRA's settings (:class:`DoRAArguments`), and ``padding_free`` (as
    ``DPOConfig``'s: each batch's rows packed into one, without padding)."""

    padding_free: bool = field(default=False, metadata={"help": "pack the rows of a batch, no padding"})


def objective_of(args) -> tuple[str, dict]:
    """``(objective, hyper-parameters)`` for a ``DPOConfig``'s loss settings; raises ValueError for
    what has no robalign counterpart yet."""
    where = "robalign DoRADPOTrainer"
    if getattr(args, "ld_alpha", None) is not None and getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(f"{where}: `ld_alpha` with `precompute_ref_log_probs=True` is not supported yet (the "
                         "precomputed reference log-probs are not split); compute the reference every step")
    types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    weights = list(getattr(args, "loss_weights", None) or [1.0] * len(types))
    terms = {}
    for loss_type, weight in zip(types, weights, strict=True):
        if loss_type not in TRL_LOSS_TYPES:
            raise ValueError(f"{where}: TRL loss type {loss_type!r} has no robalign objective (supported: "
                             f"{', '.join(TRL_LOSS_TYPES)})")
        name = TRL_LOSS_TYPES[loss_type]
        divergence = getattr(args, "f_divergence_type", None) or "reverse_kl"
        if divergence != "reverse_kl" and loss_type != "sft":      # TRL leaves its sft term as it is
            name = with_divergence(name, divergence, float(getattr(args, "f_alpha_divergence_coef", 0.5)))
        terms[name] = float(weight)
    objective = resolve(terms)                         # one term of weight 1 resolves to its own name
    takes = hyperparameters(objective)
    hparams = {}
    if "label_smoothing" in takes and getattr(args, "label_smoothing", 0.0):
        hparams["label_smoothing"] = float(args.label_smoothing)
    if "tau" in takes:
        hparams["tau"] = float(getattr(args, "discopop_tau", takes["tau"]))
    return objective, hparams


def _checked_weights_column(trainer: str, args, dataset) -> str | None:
    """``args.dora_weights_column`` when the training dataset has it. A column named other than
    the default that is absent is an error (a misspelling would train unweighted); the default
    ``weight`` absent trains without weights, said once."""
    column = getattr(args, "dora_weights_column", None)
    names = getattr(dataset, "column_names", None)
    if not column or names is None or column in names:
        return column
    default = next((f.default for f in dataclasses.fields(args) if f.name == "dora_weights_column"), None)
    if column != default:
        raise ValueError(f"robalign {trainer}: dora_weights_column={column!r}: the training dataset has no such "
                         f"column (it has {', '.join(map(str, names))})")
    warnings.warn(f"robalign {trainer}: the training dataset has no {column!r} column: training without DoRA "
                  "weights (set dora_weights_column to the column that holds them, or None)", stacklevel=3)
    return None


class _WithWeights:
    """TRL's collator, plus the per-sample weights of ``column`` (``[B]`` or ``[B, 2]``) when every
    example of the batch has them."""

    def __init__(self, collator, column):
        self.collator, self.column = collator, column

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.column and all(self.column in ex and ex[self.column] is not None for ex in examples):
            batch["dora_weights"] = torch.tensor([ex[self.column] for ex in examples], dtype=torch.float64)
        return batch


class _TRLBridge:
    """What the TRL drop-ins share: DoRA's settings from a TRL config, the weights column on TRL's
    collator, and the reference log-probs (TRL's precomputed ones, or the reference model now)."""

    _forwards_ref_model = True
    #: TRL 1.16 DPOTrainer's metric keys (robalign's names on the left where they differ); every
    #: other metric of robalign's is logged under ``dora/``
    _TRL_RENAMED = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins"}
    _TRL_KEYS = frozenset({"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                           "mean_token_accuracy", "num_tokens", "kl"})

    def _logged_name(self, name: str) -> str:
        name = self._TRL_RENAMED.get(name, name)
        return name if name in self._TRL_KEYS else f"dora/{name}"

    def _bridge_init(self, objective, hparams, model, ref_model, args, reduction, kwargs, **dora_extra):
        dora = DoRAConfig(objective=objective, beta=float(args.beta), lam=float(getattr(args, "dora_lam", 1.0)),
                          exact_dro=bool(getattr(args, "dora_exact", True)),
                          one_pass=bool(getattr(args, "dora_one_pass", True)), objective_kwargs=hparams,
                          padding_free=bool(getattr(args, "padding_free", False)), **dora_extra)
        packed = getattr(args, "padding_free", False)
        if packed:                          # robalign packs; TRL 1.16's DPOTrainer would warn and ignore it
            args.padding_free = False
        try:
            super().__init__(model=model, args=args, dora=dora, ref_model=ref_model, reduction=reduction, **kwargs)
        finally:
            if packed:
                args.padding_free = packed
        if getattr(self, "_is_vision_dataset", False):
            raise ValueError(f"robalign {type(self).__name__}: vision preference data is not supported yet")
        column = _checked_weights_column(type(self).__name__, args, self.train_dataset)
        self.data_collator = _WithWeights(self.data_collator, column)
        self.reference_cache = "TRL's (precomputed, or the reference model every step)"

    def compute_reference_logps(self, *args, **kwargs) -> None:
        """TRL provides the reference log-probs (its precomputation, or its reference model)."""

    def _finish_batch(self, batch, inputs):
        """A converted batch with the weights column (one weight per sample, or the mean of one per
        response), one entry per row (``group_size`` rows a sample), packed when ``padding_free``."""
        weights = inputs.get("dora_weights")
        if weights is not None:
            per_sample = weights if weights.dim() == 1 else weights.mean(-1)
            batch["weights"] = per_sample.repeat_interleave(self.group_size)
        if self.dora.padding_free:
            batch = pack_padded(batch)
            if "kl_input_ids" in batch:
                batch = pack_padded(batch, "kl_")
        return batch

    @torch.no_grad()
    def _reference_logps(self, batch):
        if self.ref_model is not None:
            return policy_logps(self.ref_model, batch, fused=self.dora.fused, ld_alpha=self.dora.ld_alpha)[0]
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "disable_adapter"):
            raise ValueError(f"robalign {type(self).__name__}: no reference model (pass ref_model, train a PEFT "
                             "adapter, or set precompute_ref_log_probs=True)")
        with model.disable_adapter():
            return policy_logps(self.model, batch, fused=self.dora.fused, ld_alpha=self.dora.ld_alpha)[0]


class DoRADPOTrainer(_TRLBridge, DoRATrainer, DPOTrainer):
    """TRL's ``DPOTrainer`` with DoRA's loss and robalign's fused paths (see the module docstring).
    Takes TRL's arguments (``model``, ``ref_model``, ``args`` — a :class:`DoRADPOConfig` or
    ``DPOConfig`` —, ``train_dataset``, ``eval_dataset``, ``processing_class``, ...) and
    ``reduction`` (a :class:`~robalign.losses.reductions.Reduction`; default KL-DRO with
    ``dora_lam``)."""

    def __init__(self, model=None, ref_model=None, args=None, *, reduction=None, **kwargs):
        if args is None:
            raise ValueError("robalign DoRADPOTrainer: pass `args` (a DoRADPOConfig)")
        objective, hparams = objective_of(args)
        processing = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            pad = getattr(processing, "pad_token_id", None)
            if pad is None:
                pad = getattr(processing, "eos_token_id", 0)
            kwargs["data_collator"] = DataCollatorForPreference(pad_token_id=pad, max_length=args.max_length,
                                                                truncation_mode=args.truncation_mode)
        self._bridge_init(objective, hparams, model, ref_model, args, reduction, kwargs,
                          ld_alpha=getattr(args, "ld_alpha", None), wpo=bool(getattr(args, "use_weighting", False)))

    def _prepare_inputs(self, inputs):
        """TRL's batch (chosen rows first, ``completion_mask``) as robalign's: group-major rows,
        ``labels`` (-100 off the completion), ``ref_logps`` (TRL's precomputed ones, or the
        reference model's now) and the weights column per row."""
        inputs = super()._prepare_inputs(inputs)
        if "completion_mask" not in inputs:
            return inputs
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        batch = {"input_ids": pairs_to_group_major(ids), "attention_mask": pairs_to_group_major(attention),
                 "labels": pairs_to_group_major(ids.masked_fill(completion == 0, -100))}
        if self.loss_fn.needs_reference:
            if "ref_chosen_logps" in inputs:
                ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
                batch["ref_logps"] = pairs_to_group_major(ref)
            else:
                batch["ref_logps"] = self._reference_logps(batch)
        return self._finish_batch(batch, inputs)


class DoRAKTOTrainer(_TRLBridge, DoRATrainer, KTOTrainer):
    """TRL's ``KTOTrainer`` with DoRA's loss and robalign's fused paths: KTO's per-sample losses
    (``loss_type`` ``kto`` or ``apo_zero_unpaired``; ``desirable_weight``, ``undesirable_weight``)
    with the weights column and the DRO reduction, exact across accumulation and ranks. Takes TRL's
    arguments (``args``: a :class:`DoRAKTOConfig` or ``KTOConfig``) and ``reduction``. With
    ``dora_lam=inf`` and no weights column the losses are TRL's own KTO losses."""

    #: TRL 1.16 KTOTrainer's keys (no reward accuracy, no token accuracy)
    _TRL_KEYS = frozenset({"kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "rewards/chosen",
                           "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"})

    def __init__(self, model=None, ref_model=None, args=None, *, reduction=None, **kwargs):
        if args is None:
            raise ValueError("robalign DoRAKTOTrainer: pass `args` (a DoRAKTOConfig)")
        if args.loss_type not in TRL_KTO_LOSS_TYPES:
            raise ValueError(f"robalign DoRAKTOTrainer: TRL KTO loss type {args.loss_type!r} has no robalign "
                             f"objective (supported: {', '.join(TRL_KTO_LOSS_TYPES)})")
        objective = TRL_KTO_LOSS_TYPES[args.loss_type]
        if kwargs.get("data_collator") is None:           # TRL's own (DoRATrainer would put robalign's)
            processing = kwargs.get("processing_class")
            pad = getattr(processing, "pad_token_id", None)
            kwargs["data_collator"] = DataCollatorForUnpairedPreference(
                pad_token_id=getattr(processing, "eos_token_id", 0) if pad is None else pad,
                max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of)
        hparams = {"desirable_weight": float(args.desirable_weight),
                   "undesirable_weight": float(args.undesirable_weight)}
        self._bridge_init(objective, hparams, model, ref_model, args, reduction, kwargs)

    def _prepare_inputs(self, inputs):
        """TRL's unpaired batch (``completion_mask``, ``label``, ``KL_`` rows) as robalign's: ``labels``
        (-100 off the completion), ``scores`` (the labels), ``kl_*`` rows, ``ref_logps`` and
        ``kl_ref_logps`` (TRL's precomputed ones, or the reference model's now), the weights."""
        inputs = super()._prepare_inputs(inputs)
        if "completion_mask" not in inputs:
            return inputs
        ids = inputs["input_ids"]
        batch = {"input_ids": ids, "attention_mask": inputs["attention_mask"],
                 "labels": ids.masked_fill(inputs["completion_mask"] == 0, -100),
                 "scores": torch.as_tensor(inputs["label"], device=ids.device).float()}
        if "KL_input_ids" in inputs:
            kl_ids = inputs["KL_input_ids"]
            batch.update(kl_input_ids=kl_ids, kl_attention_mask=inputs["KL_attention_mask"],
                         kl_labels=kl_ids.masked_fill(inputs["KL_completion_mask"] == 0, -100))
        batch["ref_logps"] = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(batch)
        if self.loss_fn.needs_kl:
            batch["kl_ref_logps"] = (inputs["ref_KL_logps"] if "ref_KL_logps" in inputs
                                     else self._reference_logps(mismatched_batch(batch)))
        return self._finish_batch(batch, inputs)


# -- CPO and ORPO (trl.experimental): reference-free, TRL's chosen_*/rejected_* batches ----------------
def _experimental(name):
    """``(Config, Trainer, DPODataCollatorWithPadding)`` of ``trl.experimental.<name>`` (TRL 1.16)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)          # TRL's "experimental" notice
        module = importlib.import_module(f"trl.experimental.{name}")
        utils = importlib.import_module("trl.experimental.utils")
    return (getattr(module, f"{name.upper()}Config"), getattr(module, f"{name.upper()}Trainer"),
            utils.DPODataCollatorWithPadding)


_CPOConfig, _CPOTrainer, _PairCollator = _experimental("cpo")
_ORPOConfig, _ORPOTrainer, _ = _experimental("orpo")


def _pairs_batch(inputs, pad_token_id):
    """TRL's ``chosen_*``/``rejected_*`` tensors (Hugging Face labels, -100 off the completion) as
    robalign's group-major rows: chosen, rejected, chosen, rejected, ..."""
    width = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
    pad = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    batch = {}
    for key, value in pad.items():
        sides = [torch.nn.functional.pad(inputs[f"{side}_{key}"], (0, width - inputs[f"{side}_{key}"].shape[1]),
                                         value=value) for side in ("chosen", "rejected")]
        batch[key] = torch.stack(sides, 1).flatten(0, 1)
    return batch


class _PairsBridge(_TRLBridge):
    """The CPO/ORPO drop-ins' shared part: TRL's pair collator, its batch as robalign's rows."""

    #: TRL 1.16 CPOTrainer's keys (ORPOTrainer's add log_odds_ratio and log_odds_chosen, below)
    _TRL_KEYS = frozenset({"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss"})

    def _record(self, out, rows: dict, into=None) -> None:
        """DoRATrainer's metrics and TRL's ``nll_loss``: the chosen responses' NLL per token over the
        micro-batch (TRL's cross-entropy of the chosen rows; ORPO's also counts the prompt's tokens)."""
        super()._record(out, rows, into)
        into = self._dora_metrics if into is None else into
        if out.counts is None:
            return
        chosen = rows["chosen"]
        logps, counts = out.policy_logps.detach().double(), out.counts.double()
        into["nll_loss"].append((-(logps * chosen).sum() / (counts * chosen).sum().clamp(min=1)).float())
        mean = logps / counts.clamp(min=1)                  # per-token mean log-probs
        if self._logs_mean_logps:                           # TRL's logps/* for SimPO and ORPO
            for name, mask in rows.items():
                into[f"logps/{name}"][-1] = ((mean * mask).sum() / mask.sum()).float()
        self._record_pairs(mean, rows, into)

    def _record_pairs(self, mean, rows: dict, into) -> None:
        """A trainer's own metrics of the per-token mean log-probs ``mean`` ``[S]`` (none here)."""

    @property
    def _logs_mean_logps(self) -> bool:
        return self.loss_fn.objective.split("+")[0] in ("simpo", "orpo")

    _forwards_ref_model = False                        # reference-free: TRL's CPO/ORPO take no ref_model

    def _pairs_init(self, objective, hparams, model, args, reduction, kwargs):
        processing = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            pad = getattr(processing, "pad_token_id", None)
            kwargs["data_collator"] = _PairCollator(pad_token_id=getattr(processing, "eos_token_id", 0) if pad is None
                                                    else pad, is_encoder_decoder=False)
        self._bridge_init(objective, hparams, model, None, args, reduction, kwargs)
        self._pad_id = self.data_collator.collator.pad_token_id

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if "chosen_input_ids" not in inputs:
            return inputs
        return self._finish_batch(_pairs_batch(inputs, self._pad_id), inputs)


@dataclass
class DoRACPOConfig(DoRAArguments, _CPOConfig):
    """TRL's ``CPOConfig`` (``trl.experimental.cpo``) and DoRA's settings (:class:`DoRAArguments`)."""


@dataclass
class DoRAORPOConfig(DoRAArguments, _ORPOConfig):
    """TRL's ``ORPOConfig`` (``trl.experimental.orpo``) and DoRA's settings (:class:`DoRAArguments`)."""


def cpo_objective_of(args) -> tuple[str, dict]:
    """``(objective, hyper-parameters)`` of a ``CPOConfig``: ``sigmoid`` → ``cpo``, ``simpo`` → ``simpo``
    (``simpo_gamma`` its γ), ``alpha`` (AlphaPO) and ``label_smoothing`` as they are, and ``cpo_alpha`` > 0
    the per-sample NLL term, ``"cpo+<cpo_alpha>*sft"``."""
    names = {"sigmoid": "cpo", "simpo": "simpo"}
    if args.loss_type not in names:
        raise ValueError(f"robalign DoRACPOTrainer: CPO loss type {args.loss_type!r} has no robalign objective "
                         f"(supported: {', '.join(names)})")
    base = names[args.loss_type]
    hparams = {}                                       # β: the config's, read by DoRAConfig
    if args.label_smoothing:
        hparams["label_smoothing"] = float(args.label_smoothing)
    if getattr(args, "alpha", 0.0):
        hparams["alpha"] = float(args.alpha)
    if base == "simpo":
        hparams["gamma"] = float(args.simpo_gamma)
    objective = resolve({base: 1.0, "sft": float(args.cpo_alpha)} if args.cpo_alpha else base)
    return objective, hparams


class DoRACPOTrainer(_PairsBridge, DoRATrainer, _CPOTrainer):
    """TRL's ``CPOTrainer`` (``trl.experimental.cpo``) with DoRA's loss and robalign's fused paths.
    The loss per sample is CPO's (or SimPO's) plus ``cpo_alpha`` times the chosen response's NLL **per
    token of that response** (robalign's ``sft``), so the whole per-sample loss takes the DoRA weight
    and the DRO reduction. TRL adds ``cpo_alpha`` times the batch's token-mean NLL instead: the same
    when the chosen responses of a batch have equal lengths (and with ``cpo_alpha=0``, SimPO's default,
    always; tested step for step)."""

    def __init__(self, model=None, args=None, *, reduction=None, **kwargs):
        if args is None:
            raise ValueError("robalign DoRACPOTrainer: pass `args` (a DoRACPOConfig)")
        objective, hparams = cpo_objective_of(args)
        self._pairs_init(objective, hparams, model, args, reduction, kwargs)


class DoRAORPOTrainer(_PairsBridge, DoRATrainer, _ORPOTrainer):
    """TRL's ``ORPOTrainer`` (``trl.experimental.orpo``) with DoRA's loss and robalign's fused paths:
    per sample ``orpo+sft``, the odds-ratio term −β·log σ(log odds) on token-mean log-probs (TRL's
    ``odds_ratio_loss``, tested) plus the chosen **response's** NLL per token — the paper's L_SFT.
    TRL 1.16's ORPOTrainer adds the batch's token-mean NLL over the chosen **prompt and response**
    (its code says so), so the two differ by the prompt tokens' NLL and the normalisation; the
    trainer follows the hand-written float64 trajectory of the per-sample loss (tested)."""

    _TRL_KEYS = _PairsBridge._TRL_KEYS | {"log_odds_ratio", "log_odds_chosen"}

    def __init__(self, model=None, args=None, *, reduction=None, **kwargs):
        if args is None:
            raise ValueError("robalign DoRAORPOTrainer: pass `args` (a DoRAORPOConfig)")
        self._pairs_init(resolve("orpo+sft"), {}, model, args, reduction, kwargs)

    def _record_pairs(self, mean, rows: dict, into) -> None:
        """TRL's ``log_odds_chosen`` (the mean log odds ratio of the chosen over the rejected
        response, on token-mean log-probs) and ``log_odds_ratio`` (the mean of its log σ)."""
        chosen, rejected = mean[rows["chosen"].bool()], mean[rows["rejected"].bool()]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        into["log_odds_chosen"].append(log_odds.mean().float())
        into["log_odds_ratio"].append(torch.nn.functional.logsigmoid(log_odds).mean().float())
