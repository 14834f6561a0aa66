"""Precision rules and small helpers shared by the losses: OT and log-softmax never run in low precision."""
from __future__ import annotations

from typing import Optional, SupportsFloat

import torch
from torch import Tensor

# eps-like arguments: Python or numpy scalars and 0-dim tensors (see _validate.as_real)
Scalar = SupportsFloat


def loss_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    """fp64 stays fp64; everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def no_autocast(device: torch.device) -> torch.autocast:
    """Context that turns autocast off on ``device`` (OT and log-softmax run in fp32/fp64)."""
    return torch.autocast(device_type=device.type, enabled=False)


def reduce(per_item: Tensor, reduction: str) -> Tensor:
    """``"mean"``, ``"sum"`` or ``"none"`` over a (N,) tensor of per-pair losses."""
    if reduction == "none":
        return per_item
    return per_item.sum() if reduction == "sum" else per_item.mean()
