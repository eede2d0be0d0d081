"""Layer 3 — the application: what takes a user from a JSONL file to a trained policy.

    ratio/          the classifier stage (``robalign weigh``)
    data.py         preference files → tokenised groups → group-major batches
    trainer.py      DoRATrainer, a transformers Trainer: the training loop
    causal_lm.py    the Hugging Face model's passes: hidden states, the fused head, log-probs, one-pass loss
    settings.py     a setting written once: its field gives the YAML key, check, flag and docs row
    trl.py          DoRADPOTrainer & co.: DoRA in a TRL script, public as ``robalign.trl``
    launch.py       distributed launches: refusing silent fallbacks, what ran, DeepSpeed's one-time build
    config.py       the one configuration (DoRAConfig, TrainSettings) and its checks
    train.py        ``robalign train``: model loading, the run
    evaluate.py     ``robalign eval``: reward accuracy of a run's policy on a file
    checkpoints.py  checks of model, checkpoint and cache files before they load
    toy.py, demo.py the embedded default and ``robalign demo``
    samples.py      what the policy writes: sampling, win rates, KL from samples, bootstrap intervals
    cli.py          the ``robalign`` command

Modules here import transformers, scikit-learn and friends lazily or at their top; nothing in
the lower layers imports them.
"""
