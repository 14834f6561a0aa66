"""Cross-modal losses built on the solvers (docs/methods.md sections 1-5): pure functions + thin modules."""
from .info_nce import InfoNCEDetails, InfoNCELoss, info_nce_loss
from .l2rm import L2RMCost, L2RMDetails, L2RMLoss, l2rm_loss, split_clean_noisy
from .multi_sk import MultiSKDetails, MultiSKLoss, multi_sk_loss, multi_sk_targets
from .swamp import SwAMPDetails, SwAMPLoss, swamp_loss, swav_targets

__all__ = [
    "InfoNCEDetails",
    "InfoNCELoss",
    "L2RMCost",
    "L2RMDetails",
    "L2RMLoss",
    "MultiSKDetails",
    "MultiSKLoss",
    "SwAMPDetails",
    "SwAMPLoss",
    "info_nce_loss",
    "l2rm_loss",
    "multi_sk_loss",
    "multi_sk_targets",
    "split_clean_noisy",
    "swamp_loss",
    "swav_targets",
]
