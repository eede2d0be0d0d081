import contextlib
import os
import tempfile
from pathlib import Path

import torch

# The Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before
# triton is imported. With a GPU the same tests run compiled on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def kernel_backends() -> list[tuple[str, str]]:
    """``(backend, device)`` of every kernel backend of robalign's registry (all but the float64
    ground truth): on CUDA where there is one and the backend runs there, else on CPU (the Triton
    kernels under TRITON_INTERPRET=1). A backend added to the registry is tested by every backend
    test with no edit here."""
    from robalign.ops.registry import BACKENDS

    return [(name, "cuda" if CUDA and (entry.devices is None or "cuda" in entry.devices) else "cpu")
            for name, entry in BACKENDS.items() if entry.rows is not None]


def backend_id(backend: tuple[str, str]) -> str:
    name, device = backend
    return {("triton", "cpu"): "triton-interpret", ("cpp", "cpu"): "cpp"}.get(backend, f"{name}-{device}")


KERNEL_BACKENDS = [pytest.param(b, id=backend_id(b)) for b in kernel_backends()]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch (and so the C++ kernels' ``at::parallel_for``) on ``n`` threads inside the block, the
    previous count restored after it."""
    was = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def chunks(monkeypatch):
    """``chunks(n)`` pins the one-pass loss's chunk to ``n`` scored tokens."""
    from robalign.ops import one_pass

    def pin(tokens):
        monkeypatch.setattr(one_pass, "chunk_tokens", lambda *args, **kwargs: tokens)
    return pin


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
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Under torch 2.13 a rank sometimes died in gloo's teardown with SIGABRT ("terminate called without
    # an active exception"): in about half of the full-suite runs when the group was destroyed at once,
    # and still once in session 15 after a barrier before it. The results are written and every rank has
    # passed the barrier, so the process leaves without running the group's destructors.
    os._exit(0)


def run_on_gloo_ranks(worker, world):
    """Spawn ``world`` CPU processes in one gloo group; each runs ``worker(rank)`` (a module-level
    function) and the returned objects come back, indexed by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_rank, args=(worker, world, str(Path(tmp) / "init"), tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def trainer_accumulation_gaps(tmp_path, **settings):
    """``(exact, approx)``: the largest parameter difference, after 3 SGD steps of ``robalign
    train`` with ``settings``, between 2 micro-batches of 4 and 1 batch of 8 — with the exact
    accumulator, and with the per-micro-batch approximation (``exact_dro=False``)."""
    from safetensors.torch import load_file

    from robalign.app.training.config import TrainSettings
    from robalign.app.commands.train import run_training

    def params(name, **kw):
        run_training(TrainSettings(out=str(tmp_path / name), max_steps=3, save_steps=100, optim="sgd", lr=0.5,
                                   shuffle=False, **settings, **kw), log=lambda *_: None)
        return load_file(str(tmp_path / name / "final" / "model.safetensors"))

    full = params("full", batch_size=8, grad_accum=1)
    gap = lambda other: max((other[k] - full[k]).abs().max().item() for k in full)     # noqa: E731
    return gap(params("acc", batch_size=4, grad_accum=2)), gap(params("approx", batch_size=4, grad_accum=2,
                                                                        exact_dro=False))
