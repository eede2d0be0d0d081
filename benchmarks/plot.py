"""Charts from a suite result: per workload, time and peak memory against tokens per batch,
one line per provider, with the measured limit (the time floor) as a dashed line.

    python benchmarks/plot.py results/suite_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_suite(path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    result = json.loads(path.read_text())
    written = []
    for workload in sorted({r["workload"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["workload"] == workload]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        # the bare matmuls are the linear path's limit line, not a provider to compare memory with
        for provider in dict.fromkeys(r["provider"] for r in rows if r["provider"] != "matmul_floor"):
            mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["tokens"])
            xs = [r["tokens"] for r in mine]
            style = "-o" if provider.startswith(("cpp", "robalign", "triton")) else "-^"
            left.plot(xs, [r["median_s"] * 1e3 for r in mine], style, label=provider)
            right.plot(xs, [r["peak_above_inputs_mb"] for r in mine], style, label=provider)
        floors = sorted({(r["tokens"], r["floor_s"]) for r in rows})
        limit = "bytes / copy bandwidth" if workload == "logits" else "the three bare matmuls"
        left.plot([t for t, _ in floors], [f * 1e3 for t, f in floors], ":", color="black", label=f"limit ({limit})")
        left.set(xscale="log", yscale="log", xlabel="tokens per batch", ylabel="forward+backward time (ms)",
                 title=f"{workload} path: time")
        right.set(xscale="log", xlabel="tokens per batch", ylabel="peak memory above inputs (MB)",
                  title=f"{workload} path: memory")
        for ax in (left, right):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        shape = f"H = {rows[0]['hidden']}, " if workload == "linear" else ""
        fig.suptitle(f"{result.get('device', '')} ({result.get('threads', '?')} threads), {shape}V = {rows[0]['vocab']}, "
                     f"commit {result.get('commit', '?')}", fontsize=9)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{workload}.png")
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        tmp.replace(out)
        plt.close(fig)
        written.append(out)
    return written


if __name__ == "__main__":
    for png in plot_suite(sys.argv[1]):
        print(f"wrote {png}")
