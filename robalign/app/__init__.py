"""Layer 3 — the application: what takes a user from a JSONL file to a trained policy.

    ratio/          the classifier stage (``robalign weigh``)
    data.py         preference files → tokenised groups → group-major batches
    trainer.py      DoRATrainer, a transformers Trainer
    train.py        ``robalign train``: settings, model loading, the run
    checkpoints.py  checks of model, checkpoint and cache files before they load
    toy.py, demo.py the embedded default and ``robalign demo``
    cli.py          the ``robalign`` command

Modules here import transformers, scikit-learn and friends lazily or at their top; nothing in
the lower layers imports them.
"""
