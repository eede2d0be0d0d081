"""DoRA in a TRL script: drop-in replacements for TRL 1.16's trainers and their configs.

    from robalign.trl import DoRADPOConfig, DoRADPOTrainer
    args = DoRADPOConfig(output_dir="out", dora_lam=1.0, dora_weights_column="weight")  # any DPOConfig field too
    trainer = DoRADPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)

``DoRADPOTrainer``/``DoRADPOConfig``, ``DoRAKTOTrainer``/``DoRAKTOConfig``,
``DoRACPOTrainer``/``DoRACPOConfig`` and ``DoRAORPOTrainer``/``DoRAORPOConfig`` take TRL's arguments
and data, and train with robalign's loss (the density-ratio weights of a dataset column and the
DRO reduction, exact across accumulation and ranks) and fused log-probs. The implementation lives
in :mod:`robalign.app.training.trl`; importing this module needs TRL (``pip install 'trl==1.16.0'``, or
``robalign[bench]``). ``robalign.app.trl_trainer``, its path in release 0.1, warns and goes away
in 0.3.
"""

from .app.training.trl import *  # noqa: F401,F403
from .app.training.trl import __all__  # noqa: F401
