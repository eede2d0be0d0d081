"""The benchmark suite: both heavy ops, every provider, a sweep of tokens per batch, against the
naive path and the physical limits measured in the same run. One command per device:

    python benchmarks/suite.py --device cpu [--quick]      # or: robalign bench --device cpu [--quick]
    python benchmarks/suite.py --device cuda [--quick]     # (benchmarks/gpu_check.sh runs the GPU scripts)

Workloads (model shapes from MODELS: hidden size H and vocabulary V), each in two modes —
``fwdbwd`` (forward+backward, a training step) and ``fwd`` (forward under no_grad, as the
reference log-probs are computed):
    logits   sequence_logps on [N, V] float32 (CPU) / bfloat16 (CUDA) logits
    linear   linear_sequence_logps from [N, H] hidden states and a [V, H] head; in training mode
             also the whole DoRA loss (DPO, KL-DRO) through the recompute path and the one-pass op

CPU: every (workload, provider, N) is measured in a fresh process (median time, peak resident
memory above the inputs; cpu_logits.py / cpu_linear.py); the limits are measured in the same
run. Two floors per row: over all N tokens, and over the M scored ones (prompt and padding are
masked; the work that must be done). The logits workload's are 3·N·V·b and 3·M·V·b bytes
(forward: one read) over the copy bandwidth (a large memory copy, read + write); the linear
workload's are the times of its bare matmuls over N and over M rows (``matmul_floor``,
``matmul_floor_scored``: hidden @ Wᵀ, G @ W, Gᵀ @ hidden; forward: hidden @ Wᵀ), which on this
BLAS run faster per FLOP than a square product, so they are the honest compute limits. The
baseline is what TRL users run today (TRL 1.16: ``selective_log_softmax`` on logits, its fused
LM head on hidden states); the token sweep masks 1/8 of each sequence, and at one token count
the masked sweep runs 0, 1/2, and 1/4 prompt + 1/4 padding too. Every provider passes a
correctness gate before it is timed.

``--quick`` is a smoke run that still shows every provider (the floors, the naive path, TRL's and
robalign's): one small case per workload (512 tokens, 1/8 prompt), forward+backward only, one round
of three timed runs (70 s on 2 cores, no GPU). The full sweep is the long one: it says how
many fresh processes it will start and shows a progress bar with the time left. Writes ``<out>/suite_<device>.json`` (``--out``, default
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
CPU_PROVIDERS = {"logits": ("naive", "trl", "naive_compile", "torch", "cpp", "cpp_inplace"),
                 "linear": ("naive", "trl_fused", "matmul_floor", "matmul_floor_scored", "torch", "cpp", "recompute",
                            "one_pass")}
LOSS_PROVIDERS = ("recompute", "one_pass")                    # the whole DoRA loss: training only
BASELINES = {"logits": "trl", "linear": "trl_fused"}          # what TRL users run today
MODES = ("fwdbwd", "fwd")
# (prompt fraction, padding fraction) of each sequence: the token sweep runs at the first; the
# masked sweep (at one token count) at all of them
MASKS = ((0.125, 0.0), (0.0, 0.0), (0.5, 0.0), (0.25, 0.25))


def providers_for(workload: str, mode: str) -> tuple:
    """In place only changes the backward, so ``cpp_inplace`` is measured with it alone; the loss
    providers differ from ``cpp`` only when gradients are formed, so likewise."""
    return tuple(p for p in CPU_PROVIDERS[workload]
                 if mode == "fwdbwd" or not (p.endswith("_inplace") or p in LOSS_PROVIDERS))


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


def run_cpu(workloads, model, tokens, repeat, modes=MODES, masks=MASKS, masked_sweep_tokens=None, rounds=2,
            progress=False):
    """Every (workload, mode): the token sweep at the first mask, then the other masks at
    ``masked_sweep_tokens``; each case's providers in fresh, interleaved processes. ``progress``:
    say up front how many processes will run, and show a bar with the time left."""
    hidden, vocab = MODELS[model]
    limits = cpu_limits(hidden, vocab, max(tokens))
    masked_sweep_tokens = masked_sweep_tokens or tokens[len(tokens) // 2]
    cases = [(n, masks[0]) for n in tokens] + [(masked_sweep_tokens, m) for m in masks[1:]]
    plan = [(w, mode, case) for w in workloads for mode in modes for case in cases]
    total = sum(rounds * len(providers_for(w, mode)) for w, mode, _ in plan)
    bar = None
    if progress:
        from tqdm import tqdm

        print(f"{len(plan)} cases, {total} provider runs, each in a fresh process; the bar's estimate of the "
              "time left settles after the first cases", file=sys.stderr)
        bar = tqdm(total=total, unit="run", file=sys.stderr)
    rows = []
    for workload, mode, (n, (masked, padding)) in plan:
        args = ["--tokens", n, "--vocab", vocab, "--repeat", repeat, "--mode", mode, "--masked", masked,
                "--padding", padding]
        if workload == "linear":
            args += ["--hidden", hidden]
        if bar is not None:
            bar.set_description(f"{workload} {mode} {n} tokens {masked:g}/{padding:g}")
        measured = cpu_harness.run_providers(str(HERE / f"cpu_{workload}.py"), providers_for(workload, mode), args,
                                             rounds=rounds, progress=None if bar is None else bar.update)
        rows += [{"workload": workload, "mode": mode, "tokens": n, "hidden": hidden, "vocab": vocab,
                  "masked": masked, "padding": padding, **r} for r in measured]
    if bar is not None:
        bar.close()
    return derive_floors({"limits": limits, "rows": rows})


def _same_case(a, b) -> bool:
    return all(a.get(k) == b.get(k) for k in ("workload", "mode", "tokens", "masked", "padding"))


def derive_floors(result: dict) -> dict:
    """Both floors of every row, from the limits and the bare matmuls of the same run:
    ``floor_all_s`` counts every token, ``floor_scored_s`` only the scored ones (the work that must
    be done); ``fraction_of_floor_*`` is floor / time (1.0 = at the limit)."""
    limits = result["limits"]
    for r in result["rows"]:
        if "error" in r:
            continue
        passes = 3 if r.get("mode", "fwdbwd") == "fwdbwd" else 1     # logits reads/writes, or matmuls
        scored = r.get("scored_tokens", r["tokens"])
        if r["workload"] == "logits":
            per_token = passes * r["vocab"] * 4 / limits["copy_bandwidth_bytes_per_s"]
            r["floor_all_s"], r["floor_scored_s"] = r["tokens"] * per_token, scored * per_token
        else:
            for key, provider, n in (("floor_all_s", "matmul_floor", r["tokens"]),
                                     ("floor_scored_s", "matmul_floor_scored", scored)):
                bare = [x for x in result["rows"] if x["workload"] == "linear" and _same_case(x, r)
                        and x["provider"] == provider and "error" not in x]
                r[key] = bare[0]["median_s"] if bare else \
                    passes * 2 * n * r["hidden"] * r["vocab"] / limits["matmul_flop_per_s"]
        r["fraction_of_floor_all"] = r["floor_all_s"] / r["median_s"]
        r["fraction_of_floor_scored"] = r["floor_scored_s"] / r["median_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workload", default="logits,linear", help="comma-separated: logits, linear")
    parser.add_argument("--model", choices=sorted(MODELS), help="shape (default: small on CPU)")
    parser.add_argument("--mode", help="comma-separated: fwdbwd, fwd (default both; --quick fwdbwd)")
    parser.add_argument("--quick", action="store_true",
                        help="one small case per workload, forward+backward, every provider (about 70 s on 2 cores)")
    parser.add_argument("--tokens", help="comma-separated token counts of the sweep (default 512,1024,2048,4096)")
    parser.add_argument("--repeat", type=int, help="timed runs per process (default 5; --quick 3)")
    parser.add_argument("--rounds", type=int, help="fresh processes per provider and case (default 2; --quick 1)")
    parser.add_argument("--out", default=cpu_harness.DEFAULT_OUT,
                        help=f"folder for the JSON record and charts (default ./{cpu_harness.DEFAULT_OUT}; "
                             "benchmarks/results updates the committed records)")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = sorted(set(workloads) - {"logits", "linear"})
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    modes = [m.strip() for m in (args.mode or (MODES[0] if args.quick else ",".join(MODES))).split(",") if m.strip()]
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
    try:
        tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else \
            ((512,) if args.quick else (512, 1024, 2048, 4096))
    except ValueError:
        parser.error(f"--tokens takes comma-separated integers, got {args.tokens!r}")
    if min(tokens) < 8 or (args.repeat is not None and args.repeat < 1) or (args.rounds is not None and args.rounds < 1):
        parser.error("--tokens must be >= 8, --repeat and --rounds >= 1")
    result = run_cpu(workloads, model, tokens, args.repeat or (3 if args.quick else 5), modes,
                     masks=MASKS[:1] if args.quick else MASKS, rounds=args.rounds or (1 if args.quick else 2),
                     progress=not args.quick)
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
    print("| workload | mode | tokens | prompt/pad | provider | time (ms) | time vs TRL | memory vs TRL | "
          "of floor, all tokens | of floor, scored tokens |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        case = f"{r['masked']:g}/{r['padding']:g}"
        if "error" in r:
            print(f"| {r['workload']} | {r['mode']} | {r['tokens']} | {case} | {r['provider']} | {r['error']} | | | | |")
            continue
        base = next((x for x in result["rows"] if _same_case(x, r) and x["provider"] == BASELINES[r["workload"]]
                     and "error" not in x), None)
        vs = lambda key: "n/a" if base is None else f"{r[key] / max(base[key], 1e-9):.2f}"  # noqa: E731
        print(f"| {r['workload']} | {r['mode']} | {r['tokens']} | {case} | {r['provider']} | {r['median_s'] * 1e3:.0f} | "
              f"{vs('median_s')} | {vs('peak_above_inputs_mb')} | {r['fraction_of_floor_all']:.2f} | "
              f"{r['fraction_of_floor_scored']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
