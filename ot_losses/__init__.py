"""ot_losses: log-domain optimal-transport solvers and the cross-modal losses built on them."""
from .results import MultiAssignmentResult, PartialOTResult, SinkhornResult
from .solvers.multi_assignment import multi_assignment_sinkhorn
from .solvers.partial import partial_ot
from .solvers.sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = sorted([
    "MultiAssignmentResult",
    "PartialOTResult",
    "SinkhornResult",
    "multi_assignment_sinkhorn",
    "partial_ot",
    "sinkhorn",
])
