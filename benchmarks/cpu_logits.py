"""CPU benchmark of the logits path: forward + backward of per-sequence log-probs.

Providers, each measured in a fresh process (so peak resident memory is its own):
    naive          float32 log_softmax + gather + autograd (what TRL does)
    naive_thp      the same with THP_MEM_ALLOC_ENABLE=1 (PyTorch's allocator on huge pages, as
                   robalign's C++ backend allocates its gradient), to show what that alone buys
    naive_compile  torch.compile of the naive path
    torch          robalign's chunked PyTorch backend (the portable fallback)
    cpp            robalign's C++ backend
    cpp_inplace    the same, gradient written into the logits buffer

Time is the median of --repeat runs after one warm-up; memory is the growth of the peak
resident set (VmHWM, reset after the warm-up) over the resident set before the timed runs.
Writes a JSON under benchmarks/results/ and prints a Markdown table with ratios against the
naive path, all from this one run.

    python benchmarks/cpu_logits.py [--tokens 4096] [--vocab 32000] [--mode fwdbwd|fwd] [--repeat 5]

``--mode fwd`` times the forward alone under ``no_grad`` (how reference log-probs are computed).
"""

from __future__ import annotations

import json
import platform

import cpu_harness

PROVIDERS = ("naive", "naive_thp", "naive_compile", "torch", "cpp", "cpp_inplace")


def naive_logps(logits, labels):
    import torch

    mask = labels != -100
    lsm = torch.log_softmax(logits.float(), dim=-1)
    tok = lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def measure(provider: str, tokens: int, vocab: int, repeat: int, mode: str = "fwdbwd", seqlen: int = 512) -> dict:
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

    z = base.requires_grad_(mode == "fwdbwd")

    def step():
        if fn is None:
            logps, _ = robalign.sequence_logps(z, labels, backend=provider.removesuffix("_inplace"),
                                               inplace_backward=provider.endswith("_inplace"))
        else:
            logps = fn(z, labels)
        if mode == "fwd":
            return logps
        # autograd.grad hands back the gradient without accumulating it into z.grad. The in-place
        # provider overwrites z with its gradient on every run; the values stay finite and the
        # work per element is the same, so the timing is unaffected.
        return torch.autograd.grad((logps * coeff).sum(), z)[0]

    if mode == "fwd":
        return cpu_harness.measure(provider, torch.no_grad()(step), repeat)
    return cpu_harness.measure(provider, step, repeat)


def main(argv=None) -> int:
    args = cpu_harness.parse_args(__doc__, PROVIDERS, argv, tokens=4096, vocab=32000)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.repeat, args.mode)))
        return 0

    import torch

    rows = cpu_harness.run_providers(__file__, args.providers.split(","),
                                     ["--tokens", args.tokens, "--vocab", args.vocab, "--repeat", args.repeat,
                                      "--mode", args.mode],
                                     env_for=lambda p: {"THP_MEM_ALLOC_ENABLE": "1"} if p == "naive_thp" else None)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"\n{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}, N = {args.tokens} tokens, V = {args.vocab}, float32 logits "
          f"({logits_mb:.0f} MB), {torch.get_num_threads()} threads, {platform.machine()}\n")
    cpu_harness.print_table(rows)
    suffix = "" if args.mode == "fwdbwd" else "_fwd"
    path = cpu_harness.write_record(f"cpu_logits_N{args.tokens}_V{args.vocab}{suffix}", {
        "benchmark": "cpu_logits", "mode": args.mode, "tokens": args.tokens, "vocab": args.vocab, "dtype": "float32",
        "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
