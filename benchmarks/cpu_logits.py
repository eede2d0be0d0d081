"""CPU benchmark of the logits path: forward + backward of per-sequence log-probs.

Providers, each measured in fresh processes (so peak resident memory is its own), interleaved:
    naive          float32 log_softmax + gather + autograd (TRL before its selective_log_softmax)
    trl            TRL 1.16's selective_log_softmax (row by row, in the logits' dtype): what TRL's
                   DPO trainer runs today on materialised logits (the baseline)
    naive_thp      the naive path with THP_MEM_ALLOC_ENABLE=1 (PyTorch's allocator on huge pages, as
                   robalign's C++ backend allocates its gradient), to show what that alone buys
    naive_compile  torch.compile of the naive path
    torch          robalign's chunked PyTorch backend (the portable fallback)
    cpp            robalign's C++ backend
    cpp_inplace    the same, gradient written into the logits buffer

Batches are S sequences of 512 tokens whose first ``--masked`` fraction is prompt and last
``--padding`` fraction padding (masked, as real preference batches are): ``scored_tokens`` in
each row. Every provider first passes a correctness gate — its log-probs and gradient on the
first two sequences against the float64 reference — or is reported as failed and not timed.
Time is the median of all timed runs (``--repeat`` per process, ``--rounds`` processes per
provider, providers interleaved), with the min–max; memory is the growth of the peak resident
set (VmHWM, reset after the warm-up) over the resident set before the timed runs. Writes a JSON
into ``--out`` and prints a Markdown table with ratios against the baseline, all from this run.

    python benchmarks/cpu_logits.py [--tokens 4096] [--vocab 32000] [--masked 0.125] [--padding 0]
                                    [--mode fwdbwd|fwd] [--repeat 5] [--rounds 2] [--out DIR]

``--mode fwd`` times the forward alone under ``no_grad`` (how reference log-probs are computed).
"""

from __future__ import annotations

import json
import platform

import cpu_harness
from peers import naive_logps, trl_logps

PROVIDERS = ("naive", "trl", "naive_thp", "naive_compile", "torch", "cpp", "cpp_inplace")
SEQLEN = 512


def provider_fn(provider: str):
    """``fn(logits, labels) -> logps [S]`` of a provider (raises ImportError if not installed)."""
    import torch

    import robalign

    if provider in ("naive", "naive_thp"):
        return naive_logps
    if provider == "naive_compile":
        return torch.compile(naive_logps)
    if provider == "trl":
        import trl.trainer.utils  # noqa: F401  (an ImportError names the missing package)

        return trl_logps
    backend, inplace = provider.removesuffix("_inplace"), provider.endswith("_inplace")
    return lambda z, y: robalign.sequence_logps(z, y, backend=backend, inplace_backward=inplace)[0]


def measure(provider: str, tokens: int, vocab: int, repeat: int, mode: str = "fwdbwd", masked: float = 0.125,
            padding: float = 0.0) -> dict:
    """Runs in the child process."""
    import torch

    import robalign

    torch.manual_seed(0)
    num_seqs = max(1, tokens // SEQLEN)
    base = torch.randn(num_seqs, SEQLEN, vocab)
    labels = torch.randint(vocab, (num_seqs, SEQLEN))
    labels[~cpu_harness.sequence_mask(num_seqs, SEQLEN, masked, padding)] = -100
    coeff = torch.randn(num_seqs)
    try:
        fn = provider_fn(provider)
    except ImportError as err:
        return {"provider": provider, "error": f"not importable ({err})"}

    def run(z, y, c):
        logps = fn(z, y)
        if mode == "fwd":
            return (logps,)
        return logps, torch.autograd.grad((logps * c).sum(), z)[0]

    def check():
        k = min(2, num_seqs)
        z, y, c = base[:k].clone(), labels[:k], coeff[:k]
        want_z = z.double().requires_grad_(True)
        want_logps, _ = robalign.ground_truth.sequence_logps(want_z, y)
        want = (want_logps.detach(),) if mode == "fwd" else \
            (want_logps.detach(), torch.autograd.grad((want_logps * c.double()).sum(), want_z)[0])
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            return cpu_harness.gate(provider, run(z.requires_grad_(mode == "fwdbwd"), y, c), want)

    z = base.requires_grad_(mode == "fwdbwd")

    # autograd.grad hands back the gradient without accumulating it into z.grad. The in-place
    # provider overwrites z with its gradient on every run; the values stay finite and the work
    # per element is the same, so the timing is unaffected.
    step = lambda: run(z, labels, coeff)  # noqa: E731
    row = cpu_harness.measure(provider, torch.no_grad()(step) if mode == "fwd" else step, repeat, check)
    return {**row, "scored_tokens": int((labels != -100).sum())}


def main(argv=None) -> int:
    args = cpu_harness.parse_args(__doc__, PROVIDERS, argv, tokens=4096, vocab=32000)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.repeat, args.mode, args.masked,
                                 args.padding)))
        return 0

    import torch

    rows = cpu_harness.run_providers(__file__, args.providers.split(","),
                                     ["--tokens", args.tokens, "--vocab", args.vocab, "--repeat", args.repeat,
                                      "--mode", args.mode, "--masked", args.masked, "--padding", args.padding],
                                     env_for=lambda p: {"THP_MEM_ALLOC_ENABLE": "1"} if p == "naive_thp" else None,
                                     rounds=args.rounds)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"\n{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}, N = {args.tokens} tokens "
          f"(prompt {args.masked:.3g}, padding {args.padding:.3g} of each), V = {args.vocab}, float32 logits "
          f"({logits_mb:.0f} MB), {torch.get_num_threads()} threads, {platform.machine()}\n")
    cpu_harness.print_table(rows, baseline="trl" if any(r["provider"] == "trl" and "error" not in r for r in rows)
                            else "naive")
    suffix = "" if args.mode == "fwdbwd" else "_fwd"
    path = cpu_harness.write_record(f"cpu_logits_N{args.tokens}_V{args.vocab}{suffix}", {
        "benchmark": "cpu_logits", "mode": args.mode, "tokens": args.tokens, "vocab": args.vocab, "dtype": "float32",
        "masked": args.masked, "padding": args.padding, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
