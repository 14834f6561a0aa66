"""ot_losses: log-domain optimal-transport solvers and the cross-modal losses built on them.

Solvers: :func:`sinkhorn`, :func:`partial_ot`, :func:`multi_assignment_sinkhorn`.
Losses (pure functions and ``nn.Module`` wrappers): SwAMP, L2RM, Multi-SK and
the InfoNCE baseline. Importing the package never imports triton.
"""
from .losses import (InfoNCELoss, L2RMCost, L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, l2rm_loss,
                     multi_sk_loss, split_clean_noisy, swamp_loss)
from .results import MultiAssignmentResult, PartialOTResult, SinkhornResult
from .solvers.multi_assignment import multi_assignment_sinkhorn
from .solvers.partial import partial_ot
from .solvers.sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = [
    "InfoNCELoss",
    "L2RMCost",
    "L2RMLoss",
    "MultiAssignmentResult",
    "MultiSKLoss",
    "PartialOTResult",
    "SinkhornResult",
    "SwAMPLoss",
    "info_nce_loss",
    "l2rm_loss",
    "multi_assignment_sinkhorn",
    "multi_sk_loss",
    "partial_ot",
    "sinkhorn",
    "split_clean_noisy",
    "swamp_loss",
]
