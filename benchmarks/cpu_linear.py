"""CPU benchmark of the fused linear path: log-probs from hidden states and the LM head,
forward + backward (gradients of hidden and weight).

Providers, each in a fresh process:
    naive          materialised float32 logits = hidden @ Wᵀ, log_softmax, gather, autograd
    matmul_floor   the three bare matmuls alone (hidden @ Wᵀ, G @ W, Gᵀ @ hidden): the compute floor
    torch          robalign's chunked path with the plain-PyTorch row kernels (the portable fallback)
    cpp            robalign's chunked path (ATen matmuls + C++ row kernels), one chunk of logits at a time

    python benchmarks/cpu_linear.py [--tokens 2048] [--hidden 512] [--vocab 32000] [--mode fwdbwd|fwd] [--repeat 5]

``--mode fwd`` times the forward alone under ``no_grad``; its matmul floor is ``hidden @ Wᵀ``.
"""

from __future__ import annotations

import json
import platform

import cpu_harness

PROVIDERS = ("naive", "matmul_floor", "torch", "cpp")


def measure(provider: str, tokens: int, hidden_size: int, vocab: int, repeat: int, mode: str = "fwdbwd") -> dict:
    import torch

    import robalign

    torch.manual_seed(0)
    seqs = max(1, tokens // 512)
    hidden = torch.randn(seqs, tokens // seqs, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).requires_grad_(True)
    labels = torch.randint(vocab, (seqs, tokens // seqs))
    labels[:, :64] = -100
    coeff = torch.randn(seqs)
    grad_logits = torch.randn(tokens, vocab) if provider == "matmul_floor" and mode == "fwdbwd" else None

    def step():
        if provider == "matmul_floor":
            h = hidden.detach().reshape(tokens, hidden_size)
            w = weight.detach()
            if mode == "fwd":
                return h @ w.T
            return h @ w.T, grad_logits @ w, grad_logits.T @ h
        if provider == "naive":
            z = hidden @ weight.T
            tok = torch.log_softmax(z.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            logps = (tok * (labels != -100)).sum(-1)
        else:
            logps, _ = robalign.linear_sequence_logps(hidden, weight, labels, backend=provider)
        if mode == "fwd":
            return logps
        return torch.autograd.grad((logps * coeff).sum(), (hidden, weight))

    return cpu_harness.measure(provider, torch.no_grad()(step) if mode == "fwd" else step, repeat)


def main(argv=None) -> int:
    args = cpu_harness.parse_args(__doc__, PROVIDERS, argv, tokens=2048, hidden=512, vocab=32000)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.hidden, args.vocab, args.repeat, args.mode)))
        return 0

    import torch

    rows = cpu_harness.run_providers(__file__, args.providers.split(","),
                                     ["--tokens", args.tokens, "--hidden", args.hidden, "--vocab", args.vocab,
                                      "--repeat", args.repeat, "--mode", args.mode])
    floor = next((r for r in rows if r["provider"] == "matmul_floor"), None)
    matmuls = 3 if args.mode == "fwdbwd" else 1
    flops = matmuls * 2 * args.tokens * args.hidden * args.vocab
    print(f"\n{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}, N = {args.tokens} tokens, H = {args.hidden}, V = {args.vocab}, float32 "
          f"(logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MB), {torch.get_num_threads()} threads, "
          f"{platform.machine()}\n")
    extra = [(f"GFLOP/s ({matmuls} matmul{'s' * (matmuls > 1)})", lambda r: f"{flops / r['median_s'] / 1e9:.0f}")]
    if floor:
        extra.append(("time vs matmul floor", lambda r: f"{r['median_s'] / floor['median_s']:.2f}"))
    cpu_harness.print_table(rows, extra)
    suffix = "" if args.mode == "fwdbwd" else "_fwd"
    path = cpu_harness.write_record(f"cpu_linear_N{args.tokens}_H{args.hidden}_V{args.vocab}{suffix}", {
        "benchmark": "cpu_linear", "mode": args.mode, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
        "dtype": "float32", "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
