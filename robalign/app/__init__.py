"""Layer 3 — the application: what takes a user from a JSONL file to a trained policy.

    ratio/          the classifier stage (``robalign weigh``): P(target | response) and the weights
    data/           preference files → tokenised groups → group-major batches; the embedded toy data
    training/       DoRATrainer and the TRL drop-ins, the configuration and its settings, launches
    evaluation/     reward accuracy on a file; what the policy writes (samples, win rates, KL)
    commands/       the ``robalign`` command: weigh, train, eval, demo, bench
    assets/         the embedded tiny Llama's config

Modules here import transformers, scikit-learn and friends lazily or at their top; nothing in
the lower layers imports them.
"""
