"""Backend selection for the heavy ops — the one place the Triton and C++ backends plug into.

    backend     device                      provided by
    "triton"    CUDA (CPU under TRITON_INTERPRET=1)   robalign.kernels
    "cpp"       CPU                         robalign._C (csrc/)
    "torch"     any                         robalign.chunked (plain PyTorch, chunked over rows)
    "reference" any                         robalign.reference (plain PyTorch, autograd)
    "auto"      the first available of the above for the tensor's device and dtype:
                CUDA triton → torch, CPU cpp → torch, other devices torch; other dtypes reference

The default is ``$ROBALIGN_BACKEND`` or ``"auto"``. A forced backend that cannot run raises
an error naming what is missing; it never falls back silently.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch", "reference")
ENV_VAR = "ROBALIGN_BACKEND"
# Looked up once at import: resolve() runs inside torch.compile traces, where importlib is opaque.
HAS_TRITON = importlib.util.find_spec("triton") is not None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says what is missing."""


def default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR}={value!r} must be one of {BACKENDS}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_module(op: str, device: torch.device) -> ModuleType:
    if not HAS_TRITON:
        raise BackendUnavailable("backend 'triton' needs the `triton` package: pip install triton")
    if device.type == "cpu" and not triton_interpret():
        raise BackendUnavailable(
            "backend 'triton' runs on CUDA tensors; CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)")
    if device.type not in ("cuda", "cpu"):
        raise BackendUnavailable(f"backend 'triton' runs on CUDA tensors, got a tensor on {device}")
    from . import kernels as module

    if not hasattr(module, op):
        raise BackendUnavailable(f"backend 'triton': robalign.kernels has no kernel for {op} yet")
    return module


def _cpp_module(op: str, device: torch.device) -> ModuleType:
    if device.type != "cpu":
        raise BackendUnavailable(f"backend 'cpp' runs on CPU tensors, got a tensor on {device}")
    try:
        from . import cpu as module
    except ImportError as err:
        raise BackendUnavailable(f"backend 'cpp' is not available: {err}") from err
    if not hasattr(module, op):
        raise BackendUnavailable(f"backend 'cpp': the C++ extension has no kernel for {op} yet")
    return module


def _torch_module(op: str, device: torch.device) -> ModuleType:
    from . import chunked as module

    return module


def _reference_module(op: str, device: torch.device) -> ModuleType:
    from . import reference

    return reference


_PROVIDERS = {"triton": _triton_module, "cpp": _cpp_module, "torch": _torch_module, "reference": _reference_module}
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)      # what the kernel backends take


def resolve(where: str, backend: str | None, op: str, tensor: torch.Tensor) -> tuple[str, ModuleType]:
    """The backend name and module that runs ``op`` on ``tensor``'s device and dtype."""
    name = default_backend() if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"{where}: `backend` must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        try:
            return name, _PROVIDERS[name](op, tensor.device)
        except BackendUnavailable as err:
            raise BackendUnavailable(f"{where}: {err}") from None
    order = _AUTO_ORDER.get(tensor.device.type, ("torch",))
    if tensor.dtype not in KERNEL_DTYPES:
        order = ("reference",)
    for candidate in order:
        try:
            return candidate, _PROVIDERS[candidate](op, tensor.device)
        except BackendUnavailable:
            continue
    raise AssertionError("unreachable: the torch and reference backends are always available")
