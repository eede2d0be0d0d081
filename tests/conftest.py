import os

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
