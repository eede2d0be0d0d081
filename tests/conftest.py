import os
import tempfile
from pathlib import Path

import torch

# The Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before
# triton is imported. With a GPU the same tests run compiled on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_batch(num_seqs, seqlen, vocab, *, dtype=torch.float64, hole_rate=0.3, all_ignored=(), seed=0,
                 device="cpu"):
    """Padded logits/labels with random ignore_index holes and some all-ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_seqs, seqlen, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(vocab, (num_seqs, seqlen), generator=gen)
    labels[torch.rand(num_seqs, seqlen, generator=gen) < hole_rate] = -100
    for row in all_ignored:
        labels[row] = -100
    return logits.to(device), labels.to(device)


def packed_from_padded(logits, labels, lengths):
    """Concatenate the first lengths[s] tokens of every row: [N, V], [N], cu_seqlens."""
    parts_z = [logits[s, :n] for s, n in enumerate(lengths)]
    parts_y = [labels[s, :n] for s, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.cat(parts_z), torch.cat(parts_y), cu


def _gloo_rank(rank, worker, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(worker, world):
    """Spawn ``world`` CPU processes in one gloo group; each runs ``worker(rank)`` (a module-level
    function) and the returned objects come back, indexed by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_rank, args=(worker, world, str(Path(tmp) / "init"), tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
