"""Argument checks shared by the public functions. Kernels assume what these establish.

Every message names the function, the argument and what was expected. Checks of shapes, dtypes
and numbers cost nothing; checks that read tensor *values* (label ranges, probabilities in
[0, 1], monotone ``cu_seqlens``, finite weights) run in one of two modes:

    "eager"  (default) read at once: a synchronisation per check, and the message names the
             offending value
    "lazy"   queued on the device with no synchronisation; :func:`raise_pending` (called where
             the caller synchronises anyway, e.g. the trainer once per optimizer step) reads them
             all at once and raises the first that failed. The kernels never read out of bounds
             meanwhile: a label outside [0, V) gives a NaN log-prob.

Set the mode with ``$ROBALIGN_CHECKS`` or :func:`value_checks`. Value checks are skipped while
``torch.compile`` traces, where a data-dependent branch would break the graph.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch

MODES = ("eager", "lazy")
_state = {"mode": None}
_pending: list = []                # (device bool tensor, message) of lazy checks not yet read


def checks_mode() -> str:
    if _state["mode"] is None:
        mode = os.environ.get("ROBALIGN_CHECKS", "eager").strip().lower() or "eager"
        if mode not in MODES:
            raise ValueError(f"environment variable ROBALIGN_CHECKS={mode!r} must be one of {MODES}")
        _state["mode"] = mode
    return _state["mode"]


@contextlib.contextmanager
def value_checks(mode: str):
    """Run value checks ``"eager"`` or ``"lazy"`` inside the block (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"robalign.value_checks: `mode` must be one of {MODES}, got {mode!r}")
    previous = checks_mode()
    _state["mode"] = mode
    try:
        yield
    finally:
        _state["mode"] = previous


def raise_pending() -> None:
    """Read every queued lazy check (one synchronisation) and raise the first that failed."""
    if not _pending:
        return
    checks = list(_pending)
    _pending.clear()
    results = torch.stack([ok.to(checks[0][0].device) for ok, _ in checks]).tolist()
    for ok, (_, message) in zip(results, checks):
        if not ok:
            raise ValueError(message)


def check_values(where: str, ok: torch.Tensor, message, exc: type[Exception] = ValueError) -> None:
    """Require every element of the bool tensor ``ok``. Eager: read now and raise
    ``message(lazy=False)`` (free to read values for its text); lazy: queue ``message(lazy=True)``
    with the device flag, no synchronisation."""
    if torch.compiler.is_compiling():
        return
    if checks_mode() == "lazy":
        _pending.append((ok.all(), f"{where}: {message(lazy=True)}"))
    elif not bool(ok.all()):
        fail(where, message(lazy=False), exc)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
    ends = torch.stack([cu_seqlens[0], cu_seqlens[-1] - num_tokens])
    check_values(where, ends == 0, lambda lazy: f"`cu_seqlens` must start at 0 and end at the number of tokens "
                 f"{num_tokens}" + ("" if lazy else f", got {int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}"))
    check_values(where, cu_seqlens[1:] >= cu_seqlens[:-1], lambda lazy: "`cu_seqlens` must be non-decreasing")


def check_labels(where, labels, vocab, ignore_index):
    """``ignore_index`` (see :func:`check_ignore_index`), and every label a token id in [0, V) or
    ``ignore_index``; labels of any integer dtype."""
    check_ignore_index(where, ignore_index, vocab)
    if labels.numel() == 0:
        return
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
    check_values(where, valid, lambda lazy: f"`labels` must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
                 + ("" if lazy else f", found {labels[~valid][0].item()}"))


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
    check_values(where, (p >= 0) & (p <= 1), lambda lazy: f"`{name}` must be finite probabilities in [0, 1]")


def check_number(where, name, value, *, low=None, high=None, low_open=False, high_open=False, allow_tensor=False):
    """Check ``low (<|<=) value (<|<=) high`` for a number (or every element of a tensor), in the
    value's own precision: a Python number is compared as a Python float (``beta=1e-300`` is
    positive), a tensor in float64."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
    if isinstance(value, torch.Tensor) and allow_tensor:
        if not (value.is_floating_point() or value.dtype in INTEGER_DTYPES):
            fail(where, f"`{name}` must be a real tensor, got {value.dtype}", TypeError)
        values = value.detach().double()
        ok = ~torch.isnan(values)
        if low is not None:
            ok &= (values > low) if low_open else (values >= low)
        if high is not None:
            ok &= (values < high) if high_open else (values <= high)
        check_values(where, ok, lambda lazy: f"`{name}` must lie in {interval} and not be NaN"
                     + ("" if lazy else f", got {values.flatten()[:4].tolist()}"))
        return
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
    # comparisons only, no math.isnan: under torch.compile a λ that changed between two compiles is a
    # SymFloat, which math's functions do not take (fullgraph failed on a second DoRALoss)
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or lam != lam:
        fail(where, f"`lam` must be a real number (float('inf') for the weighted mean), got {lam!r}")
    if lam == 0:
        fail(where, "`lam` must be non-zero: λ > 0 is DRO, λ < 0 a soft minimum, float('inf') the weighted mean")
    if lam == -math.inf:
        fail(where, "`lam` = -inf is not supported (it is the hard minimum); use a finite negative value")
