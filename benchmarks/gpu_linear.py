"""GPU benchmark of the fused linear path: log-probs from hidden states and the LM head,
forward + backward (gradients of hidden and weight), bfloat16, H = 4096, V = 128256,
16 sequences × {512, 1024, 2048} tokens.

Providers:
    naive          materialised logits (hidden @ Wᵀ, upcast to float32), log_softmax, gather, autograd
    naive_compile  torch.compile of the naive path (one dynamic-shape compile for the sweep)
    matmul_floor   the three bare matmuls alone (hidden @ Wᵀ, G @ W, Gᵀ @ hidden): the compute floor
    torch          robalign's chunked path with its plain-PyTorch row kernels (the portable fallback)
    triton         chunked cuBLAS matmuls + Triton row kernels (recompute design: four matmul passes)
    liger          Liger-Kernel's LigerFusedLinearDPOLoss, when liger_kernel is importable

The matmul rate is measured in the same run (an 8192³ bfloat16 product); TFLOP/s count the
three matmuls' 6·N·H·V FLOPs. Times are medians of ``triton.testing.do_bench`` (20th/80th
percentiles in the JSON); memory is the peak allocated above the inputs. A provider that fails
(the naive path runs out of memory at 16 × 2048 tokens) is reported as failed, not dropped.

    python benchmarks/gpu_linear.py [--quick] [--model NAME] [--mode fwdbwd|fwd] [--out DIR]

``--mode fwd`` times the forward alone under ``no_grad`` (its floor is ``hidden @ Wᵀ``, 2·N·H·V
FLOPs); ``--model`` takes H and V from benchmarks/shapes.py (default llama3-8b).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import robalign
from gpu_harness import environment, matmul_rate, measure_providers, write_json
from shapes import MODELS

SEQS = 16
PROVIDERS = ("naive", "naive_compile", "matmul_floor", "torch", "triton", "liger")


def naive(hidden, weight, labels):
    z = (hidden @ weight.T).float()
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * (labels != -100)).sum(-1)


naive_compiled = torch.compile(naive, dynamic=True)


def liger_step(hidden, weight, labels, mode):
    """Liger's chunked DPO loss on the same rows (chosen/rejected halves), no reference model."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=False)

    def step():
        loss = loss_fn(weight, hidden, labels)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return loss if mode == "fwd" else torch.autograd.grad(loss, (hidden, weight))
    return torch.no_grad()(step) if mode == "fwd" else step


def run_case(seqlen, device, dtype, rate, hidden_size, vocab, providers, mode="fwdbwd"):
    torch.manual_seed(0)
    tokens = SEQS * seqlen
    hidden = torch.randn(SEQS, seqlen, hidden_size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) / hidden_size ** 0.5).requires_grad_(True)
    labels = torch.randint(vocab, (SEQS, seqlen), device=device)
    labels[:, : seqlen // 8] = -100
    coeff = torch.randn(SEQS, device=device)
    flops = (6 if mode == "fwdbwd" else 2) * tokens * hidden_size * vocab

    def make(provider):
        if provider == "matmul_floor":
            h, w = hidden.detach().reshape(tokens, hidden_size), weight.detach()
            if mode == "fwd":
                return lambda: h @ w.T
            g = torch.randn(tokens, vocab, device=device, dtype=dtype)
            return lambda: (h @ w.T, g @ w, g.T @ h)
        if provider == "liger":
            return liger_step(hidden, weight, labels, mode)

        def step():
            if provider in ("naive", "naive_compile"):
                logps = (naive if provider == "naive" else naive_compiled)(hidden, weight, labels)
            else:
                logps, _ = robalign.linear_sequence_logps(hidden, weight, labels, backend=provider)
            if mode == "fwd":
                return logps
            return torch.autograd.grad((logps * coeff).sum(), (hidden, weight))
        return torch.no_grad()(step) if mode == "fwd" else step

    rows = measure_providers(providers, make, device, f"{tokens} tokens",
                             lambda s: {"tflops": flops / s / 1e12, "fraction_of_matmul_rate": flops / s / rate})
    return [{"mode": mode, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, **r} for r in rows]


def print_table(rows):
    print("| tokens | provider | time (ms) | TFLOP/s | time vs matmul floor | speed-up vs naive | peak MB above inputs | "
          "memory vs naive |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['provider']} | failed: {r['error']} | | | | | |")
            continue
        ref = {x["provider"]: x for x in rows if x["tokens"] == r["tokens"] and "median_ms" in x}
        floor_ratio = f"{r['median_ms'] / ref['matmul_floor']['median_ms']:.2f}" if "matmul_floor" in ref else "n/a"
        mem = r["peak_above_inputs_mb"]
        naive_mem = ref.get("naive", {}).get("peak_above_inputs_mb")
        mem_ratio = "n/a" if mem is None or not naive_mem else f"{mem / naive_mem:.3f}"
        speed = f"{ref['naive']['median_ms'] / r['median_ms']:.2f}×" if "naive" in ref else "n/a"
        print(f"| {r['tokens']} | {r['provider']} | {r['median_ms']:.1f} | {r['tflops']:.0f} | {floor_ratio} | {speed} | "
              f"{'n/a' if mem is None else f'{mem:.0f}'} | {mem_ratio} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="16 × 1024 tokens only")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b", help="H and V")
    parser.add_argument("--mode", choices=("fwdbwd", "fwd"), default="fwdbwd")
    parser.add_argument("--out", default="robalign-bench", help="folder for the JSON record (default ./robalign-bench)")
    args = parser.parse_args(argv)
    device = args.device
    (hidden_size, vocab), dtype, seqlens = MODELS[args.model], torch.bfloat16, (512, 1024, 2048)
    if args.quick:
        seqlens = (1024,)
    if device == "cpu":                                      # smoke test of the script only
        dtype, hidden_size, vocab, seqlens = torch.float32, 64, 2000, (32,)
    providers = PROVIDERS if device == "cuda" else ("naive", "matmul_floor", "torch", "cpp")
    rate = matmul_rate(device)
    rows = [r for n in seqlens for r in run_case(n, device, dtype, rate, hidden_size, vocab, providers, args.mode)]
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"measured matmul rate {rate / 1e12:.0f} TFLOP/s; "
          f"{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}\n")
    print_table(rows)
    suffix = ("" if args.model == "llama3-8b" else f"_{args.model}") + ("" if args.mode == "fwdbwd" else "_fwd")
    path = write_json(Path(args.out), f"gpu_linear_{env['device'].replace(' ', '_')}{suffix}",
                      {"benchmark": "gpu_linear", "mode": args.mode, "model": args.model, **env, "matmul_tflops": rate / 1e12, "rows": rows})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
