"""Numerical helpers shared by the reference steps, the fast path and the solvers."""
import torch


# Elements per block of the row-blocked computations (the compensated subtraction, the
# sigmoid steps): their temporaries stay a few MB (and in cache) instead of N x M buffers.
_BLOCK = 2 ** 18


def block_rows(B, N, M):
    """Rows per block of a (B, N, M) computation whose blocks hold at most ``_BLOCK`` elements."""
    return N if B * N * M <= _BLOCK else max(1, _BLOCK // (B * M))


def shifted_cost(cost, dtype, shift=None):
    """``C_ij - r_i - s_j`` in ``dtype`` (the cost itself when ``shift`` is None).

    ``C - r`` is computed with its rounding error (Knuth's TwoSum) and the
    error added back after subtracting ``s``: with large row and column
    offsets the shifted entries are small and would otherwise inherit the
    rounding of the large intermediate ``C - r`` (ulp(1e5) = 0.008 in fp32,
    a 40% plan error at eps = 0.02). Forbidden entries stay ``+inf``. The
    compensated form is computed in blocks of rows, so it allocates the
    output and block-sized temporaries only.
    """
    if shift is None:
        return cost.to(dtype)
    if shift[1] is None:  # one offset per row (or per problem): C_ij - r_i is exact where it matters
        return cost.to(dtype) - shift[0].unsqueeze(-1)
    r, s = shift[0].unsqueeze(-1), shift[1].unsqueeze(-2)
    B, N, M = cost.shape
    rows = block_rows(B, N, M)
    if rows >= N:
        return _compensated(cost.to(dtype), r, s)
    out = torch.empty((B, N, M), dtype=dtype, device=cost.device)
    for i in range(0, N, rows):
        out[:, i:i + rows] = _compensated(cost[:, i:i + rows].to(dtype), r[:, i:i + rows], s)
    return out


def _compensated(c, r, s):
    t = c - r
    back = t - c
    err = (c - (t - back)) - (r + back)
    return torch.where(torch.isinf(c), c, (t - s) + err)


def in_cost_units(f, g, shift):
    """Potentials of the shifted cost back in the cost's own units: ``(f + r, g + s)``."""
    if shift is None:
        return f, g
    return f + shift[0], (g if shift[1] is None else g + shift[1])


def no_mass(z):
    """Map NaN (an ``inf - inf`` meeting of a forbidden entry or a zero-mass line) to ``-inf``."""
    return torch.nan_to_num(z, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def weighted_exp(w, log_ratio):
    """``w * exp(log_ratio)``, exactly 0 where ``w = 0`` even if the exponential overflows.

    A zero-mass line's ratio is that of a line it does not have; the double
    ``where`` keeps ``0 * inf`` (NaN) out of both the value and its gradient.
    """
    live = w > 0
    return torch.where(live, w * torch.exp(log_ratio.masked_fill(~live, 0.0)), torch.zeros_like(w))


def lse(z, dim):
    """``logsumexp`` along ``dim``, ``-inf`` for an all ``-inf`` slice, with zero gradient there."""
    if not (z.requires_grad and torch.is_grad_enabled()):
        return torch.logsumexp(z, dim)  # same value; the guards below only matter for gradients
    m = z.detach().amax(dim=dim, keepdim=True)
    m = m.masked_fill(~torch.isfinite(m), 0.0)
    s = torch.exp(z - m).sum(dim)
    m = m.squeeze(dim)
    empty = s <= 0
    # Two wheres: log(0) would send inf * 0 = NaN back through an unused branch.
    out = torch.log(s.masked_fill(empty, 1.0)) + m
    return out.masked_fill(empty, float("-inf"))
