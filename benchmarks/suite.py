"""The benchmark suite: both heavy ops, every provider, a sweep of tokens per batch, against the
naive path and the physical limits measured in the same run. One command per device:

    python benchmarks/suite.py --device cpu [--quick]      # or: robalign bench --device cpu
    python benchmarks/suite.py --device cuda [--quick]     # (benchmarks/gpu_check.sh runs the GPU scripts)

Workloads (model shapes from MODELS: hidden size H and vocabulary V), each in two modes —
``fwdbwd`` (forward+backward, a training step) and ``fwd`` (forward under no_grad, as the
reference log-probs are computed):
    logits   sequence_logps on [N, V] float32 (CPU) / bfloat16 (CUDA) logits
    linear   linear_sequence_logps from [N, H] hidden states and a [V, H] head

CPU: every (workload, provider, N) is measured in a fresh process (median time, peak resident
memory above the inputs; cpu_logits.py / cpu_linear.py); the limits are measured in the same
run. The floor of the logits workload is 3·N·V·b bytes (forward: N·V·b) over the copy
bandwidth (a large memory copy, read + write); the floor of the linear workload is the time of
its bare matmuls (the ``matmul_floor`` provider: hidden @ Wᵀ, G @ W, Gᵀ @ hidden at the same N;
forward: hidden @ Wᵀ), which on this BLAS runs faster per FLOP than a square product, so it is
the honest compute limit. Writes ``<out>/suite_<device>.json`` (``--out``, default
``./robalign-bench``; ``--out benchmarks/results`` rewrites the committed record) and, through
plot.py, one PNG per workload and mode beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cpu_harness
from shapes import MODELS

HERE = Path(__file__).resolve().parent
CPU_PROVIDERS = {"logits": ("naive", "naive_compile", "torch", "cpp", "cpp_inplace"),
                 "linear": ("naive", "matmul_floor", "torch", "cpp")}
MODES = ("fwdbwd", "fwd")


def providers_for(workload: str, mode: str) -> tuple:
    """In place only changes the backward, so ``cpp_inplace`` is measured with it alone."""
    return tuple(p for p in CPU_PROVIDERS[workload] if mode == "fwdbwd" or not p.endswith("_inplace"))


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


def run_cpu(workloads, model, tokens, repeat, modes=MODES):
    hidden, vocab = MODELS[model]
    limits = cpu_limits(hidden, vocab, max(tokens))
    rows = []
    for workload in workloads:
        script = HERE / f"cpu_{workload}.py"
        for mode in modes:
            for n in tokens:
                args = ["--tokens", n, "--vocab", vocab, "--repeat", repeat, "--mode", mode]
                if workload == "linear":
                    args += ["--hidden", hidden]
                measured = cpu_harness.run_providers(str(script), providers_for(workload, mode), args)
                rows += [{"workload": workload, "mode": mode, "tokens": n, "hidden": hidden, "vocab": vocab, **r}
                         for r in measured]
    return derive_floors({"limits": limits, "rows": rows})


def derive_floors(result: dict) -> dict:
    """Add ``floor_s`` and ``fraction_of_floor`` to every row, from the limits of the same run."""
    limits = result["limits"]
    for r in result["rows"]:
        passes = 3 if r.get("mode", "fwdbwd") == "fwdbwd" else 1     # logits reads/writes, or matmuls
        if r["workload"] == "logits":
            r["floor_s"] = passes * r["tokens"] * r["vocab"] * 4 / limits["copy_bandwidth_bytes_per_s"]
        else:
            bare = [x for x in result["rows"] if x["workload"] == "linear" and x["tokens"] == r["tokens"]
                    and x.get("mode") == r.get("mode") and x["provider"] == "matmul_floor"]
            r["floor_s"] = bare[0]["median_s"] if bare else \
                passes * 2 * r["tokens"] * r["hidden"] * r["vocab"] / limits["matmul_flop_per_s"]
        r["fraction_of_floor"] = r["floor_s"] / r["median_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workload", default="logits,linear", help="comma-separated: logits, linear")
    parser.add_argument("--model", choices=sorted(MODELS), help="shape (default: small on CPU)")
    parser.add_argument("--mode", default=",".join(MODES), help="comma-separated: fwdbwd, fwd")
    parser.add_argument("--quick", action="store_true", help="two token counts, three repeats")
    parser.add_argument("--out", default=cpu_harness.DEFAULT_OUT,
                        help=f"folder for the JSON record and charts (default ./{cpu_harness.DEFAULT_OUT}; "
                             "benchmarks/results updates the committed records)")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = sorted(set(workloads) - {"logits", "linear"})
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--mode takes a comma-separated subset of {MODES}, got {args.mode!r}")
    if args.device == "cuda":
        import subprocess

        code = 0
        for workload in workloads:
            for mode in modes:
                cmd = [sys.executable, str(HERE / f"gpu_{workload}.py"), "--mode", mode]
                cmd += (["--quick"] if args.quick else []) + (["--model", args.model] if args.model else [])
                cmd += ["--out", args.out]
                code |= subprocess.run(cmd).returncode
        return code
    import torch

    model = args.model or "small"
    tokens = (512, 1024) if args.quick else (512, 1024, 2048, 4096)
    result = run_cpu(workloads, model, tokens, 3 if args.quick else 5, modes)
    result.update({"benchmark": "suite", "device": "cpu", "model": model, "threads": torch.get_num_threads()})
    path = cpu_harness.write_record("suite_cpu", result, args.out)
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
    print("| workload | mode | tokens | provider | time (ms) | time vs naive | peak MB above inputs | memory vs naive | "
          "fraction of floor |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        naive = next(x for x in result["rows"] if x["workload"] == r["workload"] and x["tokens"] == r["tokens"]
                     and x.get("mode") == r.get("mode") and x["provider"] == "naive")
        print(f"| {r['workload']} | {r.get('mode', 'fwdbwd')} | {r['tokens']} | {r['provider']} | {r['median_s'] * 1e3:.0f} | "
              f"{r['median_s'] / naive['median_s']:.2f} | {r['peak_above_inputs_mb']:.0f} | "
              f"{r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1):.2f} | {r['fraction_of_floor']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
