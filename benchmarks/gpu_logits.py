"""GPU benchmark of the logits path: forward+backward of per-sequence log-probs, bfloat16.

Providers: ``naive`` (float32 log_softmax + gather + autograd, as TRL does), ``robalign``
(Triton, gradient in a new tensor) and ``robalign_inplace`` (gradient written into the logits).
The ceiling is measured in the same run: a device-to-device copy gives the bandwidth B
(bytes read + written over time). The floor of forward+backward is one read of the logits in
the forward, one read and one write in the backward: 3·N·V·2 bytes for bfloat16, so
``floor = 3·N·V·2 / B`` and ``fraction of floor = floor / time``. Times are medians of
``triton.testing.do_bench``; memory is the peak allocated above the inputs.

    python benchmarks/gpu_logits.py [--quick] [--out DIR]

``--device cpu`` runs the same harness on the C++ backend at small shapes (a smoke test of the
script; its numbers are not the GPU's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import robalign
from gpu_harness import bench, copy_bandwidth, environment, peak_above, write_json

VOCABS = (32000, 128256, 151936)
TOKENS = (4096, 16384)
SEQLEN = 1024


def naive_logps(logits, labels):
    mask = labels != -100
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return (lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def run_case(tokens, vocab, device, dtype, bandwidth):
    torch.manual_seed(0)
    seqs = max(1, tokens // SEQLEN)
    seqlen = tokens // seqs
    logits = torch.randn(seqs, seqlen, vocab, device=device, dtype=dtype)
    labels = torch.randint(vocab, (seqs, seqlen), device=device)
    labels[:, : seqlen // 8] = -100                                     # the prompt
    coeff = torch.randn(seqs, device=device)
    backend = "triton" if device == "cuda" else "cpp"

    def make(provider):
        z = logits.detach().requires_grad_(True)

        def step():
            if provider == "naive":
                logps = naive_logps(z, labels)
            else:
                logps, _ = robalign.sequence_logps(z, labels, backend=backend,
                                                   inplace_backward=provider == "robalign_inplace")
            return torch.autograd.grad((logps * coeff).sum(), z)[0]
        return step

    floor_bytes = 3 * tokens * vocab * logits.element_size()
    rows = []
    for provider in ("naive", "robalign", "robalign_inplace"):
        step = make(provider)
        seconds = bench(step, device)
        rows.append({
            "provider": provider, "tokens": tokens, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
            "median_ms": seconds * 1e3, "achieved_gbps": floor_bytes / seconds / 1e9,
            "fraction_of_floor": floor_bytes / bandwidth / seconds, "peak_above_inputs_mb": peak_above(step, device),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one vocabulary, one token count")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16
    vocabs, token_counts = ((128256,), (16384,)) if args.quick else (VOCABS, TOKENS)
    if device == "cpu":
        vocabs, token_counts, dtype = (2048,), (512,), torch.float32
    bandwidth = copy_bandwidth(device)
    rows = [r for v in vocabs for n in token_counts for r in run_case(n, v, device, dtype, bandwidth)]
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| tokens | vocab | provider | time (ms) | GB/s (floor bytes) | fraction of floor | speed-up vs naive | peak MB above inputs | memory vs naive |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        naive = next(x for x in rows if x["provider"] == "naive" and x["tokens"] == r["tokens"] and x["vocab"] == r["vocab"])
        mem = "n/a" if r["peak_above_inputs_mb"] is None else f"{r['peak_above_inputs_mb']:.0f}"
        mem_ratio = "n/a" if r["peak_above_inputs_mb"] is None else \
            f"{r['peak_above_inputs_mb'] / max(naive['peak_above_inputs_mb'], 1e-9):.2f}"
        print(f"| {r['tokens']} | {r['vocab']} | {r['provider']} | {r['median_ms']:.2f} | {r['achieved_gbps']:.0f} | "
              f"{r['fraction_of_floor']:.2f} | {naive['median_ms'] / r['median_ms']:.2f}× | {mem} | {mem_ratio} |")
    path = write_json(Path(args.out), f"gpu_logits_{env['device'].replace(' ', '_')}",
                      {"benchmark": "gpu_logits", **env, "copy_bandwidth_gbps": bandwidth / 1e9, "rows": rows})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
