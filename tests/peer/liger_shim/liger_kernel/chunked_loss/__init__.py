from .dpo_loss import LigerFusedLinearDPOLoss  # noqa: F401
