"""Torch half-steps over a :class:`~ot_losses.FeatureCost`, streamed by row (or column) chunks.

Same names, signatures and semantics as ``_torch_steps`` with a feature cost
in place of the dense ``(B, N, M)`` cost (the tests compare each step with its
``_torch_steps`` twin on ``cost.dense()``); ``kernels/feature_lse.py`` is the
Triton twin. A chunk is a ``(B, rows, M)`` tile of C (or ``(B, cols, N)`` of
``C^T`` for a column pass, so every reduction runs over the last, contiguous
axis), computed by one ``bmm`` and sized so that the step's temporaries fit
in ``cost.workspace`` bytes. Without autograd the tile is reused in place;
with it (``grad="unroll"``) the same formulas run out of place.

``shift = (r, s)`` (the solvers' offsets, see ``_torch_steps``) is folded
into the rank-one terms of the tile, ``alpha_i - r_i`` and ``beta_j - s_j``,
so a shifted tile costs nothing extra.

Extra steps of this namespace: ``feature_grads`` (the envelope gradient's
plan-weighted sums) and the streamed reductions the solvers' set-up needs,
``line_stats`` and ``max_cost`` (differentiable: the extreme entries are
found without a graph, then recomputed from x and y).
"""
import torch
import torch.nn.functional as F

from .. import _validate as V
from ..features import _feature_grads, _tile, workspace_rows
from ._numerics import lse, no_mass
from ._update import takes_update

# Live (B, rows, length) temporaries per chunk without autograd, for the chunk size.
# (With autograd, grad="unroll", the graph keeps every tile anyway.)
_LSE_TEMPS = 1       # the tile, reused in place for z and exp(z - max)
_SIGMOID_TEMPS = 6   # the tile, z and its partial sums, a log-sigmoid, the log-sum-exp's two temporaries
_PLAN_TEMPS = 2      # the tile and the plan tile (plan_cost, feature_grads)
_LOG_PLAN_TEMPS = 3  # f + g, minus the tile, over eps (the output itself is the dense result)


def _graph(*ts):
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _chunks(cost, dtype, by_row, temps):
    """``(start, stop)`` of the row chunks (``by_row``) or column chunks of one pass."""
    B, N, M = cost.shape
    R, K = (N, M) if by_row else (M, N)
    step = workspace_rows(cost.workspace, B, K, torch.finfo(dtype).bits // 8, temps)
    return [(s, min(R, s + step)) for s in range(0, R, step)]


def _lse_last(z):
    """Log-sum-exp over the last axis; without autograd, in place on the temporary ``z``."""
    if _graph(z):
        return lse(z, -1)
    m = z.amax(-1, keepdim=True)
    m = m.masked_fill(~torch.isfinite(m), 0.0)   # all -inf gives log 0 = -inf; a +inf term gives +inf
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _lse_chunk(t, s, e, h, eps, by_row):
    # One function per chunk: the tile is freed on return, before the next one is built.
    c = _tile(t, s, e, by_row)
    # (h_k - C_rk) / eps, computed as (C - h) / (-eps): the same rounding. C is finite, so no NaN.
    z = (h.unsqueeze(-2) - c) / eps if _graph(c, h) else c.sub_(h.unsqueeze(-2)).div_(-eps)
    return eps * _lse_last(z)


def _lse(cost, h, eps, by_row, shift):
    t = cost._terms(h.dtype).shifted(shift)
    return torch.cat([_lse_chunk(t, s, e, h, eps, by_row)
                      for s, e in _chunks(cost, h.dtype, by_row, _LSE_TEMPS)], dim=1)


@takes_update(by_row=True)
def row_lse(cost, h, eps, shift=None):
    """``eps * lse_j((h_j - C_ij) / eps)``: cost (B, N, M) features, h (B, M) -> (B, N)."""
    return _lse(cost, h, eps, True, shift)


@takes_update(by_row=False)
def col_lse(cost, h, eps, shift=None):
    """``eps * lse_i((h_i - C_ij) / eps)``: cost (B, N, M) features, h (B, N) -> (B, M)."""
    return _lse(cost, h, eps, False, shift)


def _sigmoid_chunk(t, s, e, p, h, eps, by_row):
    z = no_mass((p[:, s:e].unsqueeze(-1) + h.unsqueeze(-2) - _tile(t, s, e, by_row)) / eps)
    return eps * lse(F.logsigmoid(z), -1), eps * lse(F.logsigmoid(-z), -1)


def _sigmoid_lse(cost, p, h, eps, by_row, shift):
    t = cost._terms(p.dtype).shifted(shift)
    pairs = [_sigmoid_chunk(t, s, e, p, h, eps, by_row)
             for s, e in _chunks(cost, p.dtype, by_row, _SIGMOID_TEMPS)]
    return torch.cat([a for a, _ in pairs], dim=1), torch.cat([b for _, b in pairs], dim=1)


@takes_update(by_row=True, sigmoid=True)
def row_sigmoid_lse(cost, u, v, eps, shift=None):
    """``(eps lse_j log sigmoid(z_ij), eps lse_j log sigmoid(-z_ij))``, each (B, N).

    ``z_ij = (u_i + v_j - C_ij) / eps``; cost (B, N, M) features, u (B, N), v (B, M).
    """
    return _sigmoid_lse(cost, u, v, eps, True, shift)


@takes_update(by_row=False, sigmoid=True)
def col_sigmoid_lse(cost, u, v, eps, shift=None):
    """Column twin of :func:`row_sigmoid_lse`: returns two (B, M) tensors."""
    return _sigmoid_lse(cost, v, u, eps, False, shift)


def log_plan(cost, f, g, eps, shift=None):
    """``(f_i + g_j - C_ij) / eps`` -> (B, N, M): materialises the plan's logarithm."""
    t = cost._terms(f.dtype).shifted(shift)
    B, N, M = cost.shape
    out = torch.empty((B, N, M), dtype=f.dtype, device=f.device)
    for s, e in _chunks(cost, f.dtype, True, _LOG_PLAN_TEMPS):
        out[:, s:e] = no_mass((f[:, s:e].unsqueeze(-1) + g.unsqueeze(-2) - _tile(t, s, e, True)) / eps)
    return out


def plan(cost, f, g, eps, scale=None, shift=None):
    """``exp(log_plan(cost, f, g, eps, shift))``, times ``scale`` (B,) per problem if given: (B, N, M)."""
    p = torch.exp(log_plan(cost, f, g, eps, shift))
    return p if scale is None else p * scale.to(p.dtype)[:, None, None]


def _plan_tile(t, s, e, f, g, eps):
    """Shifted cost rows ``s:e`` and their plan ``exp((f_i + g_j - C_ij)/eps)``, (B, e - s, M) each."""
    c = _tile(t, s, e, True)
    if _graph(c, f, g):
        return c, torch.exp(no_mass((f[:, s:e].unsqueeze(-1) + g.unsqueeze(-2) - c) / eps))
    z = torch.add(f[:, s:e].unsqueeze(-1), g.unsqueeze(-2)).sub_(c).div_(eps)   # two tiles alive, not four
    return c, z.masked_fill_(torch.isnan(z), float("-inf")).exp_()


def _plan_cost_chunk(t, s, e, f, g, eps, shift):
    c, p = _plan_tile(t, s, e, f, g, eps)
    B = c.shape[0]
    out = torch.bmm(p.reshape(B, 1, -1), c.reshape(B, -1, 1)).reshape(B)   # <P, C~> without a P * C tile
    if shift is not None:   # C = C~ + r_i (+ s_j)
        out = out + (p.sum(-1) * shift[0][:, s:e]).sum(-1)
        if shift[1] is not None:
            out = out + (p.sum(-2) * shift[1]).sum(-1)
    return out


def plan_cost(cost, f, g, eps, shift=None):
    """``<P, C>`` (the unshifted cost) with ``P = exp(log_plan(cost, f, g, eps, shift))``, streamed: (B,)."""
    t = cost._terms(f.dtype).shifted(shift)
    return sum(_plan_cost_chunk(t, s, e, f, g, eps, shift)
               for s, e in _chunks(cost, f.dtype, True, _PLAN_TEMPS))


def _grad_chunk(t, s, e, f, g, eps, cols, py):
    """Row sums and ``P ys`` of rows ``s:e``; adds their column sums and ``P^T xs`` to ``cols``, ``py``."""
    _, p = _plan_tile(t, s, e, f, g, eps)
    cols += p.sum(-2)
    py += torch.bmm(p.transpose(1, 2), t.xs[:, s:e])
    return p.sum(-1), torch.bmm(p, t.ys)


def feature_grads(cost, f, g, eps, scale=None, shift=None):
    """Gradients of ``<P, C>`` at fixed ``P = exp((f_i + g_j - C_ij)/eps)`` w.r.t. the features.

    Envelope theorem: this is ``d value / d (x, y)``. One streamed pass
    accumulates the row sums, column sums, ``P (sy y)`` and ``P^T (sx x)``;
    returns ``(B, N, D)`` and ``(B, M, D)`` in the dtype of ``f``, times
    ``scale`` (B,) if given. ``shift`` only enters P (the offsets are constants).
    """
    t = cost._terms(f.dtype).shifted(shift)
    B, N, M = cost.shape
    cols = f.new_zeros((B, M))
    py = f.new_zeros((B, M, t.x.shape[-1]))
    parts = [_grad_chunk(t, s, e, f, g, eps, cols, py) for s, e in _chunks(cost, f.dtype, True, _PLAN_TEMPS)]
    rows, px = torch.cat([r for r, _ in parts], 1), torch.cat([q for _, q in parts], 1)
    gx, gy = _feature_grads(t, rows, cols, px, py)
    if scale is not None:
        scale = scale.to(f.dtype)[:, None, None]
        gx, gy = gx * scale, gy * scale
    return gx, gy


# ----------------------------------------------------------------------------- set-up reductions
def _entries(cost, dtype, rows, cols):
    """``C[b, rows[b, k], cols[b, k]]`` recomputed from the features (differentiable): (B, K)."""
    t = cost._terms(dtype)

    def pick(v, i):
        return torch.gather(v, 1, i)

    def pick_rows(m, i):
        return torch.gather(m, 1, i.unsqueeze(-1).expand(-1, -1, m.shape[-1]))

    dot = (pick_rows(t.xs, rows) * pick_rows(t.ys, cols)).sum(-1)
    return pick(t.alpha, rows) + pick(t.beta, cols) - dot


def _stats_chunk(t, s, e, cols):
    """Row extremes of rows ``s:e`` (values, indices); folds their column extremes into ``cols``."""
    c = _tile(t, s, e, True)
    rows = c.min(-1) + c.max(-1)
    out = []
    for (v, i), (run_v, run_i), better in ((c.min(-2), cols[:2], torch.lt), (c.max(-2), cols[2:], torch.gt)):
        take = better(v, run_v)
        out += [torch.where(take, v, run_v), torch.where(take, i + s, run_i)]
    return rows, out


def line_stats(cost):
    """``(row_min, row_max, col_min, col_max)`` of C, ``(B, N)`` and ``(B, M)``, in one streamed pass.

    What ``check_cost_values`` returns for a dense cost (a feature cost has no
    forbidden entries), in the compute dtype; differentiable in x and y.
    """
    dtype = V.compute_dtype(cost)
    B, N, M = cost.shape
    with torch.no_grad():
        t = cost._terms(dtype)
        inf = torch.full((B, M), float("inf"), dtype=dtype, device=cost.device)
        zero = torch.zeros((B, M), dtype=torch.long, device=cost.device)
        cols, rows = [inf, zero, -inf, zero], []
        for s, e in _chunks(cost, dtype, True, _LSE_TEMPS):
            r, cols = _stats_chunk(t, s, e, cols)
            rows.append(r)
        row_min, row_imin, row_max, row_imax = (torch.cat([r[k] for r in rows], 1) for k in range(4))
    if not _graph(cost.x, cost.y):
        return row_min, row_max, cols[0], cols[2]
    # the extreme entries again, from the features: their gradient is that of the min / max
    n, m = (torch.arange(k, device=cost.device).expand(B, k) for k in (N, M))
    return (_entries(cost, dtype, n, row_imin), _entries(cost, dtype, n, row_imax),
            _entries(cost, dtype, cols[1], m), _entries(cost, dtype, cols[3], m))


def _row_max_chunk(t, s, e):
    return _tile(t, s, e, True).max(-1)


def max_cost(cost):
    """``(B,)`` largest entry of each problem's cost (the dummy method's ``max C``); differentiable."""
    dtype = V.compute_dtype(cost)
    with torch.no_grad():
        t = cost._terms(dtype)
        parts = [_row_max_chunk(t, s, e) for s, e in _chunks(cost, dtype, True, _LSE_TEMPS)]
        vals, idx = torch.cat([v for v, _ in parts], 1), torch.cat([i for _, i in parts], 1)
    best, row = vals.max(-1)
    if not _graph(cost.x, cost.y):
        return best
    col = torch.gather(idx, 1, row.unsqueeze(-1))
    return _entries(cost, dtype, row.unsqueeze(-1), col).squeeze(-1)
