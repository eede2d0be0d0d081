"""robalign.app.training — training a policy with the DoRA loss.

    config.py       the one configuration (DoRAConfig, TrainSettings), its checks and its loss builder
    settings.py     a setting written once: its field gives the YAML key, check, flag and docs row
    trainer.py      DoRATrainer, a transformers Trainer: the training loop
    causal_lm.py    the Hugging Face model's passes: hidden states, the fused head, log-probs, one-pass loss
    trl.py          DoRADPOTrainer & co.: DoRA in a TRL script, public as ``robalign.trl``
    launch.py       distributed launches: refusing silent fallbacks, what ran, DeepSpeed's one-time build
    checkpoints.py  checks of model, checkpoint and cache files before they load
"""
