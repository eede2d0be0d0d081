"""GPU benchmark of the logits path: forward+backward of per-sequence log-probs, bfloat16.

Providers:
    naive            float32 log_softmax + gather + autograd, as TRL does
    naive_compile    torch.compile of the naive path (one dynamic-shape compile for the sweep)
    torch            robalign's chunked PyTorch backend (the portable fallback)
    triton           robalign's Triton kernels, gradient in a new tensor
    triton_inplace   the same, gradient written into the logits buffer

The ceiling is measured in the same run: a device-to-device copy gives the bandwidth B
(bytes read + written over time). The floor of forward+backward is one read of the logits in
the forward, one read and one write in the backward: 3·N·V·2 bytes for bfloat16, so
``floor = 3·N·V·2 / B`` and ``fraction of floor = floor / time``. Times are medians (with the
20th/80th percentiles in the JSON) of ``triton.testing.do_bench``; memory is the peak
allocated above the inputs.

    python benchmarks/gpu_logits.py [--quick] [--model NAME] [--mode fwdbwd|fwd] [--out DIR]

``--mode fwd`` times the forward alone under ``no_grad`` (as reference log-probs are computed;
floor ``N·V·2`` bytes); ``--model`` takes V from benchmarks/shapes.py instead of the sweep.

``--device cpu`` runs the same harness on the C++ backend at small shapes (a smoke test of the
script; its numbers are not the GPU's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import robalign
from gpu_harness import copy_bandwidth, environment, measure_providers, write_json
from shapes import MODELS

VOCABS = (32000, 128256, 151936)
TOKENS = (4096, 16384)
SEQLEN = 1024


PROVIDERS = ("naive", "naive_compile", "torch", "triton", "triton_inplace")


def naive_logps(logits, labels):
    mask = labels != -100
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return (lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


naive_compiled = torch.compile(naive_logps, dynamic=True)


def make_step(provider, logits, labels, coeff, mode="fwdbwd"):
    z = logits.detach().requires_grad_(mode == "fwdbwd")

    def step():
        if provider == "naive":
            logps = naive_logps(z, labels)
        elif provider == "naive_compile":
            logps = naive_compiled(z, labels)
        else:
            logps, _ = robalign.sequence_logps(z, labels, backend=provider.removesuffix("_inplace"),
                                               inplace_backward=provider.endswith("_inplace"))
        if mode == "fwd":
            return logps
        return torch.autograd.grad((logps * coeff).sum(), z)[0]
    return torch.no_grad()(step) if mode == "fwd" else step


def run_case(tokens, vocab, device, dtype, bandwidth, providers, mode="fwdbwd"):
    torch.manual_seed(0)
    seqs = max(1, tokens // SEQLEN)
    seqlen = tokens // seqs
    logits = torch.randn(seqs, seqlen, vocab, device=device, dtype=dtype)
    labels = torch.randint(vocab, (seqs, seqlen), device=device)
    labels[:, : seqlen // 8] = -100                                     # the prompt
    coeff = torch.randn(seqs, device=device)
    floor_bytes = (3 if mode == "fwdbwd" else 1) * tokens * vocab * logits.element_size()
    rows = measure_providers(providers, lambda p: make_step(p, logits, labels, coeff, mode), device,
                             f"{tokens} × {vocab}",
                             lambda s: {"achieved_gbps": floor_bytes / s / 1e9,
                                        "fraction_of_floor": floor_bytes / bandwidth / s})
    return [{"tokens": tokens, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), "mode": mode, **r}
            for r in rows]


def print_table(rows):
    print("| tokens | vocab | provider | time (ms) | GB/s (floor bytes) | fraction of floor | speed-up vs naive | "
          "peak MB above inputs | memory vs naive |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        naive = next(x for x in rows if x["provider"] == "naive" and x["tokens"] == r["tokens"] and x["vocab"] == r["vocab"])
        if "error" in r:
            print(f"| {r['tokens']} | {r['vocab']} | {r['provider']} | failed: {r['error']} | | | | | |")
            continue
        speed = f"{naive['median_ms'] / r['median_ms']:.2f}×" if "median_ms" in naive else "n/a"
        mem, naive_mem = r["peak_above_inputs_mb"], naive.get("peak_above_inputs_mb")
        mem_ratio = "n/a" if mem is None or not naive_mem else f"{mem / naive_mem:.2f}"
        print(f"| {r['tokens']} | {r['vocab']} | {r['provider']} | {r['median_ms']:.2f} | {r['achieved_gbps']:.0f} | "
              f"{r['fraction_of_floor']:.2f} | {speed} | {'n/a' if mem is None else f'{mem:.0f}'} | {mem_ratio} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one vocabulary, one token count")
    parser.add_argument("--model", choices=sorted(MODELS), help="sweep only this model's vocabulary")
    parser.add_argument("--mode", choices=("fwdbwd", "fwd"), default="fwdbwd")
    parser.add_argument("--out", default="robalign-bench", help="folder for the JSON record (default ./robalign-bench)")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16
    vocabs, token_counts = ((128256,), (16384,)) if args.quick else (VOCABS, TOKENS)
    if args.model:
        vocabs = (MODELS[args.model][1],)
    if device == "cpu":
        vocabs, token_counts, dtype = (2048,), (512,), torch.float32
    bandwidth = copy_bandwidth(device)
    providers = PROVIDERS if device == "cuda" else ("naive", "torch", "cpp", "cpp_inplace")
    if args.mode == "fwd":                       # in place changes only the backward
        providers = tuple(p for p in providers if not p.endswith("_inplace"))
    rows = [r for v in vocabs for n in token_counts
            for r in run_case(n, v, device, dtype, bandwidth, providers, args.mode)]
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}\n")
    print_table(rows)
    suffix = (f"_{args.model}" if args.model else "") + ("" if args.mode == "fwdbwd" else "_fwd")
    path = write_json(Path(args.out), f"gpu_logits_{env['device'].replace(' ', '_')}{suffix}",
                      {"benchmark": "gpu_logits", "mode": args.mode, **env, "copy_bandwidth_gbps": bandwidth / 1e9, "rows": rows})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
