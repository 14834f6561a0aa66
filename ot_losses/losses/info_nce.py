"""Symmetric InfoNCE (CLIP-style) between two batches of paired embeddings.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _distributed as D
from .. import _validate as V
from ._common import loss_dtype, no_autocast

__all__ = ["InfoNCEDetails", "info_nce_loss"]


# ----------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class InfoNCEDetails:
    """Diagnostics of :func:`info_nce_loss`.

    Attributes:
        logits: (N, N) ``z_a z_b^T / temperature`` (detached); with a process_group,
            this rank's rows against the global batch.
        accuracy_ab: fraction of rows whose argmax is the paired column (a -> b).
        accuracy_ba: same for b -> a.
    """
    logits: torch.Tensor
    accuracy_ab: float
    accuracy_ba: float


def info_nce_loss(z_a, z_b, *, temperature=0.07, normalize=True, process_group=None, return_details=False):
    """Symmetric InfoNCE: the mean of the a->b and b->a cross-entropies of paired rows.

    ``L = 1/2 [ -1/N sum_i log softmax_j(s_ij / T)[i] - 1/N sum_j log softmax_i(s_ij / T)[j] ]``
    with ``s = z_a z_b^T`` (cosines when ``normalize=True``).

    Args:
        z_a: (N, D) floating tensor, embeddings of modality a.
        z_b: (N, D) floating tensor, embeddings of modality b; row i pairs with ``z_a[i]``.
        temperature: positive float, softmax temperature ``T``.
        normalize: L2-normalise the rows of ``z_a`` and ``z_b`` first.
        process_group: a ``torch.distributed`` group over which the batch is
            split (each rank passes its local pairs): the negatives of a row
            are the whole global batch (gathered with gradient), and the loss
            averages this rank's rows, so DDP with equal local batches trains
            exactly as one process on the whole batch. None: local batch only.
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
    V.check_pair(z_a, z_b)
    V.check_devices(z_a, "z_a", (z_b, "z_b"))
    V.check_positive(temperature, "temperature")
    D.loss_group(process_group)
    if normalize:
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    dtype = loss_dtype(z_a, z_b)
    if process_group is None:
        logits = (z_a @ z_b.T).to(dtype) / temperature
        logits_ba, offset = logits.T, 0
    else:  # local rows against the global batch, both directions
        all_b, offset = D.gather_rows(z_b, process_group)
        all_a, _ = D.gather_rows(z_a, process_group)
        logits = (z_a @ all_b.T).to(dtype) / temperature
        logits_ba = (z_b @ all_a.T).to(dtype) / temperature
    with no_autocast(logits.device):
        labels = offset + torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits_ba, labels))
    if not return_details:
        return loss
    with torch.no_grad():
        acc_ab = (logits.argmax(dim=1) == labels).to(dtype).mean().item()
        acc_ba = (logits_ba.argmax(dim=1) == labels).to(dtype).mean().item()
    return loss, InfoNCEDetails(logits=logits.detach(), accuracy_ab=acc_ab, accuracy_ba=acc_ba)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss` (no learnable parts)."""

    def __init__(self, *, temperature=0.07, normalize=True, process_group=None):
        super().__init__()
        V.check_positive(temperature, "temperature")
        self.temperature = temperature
        self.normalize = normalize
        self.process_group = D.loss_group(process_group)

    def forward(self, z_a, z_b, return_details=False):
        return info_nce_loss(z_a, z_b, temperature=self.temperature, normalize=self.normalize,
                             process_group=self.process_group, return_details=return_details)
