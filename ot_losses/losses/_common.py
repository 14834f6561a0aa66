"""Precision rules shared by the losses: OT and log-softmax never run in low precision."""
import torch


def loss_dtype(*xs):
    """fp64 stays fp64; everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def no_autocast(device):
    """Context that turns autocast off on ``device`` (OT and log-softmax run in fp32/fp64)."""
    return torch.autocast(device_type=device.type, enabled=False)
