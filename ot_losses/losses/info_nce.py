"""Symmetric InfoNCE (CLIP-style) between two batches of paired embeddings (docs/methods.md, InfoNCE)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _distributed as D
from .. import _validate as V
from ._common import Scalar, loss_dtype, no_autocast, reduce

__all__ = ["InfoNCEDetails", "InfoNCELoss", "info_nce_loss"]

Reduction = Literal["mean", "sum", "none"]


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
    logits: Tensor
    accuracy_ab: float
    accuracy_ba: float


@overload
def info_nce_loss(z_a: Tensor, z_b: Tensor, *, temperature: Scalar = ..., normalize: bool = ...,
                  reduction: Reduction = ..., process_group: Optional[Any] = ...,
                  return_details: Literal[False] = ...) -> Tensor: ...


@overload
def info_nce_loss(z_a: Tensor, z_b: Tensor, *, temperature: Scalar = ..., normalize: bool = ...,
                  reduction: Reduction = ..., process_group: Optional[Any] = ...,
                  return_details: Literal[True]) -> Tuple[Tensor, InfoNCEDetails]: ...


@overload
def info_nce_loss(z_a: Tensor, z_b: Tensor, *, temperature: Scalar = ..., normalize: bool = ...,
                  reduction: Reduction = ..., process_group: Optional[Any] = ...,
                  return_details: bool = ...) -> Union[Tensor, Tuple[Tensor, InfoNCEDetails]]: ...


def info_nce_loss(z_a: Tensor, z_b: Tensor, *, temperature: Scalar = 0.07, normalize: bool = True,
                  reduction: Reduction = "mean", process_group: Optional[Any] = None,
                  return_details: bool = False) -> Union[Tensor, Tuple[Tensor, InfoNCEDetails]]:
    """Symmetric InfoNCE: the mean of the a->b and b->a cross-entropies of paired rows.

    ``L = 1/2 [ -1/N sum_i log softmax_j(s_ij / T)[i] - 1/N sum_j log softmax_i(s_ij / T)[j] ]``
    with ``s = z_a z_b^T`` (cosines when ``normalize=True``).

    Args:
        z_a: (N, D) floating tensor, embeddings of modality a.
        z_b: (N, D) floating tensor, embeddings of modality b; row i pairs with ``z_a[i]``.
        temperature: positive real ``T`` (float, numpy scalar or 0-dim tensor).
        normalize: L2-normalise the rows of ``z_a`` and ``z_b`` first.
        reduction: ``"mean"`` (the loss above), ``"sum"``, or ``"none"``: the (N,)
            per-pair losses ``1/2 [CE_a->b(i) + CE_b->a(i)]``, e.g. to feed
            :func:`ot_losses.losses.split_clean_noisy`.
        process_group: a ``torch.distributed`` group over which the batch is
            split (each rank passes its local pairs): the negatives of a row
            are the whole global batch (gathered with gradient), and the loss
            averages this rank's rows, so DDP with equal local batches trains
            exactly as one process on the whole batch. None: local batch only.
        return_details: also return an :class:`InfoNCEDetails`.

    Returns:
        Scalar tensor, or (N,) with ``reduction="none"`` (fp32, or fp64 for fp64
        inputs); with ``return_details``, ``(loss, details)``. Under autocast the
        logits are upcast to fp32 before the log-softmax.

    Raises:
        TypeError / ValueError: non-floating or mismatched inputs, NaN or infinite
            embeddings (naming ``z_a`` or ``z_b``), ``temperature <= 0``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> z = torch.eye(4)
        >>> round(info_nce_loss(z, z, temperature=1.0).item(), 4)
        0.7437
        >>> info_nce_loss(z, z, temperature=1.0, reduction="none").shape
        torch.Size([4])

    Reference: van den Oord et al. (2018), CLIP (Radford et al., 2021).
    """
    V.check_pair(z_a, z_b)
    V.check_devices(z_a, "z_a", (z_b, "z_b"))
    temperature = V.check_positive_scalar(temperature, "temperature")
    V.check_reduction(reduction)
    V.check_finite_inputs((z_a, "z_a"), (z_b, "z_b"))
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
        per_pair = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                          + F.cross_entropy(logits_ba, labels, reduction="none"))
        loss = reduce(per_pair, reduction)
    if not return_details:
        return loss
    with torch.no_grad():
        acc_ab = (logits.argmax(dim=1) == labels).to(dtype).mean().item()
        acc_ba = (logits_ba.argmax(dim=1) == labels).to(dtype).mean().item()
    return loss, InfoNCEDetails(logits=logits.detach(), accuracy_ab=acc_ab, accuracy_ba=acc_ba)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss` (no learnable parts).

    Args:
        temperature, normalize, reduction, process_group: as in :func:`info_nce_loss`.

    Example:
        >>> import torch
        >>> InfoNCELoss(temperature=0.1)
        InfoNCELoss(temperature=0.1, normalize=True, reduction='mean')
        >>> InfoNCELoss(temperature=0.1)(torch.randn(8, 4), torch.randn(8, 4)).shape
        torch.Size([])
    """

    def __init__(self, *, temperature: Scalar = 0.07, normalize: bool = True, reduction: Reduction = "mean",
                 process_group: Optional[Any] = None):
        super().__init__()
        self.process_group = D.loss_group(process_group)
        self.temperature = V.check_positive_scalar(temperature, "temperature")
        self.normalize = V.check_flag(normalize, "normalize")
        V.check_reduction(reduction)
        self.reduction = reduction

    def forward(self, z_a: Tensor, z_b: Tensor,
                return_details: bool = False) -> Union[Tensor, Tuple[Tensor, InfoNCEDetails]]:
        """Loss for one batch of pairs ``z_a``, ``z_b`` (N, D); see :func:`info_nce_loss`."""
        return info_nce_loss(z_a, z_b, temperature=self.temperature, normalize=self.normalize,
                             reduction=self.reduction, process_group=self.process_group,
                             return_details=return_details)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"
