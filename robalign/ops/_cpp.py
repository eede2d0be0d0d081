"""Loading the C++ CPU extension ``robalign.ops._C`` (sources in csrc/).

Order: the extension built by ``setup.py`` (``pip install --no-build-isolation .``); else a
just-in-time build with ``torch.utils.cpp_extension.load`` into ``$ROBALIGN_BUILD_DIR``
(default ``~/.cache/robalign/<torch version>``), announced by one line on stderr; else, when no
compiler works, ``None`` with a one-time warning naming the fix (callers fall back to the
chunked PyTorch backend). ``ROBALIGN_NO_JIT=1`` disables the just-in-time build.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path

SOURCES = ("logps_cpu.cpp",)


def csrc_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


# The vector widths ATen's at::vec can be compiled for, widest first: each one's compiler flags and
# the /proc/cpuinfo flags a CPU needs for it. The kernels are written once against at::vec.
ARCHS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512",
                "-DCPU_CAPABILITY=AVX512"], ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")),
    "avx2": (["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], ("avx2", "fma", "f16c")),
    "generic": ([], ()),
}


def cpu_archs() -> list[str]:
    """The entries of :data:`ARCHS` this CPU runs, widest first (``["generic"]`` off x86-64)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["generic"]
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ["generic"]
    return [name for name, (_, needs) in ARCHS.items() if set(needs) <= flags]


def build_arch() -> str:
    """The entry of :data:`ARCHS` the extension is built for: ``$ROBALIGN_CPU_ARCH`` (``generic``
    e.g. to build a wheel for other machines), by default (``native``) the widest this CPU runs."""
    arch = os.environ.get("ROBALIGN_CPU_ARCH", "native")
    if arch == "native":
        return cpu_archs()[0]
    if arch not in ARCHS:
        raise ValueError(f"ROBALIGN_CPU_ARCH must be 'native' or one of {sorted(ARCHS)}, got {arch!r}")
    return arch


def compile_args(arch: str | None = None) -> list[str]:
    """-O3, no floating-point contraction, and the vector flags of ``arch`` (an entry of
    :data:`ARCHS`; default :func:`build_arch`). GCC contracts ``a·b − c`` into one fused multiply-add
    by default: the backward's ``scale·z − lse`` then skipped the rounding of ``z' = scale·z`` that
    the forward's lse was formed from, which put |z'|·2⁻²⁴ into the exponent (a hidden-state gradient
    2.4 % off at temperature 1e-6); the kernels' deliberate fused multiply-adds are explicit."""
    return ["-O3", "-ffp-contract=off", *ARCHS[arch or build_arch()][0]]


def parallel_args() -> list[str]:
    """``-fopenmp`` (compile and link) where torch's CPU parallel backend is OpenMP (Linux wheels):
    ``at::parallel_for`` is header code whose ``#pragma omp parallel`` a build without it ignores,
    so every row kernel then ran on one thread whatever ``torch.get_num_threads()`` said. The
    extension then shares the libgomp that torch has loaded (same soname), so one thread pool."""
    import torch

    return ["-fopenmp"] if torch._C.has_openmp and platform.system() == "Linux" else []


def build_dir() -> Path:
    import torch

    default = Path.home() / ".cache" / "robalign" / f"torch-{torch.__version__.replace('+', '_')}"
    return Path(os.environ.get("ROBALIGN_BUILD_DIR", default))


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or ``None`` (with a warning) when it cannot be had."""
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C
    except ImportError:
        pass
    sources = [str(csrc_dir() / name) for name in SOURCES]
    if os.environ.get("ROBALIGN_NO_JIT", "0") not in ("", "0") or not all(Path(s).is_file() for s in sources):
        return _unavailable("the extension is not built and ROBALIGN_NO_JIT is set or csrc/ is missing")
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"robalign: building the C++ CPU extension in {directory} (once)", file=sys.stderr)
    try:
        return cpp_extension.load(name="robalign_C", sources=sources, extra_cflags=compile_args() + parallel_args(),
                                  extra_ldflags=parallel_args(),
                                  build_directory=str(directory), verbose=False)
    except Exception as err:  # a missing compiler, headers, ninja...
        return _unavailable(f"building it failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")


def _unavailable(reason: str):
    warnings.warn(
        f"robalign: the C++ CPU backend is unavailable ({reason}); CPU tensors use the slower "
        "chunked PyTorch backend. Fix: install a C++ compiler and ninja, then `pip install --no-build-isolation .` "
        "or let the first call build it.", RuntimeWarning, stacklevel=3)
    return None
