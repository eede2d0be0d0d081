"""CPU benchmark of the one-pass fused loss's two options: what a group larger than a chunk costs
(its sub-chunks take a second logits pass), and what the float32 head-gradient accumulator costs
for a bfloat16 head. The DoRA loss of pairs (DPO, KL-DRO λ = 1), forward + backward.

Providers, each in fresh processes, interleaved:
    matmul_floor_scored   the three bare matmuls over the scored tokens (float32)
    one_pass              the one-pass loss, chunks by the rule: whole groups (float32)
    one_pass_sub_chunked  the same with chunks of just over half a group (ROBALIGN_CHUNK_MB), so every
                          group is processed in two sub-chunks: its logits are computed twice
    recompute             the recompute path at the rule's chunks (four matmul passes, float32)
    recompute_sub_chunk_size  the recompute path at the sub-chunked provider's chunk size: what the
                          sub-chunked groups are to be compared with (the same four passes, the
                          same chunk)
    bf16_fp32_head_grad   bfloat16 hidden states and head; grad_W accumulated in float32 (default)
    bf16_head_dtype_grad  the same with fp32_head_grad=False: grad_W accumulated in bfloat16

Each row also gives ``grad_w_rel_error``: ‖grad_W − float64‖/‖float64‖ for the same inputs (the
bfloat16 rows against float64 computed from their bfloat16 values), measured before timing; a
provider above ``GATE`` is reported as failed, not timed.

    python benchmarks/cpu_one_pass.py [--tokens 2048] [--hidden 512] [--vocab 32000] [--rounds 2]
                                      [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import json

import cpu_harness
from peers import reference_dora_dpo

PROVIDERS = ("matmul_floor_scored", "one_pass", "one_pass_sub_chunked", "recompute", "recompute_sub_chunk_size",
             "bf16_fp32_head_grad", "bf16_head_dtype_grad")
SEQLEN = 512
# gate bounds on ‖grad_W − float64‖/‖float64‖: float32 sums of C·H products (as tests/test_one_pass.py,
# 1e-5 per element) and bfloat16 inputs (their own rounding, 2⁻⁸, and a few per-chunk roundings)
GATE = {"float32": 1e-4, "bfloat16": 2e-2}


def _problem(tokens, hidden_size, vocab, dtype, masked):
    import torch

    torch.manual_seed(0)
    seqs = max(2, tokens // SEQLEN)
    seqs += seqs % 2
    seqlen = tokens // seqs
    hidden = torch.randn(seqs, seqlen, hidden_size).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(vocab, (seqs, seqlen))
    labels[~cpu_harness.sequence_mask(seqs, seqlen, masked, 0.0)] = -100
    ref_logps = torch.randn(seqs) - 10 * seqlen
    return hidden, weight, labels, ref_logps


def measure(provider, tokens, hidden_size, vocab, repeat, masked=0.125) -> dict:
    import torch

    import robalign

    dtype = torch.bfloat16 if provider.startswith("bf16") else torch.float32
    hidden, weight, labels, ref_logps = _problem(tokens, hidden_size, vocab, dtype, masked)
    scored = int((labels != -100).sum())
    if provider == "matmul_floor_scored":
        h = hidden.detach().reshape(-1, hidden_size)[:scored].contiguous()
        w, g = weight.detach(), torch.randn(scored, vocab)
        return {**cpu_harness.measure(provider, lambda: (h @ w.T, g @ w, g.T @ h), repeat), "scored_tokens": scored}
    fn = robalign.FusedLinearDoRALoss(robalign.Objective("dpo", beta=0.1), robalign.KLDRO(1.0), params=robalign.LossParams(
        backend="cpp", one_pass=not provider.startswith("recompute"), fp32_head_grad=provider != "bf16_head_dtype_grad"))

    def step():
        loss = fn(hidden, weight, labels, ref_logps).loss
        return torch.autograd.grad(loss, (hidden, weight))

    want = reference_dora_dpo(hidden, weight, labels, ref_logps)[2]
    got = step()[1].double()
    error = ((got - want).norm() / want.norm()).item()
    bound = GATE[str(dtype).removeprefix("torch.")]
    if not error <= bound:                  # the gate: a provider off the reference is a row that says so
        return {"provider": provider, "error": f"failed the correctness gate: grad_W {error:.1e} from float64 "
                                                f"(bound {bound:g})"}
    return {**cpu_harness.measure(provider, step, repeat), "scored_tokens": scored, "grad_w_rel_error": error}


def main(argv=None) -> int:
    args = cpu_harness.parse_args(__doc__, PROVIDERS, argv, tokens=2048, hidden=512, vocab=32000)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.hidden, args.vocab, args.repeat, args.masked)))
        return 0
    seqlen = max(1, args.tokens // max(2, args.tokens // SEQLEN))
    group_tokens = 2 * (seqlen - round(args.masked * seqlen))
    half_group_mb = max(1, -(-((group_tokens + 1) // 2) * args.vocab * 4 // 2**20))   # two pieces a group

    def env_for(provider):
        sub = provider in ("one_pass_sub_chunked", "recompute_sub_chunk_size")
        return {"ROBALIGN_CHUNK_MB": str(half_group_mb)} if sub else None

    rows = cpu_harness.run_providers(__file__, args.providers.split(","),
                                     ["--tokens", args.tokens, "--hidden", args.hidden, "--vocab", args.vocab,
                                      "--repeat", args.repeat, "--masked", args.masked], env_for, rounds=args.rounds)
    ok = {r["provider"]: r for r in rows if "error" not in r}
    floor = ok.get("matmul_floor_scored")
    extra = [("grad_W error vs float64", lambda r: f"{r['grad_w_rel_error']:.1e}" if "grad_w_rel_error" in r else "")]
    if floor:
        extra.insert(0, ("time vs bare matmuls, scored", lambda r: f"{r['median_s'] / floor['median_s']:.2f}"))
    print(f"\nforward+backward of the DoRA loss, N = {args.tokens} tokens (prompt {args.masked:g}), H = {args.hidden}, "
          f"V = {args.vocab}; groups of {group_tokens} scored tokens; sub-chunked at {half_group_mb} MiB\n")
    cpu_harness.print_table(rows, extra, baseline="one_pass")
    path = cpu_harness.write_record(f"cpu_one_pass_N{args.tokens}_H{args.hidden}_V{args.vocab}", {
        "benchmark": "cpu_one_pass", "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
        "masked": args.masked, "sub_chunk_mb": half_group_mb, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
