"""Shared harness of the GPU benchmarks: timing, the measured ceilings, peak memory, the
environment record (device, versions, commit, date) and atomic JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def bench(fn, device, min_repeats: int = 10) -> dict:
    """Median, 20th and 80th percentile seconds of ``fn`` (CUDA events through
    ``triton.testing.do_bench``, at least ``min_repeats`` timed runs, L2 flushed before each)."""
    if device == "cuda":
        import triton.testing

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(200.0, min_repeats * start.elapsed_time(end))
        q = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_s": q[0] / 1e3, "p20_s": q[1] / 1e3, "p80_s": q[2] / 1e3}
    fn()
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    times.sort()
    return {"median_s": statistics.median(times), "p20_s": times[0], "p80_s": times[-1]}


def host_seconds(fn, device, calls: int = 10) -> float:
    """Seconds the host spends in one call of ``fn`` without waiting for the device: the host work
    (checks, allocations, launches, and any synchronisation) that a fast kernel cannot hide."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - start) / calls
    if device == "cuda":
        torch.cuda.synchronize()
    return seconds


def failure(err: Exception, device) -> dict:
    """``{"error": ...}`` of a provider that raised: its type and first line (memory freed)."""
    if device == "cuda":
        torch.cuda.empty_cache()
    first = (str(err).strip().splitlines() or [""])[0][:160]
    return {"error": f"{type(err).__name__}: {first}"}


def measure(fn, device) -> dict:
    """Time (ms: median, p20, p80), host µs per call and peak MiB above the inputs of ``fn``;
    ``{"error": ...}`` when it fails (out of memory, a provider's missing API), so one provider
    cannot end a sweep."""
    try:
        t = bench(fn, device)
        host = host_seconds(fn, device)
        peak = peak_above(fn, device)
    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
        return failure(err, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"median_ms": t["median_s"] * 1e3, "p20_ms": t["p20_s"] * 1e3, "p80_ms": t["p80_s"] * 1e3,
            "host_us": host * 1e6, "peak_above_inputs_mb": peak}


def gate(got, want, rtol, atol) -> str | None:
    """The correctness gate before timing: each output against the reference, or a message."""
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if g.shape != w.shape or not torch.allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(w.abs().max()))):
            err = (g - w).abs().max().item() if g.shape == w.shape else f"shape {tuple(g.shape)}"
            return f"failed the correctness gate: output {i} differs from the reference by {err}"
    return None


def measure_providers(providers, make_step, device, label: str, derive, check=None) -> list[dict]:
    """One row per provider: ``check(provider)`` (the correctness gate: an error message or None),
    then ``make_step(provider)`` timed by :func:`measure` (or the ImportError of a provider that is
    not installed, or what a provider raised in its gate: out of memory, a kernel its Triton cannot
    run), plus ``derive(seconds)`` metrics when it ran."""
    import sys

    rows = []
    for provider in providers:
        try:
            error = None if check is None else check(provider)
            step = None if error else make_step(provider)
        except ImportError as err:
            row = {"error": f"not importable ({err})"}
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
            row = failure(err, device)
        else:
            row = {"error": error} if error else measure(step, device)
        if "median_ms" in row:
            row.update(derive(row["median_ms"] / 1e3))
        rows.append({"provider": provider, **row})
        print(f"  {label} {provider}: {row.get('median_ms', row.get('error'))}", file=sys.stderr)
    return rows


def versus(row: dict, base: dict | None, digits: int = 2) -> tuple[str, str, str]:
    """Table cells of a measured row against its baseline row: ``(speed-up, peak MB, memory ratio)``,
    "n/a" where the baseline (or a memory figure) is missing."""
    speed = "n/a" if base is None else f"{base['median_ms'] / row['median_ms']:.2f}×"
    mem, base_mem = row["peak_above_inputs_mb"], None if base is None else base.get("peak_above_inputs_mb")
    ratio = "n/a" if mem is None or not base_mem else f"{mem / base_mem:.{digits}f}"
    return speed, "n/a" if mem is None else f"{mem:.0f}", ratio


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device)["median_s"]
    return 2 * src.numel() * src.element_size() / seconds


def peak_above(fn, device) -> float | None:
    """MiB allocated at the peak of ``fn`` above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_rate(device) -> float:
    """FLOP per second of a large bfloat16 matrix product (float32 on CPU), on random data."""
    n = 8192 if device == "cuda" else 512
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / bench(lambda: a @ b, device)["median_s"]


# What `dirty` looks at: every tracked file but the records (a second benchmark run after a first
# one rewrote its record measures the same code).
DIRTY_PATHS = ("--", ":(top)", ":(top,exclude)benchmarks/results")


def git_state() -> dict:
    """``{"commit": short hash, "dirty": uncommitted changes to tracked files but the records}`` of
    this checkout; ``$ROBALIGN_COMMIT``/``$ROBALIGN_DIRTY`` where the copy has no ``.git``."""
    if "ROBALIGN_COMMIT" in os.environ:
        return {"commit": os.environ["ROBALIGN_COMMIT"], "dirty": os.environ.get("ROBALIGN_DIRTY", "0") == "1"}
    here = Path(__file__).parent
    git = lambda *cmd: subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=here).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", *DIRTY_PATHS))}


def environment(device) -> dict:
    import triton

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), **git_state(),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}


def write_json(directory: Path, name: str, record: dict) -> Path:
    """``directory/name.json``, written atomically (shared by the CPU and GPU benchmarks)."""
    from robalign._io import write_atomic

    path = Path(directory) / f"{name}.json"
    write_atomic(path, lambda h: h.write(json.dumps(record, indent=2).encode()))
    return path
