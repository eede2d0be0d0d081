"""What exactness at scale costs in communication: the collectives each reduction issues per
optimizer step, counted on 2 gloo ranks, and the accumulator's passes over the gradients.

Every ``torch.distributed`` collective robalign calls is wrapped to count calls and payload bytes
(the tensor a rank contributes: for an all-gather its own part); the KL accumulator's gradient
rescaling is counted the same way. Each reduction runs one optimizer step of ``--micro`` micro-
batches of ``--samples`` samples per rank (a linear model, SGD-style backward), its exact
accumulator (with the no-grad pre-pass where it has one) and DoRA's KL form both ways: online
rescaling (DDP, FSDP) and the pre-pass form DoRATrainer uses under DeepSpeed. Prints a Markdown
table and writes ``results/dro_collectives.json``; the README sets it against the gradient
all-reduce of an 8B model on 64 ranks.

    python benchmarks/dro_collectives.py [--micro 4] [--samples 8] [--out results]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = {   # name: (dro, parameter, prepass)
    "kl (online rescaling)": ("kl", 1.0, False),
    "kl (pre-pass, DeepSpeed)": ("kl", 1.0, True),
    "kl-ball": ("kl-ball", 0.5, False),
    "chi2": ("chi2", 1.0, False),
    "cvar": ("cvar", 0.3, False),
    "group (G = 4)": ("group", 0.1, False),
}
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor")


def _payload(name, args) -> int:
    t = args[1] if name == "all_gather" else args[0]
    return t.numel() * t.element_size()


def _counting(counter):
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def call(*args, **kwargs):
            counter[f"{name}/calls"] += 1
            counter[f"{name}/bytes"] += _payload(name, args)
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    return originals


def _reduction(dro, parameter):
    from robalign.losses.reductions import REDUCTIONS, GroupDRO

    return GroupDRO(4, parameter) if dro == "group" else REDUCTIONS[dro](parameter)


def _rank(rank, world, init_file, out_dir, micro, samples):
    from robalign.losses import dro as dro_module

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for name, (dro, parameter, prepass) in CONFIGS.items():
            torch.manual_seed(rank)
            model = torch.nn.Linear(32, 1)
            x = torch.randn(micro, samples, 32)
            w = torch.rand(micro, samples) + 0.5
            ids = torch.randint(4, (micro, samples))
            reduction = _reduction(dro, parameter)
            acc = reduction.accumulator(list(model.parameters()), group=dist.group.WORLD, accumulation_steps=micro,
                                        prepass=prepass)
            grouped = (lambda j: {"group_ids": ids[j]}) if reduction.takes_group_ids else (lambda j: {})
            counter = Counter()
            rescale = dro_module.KLDROAccumulator._rescale_grads

            def counted_rescale(self, factor, _original=rescale):
                counter["gradient rescaling passes"] += 1
                return _original(self, factor)

            dro_module.KLDROAccumulator._rescale_grads = counted_rescale
            originals = _counting(counter)
            try:
                if getattr(acc, "needs_prepare", False):
                    with torch.no_grad():
                        losses = [model(x[j]).squeeze(-1) ** 2 for j in range(micro)]
                    acc.prepare(losses, list(w), **({"group_ids": list(ids)} if reduction.takes_group_ids else {}))
                for j in range(micro):
                    acc(model(x[j]).squeeze(-1) ** 2, w[j], **grouped(j)).backward()
            finally:
                for k, fn in originals.items():
                    setattr(dist, k, fn)
                dro_module.KLDROAccumulator._rescale_grads = rescale
            results[name] = dict(counter, pre_pass=bool(getattr(acc, "needs_prepare", False)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--samples", type=int, default=8, help="samples per micro-batch and rank")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, str(Path(tmp) / "init"), tmp, args.micro, args.samples), nprocs=world, join=True)
        per_rank = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert per_rank[0] == per_rank[1], "every rank issues the same collectives"
    rows = per_rank[0]
    print(f"{world} gloo ranks, {args.micro} micro-batches of {args.samples} samples per rank, one optimizer step\n")
    print("| reduction | pre-pass | all-reduce calls | all-reduce bytes | all-gather calls | all-gather bytes "
          "| gradient rescaling passes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {'yes' if r['pre_pass'] else 'no'} | {r.get('all_reduce/calls', 0)} | "
              f"{r.get('all_reduce/bytes', 0)} | {r.get('all_gather/calls', 0)} | {r.get('all_gather/bytes', 0)} | "
              f"{r.get('gradient rescaling passes', 0)} |")
    import cpu_harness

    path = cpu_harness.write_record("dro_collectives", {"world": world, "micro_batches": args.micro,
                                                        "samples_per_micro_batch": args.samples, "rows": rows},
                                    args.out)
    print(f"\nrecord: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
