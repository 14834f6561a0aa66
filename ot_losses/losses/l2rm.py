"""L2RM: learning to rematch mismatched pairs (Han et al., CVPR 2024), METHODS.md section 3.

The presumed-noisy pairs of a batch are re-matched by dummy-point partial OT
on a (learned) cost, the given pairs ``(i, i)`` being forbidden; the model's
similarities are then pulled towards the row-normalised plan by a symmetric
KL divergence. A two-component mixture on per-pair losses splits the data
into clean and noisy pairs.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..solvers.partial import partial_ot
from .. import _validate as V
from ._common import loss_dtype, no_autocast

__all__ = ["L2RMCost", "L2RMDetails", "L2RMLoss", "l2rm_loss", "split_clean_noisy"]

_CLIP = 1e-10  # official clip of the plan (and of the learned cost) before use


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
    plan: torch.Tensor
    cost: torch.Tensor
    mass: float
    marginal_error: float
    converged: bool
    n_iters: int


def _sym_kl(sim, plan, tau):
    """METHODS 3.4: 1/2 [KL(L||P) + KL(P||L)] for both directions, batchmean, log-softmax."""
    log_p_i2t = F.log_softmax(sim / tau, dim=1)
    log_p_t2i = F.log_softmax(sim.T / tau, dim=1)
    clipped = plan.clamp_min(_CLIP)
    log_l_i2t = torch.log(clipped / clipped.sum(dim=1, keepdim=True))
    log_l_t2i = torch.log(clipped.T / clipped.T.sum(dim=1, keepdim=True))

    def kl(log_t, log_p):  # PyTorch KLDivLoss(reduction="batchmean") with log-target
        return (log_t.exp() * (log_t - log_p)).sum() / log_t.shape[0]

    return 0.5 * (kl(log_l_i2t, log_p_i2t) + kl(log_l_t2i, log_p_t2i)
                  + kl(log_p_i2t, log_l_i2t) + kl(log_p_t2i, log_l_t2i))


def l2rm_loss(sim, *, cost=None, mass=0.1, eps=0.07, tau=0.05, forbid_diagonal=True, n_iters=1000,
              tol=1e-6, backend="auto", process_group=None, return_details=False):
    """Symmetric KL between the model's matching distributions and a partial-OT rematching.

    Plan: ``partial_ot(cost, mass=mass, eps=eps, method="dummy")`` with uniform
    marginals and the given pairs ``(i, i)``, ``i < min(n, m)``, forbidden
    (``+inf`` on a copy of the cost). Loss (METHODS.md 3.4), with
    ``P_i2t = softmax_rows(S / tau)``, ``P_t2i = softmax_rows(S^T / tau)``,
    ``L_i2t = rownorm(max(plan, 1e-10))``, ``L_t2i = rownorm(max(plan, 1e-10)^T)``
    and batch-mean KL:
    ``1/2 [KL(L_i2t||P_i2t) + KL(L_t2i||P_t2i) + KL(P_i2t||L_i2t) + KL(P_t2i||L_t2i)]``.

    Args:
        sim: (n, m) floating tensor, model similarities of the (presumed noisy)
            batch, rows = images, columns = captions; gradients flow through it.
        cost: optional (n, m) cost (e.g. from :class:`L2RMCost`), detached and
            clipped to ``>= 1e-10``; default ``relu(1 - sim.detach())``.
        mass: transported mass ``s`` of the partial OT, 0 < mass <= 1 (L2RM: 0.1).
        eps: positive float, entropic regularisation in cost units (L2RM: 0.07; F30K 0.01).
        tau: positive float, softmax temperature of the model's distributions.
        forbid_diagonal: forbid the given pairs ``(i, i)`` (L2RM: whenever noise > 0).
        n_iters, tol: solver iteration cap and tolerance (see :func:`ot_losses.partial_ot`).
        backend: solver backend passed to :func:`ot_losses.partial_ot`.
        process_group: must be None. A sharded L2RM would need autograd through
            the column softmax of the global (N, N) similarity and a learned
            cost net whose own optimiser steps outside DDP; for data-parallel
            training, gather the embeddings with gradient
            (``torch.distributed.nn.functional.all_gather``), build the global
            ``sim`` on every rank and call this loss without a group: DDP's
            gradient average then equals one process on the whole batch.
        return_details: also return an :class:`L2RMDetails`.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 ``sim``); with ``return_details``, ``(loss, details)``.
        The plan carries no gradient.

    Raises:
        TypeError / ValueError: ``sim`` not (n, m) floating, ``cost`` of another shape or
            device, non-positive ``tau``; the solver raises for ``mass`` / ``eps`` out of range.

    Example:
        >>> import torch
        >>> sim = torch.rand(6, 6, requires_grad=True)
        >>> loss = l2rm_loss(sim, backend="torch")
        >>> loss.backward()

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
    V.check_positive(tau, "tau")
    dtype = loss_dtype(sim)
    n, m = sim.shape
    with torch.no_grad(), no_autocast(sim.device):
        if cost is None:
            c = torch.relu(1.0 - sim.detach().to(dtype))
        else:
            c = cost.detach().to(dtype)
        c = c.clamp_min(_CLIP)
        if forbid_diagonal:
            d = min(n, m)
            eye = torch.zeros(n, m, dtype=torch.bool, device=sim.device)
            eye[torch.arange(d), torch.arange(d)] = True
            c = torch.where(eye, torch.full_like(c, math.inf), c)  # a copy; inputs untouched
        res = partial_ot(c, mass=mass, eps=eps, method="dummy", n_iters=n_iters, tol=tol, grad="none",
                         backend=backend)
        plan = res.plan.to(dtype)
    with no_autocast(sim.device):
        loss = _sym_kl(sim.to(dtype), plan, tau)
    if not return_details:
        return loss
    return loss, L2RMDetails(plan=plan, cost=c, mass=float(res.mass),
                             marginal_error=float(res.marginal_error), converged=bool(res.converged),
                             n_iters=int(res.n_iters))


class L2RMCost(nn.Module):
    """L2RM's self-supervised cost function: ``C = relu(S W^T + b)``, ``W = -I``, ``b = 1``.

    The linear layer mixes the similarities of one row (image) to all
    ``batch_size`` columns (captions), so at initialisation ``C = relu(1 - S)``.

    Args:
        batch_size: number of columns m of the similarity matrices it maps.

    Example:
        >>> import torch
        >>> s = torch.rand(3, 4)
        >>> torch.allclose(L2RMCost(4)(s), torch.relu(1 - s))
        True
    """

    def __init__(self, batch_size):
        super().__init__()
        V.check_count(batch_size, "batch_size", 1)
        self.batch_size = batch_size
        self.linear = nn.Linear(batch_size, batch_size)
        with torch.no_grad():
            self.linear.weight.copy_(-torch.eye(batch_size))
            self.linear.bias.fill_(1.0)

    def forward(self, sim):
        """(n, batch_size) similarities -> (n, batch_size) non-negative costs."""
        V.check_matrix(sim, "sim", cols=self.batch_size, cols_desc="batch_size")
        return torch.relu(F.linear(sim.to(self.linear.weight.dtype), self.linear.weight, self.linear.bias))


class L2RMLoss(nn.Module):
    """Holds the learned cost (:class:`L2RMCost`, its own Adam) and the settings of :func:`l2rm_loss`.

    ``forward(sim)``: the cost net (eval mode, no grad) maps ``sim.detach()`` to the
    cost, then :func:`l2rm_loss`. ``cost_step(sim_keys, matches)``: one Adam step
    (``lr_cost``) on ``sum(Y * C(sim_keys))``, Y the 0/1 matrix of known matches
    (L2RM plants k ~ U{1..0.1 m} clean pairs into the image queue).

    Args:
        batch_size: columns m of the similarity matrices (L2RM: 128).
        mass, eps, tau, forbid_diagonal, n_iters, tol, backend: as in :func:`l2rm_loss`.
        lr_cost: learning rate of the cost net (L2RM: 2e-6).
        process_group: must be None (see :func:`l2rm_loss` for data-parallel use).

    Example:
        >>> import torch
        >>> loss_fn = L2RMLoss(6, backend="torch")
        >>> sim = torch.rand(6, 6, requires_grad=True)
        >>> loss_fn(sim).backward()
        >>> _ = loss_fn.cost_step(torch.rand(6, 6), torch.tensor([[0, 2], [3, 1]]))
    """

    def __init__(self, batch_size, *, mass=0.1, eps=0.07, tau=0.05, forbid_diagonal=True, n_iters=1000,
                 tol=1e-6, lr_cost=2e-6, backend="auto", process_group=None):
        super().__init__()
        V.check_l2rm_group(process_group)
        V.check_positive(tau, "tau")
        V.check_positive(eps, "eps")
        V.check_positive(lr_cost, "lr_cost")
        self.cost_net = L2RMCost(batch_size)
        self.mass, self.eps, self.tau = mass, eps, tau
        self.forbid_diagonal, self.n_iters, self.tol, self.backend = forbid_diagonal, n_iters, tol, backend
        self.lr_cost = lr_cost
        self._cost_optimizer = None

    def cost(self, sim):
        """The cost the OT step uses: cost net in eval mode on ``sim.detach()``, no grad, >= 1e-10."""
        was_training = self.cost_net.training
        self.cost_net.eval()
        with torch.no_grad():
            c = self.cost_net(sim.detach()).clamp_min(_CLIP)
        self.cost_net.train(was_training)
        return c

    def forward(self, sim, return_details=False):
        """Loss for one noisy batch ``sim`` (n, batch_size); see :func:`l2rm_loss`."""
        V.check_matrix(sim, "sim", cols=self.cost_net.batch_size, cols_desc="batch_size")
        return l2rm_loss(sim, cost=self.cost(sim).to(sim.device), mass=self.mass, eps=self.eps, tau=self.tau,
                         forbid_diagonal=self.forbid_diagonal, n_iters=self.n_iters, tol=self.tol,
                         backend=self.backend, return_details=return_details)

    def cost_step(self, sim_keys, matches):
        """One self-supervised update of the cost net: minimise ``sum(Y * C(sim_keys))``.

        Args:
            sim_keys: (n, batch_size) similarities (no grad needed) of queue images
                into which known-clean images were planted, vs. the clean captions.
            matches: either an (n, batch_size) 0/1 (bool or float) matrix ``Y``, or a
                (k, 2) integer tensor of (row, column) indices of the known matches.

        Returns:
            The detached scalar ``sum(Y * C)`` before the step.
        """
        V.check_matrix(sim_keys, "sim_keys", cols=self.cost_net.batch_size, cols_desc="batch_size")
        y = self._match_matrix(matches, sim_keys)
        if self._cost_optimizer is None:
            self._cost_optimizer = torch.optim.Adam(self.cost_net.parameters(), lr=self.lr_cost)
        self.cost_net.train()
        self._cost_optimizer.zero_grad(set_to_none=True)
        with no_autocast(sim_keys.device):
            value = (y * self.cost_net(sim_keys.detach().float())).sum()
        value.backward()
        self._cost_optimizer.step()
        self._cost_optimizer.zero_grad(set_to_none=True)  # keep outer optimisers from re-applying it
        return value.detach()

    @staticmethod
    def _match_matrix(matches, sim_keys):
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
def _beta_logpdf(x, alpha, beta):
    return ((alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x)
            - (torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)))


def _normal_logpdf(x, mean, var):
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def split_clean_noisy(per_pair_loss, *, method="beta", threshold=0.5, n_iters=50):
    """Probability that each pair is clean, from a two-component 1-D mixture on its loss.

    L2RM (like DivideMix/NCR) fits a two-component mixture to the per-pair losses;
    the component with the smaller mean is "clean". Losses are min-max scaled to
    ``[1e-4, 1 - 1e-4]``. ``method="beta"`` (L2RM's choice) fits a Beta mixture by
    EM with weighted method-of-moments M-steps; ``method="gmm"`` a Gaussian
    mixture by EM (variances floored at 1e-6). Both start from a split at the median.

    Args:
        per_pair_loss: (N,) floating tensor of per-pair losses (detached inside).
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
