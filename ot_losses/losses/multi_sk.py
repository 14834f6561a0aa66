"""Multi-SK: structure-preserving anchor consistency (Swetha et al., ICCV 2023), docs/methods.md section 4.

Each sample is softly assigned to k of K anchors by capacitated
multi-assignment OT (our 2-D equivalent of the official layered
multi-Sinkhorn-Knopp); the row min-max normalised assignment of one space is
the BCE target of the scores in another space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _distributed as D
from .. import _validate as V
from .._backend import BACKENDS
from ..results import MultiAssignmentResult
from ..solvers.multi_assignment import multi_assignment_sinkhorn
from ._common import Scalar, loss_dtype, no_autocast
from .info_nce import info_nce_loss

__all__ = ["MultiSKDetails", "MultiSKLoss", "multi_sk_loss", "multi_sk_targets"]

_SCORE_SCALE = 0.75  # 1 - 0.25: the official bottom-layer weight folds into the cost (docs/methods.md 4.2)
_SOFTPLUS_CUT = 30.0  # softplus(-exp(u)) == 0 in fp32 and fp64 for u >= 30: clamp there, no 0 * inf gradient
_LOG_FLOOR = -1e4


@dataclass(frozen=True)
class MultiSKDetails:
    """Diagnostics of :func:`multi_sk_loss` (or, in ``MultiSKLoss``, one per term).

    Attributes:
        target: (N, K) min-max normalised targets (no grad).
        assignment: (N, K) raw multi-assignment of the batch rows (rows sum to k).
        marginal_error: the solver's L1 marginal error.
        n_iters: solver iterations run.
    """
    target: Tensor
    assignment: Tensor
    marginal_error: float
    n_iters: int


def _rowwise_minmax(x: Tensor) -> Tensor:
    """Per-row min-max scaling to [0, 1]; a constant row keeps its raw values (no 0/0)."""
    lo = x.min(dim=-1, keepdim=True).values
    span = x.max(dim=-1, keepdim=True).values - lo
    flat = span <= torch.finfo(x.dtype).eps * x.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.where(flat, x, (x - lo) / torch.where(flat, torch.ones_like(span), span))


def _check_k(k: Optional[int], n_anchors: int) -> int:
    """Assignments per row: an int with ``1 <= k < K``; ``None`` gives the official ``int(K * 0.5)``."""
    if k is None:
        return max(1, int(n_anchors * 0.5))
    return V.check_count(k, "k", 1, n_anchors - 1, f"K - 1 = {n_anchors - 1} (K anchors)")


def multi_sk_targets(target: Tensor, *, k: Optional[int] = None, eps: Scalar = 0.07, n_iters: int = 20,
                     queue: Optional[Tensor] = None, backend: str = "auto",
                     process_group: Optional[Any] = None,
                     _queue_live: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, MultiAssignmentResult]:
    """Soft multi-assignment targets of the last N rows, no gradient.

    ``X = multi_assignment_sinkhorn(-0.75 * [queue; target], k, eps=eps, n_iters=n_iters).assignment``
    (rows sum to k, columns to ``k (Q + N) / K``, entries in [0, 1]); the last N
    rows are min-max normalised per row (constant rows are left as they are).

    Args:
        target: (N, K) floating scores against K anchors (detached inside), or
            (B, N, K) for B independent problems solved in one batched call.
        k: assignments per row, an int with ``1 <= k < K``; default ``int(K * 0.5)``.
        eps: positive real, entropic regularisation in cost units.
        n_iters: solver iterations (official: 20).
        queue: optional (Q, K) (or (B, Q, K)) past scores against the same anchors, prepended.
        backend: solver backend passed to :func:`ot_losses.multi_assignment_sinkhorn`.
        process_group: a ``torch.distributed`` group across which the rows
            (``target`` and ``queue``: this rank's) are split; the column
            capacities then hold over the global batch. None: one process.

    Returns:
        ``(targets, assignment, result)``: (…, N, K), (…, N, K) and the solver result.

    (``_queue_live``: (Q,) bool, the queue rows that take part; the others get
    no assignment. :class:`MultiSKLoss` keeps one problem shape as its queue fills.)
    """
    k_ = _check_k(k, target.shape[-1])
    with torch.no_grad(), no_autocast(target.device):
        dtype = loss_dtype(target, queue)
        s = target.detach().to(dtype)
        rows = None
        if queue is not None and queue.shape[-2] > 0:
            s = torch.cat([queue.detach().to(dtype), s], dim=-2)
            if _queue_live is not None:
                rows = torch.cat([_queue_live, _queue_live.new_ones(target.shape[-2])])
        res = multi_assignment_sinkhorn(-_SCORE_SCALE * s, k_, eps=V.check_positive_scalar(eps, "eps"),
                                        n_iters=n_iters, grad="none", backend=backend,
                                        process_group=process_group,
                                        shard_dim=None if process_group is None else -2, row_mask=rows)
        x = res.assignment[..., -target.shape[-2]:, :].to(dtype)
        return _rowwise_minmax(x), x, res


def _bce_exp_logits(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``mean BCEWithLogits(exp(pred / T), target)``, target in [0, 1], finite whenever the mean is.

    With ``z = exp(u)``, ``u = pred / T``: ``softplus(z) - t z = (1 - t) z + softplus(-z)``.
    The first term's mean is ``exp(lse(u + log(1 - t)) - log(#entries))``, so neither an
    entry whose target is 1 (no ``0 * inf``) nor one large entry overflows unless the
    mean itself does; the second uses ``min(u, 30)``, beyond which it is exactly 0.
    """
    u = pred / temperature
    # log(1 - t) = -inf for t = 1: floored so that an all-ones target keeps a finite gradient (exp(-1e4) = 0)
    log_terms = (u + torch.log1p(-target)).clamp_min(_LOG_FLOOR).flatten()
    linear = torch.exp(torch.logsumexp(log_terms, dim=0) - math.log(log_terms.numel()))
    return linear + F.softplus(-torch.exp(u.clamp(max=_SOFTPLUS_CUT))).mean()


@overload
def multi_sk_loss(pred: Tensor, target: Tensor, *, k: Optional[int] = ..., eps: Scalar = ...,
                  n_iters: int = ..., temperature: Scalar = ..., queue: Optional[Tensor] = ...,
                  backend: str = ..., process_group: Optional[Any] = ...,
                  return_details: Literal[False] = ...) -> Tensor: ...


@overload
def multi_sk_loss(pred: Tensor, target: Tensor, *, k: Optional[int] = ..., eps: Scalar = ...,
                  n_iters: int = ..., temperature: Scalar = ..., queue: Optional[Tensor] = ...,
                  backend: str = ..., process_group: Optional[Any] = ...,
                  return_details: Literal[True]) -> Tuple[Tensor, MultiSKDetails]: ...


@overload
def multi_sk_loss(pred: Tensor, target: Tensor, *, k: Optional[int] = ..., eps: Scalar = ...,
                  n_iters: int = ..., temperature: Scalar = ..., queue: Optional[Tensor] = ...,
                  backend: str = ..., process_group: Optional[Any] = ...,
                  return_details: bool = ...) -> Union[Tensor, Tuple[Tensor, MultiSKDetails]]: ...


def multi_sk_loss(pred: Tensor, target: Tensor, *, k: Optional[int] = None, eps: Scalar = 0.07,
                  n_iters: int = 20, temperature: Scalar = 0.1, queue: Optional[Tensor] = None,
                  backend: str = "auto", process_group: Optional[Any] = None,
                  return_details: bool = False) -> Union[Tensor, Tuple[Tensor, MultiSKDetails]]:
    """Multi-SK consistency: BCE of ``exp(pred / T)`` against the multi-assignment of ``target``.

    ``L = mean_{i,j} BCEWithLogits(exp(pred_ij / T), Y_ij)``,
    ``Y = minmax_rows(multi_assignment(-0.75 * target, k))`` (no gradient).
    Evaluated in a stable form, finite whenever the loss is representable (an
    entry with target 1 never gives ``0 * inf``, one huge entry does not overflow
    the mean); a loss that really exceeds the dtype (the mean of
    ``(1 - Y) exp(pred / T)`` beyond ~``exp(88.7)`` in fp32) raises.

    Args:
        pred: (N, K) floating scores (with grad) of one space against its anchors.
        target: (N, K) floating scores whose multi-assignment is the soft target.
        k: assignments per row, an int with ``1 <= k < K``; default ``int(K * 0.5)``
            (official 32 of 64).
        eps: positive real, entropic regularisation (official 0.07).
        n_iters: solver iterations (official 20).
        temperature: positive real ``T`` of the logits ``exp(pred / T)`` (official 0.1).
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
            ``queue`` columns), devices, NaN or infinite inputs (naming the argument),
            ``k`` not an int in ``[1, K)``, non-positive ``temperature`` or ``eps``, a loss
            that overflows its dtype (naming ``temperature``).

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
        V.check_matrix(queue, "queue", cols=pred.shape[1], cols_desc="K", rows_desc="Q", like="pred")
    V.check_devices(pred, "pred", (target, "target"), (queue, "queue"))
    temp = V.check_positive_scalar(temperature, "temperature")
    eps_ = V.check_positive_scalar(eps, "eps")
    _check_k(k, pred.shape[1])
    V.check_finite_inputs((pred, "pred"), (target, "target"), (queue, "queue"))
    D.loss_group(process_group)
    y, x, res = multi_sk_targets(target, k=k, eps=eps_, n_iters=n_iters, queue=queue, backend=backend,
                                 process_group=process_group)
    dtype = loss_dtype(pred, target)
    with no_autocast(pred.device):
        loss = _bce_exp_logits(pred.to(dtype), y.to(dtype), temp)
    V.check_exp_logits_finite(loss, [pred], temp)
    if not return_details:
        return loss
    return loss, MultiSKDetails(target=y, assignment=x, marginal_error=float(res.marginal_error.max()),
                                n_iters=int(res.n_iters))


@dataclass(frozen=True)
class MultiSKModuleDetails:
    """Per-term diagnostics of :class:`MultiSKLoss` (keys like ``"in_a<-joint_b"``).

    Attributes:
        terms: one :class:`MultiSKDetails` per consistency term.
        queue_rows: rows of past features that joined each OT problem (0 .. queue_size).
    """
    terms: Dict[str, MultiSKDetails] = field(default_factory=dict)
    queue_rows: int = 0


class MultiSKLoss(nn.Module):
    """Input- and joint-space anchors of two modalities a, b and the sum of Multi-SK terms.

    With input-space scores ``s_in^X = x_X . A_in^X`` and joint-space scores
    ``s_tr^{Y->X} = z_Y . A_joint^X`` (all L2-normalised), the terms are the two-modality
    version of the official 18 (docs/methods.md 4.3), all weighted 1:
    ``pred s_in^X, target s_tr^{Y->X}`` and ``pred s_tr^{X->Y}, target s_in^Y`` for X, Y in {a, b}.
    The loss is their mean (the official code sums weighted terms; with equal weights
    a mean only rescales ``beta_loss``).

    Queue (opt-in, ``queue_size > 0``): each target space keeps a FIFO queue of its
    past (normalised) features, prepended to the OT problem. While it fills, the rows
    seen so far join the problem, so the loss is never silently 0. (The official code
    returns 0 until the queue has been filled once: with its 5500 rows that is the
    first 5500 samples, several epochs of a small run, and no gradient reaches the
    encoders meanwhile.) The default is no queue, as in :class:`SwAMPLoss`.

    Every setting is checked at construction (``ValueError`` / ``TypeError`` naming it).

    Args:
        dims: ``(dim_a, dim_b, dim_joint)``: input feature dims of a and b and the joint
            embedding dim (an int means all three equal).
        n_anchors: anchors K per modality and space (official 64).
        queue_size: rows kept per queue (default 0: no queue; official 5500).
        k: assignments per row, an int with ``1 <= k < n_anchors``; default
            ``int(n_anchors * 0.5)``.
        eps, n_iters, temperature, backend: as in :func:`multi_sk_loss`.
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
        >>> loss_fn = MultiSKLoss((5, 7, 4), n_anchors=6, backend="torch")
        >>> loss = loss_fn(torch.randn(8, 5), torch.randn(8, 7), torch.randn(8, 4), torch.randn(8, 4))
        >>> loss.backward()
    """

    queue_x_a: Tensor
    queue_x_b: Tensor
    queue_z_a: Tensor
    queue_z_b: Tensor
    queue_count: Tensor

    def __init__(self, dims: Union[int, Sequence[int]], n_anchors: int = 64, *, queue_size: int = 0,
                 k: Optional[int] = None, eps: Scalar = 0.07, n_iters: int = 20, temperature: Scalar = 0.1,
                 info_nce_weight: Scalar = 0.0, info_nce_temperature: Scalar = 0.05, backend: str = "auto",
                 process_group: Optional[Any] = None):
        super().__init__()
        self.process_group = D.loss_group(process_group)
        if isinstance(dims, int):
            dims = (dims, dims, dims)
        dims_ok = isinstance(dims, (tuple, list)) and len(dims) == 3
        if not (dims_ok and all(isinstance(d, int) and d >= 1 for d in dims)):
            raise ValueError(f"dims must be (dim_a, dim_b, dim_joint) positive ints or one int; got {dims!r}")
        self.dims = (int(dims[0]), int(dims[1]), int(dims[2]))
        self.n_anchors = V.check_count(n_anchors, "n_anchors", 2)
        self.queue_size = V.check_count(queue_size, "queue_size", 0)
        self.k = _check_k(k, self.n_anchors)
        self.eps = V.check_positive_scalar(eps, "eps")
        self.n_iters = V.check_n_iters(n_iters)
        self.temperature = V.check_positive_scalar(temperature, "temperature")
        self.info_nce_weight = V.check_weight(info_nce_weight, "info_nce_weight")
        self.info_nce_temperature = V.check_positive_scalar(info_nce_temperature, "info_nce_temperature")
        self.backend = V.check_choice(backend, "backend", BACKENDS)
        dim_a, dim_b, dim_j = self.dims
        # official ClusterAssignments: Linear weight rows, N(0, 1) init, normalised at use
        self.anchors_in_a = nn.Parameter(torch.randn(n_anchors, dim_a))
        self.anchors_in_b = nn.Parameter(torch.randn(n_anchors, dim_b))
        self.anchors_joint_a = nn.Parameter(torch.randn(n_anchors, dim_j))
        self.anchors_joint_b = nn.Parameter(torch.randn(n_anchors, dim_j))
        for name, d in (("x_a", dim_a), ("x_b", dim_b), ("z_a", dim_j), ("z_b", dim_j)):
            self.register_buffer(f"queue_{name}", torch.zeros(self.queue_size, d))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def forward(self, x_a: Tensor, x_b: Tensor, z_a: Tensor, z_b: Tensor,
                return_details: bool = False) -> Union[Tensor, Tuple[Tensor, MultiSKModuleDetails]]:
        """Mean of the consistency terms for one batch.

        Args:
            x_a: (N, dim_a) input-space (pooled, modality-specific) features of a.
            x_b: (N, dim_b) input-space features of b.
            z_a, z_b: (N, dim_joint) joint-space embeddings of a and b.

        Returns:
            Scalar tensor; with ``return_details``, ``(loss, MultiSKModuleDetails)``.
        """
        names = ("x_a", "x_b", "z_a", "z_b")
        raw = (x_a, x_b, z_a, z_b)
        dim_names = ("dim_a", "dim_b", "dim_joint", "dim_joint")
        widths = (self.dims[0], self.dims[1], self.dims[2], self.dims[2])
        for f, name, d, dn in zip(raw, names, widths, dim_names):
            V.check_matrix(f, name, cols=d, cols_desc="D", like=f"this module's {dn}")
        n = x_a.shape[0]
        for f, name in zip(raw[1:], names[1:]):
            if f.shape[0] != n:
                raise ValueError(f"{name} must have N={n} rows like x_a; got {tuple(f.shape)}")
        V.check_devices(x_a, "x_a", *zip(raw[1:], names[1:]))
        V.check_finite_inputs(*zip(raw, names))
        group = self.process_group
        if self.training:
            D.warn_if_diverged(self, group)
        feats = {nm: F.normalize(f, dim=1) for nm, f in zip(names, raw)}
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
        # FIFO, newest rows last: while the queue fills, its last queue_rows rows are the past features.
        # Without a group the whole buffer joins the problem and a mask leaves out the rows not yet
        # filled: one shape (no recompilation under torch.compile) and no host read.
        live = None
        if group is None:
            queue_rows: Any = self.queue_count.clamp(max=self.queue_size)
            if self.queue_size > 0:
                slots = torch.arange(self.queue_size, device=self.queue_count.device)
                live = slots >= self.queue_size - queue_rows
            n_past = self.queue_size
        else:
            queue_rows = n_past = min(int(self.queue_count), self.queue_size)
        # With a group the queues are the same on every rank: each rank contributes its share.
        part = slice(None) if group is None else D.rank_slice(n_past, group)
        # all terms share (N [+ Q], K): one batched multi-assignment solve instead of len(terms)
        with torch.no_grad():
            targets, queues = [], []
            for _, _, _, tf, ta in terms:
                targets.append(feats[tf].detach() @ anchors[ta].detach().T)
                if n_past > 0:
                    past = getattr(self, f"queue_{tf}")[-n_past:][part]
                    queues.append(F.normalize(past, dim=1).to(targets[-1].dtype) @ anchors[ta].detach().T)
            queue = torch.stack(queues) if queues else None
            y, x, res = multi_sk_targets(torch.stack(targets), k=self.k, eps=self.eps, n_iters=self.n_iters,
                                         queue=queue, backend=self.backend, process_group=group,
                                         _queue_live=live)
        preds, outs, details = [], [], {}
        for t, (key, pf, pa, _, _) in enumerate(terms):
            pred = feats[pf] @ anchors[pa].T
            preds.append(pred)
            dtype = loss_dtype(pred)
            with no_autocast(pred.device):
                outs.append(_bce_exp_logits(pred.to(dtype), y[t].to(dtype), self.temperature))
            if return_details:
                details[key] = MultiSKDetails(target=y[t], assignment=x[t],
                                              marginal_error=float(res.marginal_error[t]),
                                              n_iters=int(res.n_iters))
        total = torch.stack(outs).mean()
        V.check_exp_logits_finite(total, preds, self.temperature)
        if self.queue_size > 0 and self.training:
            self._push(feats)
        if self.info_nce_weight > 0:
            nce = info_nce_loss(z_a, z_b, temperature=self.info_nce_temperature, process_group=group)
            total = total + self.info_nce_weight * nce
        if return_details:
            return total, MultiSKModuleDetails(terms=details, queue_rows=int(queue_rows))
        return total

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, n_anchors={self.n_anchors}, queue_size={self.queue_size}, k={self.k}, "
                f"eps={self.eps}, n_iters={self.n_iters}, temperature={self.temperature}, "
                f"info_nce_weight={self.info_nce_weight}, info_nce_temperature={self.info_nce_temperature}, "
                f"backend={self.backend!r}")

    @torch.no_grad()
    def _push(self, feats: Dict[str, Tensor]) -> None:
        if self.process_group is not None:  # the queues hold the global batches, the same on every rank
            feats = {name: D.gather_rows(f.detach(), self.process_group)[0] for name, f in feats.items()}
        for name, f in feats.items():
            queue = getattr(self, f"queue_{name}")
            f = f.detach().to(queue.dtype)[-self.queue_size:]
            queue.copy_(torch.cat([queue[f.shape[0]:], f], dim=0))
        self.queue_count += next(iter(feats.values())).shape[0]
