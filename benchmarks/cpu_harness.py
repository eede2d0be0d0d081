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


def parse_args(doc: str, providers, argv=None, floats: dict | None = None, **sizes):
    """The CPU scripts' command line: ``--<size> N`` for each keyword (its value the default),
    ``--<name> X`` for each of ``floats`` (a script's own options, ``{name: (default, help)}``),
    ``--masked`` and ``--padding`` (fractions of each sequence that are prompt, masked at its start,
    and padding, masked at its end), ``--mode``, ``--repeat``, ``--rounds``, ``--providers`` and the
    hidden ``--child PROVIDER`` of a measuring process."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, (default, text) in (floats or {}).items():
        parser.add_argument(f"--{name}", type=float, default=default, help=text)
    parser.add_argument("--masked", type=float, default=0.125, help="prompt fraction of each sequence (default 1/8)")
    parser.add_argument("--padding", type=float, default=0.0, help="padding fraction at the end of each sequence")
    parser.add_argument("--mode", choices=MODES, default="fwdbwd",
                        help="fwdbwd: forward+backward (training); fwd: forward under no_grad (reference log-probs)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of one fresh process per provider, interleaved across providers")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the JSON record (default ./{DEFAULT_OUT}; benchmarks/results to update "
                             "the committed records)")
    parser.add_argument("--providers", default=",".join(providers))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sequence_mask(num_seqs: int, seqlen: int, masked: float, padding: float):
    """``[S, T]`` bool: True on the scored tokens — each sequence's first ``masked·T`` tokens are
    prompt and its last ``padding·T`` are padding, as in a real preference batch."""
    import torch

    start, end = round(masked * seqlen), seqlen - round(padding * seqlen)
    if not 0 <= start < end <= seqlen:
        raise SystemExit(f"--masked {masked} and --padding {padding} leave no scored token in {seqlen}")
    mask = torch.zeros(num_seqs, seqlen, dtype=torch.bool)
    mask[:, start:end] = True
    return mask


def gate(provider: str, got, want, rtol=1e-4, atol=1e-5) -> str | None:
    """The correctness gate before timing: each output of the provider against the float64
    reference (a short message when one differs, else None)."""
    import torch

    for i, (g, w) in enumerate(zip(got, want)):
        g = g.detach().double()
        if g.shape != w.shape or not torch.allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(w.abs().max()))):
            err = (g - w).abs().max().item() if g.shape == w.shape else f"shape {tuple(g.shape)}"
            return f"failed the correctness gate: output {i} differs from the float64 reference by {err}"
    return None


def measure(provider: str, step, repeat: int, check=None) -> dict:
    """In the child: the correctness gate (``check()`` returns an error or None), one warm-up (and
    compilation), then ``repeat`` timed runs of ``step``; memory is the growth of the peak resident
    set over the resident set before the timed runs."""
    error = check() if check is not None else None
    if error:
        return {"provider": provider, "error": error}
    step()
    baseline = reset_peak_rss()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
        del result
    return {"provider": provider, "times_s": times, "peak_above_inputs_mb": max(0.0, status_mb("VmHWM") - baseline)}


def child_result(provider: str, out: subprocess.CompletedProcess) -> dict:
    """A child's JSON row, or ``{"error": ...}`` with its exit status and last line of stderr when
    it crashed (one provider cannot end a sweep)."""
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    last = (out.stderr.strip().splitlines() or [""])[-1][:160]
    return {"provider": provider, "error": f"exited with status {out.returncode}: {last}"}


def run_providers(script: str, providers, child_args, env_for=None, rounds: int = 1, progress=None) -> list[dict]:
    """Run ``script --child PROVIDER child_args...`` in a fresh process per provider, ``rounds``
    times, the providers interleaved within each round (so a slow minute of a shared machine hits
    them all); a row gives the median of all timed runs and the spread of the rounds' medians.
    ``progress(1)`` is called after each process."""
    runs: dict[str, list[dict]] = {p: [] for p in providers}
    for _ in range(rounds):
        for provider in providers:
            env = env_for(provider) if env_for else None
            cmd = [sys.executable, script, "--child", provider, *map(str, child_args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env=None if env is None else dict(os.environ, **env))
            runs[provider].append(child_result(provider, out))
            if progress is not None:
                progress(1)
    rows = []
    for provider, results in runs.items():
        failed = next((r for r in results if "error" in r), None)
        if failed:
            rows.append({"provider": provider, "error": failed["error"]})
            print(f"  {provider}: {failed['error']}", file=sys.stderr)
            continue
        times = [t for r in results for t in r["times_s"]]
        medians = [statistics.median(r["times_s"]) for r in results]
        rows.append({"provider": provider, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "round_medians_s": medians, "rounds": len(results),
                     "peak_above_inputs_mb": max(r["peak_above_inputs_mb"] for r in results),
                     **{k: v for k, v in results[0].items() if k not in ("provider", "times_s", "peak_above_inputs_mb")}})
        print(f"  {provider}: {rows[-1]['median_s'] * 1e3:.0f} ms", file=sys.stderr)
    return rows


def print_table(rows, extra_columns=(), baseline: str = "naive") -> None:
    """Markdown table with time and memory ratios against the ``baseline`` row; a provider that
    failed its correctness gate (or could not run) is a row that says so."""
    ok = [r for r in rows if "error" not in r]
    naive = next((r for r in ok if r["provider"] == baseline), ok[0] if ok else None)
    if naive is None:
        print("every provider failed:", "; ".join(f"{r['provider']}: {r['error']}" for r in rows))
        return
    baseline = naive["provider"]
    head = ["provider", "median time (ms)", "min–max (ms)", f"time vs {baseline}", "peak memory above inputs (MB)",
            f"memory vs {baseline}", *(name for name, _ in extra_columns)]
    print("| " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * (len(head) - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['provider']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["provider"], f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}–{r['max_s'] * 1e3:.0f}",
                 f"{r['median_s'] / naive['median_s']:.2f}",
                 f"{r['peak_above_inputs_mb']:.0f}",
                 f"{r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1):.2f}",
                 *(fn(r) for _, fn in extra_columns)]
        print("| " + " | ".join(cells) + " |")


def git_commit() -> dict:
    """``{"commit": short hash, "dirty": uncommitted changes to tracked files}`` of this checkout
    (a dirty record measured code that no commit holds; the records themselves do not count)."""
    from gpu_harness import git_state

    return git_state()


def cpu_description() -> str:
    """The CPU as Linux names it, with its cache sizes: ``"Intel(R) Xeon(R) Processor; L1d 48K, L1i
    64K, L2 2048K, L3 491520K"`` (``/proc/cpuinfo``, sysfs); ``platform.processor()`` elsewhere. Two
    machines under one name can time the same code differently (docs/benchmarks.md, the CPU sweep)."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches.append(f"L{level}{suffix} {size}")
    return f"{model}; {', '.join(caches)}" if caches else model


def write_record(name: str, record: dict, out) -> Path:
    """``out/name.json`` with date, commit, versions and machine (its architecture and
    :func:`cpu_description`)."""
    import torch

    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), **git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpu": cpu_description(), **record,
    }
    from gpu_harness import write_json

    return write_json(Path(out), name, record)
