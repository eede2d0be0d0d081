"""Shared harness of the CPU benchmarks: one fresh process per provider, median time, peak
resident memory above the inputs, a Markdown table of ratios against the naive provider, and
an atomically written JSON record in ``--out`` (default ``./robalign-bench`` under the current
folder; the committed records in benchmarks/results/ are rewritten only when ``--out`` names it)."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = "robalign-bench"                               # relative to the current folder
MODES = ("fwdbwd", "fwd")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024                      # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the peak resident set (VmHWM, Linux ≥ 4.0) and return the current one (MB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def parse_args(doc: str, providers, argv=None, **sizes):
    """The CPU scripts' command line: ``--<size> N`` for each keyword (its value the default),
    ``--mode``, ``--repeat``, ``--providers`` and the hidden ``--child PROVIDER`` of a measuring
    process."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--mode", choices=MODES, default="fwdbwd",
                        help="fwdbwd: forward+backward (training); fwd: forward under no_grad (reference log-probs)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the JSON record (default ./{DEFAULT_OUT}; benchmarks/results to update "
                             "the committed records)")
    parser.add_argument("--providers", default=",".join(providers))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(provider: str, step, repeat: int) -> dict:
    """In the child: one warm-up (and compilation), then ``repeat`` timed runs of ``step``; memory
    is the growth of the peak resident set over the resident set before the timed runs."""
    step()
    baseline = reset_peak_rss()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
        del result
    return {"provider": provider, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_above_inputs_mb": max(0.0, status_mb("VmHWM") - baseline)}


def run_providers(script: str, providers, child_args, env_for=None) -> list[dict]:
    """Run ``script --child PROVIDER child_args...`` once per provider; collect its JSON line."""
    rows = []
    for provider in providers:
        env = env_for(provider) if env_for else None
        cmd = [sys.executable, script, "--child", provider, *map(str, child_args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=None if env is None else dict(os.environ, **env))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {provider}: {rows[-1]['median_s'] * 1e3:.0f} ms", file=sys.stderr)
    return rows


def print_table(rows, extra_columns=()) -> None:
    """Markdown table with time and memory ratios against the ``naive`` row."""
    naive = next(r for r in rows if r["provider"] == "naive")
    head = ["provider", "median time (ms)", "time vs naive", "peak memory above inputs (MB)", "memory vs naive",
            *(name for name, _ in extra_columns)]
    print("| " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * (len(head) - 1))
    for r in rows:
        cells = [r["provider"], f"{r['median_s'] * 1e3:.0f}", f"{r['median_s'] / naive['median_s']:.2f}",
                 f"{r['peak_above_inputs_mb']:.0f}",
                 f"{r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1):.2f}",
                 *(fn(r) for _, fn in extra_columns)]
        print("| " + " | ".join(cells) + " |")


def git_commit() -> dict:
    """``{"commit": short hash, "dirty": uncommitted changes to tracked files}`` of this checkout
    (a dirty record measured code that no commit holds)."""
    here = Path(__file__).parent
    run = lambda *cmd: subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=here).stdout.strip()
    return {"commit": run("rev-parse", "--short", "HEAD"),
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def write_record(name: str, record: dict, out) -> Path:
    """``out/name.json`` with date, commit, versions and machine."""
    import torch

    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), **git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), **record,
    }
    from gpu_harness import write_json

    return write_json(Path(out), name, record)
