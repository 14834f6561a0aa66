"""Triton log-domain half-steps: streaming row/column log-sum-exp over a cost.

Twin of ``ot_losses.solvers._torch_steps`` (same names, signatures, shapes and
semantics; the tests compare each pair). One kernel, ``_lse_kernel``, reduces
``(B, R, K)`` along K with an online (running max, rescaled sum) log-sum-exp,
one program per ``BLOCK_R`` outputs:

- ``row_lse``: ``eps * lse_j((h_j - C_ij) / eps)`` -- R = N, K = M;
- ``col_lse``: the same kernel on the transposed strides (R = M, K = N), so a
  transposed or otherwise strided cost is read in place, never copied;
- ``row_sigmoid_lse`` / ``col_sigmoid_lse`` (``IS_SIGMOID``): with
  ``z = (u_i + v_j - C_ij) / eps`` two accumulators in the same pass,
  ``lse log sigmoid(z)`` and ``lse log sigmoid(-z)``. A new problem type is a
  new term in the loop body behind a constexpr flag, not a new kernel.
- with ``update=`` (``solvers/_update.Update``) the solver's O(N + M) work
  around the log-sum-exp runs in the same launch: the reduced side's
  weights folded into ``h`` as it is loaded, the mass multiplier of the
  partial problem from an O(K) pre-pass, the dummy line of the dummy
  partial problem as extra tile entries, and the new potential (sign,
  damping, cap, bias) written in the epilogue. A solver iteration is then
  two launches and their two output tensors, nothing else.

``log_plan``, ``plan`` and ``plan_cost`` live in ``kernels/plan.py`` and are
re-exported here so that this module is the complete step namespace.

Numerics. The cost is loaded in its own dtype (fp16/bf16/fp32/fp64) and cast
at load to the compute dtype, the dtype of the potentials (fp32, or fp64 for
fp64 potentials); no bf16 arithmetic. ``eps`` is a float64 kernel argument
cast in-kernel to the compute dtype, so fp64 runs see the exact eps. Masked
cost entries load as ``+inf`` (forbidden: contribute nothing); ``-inf`` in a
potential means zero mass; the running max is guarded where it is ``-inf``,
so an all-forbidden row returns ``-inf``, not NaN. Offsets are int64.

Bandwidth (why two streaming passes). A half-step does ~5 flops and one exp
per cost entry and reads each entry once, so it is memory bound: one Sinkhorn
iteration (row pass, then column pass) reads ``2 * B * N * M * itemsize``
bytes of cost, and its roofline time is that over the copy bandwidth, e.g.
B=1, N=M=8192, fp32: 2 * 268 MB / ~3 TB/s (H100 HBM3) ~ 0.18 ms; a bf16 cost
halves it. The column pass needs the *new* row potential, so the two
reductions cannot share one read of the cost unless a whole row block stays
on chip between them; for large M it does not, and a fused "row pass emits
partial column (max, sum) pairs" variant would still re-read the block. We
therefore keep the two passes, each a single coalesced read (the tile's
larger block is put on the cost's unit-stride axis, so the column pass on a
row-major cost is as coalesced as the row pass), and potentials/outputs are
O(N + M) traffic. The sigmoid pass needs ~4 special-function ops per entry
(one exp and one log shared by both terms, one exp per accumulator): on an
H100 (~4e12 SFU ops/s) that is ~1e12 entries/s, close to the ~0.8e12
fp32 entries/s that HBM delivers, so it sits near both roofs (a bf16 cost
makes it SFU-bound). For small problems the whole cost fits on chip and the
launch count dominates instead: ``balanced_small`` runs *all* iterations of a
balanced problem in one launch, one program per problem, reading the cost
once (``SMALL_MAX_ELEMENTS[dtype]`` padded entries at most: 16384 fp32, 4096 fp64).

Not done yet: split-K for very long reductions with few outputs (e.g. B=1,
N=1, M=1e6 runs on one program), and block sizes were chosen without a GPU
to tune on (no autotune; correctness never depends on them).
"""
import torch
import triton
import triton.language as tl

from . import COMPUTE_DTYPES, _check_operands, _device_of, _full_shift, _interpreting
from ._jit import _no_mass, _shifted
from .plan import log_plan, plan, plan_cost  # noqa: F401  (re-exported twins)

__all__ = ["SMALL_MAX_ELEMENTS", "balanced_small", "balanced_small_supported", "col_lse",
           "col_sigmoid_lse", "log_plan", "plan", "plan_cost", "row_lse", "row_sigmoid_lse"]

# Fused small-problem path: largest padded tile BLOCK_N * BLOCK_M kept in registers
# (one program per problem, 16 entries per thread; ptxas -v on sm_90: no or tiny spills).
SMALL_MAX_ELEMENTS = {torch.float32: 16384, torch.float64: 4096}
# Below this many programs the streaming tile narrows (about 4 per SM on an H100);
# the CPU interpreter runs programs one by one, so there fewer is faster.
MIN_PROGRAMS = 1 if _interpreting() else 512


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logsigmoid_pair(z):
    """``(log sigmoid(z), log sigmoid(-z))``, sharing one exp and one log."""
    # log sigmoid(+-z) = min(+-z, 0) - log1p(exp(-|z|)); tl has no log1p, so use
    # log1p(x) = log(u) * x / (u - 1), u = 1 + x (Goldberg): exact near x = 0.
    x = tl.exp(-tl.abs(z))
    u = 1.0 + x
    tiny = u == 1.0
    log1p = tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))
    return tl.minimum(z, 0.0) - log1p, tl.minimum(-z, 0.0) - log1p


@triton.jit
def _safe_max(m):
    """The running max, or 0 where it is infinite (all -inf so far, or a +inf term): no NaN."""
    return tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)


@triton.jit
def _online_lse(m, s, t):
    """Fold terms t (BLOCK_R, BLOCK_K) into the running max m and sum s (BLOCK_R,)."""
    m_new = tl.maximum(m, tl.max(t, axis=1))
    m_safe = _safe_max(m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(t - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def _finish_lse(m, s):
    """``m + log s`` of an online log-sum-exp; ``+inf`` if a term was, ``-inf`` if all were -inf."""
    return tl.where(m == float("inf"), m, _safe_max(m) + tl.log(s))


@triton.jit
def _lse_kernel(
    cost_ptr, h_ptr, p_ptr, out_ptr, out2_ptr, r_ptr, s_ptr,
    eh_ptr, o_ptr, w_ptr, lm_ptr, t_ptr,
    R, K, n_rblocks,             # outputs per problem, reduced length (real lines), programs per problem
    stride_cb, stride_cr, stride_ck,
    stride_hb, stride_hk,        # potential indexed by the reduced axis
    stride_pb, stride_pr,        # potential indexed by the output axis (IS_SIGMOID only)
    stride_ob, stride_or,        # out and out2
    stride_rb, stride_rn,        # row offsets r (B, N) of the cost shift
    stride_sb, stride_sm,        # column offsets s (B, M)
    stride_ehb, stride_ehk,      # eps * log-weights of the reduced axis (FOLD_IN)
    stride_vb, stride_vr,        # output-axis operand: eps * log-weights (CAP) or the bias (BIAS)
    stride_wb, stride_wk,        # w of the last column pass (MASS_IN)
    stride_lm, stride_t,         # log mass (MASS_IN), t (MASS_IN: written, MASS_OUT: read)
    eps: tl.float64, neg_damp: tl.float64, off_damp: tl.float64,
    IS_SIGMOID: tl.constexpr,    # z = (p_r + h_k - C_rk)/eps, two lse; else z = (h_k - C_rk)/eps
    HAS_SHIFT: tl.constexpr,     # work on (C - r) - s
    COL_SHIFT: tl.constexpr,     # s is given (else s = 0: no tensor of zeros built per step)
    BY_ROW: tl.constexpr,        # the output axis is the cost's rows (else its columns)
    # Epilogue (``solvers/_update.Update``): write the new potential, not the log-sum-exp.
    FOLD_IN: tl.constexpr,       # h' = h + eh, exactly -inf where eh is
    UPDATE: tl.constexpr,        # new = neg_damp * (L [+ t]) [- off_damp * offset]
    DAMP_OFFSET: tl.constexpr,
    CAP: tl.constexpr,           # new = min(0, fold(new, eps log w))
    MASS_IN: tl.constexpr,       # t = eps log m - eps lse_k w_k, h' = h + t; t written by block 0
    MASS_OUT: tl.constexpr,      # new from L + t; out2 = no_mass((new + L) / eps)
    DUMMY: tl.constexpr,         # a dummy line on each axis, entries 0, the corner forbidden
    BIAS: tl.constexpr,          # sigmoid: new = where(inf bias, bias, p + bias - L1 + L0)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_rblocks).to(tl.int64)
    rows = (pid % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_out = R
    n_red = K
    if DUMMY:
        n_out = R + 1
        n_red = K + 1
    row_mask = rows < n_out
    real_rows = rows < R
    rows64 = rows.to(tl.int64)
    dtype = h_ptr.dtype.element_ty
    eps_c = tl.full((), eps, dtype)
    inv_eps = 1.0 / eps_c  # multiply per entry: a divide costs a special-function op
    cost_rows = cost_ptr + b * stride_cb + rows64[:, None] * stride_cr
    h_base = h_ptr + b * stride_hb
    if IS_SIGMOID:
        p = tl.load(p_ptr + b * stride_pb + rows64 * stride_pr, mask=row_mask, other=0.0).to(dtype)
    if HAS_SHIFT:
        if BY_ROW:
            off_out = tl.load(r_ptr + b * stride_rb + rows64 * stride_rn, mask=real_rows, other=0.0).to(dtype)
        elif COL_SHIFT:
            off_out = tl.load(s_ptr + b * stride_sb + rows64 * stride_sm, mask=real_rows, other=0.0).to(dtype)
        else:
            off_out = tl.zeros((BLOCK_R,), dtype)
    if MASS_IN:
        # the mass multiplier: an O(K) pre-pass, every program of the problem gets the same t
        mw = tl.full((), float("-inf"), dtype)
        sw = tl.zeros((), dtype)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + b * stride_wb + cols.to(tl.int64) * stride_wk, mask=cols < K,
                        other=float("-inf")).to(dtype)
            m_new = tl.maximum(mw, tl.max(w, axis=0))
            m_safe = _safe_max(m_new)
            sw = sw * tl.exp(mw - m_safe) + tl.sum(tl.exp(w - m_safe), axis=0)
            mw = m_new
        log_m = tl.load(lm_ptr + b * stride_lm).to(dtype)
        t = eps_c * log_m - eps_c * _finish_lse(mw, sw)
        tl.store(t_ptr + b * stride_t, t, mask=(pid % n_rblocks) == 0)
    m1 = tl.full((BLOCK_R,), float("-inf"), dtype)
    s1 = tl.zeros((BLOCK_R,), dtype)
    m2 = tl.full((BLOCK_R,), float("-inf"), dtype)
    s2 = tl.zeros((BLOCK_R,), dtype)
    for k0 in range(0, n_red, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_red
        real_cols = cols < K
        cols64 = cols.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        c = tl.load(cost_rows + cols64[None, :] * stride_ck, mask=real_rows[:, None] & real_cols[None, :],
                    other=float("inf")).to(dtype)
        h = tl.load(h_base + cols64 * stride_hk, mask=col_mask, other=0.0).to(dtype)
        if FOLD_IN:
            eh = tl.load(eh_ptr + b * stride_ehb + cols64 * stride_ehk, mask=col_mask, other=0.0).to(dtype)
            h = tl.where(eh == float("-inf"), eh, h + eh)
        if MASS_IN:
            h = h + t
        if HAS_SHIFT:
            if BY_ROW:
                if COL_SHIFT:
                    off_k = tl.load(s_ptr + b * stride_sb + cols64 * stride_sm, mask=real_cols, other=0.0)
                else:
                    off_k = tl.zeros((BLOCK_K,), dtype)
                c = _shifted(c, off_out[:, None], off_k.to(dtype)[None, :])
            else:
                off_k = tl.load(r_ptr + b * stride_rb + cols64 * stride_rn, mask=real_cols, other=0.0)
                c = _shifted(c, off_k.to(dtype)[None, :], off_out[:, None])
        if DUMMY:
            dummy = (((rows == R)[:, None] & real_cols[None, :])
                     | (real_rows[:, None] & (cols == K)[None, :]))
            c = tl.where(dummy, 0.0, c)
        if IS_SIGMOID:
            z = _no_mass((p[:, None] + h[None, :] - c) * inv_eps)
            t1, t2 = _logsigmoid_pair(z)
            # masked lanes must vanish from both sums (log sigmoid(-(-inf)) = 0, not -inf)
            m1, s1 = _online_lse(m1, s1, tl.where(mask, t1, float("-inf")))
            m2, s2 = _online_lse(m2, s2, tl.where(mask, t2, float("-inf")))
        else:
            m1, s1 = _online_lse(m1, s1, _no_mass((h[None, :] - c) * inv_eps))
    out_offs = b * stride_ob + rows64 * stride_or
    L = eps_c * _finish_lse(m1, s1)
    if BIAS:
        bias = tl.load(o_ptr + b * stride_vb + rows64 * stride_vr, mask=row_mask, other=0.0).to(dtype)
        new = ((p + bias) - L) + eps_c * _finish_lse(m2, s2)
        tl.store(out_ptr + out_offs, tl.where((bias == float("inf")) | (bias == float("-inf")), bias, new),
                 mask=row_mask)
    elif UPDATE:
        new = L
        if MASS_OUT:
            new = new + tl.load(t_ptr + b * stride_t).to(dtype)
        new = tl.full((), neg_damp, dtype) * new
        if DAMP_OFFSET:
            new = new - tl.full((), off_damp, dtype) * off_out
        if CAP:
            e = tl.load(o_ptr + b * stride_vb + rows64 * stride_vr, mask=row_mask, other=0.0).to(dtype)
            new = tl.where(e == float("-inf"), e, new + e)
            new = tl.where(new > 0.0, 0.0, new)  # min(0, new); NaN stays NaN, as in torch.minimum
        tl.store(out_ptr + out_offs, new, mask=row_mask)
        if MASS_OUT:
            tl.store(out2_ptr + out_offs, _no_mass((new + L) / eps_c), mask=row_mask)
    else:
        tl.store(out_ptr + out_offs, L, mask=row_mask)
        if IS_SIGMOID:
            tl.store(out2_ptr + out_offs, eps_c * _finish_lse(m2, s2), mask=row_mask)


@triton.jit
def _lse_axis(z, AXIS: tl.constexpr):
    """Log-sum-exp of a whole on-chip tile along AXIS; all -inf gives -inf, a +inf term +inf."""
    m = tl.max(z, axis=AXIS)
    return _finish_lse(m, tl.sum(tl.exp(z - tl.expand_dims(_safe_max(m), AXIS)), axis=AXIS))


@triton.jit
def _balanced_small_kernel(
    cost_ptr, log_a_ptr, log_b_ptr, f_ptr, g_ptr, f_out_ptr, g_out_ptr, r_ptr, s_ptr,
    N, M, n_iters,
    stride_cb, stride_cn, stride_cm,
    stride_ab, stride_an, stride_bb, stride_bm,   # log_a, log_b
    stride_fb, stride_fn, stride_gb, stride_gm,   # f, g (inputs)
    stride_rb, stride_rn, stride_sb, stride_sm,   # cost shift: row offsets r, column offsets s
    eps: tl.float64,
    HAS_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_mask = rows < N
    col_mask = cols < M
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    dtype = f_ptr.dtype.element_ty
    eps_c = tl.full((), eps, dtype)
    inv_eps = 1.0 / eps_c  # multiply per entry: a divide costs a special-function op
    # the whole cost stays in registers for all iterations: read once per launch
    c = tl.load(cost_ptr + b * stride_cb + rows64[:, None] * stride_cn + cols64[None, :] * stride_cm,
                mask=mask, other=float("inf")).to(dtype)
    if HAS_SHIFT:
        r = tl.load(r_ptr + b * stride_rb + rows64 * stride_rn, mask=row_mask, other=0.0).to(dtype)
        s = tl.load(s_ptr + b * stride_sb + cols64 * stride_sm, mask=col_mask, other=0.0).to(dtype)
        c = _shifted(c, r[:, None], s[None, :])
    log_a = tl.load(log_a_ptr + b * stride_ab + rows64 * stride_an, mask=row_mask, other=0.0).to(dtype)
    log_b = tl.load(log_b_ptr + b * stride_bb + cols64 * stride_bm, mask=col_mask, other=0.0).to(dtype)
    f = tl.load(f_ptr + b * stride_fb + rows64 * stride_fn, mask=row_mask, other=0.0).to(dtype)
    g = tl.load(g_ptr + b * stride_gb + cols64 * stride_gm, mask=col_mask, other=0.0).to(dtype)
    for _ in range(0, n_iters):
        # same operations as the solver's -row_lse(cost, fold(g, log_b, eps), eps):
        # h = g + eps * log_b, exactly -inf where the weight is 0
        h = tl.where(log_b == float("-inf"), log_b, g + eps_c * log_b)
        z = tl.where(mask, _no_mass((h[None, :] - c) * inv_eps), float("-inf"))
        f = tl.where(row_mask, -(eps_c * _lse_axis(z, 1)), 0.0)
        h = tl.where(log_a == float("-inf"), log_a, f + eps_c * log_a)
        z = tl.where(mask, _no_mass((h[:, None] - c) * inv_eps), float("-inf"))
        g = tl.where(col_mask, -(eps_c * _lse_axis(z, 0)), 0.0)
    tl.store(f_out_ptr + b * N + rows64, f, mask=row_mask)
    tl.store(g_out_ptr + b * M + cols64, g, mask=col_mask)


# ----------------------------------------------------------------------------- launchers
def _lse_blocks(B, R, K, stride_cr, stride_ck, itemsize, heavy):
    """(BLOCK_R, BLOCK_K, num_warps) for ``_lse_kernel``; untimed (no GPU), never affects results.

    The tile's long side lies on the cost's unit-stride axis (coalesced loads),
    ~2048 entries (1024 when ``heavy``: fp64 with two sigmoid accumulators),
    ~8-16 per thread: no spills in ptxas -v for sm_90. When the grid would have
    fewer than MIN_PROGRAMS programs, BLOCK_R shrinks (down to one 32-byte
    sector of contiguous outputs in the column pass) and BLOCK_K grows.
    """
    row_pass = abs(stride_ck) <= abs(stride_cr)
    block_r, min_r, num_warps = (8, 1, 4) if row_pass else (32, max(1, 32 // itemsize), 8)
    block_r = min(block_r, triton.next_power_of_2(R))
    while block_r > min_r and B * triton.cdiv(R, block_r) < MIN_PROGRAMS:
        block_r //= 2
    block_k = min((1024 if heavy else 2048) // block_r, triton.next_power_of_2(K))
    return block_r, block_k, num_warps


def _shift_args(shift, like):
    """Pointers and strides of the cost shift ``(r, s)`` (``like`` stands in when there is none)."""
    r, s = shift if shift is not None else (like, like)
    return dict(r_ptr=r, s_ptr=s, stride_rb=r.stride(0), stride_rn=r.stride(1),
                stride_sb=s.stride(0), stride_sm=s.stride(1), HAS_SHIFT=shift is not None)


def _lse_shift_args(shift, like):
    """:func:`_shift_args` for ``_lse_kernel``, where ``(r, None)`` means zero column offsets."""
    if shift is None or shift[1] is not None:
        return dict(_shift_args(shift, like), COL_SHIFT=shift is not None)
    return dict(_shift_args((shift[0], shift[0]), like), COL_SHIFT=False)  # s: an unread stand-in


def _lse(cost, h, p, eps, by_row, sigmoid, shift, update=None):
    """Launch ``_lse_kernel`` reducing over M (``by_row``) or over N; ``update``: the fused epilogue."""
    B, N, M = cost.shape
    sb, sn, sm = cost.stride()
    R, K, s_r, s_k = (N, M, sn, sm) if by_row else (M, N, sm, sn)
    u = update
    dummy = u is not None and u.dummy
    n_out = R + 1 if dummy else R
    out = torch.empty((B, n_out), dtype=h.dtype, device=h.device)
    mass_in = u is not None and u.log_mass is not None
    mass_out = u is not None and u.t is not None
    t_buf, w_buf = _scratch(u, out) if mass_in or mass_out else (None, None)
    if sigmoid:
        out2 = torch.empty_like(out) if u is None else out  # with a bias only the new potential
    else:
        out2 = w_buf if mass_out else out
    heavy = sigmoid and h.dtype == torch.float64
    BLOCK_R, BLOCK_K, num_warps = _lse_blocks(B, n_out, K + dummy, s_r, s_k, cost.element_size(), heavy)
    n_rblocks = triton.cdiv(n_out, BLOCK_R)
    p_ = p if sigmoid else h  # unread when not IS_SIGMOID
    eh = u.elog_h if u is not None and u.elog_h is not None else h
    vec = (u.bias if u.bias is not None else u.elog_cap) if u is not None else None
    vec = h if vec is None else vec
    w = u.w if mass_in else h
    lm = u.log_mass if mass_in else h  # unread stand-ins need only a pointer and a stride
    t = t_buf if mass_in else u.t if mass_out else h
    damp = 1.0 if u is None else float(u.damp)
    with _device_of(cost):
        _lse_kernel[(B * n_rblocks,)](
            cost_ptr=cost, h_ptr=h, p_ptr=p_, out_ptr=out, out2_ptr=out2, **_lse_shift_args(shift, h),
            eh_ptr=eh, o_ptr=vec, w_ptr=w, lm_ptr=lm, t_ptr=t,
            R=R, K=K, n_rblocks=n_rblocks,
            stride_cb=sb, stride_cr=s_r, stride_ck=s_k,
            stride_hb=h.stride(0), stride_hk=h.stride(1),
            stride_pb=p_.stride(0), stride_pr=p_.stride(1),
            stride_ob=out.stride(0), stride_or=out.stride(1),
            stride_ehb=eh.stride(0), stride_ehk=eh.stride(1),
            stride_vb=vec.stride(0), stride_vr=vec.stride(1),
            stride_wb=w.stride(0), stride_wk=w.stride(1),
            stride_lm=lm.stride(0), stride_t=t.stride(0),
            eps=float(eps), neg_damp=-damp, off_damp=1.0 - damp,
            IS_SIGMOID=sigmoid, BY_ROW=by_row,
            FOLD_IN=u is not None and u.elog_h is not None,
            UPDATE=u is not None and not sigmoid,
            DAMP_OFFSET=u is not None and u.damp_offset and shift is not None,
            CAP=u is not None and u.elog_cap is not None,
            MASS_IN=mass_in, MASS_OUT=mass_out, DUMMY=dummy,
            BIAS=sigmoid and u is not None,
            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=num_warps,
        )
    if mass_in:
        return out, t_buf
    if mass_out:
        return out, w_buf
    return (out, out2) if sigmoid and u is None else out


def _shift_operands(shift):
    """``(rows, cols)`` operand lists for ``_check_operands`` of a shift ``(r, s)``, ``(r, None)`` or None."""
    if shift is None:
        return [], []
    return [("shift[0] (r)", shift[0])], ([] if shift[1] is None else [("shift[1] (s)", shift[1])])


def _scratch(update, out):
    """``(t, w)`` outputs of a mass update (row pass: t, column pass: w): ``update.out``'s, or new tensors."""
    t, w = update.out if update.out is not None else (None, None)
    B, R = out.shape
    t, w = (t, None) if update.log_mass is not None else (None, w)
    for name, x, shape in (("update.out[0] (t)", t, (B,)), ("update.out[1] (w)", w, (B, R))):
        # w shares the output's strides in the kernel: both contiguous
        if x is not None and (tuple(x.shape) != shape or x.dtype != out.dtype or x.device != out.device
                              or not x.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {shape} tensor of the potentials' dtype, device")
    if update.log_mass is not None and t is None:
        t = torch.empty((B,), dtype=out.dtype, device=out.device)
    if update.t is not None and w is None:
        w = torch.empty_like(out)
    return t, w


def _update_operands(cost, h_name, h, update, by_row, sigmoid):
    """Operand lists ``(rows, cols, batch)`` for ``_check_operands``: ``h`` and ``update``'s tensors.

    Also checks which fields go together. With ``update.dummy`` the potential
    ``h`` and ``elog_h`` carry the dummy line (one more entry than the cost's
    side), so they are checked here, not there.
    """
    if update is None:
        return ([], [(h_name, h)], []) if by_row else ([(h_name, h)], [], [])
    u = update
    lse_only = (u.elog_h, u.elog_cap, u.log_mass, u.t)
    if sigmoid != (u.bias is not None) or (sigmoid and (any(x is not None for x in lse_only) or u.dummy)):
        raise ValueError("update: the sigmoid steps take only bias, the log-sum-exp steps all but bias")
    if (u.log_mass is None) != (u.w is None) or (u.log_mass is not None and u.t is not None):
        raise ValueError("update: log_mass and w go together (row pass of a mass), t without them")
    if u.dummy and (u.log_mass is not None or u.t is not None or u.damp_offset):
        raise ValueError("update: dummy does not combine with a mass or a damping offset")

    def given(*pairs):
        return [(name, x) for name, x in pairs if x is not None]
    reduced = given((h_name, h), ("update.elog_h", u.elog_h), ("update.w", u.w))
    kept = given(("update.elog_cap", u.elog_cap), ("update.bias", u.bias))
    batch = given(("update.log_mass", u.log_mass), ("update.t", u.t))
    if u.dummy:
        B, N, M = cost.shape
        K, R = (M, N) if by_row else (N, M)
        for names, n in ((reduced, K + 1), (kept, R + 1)):
            for name, x in names:
                if tuple(x.shape) != (B, n):
                    raise ValueError(f"{name} must have shape {(B, n)} with update.dummy; "
                                     f"got {tuple(x.shape)}")
        if h.dtype not in COMPUTE_DTYPES or any(x.dtype != h.dtype or x.device != h.device
                                                for _, x in reduced + kept):
            raise ValueError(f"{h_name} and the update's tensors must share a float32/float64 dtype "
                             f"and a device")
        return [], [], batch
    return (kept, reduced, batch) if by_row else (reduced, kept, batch)


def row_lse(cost, h, eps, shift=None, update=None):
    """``eps * lse_j((h_j - C_ij) / eps)``: cost (B, N, M), h (B, M) -> (B, N); or ``update``'s potential."""
    rs, cs = _shift_operands(shift)
    rows, cols, batch = _update_operands(cost, "h", h, update, True, False)
    _check_operands(cost, rows=rows + rs, cols=cols + cs, batch=batch)
    return _lse(cost, h, None, eps, by_row=True, sigmoid=False, shift=shift, update=update)


def col_lse(cost, h, eps, shift=None, update=None):
    """``eps * lse_i((h_i - C_ij) / eps)``: cost (B, N, M), h (B, N) -> (B, M); or ``update``'s potential."""
    rs, cs = _shift_operands(shift)
    rows, cols, batch = _update_operands(cost, "h", h, update, False, False)
    _check_operands(cost, rows=rows + rs, cols=cols + cs, batch=batch)
    return _lse(cost, h, None, eps, by_row=False, sigmoid=False, shift=shift, update=update)


def row_sigmoid_lse(cost, u, v, eps, shift=None, update=None):
    """``(eps * lse_j log sigmoid(z_ij), eps * lse_j log sigmoid(-z_ij))``, each (B, N); or the new ``u``.

    ``z_ij = (u_i + v_j - C_ij) / eps``; cost (B, N, M), u (B, N), v (B, M).
    """
    rs, cs = _shift_operands(shift)
    bias = [] if update is None else _update_operands(cost, "u", u, update, True, True)[0]
    _check_operands(cost, rows=[("u", u)] + rs + bias, cols=[("v", v)] + cs)
    return _lse(cost, v, u, eps, by_row=True, sigmoid=True, shift=shift, update=update)


def col_sigmoid_lse(cost, u, v, eps, shift=None, update=None):
    """Column twin of :func:`row_sigmoid_lse`: two (B, M) tensors, or the new ``v`` with ``update``."""
    rs, cs = _shift_operands(shift)
    bias = [] if update is None else _update_operands(cost, "v", v, update, False, True)[1]
    _check_operands(cost, rows=[("u", u)] + rs, cols=[("v", v)] + cs + bias)
    return _lse(cost, u, v, eps, by_row=False, sigmoid=True, shift=shift, update=update)


def balanced_small_supported(n, m, dtype=torch.float32):
    """True when an (n, m) problem with potentials of ``dtype`` fits :func:`balanced_small`."""
    limit = SMALL_MAX_ELEMENTS.get(dtype, 0)
    return triton.next_power_of_2(n) * triton.next_power_of_2(m) <= limit


def balanced_small(cost, log_a, log_b, f, g, eps, n_iters, shift=None):
    """All ``n_iters`` balanced Sinkhorn iterations of small problems in one launch.

    Per iteration, f first then g:
    ``f_i = -eps * lse_j(log_b_j + (g_j - C_ij) / eps)``,
    ``g_j = -eps * lse_i(log_a_i + (f_i - C_ij) / eps)``, i.e. the same iterates as
    ``f = -row_lse(cost, fold(g, log_b), eps); g = -col_lse(cost, fold(f, log_a), eps)`` with
    ``fold(x, log_w) = x + eps * log_w`` (exactly ``-inf`` where ``log_w = -inf``).
    One program per problem keeps its whole cost on chip (read once per launch).

    Args:
        cost: (B, N, M) floating tensor, any strides; ``+inf`` = forbidden.
        log_a: (B, N), log_b: (B, M) log-weights (``-inf`` = zero mass); any
            strides, so an expanded (stride-0) unbatched marginal works.
        f: (B, N), g: (B, M) initial potentials (fp32 or fp64: the compute dtype).
        eps: float, absolute regularisation (cost units).
        n_iters: int >= 0.
        shift: None or ``(r, s)``, (B, N) and (B, M): work on ``(C - r) - s``.

    Returns:
        ``(f, g)``: new (B, N) and (B, M) contiguous tensors; inputs are not modified.

    Raises:
        ValueError: ``balanced_small_supported(N, M, f.dtype)`` is False, ``n_iters < 0``,
            or the operands' shapes, dtypes or devices do not match.
    """
    shift = _full_shift(cost, shift)
    rs, cs = _shift_operands(shift)
    _check_operands(cost, rows=[("f", f), ("log_a", log_a)] + rs, cols=[("g", g), ("log_b", log_b)] + cs)
    B, N, M = cost.shape
    if not balanced_small_supported(N, M, f.dtype):
        raise ValueError(f"balanced_small needs next_pow2(N) * next_pow2(M) <= "
                         f"{SMALL_MAX_ELEMENTS[f.dtype]} for {f.dtype}; got N={N}, M={M}")
    if int(n_iters) < 0:
        raise ValueError(f"n_iters must be >= 0; got {n_iters}")
    f_out = torch.empty((B, N), dtype=f.dtype, device=f.device)
    g_out = torch.empty((B, M), dtype=f.dtype, device=f.device)
    BLOCK_N, BLOCK_M = triton.next_power_of_2(N), triton.next_power_of_2(M)
    with _device_of(cost):
        _balanced_small_kernel[(B,)](
            cost_ptr=cost, log_a_ptr=log_a, log_b_ptr=log_b, f_ptr=f, g_ptr=g,
            f_out_ptr=f_out, g_out_ptr=g_out, **_shift_args(shift, f), N=N, M=M, n_iters=int(n_iters),
            stride_cb=cost.stride(0), stride_cn=cost.stride(1), stride_cm=cost.stride(2),
            stride_ab=log_a.stride(0), stride_an=log_a.stride(1),
            stride_bb=log_b.stride(0), stride_bm=log_b.stride(1),
            stride_fb=f.stride(0), stride_fn=f.stride(1), stride_gb=g.stride(0), stride_gm=g.stride(1),
            eps=float(eps), BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
            num_warps=min(32, max(4, BLOCK_N * BLOCK_M // 512)),
        )
    return f_out, g_out
