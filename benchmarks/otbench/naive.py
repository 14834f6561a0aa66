"""Naive torch references: the maths written plainly (the baseline, and in float64 the reference)."""
import math

import torch


def _as3(cost):
    return cost if cost.dim() == 3 else cost.unsqueeze(0)


def naive_step(cost, f, g, log_a, log_b, eps, damp=1.0):
    """One iteration, rows then columns, plan = a b exp((f + g - C) / eps).

    ``f = -damp * eps * lse_j(log b_j + (g_j - C_ij) / eps)``, then ``g`` likewise
    from the new ``f``; ``damp = rho / (rho + eps)`` for unbalanced, 1 balanced.
    cost (B, N, M) any dtype (upcast on the fly), f (B, N), g (B, M).
    """
    c = cost.to(f.dtype)
    f = -damp * eps * torch.logsumexp(log_b.unsqueeze(-2) + (g.unsqueeze(-2) - c) / eps, dim=-1)
    g = -damp * eps * torch.logsumexp(log_a.unsqueeze(-1) + (f.unsqueeze(-1) - c) / eps, dim=-2)
    return f, g


def naive_sinkhorn(cost, a, b, eps, n_iters, damp=1.0, step=naive_step, dtype=None):
    """Log-domain Sinkhorn loop (eager torch); returns (f, g), each with the batch dim of cost."""
    c = _as3(cost)
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    log_a = torch.log(a.to(dtype)).expand(c.shape[0], -1)
    log_b = torch.log(b.to(dtype)).expand(c.shape[0], -1)
    f = torch.zeros(c.shape[:2], dtype=dtype, device=c.device)
    g = torch.zeros((c.shape[0], c.shape[2]), dtype=dtype, device=c.device)
    for _ in range(n_iters):
        f, g = step(c, f, g, log_a, log_b, eps, damp)
    if cost.dim() == 2:
        f, g = f[0], g[0]
    return f, g


def naive_partial(cost, a, b, eps, n_iters, mass, dtype=None):
    """Entropic partial OT by Dykstra/Bregman projections in the log domain (Benamou et al. 2015).

    Plan ``log P = -C/eps + u_i + v_j + s``; each iteration projects on
    ``{P 1 <= a}``, ``{P^T 1 <= b}``, ``{sum P = mass}`` in turn, with Dykstra's
    corrections (a row vector, a column vector and a scalar, since every
    projection here is a diagonal scaling). Same iterates as POT's
    ``entropic_partial_wasserstein``. Returns the plan (N, M).
    """
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    lk = -cost.to(dtype) / eps
    log_a, log_b = torch.log(a.to(dtype)), torch.log(b.to(dtype))
    n, m = cost.shape
    u = torch.zeros(n, dtype=dtype, device=cost.device)
    v = torch.zeros(m, dtype=dtype, device=cost.device)
    s = math.log(mass) - torch.logsumexp(lk.reshape(-1), 0)
    q1 = torch.zeros_like(u)
    q2 = torch.zeros_like(v)
    q3 = torch.zeros((), dtype=dtype, device=cost.device)
    for _ in range(n_iters):
        u = u + q1
        d1 = torch.clamp_max(log_a - torch.logsumexp(lk + v + s, dim=1) - u, 0.0)
        u, q1 = u + d1, -d1
        v = v + q2
        d2 = torch.clamp_max(log_b - torch.logsumexp(lk + u[:, None] + s, dim=0) - v, 0.0)
        v, q2 = v + d2, -d2
        s = s + q3
        d3 = math.log(mass) - torch.logsumexp((lk + u[:, None] + v + s).reshape(-1), 0)
        s, q3 = s + d3, -d3
    return torch.exp(lk + u[:, None] + v + s)


def naive_multi(cost, k, b, eps, n_iters, dtype=None):
    """Multi-assignment (docs/methods.md, Solvers) by the two-layer log-domain iteration.

    ``X = sigmoid((u_i + v_j - C_ij)/eps)``, rows summing to ``k``, columns to
    ``c_j = k N b_j``. With ``z = (u + v - C)/eps`` one iteration is
    ``u += eps*(log k - log(M - k)) - eps*(lse_j log s(z) - lse_j log s(-z))``
    then the same for ``v`` with ``c_j`` and ``N - c_j``. Returns (u, v).
    """
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    c = cost.to(dtype)
    n, m = c.shape
    col = k * n * b.to(dtype)
    u = torch.zeros(n, dtype=dtype, device=c.device)
    v = torch.zeros(m, dtype=dtype, device=c.device)
    ls = torch.nn.functional.logsigmoid
    for _ in range(n_iters):
        z = (u[:, None] + v - c) / eps
        u = u + eps * (math.log(k) - math.log(m - k)
                       - torch.logsumexp(ls(z), dim=1) + torch.logsumexp(ls(-z), dim=1))
        z = (u[:, None] + v - c) / eps
        v = v + eps * (torch.log(col) - torch.log(n - col)
                       - torch.logsumexp(ls(z), dim=0) + torch.logsumexp(ls(-z), dim=0))
    return u, v


def swav_exp_loop(scores, eps, n_iters):
    """SwAV's ``distributed_sinkhorn`` (world size 1), exp domain, as in docs/methods.md section 1.

    scores (B, K) -> Q (B, K) with rows summing to 1. Prototype side first; in place on its own
    ``Q``, as SwAV's code does (an out-of-place loop allocates and faults in a new ``Q`` per
    division and runs about 2.5x slower on CPU).
    """
    q = torch.exp(scores.float() / eps).t()      # (K, B)
    k_protos, batch = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def multisk_layered(scores, r, eps, n_iters):
    """The official Multi-SK layered algorithm (a (K, B, K) tensor), docs/methods.md 4.2.

    A different algorithm with the same fixed point as ``multi_assignment_sinkhorn(-0.75 S, r)``;
    exp domain, +1e-5 in every denominator. scores (B, K) -> X (B, K).
    """
    s = scores.float()
    batch, k_anchors = s.shape
    w = torch.full((k_anchors, 1, 1), 0.25, dtype=s.dtype, device=s.device)
    w[k_anchors - int(r):] = 1.0
    big = torch.finfo(s.dtype).max

    def fix(t):
        return torch.nan_to_num(t, posinf=big)

    a = fix(torch.exp(w * s.unsqueeze(0) / eps))
    a = a / a.sum()
    target = batch / k_anchors
    for _ in range(n_iters):
        a = fix(a * (target / (a.sum(dim=1, keepdim=True) + 1e-5)))
        a = fix(a / (a.sum(dim=0, keepdim=True) + 1e-5))
        a = fix(a / (a.sum(dim=2, keepdim=True) + 1e-5))
    a = a / a.sum(dim=2, keepdim=True)
    return a[k_anchors - int(r):].sum(dim=0)
