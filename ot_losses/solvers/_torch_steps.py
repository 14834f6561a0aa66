"""Reference log-domain half-steps in plain torch: the maths every backend must match.

Every function here has a twin of the same name and signature in
``ot_losses.kernels.lse_steps`` (Triton). Conventions shared by both:

- ``cost`` is always 3-D ``(B, N, M)`` (any strides, fp16/bf16/fp32/fp64);
  low precision is upcast to the compute dtype of the potentials.
  ``+inf`` entries are forbidden and contribute nothing.
- Potentials and log-weights are ``(B, N)`` / ``(B, M)`` in the compute dtype
  (fp32 or fp64). ``-inf`` in ``h`` means "zero mass": that term contributes
  nothing. A reduction over terms that are all ``-inf`` returns ``-inf``.
- ``eps`` is a Python float (absolute regularisation, cost units).

These functions favour clarity over speed; the torch backend's fast path
(``solvers/_scaling.py``) is tested against them.
"""
import torch
import torch.nn.functional as F


def _upcast(cost, like):
    return cost.to(like.dtype)


def row_lse(cost, h, eps):
    """``eps * lse_j((h_j - C_ij) / eps)``: cost (B, N, M), h (B, M) -> (B, N)."""
    z = (h.unsqueeze(-2) - _upcast(cost, h)) / eps
    return eps * torch.logsumexp(z, dim=-1)


def col_lse(cost, h, eps):
    """``eps * lse_i((h_i - C_ij) / eps)``: cost (B, N, M), h (B, N) -> (B, M)."""
    z = (h.unsqueeze(-1) - _upcast(cost, h)) / eps
    return eps * torch.logsumexp(z, dim=-2)


def _logit(cost, u, v, eps):
    return (u.unsqueeze(-1) + v.unsqueeze(-2) - _upcast(cost, u)) / eps


def row_sigmoid_lse(cost, u, v, eps):
    """Log row sums of ``X = sigmoid(z)`` and of ``1 - X``, times eps.

    ``z_ij = (u_i + v_j - C_ij) / eps``; cost (B, N, M), u (B, N), v (B, M).
    Returns ``(eps * lse_j log sigmoid(z_ij), eps * lse_j log sigmoid(-z_ij))``,
    each (B, N). Forbidden entries (``C = +inf``) have X = 0, 1 - X = 1.
    """
    z = _logit(cost, u, v, eps)
    return (eps * torch.logsumexp(F.logsigmoid(z), dim=-1),
            eps * torch.logsumexp(F.logsigmoid(-z), dim=-1))


def col_sigmoid_lse(cost, u, v, eps):
    """Column twin of :func:`row_sigmoid_lse`: returns two (B, M) tensors."""
    z = _logit(cost, u, v, eps)
    return (eps * torch.logsumexp(F.logsigmoid(z), dim=-2),
            eps * torch.logsumexp(F.logsigmoid(-z), dim=-2))


def log_plan(cost, f, g, eps):
    """``(f_i + g_j - C_ij) / eps``: cost (B, N, M), f (B, N), g (B, M) -> (B, N, M).

    The callers fold the reference measure (``eps * log a``, ``eps * log b``)
    into ``f`` and ``g``; forbidden entries give ``-inf``.
    """
    return _logit(cost, f, g, eps)


def plan_cost(cost, f, g, eps):
    """``<P, C>`` with ``P = exp(log_plan(cost, f, g, eps))``: -> (B,).

    Forbidden entries (``C = +inf``, ``P = 0``) contribute 0, not NaN.
    """
    c = _upcast(cost, f)
    p = torch.exp(_logit(cost, f, g, eps))
    return torch.where(p > 0, p * c, torch.zeros_like(p)).sum(dim=(-2, -1))


def plan(cost, f, g, eps, scale=None):
    """``exp(log_plan(cost, f, g, eps))``, times ``scale`` (B,) per problem if given."""
    p = torch.exp(_logit(cost, f, g, eps))
    return p if scale is None else p * scale.to(p.dtype)[:, None, None]
