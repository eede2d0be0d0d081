"""Shared harness of the GPU benchmarks: timing, the measured ceilings, peak memory, the
environment record (device, versions, commit, date) and atomic JSON output."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def bench(fn, device) -> float:
    """Median seconds of ``fn``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds


def peak_above(fn, device) -> float | None:
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
    return 2 * n ** 3 / bench(lambda: a @ b, device)


def environment(device) -> dict:
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}


def write_json(directory: Path, name: str, record: dict) -> Path:
    """``directory/name.json``, written atomically (shared by the CPU and GPU benchmarks)."""
    from robalign._io import write_atomic

    path = Path(directory) / f"{name}.json"
    write_atomic(path, lambda h: h.write(json.dumps(record, indent=2).encode()))
    return path
