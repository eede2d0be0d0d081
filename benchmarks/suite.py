"""The benchmark suite: both heavy ops, every provider, a sweep of tokens per batch, against the
naive path and the physical limits measured in the same run. One command per device:

    python benchmarks/suite.py --device cpu [--quick]      # or: robalign bench --device cpu
    python benchmarks/suite.py --device cuda [--quick]     # (benchmarks/gpu_check.sh runs the GPU scripts)

Workloads (model shapes from MODELS: hidden size H and vocabulary V):
    logits   forward+backward of sequence_logps on [N, V] float32 (CPU) / bfloat16 (CUDA) logits
    linear   forward+backward of linear_sequence_logps from [N, H] hidden states and a [V, H] head

CPU: every (workload, provider, N) is measured in a fresh process (median time, peak resident
memory above the inputs; cpu_logits.py / cpu_linear.py); the limits are measured in the same
run. The floor of the logits workload is 3·N·V·b bytes over the copy bandwidth (a large memory
copy, read + write); the floor of the linear workload is the time of its three bare matmuls
(the ``matmul_floor`` provider: hidden @ Wᵀ, G @ W, Gᵀ @ hidden at the same N), which on this
BLAS runs faster per FLOP than a square product, so it is the honest compute limit.
Writes results/suite_<device>.json and, through plot.py, one PNG per workload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cpu_harness

HERE = Path(__file__).resolve().parent
MODELS = {
    "small": (512, 32000),
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "mistral-7b": (4096, 32768),
}
CPU_PROVIDERS = {"logits": ("naive", "naive_compile", "torch", "cpp", "cpp_inplace"),
                 "linear": ("naive", "matmul_floor", "torch", "cpp")}


def cpu_limits(hidden: int, vocab: int, tokens: int) -> dict:
    """Copy bandwidth (bytes/s) and float32 matmul rate (FLOP/s) of this CPU, measured now; the
    rate is the best of a 2048³ product and the linear workload's own [tokens, H] @ [H, V]."""
    import statistics
    import time

    import torch

    def median_seconds(fn, repeat=5):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    src = torch.randn(64 << 20)                                       # 256 MB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rate = 2 * 2048 ** 3 / median_seconds(lambda: a @ b)
    h, w = torch.randn(tokens, hidden), torch.randn(vocab, hidden)
    rate = max(rate, 2 * tokens * hidden * vocab / median_seconds(lambda: h @ w.T, repeat=3))
    return {"copy_bandwidth_bytes_per_s": bandwidth, "matmul_flop_per_s": rate}


def run_cpu(workloads, model, tokens, repeat):
    hidden, vocab = MODELS[model]
    limits = cpu_limits(hidden, vocab, max(tokens))
    rows = []
    for workload in workloads:
        script = HERE / f"cpu_{workload}.py"
        for n in tokens:
            args = ["--tokens", n, "--vocab", vocab, "--repeat", repeat]
            if workload == "linear":
                args += ["--hidden", hidden]
            measured = cpu_harness.run_providers(str(script), CPU_PROVIDERS[workload], args)
            rows += [{"workload": workload, "tokens": n, "hidden": hidden, "vocab": vocab, **r} for r in measured]
    return derive_floors({"limits": limits, "rows": rows})


def derive_floors(result: dict) -> dict:
    """Add ``floor_s`` and ``fraction_of_floor`` to every row, from the limits of the same run."""
    limits = result["limits"]
    for r in result["rows"]:
        if r["workload"] == "logits":
            r["floor_s"] = 3 * r["tokens"] * r["vocab"] * 4 / limits["copy_bandwidth_bytes_per_s"]
        else:
            bare = [x for x in result["rows"] if x["workload"] == "linear" and x["tokens"] == r["tokens"]
                    and x["provider"] == "matmul_floor"]
            r["floor_s"] = bare[0]["median_s"] if bare else \
                6 * r["tokens"] * r["hidden"] * r["vocab"] / limits["matmul_flop_per_s"]
        r["fraction_of_floor"] = r["floor_s"] / r["median_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workload", default="logits,linear", help="comma-separated: logits, linear")
    parser.add_argument("--model", choices=sorted(MODELS), help="shape (default: small on CPU)")
    parser.add_argument("--quick", action="store_true", help="two token counts, three repeats")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = sorted(set(workloads) - {"logits", "linear"})
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    if args.device == "cuda":
        import subprocess

        code = 0
        for workload in workloads:
            cmd = [sys.executable, str(HERE / f"gpu_{workload}.py")] + (["--quick"] if args.quick else [])
            code |= subprocess.run(cmd).returncode
        return code
    import torch

    model = args.model or "small"
    tokens = (512, 1024) if args.quick else (512, 1024, 2048, 4096)
    result = run_cpu(workloads, model, tokens, 3 if args.quick else 5)
    result.update({"benchmark": "suite", "device": "cpu", "model": model, "threads": torch.get_num_threads()})
    path = cpu_harness.write_record("suite_cpu", result)
    print(f"\nwrote {path}")
    from plot import plot_suite

    for png in plot_suite(path):
        print(f"wrote {png}")
    _print_summary(result)
    return 0


def _print_summary(result):
    limits = result["limits"]
    print(f"\nCPU limits measured now: copy {limits['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"float32 matmul {limits['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s; model shape {result['model']}\n")
    print("| workload | tokens | provider | time (ms) | time vs naive | peak MB above inputs | memory vs naive | fraction of floor |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        naive = next(x for x in result["rows"] if x["workload"] == r["workload"] and x["tokens"] == r["tokens"]
                     and x["provider"] == "naive")
        print(f"| {r['workload']} | {r['tokens']} | {r['provider']} | {r['median_s'] * 1e3:.0f} | "
              f"{r['median_s'] / naive['median_s']:.2f} | {r['peak_above_inputs_mb']:.0f} | "
              f"{r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1):.2f} | {r['fraction_of_floor']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
