"""Triton half-steps over a :class:`~ot_losses.FeatureCost`: cost tiles from ``tl.dot``, never stored.

Twin of ``ot_losses.solvers._feature_steps`` (same names, signatures and
semantics; the tests compare each pair under ``TRITON_INTERPRET=1``). One
kernel, ``_feature_lse_kernel``, reduces a ``(B, R, K)`` cost along K, one
program per ``BLOCK_R`` outputs; each ``(BLOCK_R, BLOCK_K)`` tile is

    C_rk = off_r + off_k - s_r s_k <p_r, q_k>,

an accumulation of ``tl.dot`` over ``BLOCK_D`` slices of the features (any
D; fp32 accumulation for fp16/bf16/fp32 features, fp64 for fp64) plus the
rank-one terms computed once per solve (``FeatureCost._terms``: squared
norms, cosine's inverse norms), folded straight into the online log-sum-exp
of ``lse_steps``. The row pass has ``p = x, q = y``; the column pass swaps
the roles (``C^T``), so both read the features in place, in any strides.

``MODE``: ``LSE`` (``row_lse``/``col_lse``), ``SIGMOID`` (the two
accumulators of ``row_sigmoid_lse``/``col_sigmoid_lse``) or ``PLAN_COST``
(per-row ``sum_k P_rk C_rk``, summed by the launcher). fp32 features use
tensor cores (tf32) only where torch's own matmul would
(``torch.backends.cuda.matmul.allow_tf32``); otherwise the products are
exact fp32 ("ieee").

Work per half-step: ``2 B N M D`` flops for the tiles against ``B N M``
exponentials; for D >= ~32 the tile products dominate (tensor cores), and
memory traffic is O((N + M) D) per program row, not O(N M).

``log_plan``, ``plan`` (dense by definition), ``feature_grads`` and
``max_cost`` (once per solve) are the torch streaming steps, re-exported so
that this module is the complete step namespace. There is no fused
all-iterations kernel (``balanced_small``) for features.
"""
import torch
import triton
import triton.language as tl

from ..solvers._feature_steps import feature_grads, log_plan, max_cost, plan  # noqa: F401  (re-exported)
from ..solvers._update import takes_update
from . import _device_of, _interpreting
from ._jit import _no_mass, _row_block
from .lse_steps import _finish_lse, _logsigmoid_pair, _online_lse

__all__ = ["balanced_small_supported", "col_lse", "col_sigmoid_lse", "feature_grads", "log_plan",
           "max_cost", "plan", "plan_cost", "row_lse", "row_sigmoid_lse"]

# constexpr: a kernel compiled for a GPU may read only constexpr globals (the interpreter reads any)
LSE, SIGMOID, PLAN_COST = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MAX_BLOCK = 16 if _interpreting() else 64   # tile sides; tl.dot needs >= 16
MAX_BLOCK_D = 64


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _feature_lse_kernel(
    p_ptr, q_ptr,                 # features: (B, R, D) output side, (B, K, D) reduced side
    off_r_ptr, off_k_ptr,         # additive cost terms, contiguous (B, R) and (B, K)
    s_r_ptr, s_k_ptr,             # factors of the dot product, contiguous (B, R) and (B, K)
    h_ptr, u_ptr, out_ptr, out2_ptr,  # h (B, K) potential of the reduced axis, u (B, R); out (B, R)
    shift_k_ptr,                  # PLAN_COST: (B, K) offset taken out of off_k, added back to C
    R, K, D, n_rblocks,
    stride_pb, stride_pr, stride_pd,
    stride_qb, stride_qk, stride_qd,
    eps: tl.float64,
    MODE: tl.constexpr,           # LSE: (h_k - C)/eps; SIGMOID: z = (u_r + h_k - C)/eps; PLAN_COST:
                                  # sum_k P (C + shift_k) and sum_k P, P = exp((u_r + h_k - C)/eps)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 features only)
    UPCAST: tl.constexpr,         # fp16/bf16 features under the interpreter (no low-precision numpy dot)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, rows64, row_mask = _row_block(R, n_rblocks, BLOCK_R)
    dtype = h_ptr.dtype.element_ty
    eps_c = tl.full((), eps, dtype)
    inv_eps = 1.0 / eps_c
    off_r = tl.load(off_r_ptr + b * R + rows64, mask=row_mask, other=0.0)
    s_r = tl.load(s_r_ptr + b * R + rows64, mask=row_mask, other=0.0)
    if MODE != LSE:
        u = tl.load(u_ptr + b * R + rows64, mask=row_mask, other=0.0)
    p_rows = p_ptr + b * stride_pb + rows64[:, None] * stride_pr
    q_base = q_ptr + b * stride_qb
    m1 = tl.full((BLOCK_R,), float("-inf"), dtype)   # running max and sum (PLAN_COST: sums only)
    s1 = tl.zeros((BLOCK_R,), dtype)
    m2, s2 = m1, s1
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            ds64 = ds.to(tl.int64)
            a = tl.load(p_rows + ds64[None, :] * stride_pd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            bt = tl.load(q_base + cols64[None, :] * stride_qk + ds64[:, None] * stride_qd,
                         mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a, bt = a.to(dtype), bt.to(dtype)
            acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
        off_k = tl.load(off_k_ptr + b * K + cols64, mask=col_mask, other=0.0)
        s_k = tl.load(s_k_ptr + b * K + cols64, mask=col_mask, other=0.0)
        h = tl.load(h_ptr + b * K + cols64, mask=col_mask, other=0.0)
        c = off_r[:, None] + off_k[None, :] - (s_r[:, None] * s_k[None, :]) * acc
        mask = row_mask[:, None] & col_mask[None, :]
        if MODE == LSE:   # C is finite: no inf - inf here
            m1, s1 = _online_lse(m1, s1, tl.where(mask, (h[None, :] - c) * inv_eps, float("-inf")))
        elif MODE == SIGMOID:
            t1, t2 = _logsigmoid_pair(_no_mass((u[:, None] + h[None, :] - c) * inv_eps))
            m1, s1 = _online_lse(m1, s1, tl.where(mask, t1, float("-inf")))
            m2, s2 = _online_lse(m2, s2, tl.where(mask, t2, float("-inf")))
        else:
            p = tl.where(mask, tl.exp(_no_mass((u[:, None] + h[None, :] - c) * inv_eps)), 0.0)
            sk = tl.load(shift_k_ptr + b * K + cols64, mask=col_mask, other=0.0)
            s1 += tl.sum(p * (c + sk[None, :]), axis=1)
            s2 += tl.sum(p, axis=1)
    out_offs = b * R + rows64
    if MODE == PLAN_COST:
        tl.store(out_ptr + out_offs, s1, mask=row_mask)
        tl.store(out2_ptr + out_offs, s2, mask=row_mask)
    else:
        tl.store(out_ptr + out_offs, eps_c * _finish_lse(m1, s1), mask=row_mask)
        if MODE == SIGMOID:
            tl.store(out2_ptr + out_offs, eps_c * _finish_lse(m2, s2), mask=row_mask)


# ----------------------------------------------------------------------------- launchers
def _dot_precision(features):
    if features.dtype == torch.float32 and features.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block(n, cap):
    return max(16, min(cap, triton.next_power_of_2(n)))


def _check(cost, rows=(), cols=(), shift=None):
    """Launch check: a batched FeatureCost; ``rows`` (B, N) and ``cols`` (B, M) ``(name, tensor)`` pairs.

    Every potential (and the ``shift`` offsets) must have the cost's compute dtype
    (fp32, or fp64 for fp64 features).
    """
    if shift is not None:
        rows = list(rows) + [("shift[0]", shift[0])]
        if shift[1] is not None:
            cols = list(cols) + [("shift[1]", shift[1])]
    if not hasattr(cost, "_terms") or not cost.batched:
        raise ValueError(f"cost must be a batched FeatureCost (B, N, M); got {type(cost).__name__}")
    device = cost.device
    if device.type == "cpu" and not _interpreting():
        raise ValueError("triton kernels run on CUDA tensors, or on CPU tensors under "
                         "TRITON_INTERPRET=1; got CPU tensors without TRITON_INTERPRET=1")
    B, N, M = cost.shape
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    for name, t, shape in [(n, t, (B, N)) for n, t in rows] + [(n, t, (B, M)) for n, t in cols]:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for cost of shape {tuple(cost.shape)}; "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on the device of cost ({device}); got {t.device}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, the compute dtype of {cost.dtype} features; "
                             f"got {t.dtype}")


def _launch(cost, h, u, eps, by_row, mode, shift):
    """Reduce over M (``by_row``) or over N; ``h`` indexes the reduced axis, ``u`` the output axis."""
    t = cost._terms(h.dtype).shifted(shift)
    x, y = cost._x3, cost._y3   # raw features, read in their own dtype by tl.dot
    if by_row:
        p, q, off_r, off_k, s_r, s_k = x, y, t.alpha, t.beta, t.sx, t.sy
    else:
        p, q, off_r, off_k, s_r, s_k = y, x, t.beta, t.alpha, t.sy, t.sx
    B, R, D = p.shape
    K = q.shape[1]
    shift_k = h   # unread unless PLAN_COST
    if mode == PLAN_COST:
        has_s = shift is not None and shift[1] is not None
        shift_k = (shift[1] if has_s else h.new_zeros(())).expand(B, K)
    vecs = [v.contiguous() for v in (off_r, off_k, s_r, s_k, h, u if u is not None else h, shift_k)]
    out = torch.empty((B, R), dtype=h.dtype, device=h.device)
    out2 = torch.empty_like(out) if mode != LSE else out
    BLOCK_R, BLOCK_K, BLOCK_D = _block(R, MAX_BLOCK), _block(K, MAX_BLOCK), _block(D, MAX_BLOCK_D)
    n_rblocks = triton.cdiv(R, BLOCK_R)
    with _device_of(h):
        _feature_lse_kernel[(B * n_rblocks,)](
            p_ptr=p, q_ptr=q, off_r_ptr=vecs[0], off_k_ptr=vecs[1], s_r_ptr=vecs[2], s_k_ptr=vecs[3],
            h_ptr=vecs[4], u_ptr=vecs[5], out_ptr=out, out2_ptr=out2, shift_k_ptr=vecs[6],
            R=R, K=K, D=D, n_rblocks=n_rblocks,
            stride_pb=p.stride(0), stride_pr=p.stride(1), stride_pd=p.stride(2),
            stride_qb=q.stride(0), stride_qk=q.stride(1), stride_qd=q.stride(2),
            eps=float(eps), MODE=mode, DOT_PRECISION=_dot_precision(p),
            UPCAST=_interpreting() and p.dtype in (torch.float16, torch.bfloat16),
            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4,
        )
    return out if mode == LSE else (out, out2)


@takes_update(by_row=True)
def row_lse(cost, h, eps, shift=None):
    """``eps * lse_j((h_j - C_ij) / eps)``: cost (B, N, M) features, h (B, M) -> (B, N)."""
    _check(cost, cols=[("h", h)], shift=shift)
    return _launch(cost, h, None, eps, True, LSE, shift)


@takes_update(by_row=False)
def col_lse(cost, h, eps, shift=None):
    """``eps * lse_i((h_i - C_ij) / eps)``: cost (B, N, M) features, h (B, N) -> (B, M)."""
    _check(cost, rows=[("h", h)], shift=shift)
    return _launch(cost, h, None, eps, False, LSE, shift)


@takes_update(by_row=True, sigmoid=True)
def row_sigmoid_lse(cost, u, v, eps, shift=None):
    """``(eps lse_j log sigmoid(z_ij), eps lse_j log sigmoid(-z_ij))``, each (B, N).

    ``z_ij = (u_i + v_j - C_ij) / eps``; cost (B, N, M) features, u (B, N), v (B, M).
    """
    _check(cost, rows=[("u", u)], cols=[("v", v)], shift=shift)
    return _launch(cost, v, u, eps, True, SIGMOID, shift)


@takes_update(by_row=False, sigmoid=True)
def col_sigmoid_lse(cost, u, v, eps, shift=None):
    """Column twin of :func:`row_sigmoid_lse`: returns two (B, M) tensors."""
    _check(cost, rows=[("u", u)], cols=[("v", v)], shift=shift)
    return _launch(cost, u, v, eps, False, SIGMOID, shift)


def plan_cost(cost, f, g, eps, shift=None):
    """``<P, C>`` (the unshifted cost) with ``P = exp(log_plan(cost, f, g, eps, shift))``: -> (B,).

    One fused pass: per row, ``sum_j P_ij (C~_ij + s_j)`` and ``sum_j P_ij``; then
    ``<P, C> = sum_i (first + r_i second)``.
    """
    _check(cost, rows=[("f", f)], cols=[("g", g)], shift=shift)
    pc, rows = _launch(cost, g, f, eps, True, PLAN_COST, shift)
    if shift is None:
        return pc.sum(-1)
    return (pc + rows * shift[0]).sum(-1)


def balanced_small_supported(n, m, dtype=torch.float32):
    """Always False: features have no fused all-iterations kernel (each tile is recomputed per pass)."""
    return False
