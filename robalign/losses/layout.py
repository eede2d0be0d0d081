"""Row orders of a batch of pairs. robalign is group-major — the K candidates of a sample are
consecutive rows (pairs: chosen, rejected, chosen, rejected, ...) — while TRL and Liger-Kernel
stack all chosen rows first, then all rejected rows. These two functions convert any per-row
tensor (``[2B, ...]``: logits, hidden states, labels, log-probs) between the two, as views where
they can be. ``ld_split`` splits a group-major batch's labels at each group's shortest response
and ``ld_logps`` forms LD-DPO's log-probs from the two parts — the one LD-DPO of ``DoRALoss`` and of
the trainer's model passes."""

from __future__ import annotations

import torch

from .. import _validation as V

__all__ = ["pairs_to_group_major", "pairs_to_chosen_first", "ld_split", "ld_logps"]


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


def ld_split(labels: torch.Tensor, ignore_index: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's two label sets ``(shared, tail)`` of ``[S, T]`` group-major ``labels`` (K =
    ``k`` rows a group): the scored tokens up to the shortest response of each group (by rank
    among the row's scored tokens), and the rest; other positions ``ignore_index``."""
    scored = labels != ignore_index
    rank = scored.cumsum(-1)
    n = scored.sum(-1).view(-1, k)
    shared = n.min(-1, keepdim=True).values.expand(-1, k).reshape(-1, 1)
    return (labels.masked_fill(~(scored & (rank <= shared)), ignore_index),
            labels.masked_fill(~(scored & (rank > shared)), ignore_index))


def ld_logps(logps_of, labels: torch.Tensor, alpha: float, k: int, ignore_index: int = -100):
    """LD-DPO's per-sequence log-probs ``logp_shared + α·logp_tail`` (Liu et al. 2024) and the
    scored tokens ``[S]``: ``logps_of(part)`` gives ``(logps [S], counts [S])`` of one label set of
    :func:`ld_split` — two passes of whichever log-prob op the caller runs, on one forward."""
    shared, tail = ld_split(labels, ignore_index, k)
    return logps_of(shared)[0] + alpha * logps_of(tail)[0], (labels != ignore_index).sum(-1)
