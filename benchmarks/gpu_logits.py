"""GPU benchmark of the logits path: forward+backward of per-sequence log-probs, bfloat16.

Providers:
    naive            float32 log_softmax + gather + autograd (TRL before selective_log_softmax)
    trl              TRL 1.16's selective_log_softmax (its fused Triton kernel where it applies):
                     what TRL's DPO trainer runs today on materialised logits — the baseline
    naive_compile    torch.compile of the naive path (one dynamic-shape compile for the sweep)
    torch            robalign's chunked PyTorch backend (the portable fallback)
    triton           robalign's Triton kernels, gradient in a new tensor
    triton_inplace   the same, gradient written into the logits buffer
    triton_with_ref  sequence_logps_with_ref: policy and reference logits in one pass (its floor
                     reads both: 4·N·V·2 bytes forward+backward)

Each sequence's first ``--masked`` fraction is prompt (and ``--padding`` at its end), masked as
in real preference batches; every row has both floors, over all N tokens and over the M scored
ones (the work that must be done): a device-to-device copy gives the bandwidth B, and the floor
of forward+backward is one read of the logits in the forward, one read and one write in the
backward, ``3·tokens·V·2 / B``. Every provider passes a correctness gate (log-probs and the
gradient of the first sequence against float64) before it is timed, or is a row that says it
failed. Times are medians (20th/80th percentiles in the JSON) of ``triton.testing.do_bench``;
``host_us`` is the host time of one call without waiting for the device (checks, launches,
synchronisations), which a fast kernel cannot hide at small shapes; memory is the peak
allocated above the inputs.

    python benchmarks/gpu_logits.py [--quick] [--model NAME] [--mode fwdbwd|fwd] [--masked F,...]
                                    [--packed] [--seqlen T] [--out DIR]

``--mode fwd`` times the forward alone under ``no_grad`` (as reference log-probs are computed);
``--model`` takes V from benchmarks/shapes.py instead of the sweep; ``--packed`` feeds packed
``[N, V]`` logits with ``cu_seqlens``. ``--device cpu`` runs the same harness on the C++ backend
at small shapes (a smoke test of the script; its numbers are not the GPU's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import robalign
from gpu_harness import copy_bandwidth, environment, gate, measure_providers, versus, write_json
from peers import naive_logps, trl_logps
from shapes import MODELS

VOCABS = (32000, 128256, 151936)
TOKENS = (4096, 16384)
SEQLEN = 1024
MASKS = ((0.125, 0.0), (0.0, 0.0), (0.5, 0.0), (0.25, 0.25))     # (prompt, padding) fractions


PROVIDERS = ("naive", "trl", "naive_compile", "torch", "triton", "triton_inplace", "triton_with_ref")


naive_compiled = torch.compile(naive_logps, dynamic=True)


def logps_fn(provider, ref_logits, cu_seqlens):
    if provider == "naive":
        return naive_logps
    if provider == "naive_compile":
        return naive_compiled
    if provider == "trl":
        import trl.trainer.utils  # noqa: F401  (an ImportError names what is missing)

        return trl_logps
    if provider == "triton_with_ref":
        return lambda z, y: robalign.sequence_logps_with_ref(z, ref_logits, y, backend="triton",
                                                             cu_seqlens=cu_seqlens)[0]
    return lambda z, y: robalign.sequence_logps(z, y, backend=provider.removesuffix("_inplace"), cu_seqlens=cu_seqlens,
                                                inplace_backward=provider.endswith("_inplace"))[0]


def make_step(provider, logits, labels, coeff, mode="fwdbwd", ref_logits=None, cu_seqlens=None):
    fn = logps_fn(provider, ref_logits, cu_seqlens)
    z = logits.detach().requires_grad_(mode == "fwdbwd")

    def step():
        logps = fn(z, labels)
        if mode == "fwd":
            return logps
        return torch.autograd.grad((logps * coeff).sum(), z)[0]
    return torch.no_grad()(step) if mode == "fwd" else step


def check(provider, logits, labels, coeff, mode, ref_logits, cu_seqlens):
    """The gate: the provider on the batch, its first sequence's log-prob and gradient rows
    against the float64 reference (bfloat16 gradients: 2⁻⁷ relative, one rounding)."""
    if cu_seqlens is not None:               # packed: the whole batch, log-probs only
        got = logps_fn(provider, ref_logits, cu_seqlens)(logits, labels)
        want, _ = robalign.ground_truth.sequence_logps(logits.double(), labels, cu_seqlens=cu_seqlens)
        return gate((got,), (want,), rtol=1e-4, atol=1e-5)
    z = logits[:1].detach().clone().requires_grad_(mode == "fwdbwd")
    ref = None if ref_logits is None else ref_logits[:1]
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        logps = logps_fn(provider, ref, None)(z, labels[:1])
        got = (logps,) if mode == "fwd" else (logps, torch.autograd.grad((logps * coeff[:1]).sum(), z)[0])
    want_z = logits[:1].double().requires_grad_(True)
    want_logps, _ = robalign.ground_truth.sequence_logps(want_z, labels[:1])
    want = (want_logps,) if mode == "fwd" else \
        (want_logps, torch.autograd.grad((want_logps * coeff[:1].double()).sum(), want_z)[0])
    return gate(got, want, rtol=2.0 ** -7 if logits.dtype != torch.float32 else 1e-4, atol=1e-5)


def run_case(tokens, vocab, device, dtype, bandwidth, providers, mode="fwdbwd", masked=0.125, padding=0.0,
             seqlen=SEQLEN, packed=False):
    torch.manual_seed(0)
    seqs = max(1, tokens // seqlen)
    seqlen = tokens // seqs
    logits = torch.randn(seqs, seqlen, vocab, device=device, dtype=dtype)
    ref_logits = torch.randn(seqs, seqlen, vocab, device=device, dtype=dtype) if "triton_with_ref" in providers else None
    labels = torch.randint(vocab, (seqs, seqlen), device=device)
    start, end = round(masked * seqlen), seqlen - round(padding * seqlen)
    labels[:, :start] = -100                                              # the prompt
    labels[:, end:] = -100                                                # the padding
    coeff = torch.randn(seqs, device=device)
    cu = None
    if packed:
        logits, labels = logits.reshape(tokens, vocab), labels.reshape(tokens)
        ref_logits = None if ref_logits is None else ref_logits.reshape(tokens, vocab)
        cu = torch.arange(0, tokens + 1, seqlen, device=device, dtype=torch.int32)
    scored = int((labels != -100).sum())
    passes = 3 if mode == "fwdbwd" else 1

    def derive(provider):
        extra = 1 if provider == "triton_with_ref" else 0                # one more read of the reference logits
        per_token = (passes + extra) * vocab * logits.element_size()
        return lambda s: {"achieved_gbps_scored": scored * per_token / s / 1e9,
                          "fraction_of_floor_all": tokens * per_token / bandwidth / s,
                          "fraction_of_floor_scored": scored * per_token / bandwidth / s}

    rows = []
    for provider in providers:
        rows += measure_providers([provider], lambda p: make_step(p, logits, labels, coeff, mode, ref_logits, cu),
                                  device, f"{tokens} × {vocab} ({masked:g}/{padding:g})", derive(provider),
                                  check=lambda p: check(p, logits, labels, coeff, mode, ref_logits, cu))
    return [{"tokens": tokens, "scored_tokens": scored, "vocab": vocab, "masked": masked, "padding": padding,
             "packed": packed, "dtype": str(dtype).replace("torch.", ""), "mode": mode, **r} for r in rows]


def print_table(rows, baseline="trl"):
    print("| tokens | scored | vocab | provider | time (ms) | host µs | of floor, all tokens | of floor, scored | "
          f"speed-up vs {baseline} | peak MB above inputs | memory vs {baseline} |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        same = [x for x in rows if all(x[k] == r[k] for k in ("tokens", "vocab", "masked", "padding", "packed"))]
        base = next((x for x in same if x["provider"] == baseline and "median_ms" in x), None) or \
            next((x for x in same if x["provider"] == "naive" and "median_ms" in x), None)
        if "error" in r:
            print(f"| {r['tokens']} | {r['scored_tokens']} | {r['vocab']} | {r['provider']} | failed: {r['error']} "
                  "| | | | | | |")
            continue
        speed, mem, mem_ratio = versus(r, base)
        print(f"| {r['tokens']} | {r['scored_tokens']} | {r['vocab']} | {r['provider']} | {r['median_ms']:.2f} | "
              f"{r['host_us']:.0f} | {r['fraction_of_floor_all']:.2f} | {r['fraction_of_floor_scored']:.2f} | {speed} | "
              f"{mem} | {mem_ratio} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one vocabulary, one token count")
    parser.add_argument("--model", choices=sorted(MODELS), help="sweep only this model's vocabulary")
    parser.add_argument("--tokens", help="comma-separated token counts (default 4096,16384)")
    parser.add_argument("--mode", choices=("fwdbwd", "fwd"), default="fwdbwd")
    parser.add_argument("--masks", default="sweep",
                        help="'sweep' (1/8 prompt over the token sweep, then 0, 1/2 and 1/4 + 1/4 padding at the "
                             "largest case) or one 'PROMPT/PADDING', e.g. 0.125/0")
    parser.add_argument("--packed", action="store_true", help="packed [N, V] logits with cu_seqlens")
    parser.add_argument("--seqlen", type=int, default=SEQLEN, help="tokens per sequence (default 1024)")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--out", default="robalign-bench", help="folder for the JSON record (default ./robalign-bench)")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16
    vocabs, token_counts = ((128256,), (16384,)) if args.quick else (VOCABS, TOKENS)
    if args.model:
        vocabs = (MODELS[args.model][1],)
    if args.tokens:
        token_counts = tuple(int(t) for t in args.tokens.split(","))
    seqlen = args.seqlen
    if device == "cpu":
        vocabs, token_counts, dtype, seqlen = (2048,), (512,), torch.float32, min(seqlen, 256)
    bandwidth = copy_bandwidth(device)
    providers = PROVIDERS if device == "cuda" else ("naive", "trl", "torch", "cpp", "cpp_inplace")
    if args.providers:
        providers = tuple(p for p in args.providers.split(",") if p)
    if args.mode == "fwd":                       # in place changes only the backward
        providers = tuple(p for p in providers if not p.endswith("_inplace"))
    if args.masks == "sweep":
        cases = [(v, n, MASKS[0]) for v in vocabs for n in token_counts]
        cases += [(vocabs[-1] if len(vocabs) == 1 else 128256 if 128256 in vocabs else vocabs[0], max(token_counts), m)
                  for m in MASKS[1:]]
    else:
        prompt, pad = (float(x) for x in args.masks.split("/"))
        cases = [(v, n, (prompt, pad)) for v in vocabs for n in token_counts]
    rows = [r for v, n, (masked, padding) in cases
            for r in run_case(n, v, device, dtype, bandwidth, providers, args.mode, masked, padding, seqlen,
                              args.packed)]
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}"
          f"{', packed' if args.packed else ''}, {seqlen} tokens a sequence\n")
    print_table(rows)
    suffix = (f"_{args.model}" if args.model else "") + ("_packed" if args.packed else "") + \
        (f"_T{seqlen}" if seqlen != SEQLEN else "") + ("" if args.mode == "fwdbwd" else "_fwd")
    path = write_json(Path(args.out), f"gpu_logits_{env['device'].replace(' ', '_')}{suffix}",
                      {"benchmark": "gpu_logits", "mode": args.mode, **env, "copy_bandwidth_gbps": bandwidth / 1e9,
                       "seqlen": seqlen, "packed": args.packed, "rows": rows})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
