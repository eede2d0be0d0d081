"""What Liger's test utilities import from ``liger_kernel.utils``."""

import torch


def infer_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
