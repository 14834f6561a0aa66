"""SwAMP: swapped assignment of multi-modal pairs (Kim, AISTATS 2023), docs/methods.md section 2.

Each modality's batch is self-labelled against shared prototypes by SwAV's
equipartition Sinkhorn (docs/methods.md section 1: prototype side updated
first, then ``Q *= N``), and each member of a pair is trained to predict the
other member's pseudo-label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _distributed as D
from .. import _validate as V
from .._backend import BACKENDS
from ..features import DEFAULT_WORKSPACE, FeatureCost
from ..results import SinkhornResult
from ..solvers.sinkhorn import sinkhorn
from ._common import Scalar, loss_dtype, no_autocast
from .info_nce import info_nce_loss

__all__ = ["SwAMPDetails", "SwAMPLoss", "swamp_loss", "swav_targets"]

# A queue whose (Q + N) x K scores would take more than this is solved from the
# features (FeatureCost), so those scores are never stored; below it the dense
# scores are cheaper (one matmul and a cached kernel instead of two per iteration).
STREAM_QUEUE_BYTES = DEFAULT_WORKSPACE


@dataclass(frozen=True)
class SwAMPDetails:
    """Diagnostics of :func:`swamp_loss`.

    Attributes:
        q_a, q_b: (N, K) pseudo-labels of the batch rows (rows sum to 1; no grad).
        scores_a, scores_b: (N, K) detached scores ``z c^T``.
        marginal_error_a, marginal_error_b: the solver's L1 marginal error.
        n_iters: Sinkhorn iterations run per modality.
    """
    q_a: Tensor
    q_b: Tensor
    scores_a: Tensor
    scores_b: Tensor
    marginal_error_a: float
    marginal_error_b: float
    n_iters: int


def swav_targets(scores: Tensor, *, eps: Scalar = 0.05, n_iters: int = 3, backend: str = "auto",
                 process_group: Optional[Any] = None,
                 _live: Optional[Tensor] = None) -> Tuple[Tensor, SinkhornResult]:
    """SwAV's ``distributed_sinkhorn`` (world size 1) in the log domain, no gradient.

    ``Q = N * sinkhorn(-S^T, eps=eps, n_iters=n_iters).plan^T``: the prototype
    side (rows of ``-S^T``) is normalised first, the sample side last, so every
    row of ``Q`` sums to 1 whatever ``n_iters``.

    Args:
        scores: (N, K) floating tensor of scores ``z_i . c_k`` (detached inside;
            computed in fp32, or fp64 for fp64 input, with autocast off).
        eps: positive real, absolute entropic regularisation (score units).
        n_iters: number of Sinkhorn iterations (SwAV: 3).
        backend: solver backend, see :func:`ot_losses.sinkhorn`.
        process_group: a ``torch.distributed`` group across which the samples
            are split (``scores`` = this rank's rows): the equipartition holds
            over the global batch (SwAV's ``distributed_sinkhorn``), with only
            (K,) partials all-reduced per iteration. None: one process.

    Returns:
        ``(Q, result)``: (N, K) tensor whose rows sum to 1, and the solver result.

    (``_live``: (N,) bool, the rows that take part, the others with zero mass:
    :class:`SwAMPLoss` keeps one problem shape whether its queue joins or not.)
    """
    with torch.no_grad(), no_autocast(scores.device):
        s = scores.detach().to(loss_dtype(scores))
        weights = None
        total: Any = s.shape[0]
        if process_group is not None:
            total = D.total_rows(s.shape[0], process_group, s.device)
        if _live is not None:
            total = _live.sum().to(s.dtype)
            weights = _live.to(s.dtype) / total
        res = sinkhorn(-s.T, b=weights, eps=V.check_positive_scalar(eps, "eps"), n_iters=n_iters, grad="none",
                       backend=backend, process_group=process_group,
                       shard_dim=None if process_group is None else 1)
        # Scaled as the plan is formed: no pass of its own, no second (K, N) buffer.
        q = res._plan_times(torch.as_tensor(total, dtype=s.dtype, device=s.device).reshape(1)).T
    return q, res


@overload
def swamp_loss(z_a: Tensor, z_b: Tensor, prototypes: Tensor, *, eps: Scalar = ..., temperature: Scalar = ...,
               n_iters: int = ..., queue_a: Optional[Tensor] = ..., queue_b: Optional[Tensor] = ...,
               normalize: bool = ..., backend: str = ..., process_group: Optional[Any] = ...,
               _queue_live: Optional[Tensor] = ..., return_details: Literal[False] = ...) -> Tensor: ...


@overload
def swamp_loss(z_a: Tensor, z_b: Tensor, prototypes: Tensor, *, eps: Scalar = ..., temperature: Scalar = ...,
               n_iters: int = ..., queue_a: Optional[Tensor] = ..., queue_b: Optional[Tensor] = ...,
               normalize: bool = ..., backend: str = ..., process_group: Optional[Any] = ...,
               _queue_live: Optional[Tensor] = ...,
               return_details: Literal[True]) -> Tuple[Tensor, SwAMPDetails]: ...


@overload
def swamp_loss(z_a: Tensor, z_b: Tensor, prototypes: Tensor, *, eps: Scalar = ..., temperature: Scalar = ...,
               n_iters: int = ..., queue_a: Optional[Tensor] = ..., queue_b: Optional[Tensor] = ...,
               normalize: bool = ..., backend: str = ..., process_group: Optional[Any] = ...,
               _queue_live: Optional[Tensor] = ...,
               return_details: bool = ...) -> Union[Tensor, Tuple[Tensor, SwAMPDetails]]: ...


def swamp_loss(z_a: Tensor, z_b: Tensor, prototypes: Tensor, *, eps: Scalar = 0.05, temperature: Scalar = 0.1,
               n_iters: int = 3, queue_a: Optional[Tensor] = None, queue_b: Optional[Tensor] = None,
               normalize: bool = True, backend: str = "auto", process_group: Optional[Any] = None,
               return_details: bool = False,
               _queue_live: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, SwAMPDetails]]:
    """Swapped cross-entropy between the two members of each pair, SwAV pseudo-labels.

    ``L = 1/2 [ -1/N sum_ik Q_b[i,k] log p_a(k|i) - 1/N sum_ik Q_a[i,k] log p_b(k|i) ]``,
    ``p_m(k|i) = softmax_k(z_m,i . c_k / T)``, ``Q_m = swav_targets(z_m c^T)`` (no gradient).

    Args:
        z_a: (N, D) floating tensor, embeddings of modality a.
        z_b: (N, D) floating tensor, embeddings of modality b (row i pairs with ``z_a[i]``).
        prototypes: (K, D) floating tensor of prototypes shared by both modalities.
        eps: positive real (float, numpy scalar or 0-dim tensor), entropic
            regularisation of the pseudo-label OT (score units).
        temperature: positive real, softmax temperature ``T`` of the predictor.
        n_iters: Sinkhorn iterations (SwAV: 3).
        queue_a, queue_b: optional (Q, D) past embeddings of each modality; they join
            the OT problem (rows ``[queue; batch]``, SwAV scaling by ``Q + N``) and only
            the last N rows of the targets are used. When the ``(Q + N) x K``
            scores would exceed ``STREAM_QUEUE_BYTES`` (256 MiB; one process),
            the problem is solved on a :class:`~ot_losses.FeatureCost` and only
            the batch's ``N x K`` scores are stored: same targets to rounding
            (Q = 60000, K = 3000, D = 128 on CPU: peak 4.9 GiB -> 0.43 GiB,
            1.8x the CPU time).
        normalize: L2-normalise embeddings, queues and prototypes first.
        backend: solver backend passed to :func:`ot_losses.sinkhorn`.
        process_group: a ``torch.distributed`` group across which the batch is
            split; ``z_a``, ``z_b`` (and ``queue_a``, ``queue_b``) are this
            rank's rows. The pseudo-labels are those of the global batch (plus
            the global queue) and the loss averages this rank's rows, so DDP
            with equal local batches trains exactly as one process on the
            whole batch. None: one process.
        return_details: also return a :class:`SwAMPDetails`.
        _queue_live: (private, :class:`SwAMPLoss`) a 0-d bool tensor: whether the
            queues take part; when False they join with zero mass, which gives
            the targets of the batch alone with the problem's shape unchanged.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 inputs); with ``return_details``,
        ``(loss, details)``. Gradients reach ``z_a``, ``z_b`` and ``prototypes``
        through the log-softmax only. Under autocast the scores may be low
        precision; the OT and the log-softmax run in fp32.

    Raises:
        TypeError / ValueError: wrong ndim, mismatched N or D, devices, NaN or
            infinite inputs (naming the argument), or non-positive ``eps`` /
            ``temperature`` (the solver checks ``n_iters``).

    Example:
        >>> import torch
        >>> z = torch.randn(8, 4)
        >>> c = torch.ones(5, 4)          # all scores equal -> loss = log K
        >>> round(swamp_loss(z, z.flip(0), c).item(), 4) == round(float(torch.log(torch.tensor(5.0))), 4)
        True

    Reference: Kim, "Swapped Assignment of Multi-Modal Pairs" (arXiv 2111.05814);
    targets from SwAV (Caron et al., 2020).
    """
    V.check_pair(z_a, z_b)
    dim = z_a.shape[1]
    V.check_matrix(prototypes, "prototypes", cols=dim, cols_desc="D", rows_desc="K", like="z_a and z_b")
    if queue_a is not None:
        V.check_matrix(queue_a, "queue_a", cols=dim, cols_desc="D", rows_desc="Q", like="z_a")
    if queue_b is not None:
        V.check_matrix(queue_b, "queue_b", cols=dim, cols_desc="D", rows_desc="Q", like="z_b")
    named = ((z_a, "z_a"), (z_b, "z_b"), (prototypes, "prototypes"), (queue_a, "queue_a"),
             (queue_b, "queue_b"))
    V.check_devices(z_a, "z_a", *named[1:])
    eps = V.check_positive_scalar(eps, "eps")
    temperature = V.check_positive_scalar(temperature, "temperature")
    V.check_finite_inputs(*named)
    D.loss_group(process_group)

    if normalize:
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
        prototypes = F.normalize(prototypes, dim=1)
    n = z_a.shape[0]
    dtype = loss_dtype(z_a, z_b, prototypes)
    scores_a = (z_a @ prototypes.T).to(dtype)
    scores_b = (z_b @ prototypes.T).to(dtype)

    q_parts, res_parts = [], []
    for scores, z, queue in ((scores_a, z_a, queue_a), (scores_b, z_b, queue_b)):
        live = None
        with torch.no_grad():
            s = scores.detach()
            qz = None
            if queue is not None and queue.shape[0] > 0:
                qz = (F.normalize(queue, dim=1) if normalize else queue).detach()
        rows = n + (0 if qz is None else qz.shape[0])
        if qz is not None and process_group is None and _queue_live is None and \
                rows * prototypes.shape[0] * torch.finfo(dtype).bits // 8 > STREAM_QUEUE_BYTES:
            q, res = _streamed_targets(s, z, qz, prototypes, eps, n_iters, backend)
        else:
            if qz is not None:
                with torch.no_grad():
                    s = torch.cat([(qz.to(prototypes.dtype) @ prototypes.T).detach().to(dtype), s], dim=0)
                    if _queue_live is not None:
                        live = torch.cat([_queue_live.expand(qz.shape[0]), _queue_live.new_ones(n)])
            q, res = swav_targets(s, eps=eps, n_iters=n_iters, backend=backend, process_group=process_group,
                                  _live=live)
        q_parts.append(q[-n:])
        res_parts.append(res)
    q_a, q_b = q_parts

    with no_autocast(scores_a.device):
        log_p_a = F.log_softmax(scores_a / temperature, dim=1)
        log_p_b = F.log_softmax(scores_b / temperature, dim=1)
        loss = -0.5 * ((q_b * log_p_a).sum(dim=1).mean() + (q_a * log_p_b).sum(dim=1).mean())
    if not return_details:
        return loss
    details = SwAMPDetails(q_a=q_a, q_b=q_b, scores_a=scores_a.detach(), scores_b=scores_b.detach(),
                           marginal_error_a=float(res_parts[0].marginal_error.max()),
                           marginal_error_b=float(res_parts[1].marginal_error.max()),
                           n_iters=int(res_parts[0].n_iters))
    return loss, details


def _streamed_targets(scores, z, queue, prototypes, eps, n_iters, backend):
    """``swav_targets`` of ``[queue scores; scores]`` from the features: the queue's scores are never stored.

    The solve runs on ``FeatureCost(prototypes, [queue; batch], kind="dot")``
    (``-S^T``, streamed in row chunks); the batch's targets come from the
    potentials and the batch's own scores: ``Q_jk = (Q + N) a_k b_j
    exp((f_k + g_j + S_jk) / eps)``, ``S = z prototypes^T`` = ``scores``. Returns
    ``(targets of the batch rows, result)``.
    """
    dtype = scores.dtype
    with torch.no_grad(), no_autocast(scores.device):
        n = scores.shape[0]
        samples = torch.cat([queue.to(dtype), z.detach().to(dtype)], dim=0)
        res = sinkhorn(FeatureCost(prototypes.detach().to(dtype), samples, kind="dot"),
                       eps=V.check_positive_scalar(eps, "eps"), n_iters=n_iters, grad="none", backend=backend)
        rows, k = samples.shape[0], prototypes.shape[0]
        log_w = -torch.log(torch.tensor(float(rows) * k, dtype=dtype, device=scores.device))
        logits = (res.f.unsqueeze(0) + res.g[-n:].unsqueeze(1) + scores) / eps + log_w
        q = rows * torch.exp(logits)
    return q, res


class SwAMPLoss(nn.Module):
    """Holds the prototypes, optional queues and hyper-parameters of :func:`swamp_loss`.

    Every setting is checked here, at construction (``ValueError`` / ``TypeError``
    naming the argument), not at the first forward.

    Args:
        dim: embedding dimension D.
        n_prototypes: number of prototypes K (SwAV: 3000).
        queue_size: rows of past embeddings kept per modality (0: no queue). As in
            SwAV, the queue joins the OT problem once it is full (the batch alone is
            used until then); the current batch is pushed after the targets are
            computed (FIFO).
        eps, temperature, n_iters, normalize, backend: as in :func:`swamp_loss`.
        freeze_prototypes_steps: for the first this many training forwards the
            prototypes get no gradient (SwAV's ``freeze_prototypes_niters``, 313).
        renormalize_prototypes: in training mode, re-normalise the prototype rows
            in place (on this module's own parameter) before each forward, as SwAV.
        info_nce_weight: weight of an added :func:`info_nce_loss` (0: SwAMP alone).
        info_nce_temperature: its temperature.
        process_group: ``torch.distributed`` group for data-parallel training
            (see :func:`swamp_loss`). The queues then hold the gathered global
            batches (identical on every rank, ``queue_size`` counts global
            rows), each rank feeding its share of them to the OT problem.
            Recipe: keep this module inside the ``DistributedDataParallel``
            wrapper with the encoders, so the prototypes' gradients are
            averaged; in training mode it warns if its parameters differ
            across the ranks (e.g. a module left outside DDP).

    Example:
        >>> import torch
        >>> loss_fn = SwAMPLoss(16, n_prototypes=10)
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
        >>> loss.backward()
    """

    num_steps: Tensor
    queue_a: Tensor
    queue_b: Tensor
    queue_count: Tensor

    def __init__(self, dim: int, n_prototypes: int = 3000, *, queue_size: int = 0, eps: Scalar = 0.05,
                 temperature: Scalar = 0.1, n_iters: int = 3, normalize: bool = True,
                 freeze_prototypes_steps: int = 0, renormalize_prototypes: bool = True,
                 info_nce_weight: Scalar = 0.0, info_nce_temperature: Scalar = 0.07, backend: str = "auto",
                 process_group: Optional[Any] = None):
        super().__init__()
        self.process_group = D.loss_group(process_group)
        self.dim = V.check_count(dim, "dim", 1)
        n_prototypes = V.check_count(n_prototypes, "n_prototypes", 1)
        self.queue_size = V.check_count(queue_size, "queue_size", 0)
        self.eps = V.check_positive_scalar(eps, "eps")
        self.temperature = V.check_positive_scalar(temperature, "temperature")
        self.n_iters = V.check_n_iters(n_iters)
        self.normalize = V.check_flag(normalize, "normalize")
        self.freeze_prototypes_steps = V.check_count(freeze_prototypes_steps, "freeze_prototypes_steps", 0)
        self.renormalize_prototypes = V.check_flag(renormalize_prototypes, "renormalize_prototypes")
        self.info_nce_weight = V.check_weight(info_nce_weight, "info_nce_weight")
        self.info_nce_temperature = V.check_positive_scalar(info_nce_temperature, "info_nce_temperature")
        self.backend = V.check_choice(backend, "backend", BACKENDS)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_prototypes, dim), dim=1))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_a", torch.zeros(queue_size, dim))
        self.register_buffer("queue_b", torch.zeros(queue_size, dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def forward(self, z_a: Tensor, z_b: Tensor,
                return_details: bool = False) -> Union[Tensor, Tuple[Tensor, SwAMPDetails]]:
        """Loss for one batch of pairs ``z_a``, ``z_b`` (N, D); see :func:`swamp_loss`."""
        for z, name in ((z_a, "z_a"), (z_b, "z_b")):
            V.check_matrix(z, name, cols=self.dim, cols_desc="D", like="this module's dim")
        prototypes: Tensor = self.prototypes
        group = self.process_group
        if self.training:
            D.warn_if_diverged(self, group)
            if self.renormalize_prototypes:
                with torch.no_grad():
                    self.prototypes.copy_(F.normalize(self.prototypes, dim=1))
            if self.freeze_prototypes_steps > 0:
                if V.compiling():  # no host read: a zero gradient (not None) while frozen
                    frozen = self.num_steps < self.freeze_prototypes_steps
                    prototypes = torch.where(frozen, prototypes.detach(), prototypes)
                elif int(self.num_steps) < self.freeze_prototypes_steps:
                    prototypes = prototypes.detach()
            self.num_steps += 1
        live = None
        if self.queue_size > 0 and group is None:
            # The queues always join, with zero mass until full: the batch-alone targets, one problem
            # shape (no recompilation under torch.compile) and no host read.
            use_queue, live = True, self.queue_count >= self.queue_size
        else:
            use_queue = self.queue_size > 0 and int(self.queue_count) >= self.queue_size
        # With a group the queues are the same on every rank: each rank contributes its share.
        part = slice(None) if group is None else D.rank_slice(self.queue_size, group)
        out = swamp_loss(z_a, z_b, prototypes, eps=self.eps, temperature=self.temperature,
                         n_iters=self.n_iters, queue_a=self.queue_a[part] if use_queue else None,
                         queue_b=self.queue_b[part] if use_queue else None, normalize=self.normalize,
                         backend=self.backend, process_group=group, return_details=return_details,
                         _queue_live=live)
        if self.queue_size > 0 and self.training:
            self._push(z_a, z_b)
        if self.info_nce_weight > 0:
            nce = info_nce_loss(z_a, z_b, temperature=self.info_nce_temperature, normalize=self.normalize,
                                process_group=group)
            if isinstance(out, tuple):
                return out[0] + self.info_nce_weight * nce, out[1]
            return out + self.info_nce_weight * nce
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_prototypes={self.prototypes.shape[0]}, queue_size={self.queue_size}, "
                f"eps={self.eps}, temperature={self.temperature}, n_iters={self.n_iters}, "
                f"normalize={self.normalize}, freeze_prototypes_steps={self.freeze_prototypes_steps}, "
                f"renormalize_prototypes={self.renormalize_prototypes}, "
                f"info_nce_weight={self.info_nce_weight}, info_nce_temperature={self.info_nce_temperature}, "
                f"backend={self.backend!r}")

    @torch.no_grad()
    def _push(self, z_a: Tensor, z_b: Tensor) -> None:
        """FIFO: newest rows last (the OT problem is ``[queue; batch]``); with a group, the global batch."""
        if self.process_group is not None:
            z_a, z_b = (D.gather_rows(z.detach(), self.process_group)[0] for z in (z_a, z_b))
        for queue, z in ((self.queue_a, z_a), (self.queue_b, z_b)):
            z = z.detach().to(queue.dtype)
            if self.normalize:
                z = F.normalize(z, dim=1)
            z = z[-self.queue_size:]
            queue.copy_(torch.cat([queue[z.shape[0]:], z], dim=0))
        self.queue_count += z_a.shape[0]
