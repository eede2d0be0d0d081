"""Argument checks shared by the public functions. Kernels assume what these establish.

Every message names the function, the argument and what was expected. Checks that read
tensor values (label ranges, probabilities in [0, 1], monotone ``cu_seqlens``) synchronise
with the device once per call; they are skipped while ``torch.compile`` traces, where a
data-dependent branch would break the graph.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _reads_values() -> bool:
    return not torch.compiler.is_compiling()


def fail(where: str, message: str, exc: type[Exception] = ValueError):
    raise exc(f"{where}: {message}")


def check_tensor(where, name, x, *, ndim=None, floating=False, integer=False):
    if not isinstance(x, torch.Tensor):
        fail(where, f"`{name}` must be a torch.Tensor, got {type(x).__name__}", TypeError)
    if ndim is not None and x.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        fail(where, f"`{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        fail(where, f"`{name}` must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}", TypeError)
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        fail(where, f"`{name}` must be an integer tensor, got {x.dtype}", TypeError)


def check_same_device(where, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        fail(where, f"all tensors must be on one device, got {listing}")


def check_cu_seqlens(where, cu_seqlens, num_tokens):
    check_tensor(where, "cu_seqlens", cu_seqlens, ndim=1, integer=True)
    if cu_seqlens.numel() < 2:
        fail(where, f"`cu_seqlens` must hold at least 2 offsets (S + 1 for S sequences), got {cu_seqlens.numel()}")
    if _reads_values():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens:
            fail(where, f"`cu_seqlens` must start at 0 and end at the number of tokens {num_tokens}, "
                        f"got {int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            fail(where, "`cu_seqlens` must be non-decreasing")


def check_labels(where, labels, vocab, ignore_index):
    """``ignore_index`` (see :func:`check_ignore_index`), and every label a token id in [0, V) or
    ``ignore_index``; labels of any integer dtype."""
    check_ignore_index(where, ignore_index, vocab)
    if not _reads_values() or labels.numel() == 0:
        return
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        fail(where, f"`labels` must lie in [0, {vocab}) or equal ignore_index={ignore_index}, found {bad}")


def check_tokens(where, x_name, x, labels, cu_seqlens, feature_name):
    """``x`` is ``[S, T, F]`` with ``labels`` ``[S, T]``, or ``[N, F]`` with ``[N]`` and cu_seqlens;
    F ≥ 1."""
    check_tensor(where, "labels", labels, integer=True)
    if x.shape[-1] == 0:
        fail(where, f"`{x_name}` must have {feature_name} >= 1 (its last dimension), got shape {tuple(x.shape)}")
    if cu_seqlens is None:
        if x.dim() != 3 or labels.dim() != 2 or tuple(x.shape[:2]) != tuple(labels.shape):
            fail(where, f"padded input needs `{x_name}` [S, T, {feature_name}] and `labels` [S, T], got "
                        f"{tuple(x.shape)} and {tuple(labels.shape)} (pass cu_seqlens for packed [N, {feature_name}] input)")
    else:
        if x.dim() != 2 or labels.dim() != 1 or x.shape[0] != labels.shape[0]:
            fail(where, f"packed input (with cu_seqlens) needs `{x_name}` [N, {feature_name}] and `labels` [N], got "
                        f"{tuple(x.shape)} and {tuple(labels.shape)}")
        check_cu_seqlens(where, cu_seqlens, labels.shape[0])


def check_probs(where, name, p):
    check_tensor(where, name, p, floating=True)
    if _reads_values() and not bool(((p >= 0) & (p <= 1)).all()):
        fail(where, f"`{name}` must be finite probabilities in [0, 1]")


def check_number(where, name, value, *, low=None, high=None, low_open=False, high_open=False, allow_tensor=False):
    """Check ``low (<|<=) value (<|<=) high`` for a number (or every element of a tensor), in the
    value's own precision: a Python number is compared as a Python float (``beta=1e-300`` is
    positive), a tensor in float64."""
    if isinstance(value, torch.Tensor) and allow_tensor:
        if not (value.is_floating_point() or value.dtype in _INTEGER_DTYPES):
            fail(where, f"`{name}` must be a real tensor, got {value.dtype}", TypeError)
        if not _reads_values():
            return
        values = value.detach().double()
        is_nan = bool(torch.isnan(values).any())
        lo_ok = low is None or bool((values > low).all() if low_open else (values >= low).all())
        hi_ok = high is None or bool((values < high).all() if high_open else (values <= high).all())
        shown = values.flatten()[:4].tolist()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            x = float(value)
        except OverflowError:
            fail(where, f"`{name}` must be a finite number, got an integer of {len(str(value))} digits")
        is_nan = math.isnan(x)
        lo_ok = low is None or (x > low if low_open else x >= low)
        hi_ok = high is None or (x < high if high_open else x <= high)
        shown = value
    else:
        fail(where, f"`{name}` must be a number, got {type(value).__name__}", TypeError)
    if is_nan:
        fail(where, f"`{name}` must not be NaN")
    if not (lo_ok and hi_ok):
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
        fail(where, f"`{name}` must lie in {interval}, got {shown!r}")


def check_int(where, name, value, *, low=None):
    """A Python (or NumPy) integer, not a bool, at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(where, f"`{name}` must be an int, got {type(value).__name__}", TypeError)
    if low is not None and value < low:
        fail(where, f"`{name}` must be an int >= {low}, got {value}")


def check_ignore_index(where, ignore_index, vocab):
    """``ignore_index`` is an int64 below V: negative (the usual -100), or a token id in [0, V) that
    the caller chooses to skip. A value >= V is no token and would index past a row."""
    check_int(where, "ignore_index", ignore_index)
    if not -(1 << 63) <= ignore_index < (1 << 63):
        fail(where, f"`ignore_index` must fit in int64, got {ignore_index}")
    if vocab is not None and ignore_index >= vocab:
        fail(where, f"`ignore_index` must be negative (the usual -100) or a token id below V = {vocab}, "
                    f"got {ignore_index}")


def check_lam(where, lam):
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or math.isnan(lam):
        fail(where, f"`lam` must be a real number (float('inf') for the weighted mean), got {lam!r}")
    if lam == 0:
        fail(where, "`lam` must be non-zero: λ > 0 is DRO, λ < 0 a soft minimum, float('inf') the weighted mean")
    if math.isinf(lam) and lam < 0:
        fail(where, "`lam` = -inf is not supported (it is the hard minimum); use a finite negative value")
