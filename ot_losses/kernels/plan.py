"""Triton plan kernels: log-plan, plan and ``<plan, cost>`` from potentials.

Twins of ``log_plan``, ``plan`` and ``plan_cost`` in
``ot_losses.solvers._torch_steps``. One elementwise tile kernel with a
constexpr ``MODE``; the cost is read once, in any strides, cast at load to the
potentials' dtype. ``plan_cost`` writes one partial sum per tile and the
launcher sums them with torch (deterministic, no atomics); forbidden entries
(``C = +inf``, plan 0) contribute 0, not NaN.
"""
import torch
import triton
import triton.language as tl

from . import _check_operands, _device_of, _full_shift
from ._jit import _no_mass, _shifted

__all__ = ["log_plan", "plan", "plan_cost"]

LOG_PLAN, PLAN, PLAN_COST = 0, 1, 2


@triton.jit
def _plan_kernel(
    cost_ptr, f_ptr, g_ptr, scale_ptr, out_ptr, r_ptr, s_ptr,
    N, M, n_nblocks, n_mblocks,
    stride_cb, stride_cn, stride_cm,
    stride_fb, stride_fn, stride_gb, stride_gm, stride_sb,
    stride_ob, stride_on, stride_om,   # (B, N, M) output; PLAN_COST: (B, n_tiles), on = om = 0
    stride_rb, stride_rn,              # row offsets r (B, N) of the cost shift
    stride_tb, stride_tm,              # column offsets s (B, M)
    eps: tl.float64,
    MODE: tl.constexpr,                # 0: log plan, 1: plan, 2: per-tile sum of plan * cost
    HAS_SCALE: tl.constexpr,           # PLAN only: multiply problem b by scale[b]
    HAS_SHIFT: tl.constexpr,           # the potentials are those of (C - r) - s
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles = n_nblocks * n_mblocks
    b = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    rows = (tile // n_mblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (tile % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    col_mask = cols < M
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    dtype = f_ptr.dtype.element_ty
    eps_c = tl.full((), eps, dtype)
    c = tl.load(cost_ptr + b * stride_cb + rows64[:, None] * stride_cn + cols64[None, :] * stride_cm,
                mask=mask, other=float("inf")).to(dtype)
    f = tl.load(f_ptr + b * stride_fb + rows64 * stride_fn, mask=row_mask, other=0.0).to(dtype)
    g = tl.load(g_ptr + b * stride_gb + cols64 * stride_gm, mask=col_mask, other=0.0).to(dtype)
    c_shifted = c
    if HAS_SHIFT:
        r = tl.load(r_ptr + b * stride_rb + rows64 * stride_rn, mask=row_mask, other=0.0).to(dtype)
        s = tl.load(s_ptr + b * stride_tb + cols64 * stride_tm, mask=col_mask, other=0.0).to(dtype)
        c_shifted = _shifted(c, r[:, None], s[None, :])
    z = (f[:, None] + g[None, :] - c_shifted) / eps_c
    z = _no_mass(z)  # inf - inf: a forbidden entry meeting an infinite potential
    if MODE == 2:
        p = tl.exp(z)
        contrib = p * tl.where(p > 0, c, 0.0)  # masked/forbidden: p = 0, never 0 * inf
        tl.store(out_ptr + b * stride_ob + tile, tl.sum(tl.sum(contrib, axis=1), axis=0))
    else:
        if MODE == 1:
            z = tl.exp(z)
            if HAS_SCALE:
                z = z * tl.load(scale_ptr + b * stride_sb).to(dtype)
        offs = b * stride_ob + rows64[:, None] * stride_on + cols64[None, :] * stride_om
        tl.store(out_ptr + offs, z, mask=mask)


def _blocks(cost):
    """Tile (BLOCK_N, BLOCK_M): the long side on the cost's unit-stride axis."""
    _, N, M = cost.shape
    _, sn, sm = cost.stride()
    if abs(sm) <= abs(sn):
        return min(16, triton.next_power_of_2(N)), min(128, triton.next_power_of_2(M))
    return min(64, triton.next_power_of_2(N)), min(32, triton.next_power_of_2(M))


def _launch(cost, f, g, eps, mode, scale=None, shift=None):
    rows, cols = [("f", f)], [("g", g)]
    shift = _full_shift(cost, shift)
    if shift is not None:
        rows, cols = rows + [("shift[0] (r)", shift[0])], cols + [("shift[1] (s)", shift[1])]
    r, s = shift if shift is not None else (f, g)
    _check_operands(cost, rows=rows, cols=cols, batch=[("scale", scale)] if scale is not None else ())
    B, N, M = cost.shape
    BLOCK_N, BLOCK_M = _blocks(cost)
    n_nblocks, n_mblocks = triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M)
    if mode == PLAN_COST:
        out = torch.empty((B, n_nblocks * n_mblocks), dtype=f.dtype, device=f.device)
        so = (out.stride(0), 0, 0)
    else:
        out = torch.empty((B, N, M), dtype=f.dtype, device=f.device)
        so = out.stride()
    with _device_of(cost):
        _plan_kernel[(B * n_nblocks * n_mblocks,)](
            cost_ptr=cost, f_ptr=f, g_ptr=g, scale_ptr=scale if scale is not None else f, out_ptr=out,
            r_ptr=r, s_ptr=s, stride_rb=r.stride(0), stride_rn=r.stride(1),
            stride_tb=s.stride(0), stride_tm=s.stride(1), HAS_SHIFT=shift is not None,
            N=N, M=M, n_nblocks=n_nblocks, n_mblocks=n_mblocks,
            stride_cb=cost.stride(0), stride_cn=cost.stride(1), stride_cm=cost.stride(2),
            stride_fb=f.stride(0), stride_fn=f.stride(1), stride_gb=g.stride(0), stride_gm=g.stride(1),
            stride_sb=scale.stride(0) if scale is not None else 0,
            stride_ob=so[0], stride_on=so[1], stride_om=so[2],
            eps=float(eps), MODE=mode, HAS_SCALE=scale is not None,
            BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, num_warps=4,
        )
    return out.sum(dim=-1) if mode == PLAN_COST else out


def log_plan(cost, f, g, eps, shift=None):
    """``(f_i + g_j - C_ij) / eps``: cost (B, N, M), f (B, N), g (B, M) -> (B, N, M)."""
    return _launch(cost, f, g, eps, LOG_PLAN, shift=shift)


def plan(cost, f, g, eps, scale=None, shift=None):
    """``exp(log_plan(cost, f, g, eps, shift))``, times ``scale`` (B,) per problem if given."""
    return _launch(cost, f, g, eps, PLAN, scale, shift)


def plan_cost(cost, f, g, eps, shift=None):
    """``<P, C>`` (the unshifted cost) with ``P = exp(log_plan(cost, f, g, eps, shift))``: -> (B,)."""
    return _launch(cost, f, g, eps, PLAN_COST, shift=shift)
