"""The one backend registry of the heavy ops: a name maps to the devices and dtypes it serves, the
module of its row kernels, the module of its ops, and why it cannot run here.

    backend     devices                          dtypes              row kernels          ops
    "triton"    CUDA (CPU under TRITON_INTERPRET=1)  f32, bf16, f16   robalign.kernels     robalign.ops.fused
    "cpp"       CPU                              f32, bf16, f16      robalign.ops.cpu     robalign.ops.fused
    "torch"     any                              f32, bf16, f16      robalign.ops.chunked robalign.ops.fused
    "reference" any                              any float           —                    robalign.ops.reference_backend

A row-kernel module provides ``rows_lse_target``, ``rows_softmax_grad`` (both with the keywords
``scale`` and ``softcap`` of the head's logit transform, :mod:`robalign.ops.head`) and
``empty_grad_like`` over ``[B, T, V]`` views; an ops module provides ``sequence_logps``, ``sequence_logps_with_ref``
and ``linear_sequence_logps`` with one signature for every backend (the ``kernel`` argument
names the row kernels; the reference ignores it). Modules are named here as strings and imported
on first use, so this module imports nothing of robalign and every backend imports only what is
below it.

``"auto"`` picks, in :data:`AUTO_ORDER`, the first backend whose ``auto_devices`` hold the
tensor's device type, whose dtypes hold its dtype and that can run here; the reference serves
what no kernel does (float64). The default is ``$ROBALIGN_BACKEND`` or ``"auto"``. A forced
backend that cannot run raises :class:`BackendUnavailable` naming what is missing; it never
falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "AUTO_ORDER", "ENV_VAR", "KERNEL_DTYPES", "get",
           "resolve", "default_backend", "triton_interpret", "interpreter_conflict"]

ENV_VAR = "ROBALIGN_BACKEND"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ANY = None
# Looked up once at import: resolve() runs inside torch.compile traces, where importlib is opaque.
HAS_TRITON = importlib.util.find_spec("triton") is not None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says what is missing."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    """One backend. ``devices``/``auto_devices``/``dtypes`` are ``None`` for "any"; ``missing``
    returns why the backend cannot run on a device here (``None`` when it can)."""

    name: str
    ops: str
    rows: str | None
    devices: tuple[str, ...] | None
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    missing: Callable[[torch.device], str | None]

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here, or ``None``."""
        if self.devices is not None and device.type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, got a tensor on {device}"
        return self.missing(device)

    def serves(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    def load_ops(self) -> ModuleType:
        return _load(self.ops)

    def load_rows(self) -> ModuleType:
        """The row-kernel module (ImportError when it cannot be loaded, e.g. no C++ extension)."""
        if self.rows is None:
            raise BackendUnavailable(f"backend {self.name!r} has no row kernels")
        return _load(self.rows)


def _load(path: str) -> ModuleType:
    """The module at ``path``: from ``sys.modules`` once imported (which is what a torch.compile
    trace sees: dynamo does not trace importlib), else imported now."""
    module = sys.modules.get(path)
    return module if module is not None else importlib.import_module(path)


@functools.lru_cache(maxsize=None)
def _release(package: str) -> tuple[int, ...]:
    """``(major, minor)`` of an installed ``package`` (read from its metadata, not imported), or ``()``."""
    try:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


def interpreter_conflict() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed numpy, or ``None``:
    Triton ≤ 3.6 turns a tensor loop bound into an int with ``int()`` of a one-element array, which
    numpy ≥ 2.4 refuses (Triton 3.7 squeezes it first)."""
    triton, numpy = _release("triton"), _release("numpy")
    if triton and numpy and triton < (3, 7) and numpy >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton))}'s interpreter (TRITON_INTERPRET=1) cannot run the kernels with "
                f"numpy {'.'.join(map(str, numpy))}: it needs numpy<2.4 or triton>=3.7 (its loop bounds call int() "
                f"on one-element arrays, which numpy 2.4 refuses)")
    return None


def _triton_missing(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "backend 'triton' needs the `triton` package: pip install triton"
    if device.type != "cpu":
        return None
    if not triton_interpret():
        return ("backend 'triton' runs on CUDA tensors; CPU tensors need the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)")
    conflict = interpreter_conflict()
    return None if conflict is None else f"backend 'triton': {conflict}"


def _cpp_missing(device: torch.device) -> str | None:
    try:
        from . import cpu  # noqa: F401  (a static import: torch.compile traces it, not importlib's)
    except ImportError as err:
        return f"backend 'cpp' is not available: {err}"
    return None


def _nothing_missing(device: torch.device) -> str | None:
    return None


BACKENDS = {
    "triton": Backend("triton", "robalign.ops.fused", "robalign.kernels", ("cuda", "cpu"), ("cuda",), KERNEL_DTYPES,
                      _triton_missing),
    "cpp": Backend("cpp", "robalign.ops.fused", "robalign.ops.cpu", ("cpu",), ("cpu",), KERNEL_DTYPES, _cpp_missing),
    "torch": Backend("torch", "robalign.ops.fused", "robalign.ops.chunked", ANY, ANY, KERNEL_DTYPES, _nothing_missing),
    "reference": Backend("reference", "robalign.ops.reference_backend", None, ANY, ANY, ANY, _nothing_missing),
}
AUTO_ORDER = ("triton", "cpp", "torch", "reference")
NAMES = ("auto", *BACKENDS)


def get(name: str) -> Backend:
    """The registry entry ``name``."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"robalign: unknown backend {name!r}; expected one of {NAMES}") from None


def default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in NAMES:
        raise ValueError(f"environment variable {ENV_VAR}={value!r} must be one of {NAMES}")
    return value


def resolve(where: str, backend: str | None, tensor: torch.Tensor) -> Backend:
    """The backend that runs on ``tensor``'s device and dtype: ``backend`` itself (or
    ``$ROBALIGN_BACKEND``), or for ``"auto"`` the first that can, in :data:`AUTO_ORDER`."""
    name = default_backend() if backend is None else backend
    if name not in NAMES:
        raise ValueError(f"{where}: `backend` must be one of {NAMES}, got {name!r}")
    if name != "auto":
        entry = BACKENDS[name]
        reason = entry.unavailable(tensor.device)
        if reason is not None:
            raise BackendUnavailable(f"{where}: {reason}")
        return entry
    for candidate in AUTO_ORDER:
        entry = BACKENDS[candidate]
        if (entry.auto_devices is None or tensor.device.type in entry.auto_devices) and entry.serves(tensor.dtype) \
                and entry.unavailable(tensor.device) is None:
            return entry
    raise AssertionError("unreachable: the reference backend runs everywhere")
