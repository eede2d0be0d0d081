"""What the exact scheme of the ambiguity sets costs in training: the no-grad pre-pass over the
step's micro-batches (one extra forward each) that fixes the weights of the KL ball, χ² ball and
CVaR, against DoRA's KL temperature form (online rescaling, no pre-pass) and the per-micro-batch
approximation. ``robalign train`` on the embedded model and data, 2 micro-batches a step, SGD;
each configuration in a fresh process, interleaved over ``--rounds``; seconds per optimizer step
(the trainer's own timing, reference log-probs excluded).

    python benchmarks/cpu_dro_sets.py [--steps 40] [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

import cpu_harness

CONFIGS = {"kl": {"dro": "kl"}, "cvar_exact": {"dro": "cvar", "level": 0.3},
           "cvar_per_micro_batch": {"dro": "cvar", "level": 0.3, "exact_dro": False},
           "kl_ball_exact": {"dro": "kl-ball", "eta": 0.3}}


def child(name: str, steps: int) -> dict:
    from robalign.app.training.config import TrainSettings
    from robalign.app.commands.train import run_training

    with tempfile.TemporaryDirectory() as out:
        settings = TrainSettings(out=out, max_steps=steps, grad_accum=2, batch_size=8, save_steps=10 ** 6,
                                 logging_steps=10 ** 6, optim="sgd", lr=0.1, **CONFIGS[name])
        summary = run_training(settings, log=lambda *_: None)
    return {"config": name, "seconds_per_step": summary["seconds"] / summary["steps"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=cpu_harness.DEFAULT_OUT)
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"])
    base = statistics.median(runs["kl"])
    rows = [{"config": name, "seconds_per_step": statistics.median(v), "rounds": v,
             "vs_kl": statistics.median(v) / base} for name, v in runs.items()]
    print(f"\nrobalign train, embedded model and data, batch 8 × 2 micro-batches, {args.steps} steps, SGD\n")
    print("| configuration | s / step | vs kl |")
    print("| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['seconds_per_step']:.4f} | {r['vs_kl']:.2f} |")
    path = cpu_harness.write_record("cpu_dro_sets", {"benchmark": "cpu_dro_sets", "steps": args.steps,
                                                     "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
