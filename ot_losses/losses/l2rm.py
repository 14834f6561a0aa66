"""L2RM: learning to rematch mismatched pairs (Han et al., CVPR 2024), docs/methods.md section 3.

The presumed-noisy pairs of a batch are re-matched by dummy-point partial OT
on a (learned) cost, the given pairs ``(i, i)`` being forbidden; the model's
similarities are then pulled towards the row-normalised plan by a symmetric
KL divergence. A two-component mixture on per-pair losses splits the data
into clean and noisy pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as V
from .._backend import BACKENDS
from ..solvers.partial import partial_ot
from ._common import Scalar, loss_dtype, no_autocast

__all__ = ["L2RMCost", "L2RMDetails", "L2RMLoss", "l2rm_loss", "split_clean_noisy"]

_CLIP = 1e-10  # official clip of the plan (and of the learned cost) before use

Reduction = Literal["mean", "sum", "none"]


@dataclass(frozen=True)
class L2RMDetails:
    """Diagnostics of :func:`l2rm_loss`.

    Attributes:
        plan: (n, m) partial-OT plan of the real block (no grad; diagonal 0 when forbidden).
        cost: (n, m) cost the plan was solved with (``+inf`` on forbidden entries).
        mass: transported mass of the real block.
        marginal_error: the solver's marginal error of the extended problem.
        converged: whether the solver met ``tol``.
        n_iters: solver iterations run.
    """
    plan: Tensor
    cost: Tensor
    mass: float
    marginal_error: float
    converged: bool
    n_iters: int


def _sym_kl_rows(sim: Tensor, plan: Tensor, tau: float) -> Tuple[Tensor, Tensor]:
    """docs/methods.md 3.4 per row: ``KL(L||P) + KL(P||L)`` of each image row (n,) and caption row (m,).

    ``0.5 * (rows.mean() + cols.mean())`` is the loss (PyTorch ``KLDivLoss``
    batch-mean in each direction); log-softmax, so no ``exp`` overflow.
    """
    def both_kl(log_t: Tensor, log_p: Tensor) -> Tensor:
        return (log_t.exp() * (log_t - log_p) + log_p.exp() * (log_p - log_t)).sum(dim=1)

    clipped = plan.clamp_min(_CLIP)
    log_l_i2t = torch.log(clipped / clipped.sum(dim=1, keepdim=True))
    log_l_t2i = torch.log(clipped.T / clipped.T.sum(dim=1, keepdim=True))
    rows = both_kl(log_l_i2t, F.log_softmax(sim / tau, dim=1))
    cols = both_kl(log_l_t2i, F.log_softmax(sim.T / tau, dim=1))
    return rows, cols


@overload
def l2rm_loss(sim: Tensor, *, cost: Optional[Tensor] = ..., mass: Scalar = ..., eps: Scalar = ...,
              tau: Scalar = ..., forbid_diagonal: bool = ..., n_iters: int = ..., tol: Optional[Scalar] = ...,
              backend: str = ..., reduction: Reduction = ..., process_group: None = ...,
              return_details: Literal[False] = ...) -> Tensor: ...


@overload
def l2rm_loss(sim: Tensor, *, cost: Optional[Tensor] = ..., mass: Scalar = ..., eps: Scalar = ...,
              tau: Scalar = ..., forbid_diagonal: bool = ..., n_iters: int = ..., tol: Optional[Scalar] = ...,
              backend: str = ..., reduction: Reduction = ..., process_group: None = ...,
              return_details: Literal[True]) -> Tuple[Tensor, L2RMDetails]: ...


@overload
def l2rm_loss(sim: Tensor, *, cost: Optional[Tensor] = ..., mass: Scalar = ..., eps: Scalar = ...,
              tau: Scalar = ..., forbid_diagonal: bool = ..., n_iters: int = ..., tol: Optional[Scalar] = ...,
              backend: str = ..., reduction: Reduction = ..., process_group: None = ...,
              return_details: bool = ...) -> Union[Tensor, Tuple[Tensor, L2RMDetails]]: ...


def l2rm_loss(sim: Tensor, *, cost: Optional[Tensor] = None, mass: Scalar = 0.1, eps: Scalar = 0.07,
              tau: Scalar = 0.05, forbid_diagonal: bool = True, n_iters: int = 1000,
              tol: Optional[Scalar] = 1e-6, backend: str = "auto", reduction: Reduction = "mean",
              process_group: None = None,
              return_details: bool = False) -> Union[Tensor, Tuple[Tensor, L2RMDetails]]:
    """Symmetric KL between the model's matching distributions and a partial-OT rematching.

    Plan: ``partial_ot(cost, mass=mass, eps=eps, method="dummy")`` with uniform
    marginals and the given pairs ``(i, i)``, ``i < min(n, m)``, forbidden
    (``+inf`` on a copy of the cost). Loss (docs/methods.md 3.4), with
    ``P_i2t = softmax_rows(S / tau)``, ``P_t2i = softmax_rows(S^T / tau)``,
    ``L_i2t = rownorm(max(plan, 1e-10))``, ``L_t2i = rownorm(max(plan, 1e-10)^T)``
    and batch-mean KL:
    ``1/2 [KL(L_i2t||P_i2t) + KL(L_t2i||P_t2i) + KL(P_i2t||L_i2t) + KL(P_t2i||L_t2i)]``.

    Args:
        sim: (n, m) floating tensor, model similarities of the (presumed noisy)
            batch, rows = images, columns = captions; gradients flow through it.
            Must be finite.
        cost: optional (n, m) cost (e.g. from :class:`L2RMCost`), detached and
            clipped to ``>= 1e-10``; ``+inf`` forbids an entry; default
            ``relu(1 - sim.detach())``.
        mass: transported mass ``s`` of the partial OT, 0 < mass <= 1 (L2RM: 0.1).
        eps: positive real, entropic regularisation in cost units (L2RM: 0.07; F30K 0.01).
        tau: positive real, softmax temperature of the model's distributions.
        forbid_diagonal: forbid the given pairs ``(i, i)`` (L2RM: whenever noise > 0).
        n_iters, tol: solver iteration cap and tolerance (see :func:`ot_losses.partial_ot`).
        backend: solver backend passed to :func:`ot_losses.partial_ot`.
        reduction: ``"mean"`` (the loss above), ``"sum"`` (``1/2`` the sum of the
            per-row KL terms of both directions), or ``"none"``: for a square ``sim``,
            the (n,) per-pair losses ``1/2 [rows_i + cols_i]`` of the given pairs
            ``(i, i)``, whose mean is the loss.
        process_group: must be None. A sharded L2RM would need autograd through
            the column softmax of the global (N, N) similarity and a learned
            cost net whose own optimiser steps outside DDP; for data-parallel
            training, gather the embeddings with gradient
            (``torch.distributed.nn.functional.all_gather``), build the global
            ``sim`` on every rank and call this loss without a group: DDP's
            gradient average then equals one process on the whole batch.
        return_details: also return an :class:`L2RMDetails`.

    Returns:
        Scalar tensor, or (n,) with ``reduction="none"`` (fp32; fp64 for fp64 ``sim``);
        with ``return_details``, ``(loss, details)``. The plan carries no gradient.

    Raises:
        TypeError / ValueError: ``sim`` not (n, m) floating or not finite, ``cost`` of
            another shape or device or with NaN, ``mass`` outside (0, 1], a 1 x m or
            n x 1 batch with ``forbid_diagonal`` (the given pair's column or row would
            have no allowed entry), non-positive ``tau`` / ``eps``, ``reduction="none"``
            with n != m.

    Example:
        >>> import torch
        >>> sim = torch.rand(6, 6, requires_grad=True)
        >>> loss = l2rm_loss(sim, backend="torch")
        >>> loss.backward()
        >>> l2rm_loss(sim, backend="torch", reduction="none").shape
        torch.Size([6])

    Reference: Han et al., "Learning to Rematch Mismatched Pairs for Robust
    Cross-Modal Retrieval" (CVPR 2024); dummy-point partial OT of Chapel et al. (2020).
    """
    V.check_l2rm_group(process_group)
    V.check_matrix(sim, "sim", cols_desc="m")
    if cost is not None:
        V.check_matrix(cost, "cost", cols_desc="m")
        if cost.shape != sim.shape:
            raise ValueError(f"cost must have the shape of sim {tuple(sim.shape)}; got {tuple(cost.shape)}")
        V.check_devices(sim, "sim", (cost, "cost"))
    tau_ = V.check_positive_scalar(tau, "tau")
    eps_ = V.check_positive_scalar(eps, "eps")
    mass_ = V.check_fraction(mass, "mass")
    tol_ = V.check_optional_tol(tol)
    V.check_reduction(reduction)
    n, m = sim.shape
    if reduction == "none" and n != m:
        raise ValueError(f"reduction='none' gives one loss per given pair (i, i) and needs a square sim; "
                         f"got {tuple(sim.shape)}; use 'mean' or 'sum'")
    if forbid_diagonal:
        V.check_forbid_diagonal((n, m))
    V.check_finite_inputs((sim, "sim"))
    dtype = loss_dtype(sim)
    with torch.no_grad(), no_autocast(sim.device):
        if cost is None:
            c = torch.relu(1.0 - sim.detach().to(dtype))
        else:
            c = cost.detach().to(dtype)
            V.check_cost_values(c, "cost")
        c = c.clamp_min(_CLIP)
        if forbid_diagonal:
            d = min(n, m)
            eye = torch.zeros(n, m, dtype=torch.bool, device=sim.device)
            eye[torch.arange(d), torch.arange(d)] = True
            c = torch.where(eye, torch.full_like(c, math.inf), c)  # a copy; inputs untouched
        res = partial_ot(c, mass=mass_, eps=eps_, method="dummy", n_iters=n_iters, tol=tol_, grad="none",
                         backend=backend)
        plan = res.plan.to(dtype)
    with no_autocast(sim.device):
        rows, cols = _sym_kl_rows(sim.to(dtype), plan, tau_)
        if reduction == "mean":
            loss = 0.5 * (rows.mean() + cols.mean())
        elif reduction == "sum":
            loss = 0.5 * (rows.sum() + cols.sum())
        else:
            loss = 0.5 * (rows + cols)
    if not return_details:
        return loss
    return loss, L2RMDetails(plan=plan, cost=c, mass=float(res.mass),
                             marginal_error=float(res.marginal_error), converged=bool(res.converged),
                             n_iters=int(res.n_iters))


class L2RMCost(nn.Module):
    """L2RM's self-supervised cost function: ``C = relu(S W^T + b)``, ``W = -I``, ``b = 1``.

    The linear layer mixes the similarities of one row (image) to all
    ``batch_size`` columns (captions), so at initialisation ``C = relu(1 - S)``.
    A smaller batch of ``m < batch_size`` columns (the last, partial batch of
    an epoch) uses the leading ``m x m`` block of ``W`` and the first ``m``
    entries of ``b``, i.e. the map of a full batch whose missing columns
    have similarity 0.

    Args:
        batch_size: the largest number of columns m of the similarities it maps.

    Example:
        >>> import torch
        >>> s = torch.rand(3, 4)
        >>> torch.allclose(L2RMCost(4)(s), torch.relu(1 - s))
        True
        >>> L2RMCost(4)(s[:, :3]).shape
        torch.Size([3, 3])
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = V.check_count(batch_size, "batch_size", 1)
        self.linear = nn.Linear(batch_size, batch_size)
        with torch.no_grad():
            self.linear.weight.copy_(-torch.eye(batch_size))
            self.linear.bias.fill_(1.0)

    def forward(self, sim: Tensor, name: str = "sim") -> Tensor:
        """(n, m) similarities, m <= batch_size -> (n, m) non-negative costs (``name``: for errors)."""
        V.check_matrix(sim, name, cols_desc="m")
        m = sim.shape[1]
        if m > self.batch_size:
            raise ValueError(f"{name} must have at most batch_size={self.batch_size} columns (the width of "
                             f"the learned cost); got {tuple(sim.shape)}")
        weight, bias = self.linear.weight[:m, :m], self.linear.bias[:m]
        return torch.relu(F.linear(sim.to(weight.dtype), weight, bias))

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}"


class L2RMLoss(nn.Module):
    """Holds the learned cost (:class:`L2RMCost`, its own Adam) and the settings of :func:`l2rm_loss`.

    ``forward(sim)``: the cost net (eval mode, no grad) maps ``sim.detach()`` to the
    cost, then :func:`l2rm_loss`. ``cost_step(sim_keys, matches)``: one Adam step
    (``lr_cost``) on ``sum(Y * C(sim_keys))``, Y the 0/1 matrix of known matches
    (L2RM plants k ~ U{1..0.1 m} clean pairs into the image queue).

    Batches may be smaller than ``batch_size`` (see :class:`L2RMCost`). The Adam
    state is part of ``state_dict()`` (key ``_extra_state``) and follows
    ``.to()`` / ``.double()`` / ``.cuda()``; the cost net's parameters are not meant
    for an outer optimiser. Every setting is checked at construction.

    Args:
        batch_size: the largest number of columns m of the similarity matrices (L2RM: 128).
        mass, eps, tau, forbid_diagonal, n_iters, tol, backend, reduction: as in :func:`l2rm_loss`.
        lr_cost: learning rate of the cost net (L2RM: 2e-6).
        process_group: must be None (see :func:`l2rm_loss` for data-parallel use).

    Example:
        >>> import torch
        >>> loss_fn = L2RMLoss(6, backend="torch")
        >>> sim = torch.rand(6, 6, requires_grad=True)
        >>> loss_fn(sim).backward()
        >>> _ = loss_fn.cost_step(torch.rand(6, 6), torch.tensor([[0, 2], [3, 1]]))
        >>> loss_fn(torch.rand(4, 4)).shape      # a last, partial batch
        torch.Size([])
    """

    def __init__(self, batch_size: int, *, mass: Scalar = 0.1, eps: Scalar = 0.07, tau: Scalar = 0.05,
                 forbid_diagonal: bool = True, n_iters: int = 1000, tol: Optional[Scalar] = 1e-6,
                 lr_cost: Scalar = 2e-6, backend: str = "auto", reduction: Reduction = "mean",
                 process_group: None = None):
        super().__init__()
        V.check_l2rm_group(process_group)
        self.mass = V.check_fraction(mass, "mass")
        self.eps = V.check_positive_scalar(eps, "eps")
        self.tau = V.check_positive_scalar(tau, "tau")
        self.forbid_diagonal = V.check_flag(forbid_diagonal, "forbid_diagonal")
        self.n_iters = V.check_n_iters(n_iters)
        self.tol = V.check_optional_tol(tol)
        self.lr_cost = V.check_positive_scalar(lr_cost, "lr_cost")
        self.backend = V.check_choice(backend, "backend", BACKENDS)
        V.check_reduction(reduction)
        self.reduction = reduction
        self.cost_net = L2RMCost(batch_size)
        self._cost_optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(self.cost_net.parameters(), lr=self.lr_cost)

    def cost(self, sim: Tensor) -> Tensor:
        """The cost the OT step uses: cost net in eval mode on ``sim.detach()``, no grad, >= 1e-10."""
        was_training = self.cost_net.training
        self.cost_net.eval()
        with torch.no_grad():
            c = self.cost_net(sim.detach()).clamp_min(_CLIP)
        self.cost_net.train(was_training)
        return c

    def forward(self, sim: Tensor, return_details: bool = False) -> Union[Tensor, Tuple[Tensor, L2RMDetails]]:
        """Loss for one noisy batch ``sim`` (n, m), m <= batch_size; see :func:`l2rm_loss`."""
        V.check_matrix(sim, "sim", cols_desc="m")
        V.check_finite_inputs((sim, "sim"))  # before the cost net turns a bad sim into a bad cost
        return l2rm_loss(sim, cost=self.cost(sim).to(sim.device), mass=self.mass, eps=self.eps, tau=self.tau,
                         forbid_diagonal=self.forbid_diagonal, n_iters=self.n_iters, tol=self.tol,
                         backend=self.backend, reduction=self.reduction, return_details=return_details)

    def cost_step(self, sim_keys: Tensor, matches: Tensor) -> Tensor:
        """One self-supervised update of the cost net: minimise ``sum(Y * C(sim_keys))``.

        Args:
            sim_keys: (n, m) similarities, m <= batch_size (no grad needed), of queue
                images into which known-clean images were planted, vs. the clean captions.
            matches: either an (n, m) 0/1 (bool or float) matrix ``Y``, or a
                (k, 2) integer tensor of (row, column) indices of the known matches.

        Returns:
            The detached scalar ``sum(Y * C)`` before the step.
        """
        V.check_matrix(sim_keys, "sim_keys", cols_desc="m")
        V.check_finite_inputs((sim_keys, "sim_keys"))
        y = self._match_matrix(matches, sim_keys)
        self.cost_net.train()
        self._cost_optimizer.zero_grad(set_to_none=True)
        with no_autocast(sim_keys.device):
            c = self.cost_net(sim_keys.detach(), "sim_keys")
            value = (y.to(c.dtype) * c).sum()
        value.backward()
        self._cost_optimizer.step()
        self._cost_optimizer.zero_grad(set_to_none=True)  # keep outer optimisers from re-applying it
        return value.detach()

    def get_extra_state(self) -> Dict[str, Any]:
        """The cost net's Adam state, saved by ``state_dict()``."""
        return {"cost_optimizer": self._cost_optimizer.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._cost_optimizer = self._new_optimizer()
        self._cost_optimizer.load_state_dict(state["cost_optimizer"])

    def _apply(self, fn: Any, recurse: bool = True) -> "L2RMLoss":
        # .to()/.double()/.cuda() convert parameters only; rebuilding the optimiser from its own
        # state dict casts the Adam moments to the parameters' new dtype and device.
        super()._apply(fn, recurse)
        state = self._cost_optimizer.state_dict()
        self._cost_optimizer = self._new_optimizer()
        self._cost_optimizer.load_state_dict(state)
        return self

    def extra_repr(self) -> str:
        return (f"batch_size={self.cost_net.batch_size}, mass={self.mass}, eps={self.eps}, tau={self.tau}, "
                f"forbid_diagonal={self.forbid_diagonal}, n_iters={self.n_iters}, tol={self.tol}, "
                f"lr_cost={self.lr_cost}, backend={self.backend!r}, reduction={self.reduction!r}")

    @staticmethod
    def _match_matrix(matches: Tensor, sim_keys: Tensor) -> Tensor:
        if not isinstance(matches, torch.Tensor):
            raise TypeError(f"matches must be a torch.Tensor; got {type(matches).__name__}")
        if matches.shape == sim_keys.shape:
            return matches.to(device=sim_keys.device, dtype=torch.float32)
        if matches.ndim == 2 and matches.shape[1] == 2 and not matches.is_floating_point():
            n, m = sim_keys.shape
            if matches.numel() and (matches[:, 0].min() < 0 or matches[:, 0].max() >= n
                                    or matches[:, 1].min() < 0 or matches[:, 1].max() >= m):
                raise ValueError(f"matches indices must lie in [0, {n}) x [0, {m}); got {matches.tolist()}")
            y = torch.zeros(n, m, device=sim_keys.device)
            y[matches[:, 0].to(sim_keys.device), matches[:, 1].to(sim_keys.device)] = 1.0
            return y
        raise ValueError(f"matches must have the shape of sim_keys {tuple(sim_keys.shape)} or be a (k, 2) "
                         f"integer tensor; got {tuple(matches.shape)} {matches.dtype}")


# ----------------------------------------------------------------------------- clean / noisy split
def _beta_logpdf(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    return ((alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x)
            - (torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)))


def _normal_logpdf(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def split_clean_noisy(per_pair_loss: Tensor, *, method: str = "beta", threshold: float = 0.5,
                      n_iters: int = 50) -> Tuple[Tensor, Tensor]:
    """Probability that each pair is clean, from a two-component 1-D mixture on its loss.

    L2RM (like DivideMix/NCR) fits a two-component mixture to the per-pair losses;
    the component with the smaller mean is "clean". Losses are min-max scaled to
    ``[1e-4, 1 - 1e-4]``. ``method="beta"`` (L2RM's choice) fits a Beta mixture by
    EM with weighted method-of-moments M-steps; ``method="gmm"`` a Gaussian
    mixture by EM (variances floored at 1e-6). Both start from a split at the median.

    Args:
        per_pair_loss: (N,) floating tensor of per-pair losses (detached inside), e.g.
            ``info_nce_loss(z_a, z_b, reduction="none")`` over the training pairs.
        method: ``"beta"`` or ``"gmm"``.
        threshold: pairs with clean probability > threshold are returned as clean.
        n_iters: EM iterations.

    Returns:
        ``(p_clean, is_clean)``: (N,) fp64 probabilities and (N,) bool mask, on the
        input's device.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = torch.cat([0.1 * torch.rand(80, generator=g), 1 + 0.1 * torch.rand(20, generator=g)])
        >>> p, clean = split_clean_noisy(loss)
        >>> int(clean[:80].sum()), int(clean[80:].sum())
        (80, 0)
    """
    if not isinstance(per_pair_loss, torch.Tensor) or per_pair_loss.ndim != 1:
        is_tensor = isinstance(per_pair_loss, torch.Tensor)
        got = tuple(per_pair_loss.shape) if is_tensor else type(per_pair_loss).__name__
        raise ValueError(f"per_pair_loss must be a (N,) tensor; got {got}")
    if method not in ("beta", "gmm"):
        raise ValueError(f"method must be 'beta' or 'gmm'; got {method!r}")
    x = per_pair_loss.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("per_pair_loss must be finite; got NaN or Inf")
    n = x.shape[0]
    lo, hi = x.min(), x.max()
    if n < 2 or (hi - lo) <= 1e-12 * max(1.0, float(hi.abs())):
        p = torch.ones_like(x)  # nothing to separate: everything is clean
        return p, p > threshold
    x = ((x - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)
    resp = torch.stack([(x <= x.median()).double(), (x > x.median()).double()], dim=1)
    resp = (resp + 1e-3) / (1 + 2e-3)
    for _ in range(n_iters):
        w = resp.sum(dim=0).clamp_min(1e-12)                      # (2,)
        mean = (resp * x[:, None]).sum(dim=0) / w
        var = ((resp * (x[:, None] - mean) ** 2).sum(dim=0) / w).clamp_min(1e-6)
        log_pi = torch.log(w / n)
        if method == "beta":
            var = torch.minimum(var, mean * (1 - mean) * 0.999)    # keep alpha, beta > 0
            common = mean * (1 - mean) / var - 1
            alpha, beta = (mean * common).clamp_min(1e-2), ((1 - mean) * common).clamp_min(1e-2)
            log_lik = _beta_logpdf(x[:, None], alpha, beta)
        else:
            log_lik = _normal_logpdf(x[:, None], mean, var)
        resp = torch.softmax(log_pi + log_lik, dim=1)
    clean = int(torch.argmin(mean))
    p_clean = resp[:, clean]
    if method == "beta":
        # a Beta density can re-rise at the low edge for the noisy component; pairs below the
        # clean mean are clean whatever the density ratio says (monotone posterior in the loss)
        p_clean = torch.where(x <= mean[clean], torch.ones_like(p_clean), p_clean)
    return p_clean, p_clean > threshold
