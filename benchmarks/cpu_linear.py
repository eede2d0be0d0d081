"""CPU benchmark of the fused linear path: log-probs from hidden states and the LM head,
forward + backward (gradients of hidden and weight).

Providers, each in fresh processes, interleaved:
    naive                materialised float32 logits = hidden @ Wᵀ, log_softmax, gather, autograd
    trl_fused            TRL 1.16's fused LM head (trl.kernels.ChunkedLogProbFunction, called as its
                         add_fused_lm_head does: every position on a CPU, the scored ones only
                         where Triton runs): what TRL's DPO trainer runs today (the baseline)
    matmul_floor         the three bare matmuls over all N tokens (hidden @ Wᵀ, G @ W, Gᵀ @ hidden)
    matmul_floor_scored  the same over the M scored tokens only: the work that must be done
    torch                robalign's chunked path with the plain-PyTorch row kernels (the portable fallback)
    cpp                  robalign's chunked path (ATen matmuls + C++ row kernels), one chunk at a time
    recompute            the whole DoRA loss (DPO, KL-DRO λ = 1) through that path: forward log-probs,
                         autograd through the objective and the DRO, a backward that recomputes every
                         chunk's logits (four matmul passes)
    one_pass             the whole DoRA loss through the one-pass fused op: loss and gradients in the
                         forward, three matmul passes (robalign.ops.one_pass)

Every provider first passes a correctness gate (log-probs and ``grad_hidden`` of the first
sequence, ``grad_weight`` of the whole batch, against float64; for the two loss providers the
loss and both gradients of the first pair against the float64 reference composition) or is
reported as failed. The loss providers do the logits work of the others plus a [B, 2] objective. Both
floors are reported: a provider that skips prompt and padding tokens can beat the all-token
floor, never the scored one.

    python benchmarks/cpu_linear.py [--tokens 2048] [--hidden 512] [--vocab 32000] [--masked 0.125]
                                    [--padding 0] [--mode fwdbwd|fwd] [--repeat 5] [--rounds 2] [--out DIR]
                                    [--softcap C]

``--mode fwd`` times the forward alone under ``no_grad``; its matmul floor is ``hidden @ Wᵀ``.
``--softcap C``: a Gemma-style head, logits c·tanh(z/c), in every provider (naive: on the materialised
logits; TRL: its ``final_logit_softcapping``; robalign: ``logit_softcap``), gated against the float64
reference with the cap; the floors stay the bare matmuls. Any provider named with the suffix
``_uncapped`` (``one_pass_uncapped``, ``cpp_uncapped``) runs without the cap, gated without it, so
the cap's cost is a ratio of one interleaved run.
"""

from __future__ import annotations

import json
import platform

import cpu_harness
from peers import reference_dora_dpo, split_uncapped, trl_fused_logps

PROVIDERS = ("naive", "trl_fused", "matmul_floor", "matmul_floor_scored", "torch", "cpp", "recompute", "one_pass")
LOSS_PROVIDERS = ("recompute", "one_pass")
SEQLEN = 512


def measure(provider: str, tokens: int, hidden_size: int, vocab: int, repeat: int, mode: str = "fwdbwd",
            masked: float = 0.125, padding: float = 0.0, softcap: float | None = None) -> dict:
    import torch

    import robalign

    provider, softcap = split_uncapped(provider, softcap)
    torch.manual_seed(0)
    seqs = max(2, tokens // SEQLEN)
    seqs += seqs % 2                                                      # whole pairs for the loss providers
    seqlen = tokens // seqs
    hidden = torch.randn(seqs, seqlen, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).requires_grad_(True)
    labels = torch.randint(vocab, (seqs, seqlen))
    labels[~cpu_harness.sequence_mask(seqs, seqlen, masked, padding)] = -100
    scored = int((labels != -100).sum())
    coeff = torch.randn(seqs)
    ref_logps = torch.randn(seqs) - 10 * seqlen                          # log-ratios of order 1
    if provider in LOSS_PROVIDERS:
        return _measure_loss(provider, hidden, weight, labels, ref_logps, repeat, mode, scored, softcap)
    if provider == "trl_fused":
        try:
            import trl.kernels.chunked_logprob  # noqa: F401
        except ImportError as err:
            return {"provider": provider, "error": f"not importable ({err})", "scored_tokens": scored}

    def logps_of(h, w, y):
        if provider == "naive":
            z = h @ w.T
            z = z if softcap is None else softcap * torch.tanh(z / softcap)
            tok = torch.log_softmax(z.float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
            return (tok * (y != -100)).sum(-1)
        if provider == "trl_fused":
            return trl_fused_logps(h, w, y, softcap)
        return robalign.linear_sequence_logps(h, w, y, backend=provider, logit_softcap=softcap)[0]

    def run(h, w, y, c):
        logps = logps_of(h, w, y)
        if mode == "fwd":
            return (logps,)
        return (logps, *torch.autograd.grad((logps * c).sum(), (h, w)))

    def check():
        h, w = hidden.detach()[:1].clone(), weight.detach().clone()
        want_h, want_w = h.double().requires_grad_(True), w.double().requires_grad_(True)
        want_logps, _ = robalign.ground_truth.linear_sequence_logps(want_h, want_w, labels[:1], logit_softcap=softcap)
        want = (want_logps.detach(),) if mode == "fwd" else \
            (want_logps.detach(), *torch.autograd.grad((want_logps * coeff[:1].double()).sum(), (want_h, want_w)))
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            got = run(h.requires_grad_(mode == "fwdbwd"), w.requires_grad_(mode == "fwdbwd"), labels[:1], coeff[:1])
        return cpu_harness.gate(provider, got, want)

    if provider.startswith("matmul_floor"):
        rows = tokens if provider == "matmul_floor" else scored
        h, w = hidden.detach().reshape(tokens, hidden_size)[:rows].contiguous(), weight.detach()
        grad_logits = torch.randn(rows, vocab) if mode == "fwdbwd" else None
        step = (lambda: h @ w.T) if mode == "fwd" else (lambda: (h @ w.T, grad_logits @ w, grad_logits.T @ h))
        return {**cpu_harness.measure(provider, step, repeat), "scored_tokens": scored}
    step = lambda: run(hidden, weight, labels, coeff)  # noqa: E731
    row = cpu_harness.measure(provider, torch.no_grad()(step) if mode == "fwd" else step, repeat, check)
    return {**row, "scored_tokens": scored}


def _dora_loss(h, w, y, ref, *, one_pass: bool, backend: str = "cpp", softcap=None):
    import robalign

    fn = robalign.FusedLinearDoRALoss(robalign.Objective("dpo", beta=0.1), robalign.KLDRO(1.0),
                                      head=robalign.HeadTransform(softcap=softcap),
                                      params=robalign.LossParams(backend=backend, one_pass=one_pass))
    return fn(h, w, y, ref).loss


def _measure_loss(provider, hidden, weight, labels, ref_logps, repeat, mode, scored, softcap=None) -> dict:
    """The DoRA loss of pairs (DPO, KL-DRO) through the recompute path or the one-pass op."""
    import torch

    one_pass = provider == "one_pass"

    def run(h, w, y, ref):
        loss = _dora_loss(h, w, y, ref, one_pass=one_pass, softcap=softcap)
        return (loss,) if mode == "fwd" else (loss, *torch.autograd.grad(loss, (h, w)))

    def check():
        rows = min(2, labels.shape[0])
        if rows < 2:
            return None
        h, w = hidden.detach()[:rows].clone(), weight.detach().clone()
        want = reference_dora_dpo(h, w, labels[:rows], ref_logps[:rows], softcap=softcap)
        want = want[:1] if mode == "fwd" else want
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            got = run(h.requires_grad_(mode == "fwdbwd"), w.requires_grad_(mode == "fwdbwd"), labels[:rows],
                      ref_logps[:rows])
        return cpu_harness.gate(provider, got, want)

    step = lambda: run(hidden, weight, labels, ref_logps)  # noqa: E731
    row = cpu_harness.measure(provider, torch.no_grad()(step) if mode == "fwd" else step, repeat, check)
    return {**row, "scored_tokens": scored}


def main(argv=None) -> int:
    args = cpu_harness.parse_args(__doc__, PROVIDERS, argv, tokens=2048, hidden=512, vocab=32000,
                                  floats={"softcap": (0.0, "soft-cap c of the logits, c·tanh(z/c) (0: none)")})
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.hidden, args.vocab, args.repeat, args.mode,
                                 args.masked, args.padding, args.softcap or None)))
        return 0

    import torch

    rows = cpu_harness.run_providers(__file__, args.providers.split(","),
                                     ["--tokens", args.tokens, "--hidden", args.hidden, "--vocab", args.vocab,
                                      "--repeat", args.repeat, "--mode", args.mode, "--masked", args.masked,
                                      "--padding", args.padding, "--softcap", args.softcap], rounds=args.rounds)
    ok = {r["provider"]: r for r in rows if "error" not in r}
    matmuls = 3 if args.mode == "fwdbwd" else 1
    print(f"\n{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}"
          f"{f', soft-capped logits (c = {args.softcap:g})' if args.softcap else ''}, N = {args.tokens} tokens "
          f"(prompt {args.masked:.3g}, padding {args.padding:.3g} of each), H = {args.hidden}, V = {args.vocab}, "
          f"float32 (logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MB), {torch.get_num_threads()} threads, "
          f"{platform.machine()}\n")
    extra = []
    for floor, label in (("matmul_floor", "all tokens"), ("matmul_floor_scored", "scored tokens")):
        if floor in ok:
            extra.append((f"time vs bare matmuls, {label}", lambda r, f=ok[floor]: f"{r['median_s'] / f['median_s']:.2f}"))
    cpu_harness.print_table(rows, extra, baseline="trl_fused" if "trl_fused" in ok else "naive")
    print(f"\n(the floors: {matmuls} bare matmul{'s' * (matmuls > 1)} over all {args.tokens} tokens, and over the "
          f"{next(iter(ok.values()))['scored_tokens'] if ok else '?'} scored ones)")
    suffix = ("" if args.mode == "fwdbwd" else "_fwd") + (f"_softcap{args.softcap:g}" if args.softcap else "")
    path = cpu_harness.write_record(f"cpu_linear_N{args.tokens}_H{args.hidden}_V{args.vocab}{suffix}", {
        "benchmark": "cpu_linear", "mode": args.mode, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
        "dtype": "float32", "masked": args.masked, "padding": args.padding, "softcap": args.softcap or None,
        "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
