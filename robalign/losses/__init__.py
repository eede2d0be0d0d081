"""Layer 2 — the losses, on vectors of per-sequence log-probabilities (no kernels here):

    objectives.py   base preference objectives ℓ_i (DPO, IPO, Plackett–Luce, RRHF, LIRE, ...)
    weights.py      DoRA's density-ratio weights w_i from classifier probabilities
    dro.py          the KL-DRO reduction, exact across ranks and micro-batches
    reductions.py   the reduction protocol (KLDRO, and any other ambiguity set)
    ambiguity.py    the KL ball, χ² ball and CVaR solved per batch (value, maximising q, dual)
    groups.py       group DRO's per-group sums and exponentiated-gradient step
    loss.py         DoRALoss: log-probs → ℓ, w → the reduced loss
    layout.py       row orders of a batch of pairs (TRL's chosen-first ↔ group-major)

Imports the ops layer (for DoRALoss's log-probs), never the application.
"""
