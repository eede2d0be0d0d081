"""CPU benchmark of the logits path: forward + backward of per-sequence log-probs.

Providers, each measured in a fresh process (so peak resident memory is its own):
    naive          float32 log_softmax + gather + autograd (what TRL does)
    naive_thp      the same with THP_MEM_ALLOC_ENABLE=1 (PyTorch's allocator on huge pages, as
                   robalign's C++ backend allocates its gradient), to show what that alone buys
    naive_compile  torch.compile of the naive path
    cpp            robalign's C++ backend
    cpp_inplace    the same, gradient written into the logits buffer

Time is the median of --repeat runs after one warm-up; memory is the growth of the peak
resident set (VmHWM, reset after the warm-up) over the resident set before the timed runs. Writes a JSON under benchmarks/results/ and prints a
Markdown table with ratios against the naive path, all from this one run.

    python benchmarks/cpu_logits.py [--tokens 4096] [--vocab 32000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("naive", "naive_thp", "naive_compile", "cpp", "cpp_inplace")
RESULTS = Path(__file__).resolve().parent / "results"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024                      # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the peak resident set (VmHWM, Linux ≥ 4.0) and return the current one (MB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def naive_logps(logits, labels):
    import torch

    mask = labels != -100
    lsm = torch.log_softmax(logits.float(), dim=-1)
    tok = lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def measure(provider: str, tokens: int, vocab: int, repeat: int, seqlen: int = 512) -> dict:
    """Runs in the child process."""
    import torch

    import robalign

    torch.manual_seed(0)
    num_seqs = tokens // seqlen
    base = torch.randn(num_seqs, seqlen, vocab)
    labels = torch.randint(vocab, (num_seqs, seqlen))
    labels[:, :64] = -100
    coeff = torch.randn(num_seqs)
    if provider.startswith("cpp"):
        robalign.sequence_logps(base[:1, :2], labels[:1, :2], backend="cpp")  # load the extension
    fn = {"naive": naive_logps, "naive_thp": naive_logps, "naive_compile": torch.compile(naive_logps)}.get(provider)

    z = base.requires_grad_(True)

    def step():
        if fn is None:
            logps, _ = robalign.sequence_logps(z, labels, backend="cpp", inplace_backward=provider == "cpp_inplace")
        else:
            logps = fn(z, labels)
        # autograd.grad hands back the gradient without accumulating it into z.grad. The in-place
        # provider overwrites z with its gradient on every run; the values stay finite and the
        # work per element is the same, so the timing is unaffected.
        return torch.autograd.grad((logps * coeff).sum(), z)[0]

    step()                                           # warm-up (and compilation)
    baseline = _reset_peak_rss()                     # inputs and warm state, not the warm-up's peak
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        grad = step()
        times.append(time.perf_counter() - start)
        del grad
    return {"provider": provider, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "peak_above_inputs_mb": max(0.0, _status_mb("VmHWM") - baseline)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.repeat)))
        return 0

    import torch

    rows = []
    for provider in args.providers.split(","):
        cmd = [sys.executable, __file__, "--child", provider, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--repeat", str(args.repeat)]
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1") if provider == "naive_thp" else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {provider}: {rows[-1]['median_s'] * 1e3:.0f} ms", file=sys.stderr)
    naive = next(r for r in rows if r["provider"] == "naive")
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"\nforward+backward, N = {args.tokens} tokens, V = {args.vocab}, float32 logits "
          f"({logits_mb:.0f} MB), {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print("| provider | median time (ms) | speed-up vs naive | peak memory above inputs (MB) | memory vs naive |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['provider']} | {r['median_s'] * 1e3:.0f} | {naive['median_s'] / r['median_s']:.2f}× | "
              f"{r['peak_above_inputs_mb']:.0f} | {r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1):.2f} |")
    record = {
        "benchmark": "cpu_logits", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "tokens": args.tokens, "vocab": args.vocab, "dtype": "float32", "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu_logits_N{args.tokens}_V{args.vocab}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
