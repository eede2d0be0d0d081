"""The whole DPO training step, against what users run: robalign's ``DoRADPOTrainer`` (the
one-pass loss) vs TRL 1.16's ``DPOTrainer`` (its default path: the model's full logits) and
Liger-Kernel's fused DPO loss (``LigerFusedLinearDPOLoss`` in a plain loop: TRL's
``use_liger_kernel=True`` needs a GPU driver for Liger's RMSNorm, so on CPU the loss runs
without it; benchmarks/gpu_check.sh runs TRL with Liger on a GPU).

Same model, same data, same optimiser for every arm:
    models     Llama/Qwen2 architectures built from a config, offline, random weights, their
               real widths and vocabularies, ``--layers`` decoder layers (the real models have
               30 and 24; reduced on CPU: the LM head and the loss are what differ between arms)
                 smollm        SmolLM-135M: H 576, V 49152
                 smollm-v128k  SmolLM-135M's width with Llama-3's V 128256
                 qwen2.5-0.5b  Qwen2.5-0.5B: H 896, V 151936
    data       pairs of a 128-token prompt and two 384-token completions (random tokens through a
               word-level tokenizer of the model's V), micro-batches of ``--micro`` tokens
               (1024: 1 pair; 8192: 8 pairs), 2 accumulation steps a step
    training   AdamW (lr 1e-6), gradient clipping at 1, the reference log-probs precomputed for
               all (TRL's ``precompute_ref_log_probs``; Liger takes the reference model's hidden
               states, precomputed, and forms the reference logits itself, chunk by chunk)
    dtypes     float32, or bfloat16 weights (no autocast)

Arms (``--arms``): ``robalign`` (DoRADPOTrainer, λ = ∞ and no weights, so its loss is TRL's DPO
loss and can be checked against it), ``robalign_dora`` (λ = 1 with DoRA weights: the objective
robalign exists for; its loss differs, its cost should not), ``trl``, ``trl_liger`` (TRL's
DPOTrainer with ``use_liger_kernel=True``; GPU only) and ``liger``. ``--device cuda`` runs the
same on a GPU (benchmarks/gpu_check.sh's ``train`` stage: all the model's layers, bfloat16), peak
memory from ``torch.cuda.max_memory_allocated``. Each (model,
micro-batch, dtype, arm) runs in a fresh process, the arms interleaved, ``--rounds`` times.

Before anything counts, every arm's first step must equal TRL's: its loss and, for the trainers,
the logged mean log-prob of the chosen responses (float32 rtol 1e-4: the policy is the reference
there, so the loss is log 2 up to the paths' log-prob roundings, ~1e-5 measured; bfloat16 rtol
1e-2: bfloat16 logits' log-probs differ by a few ulps between paths); a row that differs says so
(see ``_check_losses`` for why the second step cannot be compared under AdamW). Per arm: the
median step time after ``--warmup`` steps, tokens per second (all tokens of a step, prompt
included), the peak resident memory above the loaded models (the
growth of VmHWM over the resident set once the models and data are loaded: optimizer state,
activations, logits), and where that peak comes from (``peak_parts_mb``: AdamW's state, and the
largest logits-shaped buffers the arm's loss holds at once: ``chunk × V`` for robalign, the whole
micro-batch's ``[tokens, V]`` logits and their gradient for TRL).

    python benchmarks/train_step.py [--models smollm-v128k] [--micro 1024,8192] [--dtypes float32,bfloat16]
                                    [--arms robalign,trl,liger] [--layers 2] [--steps 2] [--warmup 1]
                                    [--rounds 1] [--out DIR]

Writes ``<out>/train_step.json`` and a Markdown table.
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

MODELS = {
    "smollm": dict(arch="llama", hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, layers=30),
    "smollm-v128k": dict(arch="llama", hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=128256, layers=30),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, layers=24),
}
ARMS = ("robalign", "robalign_dora", "trl", "trl_liger", "liger")
PROMPT, COMPLETION, ACCUMULATION = 128, 384, 2
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}


def build_model(name: str, layers: int, dtype):
    """A causal LM of ``MODELS[name]``'s shape with ``layers`` decoder layers, random weights (seed 0)."""
    import torch
    import transformers

    spec = MODELS[name]
    config_cls = transformers.Qwen2Config if spec["arch"] == "qwen2" else transformers.LlamaConfig
    config = config_cls(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                        num_hidden_layers=layers, num_attention_heads=spec["heads"],
                        num_key_value_heads=spec["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=True,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")


SPECIAL = ("<pad>", "</s>", "<unk>")                    # ids 0, 1, 2; no word contains one


def build_tokenizer(vocab: int):
    """A word-level tokenizer whose words ``w3 … w{V−1}`` are the ids ``3 … V−1`` (0 pad, 1 EOS, 2 unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {**{t: i for i, t in enumerate(SPECIAL)}, **{f"w{i}": i for i in range(len(SPECIAL), vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def pairs_per_micro(micro: int) -> int:
    return max(1, micro // (2 * (PROMPT + COMPLETION)))


def dataset_rows(vocab: int, pairs: int, seed: int = 0) -> list[dict]:
    """``pairs`` preference rows of random words; each completion ends with EOS (so TRL adds none)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, vocab, (n,), generator=gen).tolist())  # noqa: E731
    return [{"prompt": words(PROMPT) + " ", "chosen": words(COMPLETION - 1) + " </s>",
             "rejected": words(COMPLETION - 1) + " </s>"} for _ in range(pairs)]


class StepClock:
    """The duration of each optimizer step, and the peak memory (the resident set on CPU, CUDA's
    allocated bytes on a GPU) reset when the warm-up steps are over."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.times, self._start = warmup, device, [], None

    def _sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def begin(self):
        self._sync()
        if len(self.times) == self.warmup:
            if self.device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            else:
                cpu_harness.reset_peak_rss()
        self._start = time.perf_counter()

    def end(self):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def _trainer_arm(arm, model, tokenizer, rows, pairs, steps, device, clock, out_dir, dtype):
    import math

    import torch

    from datasets import Dataset
    from transformers import TrainerCallback

    common = dict(output_dir=out_dir, per_device_train_batch_size=pairs, gradient_accumulation_steps=ACCUMULATION,
                  max_steps=steps, learning_rate=1e-6, optim="adamw_torch", lr_scheduler_type="constant",
                  logging_steps=1, report_to=[], use_cpu=device == "cpu", seed=0, save_strategy="no", beta=0.1,
                  precompute_ref_log_probs=True, dataloader_num_workers=0, disable_tqdm=True,
                  # the row's dtype end to end: TRL's configs default to bf16=True, which runs a float32
                  # model under bfloat16 autocast (before d42f67b the float32 rows of the trainer arms did)
                  bf16=dtype == torch.bfloat16, fp16=False)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.end()

    if arm in ("trl", "trl_liger"):
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, use_liger_kernel=arm == "trl_liger"),
                             train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()])
    else:
        from robalign.trl import DoRADPOConfig, DoRADPOTrainer

        dora = arm == "robalign_dora"
        data = [{**r, "weight": 0.5 + (i % 3) * 0.25} for i, r in enumerate(rows)] if dora else rows
        trainer = DoRADPOTrainer(model=model, args=DoRADPOConfig(**common, dora_lam=1.0 if dora else math.inf,
                                                                  dora_weights_column="weight" if dora else None),
                                 train_dataset=Dataset.from_list(data), processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], first.get("logps/chosen")


def _liger_arm(model, rows, tokenizer, pairs, steps, device, clock):
    """Liger's fused DPO loss in a plain loop, as its README shows it: the model body's hidden
    states, the loss from them and the LM head (the reference's hidden states precomputed once per
    micro-batch by a frozen copy of the initial model), AdamW and clipping as the Trainer does."""
    import copy

    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = []
    for m in range(steps * ACCUMULATION):
        chunk = rows[m * pairs:(m + 1) * pairs]
        texts = [r["prompt"] + r["chosen"] for r in chunk] + [r["prompt"] + r["rejected"] for r in chunk]
        input_ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts], device=device)  # chosen rows first
        labels = input_ids.clone()
        labels[:, :PROMPT] = -100
        with torch.no_grad():
            ref_hidden = reference.model(input_ids=input_ids).last_hidden_state[:, :-1]
        batches.append((input_ids, labels[:, 1:], ref_hidden))
    head, ref_head = model.lm_head.weight, reference.lm_head.weight
    losses = []
    for step in range(steps):
        clock.begin()
        total = 0.0
        for input_ids, target, ref_hidden in batches[step * ACCUMULATION:(step + 1) * ACCUMULATION]:
            hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
            loss = loss_fn(head, hidden, target, ref_input=ref_hidden, ref_weight=ref_head)[0] / ACCUMULATION
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end()
        losses.append(total)
    return losses


def measure(arm, model_name, micro, dtype_name, layers, steps, warmup, device="cpu") -> dict:
    import tempfile

    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    spec = MODELS[model_name]
    layers = layers or spec["layers"]
    pairs = pairs_per_micro(micro)
    total_steps = warmup + steps
    tokenizer = build_tokenizer(spec["vocab"])
    rows = dataset_rows(spec["vocab"], pairs * ACCUMULATION * total_steps)
    model = build_model(model_name, layers, dtype).to(device)
    params = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        loaded = cpu_harness.reset_peak_rss()
    clock = StepClock(warmup, device)
    with tempfile.TemporaryDirectory() as out_dir:
        if arm == "liger":
            losses, logps = _liger_arm(model, rows, tokenizer, pairs, total_steps, device, clock), None
        else:
            losses, logps = _trainer_arm(arm, model, tokenizer, rows, pairs, total_steps, device, clock, out_dir,
                                         dtype)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - loaded
    else:
        peak = cpu_harness.status_mb("VmHWM") - loaded
    timed = clock.times[warmup:]
    step_s = statistics.median(timed)
    tokens = ACCUMULATION * pairs * 2 * (PROMPT + COMPLETION)
    size = torch.finfo(dtype).bits // 8
    from robalign.ops.one_pass import default_chunk

    scored = pairs * 2 * COMPLETION                             # the loss's chunk for a micro-batch's call
    chunk = default_chunk(scored, spec["vocab"], spec["hidden"], dtype, torch.device(device))
    ours = min(scored, chunk) * spec["vocab"] * size
    pair_rows = 2 * (PROMPT + COMPLETION)                       # Liger's chunk: one pair, policy and reference
    logits = {"robalign": ours, "robalign_dora": ours,
              "trl": 2 * (tokens // ACCUMULATION) * spec["vocab"] * 4,    # float32 logits and their gradient
              "trl_liger": 2 * pair_rows * spec["vocab"] * 4, "liger": 2 * pair_rows * spec["vocab"] * 4}
    return {"arm": arm, "model": model_name, "micro": micro, "dtype": dtype_name, "layers": layers, "device": device,
            "params": params, "tokens_per_step": tokens, "losses": losses, "first_logps_chosen": logps,
            "step_times_s": clock.times,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_above_models_mb": peak,
            "peak_parts_mb": {"adamw_state": 2 * params * size / 2**20, "logits_buffers": logits[arm] / 2**20}}


def _check_losses(rows: list[dict]) -> None:
    """Every arm's first step against TRL's in the same case (λ = 1 DoRA excepted): its loss, and
    for the trainers the logged mean log-prob of the chosen responses (``logps/chosen``). Only the
    first step: AdamW's first update is about ``lr·sign(g)`` for every parameter, so where a
    gradient is near 0 its rounding decides the direction and the second losses of equal paths
    differ (measured: 0.6923, 0.6929 and 0.6868 for robalign, Liger and TRL at V 128256)."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["model"], r["micro"], r["dtype"]), []).append(r)
    for case_rows in by_case.values():
        trl = next((r for r in case_rows if r["arm"] == "trl" and "losses" in r), None)
        for r in case_rows:
            if trl is None or "losses" not in r or r["arm"] in ("trl", "robalign_dora"):
                continue
            rtol = LOSS_RTOL[r["dtype"]]
            pairs = [(r["losses"][0], trl["losses"][0])]
            if r.get("first_logps_chosen") is not None and trl.get("first_logps_chosen") is not None:
                pairs.append((r["first_logps_chosen"], trl["first_logps_chosen"]))
            ok = all(abs(a - b) <= rtol * abs(b) for a, b in pairs)
            r["losses_match_trl"] = ok
            if not ok:
                r["error"] = (f"first step {[a for a, _ in pairs]} differs from TRL's {[b for _, b in pairs]} "
                              f"(rtol {rtol:g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm-v128k")
    parser.add_argument("--micro", default="1024,8192")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--arms", default="robalign,trl,liger")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (0: the real model's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, first touch)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=cpu_harness.DEFAULT_OUT)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        arm, model, micro, dtype = args.child
        print(json.dumps(measure(arm, model, int(micro), dtype, args.layers, args.steps, args.warmup, args.device)))
        return 0
    for name, allowed in (("models", MODELS), ("arms", ARMS), ("dtypes", LOSS_RTOL)):
        bad = sorted(set(getattr(args, name).split(",")) - set(allowed))
        if bad:
            parser.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.device == "cpu" and "trl_liger" in args.arms.split(","):
        parser.error("--arms trl_liger needs --device cuda: Liger's RMSNorm kernel inside TRL needs a GPU driver "
                     "(on CPU, the 'liger' arm runs Liger's fused DPO loss in a plain loop)")
    runs: dict[tuple, list[dict]] = {}
    cases = [(m, int(mb), d) for m in args.models.split(",") for mb in args.micro.split(",")
             for d in args.dtypes.split(",")]
    for _ in range(args.rounds):
        for case in cases:
            for arm in args.arms.split(","):
                cmd = [sys.executable, __file__, "--child", arm, case[0], str(case[1]), case[2], "--layers",
                       str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
                       args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                     env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                row = cpu_harness.child_result(arm, out)
                row.update(arm=arm, model=case[0], micro=case[1], dtype=case[2])
                runs.setdefault((*case, arm), []).append(row)
                said = f"{row['step_s']:.2f} s/step, {row['peak_above_models_mb']:.0f} MB" if "step_s" in row \
                    else row["error"]
                print(f"  {case} {arm}: {said}", file=sys.stderr, flush=True)
    rows = []
    for results in runs.values():
        failed = next((r for r in results if "error" in r), None)
        if failed:
            rows.append(failed)
            continue
        times = [t for r in results for t in r["step_times_s"][args.warmup:]]
        row = dict(results[0], step_s=statistics.median(times), rounds=len(results),
                   peak_above_models_mb=max(r["peak_above_models_mb"] for r in results))
        row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
        rows.append(row)
    _check_losses(rows)
    print_table(rows)
    name = "train_step" if args.device == "cpu" else "gpu_train_step"
    path = cpu_harness.write_record(name, {"benchmark": "train_step", "device": _device_name(args.device),
                                           "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
                                           "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


def _device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def print_table(rows: list[dict]) -> None:
    """Per (model, micro-batch, dtype): each arm's step time, tokens/s, peak above the models, and
    robalign's throughput and memory against TRL's and Liger's."""
    print("\n| model | micro-batch | dtype | arm | step (s) | tokens/s | peak above models (MB) | robalign × faster "
          "| robalign's memory × | first step = TRL's |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    cases = {}
    for r in rows:
        cases.setdefault((r["model"], r["micro"], r["dtype"]), {})[r["arm"]] = r
    for (model, micro, dtype), arms in cases.items():
        mine = arms.get("robalign")
        for arm, r in arms.items():
            if "error" in r:
                print(f"| {model} | {micro} | {dtype} | {arm} | {r['error']} |" + " |" * 5)
                continue
            faster = memory = ""
            if mine and "error" not in mine and arm != "robalign":
                faster = f"{r['step_s'] / mine['step_s']:.2f}"
                memory = f"{mine['peak_above_models_mb'] / max(r['peak_above_models_mb'], 1):.2f}"
            match = {True: "yes", False: "no"}.get(r.get("losses_match_trl"), "")     # TRL's own row: empty
            print(f"| {model} | {micro} | {dtype} | {arm} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} "
                  f"| {r['peak_above_models_mb']:.0f} | {faster} | {memory} | {match} |")


if __name__ == "__main__":
    raise SystemExit(main())
