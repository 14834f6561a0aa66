"""Type aliases of the solvers' public signatures."""
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from ..features import FeatureCost

# A dense (N, M) / (B, N, M) cost, or a cost computed from features.
CostLike = Union[torch.Tensor, "FeatureCost"]
# eps-like numbers: Python or numpy scalars, or 0-dim tensors.
Scalar = Union[float, torch.Tensor]
