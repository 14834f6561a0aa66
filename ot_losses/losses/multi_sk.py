"""Multi-SK: structure-preserving anchor consistency (Swetha et al., ICCV 2023), METHODS.md section 4.

Each sample is softly assigned to k of K anchors by capacitated
multi-assignment OT (our 2-D equivalent of the official layered
multi-Sinkhorn-Knopp); the row min-max normalised assignment of one space is
the BCE target of the scores in another space.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..solvers.multi_assignment import multi_assignment_sinkhorn
from .. import _distributed as D
from .. import _validate as V
from ._common import loss_dtype, no_autocast
from .info_nce import info_nce_loss

__all__ = ["MultiSKDetails", "MultiSKLoss", "multi_sk_loss", "multi_sk_targets"]

_SCORE_SCALE = 0.75  # 1 - 0.25: the official bottom-layer weight folds into the cost (METHODS 4.2)


@dataclass(frozen=True)
class MultiSKDetails:
    """Diagnostics of :func:`multi_sk_loss` (or, in ``MultiSKLoss``, one per term).

    Attributes:
        target: (N, K) min-max normalised targets (no grad).
        assignment: (N, K) raw multi-assignment of the batch rows (rows sum to k).
        marginal_error: the solver's L1 marginal error.
        n_iters: solver iterations run.
    """
    target: torch.Tensor
    assignment: torch.Tensor
    marginal_error: float
    n_iters: int


def _rowwise_minmax(x):
    """Per-row min-max scaling to [0, 1]; a constant row keeps its raw values (no 0/0)."""
    lo = x.min(dim=-1, keepdim=True).values
    span = x.max(dim=-1, keepdim=True).values - lo
    flat = span <= torch.finfo(x.dtype).eps * x.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.where(flat, x, (x - lo) / torch.where(flat, torch.ones_like(span), span))


def multi_sk_targets(target, *, k=None, eps=0.07, n_iters=20, queue=None, backend="auto", process_group=None):
    """Soft multi-assignment targets of the last N rows, no gradient.

    ``X = multi_assignment_sinkhorn(-0.75 * [queue; target], k, eps=eps, n_iters=n_iters).assignment``
    (rows sum to k, columns to ``k (Q + N) / K``, entries in [0, 1]); the last N
    rows are min-max normalised per row (constant rows are left as they are).

    Args:
        target: (N, K) floating scores against K anchors (detached inside), or
            (B, N, K) for B independent problems solved in one batched call.
        k: assignments per row, ``1 <= k < K``; default ``int(K * 0.5)``.
        eps: positive float, entropic regularisation in cost units.
        n_iters: solver iterations (official: 20).
        queue: optional (Q, K) (or (B, Q, K)) past scores against the same anchors, prepended.
        backend: solver backend passed to :func:`ot_losses.multi_assignment_sinkhorn`.
        process_group: a ``torch.distributed`` group across which the rows
            (``target`` and ``queue``: this rank's) are split; the column
            capacities then hold over the global batch. None: one process.

    Returns:
        ``(targets, assignment, result)``: (…, N, K), (…, N, K) and the solver result.
    """
    n_anchors = target.shape[-1]
    if k is None:
        k = int(n_anchors * 0.5)
    with torch.no_grad(), no_autocast(target.device):
        dtype = loss_dtype(target, queue)
        s = target.detach().to(dtype)
        if queue is not None and queue.shape[0] > 0:
            s = torch.cat([queue.detach().to(dtype), s], dim=-2)
        res = multi_assignment_sinkhorn(-_SCORE_SCALE * s, k, eps=eps, n_iters=n_iters, grad="none",
                                        backend=backend, process_group=process_group,
                                        shard_dim=None if process_group is None else -2)
        x = res.assignment[..., -target.shape[-2]:, :].to(dtype)
        return _rowwise_minmax(x), x, res


def _bce_exp_logits(pred, target, temperature):
    """``mean BCEWithLogits(exp(pred / T), target)`` in the stable form ``(1 - t) z + softplus(-z)``.

    Equal to ``softplus(z) - t z`` for ``z = exp(pred / T) > 0`` without forming
    ``softplus(z)`` (no overflow of the BCE for large z).
    """
    z = torch.exp(pred / temperature)
    return ((1 - target) * z + F.softplus(-z)).mean()


def multi_sk_loss(pred, target, *, k=None, eps=0.07, n_iters=20, temperature=0.1, queue=None,
                  backend="auto", process_group=None, return_details=False):
    """Multi-SK consistency: BCE of ``exp(pred / T)`` against the multi-assignment of ``target``.

    ``L = mean_{i,j} BCEWithLogits(exp(pred_ij / T), Y_ij)``,
    ``Y = minmax_rows(multi_assignment(-0.75 * target, k))`` (no gradient).

    Args:
        pred: (N, K) floating scores (with grad) of one space against its anchors.
        target: (N, K) floating scores whose multi-assignment is the soft target.
        k: assignments per row, ``1 <= k < K``; default ``int(K * 0.5)`` (official 32 of 64).
        eps: positive float, entropic regularisation (official 0.07).
        n_iters: solver iterations (official 20).
        temperature: positive float ``T`` of the logits ``exp(pred / T)`` (official 0.1).
        queue: optional (Q, K) past target scores against the same anchors.
        backend: solver backend passed to :func:`ot_losses.multi_assignment_sinkhorn`.
        process_group: a ``torch.distributed`` group across which the batch is
            split (``pred``, ``target``, ``queue``: this rank's rows): targets
            from the global batch, loss averaged over this rank's rows, so
            DDP with equal local batches equals one process on the whole batch.
        return_details: also return a :class:`MultiSKDetails`.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 inputs); with ``return_details``, ``(loss, details)``.
        Under autocast ``pred`` is upcast to fp32 before the exponential.

    Raises:
        TypeError / ValueError: non-floating or mismatched shapes (``pred`` vs ``target``,
            ``queue`` columns), devices, non-positive ``temperature``; the solver raises
            for ``k`` or ``eps`` out of range.

    Example:
        >>> import torch
        >>> pred, target = torch.rand(8, 6, requires_grad=True), torch.rand(8, 6)
        >>> multi_sk_loss(pred, target, backend="torch").backward()

    Reference: Swetha et al., "Preserving Modality Structure Improves Multi-Modal
    Learning" (ICCV 2023).
    """
    V.check_matrix(pred, "pred", cols_desc="K")
    V.check_matrix(target, "target", cols_desc="K")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape (N, K); got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")
    if queue is not None:
        V.check_matrix(queue, "queue", cols=pred.shape[1], cols_desc="K")
    V.check_devices(pred, "pred", (target, "target"), (queue, "queue"))
    V.check_positive(temperature, "temperature")
    D.loss_group(process_group)
    y, x, res = multi_sk_targets(target, k=k, eps=eps, n_iters=n_iters, queue=queue, backend=backend,
                                 process_group=process_group)
    dtype = loss_dtype(pred, target)
    with no_autocast(pred.device):
        loss = _bce_exp_logits(pred.to(dtype), y.to(dtype), temperature)
    if not return_details:
        return loss
    return loss, MultiSKDetails(target=y, assignment=x, marginal_error=float(res.marginal_error.max()),
                                n_iters=int(res.n_iters))


@dataclass(frozen=True)
class MultiSKModuleDetails:
    """Per-term diagnostics of :class:`MultiSKLoss` (keys like ``"in_a<-joint_b"``)."""
    terms: dict = field(default_factory=dict)
    active: bool = True


class MultiSKLoss(nn.Module):
    """Input- and joint-space anchors of two modalities a, b and the sum of Multi-SK terms.

    With input-space scores ``s_in^X = x_X . A_in^X`` and joint-space scores
    ``s_tr^{Y->X} = z_Y . A_joint^X`` (all L2-normalised), the terms are the two-modality
    version of the official 18 (METHODS.md 4.3), all weighted 1:
    ``pred s_in^X, target s_tr^{Y->X}`` and ``pred s_tr^{X->Y}, target s_in^Y`` for X, Y in {a, b}.
    The loss is their mean (the official code sums weighted terms; with equal weights
    a mean only rescales ``beta_loss``). Each target space keeps a FIFO queue of its
    past (normalised) features; with ``queue_size > 0`` the loss is 0 until the queue
    has been filled once (official behaviour).

    Args:
        dims: ``(dim_a, dim_b, dim_joint)``: input feature dims of a and b and the joint
            embedding dim (an int means all three equal).
        n_anchors: anchors K per modality and space (official 64).
        queue_size: rows kept per queue (official 5500; 0 for none).
        k, eps, n_iters, temperature, backend: as in :func:`multi_sk_loss`.
        info_nce_weight: weight of an added :func:`info_nce_loss` on the joint embeddings.
        info_nce_temperature: its temperature (official NormSoftmax: 0.05).
        process_group: ``torch.distributed`` group for data-parallel training
            (see :func:`multi_sk_loss`). The queues then hold the gathered
            global batches (identical on every rank, ``queue_size`` counts
            global rows), each rank feeding its share to the OT problem. Keep
            the module inside the ``DistributedDataParallel`` wrapper with the
            encoders; in training mode it warns if its anchors differ across ranks.

    Example:
        >>> import torch
        >>> loss_fn = MultiSKLoss((5, 7, 4), n_anchors=6, queue_size=0, backend="torch")
        >>> loss = loss_fn(torch.randn(8, 5), torch.randn(8, 7), torch.randn(8, 4), torch.randn(8, 4))
        >>> loss.backward()
    """

    def __init__(self, dims, n_anchors=64, *, queue_size=5500, k=None, eps=0.07, n_iters=20,
                 temperature=0.1, info_nce_weight=0.0, info_nce_temperature=0.05, backend="auto",
                 process_group=None):
        super().__init__()
        self.process_group = D.loss_group(process_group)
        if isinstance(dims, int):
            dims = (dims, dims, dims)
        dims_ok = isinstance(dims, (tuple, list)) and len(dims) == 3
        if not (dims_ok and all(isinstance(d, int) and d >= 1 for d in dims)):
            raise ValueError(f"dims must be (dim_a, dim_b, dim_joint) positive ints or one int; got {dims!r}")
        V.check_count(n_anchors, "n_anchors", 2)
        V.check_count(queue_size, "queue_size", 0)
        V.check_positive(temperature, "temperature")
        V.check_weight(info_nce_weight, "info_nce_weight")
        self.dims = tuple(dims)
        dim_a, dim_b, dim_j = self.dims
        # official ClusterAssignments: Linear weight rows, N(0, 1) init, normalised at use
        self.anchors_in_a = nn.Parameter(torch.randn(n_anchors, dim_a))
        self.anchors_in_b = nn.Parameter(torch.randn(n_anchors, dim_b))
        self.anchors_joint_a = nn.Parameter(torch.randn(n_anchors, dim_j))
        self.anchors_joint_b = nn.Parameter(torch.randn(n_anchors, dim_j))
        self.k, self.eps, self.n_iters, self.temperature, self.backend = k, eps, n_iters, temperature, backend
        self.info_nce_weight, self.info_nce_temperature = info_nce_weight, info_nce_temperature
        self.queue_size = queue_size
        for name, d in (("x_a", dim_a), ("x_b", dim_b), ("z_a", dim_j), ("z_b", dim_j)):
            self.register_buffer(f"queue_{name}", torch.zeros(queue_size, d))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def forward(self, x_a, x_b, z_a, z_b, return_details=False):
        """Sum of consistency terms for one batch.

        Args:
            x_a: (N, dim_a) input-space (pooled, modality-specific) features of a.
            x_b: (N, dim_b) input-space features of b.
            z_a, z_b: (N, dim_joint) joint-space embeddings of a and b.
        """
        names = ("x_a", "x_b", "z_a", "z_b")
        feats = (x_a, x_b, z_a, z_b)
        for f, name, d in zip(feats, names, (self.dims[0], self.dims[1], self.dims[2], self.dims[2])):
            V.check_matrix(f, name, cols=d, cols_desc="D")
        n = x_a.shape[0]
        for f, name in zip(feats[1:], names[1:]):
            if f.shape[0] != n:
                raise ValueError(f"{name} must have N={n} rows like x_a; got {tuple(f.shape)}")
        V.check_devices(x_a, "x_a", *zip(feats[1:], names[1:]))
        group = self.process_group
        if self.training:
            D.warn_if_diverged(self, group)
        feats = {nm: F.normalize(f, dim=1) for nm, f in zip(names, feats)}
        anchors = {"in_a": F.normalize(self.anchors_in_a, dim=1),
                   "in_b": F.normalize(self.anchors_in_b, dim=1),
                   "joint_a": F.normalize(self.anchors_joint_a, dim=1),
                   "joint_b": F.normalize(self.anchors_joint_b, dim=1)}
        # (pred features, pred anchors, target features, target anchors) per term
        terms = []
        for m in ("a", "b"):
            for j in ("a", "b"):
                terms.append((f"in_{m}<-joint_{m}[z_{j}]", f"x_{m}", f"in_{m}", f"z_{j}", f"joint_{m}"))
                terms.append((f"joint_{j}[z_{m}]<-in_{j}", f"z_{m}", f"joint_{j}", f"x_{j}", f"in_{j}"))
        active = self.queue_size == 0 or int(self.queue_count) >= self.queue_size
        # A zero that still reaches the anchors and every input, so backward() works before the
        # queue is full, and DistributedDataParallel sees a gradient for every parameter each step.
        reach = sum(a.sum() for a in anchors.values()) + sum(f.sum() for f in feats.values())
        total = 0.0 * reach.to(loss_dtype(*feats.values()))
        details = {}
        if active:
            # all terms share (N [+ Q], K): one batched multi-assignment solve instead of len(terms)
            with torch.no_grad():
                targets, queues = [], []
                for _, _, _, tf, ta in terms:
                    targets.append(feats[tf].detach() @ anchors[ta].detach().T)
                    if self.queue_size > 0:  # with a group: this rank's share of the (global) queue
                        part = slice(None) if group is None else D.rank_slice(self.queue_size, group)
                        past = F.normalize(getattr(self, f"queue_{tf}")[part], dim=1).to(targets[-1].dtype)
                        queues.append(past @ anchors[ta].detach().T)
                queue = torch.stack(queues) if queues else None
                y, x, res = multi_sk_targets(torch.stack(targets), k=self.k, eps=self.eps,
                                             n_iters=self.n_iters, queue=queue, backend=self.backend,
                                             process_group=group)
            for t, (key, pf, pa, _, _) in enumerate(terms):
                pred = feats[pf] @ anchors[pa].T
                dtype = loss_dtype(pred)
                with no_autocast(pred.device):
                    out = _bce_exp_logits(pred.to(dtype), y[t].to(dtype), self.temperature)
                if return_details:
                    details[key] = MultiSKDetails(target=y[t], assignment=x[t],
                                                  marginal_error=float(res.marginal_error[t]),
                                                  n_iters=int(res.n_iters))
                total = total + out / len(terms)
        if self.queue_size > 0 and self.training:
            self._push(feats)
        if self.info_nce_weight > 0:
            nce = info_nce_loss(z_a, z_b, temperature=self.info_nce_temperature, process_group=group)
            total = total + self.info_nce_weight * nce
        if return_details:
            return total, MultiSKModuleDetails(terms=details, active=active)
        return total

    @torch.no_grad()
    def _push(self, feats):
        if self.process_group is not None:  # the queues hold the global batches, the same on every rank
            feats = {name: D.gather_rows(f.detach(), self.process_group)[0] for name, f in feats.items()}
        for name, f in feats.items():
            queue = getattr(self, f"queue_{name}")
            f = f.detach().to(queue.dtype)[-self.queue_size:]
            queue.copy_(torch.cat([queue[f.shape[0]:], f], dim=0))
        self.queue_count += next(iter(feats.values())).shape[0]
