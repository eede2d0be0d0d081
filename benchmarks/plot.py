"""Charts from benchmark results, one PNG per workload next to the JSON.

    suite_cpu.json      per workload and mode: time and peak memory against tokens per batch, one
                        line per provider, the measured limit (the time floor) dashed
    gpu_logits_*.json   per (tokens, V) case: the fraction of the copy-bandwidth floor reached and
                        the peak memory, one bar per provider
    gpu_linear_*.json   time and peak memory against tokens per batch, one line per provider, the
                        three bare matmuls (the compute floor) dashed
    cpu_sweep.json      the one-pass loss's time over its floor at every point of the sweep, one
                        bar per dtype, each dtype's limit dashed

    python benchmarks/plot.py results/suite_cpu.json results/gpu_*.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, title: str | None = None) -> Path:
    """Title, lay out, write atomically and close ``fig``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    _pyplot().close(fig)
    return out


def _read(path) -> tuple[Path, dict]:
    path = Path(path)
    return path, json.loads(path.read_text())


def plot(path) -> list[Path]:
    """The charts of one result file, by its ``benchmark`` field."""
    kind = json.loads(Path(path).read_text()).get("benchmark")
    return {"gpu_logits": plot_gpu_logits, "gpu_linear": plot_gpu_linear,
            "cpu_sweep": plot_cpu_sweep}.get(kind, plot_suite)(path)


def plot_cpu_sweep(path) -> list[Path]:
    plt = _pyplot()
    path, result = _read(path)
    rows = result["rows"]
    points = list(dict.fromkeys(r["point"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    width = 0.8 / len(dtypes)
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, dtype in enumerate(dtypes):
        mine = {r["point"]: r for r in rows if r["dtype"] == dtype}
        xs = [p + (i - (len(dtypes) - 1) / 2) * width for p in range(len(points))]
        # no bar where a dtype has no such point (bfloat16's accumulation point) or the point failed
        ratios = [mine[p].get("ratio", math.nan) if p in mine else math.nan for p in points]
        spread = [mine[p].get("ratio_quartiles") if p in mine else None for p in points]
        yerr = None
        if any(q is not None for q in spread):          # the middle half of each point's rounds
            spread = [q if q is not None else (r, r) for r, q in zip(ratios, spread)]
            yerr = [[r - q[0] for r, q in zip(ratios, spread)], [q[1] - r for r, q in zip(ratios, spread)]]
        bars = ax.bar(xs, ratios, width, label=dtype, yerr=yerr, capsize=2, error_kw={"linewidth": 0.8})
        limit = result["limits"].get(dtype)
        if limit:
            ax.axhline(limit, color=bars[0].get_facecolor(), linestyle="--", linewidth=1,
                       label=f"{dtype} limit {limit}×")
    first = {r["point"]: r for r in rows if "ratio" in r}
    labels = [f"{p}\n{first[p]['scored_tokens']} tok, V {first[p]['vocab'] // 1000}k, H {first[p]['hidden']}"
              if p in first else p for p in points]
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1,
               label="the floor: three bare matmuls, scored tokens, their fastest form")
    ax.set_xticks(range(len(points)), labels, fontsize=7, rotation=30, ha="right")
    lowest = min([r["ratio"] for r in rows if "ratio" in r], default=1.0)
    ax.set(ylabel="one-pass loss time / floor (lower is better)", ylim=(min(0.9, lowest - 0.05), None),
           title="the one-pass DoRA loss, forward + backward, against its compute floor (C++ kernels; MKL, oneDNN)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return [_save(fig, path.with_suffix(".png"),
                  f"{result.get('threads', '?')} threads, torch {result.get('torch', '?')}, commit "
                  f"{result.get('commit', '?')}; median of {result.get('repeat', '?')} interleaved rounds per point"
                  + ("; bars: their middle half" if any("ratio_quartiles" in r for r in rows) else ""))]


def plot_gpu_logits(path) -> list[Path]:
    plt = _pyplot()
    path, result = _read(path)
    rows = [r for r in result["rows"] if "median_ms" in r and (r.get("masked", 0.125), r.get("padding", 0.0)) == (
        result["rows"][0].get("masked", 0.125), result["rows"][0].get("padding", 0.0))]
    cases = list(dict.fromkeys((r["tokens"], r["vocab"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for i, provider in enumerate(providers):
        mine = {(r["tokens"], r["vocab"]): r for r in rows if r["provider"] == provider}
        xs = [c + (i - (len(providers) - 1) / 2) * width for c in range(len(cases))]
        frac = lambda r: r.get("fraction_of_floor_scored", r.get("fraction_of_floor", 0))  # noqa: E731
        left.bar(xs, [frac(mine[c]) if c in mine else 0 for c in cases], width, label=provider)
        right.bar(xs, [max(mine[c]["peak_above_inputs_mb"] or 0, 1) if c in mine else 0 for c in cases], width,
                  label=provider)
    labels = [f"N={n}\nV={v}" for n, v in cases]
    what = "forward (no_grad)" if result.get("mode") == "fwd" else "forward+backward"
    floor = "M·V·2" if result.get("mode") == "fwd" else "3·M·V·2"
    left.axhline(1.0, color="black", linestyle=":", label=f"limit: {floor} bytes / copy bandwidth (M scored tokens)")
    left.set(ylabel="fraction of the bandwidth floor (higher is better)", ylim=(0, 1.05),
             title=f"logits path, bfloat16, {what}: speed against the limit")
    right.set(yscale="log", ylabel="peak MB above the inputs (in place: 0, drawn at 1)",
              title="logits path: memory")
    for ax in (left, right):
        ax.set_xticks(range(len(cases)), labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return [_save(fig, path.with_suffix(".png"),
                  f"{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}; "
                  f"copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s")]


def plot_gpu_linear(path) -> list[Path]:
    plt = _pyplot()
    path, result = _read(path)
    first_mask = (result["rows"][0].get("masked", 0.125), result["rows"][0].get("padding", 0.0))
    rows = [r for r in result["rows"] if "median_ms" in r
            and (r.get("masked", 0.125), r.get("padding", 0.0)) == first_mask]       # the token sweep
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["tokens"])
        xs = [r["tokens"] for r in mine]
        if provider.startswith("matmul_floor"):
            which = "scored tokens" if provider.endswith("_scored") else "all tokens"
            label = f"limit, {which}: the {'bare matmul' if result.get('mode') == 'fwd' else 'three bare matmuls'}"
            left.plot(xs, [r["median_ms"] for r in mine], "--" if provider.endswith("_scored") else ":",
                      color="black", label=label)
            continue
        style = "-o" if provider in ("triton", "torch") else "-^"
        left.plot(xs, [r["median_ms"] for r in mine], style, label=provider)
        right.plot(xs, [r["peak_above_inputs_mb"] or float("nan") for r in mine], style, label=provider)
    what = "forward (no_grad)" if result.get("mode") == "fwd" else "forward+backward"
    left.set(xscale="log", yscale="log", xlabel="tokens per batch", ylabel=f"{what} time (ms)",
             title=f"fused linear path, {what}: time")
    measured_memory = any(r["peak_above_inputs_mb"] for r in rows)      # none on CPU (smoke runs)
    right.set(xscale="log", yscale="log" if measured_memory else "linear", xlabel="tokens per batch",
              ylabel="peak MB above the inputs", title=f"fused linear path, {what}: memory")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    first = result["rows"][0]
    return [_save(fig, path.with_suffix(".png"),
                  f"{result['device']}, H = {first['hidden']}, V = {first['vocab']}, bfloat16, commit {result['commit']}; "
                  f"matmul rate {result['matmul_tflops']:.0f} TFLOP/s")]


def plot_suite(path) -> list[Path]:
    plt = _pyplot()
    path, result = _read(path)
    written = []
    sweep_mask = (result["rows"][0].get("masked", 0.125), result["rows"][0].get("padding", 0.0))
    for workload, mode in sorted({(r["workload"], r.get("mode", "fwdbwd")) for r in result["rows"]}):
        # the token sweep (the first mask); the masked sweep is in the tables
        rows = [r for r in result["rows"] if r["workload"] == workload and r.get("mode", "fwdbwd") == mode
                and "error" not in r and (r.get("masked", 0.125), r.get("padding", 0.0)) == sweep_mask]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        # the bare matmuls are the linear path's limit lines, not providers to compare memory with
        for provider in dict.fromkeys(r["provider"] for r in rows if not r["provider"].startswith("matmul_floor")):
            mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["tokens"])
            xs = [r["tokens"] for r in mine]
            style = "-o" if provider.startswith(("cpp", "torch", "triton")) else "-^"
            left.plot(xs, [r["median_s"] * 1e3 for r in mine], style, label=provider)
            right.plot(xs, [r["peak_above_inputs_mb"] for r in mine], style, label=provider)
        forward = mode == "fwd"
        limit = "bytes / copy bandwidth" if workload == "logits" else \
            ("the bare matmul" if forward else "the three bare matmuls")
        for key, style, label in (("floor_all_s", ":", "all tokens"), ("floor_scored_s", "--", "scored tokens")):
            floors = sorted({(r["tokens"], r[key]) for r in rows if key in r})
            left.plot([t for t, _ in floors], [f * 1e3 for t, f in floors], style, color="black",
                      label=f"limit, {label} ({limit})")
        what = "forward (no_grad)" if forward else "forward+backward"
        left.set(xscale="log", yscale="log", xlabel="tokens per batch", ylabel=f"{what} time (ms)",
                 title=f"{workload} path, {what}: time")
        right.set(xscale="log", xlabel="tokens per batch", ylabel="peak memory above inputs (MB)",
                  title=f"{workload} path, {what}: memory")
        for ax in (left, right):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        shape = f"H = {rows[0]['hidden']}, " if workload == "linear" else ""
        suffix = "_fwd" if forward else ""
        written.append(_save(fig, path.with_name(f"{path.stem}_{workload}{suffix}.png"),
                             f"{result.get('device', '')} ({result.get('threads', '?')} threads), {shape}"
                             f"V = {rows[0]['vocab']}, commit {result.get('commit', '?')}"))
    return written


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for png in plot(arg):
            print(f"wrote {png}")
