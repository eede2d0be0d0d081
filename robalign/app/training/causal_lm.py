"""The Hugging Face causal LM's side of training: its forward run to the last hidden states
(``logits_to_keep=1``: no ``[rows, T, V]`` logits), the LM head found and run fused — tied heads,
FSDP2 and ZeRO-3 shards gathered, the head's logit transform read from the model's config — and the
passes the trainer makes through it: the policy's (or the reference's) per-sequence log-probs
(:func:`policy_logps`, with LD-DPO's split) and the one-pass loss (:func:`one_pass_loss`).
:class:`~robalign.app.training.trainer.DoRATrainer` is the training loop over these.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ...losses.layout import ld_logps
from ...ops import linear_sequence_logps, sequence_logps, shift_labels
from ...losses.loss import FusedLinearDoRALoss
from ...losses.options import BatchExtras
from ...ops.head import HeadTransform
from ...ops.token_stats import token_stats
from ...ops.wpo import wpo_weights

__all__ = ["policy_logps", "one_pass_loss", "mismatched_batch", "head_transform", "model_inputs", "aligned_labels"]


#: model types whose forward transforms the LM head's output as (config attribute → HeadTransform field)
_HEAD_TRANSFORMS = {
    "softcap": ("final_logit_softcapping", ("gemma2", "gemma3", "gemma3_text", "vaultgemma")),   # c·tanh(z/c)
    "scale": ("logit_scale", ("cohere", "cohere2")),                                            # s·z
    "inverse_scale": ("logits_scaling", ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")),  # z/s
}


def head_transform(model) -> HeadTransform | None:
    """The logit transform a Hugging Face causal LM applies after its LM head (Gemma 2/3's soft-cap,
    Cohere's scale, Granite's scaling) as a :class:`robalign.ops.head.HeadTransform`; the identity for
    a plain head; ``None`` for one robalign does not know (the logits path is taken)."""
    config = getattr(_causal_lm(model), "config", None)
    values = {kind: getattr(config, attr, None) for kind, (attr, _) in _HEAD_TRANSFORMS.items()}
    given = {kind: v for kind, v in values.items() if v not in (None, 1, 1.0) and not (kind == "softcap" and not v)}
    if not given:
        return HeadTransform()
    model_type = getattr(config, "model_type", None)
    if len(given) > 1 or any(model_type not in _HEAD_TRANSFORMS[kind][1] for kind in given):
        return None
    kind, value = next(iter(given.items()))
    return {"softcap": HeadTransform(softcap=float(value)), "scale": HeadTransform(scale=float(value)),
            "inverse_scale": HeadTransform(scale=1.0 / float(value))}[kind]


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class) -> bool:
    """Whether a model class's forward accepts ``logits_to_keep`` (checked once per class)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _causal_lm(model):
    """The Hugging Face causal LM inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    inner = model.module if hasattr(model, "module") else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


class _GatherBeforeBackward(torch.autograd.Function):
    """Identity whose backward first gathers an FSDP2-sharded module's parameters: the fused op
    saved the head's gathered weight, but FSDP re-gathers a module only when gradients reach the
    module's own outputs, and the op's graph bypasses them."""

    @staticmethod
    def forward(ctx, module, x):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.module.unshard()
        return None, grad


class _Tied(torch.autograd.Function):
    """``a`` unchanged, with ``b`` as an extra input whose gradient is zero: in the backward, ``b``'s
    producer then waits for ``a``'s gradient. Used to run the fused head's backward after DeepSpeed
    ZeRO-3 has re-gathered the head (its pre-backward hook sits on the head's output)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.b_meta = (b.shape, b.dtype, b.device)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.b_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _zero3_partitioned(head) -> bool:
    """A head whose parameters DeepSpeed ZeRO-3 partitions: gathered only inside the module's
    forward and backward hooks (see :func:`_through_head`)."""
    return head is not None and hasattr(head.weight, "ds_id")


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _plain_logits(model, fused: bool) -> bool:
    inner = _causal_lm(model)
    return not fused or head_transform(inner) is None or inner.get_output_embeddings() is None


def _through_head(model, batch, head_fn, anchor):
    """Call ``model`` (through its wrappers, so DDP, FSDP, DeepSpeed and adapters work) with
    ``logits_to_keep=1`` and return ``head_fn(hidden, head_weight, head_bias)``, run by a forward hook
    on the LM head while the head's forward is in progress — when FSDP or ZeRO-3 has gathered its
    weight, before their post-forward hooks release it — so the head function always gets a full,
    plain weight. ``anchor(result)`` is the result's tensor to backward; ``anchor(result, t)``
    returns the result with ``t`` in its place.

    Under ZeRO-3 that tensor is tied to
    the head's output both ways (:class:`_Tied`): its backward then runs after DeepSpeed's
    pre-backward hook on that output has gathered the head again, and the head's gradient lands on
    full parameters, where DeepSpeed's gradient hooks reduce-scatter it."""
    inner = _causal_lm(model)
    captured = {}

    def keep_hidden(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def run_head(head, _inputs, output):
        result = head_fn(head, captured["hidden"], head.weight, getattr(head, "bias", None))
        captured["result"] = result
        tensor = anchor(result)
        if _zero3_partitioned(head) and torch.is_grad_enabled() and tensor.requires_grad:
            captured["zero3"] = True
            return _Tied.apply(output, tensor)

    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.base_model
    head = inner.get_output_embeddings()
    handles = [decoder.register_forward_hook(keep_hidden), head.register_forward_hook(run_head, prepend=True)]
    try:
        kwargs = {"logits_to_keep": 1} if _takes_logits_to_keep(type(inner)) else {}
        outputs = model(**model_inputs(batch), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    result = captured["result"]
    if captured.get("zero3"):
        return anchor(result, _Tied.apply(anchor(result), outputs.logits))
    return result


def _gathered_for_backward(head, t):
    """``t``, with a backward that re-gathers an FSDP2-sharded head first (the op saved its
    gathered weight; FSDP resharded it after the forward)."""
    return _GatherBeforeBackward.apply(head, t) if _is_fsdp2(head) and torch.is_grad_enabled() else t


def model_inputs(batch) -> dict:
    """The model's inputs of a collated batch: ``input_ids`` with ``attention_mask``, or, packed
    (``cu_seqlens``: padding-free), with ``position_ids`` and no mask — transformers then keeps the
    attention within each packed row (it finds the rows where the positions restart) — and no cache."""
    if "cu_seqlens" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def aligned_labels(batch):
    """``(labels, cu_seqlens)``: the batch's labels aligned with the logits (:func:`robalign.shift_labels`),
    ``[S, T]``, or packed ``[N]`` with the batch's ``cu_seqlens``."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return shift_labels(batch["labels"]), None
    return shift_labels(batch["labels"].reshape(-1), cu_seqlens=cu), cu


def _flat(t, cu):
    """``[1, N, D]`` packed model outputs as ``[N, D]`` (padded ones as they are)."""
    return t if cu is None else t.reshape(-1, t.shape[-1])


def policy_logps(model, batch, *, fused: bool = True, backend=None, ld_alpha: float | None = None,
                 group_size: int = 2, wpo: bool = False, stats_into: dict | None = None):
    """Per-row ``(logps, counts)`` of a collated batch under ``model`` (a HF causal LM, possibly
    wrapped by DDP, FSDP, DeepSpeed or PEFT).

    The fused path runs :func:`robalign.linear_sequence_logps` on the decoder's last hidden states
    and the LM head (:func:`_through_head`, which also handles a head that FSDP2 or ZeRO-3 shards);
    a model whose logits are not ``hidden @ Wᵀ + b`` takes the logits path (``fused=False``) instead.
    With ``ld_alpha`` the log-prob is LD-DPO's ``logp_shared + α·logp_tail`` (groups of
    ``group_size`` rows; :func:`robalign.losses.layout.ld_logps`): two passes on one forward. With
    ``wpo`` a third result, WPO's per-row ω (:func:`robalign.ops.wpo.wpo_weights`, no gradient),
    from the same logits or hidden states. A packed batch (``cu_seqlens``, padding-free) takes
    neither ``ld_alpha`` nor ``wpo``. ``stats_into``: a dict that receives ``"token_stats"``, the
    per-sequence entropy and mean-logit sums of the same forward (:func:`robalign.ops.token_stats.token_stats`)."""
    labels, cu = aligned_labels(batch)
    if cu is not None and (ld_alpha is not None or wpo):
        raise ValueError("robalign: `ld_alpha` and `wpo` take padded rows, not padding-free (packed) batches")

    if _plain_logits(model, fused):
        logits = _flat(model(**model_inputs(batch)).logits, cu)
        if stats_into is not None:
            stats_into["token_stats"] = token_stats(labels, logits=logits.detach(), cu_seqlens=cu)
        if ld_alpha is None:
            result = sequence_logps(logits, labels, backend=backend, cu_seqlens=cu)
        else:
            result = ld_logps(lambda part: sequence_logps(logits, part, backend=backend), labels, ld_alpha, group_size)
        return (*result, wpo_weights(labels, logits=logits.detach())) if wpo else result

    transform = head_transform(model)
    head = transform.kwargs

    def head_fn(head_module, hidden, weight, bias):
        hidden = _flat(hidden, cu)
        _head_stats(stats_into, labels, cu, hidden, weight, bias, transform)
        if ld_alpha is None:
            logps, counts = linear_sequence_logps(hidden, weight, labels, bias=bias, backend=backend, cu_seqlens=cu,
                                                  **head)
        else:
            logps, counts = ld_logps(lambda part: linear_sequence_logps(hidden, weight, part, bias=bias,
                                                                        backend=backend, **head),
                                     labels, ld_alpha, group_size)
        extra = (wpo_weights(labels, hidden=hidden.detach(), head_weight=weight, head_bias=bias,
                             transform=transform),) if wpo else ()
        return (_gathered_for_backward(head_module, logps), counts, *extra)

    def anchor(result, tied=None):
        return result[0] if tied is None else (tied, *result[1:])

    return _through_head(model, batch, head_fn, anchor)


def _head_stats(stats_into, labels, cu, hidden, weight, bias, transform) -> None:
    """Fill ``stats_into["token_stats"]`` (when asked) from the hidden states and the head, inside its forward."""
    if stats_into is not None:
        stats_into["token_stats"] = token_stats(labels, hidden=hidden.detach(), head_weight=weight.detach(),
                                                head_bias=None if bias is None else bias.detach(), cu_seqlens=cu,
                                                transform=transform)


def mismatched_batch(batch) -> dict:
    """The mismatched rows of a collated unpaired batch (``kl_input_ids``, ...) as a batch of their own."""
    if "kl_input_ids" not in batch:
        raise ValueError("robalign: KTO's reference point needs each sample's mismatched row (`kl_input_ids`); "
                         "build the data with PreferenceDataset.from_file(..., unpaired=True, kl_rows=True)")
    return {key[3:]: value for key, value in batch.items() if key.startswith("kl_") and key != "kl_ref_logps"}


def one_pass_loss(model, batch, loss_fn, *, accumulator=None, use_weights: bool = True, kl=None,
                  stats_into: dict | None = None):
    """The :class:`robalign.DoRAOutput` of one collated micro-batch through the one-pass fused loss:
    ``loss_fn`` (a :class:`robalign.FusedLinearDoRALoss`) runs on the decoder's hidden states and the LM
    head inside the head's forward
    (:func:`_through_head`); ``loss`` is what to ``backward()`` (with ``accumulator``, this
    micro-batch's share of the effective batch). A reduction without a one-pass form (group DRO,
    the per-batch ambiguity sets) takes ``DoRALoss``'s recompute path here, on the same hidden
    states; the batch's ``group_ids`` go to a reduction that reads them. ``kl``: KTO's
    ``{"kl_logps", "kl_ref_logps", "kl_counts"}``; ``stats_into``: as in :func:`policy_logps`."""
    if not isinstance(loss_fn, FusedLinearDoRALoss):
        raise TypeError(f"robalign: one_pass_loss runs the loss on hidden states and the head: `loss_fn` must be a "
                        f"robalign.FusedLinearDoRALoss (or DoRAConfig.build_loss()'s), got {type(loss_fn).__name__}")
    labels, cu = aligned_labels(batch)
    weights = probs = None
    if use_weights:
        weights = batch.get("weights")
        probs = batch.get("probs") if weights is None else None
    group_ids = batch.get("group_ids") if loss_fn.reduction.takes_group_ids else None

    def head_fn(head, hidden, weight, bias):
        extras = BatchExtras(scores=batch.get("scores"), group_ids=group_ids, cu_seqlens=cu, accumulator=accumulator,
                             token_stats=stats_into is not None, **(kl or {}))
        out = loss_fn(_flat(hidden, cu), weight, labels, batch.get("ref_logps"), probs=probs, weights=weights,
                      extras=extras, bias=bias)
        if stats_into is not None:                  # formed by the loss's own products where it can
            stats_into["token_stats"] = out.token_stats
        out.loss = _gathered_for_backward(head, out.loss)
        return out

    def anchor(out, tied=None):
        if tied is None:
            return out.loss
        out.loss = tied
        return out

    return _through_head(model, batch, head_fn, anchor)
