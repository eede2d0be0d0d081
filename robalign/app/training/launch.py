"""Distributed launches that really are distributed: what ``robalign train`` checks before it trains,
what it reports after, and the one-time DeepSpeed set-up.

    expected_world_size()       how many processes the launcher says it started (torchrun/accelerate
                                ``WORLD_SIZE``, MPI, a Slurm step, or the ``accelerate launch`` that
                                started this process), ``None`` when it says nothing
    check_engine(trainer, s)    refuse (one line) a run that would silently train something else:
                                several processes that do not form one group, ``--fsdp`` that the
                                Trainer runs as DDP, ``--deepspeed`` that it does not run at all
    describe_engine(trainer)    world size, rank, backend, wrapper class, ZeRO stage, and the share of
                                the LM head this rank holds — written to ``summary.json``
    prebuild_deepspeed()        compile DeepSpeed's CPU communication extension once, up front, and
                                clear a lock left by a killed build (``python -m robalign.app.training.launch``)

Why: on a CPU-only machine several launch paths exit 0 having trained something else — see the
README's "Distributed engines" section for the list, each measured.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

__all__ = ["EngineError", "expected_world_size", "check_engine", "describe_engine", "prebuild_deepspeed"]


class EngineError(ValueError):
    """A launch that would not train what was asked; the message says what to run instead."""


def _accelerate_parent_processes() -> int | None:
    """``--num_processes N`` of an ``accelerate launch`` that is this process's parent (Linux), which
    on CPU without MPI starts one process and passes nothing about N to it."""
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in cmdline if a]
    head = " ".join(args[:3])               # `accelerate launch …` or `python -m accelerate.commands.launch …`
    if not (re.search(r"accelerate(\s|$)", head) and "launch" in args) and "accelerate.commands.launch" not in head \
            and "accelerate/commands/launch" not in head:
        return None
    for i, a in enumerate(args):
        match = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", a)
        if match:
            value = match.group(1) or (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else None
    return None


def expected_world_size(environ=None) -> tuple[int | None, str]:
    """``(N, source)``: the number of processes the launcher started, and where that was read."""
    env = os.environ if environ is None else environ
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key]), key
    if env.get("SLURM_STEP_ID", "").isdigit() and env.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(env["SLURM_STEP_NUM_TASKS"]), "SLURM_STEP_NUM_TASKS (an srun step)"
    if environ is None and "ACCELERATE_USE_CPU" in env:
        n = _accelerate_parent_processes()
        if n is not None:
            return n, "accelerate launch --num_processes"
    return None, ""


def check_engine(trainer, settings) -> None:
    """Raise :class:`EngineError` when the built trainer would not run what the launch asked for."""
    expected, source = expected_world_size()
    actual = trainer.args.world_size
    if expected is not None and expected > 1 and actual != expected:
        if source.startswith("accelerate"):
            raise EngineError(f"`accelerate launch --cpu --num_processes {expected}` started this process alone (a "
                              f"world of {actual}: without MPI its CPU mode starts one process); on CPU use "
                              f"`accelerate launch --multi_gpu --num_processes {expected}` (robalign sets use_cpu, "
                              f"gloo) or `torchrun --nproc-per-node {expected}`")
        raise EngineError(f"the launcher started {expected} processes ({source}) but this one trains in a world of "
                          f"{actual}: {expected} independent runs on the same batches, not one data-parallel run; "
                          "start them with torchrun (or give each MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE) so "
                          "that they join one process group")
    if getattr(settings, "fsdp", "") and not trainer.is_fsdp_enabled:
        raise EngineError("--fsdp was asked for but the Trainer would run plain DDP (accelerate "
                          "enables FSDP only on GPUs): every rank would hold the whole model; drop --fsdp on CPU, "
                          "or use DeepSpeed ZeRO-3 (--deepspeed), which shards on CPU too")
    if getattr(settings, "deepspeed", None) and not trainer.is_deepspeed_enabled:
        raise EngineError("--deepspeed was given but the Trainer did not enable DeepSpeed")


def describe_engine(trainer) -> dict:
    """What actually ran: world size, this rank, the process group's backend, the wrapper class
    around the model, the ZeRO stage, and the LM head's elements on this rank against its total."""
    import torch.distributed as dist

    inited = dist.is_available() and dist.is_initialized()
    info = {"world_size": dist.get_world_size() if inited else 1, "rank": dist.get_rank() if inited else 0,
            "backend": dist.get_backend() if inited else None,
            "wrapper": type(trainer.model_wrapped).__name__, "fsdp": bool(trainer.is_fsdp_enabled),
            "zero_stage": None}
    if trainer.is_deepspeed_enabled:
        info["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None:
        weight = head.weight
        if hasattr(weight, "ds_id"):                                   # ZeRO-3: the partition this rank holds
            info["head_elements"] = [int(weight.ds_tensor.numel()), int(weight.ds_numel)]
        else:
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            info["head_elements"] = [int(local.numel()), int(weight.numel())]
    return info


def _extensions_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False))


def prebuild_deepspeed(log=print) -> float | None:
    """Build (or load) DeepSpeed's ``deepspeed_shm_comm`` CPU extension, which its first CPU run
    otherwise compiles mid-launch; returns the seconds it took (``None`` without DeepSpeed).

    Torch's build lock is a plain file: a build that was killed leaves it, and every later run waits
    on it forever. Builds here hold an ``fcntl`` lock of their own (released when the holder dies),
    so while holding it a leftover torch lock can only be stale, and is removed."""
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    except ImportError:
        return None
    import fcntl

    start = time.perf_counter()
    folder = _extensions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "robalign-prebuild.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log(f"robalign: removing a stale build lock {stale} (a killed build left it)")
            stale.unlink()
        ShareMemCommBuilder().load(verbose=False)
    return time.perf_counter() - start


if __name__ == "__main__":                       # python -m robalign.app.training.launch  (the Makefile's set-up)
    seconds = prebuild_deepspeed()
    print("robalign: DeepSpeed is not installed; nothing to build" if seconds is None else
          f"robalign: DeepSpeed's CPU communication extension is ready ({seconds:.0f} s)")
    sys.exit(0)
