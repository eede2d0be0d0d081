"""GPU benchmark of the fused linear path: log-probs from hidden states and the LM head,
forward + backward (gradients of hidden and weight), bfloat16, H = 4096, V = 128256,
16 sequences × {512, 1024, 2048} tokens.

Providers:
    naive                materialised logits (hidden @ Wᵀ, upcast to float32), log_softmax, gather, autograd
    naive_compile        torch.compile of the naive path (one dynamic-shape compile for the sweep)
    trl_fused            TRL 1.16's fused LM head (trl.kernels.ChunkedLogProbFunction, called as its
                         add_fused_lm_head does: on a Triton device only the scored tokens) — the
                         baseline: what TRL's DPO trainer runs today
    matmul_floor         the three bare matmuls over all N tokens (hidden @ Wᵀ, G @ W, Gᵀ @ hidden)
    matmul_floor_scored  the same over the M scored tokens: the work that must be done
    torch                robalign's chunked path with its plain-PyTorch row kernels (the portable fallback)
    triton               chunked cuBLAS matmuls + Triton row kernels (recompute design: four matmul passes)
    recompute            the whole DoRA loss (DPO, KL-DRO λ = 1, reference log-probs given) through that path
    one_pass             the whole DoRA loss through the one-pass fused op (robalign.ops.one_pass): loss and
                         gradients in the forward, three matmul passes, one host read per chunk
    liger_dpo_c1/_c4     Liger-Kernel's LigerFusedLinearDPOLoss with a reference model as TRL builds one
                         (reference hidden states and head, no gradient), chunk_size 1 and 4 pairs
    liger_flce           Liger-Kernel's fused linear cross-entropy, per token (reduction="none")
    cce                  Apple's Cut Cross-Entropy, per token (reduction="none")

Prompt (``--masks``) and padding are masked as in real preference batches; robalign skips
those tokens, so every row reports its time against both floors, and a lead over a provider
that computes every position comes (partly) from skipping them — compare on scored tokens.
Every provider passes a correctness gate (log-probs of the first sequence against float64, its
gradient too where the provider returns per-sequence log-probs) before it is timed. The matmul
rate is measured in the same run; times are medians of ``triton.testing.do_bench`` (20th/80th
percentiles in the JSON), ``host_us`` the host time of one call; memory is the peak allocated
above the inputs. A provider that fails is reported as failed, not dropped.

    python benchmarks/gpu_linear.py [--quick] [--model NAME] [--mode fwdbwd|fwd] [--masks sweep|P/PAD]
                                    [--providers a,b] [--out DIR] [--softcap C]

``--mode fwd`` times the forward alone under ``no_grad`` (inputs detached, so no provider takes a
gradient path; its floor is ``hidden @ Wᵀ``, 2·N·H·V FLOPs); ``--model`` takes H and V from
benchmarks/shapes.py (default llama3-8b). ``--softcap C``: a Gemma-style head, logits c·tanh(z/c), in
every provider that takes one (naive: on the materialised logits; TRL: ``final_logit_softcapping``;
robalign: ``logit_softcap``; Liger FLCE and CCE: their ``softcap``; Liger's DPO loss has none and
fails its gate), gated against the float64 reference with the cap; a provider named ``X_uncapped``
(``triton_uncapped``, ``one_pass_uncapped``) runs without it, so the cap's cost is a ratio of one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import robalign
from gpu_harness import environment, gate, matmul_rate, measure_providers, versus, write_json
from peers import reference_dora_dpo, split_uncapped, trl_fused_logps
from shapes import MODELS

SEQS = 16
PROVIDERS = ("naive", "naive_compile", "trl_fused", "matmul_floor", "matmul_floor_scored", "torch", "triton",
             "recompute", "one_pass", "liger_dpo_c1", "liger_dpo_c4", "liger_flce", "cce")
LOSS_PROVIDERS = ("recompute", "one_pass")


def dora_loss(provider, hidden, weight, labels, ref_logps, backend, softcap=None):
    """The DoRA loss of the rows as pairs (DPO, KL-DRO λ = 1) by the recompute path or the one-pass op."""
    fn = robalign.FusedLinearDoRALoss(robalign.Objective("dpo", beta=0.1), robalign.KLDRO(1.0),
                                      head=robalign.HeadTransform(softcap=softcap),
                                      params=robalign.LossParams(backend=backend, one_pass=provider == "one_pass"))
    return fn(hidden, weight, labels, ref_logps).loss
MASKS = ((0.125, 0.0), (0.0, 0.0), (0.5, 0.0), (0.25, 0.25))


def naive(hidden, weight, labels, softcap=None):
    z = (hidden @ weight.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * (labels != -100)).sum(-1)


naive_compiled = torch.compile(naive, dynamic=True)


def per_token_logps(provider, hidden, weight, labels, softcap=None):
    """Per-sequence log-probs from a per-token cross-entropy provider (Liger FLCE, CCE)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if provider == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        tok = -LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)(weight, h, y)
    else:
        from cut_cross_entropy import linear_cross_entropy

        tok = -linear_cross_entropy(h, weight, y, reduction="none", softcap=softcap)
    return (tok.view(labels.shape).float() * (labels != -100)).sum(-1)


def liger_step(hidden, weight, labels, ref_hidden, mode, chunk_size):
    """Liger's chunked DPO loss on the same rows (chosen/rejected halves) with a reference model
    as TRL builds one: the reference's hidden states and a frozen copy of the head."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=True, chunk_size=chunk_size)
    ref_weight = weight.detach().clone()

    def step():
        loss = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return loss if mode == "fwd" else torch.autograd.grad(loss, (hidden, weight))
    return torch.no_grad()(step) if mode == "fwd" else step


def logps_of(provider, hidden, weight, labels, softcap=None):
    if provider in ("naive", "naive_compile"):
        return (naive if provider == "naive" else naive_compiled)(hidden, weight, labels, softcap)
    if provider == "trl_fused":
        return trl_fused_logps(hidden, weight, labels, softcap)
    if provider in ("liger_flce", "cce"):
        return per_token_logps(provider, hidden, weight, labels, softcap)
    return robalign.linear_sequence_logps(hidden, weight, labels, backend=provider, logit_softcap=softcap)[0]


def run_case(seqlen, device, dtype, rate, hidden_size, vocab, providers, mode="fwdbwd", masked=0.125, padding=0.0,
             softcap=None):
    torch.manual_seed(0)
    tokens = SEQS * seqlen
    hidden = torch.randn(SEQS, seqlen, hidden_size, device=device, dtype=dtype, requires_grad=mode == "fwdbwd")
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) / hidden_size ** 0.5) \
        .requires_grad_(mode == "fwdbwd")
    ref_hidden = torch.randn(SEQS, seqlen, hidden_size, device=device, dtype=dtype)
    labels = torch.randint(vocab, (SEQS, seqlen), device=device)
    labels[:, : round(masked * seqlen)] = -100
    labels[:, seqlen - round(padding * seqlen):] = -100
    scored = int((labels != -100).sum())
    coeff = torch.randn(SEQS, device=device)
    ref_logps = torch.randn(SEQS, device=device) - 10 * seqlen                # log-ratios of order 1
    kernel = "triton" if device == "cuda" else "cpp"
    passes = 3 if mode == "fwdbwd" else 1

    def make(provider):
        provider, cap = split_uncapped(provider, softcap)
        if provider.startswith("matmul_floor"):
            rows = tokens if provider == "matmul_floor" else scored
            h, w = hidden.detach().reshape(tokens, hidden_size)[:rows], weight.detach()
            if mode == "fwd":
                return lambda: h @ w.T
            g = torch.randn(rows, vocab, device=device, dtype=dtype)
            return lambda: (h @ w.T, g @ w, g.T @ h)
        if provider.startswith("liger_dpo"):
            if cap is not None:
                raise ValueError("Liger's DPO loss takes no soft-cap")
            return liger_step(hidden, weight, labels, ref_hidden, mode, int(provider.rsplit("c", 1)[1]))
        if provider in LOSS_PROVIDERS:
            def loss_step():
                loss = dora_loss(provider, hidden, weight, labels, ref_logps, kernel, cap)
                return loss if mode == "fwd" else torch.autograd.grad(loss, (hidden, weight))
            return torch.no_grad()(loss_step) if mode == "fwd" else loss_step

        def step():
            logps = logps_of(provider, hidden, weight, labels, cap)
            if mode == "fwd":
                return logps
            return torch.autograd.grad((logps * coeff).sum(), (hidden, weight))
        return torch.no_grad()(step) if mode == "fwd" else step

    def check(provider):
        provider, cap = split_uncapped(provider, softcap)
        if provider.startswith(("matmul_floor", "liger_dpo")):
            return None                       # not log-prob providers: a floor, and a loss (checked against TRL in tests)
        if provider in LOSS_PROVIDERS:
            return check_loss(provider, cap)
        h = hidden.detach()[:1].clone().requires_grad_(mode == "fwdbwd")
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            logps = logps_of(provider, h, weight.detach(), labels[:1], cap)
            got = (logps,) if mode == "fwd" else (logps, torch.autograd.grad(logps.sum(), h)[0])
        want_h = hidden.detach()[:1].double().requires_grad_(True)
        want, _ = robalign.ground_truth.linear_sequence_logps(want_h, weight.detach().double(), labels[:1],
                                                           logit_softcap=cap)
        want_all = (want,) if mode == "fwd" else (want, torch.autograd.grad(want.sum(), want_h)[0])
        # bfloat16 head: the logits of a bfloat16 matmul carry ~2⁻⁸ relative error each
        return gate(got, want_all, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)

    def check_loss(provider, cap):
        """The loss and grad_hidden of the first pair against the float64 reference composition."""
        h = hidden.detach()[:2].clone().requires_grad_(mode == "fwdbwd")
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            loss = dora_loss(provider, h, weight.detach(), labels[:2], ref_logps[:2], kernel, cap)
            got = (loss,) if mode == "fwd" else (loss, torch.autograd.grad(loss, h)[0])
        want = reference_dora_dpo(hidden[:2], weight, labels[:2], ref_logps[:2], softcap=cap)
        want_all = want[:1] if mode == "fwd" else want[:2]
        return gate(got, want_all, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)

    def derive(s):
        return {"tflops_scored": passes * 2 * scored * hidden_size * vocab / s / 1e12,
                "fraction_of_matmul_rate_scored": passes * 2 * scored * hidden_size * vocab / s / rate}

    rows = measure_providers(providers, make, device, f"{tokens} tokens ({masked:g}/{padding:g})", derive, check)
    floors = {r["provider"]: r["median_ms"] for r in rows if r["provider"].startswith("matmul_floor") and "median_ms" in r}
    for r in rows:
        if "median_ms" in r:
            r.update({f"vs_{k}": r["median_ms"] / v for k, v in floors.items()})
    return [{"mode": mode, "tokens": tokens, "scored_tokens": scored, "masked": masked, "padding": padding,
             "hidden": hidden_size, "vocab": vocab, "softcap": split_uncapped(r["provider"], softcap)[1], **r} for r in rows]


def print_table(rows, baseline="trl_fused"):
    print("| tokens | scored | provider | time (ms) | host µs | time vs bare matmuls, all tokens | vs bare matmuls, "
          f"scored | speed-up vs {baseline} | peak MB above inputs | memory vs {baseline} |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['scored_tokens']} | {r['provider']} | failed: {r['error']} | | | | | | |")
            continue
        same = [x for x in rows if all(x[k] == r[k] for k in ("tokens", "masked", "padding")) and "median_ms" in x]
        base = next((x for x in same if x["provider"] == baseline), None) or \
            next((x for x in same if x["provider"] == "naive"), None)
        fmt = lambda key: f"{r[key]:.2f}" if key in r else "n/a"  # noqa: E731
        speed, mem, mem_ratio = versus(r, base, digits=3)
        print(f"| {r['tokens']} | {r['scored_tokens']} | {r['provider']} | {r['median_ms']:.1f} | {r['host_us']:.0f} | "
              f"{fmt('vs_matmul_floor')} | {fmt('vs_matmul_floor_scored')} | {speed} | {mem} | {mem_ratio} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="16 × 1024 tokens only")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b", help="H and V")
    parser.add_argument("--mode", choices=("fwdbwd", "fwd"), default="fwdbwd")
    parser.add_argument("--masks", default="sweep",
                        help="'sweep' (1/8 prompt over the token sweep, then 0, 1/2 and 1/4 + 1/4 padding at "
                             "16 × 1024) or one 'PROMPT/PADDING'")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--out", default="robalign-bench", help="folder for the JSON record (default ./robalign-bench)")
    parser.add_argument("--softcap", type=float, default=0.0, help="soft-cap c of the logits, c·tanh(z/c) (0: none)")
    args = parser.parse_args(argv)
    softcap = args.softcap or None
    device = args.device
    (hidden_size, vocab), dtype, seqlens = MODELS[args.model], torch.bfloat16, (512, 1024, 2048)
    if args.quick:
        seqlens = (1024,)
    if device == "cpu":                                      # smoke test of the script only
        dtype, hidden_size, vocab, seqlens = torch.float32, 64, 2000, (32,)
    providers = PROVIDERS if device == "cuda" else ("naive", "trl_fused", "matmul_floor", "matmul_floor_scored",
                                                    "torch", "cpp", "recompute", "one_pass")
    if args.mode == "fwd":                   # the loss providers differ from the others only in training
        providers = tuple(p for p in providers if p not in LOSS_PROVIDERS)
    if args.providers:
        providers = tuple(p for p in args.providers.split(",") if p)
    if args.masks == "sweep":
        middle = seqlens[len(seqlens) // 2]
        cases = [(n, MASKS[0]) for n in seqlens] + [(middle, m) for m in MASKS[1:]]
    else:
        cases = [(n, tuple(float(x) for x in args.masks.split("/"))) for n in seqlens]
    rate = matmul_rate(device)
    rows = [r for n, (masked, padding) in cases
            for r in run_case(n, device, dtype, rate, hidden_size, vocab, providers, args.mode, masked, padding, softcap)]
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}; measured matmul rate {rate / 1e12:.0f} TFLOP/s; "
          f"{'forward+backward' if args.mode == 'fwdbwd' else 'forward (no_grad)'}"
          f"{f', soft-capped logits (c = {softcap:g})' if softcap else ''}\n")
    print_table(rows)
    suffix = (("" if args.model == "llama3-8b" else f"_{args.model}") + ("" if args.mode == "fwdbwd" else "_fwd")
              + (f"_softcap{softcap:g}" if softcap else ""))
    path = write_json(Path(args.out), f"gpu_linear_{env['device'].replace(' ', '_')}{suffix}",
                      {"benchmark": "gpu_linear", "mode": args.mode, "model": args.model, **env,
                       "matmul_tflops": rate / 1e12, "rows": rows})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
