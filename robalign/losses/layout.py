"""Row orders of a batch of pairs. robalign is group-major — the K candidates of a sample are
consecutive rows (pairs: chosen, rejected, chosen, rejected, ...) — while TRL and Liger-Kernel
stack all chosen rows first, then all rejected rows. These two functions convert any per-row
tensor (``[2B, ...]``: logits, hidden states, labels, log-probs) between the two, as views where
they can be."""

from __future__ import annotations

import torch

from .. import _validation as V

__all__ = ["pairs_to_group_major", "pairs_to_chosen_first"]


def _check(where, x):
    V.check_tensor(where, "x", x)
    if x.dim() == 0 or x.shape[0] % 2:
        V.fail(where, f"`x` must have an even number of rows (chosen and rejected), got shape {tuple(x.shape)}")


def pairs_to_group_major(x: torch.Tensor) -> torch.Tensor:
    """``[c_1, …, c_B, r_1, …, r_B]`` (TRL, Liger) → ``[c_1, r_1, …, c_B, r_B]`` (robalign), along dim 0."""
    _check("robalign.pairs_to_group_major", x)
    return x.reshape(2, x.shape[0] // 2, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def pairs_to_chosen_first(x: torch.Tensor) -> torch.Tensor:
    """``[c_1, r_1, …, c_B, r_B]`` (robalign) → ``[c_1, …, c_B, r_1, …, r_B]`` (TRL, Liger), along dim 0."""
    _check("robalign.pairs_to_chosen_first", x)
    return x.reshape(x.shape[0] // 2, 2, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
