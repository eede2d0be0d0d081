"""Layer 2 — the losses, on vectors of per-sequence log-probabilities (no kernels here):

    objectives.py   base preference objectives ℓ_i (DPO, IPO, Plackett–Luce, RRHF, LIRE, ...)
    weights.py      DoRA's density-ratio weights w_i from classifier probabilities
    dro.py          the KL-DRO reduction, exact across ranks and micro-batches
    loss.py         DoRALoss: log-probs → ℓ, w → the reduced loss

Imports the ops layer (for DoRALoss's log-probs), never the application.
"""
