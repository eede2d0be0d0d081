"""The one-pass DoRA loss against its compute floor at every shape, float32 and bfloat16, on CPU.

At each point of the sweep the one-pass loss (``FusedLinearDoRALoss``, C++ row kernels, KL-DRO
λ = 1, DoRA weights from classifier probabilities), forward + backward, is timed against the
**floor**: the three bare matmuls over the scored tokens only, in the same dtype
(``h·Wᵀ``, ``G·W``, ``Gᵀ·h`` for M scored tokens; the same ``torch.mm`` → oneDNN path the loss
takes, ``brg_matmul:avx10_1_512_amx`` for bfloat16 on this CPU, as ``ONEDNN_VERBOSE=1`` shows), in
the fastest of three forms, timed each round: the logits and ``G`` as ``[M, V]`` (a row per token,
each product one GEMM), as ``[V, M]`` (``W·hᵀ``, ``(Gᵀ)ᵀ·W``, ``Gᵀ·h`` from a contiguous ``Gᵀ``;
MKL runs float32 faster so, and the float32 loss forms its chunks so), or as ``[M, V]`` decomposed
as the loss decomposes its bfloat16 products (``h·Wᵀ`` a block of 4096 vocabulary columns at a
time, ``G·W`` with its reduction over V split between the threads where oneDNN runs the whole on one
thread, ``Gᵀ·h`` from a transposed copy of ``G`` a block at a time, the copy counted:
robalign.ops.head.head_logits, one_pass._times_weight, one_pass._addmm_head; half precision only: for
float32 it is the first form, not timed twice), so that no form of the products the loss uses is
missing from the floor (the split does not speed up the ``[V, M]`` form's ``(Gᵀ)ᵀ·W``: 10.6 against
10.2 ms at 384 tokens); written into outputs allocated once (so the floor pays no allocation and no
page fault; the loss keeps its workspaces across calls and forms its head gradient in the block of the
one the previous round dropped, robalign.ops.workspace). ``ratio``
is the median over rounds of the loss's time over the floor's measured next to it, interleaved in
one fresh process per point (a slow minute of the shared machine hits both), ``ratio_quartiles``
the middle half of those rounds' ratios (how far the machine's noise moves the point);
``ratio_of_minima`` is the ratio of the fastest runs.

The points vary one axis at a time around a base (2048 tokens, prompt 1/4, V 32000, H 512, DPO
pairs, the chunk rule's chunks):

    tokens       512, 1024, 2048, 4096, 8192     (sequences of 256 tokens)
    prompt       0, 1/8, 1/4, 1/2 of each sequence masked
    vocab        32000, 128256 (Llama-3), 256000 (Gemma)
    hidden       512, 2048
    objective    DPO pairs, Plackett–Luce lists of 4 (listwise)
    chunks       the rule's (one chunk up to 1024 float32 / 2048 bfloat16 tokens) and several
                 (``ROBALIGN_CHUNK_MB`` set to a quarter of the scored tokens' logits)

and, bfloat16 only, the several-chunks point with the head's gradient accumulated in bfloat16
(``LossParams(fp32_head_grad=False)``): what the default float32 accumulation costs there. It is
not the default path, so it is left out of the worst point.

Before anything is timed, each point's loss, ``grad_hidden`` and ``grad_W`` are checked against a
float64 ground truth computed chunk by chunk (``peers.reference_dora_chunked``; the bfloat16
points against float64 from their bfloat16 values); a point off by more than ``GATE`` is a row
that says so. The bfloat16 points also record the error of materialised bfloat16 logits
(``logits = h·Wᵀ`` in bfloat16, float32 log-softmax, autograd: what the naive path and TRL do)
against the same float64 truth, and the one-pass error's ratio to it.

    python benchmarks/cpu_sweep.py [--dtypes float32,bfloat16] [--points NAME,...] [--repeat 5]
                                   [--flush-mb 1024] [--out DIR]   (--out benchmarks/results: the committed record)

``--flush-mb N`` writes an N-MB scratch buffer before each timed call, so that neither provider
finds its operands in the last-level cache (a loss in a training step runs after the model's
layers have been through the caches); by default both run as the interleaving leaves them.

Writes ``<out>/cpu_sweep.json`` and the chart ``cpu_sweep.png`` (ratio to the floor per point).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import cpu_harness

SEQLEN = 256
LIMITS = {"float32": 1.10, "bfloat16": 1.30}            # the targets: ratio to the floor
# ‖x − float64‖/‖float64‖ bounds of the gate: float32 sums of C·H products (tests/test_one_pass.py's
# 1e-5 per element, 1e-4 in norm) and bfloat16 inputs (their own rounding 2⁻⁸ and a few per-chunk
# roundings)
GATE = {"float32": 1e-4, "bfloat16": 2e-2}
BASE = {"tokens": 2048, "prompt": 0.25, "vocab": 32000, "hidden": 512, "objective": "dpo", "chunks": "rule",
        "fp32_head_grad": True}
HALF_ONLY = "several_chunks_bf16_accumulation"          # a float32 head has no other accumulation


def points() -> dict[str, dict]:
    """The sweep's points by name: the base, then one axis varied at a time."""
    out = {"base": dict(BASE)}
    for tokens in (512, 1024, 4096, 8192):
        out[f"tokens_{tokens}"] = {**BASE, "tokens": tokens}
    for prompt in (0.0, 0.125, 0.5):
        out[f"prompt_{prompt:g}"] = {**BASE, "prompt": prompt}
    for vocab in (128256, 256000):
        out[f"vocab_{vocab}"] = {**BASE, "vocab": vocab}
    out["hidden_2048"] = {**BASE, "hidden": 2048}
    out["plackett_luce"] = {**BASE, "objective": "plackett_luce"}
    out["several_chunks"] = {**BASE, "chunks": "quarter"}
    out[HALF_ONLY] = {**BASE, "chunks": "quarter", "fp32_head_grad": False}
    return out


def _default_path(row: dict) -> bool:
    """Whether a row is of the loss's default settings (records before the opt-out point have no key)."""
    return row.get("fp32_head_grad", True)


def _group(objective: str) -> int:
    return 4 if objective == "plackett_luce" else 2


def _layout(p: dict) -> tuple[int, int]:
    """``(sequences, tokens per sequence)``: sequences of about ``SEQLEN`` tokens, whole groups."""
    group = _group(p["objective"])
    seqs = max(group, -(-p["tokens"] // SEQLEN // group) * group)
    return seqs, p["tokens"] // seqs


def _problem(p: dict, dtype):
    import torch

    torch.manual_seed(0)
    group = _group(p["objective"])
    seqs, seqlen = _layout(p)
    hidden = torch.randn(seqs, seqlen, p["hidden"]).to(dtype).requires_grad_(True)
    weight = (torch.randn(p["vocab"], p["hidden"]) / p["hidden"] ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(p["vocab"], (seqs, seqlen))
    labels[~cpu_harness.sequence_mask(seqs, seqlen, p["prompt"], 0.0)] = -100
    ref_logps = torch.randn(seqs) - 10 * seqlen
    probs = torch.rand(seqs // group, 1).expand(-1, group)
    return hidden, weight, labels, ref_logps, probs


def _rel(got, want) -> float:
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-300))


def _materialised_error(hidden, weight, labels, ref_logps, weights, objective, group, want) -> float:
    """‖grad_W − float64‖/‖float64‖ of the naive path on materialised logits in the inputs' dtype."""
    import torch

    from robalign import ground_truth
    from robalign.ground_truth.objectives import OBJECTIVES

    from peers import naive_logps

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    mask = labels != -100
    logps = naive_logps(h @ w.T, labels)
    losses = OBJECTIVES[objective].fn(logps.view(-1, group), ref_logps.view(-1, group).float(),
                                      counts=mask.sum(-1).view(-1, group), scores=None, beta=0.1)
    loss = ground_truth.kl_dro(losses, weights.float(), 1.0)
    grad_w = torch.autograd.grad(loss, w)[0]
    return _rel(grad_w, want)


def measure(name: str, repeat: int, dtype_name: str, flush_mb: int = 0) -> dict:
    """In the child: one point, gated, then ``repeat`` interleaved rounds of the loss and the floor;
    with ``flush_mb``, a scratch buffer of that many MB is written, untimed, before each timed call,
    so that both providers start with their operands out of the caches."""
    import torch

    import robalign
    from peers import reference_dora_chunked
    from robalign.ops import cpu, one_pass
    from robalign.ops.head import head_logits

    p = points()[name]
    dtype = getattr(torch, dtype_name)
    hidden, weight, labels, ref_logps, probs = _problem(p, dtype)
    group = _group(p["objective"])
    scored = int((labels != -100).sum())
    weighting = robalign.DoRAWeights(0.25)
    fn = robalign.FusedLinearDoRALoss(robalign.Objective(p["objective"], beta=0.1), robalign.KLDRO(1.0), weighting,
                                      params=robalign.LossParams(backend="cpp", group_size=group,
                                                                 fp32_head_grad=p["fp32_head_grad"]))

    def step():
        loss = fn(hidden, weight, labels, ref_logps, probs=probs).loss
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    row = {"point": name, **p, "dtype": dtype_name, "scored_tokens": scored, "group": group,
           "chunk_tokens": robalign.ops.one_pass.default_chunk(scored, p["vocab"], p["hidden"],
                                                                hidden.dtype, hidden.device, p["fp32_head_grad"])}
    weights = weighting(probs.float())                         # [B]: the mean over each group
    want = reference_dora_chunked(hidden, weight, labels, ref_logps, weights, objective=p["objective"], group=group,
                                  beta=0.1)
    got = step()
    errors = {f"{k}_rel_error": _rel(g, w) for k, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want)}
    row.update(errors)
    worst = max(errors.values())
    if not worst <= GATE[dtype_name]:
        return {**row, "error": f"failed the correctness gate: {worst:.1e} from float64 (bound {GATE[dtype_name]:g})"}
    if dtype_name != "float32":
        row["materialised_grad_weight_rel_error"] = _materialised_error(hidden, weight, labels, ref_logps, weights,
                                                                         p["objective"], group, want[2])
        row["error_vs_materialised"] = row["grad_weight_rel_error"] / row["materialised_grad_weight_rel_error"]
    del want, got

    h = hidden.detach().reshape(-1, p["hidden"])[:scored].contiguous()
    w = weight.detach()
    g = torch.randn(scored, p["vocab"]).to(dtype)
    outs = (torch.empty(scored, p["vocab"], dtype=dtype), torch.empty(scored, p["hidden"], dtype=dtype),
            torch.empty(p["vocab"], p["hidden"], dtype=dtype))

    def floor():                        # into outputs allocated once: no allocation, no page fault
        return torch.mm(h, w.T, out=outs[0]), torch.mm(g, w, out=outs[1]), torch.mm(g.T, h, out=outs[2])

    # the same products with the logits and G laid out [V, M] (a column per token), in the same memory
    g_t, logits_t = g.view(p["vocab"], scored), outs[0].view(p["vocab"], scored)

    def floor_columns():
        return torch.mm(w, h.T, out=logits_t), torch.mm(g_t.T, w, out=outs[1]), torch.mm(g_t, h, out=outs[2])

    def floor_rows_decomposed():        # the row layout as the loss runs its products (docstring)
        return (head_logits(h, w, out=outs[0]), one_pass._times_weight(g, w, out=outs[1], rows=cpu),
                one_pass._addmm_head(outs[2], g.T, h, 0.0, 1.0, cpu))

    times = {"loss": [], "floor_rows": [], "floor_columns": []}
    order = [("loss", step), ("floor_rows", floor), ("floor_columns", floor_columns)]
    if dtype != torch.float32:          # float32's decomposed form is the first one: timing it twice would
        times["floor_rows_decomposed"] = []     # take the minimum of two samples of the same products
        order.append(("floor_rows_decomposed", floor_rows_decomposed))
    scratch = torch.empty(flush_mb << 18, dtype=torch.float32)          # flush_mb MB of float32
    for _, f in order:
        f()                                                     # warm-up: oneDNN primitives, huge pages
    for i in range(repeat):
        for key, f in (order if i % 2 == 0 else order[::-1]):
            scratch.fill_(i)                                    # evicts the other provider's operands (and its own)
            start = time.perf_counter()
            out = f()
            times[key].append(time.perf_counter() - start)
            del out
    # each round's floor: the fastest form of the three products in that round
    times["floor"] = [min(forms) for forms in zip(*(times[k] for k, _ in order[1:]))]
    loss_s, floor_s = statistics.median(times["loss"]), statistics.median(times["floor"])
    # each round's loss over the floor measured next to it: a slow minute of the shared machine
    # hits both; the median of the rounds' ratios is the point's ratio
    ratios = [a / b for a, b in zip(times["loss"], times["floor"])]
    ratio = statistics.median(ratios)
    # the middle half of the rounds' ratios: how far the machine's noise moves the point
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else [ratio, ratio]
    return {**row, "flush_mb": flush_mb, "loss_s": loss_s, "floor_s": floor_s,
            "floor_rows_s": statistics.median(times["floor_rows"]),
            "floor_columns_s": statistics.median(times["floor_columns"]),
            **({"floor_rows_decomposed_s": statistics.median(times["floor_rows_decomposed"])}
               if "floor_rows_decomposed" in times else {}), "ratio": ratio,
            "ratio_quartiles": quartiles,
            "ratio_of_minima": min(times["loss"]) / min(times["floor"]), "times_s": times}


def _chunk_env(p: dict, dtype_name: str) -> dict | None:
    """``ROBALIGN_CHUNK_MB`` for the several-chunks point: chunks of a quarter of the scored tokens,
    whole groups (one group's logits at least: a smaller chunk would split groups into sub-chunks,
    whose logits are formed twice)."""
    if p["chunks"] != "quarter":
        return None
    seqs, seqlen = _layout(p)
    scored = seqs * (seqlen - round(p["prompt"] * seqlen))
    group_tokens = scored // seqs * _group(p["objective"])
    size = 4 if dtype_name == "float32" else 2
    need = max(group_tokens, scored // 4) * p["vocab"] * size
    return {"ROBALIGN_CHUNK_MB": str(-(-need // (1 << 20)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--points", default=",".join(points()))
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per point (median of each)")
    parser.add_argument("--flush-mb", type=int, default=0,
                        help="write a scratch buffer of this many MB before each timed call (larger than the last-level "
                             "cache: both providers start cold, as the loss does after a model's layers); 0: off")
    parser.add_argument("--out", default=cpu_harness.DEFAULT_OUT)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.repeat, args.child[1], args.flush_mb)))
        return 0
    names = args.points.split(",")
    unknown = sorted(set(names) - set(points()))
    if unknown:
        parser.error(f"--points: unknown {unknown}; the points are {', '.join(points())}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        if dtype_name not in LIMITS:
            parser.error(f"--dtypes: {dtype_name!r} is not one of {', '.join(LIMITS)}")
        for name in names:
            if name == HALF_ONLY and dtype_name == "float32":
                continue
            env = _chunk_env(points()[name], dtype_name)
            out = subprocess.run([sys.executable, __file__, "--child", name, dtype_name, "--repeat", str(args.repeat),
                                  "--flush-mb", str(args.flush_mb)],
                                 capture_output=True, text=True, check=False,
                                 env=None if env is None else dict(os.environ, **env))
            row = cpu_harness.child_result(name, out)
            row.setdefault("point", name)
            row.setdefault("dtype", dtype_name)
            rows.append(row)
            said = f"{row['ratio']:.3f}" if "ratio" in row else row["error"]
            print(f"  {dtype_name} {name}: {said}", file=sys.stderr, flush=True)
    print_table(rows)
    path = cpu_harness.write_record("cpu_sweep", {"benchmark": "cpu_sweep", "limits": LIMITS, "gate": GATE,
                                                  "repeat": args.repeat, "flush_mb": args.flush_mb, "rows": rows},
                                    args.out)
    print(f"\nwrote {path}")
    try:
        from plot import plot

        for png in plot(path):
            print(f"wrote {png}")
    except ImportError:                                 # matplotlib is in the bench extra
        pass
    return 0


def print_table(rows: list[dict]) -> None:
    """A Markdown table of the points and, per dtype, the worst point against its limit."""
    print("\n| dtype | point | tokens (scored) | prompt | V | H | objective | chunk tokens | loss (ms) | floor (ms) "
          "| floor by rows / by columns / rows decomposed, ms (loss over the rows' floor) | ratio | rounds' middle half "
          "| grad_W error | vs materialised |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ratio" not in r:
            print(f"| {r['dtype']} | {r['point']} | {r['error']} |" + " |" * 12)
            continue
        vs = f"{r['error_vs_materialised']:.2f}" if "error_vs_materialised" in r else ""
        layouts = ""                                            # a record from before the column floor: none
        if "floor_columns_s" in r:                              # and the ratio to the row layout's, as before it
            t = r["times_s"]
            by_rows = statistics.median(a / b for a, b in zip(t["loss"], t["floor_rows"]))
            decomposed = f" / {r['floor_rows_decomposed_s'] * 1e3:.0f}" if "floor_rows_decomposed_s" in r else ""
            layouts = f"{r['floor_rows_s'] * 1e3:.0f} / {r['floor_columns_s'] * 1e3:.0f}{decomposed} ({by_rows:.3f})"
        q1, q3 = r["ratio_quartiles"]
        print(f"| {r['dtype']} | {r['point']} | {r['tokens']} ({r['scored_tokens']}) | {r['prompt']:g} | {r['vocab']} "
              f"| {r['hidden']} | {r['objective']} | {r['chunk_tokens']} | {r['loss_s'] * 1e3:.0f} "
              f"| {r['floor_s'] * 1e3:.0f} | {layouts} | {r['ratio']:.3f} | {q1:.2f}–{q3:.2f} "
              f"| {r['grad_weight_rel_error']:.1e} | {vs} |")
    for dtype_name, limit in LIMITS.items():
        mine = [r for r in rows if r["dtype"] == dtype_name and "ratio" in r and _default_path(r)]
        if mine:
            worst = max(mine, key=lambda r: r["ratio"])
            verdict = "within" if worst["ratio"] <= limit else "ABOVE"
            q1, q3 = worst["ratio_quartiles"]
            spans = f" (its rounds' middle half, {q1:.3f}–{q3:.3f}, spans the limit)" if q1 <= limit < q3 else ""
            print(f"\n{dtype_name}: worst point {worst['point']} at {worst['ratio']:.3f}× the floor, {verdict} the "
                  f"limit {limit}×{spans}")
    by_key = {(r["dtype"], r["point"]): r for r in rows if "ratio" in r}
    for dtype_name in LIMITS:
        default, half = by_key.get((dtype_name, "several_chunks")), by_key.get((dtype_name, HALF_ONLY))
        if default and half:
            print(f"\n{dtype_name}, several chunks: {default['ratio']:.3f}× the floor accumulating the head's gradient in "
                  f"float32 (the default), {half['ratio']:.3f}× in {dtype_name} (fp32_head_grad=False): the float32 "
                  f"accumulation costs {default['ratio'] - half['ratio']:.2f} of the floor")


if __name__ == "__main__":
    raise SystemExit(main())
