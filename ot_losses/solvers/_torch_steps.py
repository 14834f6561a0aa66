"""Reference log-domain half-steps in plain torch: the maths every backend must match.

Every function here has a twin of the same name and signature in
``ot_losses.kernels.lse_steps`` (Triton). Conventions shared by both:

- ``cost`` is always 3-D ``(B, N, M)`` (any strides, fp16/bf16/fp32/fp64);
  low precision is upcast to the compute dtype of the potentials.
  ``+inf`` entries are forbidden and contribute nothing.
- ``shift``: ``None`` or ``(r, s)``, ``(B, N)`` and ``(B, M)`` offsets in the
  compute dtype; every step works on ``(C_ij - r_i) - s_j`` instead of
  ``C_ij``, computed in that order. The solvers pick ``r`` from the cost's
  own values (e.g. row minima), so ``C_ij - r_i`` is exact in floating point
  and the potentials stay small: a cost offset of 1e6 in fp32 would
  otherwise leave the potentials 0.06 apart from their true values.
- Potentials and log-weights are ``(B, N)`` / ``(B, M)`` in the compute dtype
  (fp32 or fp64). ``-inf`` in ``h`` means "zero mass", ``+inf`` "no
  partner with mass"; a term meeting a forbidden entry or ``-inf`` weight
  contributes nothing, whatever the other operand (``inf - inf`` is no
  mass, never NaN). A reduction over nothing returns ``-inf``, with zero
  (not NaN) gradients.
- ``eps`` is a Python float (absolute regularisation, cost units).
- ``update``: None, or a ``solvers._update.Update``: the step then returns
  the new potential (the solver's work around the log-sum-exp, fused into
  the Triton kernels' epilogue); here it is ``_update``'s torch composition.

These functions favour clarity over speed; the torch backend's fast path
(``solvers/_scaling.py``) is tested against them.
"""
import torch
import torch.nn.functional as F

from . import _update as U
from ._numerics import block_rows, lse, no_mass, shifted_cost


def _over_eps(p, cost, eps, shift, own=False):
    """``no_mass((p - C') / eps)`` with ``C'`` the shifted cost; ``p`` broadcasts against it.

    Without autograd the N x M temporary is reused in place (one allocation, not three;
    none with ``own``: ``p`` is a full-size temporary of the caller's, overwritten).
    """
    c = shifted_cost(cost, p.dtype, shift)
    if torch.is_grad_enabled() and (p.requires_grad or c.requires_grad):
        return no_mass((p - c) / eps)
    z = p.sub_(c) if own else p - c
    return torch.nan_to_num_(z.div_(eps), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _row_lse(cost, h, eps, shift=None):
    return eps * lse(_over_eps(h.unsqueeze(-2), cost, eps, shift), -1)


def _col_lse(cost, h, eps, shift=None):
    return eps * lse(_over_eps(h.unsqueeze(-1), cost, eps, shift), -2)


def row_lse(cost, h, eps, shift=None, update=None):
    """``eps * lse_j((h_j - C_ij) / eps)``: cost (B, N, M), h (B, M) -> (B, N); or ``update``'s potential."""
    if update is not None:
        return U.lse_update(_row_lse, cost, h, eps, shift, update, True)
    return _row_lse(cost, h, eps, shift)


def col_lse(cost, h, eps, shift=None, update=None):
    """``eps * lse_i((h_i - C_ij) / eps)``: cost (B, N, M), h (B, N) -> (B, M); or ``update``'s potential."""
    if update is not None:
        return U.lse_update(_col_lse, cost, h, eps, shift, update, False)
    return _col_lse(cost, h, eps, shift)


def _logit(cost, u, v, eps, shift):
    return _over_eps(u.unsqueeze(-1) + v.unsqueeze(-2), cost, eps, shift, own=True)


def _sigmoid_lse_block(cost, u, v, eps, shift, dim):
    z = _logit(cost, u, v, eps, shift)
    l1 = lse(F.logsigmoid(z), dim)
    return l1, lse(F.logsigmoid(-z if z.requires_grad else z.neg_()), dim)


def _sigmoid_lse(cost, u, v, eps, shift, dim):
    N = cost.shape[1]
    rows = block_rows(*cost.shape)
    if rows >= N or (torch.is_grad_enabled() and any(t.requires_grad for t in (cost, u, v))):
        l1, l0 = _sigmoid_lse_block(cost, u, v, eps, shift, dim)
        return eps * l1, eps * l0
    # In row blocks: the N x M temporaries (logits, log-sigmoids, the log-sum-exp's exponentials)
    # stay block-sized, so a solve holds no N x M buffer but its result. Column sums combine the
    # blocks' log-sum-exps.
    parts = [_sigmoid_lse_block(cost[:, i:i + rows], u[:, i:i + rows], v, eps,
                                None if shift is None else (shift[0][:, i:i + rows], shift[1]), dim)
             for i in range(0, N, rows)]
    if dim == -1:
        return tuple(eps * torch.cat(side, -1) for side in zip(*parts))
    return tuple(eps * torch.logsumexp(torch.stack(side), 0) for side in zip(*parts))


def _row_sigmoid_lse(cost, u, v, eps, shift=None):
    return _sigmoid_lse(cost, u, v, eps, shift, -1)


def _col_sigmoid_lse(cost, u, v, eps, shift=None):
    return _sigmoid_lse(cost, u, v, eps, shift, -2)


def row_sigmoid_lse(cost, u, v, eps, shift=None, update=None):
    """Log row sums of ``X = sigmoid(z)`` and of ``1 - X``, times eps.

    ``z_ij = (u_i + v_j - C_ij) / eps``; cost (B, N, M), u (B, N), v (B, M).
    Returns ``(eps * lse_j log sigmoid(z_ij), eps * lse_j log sigmoid(-z_ij))``,
    each (B, N); with ``update`` (its ``bias``) the new ``u`` instead.
    Forbidden entries (``C = +inf``) have X = 0, 1 - X = 1.
    """
    if update is not None:
        return U.sigmoid_update(_row_sigmoid_lse, cost, u, v, eps, shift, update, True)
    return _row_sigmoid_lse(cost, u, v, eps, shift)


def col_sigmoid_lse(cost, u, v, eps, shift=None, update=None):
    """Column twin of :func:`row_sigmoid_lse`: two (B, M) tensors, or the new ``v`` with ``update``."""
    if update is not None:
        return U.sigmoid_update(_col_sigmoid_lse, cost, u, v, eps, shift, update, False)
    return _col_sigmoid_lse(cost, u, v, eps, shift)


def log_plan(cost, f, g, eps, shift=None):
    """``(f_i + g_j - C_ij) / eps``: cost (B, N, M), f (B, N), g (B, M) -> (B, N, M).

    The callers fold the reference measure (``eps * log a``, ``eps * log b``)
    into ``f`` and ``g``; forbidden entries and zero-mass lines give ``-inf``.
    """
    return _logit(cost, f, g, eps, shift)


def plan_cost(cost, f, g, eps, shift=None):
    """``<P, C>`` (the unshifted cost) with ``P = exp(log_plan(cost, f, g, eps, shift))``: -> (B,).

    Forbidden entries (``C = +inf``, ``P = 0``) contribute 0, not NaN.
    """
    c = cost.to(f.dtype)
    p = torch.exp(_logit(cost, f, g, eps, shift))
    return torch.where(p > 0, p * c, torch.zeros_like(p)).sum(dim=(-2, -1))


def plan(cost, f, g, eps, scale=None, shift=None):
    """``exp(log_plan(cost, f, g, eps, shift))``, times ``scale`` (B,) per problem if given."""
    p = torch.exp(_logit(cost, f, g, eps, shift))
    return p if scale is None else p * scale.to(p.dtype)[:, None, None]
