import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_batch(num_seqs, seqlen, vocab, *, dtype=torch.float64, hole_rate=0.3, all_ignored=(), seed=0):
    """Padded logits/labels with random ignore_index holes and some all-ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_seqs, seqlen, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(vocab, (num_seqs, seqlen), generator=gen)
    labels[torch.rand(num_seqs, seqlen, generator=gen) < hole_rate] = -100
    for row in all_ignored:
        labels[row] = -100
    return logits, labels


def packed_from_padded(logits, labels, lengths):
    """Concatenate the first lengths[s] tokens of every row: [N, V], [N], cu_seqlens."""
    parts_z = [logits[s, :n] for s, n in enumerate(lengths)]
    parts_y = [labels[s, :n] for s, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.cat(parts_z), torch.cat(parts_y), cu
