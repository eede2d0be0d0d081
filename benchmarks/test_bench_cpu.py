"""pytest-benchmark suite for CPU regression tracking (not part of `make test`):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only

Forward+backward of the logits path at N = 1024 tokens, V = 32000, float32, per provider.
For the ratio table with memory, run benchmarks/cpu_logits.py.
"""

import pytest
import torch

import robalign
from cpu_logits import naive_logps

N, V, T = 1024, 32000, 512


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    logits = torch.randn(N // T, T, V)
    labels = torch.randint(V, (N // T, T))
    labels[:, :64] = -100
    return logits, labels, torch.randn(N // T)


def _fwd_bwd(fn, logits, labels, coeff):
    z = logits.detach().requires_grad_(True)
    return torch.autograd.grad((fn(z, labels) * coeff).sum(), z)[0]


@pytest.mark.parametrize("provider", ["naive", "cpp", "torch", "reference"])
def test_logits_fwd_bwd(benchmark, batch, provider):
    fns = {
        "naive": naive_logps,
        "cpp": lambda z, y: robalign.sequence_logps(z, y, backend="cpp")[0],
        "torch": lambda z, y: robalign.sequence_logps(z, y, backend="torch")[0],
        "reference": lambda z, y: robalign.sequence_logps(z, y, backend="reference")[0],
    }
    grad = benchmark(_fwd_bwd, fns[provider], *batch)
    assert torch.isfinite(grad).all()
