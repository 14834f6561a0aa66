"""Symmetric InfoNCE (CLIP-style) between two batches of paired embeddings.

Also hosts the small input checks shared by the loss files (they are loss
specific: pairs of embeddings, score matrices, queues), so every loss words
its errors the same way.
"""
import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_positive, check_tensor

__all__ = ["InfoNCEDetails", "info_nce_loss"]


# ----------------------------------------------------------------------------- checks
def _check_matrix(x, name, *, cols=None, cols_desc="D"):
    """``x`` must be a 2-D floating tensor (optionally with ``cols`` columns)."""
    check_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, {cols_desc}); got {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have shape (N, {cols_desc}) with {cols_desc}={cols}; "
                         f"got {tuple(x.shape)}")


def _check_pair(z_a, z_b, names=("z_a", "z_b")):
    """Paired batches: both (N, D), same N and D, same device."""
    _check_matrix(z_a, names[0])
    _check_matrix(z_b, names[1])
    if z_a.shape != z_b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (N, D) (row i of each "
                         f"is a pair); got {names[0]} {tuple(z_a.shape)} and {names[1]} {tuple(z_b.shape)}")
    if z_a.shape[0] < 1:
        raise ValueError(f"{names[0]} must have at least one row; got {tuple(z_a.shape)}")


def _check_device(ref, ref_name, *others):
    """All ``others`` (pairs ``(tensor_or_None, name)``) on ``ref``'s device."""
    for x, name in others:
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}); "
                             f"got {x.device}")


def _check_positive(x, name):
    check_positive(x, name)


def _check_weight(x, name):
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a non-negative real number; got {type(x).__name__}")
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {x}")


def _compute_dtype(*xs):
    """fp64 stays fp64; everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _no_autocast(device):
    """Context that turns autocast off on ``device`` (OT and log-softmax run in fp32/fp64)."""
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class InfoNCEDetails:
    """Diagnostics of :func:`info_nce_loss`.

    Attributes:
        logits: (N, N) ``z_a z_b^T / temperature`` (detached).
        accuracy_ab: fraction of rows whose argmax is the paired column (a -> b).
        accuracy_ba: same for b -> a.
    """
    logits: torch.Tensor
    accuracy_ab: float
    accuracy_ba: float


def info_nce_loss(z_a, z_b, *, temperature=0.07, normalize=True, return_details=False):
    """Symmetric InfoNCE: the mean of the a->b and b->a cross-entropies of paired rows.

    ``L = 1/2 [ -1/N sum_i log softmax_j(s_ij / T)[i] - 1/N sum_j log softmax_i(s_ij / T)[j] ]``
    with ``s = z_a z_b^T`` (cosines when ``normalize=True``).

    Args:
        z_a: (N, D) floating tensor, embeddings of modality a.
        z_b: (N, D) floating tensor, embeddings of modality b; row i pairs with ``z_a[i]``.
        temperature: positive float, softmax temperature ``T``.
        normalize: L2-normalise the rows of ``z_a`` and ``z_b`` first.
        return_details: also return an :class:`InfoNCEDetails`.

    Returns:
        Scalar tensor (fp32, or fp64 for fp64 inputs); with ``return_details``,
        ``(loss, details)``. Under autocast the logits are upcast to fp32 before
        the log-softmax.

    Raises:
        TypeError / ValueError: non-floating or mismatched inputs, ``temperature <= 0``.

    Example:
        >>> import torch
        >>> z = torch.eye(4)
        >>> round(info_nce_loss(z, z, temperature=1.0).item(), 4)
        0.7437

    Reference: van den Oord et al. (2018), CLIP (Radford et al., 2021).
    """
    _check_pair(z_a, z_b)
    _check_device(z_a, "z_a", (z_b, "z_b"))
    _check_positive(temperature, "temperature")
    if normalize:
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    dtype = _compute_dtype(z_a, z_b)
    logits = (z_a @ z_b.T).to(dtype) / temperature
    with _no_autocast(logits.device):
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if not return_details:
        return loss
    with torch.no_grad():
        acc_ab = (logits.argmax(dim=1) == labels).to(dtype).mean().item()
        acc_ba = (logits.argmax(dim=0) == labels).to(dtype).mean().item()
    return loss, InfoNCEDetails(logits=logits.detach(), accuracy_ab=acc_ab, accuracy_ba=acc_ba)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss` (no learnable parts)."""

    def __init__(self, *, temperature=0.07, normalize=True):
        super().__init__()
        _check_positive(temperature, "temperature")
        self.temperature = temperature
        self.normalize = normalize

    def forward(self, z_a, z_b, return_details=False):
        return info_nce_loss(z_a, z_b, temperature=self.temperature, normalize=self.normalize,
                             return_details=return_details)
