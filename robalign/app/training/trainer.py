"""``DoRATrainer``: a ``transformers.Trainer`` that trains a causal LM with DoRA (or any
robalign objective), exactly across gradient-accumulation steps and data-parallel ranks.

Per micro-batch of B samples × K candidates (rows group-major, see :mod:`robalign.app.data.preferences`):

    hidden = the model's last hidden states        (the model runs with logits_to_keep=1, so
                                                    no [rows, T, V] logits tensor is made)
    FusedLinearDoRALoss(hidden, lm_head, ...)       the one-pass fused loss (default): log-probs,
                                                    objective, DoRA weights and the gradients of
                                                    hidden and head in the head's forward
    loss.backward()                                 the head's gradient scaled, hidden's through
                                                    the model

With ``DoRAConfig(one_pass=False)`` (or a reduction without a one-pass form) the recompute path
runs instead: ``linear_sequence_logps(hidden, lm_head)``, ``DoRALoss.per_sample`` and
``accumulator(ℓ, w).backward()``.

The accumulator keeps the DRO normaliser of the effective batch (all micro-batches of the
optimizer step, on all ranks) and rescales the gradients already accumulated, so the update
equals the full-batch gradient; the reported ``loss`` is the full-batch DRO loss.

Reference log-probs are computed once before training with the initial policy (the usual
reference: the model DoRA starts from), batched and without gradient, and cached in
``output_dir`` keyed by the reference model's weights and the tokenised data; or pass ``ref_model``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from ... import _validation as V
from ..._io import write_atomic
from .causal_lm import _plain_logits, head_transform, mismatched_batch, one_pass_loss, policy_logps
from .config import DoRAConfig, check_settings
from ..data.preferences import PreferenceCollator
from ...losses.options import BatchExtras
from ...ops import workspace
from ...ops.head import HeadTransform

# policy_logps, one_pass_loss and mismatched_batch live in robalign.app.training.causal_lm; importable from here too
__all__ = ["DoRAConfig", "DoRATrainer", "policy_logps", "one_pass_loss", "mismatched_batch"]


class _LogLastStep(TrainerCallback):
    """Log the last optimizer step too, so a run shorter than (or not a multiple of) the logging
    interval still reports where it ended (``logging_first_step`` reports where it began)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control


class DoRATrainer(Trainer):
    """A ``transformers.Trainer`` for preference data with exact KL-DRO.

    Pass a :class:`robalign.app.data.preferences.PreferenceDataset` as ``train_dataset`` and a
    :class:`DoRAConfig` as ``dora``; the collator and ``remove_unused_columns=False`` are set
    for you. Logs loss (the full-batch DRO loss), reward accuracy and margin, chosen/rejected
    rewards, DRO effective sample size and largest share, and weight statistics.
    """

    #: whether the trainer below this one takes ``ref_model`` itself (TRL's trainers do)
    _forwards_ref_model = False

    def _logged_name(self, name: str) -> str:
        """The key a metric is logged under (the TRL drop-ins log TRL's keys and robalign's own
        under ``dora/``)."""
        return name

    def __init__(self, *args, dora: DoRAConfig | None = None, ref_model=None, reduction=None, **kwargs):
        self.dora = dora or DoRAConfig()
        check_settings(self.dora, "DoRATrainer(dora=...)")
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            pad = tokenizer.pad_token_id if tokenizer is not None else 0
            kwargs["data_collator"] = PreferenceCollator(pad_token_id=pad, padding_free=self.dora.padding_free)
        if self._forwards_ref_model:
            kwargs["ref_model"] = ref_model
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        self.add_callback(_LogLastStep())
        dataset = self.train_dataset
        d = self.dora
        # built once: the objective, weights and reduction of every micro-batch (the process group is
        # the reduction's argument, read per call, so a group set up after construction is seen)
        self.loss_fn = d.build_loss(reduction=reduction, group_names=getattr(dataset, "group_names", ()),
                                    data=getattr(dataset, "path", "") or "the training data",
                                    group_size=getattr(dataset, "group_size", None), head=self.head())
        self.group_size = self.loss_fn.group_size
        if not self._forwards_ref_model:
            self.ref_model = ref_model
        self._acc = None
        self._reset_pending = True
        self._stats_pending = True              # the next micro-batch is a step's first
        self._last_loss = 0.0
        self._dora_metrics = defaultdict(list)
        self._eval_metrics = defaultdict(list)
        self._tokens_seen = None            # TRL's `num_tokens`: the training batches' attended tokens, this rank
        self._step_max_weight = None        # the largest DoRA weight of the optimizer step so far
        self._checks_zero_weight_steps = self.dora.use_weights and not self.dora.allow_zero_weight_steps
        self._loss_total = None             # Σ full-batch losses over optimizer steps, kept across resumes
        self._state_restored = False        # the reduction's state (group DRO's q) read from a resumed checkpoint
        self.reference_cache = None

    def head(self) -> HeadTransform:
        """The model's LM-head transform (the one-pass path runs the head)."""
        return head_transform(self.model) or HeadTransform()

    # -- data ---------------------------------------------------------------------------------
    def _get_train_sampler(self, *args, **kwargs):
        if not self.dora.shuffle:
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    # -- reference log-probs -----------------------------------------------------------------
    def _ref_cache_path(self, model, dataset=None) -> Path:
        """The cache file of the reference log-probs: keyed on everything that determines them —
        the reference model's weights and buffers (names, dtypes, shapes, bytes), the tokenised
        rows of the dataset, and the log-prob path — never on names that can point at new weights."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in list(model.state_dict().items()):
            t = tensor.detach()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for group in (dataset or self.train_dataset).groups:
            digest.update(repr((group.input_ids, group.labels, group.kl_input_ids, group.kl_labels)).encode())
        digest.update(f"fused={self.dora.fused}|ld_alpha={self.dora.ld_alpha}".encode())
        return Path(self.args.output_dir) / f"ref_logps-{digest.hexdigest()}.pt"

    def _read_ref_cache(self, path: Path, rows: int):
        """``(values, why)``: the cached ``[rows]`` float32 log-probs, or ``None`` with why the file
        was not used (``None`` when there was none)."""
        if not path.is_file():
            return None, None
        try:
            values = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any damage: the cache is rebuilt, never trusted
            return None, f"{path.name} was unreadable ({type(err).__name__})"
        if not (isinstance(values, torch.Tensor) and values.dtype == torch.float32 and values.shape == (rows,)
                and bool(torch.isfinite(values).all())):
            return None, f"{path.name} did not hold {rows} finite float32 log-probs"
        return values, None

    def compute_reference_logps(self, batch_size: int | None = None, progress: bool = True, dataset=None) -> None:
        """Fill every sample's ``ref_logps`` of ``dataset`` (default the training set; no gradient),
        from the cache when it matches. For the training set ``reference_cache`` then says what
        happened: ``"used <file>"``, ``"computed"`` or ``"recomputed: <why>"`` (a damaged cache file
        is rebuilt, never trusted)."""
        from tqdm.auto import tqdm

        training = dataset is None or dataset is self.train_dataset
        dataset = self.train_dataset if dataset is None else dataset
        kl_rows = all(g.kl_input_ids is not None for g in dataset.groups)
        if all(g.ref_logps is not None and (not kl_rows or g.kl_ref_logps is not None) for g in dataset.groups):
            if training:
                self.reference_cache = "given with the data"
            return
        model = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        if not training and model is self.accelerator.unwrap_model(self.model) and self.state.global_step > 0:
            raise RuntimeError("robalign.DoRATrainer: the evaluation set's reference log-probs must be computed "
                               "before training moves the policy (call train() first, or pass ref_model)")
        path = self._ref_cache_path(model, dataset)
        k = dataset.group_size
        rows = len(dataset) * (k + kl_rows)             # every candidate's row, then every mismatched row
        values, why = self._read_ref_cache(path, rows)
        if values is not None:
            note = f"used {path.name}"
        else:
            note = "computed" if why is None else f"recomputed: {why}"
            model = model.to(self.args.device)
            was_training = model.training
            model.eval()
            collate = PreferenceCollator(pad_token_id=self.data_collator.pad_token_id, fields=())
            size = batch_size or self.args.per_device_eval_batch_size
            values, mismatched = [], []
            with torch.no_grad():
                for start in tqdm(range(0, len(dataset), size), desc="reference log-probs",
                                  disable=not progress or not self.is_world_process_zero()):
                    batch = collate(dataset.groups[start:start + size])
                    batch = {name: v.to(self.args.device) for name, v in batch.items()}
                    logps, _ = policy_logps(model, batch, fused=self.dora.fused, ld_alpha=self.dora.ld_alpha,
                                            group_size=k)
                    values.append(logps.float().cpu())
                    if kl_rows:
                        mismatched.append(policy_logps(model, mismatched_batch(batch), fused=self.dora.fused)[0]
                                          .float().cpu())
            values = torch.cat(values + mismatched)
            model.train(was_training)
            if self.is_world_process_zero():
                write_atomic(path, lambda handle: torch.save(values, handle))
        if training:
            self.reference_cache = note
        for i, group in enumerate(dataset.groups):
            group.ref_logps = values[i * k:(i + 1) * k].tolist()
            if kl_rows:
                group.kl_ref_logps = [float(values[len(dataset) * k + i])]

    _STATE_KEY = "robalign.DoRATrainer"

    def train(self, *args, **kwargs):
        """``Trainer.train``; its ``training_loss`` is the mean full-batch loss over every optimizer
        step of the run, those before a resume included (the Trainer's own averages only the steps
        since the resume)."""
        from transformers.trainer_utils import TrainOutput

        if self.loss_fn.needs_reference:
            self.compute_reference_logps()
            if hasattr(self.eval_dataset, "groups"):          # before the policy moves: the same reference
                self.compute_reference_logps(dataset=self.eval_dataset)
        else:
            self.reference_cache = "not needed: the objective reads no reference model"
        self._loss_total = None
        self._state_restored = False
        result = super().train(*args, **kwargs)
        total, steps = self._loss_total or (0.0, 0)
        if not steps:
            return result
        mean = float(total) / steps
        metrics = dict(result.metrics or {}, train_loss=mean)
        return TrainOutput(result.global_step, mean, metrics)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """``Trainer.evaluate``; a :class:`~robalign.app.data.preferences.PreferenceDataset` without reference
        log-probs gets them first (from the initial policy: before training, or from ``ref_model``)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if hasattr(dataset, "groups") and self.loss_fn.needs_reference:
            self.compute_reference_logps(dataset=dataset, progress=False)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        total, steps = self._loss_total or (0.0, 0)
        saved = {"loss_total": float(total), "loss_steps": steps}
        reduction = self.loss_fn.reduction
        if hasattr(reduction, "state_dict"):
            saved["reduction"] = {"name": reduction.name, **reduction.state_dict()}
        self.state.stateful_callbacks[self._STATE_KEY] = saved
        return super()._save_checkpoint(model, trial)

    def _restore_reduction_state(self) -> None:
        """Once per ``train()``, before the first step: a stateful reduction (group DRO's q) takes
        the state that the resumed checkpoint saved (none when the run starts afresh)."""
        if self._state_restored:
            return
        self._state_restored = True
        saved = self.state.stateful_callbacks.get(self._STATE_KEY, {}).get("reduction")
        reduction = self.loss_fn.reduction
        if saved is not None and hasattr(reduction, "load_state_dict"):
            if saved.get("name") != reduction.name:
                raise ValueError(f"the checkpoint was trained with dro={saved.get('name')!r}, this run has "
                                 f"dro={reduction.name!r}")
            reduction.load_state_dict({k: v for k, v in saved.items() if k != "name"})

    def _count_step_loss(self, loss: torch.Tensor) -> None:
        if self._loss_total is None:        # first step of this train() call: a resume restored the state
            saved = self.state.stateful_callbacks.get(self._STATE_KEY, {})
            self._loss_total = (torch.tensor(float(saved.get("loss_total", 0.0)), dtype=torch.float64),
                                int(saved.get("loss_steps", 0)))
        total, steps = self._loss_total
        self._loss_total = (total.to(loss.device) + loss.detach(), steps + 1)

    # -- the loss -----------------------------------------------------------------------------
    def _group(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _uses_one_pass(self, model) -> bool:
        """The one-pass fused loss runs unless it is switched off, the reduction has no one-pass
        form, or the model takes the logits path."""
        return self.loss_fn.takes_one_pass and not _plain_logits(model, self.dora.fused)

    def dora_samples(self, model, inputs, stats_into: dict | None = None):
        """The :class:`robalign.DoRASamples` (per-sample losses, weights, rewards) of one collated
        micro-batch; the reduction runs once, in the accumulator (training) or in compute_loss."""
        logps, counts, *omega = policy_logps(model, inputs, fused=self.dora.fused, ld_alpha=self.dora.ld_alpha,
                                             group_size=self.group_size, wpo=self.dora.wpo, stats_into=stats_into)
        extra = omega[0].view(-1, self.group_size).prod(-1) if omega else None
        weights = probs = None
        if self.dora.use_weights:
            weights = inputs.get("weights")
            probs = inputs.get("probs") if weights is None else None
        group_ids = inputs.get("group_ids") if self.loss_fn.reduction.takes_group_ids else None
        extras = BatchExtras(scores=inputs.get("scores"), group_ids=group_ids, weight_factors=extra,
                             **self._kl_inputs(model, inputs))
        return self.loss_fn.per_sample(logps, counts, inputs.get("ref_logps"), probs=probs, weights=weights,
                                       extras=extras)

    def _kl_inputs(self, model, inputs) -> dict:
        """KTO's ``{"kl_logps", "kl_ref_logps", "kl_counts"}``: the policy's log-probs of the batch's
        mismatched rows (a forward without gradient), the reference's and the rows' scored tokens;
        ``{}`` for other objectives."""
        if not self.loss_fn.needs_kl:
            return {}
        self.loss_fn.process_group = self._group()          # z₀ spans the ranks' micro-batches, as in TRL
        with torch.no_grad():
            kl_logps, kl_counts = policy_logps(model, mismatched_batch(inputs), fused=self.dora.fused)
        return {"kl_logps": kl_logps, "kl_ref_logps": inputs["kl_ref_logps"], "kl_counts": kl_counts}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's reduced loss (used for evaluation; training goes through the accumulator)."""
        samples = self.dora_samples(model, inputs)
        loss, _ = self.loss_fn.reduction.reduce(samples.losses, samples.weights, group=self._group(),
                                                **self.loss_fn.group_kwargs(samples))
        return (loss, samples) if return_outputs else loss

    def _accumulator(self, model):
        if self._acc is None:
            # DeepSpeed reduces each micro-batch's gradient into its own buffers (param.grad is not
            # where the sum lives), so the step's weights are fixed by the no-grad pre-pass instead
            # of rescaling what was accumulated
            self._acc = self.loss_fn.reduction.accumulator(
                [p for p in model.parameters() if p.requires_grad], group=self._group(), exact=self.dora.exact_dro,
                accumulation_steps=self.args.gradient_accumulation_steps, prepass=self.is_deepspeed_enabled)
        return self._acc

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches; for a reduction whose weights need the whole batch (an
        accumulator with ``prepare``: KL ball, χ² ball, CVaR over several micro-batches), first a
        no-grad forward over all of them, which fixes the weights their gradient passes use. The
        pre-pass repeats the gradient pass's forward exactly when the model has no dropout."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        model = self.model_wrapped
        acc = self._accumulator(model)
        self._restore_reduction_state()
        if getattr(acc, "needs_prepare", False) and batch_samples:
            model.train()
            acc.reset()
            self._last_loss = torch.zeros((), dtype=torch.float64, device=self.args.device)
            self._reset_pending = False
            losses, weights, group_ids = [], [], []
            with torch.no_grad(), self.compute_loss_context_manager():
                for micro in batch_samples:
                    out = self.dora_samples(model, self._prepare_inputs(micro))
                    losses.append(out.losses)
                    weights.append(out.weights)
                    group_ids.append(out.group_ids)
            acc.prepare(losses, weights, **({"group_ids": group_ids} if self.loss_fn.reduction.takes_group_ids else {}))
        return batch_samples, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        self._accumulator(model)
        self._restore_reduction_state()
        # the per-token statistics of the step's first micro-batch (one more pass over the head there)
        stats = {} if self._stats_pending and self.dora.token_stats else None
        self._stats_pending = False
        if self._reset_pending:
            self._acc.reset()
            self._last_loss = torch.zeros((), dtype=torch.float64, device=self.args.device)
            self._reset_pending = False
        with self.compute_loss_context_manager():
            if self._uses_one_pass(model):
                out = one_pass_loss(model, inputs, self.loss_fn, accumulator=self._acc,
                                    use_weights=self.dora.use_weights, kl=self._kl_inputs(model, inputs),
                                    stats_into=stats)
                surrogate = out.loss
            else:
                out = self.dora_samples(model, inputs, stats_into=stats)
                surrogate = self._acc(out.losses, out.weights, **self.loss_fn.group_kwargs(out))
        workspace.release()                             # the model's backward gets the loss's buffers
        # the surrogate is already this micro-batch's share of the full-batch loss: DeepSpeed must
        # not divide it by the accumulation steps again
        self.accelerator.backward(surrogate, **({"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}))
        rows = self._chosen_rejected_rows(inputs.get("scores"), out.policy_logps.numel(), out.policy_logps.device)
        self._record(out, rows)
        if self._checks_zero_weight_steps:
            heaviest = out.weights.detach().max() if out.weights.numel() else torch.zeros((), device=out.weights.device)
            self._step_max_weight = heaviest if self._step_max_weight is None else torch.maximum(
                self._step_max_weight, heaviest)
        if stats:
            self._record_token_stats(stats["token_stats"], rows)
        mask = inputs.get("attention_mask")
        tokens = (mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())).detach()
        self._tokens_seen = tokens if self._tokens_seen is None else self._tokens_seen + tokens.to(self._tokens_seen)
        # Trainer sums what training_step returns over the micro-batches of an optimizer step:
        # returning the increments of the running full-batch loss makes that sum the final loss.
        # Everything stays on the device: a micro-batch reads no value on the host.
        loss_value = self._acc.loss_value.to(self._last_loss.device)
        increment = loss_value - self._last_loss
        self._last_loss = loss_value
        if self.accelerator.sync_gradients:
            self._count_step_loss(loss_value)
            stats = self._acc.stats()
            if self._checks_zero_weight_steps:
                heaviest, self._step_max_weight = self._step_max_weight.clone(), None
                if self._group() is not None:                # a step's samples span every rank
                    dist.all_reduce(heaviest, op=dist.ReduceOp.MAX, group=self._group())
                V.check_values("robalign.DoRATrainer", heaviest > 0, lambda lazy: (
                    "every sample of this optimizer step has DoRA weight 0: the step would train on nothing "
                    "(set allow_zero_weight_steps / --allow-zero-weight-steps to let such steps pass, or weigh "
                    "with a --weight-floor above 0)"))
            self._dora_metrics["dro/ess"].append(stats.ess.detach().float())
            self._dora_metrics["dro/max_share"].append(stats.max_share.detach().float())
            if stats.dual is not None:                      # λ* of a KL ball, c* of a χ² ball or CVaR
                self._dora_metrics["dro/dual"].append(stats.dual.detach().float())
            if stats.group_weights is not None:             # group DRO: q and the loss of each group
                names = self.loss_fn.reduction.names or range(len(stats.group_weights))
                for name, q, value in zip(names, stats.group_weights, stats.group_losses):
                    self._dora_metrics[f"dro/q/{name}"].append(q.detach().float())
                    self._dora_metrics[f"dro/group_loss/{name}"].append(value.detach().float())
            self._reset_pending = self._stats_pending = True
        return increment.float()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One evaluation batch: its reduced loss (a stateful reduction — group DRO's q — does not
        move) and the reward metrics, logged as ``eval_rewards/...`` with the evaluation loss."""
        inputs = self._prepare_inputs(inputs)
        stats = {} if self.dora.token_stats else None
        with torch.no_grad(), self.compute_loss_context_manager():
            samples = self.dora_samples(model, inputs, stats_into=stats)
            loss, _ = self.loss_fn.reduction.reduce(samples.losses, samples.weights, group=self._group(),
                                                    **self.loss_fn.group_kwargs(samples))
        rows = self._chosen_rejected_rows(inputs.get("scores"), samples.policy_logps.numel(),
                                          samples.policy_logps.device)
        self._record(samples, rows, self._eval_metrics)
        if stats:
            self._record_token_stats(stats["token_stats"], rows, self._eval_metrics)
        return loss.detach(), None, None

    _RECORDED = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "weights/mean",
                 "weights/max")

    def _record(self, out, rows: dict, into=None) -> None:
        """The reward, weight and log-prob metrics of one micro-batch; ``rows``: its chosen and
        rejected rows (:meth:`_chosen_rejected_rows`)."""
        into = self._dora_metrics if into is None else into
        # nanmean: unpaired samples reward only their own side (NaN on the other)
        for name, value in zip(self._RECORDED, (
                out.reward_accuracy, out.reward_margin, out.chosen_rewards.nanmean(), out.rejected_rewards.nanmean(),
                out.weights.mean(), out.weights.max())):
            into[name].append(value.detach().float())
        logps = out.policy_logps.detach().float()            # TRL's logps/chosen, logps/rejected: per sequence
        for name, mask in rows.items():
            into[f"logps/{name}"].append((logps * mask).sum() / mask.sum())
        if out.kl is not None:                              # KTO's reference point z₀ (TRL logs it as `kl`)
            into["kl"].append(out.kl.detach().float())

    def _chosen_rejected_rows(self, scores, rows: int, device) -> dict:
        """``{"chosen": mask, "rejected": mask}`` over a batch's ``rows`` sequences: each sample's
        best and worst row by ``scores`` (the first and the last without); unpaired: the desirable
        and the undesirable rows."""
        k = self.group_size
        if k == 1:
            chosen = scores.reshape(-1) > 0.5
            return {"chosen": chosen, "rejected": ~chosen}
        if scores is None:                              # candidates in preference order, best first
            scores = -torch.arange(k, device=device, dtype=torch.float32).repeat(rows // k)
        order = torch.sort(scores.view(-1, k), dim=-1, descending=True, stable=True).indices
        best = torch.zeros(rows // k, k, dtype=torch.bool, device=scores.device)
        worst = best.clone()
        best.scatter_(1, order[:, :1], True)
        worst.scatter_(1, order[:, -1:], True)
        return {"chosen": best.view(-1), "rejected": worst.view(-1)}

    def _record_token_stats(self, stats, rows: dict, into=None) -> None:
        """TRL's ``entropy`` (per scored token), ``logits/chosen``, ``logits/rejected`` (the mean
        logit per token of the chosen and the rejected rows) and ``mean_token_accuracy`` (the
        share of the chosen rows' tokens whose label is the top-1), on the device."""
        into = self._dora_metrics if into is None else into
        entropy, mean_logit, counts, top1 = stats
        counts = counts.to(entropy.dtype)
        into["entropy"].append(entropy.sum() / counts.sum())
        for name, mask in rows.items():              # NaN when no token: nanmean skips it at log time
            into[f"logits/{name}"].append((mean_logit * mask).sum() / (counts * mask).sum())
        into["mean_token_accuracy"].append((top1 * rows["chosen"]).sum().float() / (counts * rows["chosen"]).sum())

    def log(self, logs, *args, **kwargs):
        """The Trainer's logs plus the DoRA metrics averaged since the last log (one device read
        for all of them), after the lazy value checks queued since then."""
        from ... import _validation

        _validation.raise_pending()
        for metrics, trigger, prefix in ((self._dora_metrics, "loss", ""), (self._eval_metrics, "eval_loss", "eval_")):
            if metrics and trigger in logs:
                names = list(metrics)
                # nanmean: a group absent from a step has no loss there (NaN), not a loss of 0
                means = torch.stack([torch.stack([v.to(self.args.device) for v in metrics[n]]).nanmean()
                                     for n in names]).tolist()
                logs.update({prefix + self._logged_name(n): m for n, m in zip(names, means)})
                metrics.clear()
        if "loss" in logs and self._tokens_seen is not None:     # every rank's, as TRL counts them
            logs[self._logged_name("num_tokens")] = int(
                self.accelerator.gather_for_metrics(self._tokens_seen.reshape(1).to(self.args.device)).sum())
        return super().log(logs, *args, **kwargs)
