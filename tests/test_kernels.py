"""Triton half-steps (``kernels/lse_steps``) against their torch twins (``_torch_steps``).

Runs on CPU under TRITON_INTERPRET=1 (set in conftest.py): small ragged shapes.
``@requires_cuda`` tests repeat the comparison at larger shapes on a GPU.
"""
import inspect
import math

import pytest
import torch

from conftest import requires_cuda
from ot_losses.kernels import lse_steps as K
from ot_losses.solvers import _torch_steps as T
from ot_losses.solvers._update import Update

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy log(0), interpreter

INF = float("inf")

# (cost dtype, potential/compute dtype, rtol); ids name the cost dtype.
FP32 = (torch.float32, torch.float32, 1e-5)
FP64 = (torch.float64, torch.float64, 1e-10)
BF16 = (torch.bfloat16, torch.float32, 1e-5)   # vs the twin on the same bf16 cost
FP16 = (torch.float16, torch.float32, 1e-5)
LOW_VS_FP32_RTOL = 1e-2                        # bf16/fp16 cost vs the twin on the fp32 original

_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(B, N, M, layout, dtype, eps=0.1):
    return pytest.param((B, N, M), layout, dtype, eps,
                        id=f"B{B}-N{N}-M{M}-{layout}-{_NAMES[dtype[0]]}")


# Ragged (1, 7, 33, 130) combos, every layout, batch 1 and 3; not all pairs (interpreter time).
CASES = [
    _case(1, 1, 1, "contig", FP32),
    _case(1, 7, 33, "contig", FP32),
    _case(3, 33, 7, "T", FP32),
    _case(3, 130, 7, "contig", FP32),
    _case(1, 7, 130, "T", FP32),
    _case(3, 1, 33, "perm", FP32),
    _case(3, 33, 1, "expand", FP32),
    _case(1, 33, 130, "contig", FP32),
    _case(3, 7, 33, "T", FP64),
    _case(1, 130, 33, "perm", FP64),
    _case(3, 33, 7, "T", BF16, eps=0.5),
    _case(1, 7, 130, "contig", BF16, eps=0.5),
    _case(3, 33, 33, "perm", FP16, eps=0.5),
]

# name -> call(module, cost, f, g, eps, scale); f (B, N), g (B, M).
STEPS = {
    "row_lse": lambda m, c, f, g, eps, s: m.row_lse(c, g, eps),
    "col_lse": lambda m, c, f, g, eps, s: m.col_lse(c, f, eps),
    "row_sigmoid_lse": lambda m, c, f, g, eps, s: m.row_sigmoid_lse(c, f, g, eps),
    "col_sigmoid_lse": lambda m, c, f, g, eps, s: m.col_sigmoid_lse(c, f, g, eps),
    "log_plan": lambda m, c, f, g, eps, s: m.log_plan(c, f, g, eps),
    "plan": lambda m, c, f, g, eps, s: m.plan(c, f, g, eps),
    "plan_scaled": lambda m, c, f, g, eps, s: m.plan(c, f, g, eps, scale=s),
    "plan_cost": lambda m, c, f, g, eps, s: m.plan_cost(c, f, g, eps),
}
LSE_STEPS = ["row_lse", "col_lse", "row_sigmoid_lse", "col_sigmoid_lse"]


# ----------------------------------------------------------------------------- helpers
def rel_error(actual, expected, name="out"):
    """``||a - e|| / ||e||`` over finite entries; infinities and NaNs must sit at the same places.

    Raises AssertionError naming the first mismatching index and both values.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    fin = torch.isfinite(e)
    same_special = torch.where(fin, torch.isfinite(a), (a == e) | (a.isnan() & e.isnan()))
    if not bool(same_special.all()):
        idx = tuple(int(i) for i in (~same_special).nonzero()[0])
        raise AssertionError(f"{name}: non-finite mismatch at {idx}: got {a[idx].item()}, "
                             f"expected {e[idx].item()}")
    diff = (a - e).where(fin, torch.zeros_like(a))
    ref = e.where(fin, torch.zeros_like(e)).norm().item()
    return diff.norm().item() / max(ref, 1e-300)


def assert_rel_close(actual, expected, rtol, name="out"):
    """Relative-norm check (fla's ``assert_close``) reporting the worst index on failure."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), f"{name}: not a tuple"
        return max(assert_rel_close(a, e, rtol, f"{name}[{i}]")
                   for i, (a, e) in enumerate(zip(actual, expected)))
    err = rel_error(actual, expected, name)
    if not err <= rtol:
        a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
        diff = (a - e).abs().where(torch.isfinite(e), torch.zeros_like(a))
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {idx}: "
                             f"got {a[idx].item()!r}, expected {e[idx].item()!r}")
    return err


def make_cost(shape, layout, dtype, device="cpu", forbid=0.1):
    """Cost in [0, 1) with ~``forbid`` of the entries +inf, in a given memory layout."""
    B, N, M = shape
    if layout == "contig":
        cost = torch.rand(B, N, M, dtype=torch.float64)
    elif layout == "T":          # row-major (B, M, N) viewed transposed
        cost = torch.rand(B, M, N, dtype=torch.float64).transpose(1, 2)
    elif layout == "perm":       # batch innermost: strides (1, M*B, B)
        cost = torch.rand(N, M, B, dtype=torch.float64).permute(2, 0, 1)
    elif layout == "expand":     # one cost shared by the batch: stride_b = 0
        return torch.rand(1, N, M, dtype=torch.float64).to(device=device, dtype=dtype).expand(B, N, M)
    else:
        raise ValueError(layout)
    if forbid:
        cost.masked_fill_(torch.rand(B, N, M) < forbid, INF)        # in place: keeps the layout
    return cost.to(device=device, dtype=dtype)                      # keeps it too


def make_potentials(shape, layout, dtype, device="cpu", zero_mass=0.1, scale=0.3):
    """f (B, N), g (B, M), ~``zero_mass`` entries -inf; strided unless ``layout == 'contig'``."""
    B, N, M = shape
    f = torch.randn(N, B, dtype=torch.float64).t() * scale
    g = torch.randn(M, B, dtype=torch.float64).t() * scale
    if zero_mass:
        f = f.masked_fill(torch.rand(B, N) < zero_mass, -INF)
        g = g.masked_fill(torch.rand(B, M) < zero_mass, -INF)
    if layout == "contig":
        f, g = f.contiguous(), g.contiguous()
    return f.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)


def _layout_kept(cost, layout):
    return layout == "contig" or not cost.is_contiguous() or 1 in cost.shape


# ----------------------------------------------------------------------------- twins
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("shape, layout, dtypes, eps", CASES)
def test_step_matches_torch_twin(step, shape, layout, dtypes, eps):
    cost_dtype, dtype, rtol = dtypes
    cost = make_cost(shape, layout, cost_dtype)
    assert _layout_kept(cost, layout)
    f, g = make_potentials(shape, layout, dtype)
    scale = torch.rand(shape[0], dtype=dtype) + 0.5
    out = STEPS[step](K, cost, f, g, eps, scale)
    ref = STEPS[step](T, cost, f, g, eps, scale)
    assert_rel_close(out, ref, rtol, step)


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("cost_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_cost_close_to_fp32(step, cost_dtype):
    shape, eps = (3, 33, 7), 0.5
    cost = make_cost(shape, "T", torch.float32)
    f, g = make_potentials(shape, "T", torch.float32)
    scale = torch.rand(shape[0]) + 0.5
    out = STEPS[step](K, cost.to(cost_dtype), f, g, eps, scale)
    assert_rel_close(out, STEPS[step](T, cost, f, g, eps, scale), LOW_VS_FP32_RTOL, step)


@pytest.mark.parametrize("step", LSE_STEPS)
def test_narrow_tiles_match_torch_twin(step, monkeypatch):
    """The GPU's small-grid tiles (BLOCK_R down to 1, long BLOCK_K) give the same results."""
    monkeypatch.setattr(K, "MIN_PROGRAMS", 512)
    shape = (1, 33, 130)
    cost = make_cost(shape, "T", torch.float32)
    f, g = make_potentials(shape, "T", torch.float32)
    for c in (cost, cost.contiguous()):
        assert_rel_close(STEPS[step](K, c, f, g, 0.1, None), STEPS[step](T, c, f, g, 0.1, None), 1e-5, step)


@pytest.mark.parametrize("step", LSE_STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_empty_support_gives_minus_inf_not_nan(step, dtype):
    """A row/column that is all forbidden (or all zero mass) reduces to -inf, never NaN."""
    B, N, M = 2, 7, 33
    cost = make_cost((B, N, M), "contig", dtype, forbid=0.0)
    cost[0, 3, :] = INF          # row 3 of problem 0 forbidden
    cost[1, :, 5] = INF          # column 5 of problem 1 forbidden
    f, g = make_potentials((B, N, M), "contig", dtype, zero_mass=0.0)
    f[1, :] = -INF               # problem 1: no row mass at all
    out = STEPS[step](K, cost, f, g, 0.1, None)
    ref = STEPS[step](T, cost, f, g, 0.1, None)
    first = out[0] if isinstance(out, tuple) else out
    assert not any(bool(t.isnan().any()) for t in (out if isinstance(out, tuple) else (out,)))
    if step in ("row_lse", "row_sigmoid_lse"):
        assert first[0, 3].item() == -INF
    else:
        assert first[1, 5].item() == -INF
    assert_rel_close(out, ref, 1e-5 if dtype == torch.float32 else 1e-10, step)


def test_plan_cost_ignores_forbidden_entries():
    cost = torch.full((1, 7, 33), INF)
    cost[0, 2, 4] = 0.25
    f, g = torch.zeros(1, 7), torch.zeros(1, 33)
    out = K.plan_cost(cost, f, g, 0.5)
    assert out.shape == (1,) and torch.isfinite(out).all()
    assert math.isclose(out.item(), 0.25 * math.exp(-0.5), rel_tol=1e-6)


def test_extreme_eps_no_overflow():
    """eps = 1e-3 on a cost in [0, 1]: log-domain, finite (no exp(-C/eps) underflow to -inf)."""
    shape = (1, 33, 7)
    cost = make_cost(shape, "contig", torch.float32, forbid=0.0)
    f, g = make_potentials(shape, "contig", torch.float32, zero_mass=0.0)
    out = K.row_lse(cost, g, 1e-3)
    assert torch.isfinite(out).all()
    assert_rel_close(out, T.row_lse(cost, g, 1e-3), 1e-5)


def test_inputs_not_modified():
    cost = make_cost((2, 7, 33), "T", torch.float32)
    f, g = make_potentials((2, 7, 33), "T", torch.float32)
    copies = [t.clone() for t in (cost, f, g)]
    K.row_sigmoid_lse(cost, f, g, 0.1)
    K.plan(cost, f, g, 0.1)
    assert all(torch.equal(a, b) for a, b in zip((cost, f, g), copies))


def test_same_names_and_signatures_as_torch_twins():
    twins = [n for n, fn in vars(T).items()
             if inspect.isfunction(fn) and not n.startswith("_") and fn.__module__ == T.__name__]
    assert set(LSE_STEPS) <= set(twins)
    for name in twins:
        assert hasattr(K, name), f"lse_steps lacks {name}"
        assert inspect.signature(getattr(K, name)) == inspect.signature(getattr(T, name)), name


# ----------------------------------------------------------------------------- fused updates
def _updates(kind, B, N, M, dtype, eps):
    """(row-pass, column-pass) ``Update``s of one solver kind, with zero weights and infinite biases."""
    la, lb = (torch.randn(B, n, dtype=dtype) for n in (N, M))
    la[0, 0], lb[-1, -1] = -INF, -INF
    if kind == "sinkhorn":
        return Update(elog_h=eps * lb), Update(elog_h=eps * la)
    if kind == "damped":
        return Update(elog_h=eps * lb, damp=0.7, damp_offset=True), Update(elog_h=eps * la, damp=0.6)
    if kind == "bregman":
        w = torch.randn(B, M, dtype=dtype).masked_fill(lb.isneginf(), -INF)
        return (Update(elog_cap=eps * la, log_mass=torch.randn(B, dtype=dtype), w=w),
                Update(elog_cap=eps * lb, t=torch.randn(B, dtype=dtype)))
    if kind == "dummy":
        ext = [torch.cat([x, torch.randn(B, 1, dtype=dtype)], -1) for x in (la, lb)]
        return Update(elog_h=eps * ext[1], dummy=True), Update(elog_h=eps * ext[0], dummy=True)
    bias = eps * torch.randn(B, M, dtype=dtype)
    bias[0, 0], bias[-1, -1] = INF, -INF  # a full and an empty column
    return Update(bias=torch.full((), 0.3, dtype=dtype).expand(B, N)), Update(bias=bias)


UPDATE_KINDS = ["sinkhorn", "damped", "bregman", "dummy", "multi"]
UPDATE_CASES = [CASES[i] for i in (1, 2, 5, 8, 10)]


@pytest.mark.parametrize("kind", UPDATE_KINDS)
@pytest.mark.parametrize("shifted", ["none", "r", "rs"])
@pytest.mark.parametrize("shape, layout, dtypes, eps", UPDATE_CASES)
def test_update_matches_torch_twin(kind, shifted, shape, layout, dtypes, eps):
    """Each solver's fused update (the kernel epilogue) against the torch composition."""
    cost_dtype, dtype, rtol = dtypes
    B, N, M = shape
    cost = make_cost(shape, layout, cost_dtype)
    # multi-assignment potentials are finite (u = -inf meets log sigmoid = -inf: NaN in either twin)
    f, g = make_potentials(shape, layout, dtype, zero_mass=0.0 if kind == "multi" else 0.1)
    if kind == "dummy":
        f, g = (torch.cat([x, torch.randn(B, 1, dtype=dtype)], -1) for x in (f, g))
    shift = {"none": None, "r": (torch.rand(B, N, dtype=dtype), None),
             "rs": (torch.rand(B, N, dtype=dtype), torch.rand(B, M, dtype=dtype))}[shifted]
    rows, cols = _updates(kind, B, N, M, dtype, eps)
    if kind == "multi":
        pairs = [(m.row_sigmoid_lse(cost, f, g, eps, shift, update=rows),
                  m.col_sigmoid_lse(cost, f, g, eps, shift, update=cols)) for m in (K, T)]
    else:
        pairs = [(m.row_lse(cost, g, eps, shift, update=rows), m.col_lse(cost, f, eps, shift, update=cols))
                 for m in (K, T)]
    assert_rel_close(pairs[0], pairs[1], rtol, kind)
    outs = [x for pair in pairs[0] for x in (pair if isinstance(pair, tuple) else (pair,))]
    assert not any(bool(x.isnan().any()) for x in outs)


@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_update_narrow_tiles_match_torch_twin(kind, monkeypatch):
    """The GPU's small-grid tiles: many programs per problem share the mass pre-pass and the dummy line."""
    monkeypatch.setattr(K, "MIN_PROGRAMS", 512)
    B, N, M, eps = 2, 33, 130, 0.1
    cost = make_cost((B, N, M), "T", torch.float32)
    f, g = make_potentials((B, N, M), "T", torch.float32, zero_mass=0.0 if kind == "multi" else 0.1)
    if kind == "dummy":
        f, g = (torch.cat([x, torch.randn(B, 1)], -1) for x in (f, g))
    rows, cols = _updates(kind, B, N, M, torch.float32, eps)
    if kind == "multi":
        got = K.row_sigmoid_lse(cost, f, g, eps, update=rows), K.col_sigmoid_lse(cost, f, g, eps, update=cols)
        ref = T.row_sigmoid_lse(cost, f, g, eps, update=rows), T.col_sigmoid_lse(cost, f, g, eps, update=cols)
    else:
        got = K.row_lse(cost, g, eps, update=rows), K.col_lse(cost, f, eps, update=cols)
        ref = T.row_lse(cost, g, eps, update=rows), T.col_lse(cost, f, eps, update=cols)
    assert_rel_close(got, ref, 1e-5, kind)


def test_update_writes_the_given_buffers():
    """A mass update's t and w go into the caller's scratch tensors, which are returned (no allocation)."""
    B, N, M, eps = 2, 7, 33, 0.1
    cost = make_cost((B, N, M), "contig", torch.float32)
    f, g = make_potentials((B, N, M), "contig", torch.float32)
    rows, cols = _updates("bregman", B, N, M, torch.float32, eps)
    out = (torch.empty(B), torch.empty(B, M))
    new_f, t = K.row_lse(cost, g, eps, update=rows._replace(out=out))
    new_g, w = K.col_lse(cost, f, eps, update=cols._replace(out=out))
    assert t is out[0] and w is out[1]
    assert_rel_close((new_f, t), T.row_lse(cost, g, eps, update=rows), 1e-5)
    assert_rel_close((new_g, w), T.col_lse(cost, f, eps, update=cols), 1e-5)


def test_update_errors():
    cost = torch.rand(2, 7, 33)
    f, g = torch.zeros(2, 7), torch.zeros(2, 33)
    with pytest.raises(ValueError, match="sigmoid"):
        K.row_sigmoid_lse(cost, f, g, 0.1, update=Update(elog_h=g))
    with pytest.raises(ValueError, match="sigmoid"):
        K.row_lse(cost, g, 0.1, update=Update(bias=f))
    with pytest.raises(ValueError, match="log_mass and w"):
        K.row_lse(cost, g, 0.1, update=Update(log_mass=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"shape \(2, 34\) with update.dummy"):
        K.row_lse(cost, g, 0.1, update=Update(dummy=True))
    with pytest.raises(ValueError, match=r"update.elog_h must have shape \(2, 33\)"):
        K.row_lse(cost, g, 0.1, update=Update(elog_h=f))


# ----------------------------------------------------------------------------- launcher errors
def test_launcher_errors():
    cost = torch.rand(2, 7, 33)
    g = torch.zeros(2, 33)
    with pytest.raises(ValueError, match="cost must have shape"):
        K.row_lse(cost[0], g[0], 0.1)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 33\)"):
        K.row_lse(cost, torch.zeros(2, 7), 0.1)
    with pytest.raises(ValueError, match="float32 or float64"):
        K.row_lse(cost, g.half(), 0.1)
    with pytest.raises(ValueError, match="cost must be float16"):
        K.row_lse(cost.to(torch.int32), g, 0.1)
    with pytest.raises(ValueError, match="device"):
        K.row_lse(cost, torch.zeros(2, 33, device="meta"), 0.1)
    with pytest.raises(ValueError, match="dtype of the other"):
        K.log_plan(cost, torch.zeros(2, 7), torch.zeros(2, 33, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        K.col_lse(torch.rand(2, 0, 33), torch.zeros(2, 0), 0.1)


# ----------------------------------------------------------------------------- fused small path
def _fold(pot, log_w, eps):
    return torch.where(torch.isneginf(log_w), log_w, pot + eps * log_w)


def _balanced_twin_loop(cost, log_a, log_b, f, g, eps, n_iters):
    for _ in range(n_iters):
        f = -T.row_lse(cost, _fold(g, log_b, eps), eps)
        g = -T.col_lse(cost, _fold(f, log_a, eps), eps)
    return f, g


def _log_marginals(B, N, M, dtype):
    log_a = torch.log_softmax(torch.randn(B, N, dtype=torch.float64), -1)
    log_b = torch.randn(B, M, dtype=torch.float64)
    if M > 2:
        log_b[:, 1] = -INF       # a zero-mass column
    return log_a.to(dtype), torch.log_softmax(log_b, -1).to(dtype)


SMALL_CASES = [
    _case(1, 1, 1, "contig", FP32),
    _case(3, 7, 33, "T", FP32),
    _case(2, 130, 7, "contig", FP32),
    _case(1, 33, 130, "perm", FP32),
    _case(3, 33, 7, "T", FP64),
    _case(2, 7, 33, "contig", BF16),
]


@pytest.mark.parametrize("shape, layout, dtypes, eps", SMALL_CASES)
def test_balanced_small_matches_twin_loop(shape, layout, dtypes, eps):
    cost_dtype, dtype, rtol = dtypes
    B, N, M = shape
    cost = make_cost(shape, layout, cost_dtype, forbid=0.1 if N * M > 1 else 0.0)
    if N > 1 and M > 1:
        cost[:, 0, :] = cost[:, 0, :].clamp(max=0.9)   # no fully forbidden row or column
        cost[:, :, 0] = cost[:, :, 0].clamp(max=0.9)
    log_a, log_b = _log_marginals(B, N, M, dtype)
    f0, g0 = make_potentials(shape, layout, dtype, zero_mass=0.0)
    f, g = K.balanced_small(cost, log_a, log_b, f0, g0, eps, 20)
    f_ref, g_ref = _balanced_twin_loop(cost, log_a, log_b, f0, g0, eps, 20)
    # 20 iterations amplify per-step rounding a little: 10x the one-step tolerance
    assert_rel_close(f, f_ref, 10 * rtol, "f")
    assert_rel_close(g, g_ref, 10 * rtol, "g")


def test_balanced_small_broadcast_marginals_and_zero_iters():
    B, N, M = 3, 7, 33
    cost = make_cost((B, N, M), "contig", torch.float32, forbid=0.0)
    log_a = torch.full((1, N), -math.log(N)).expand(B, N)      # stride-0 batch
    log_b = torch.full((M,), -math.log(M)).expand(B, M)
    f0, g0 = make_potentials((B, N, M), "contig", torch.float32, zero_mass=0.0)
    f, g = K.balanced_small(cost, log_a, log_b, f0, g0, 0.1, 0)
    assert torch.equal(f, f0) and torch.equal(g, g0) and f.data_ptr() != f0.data_ptr()
    f, g = K.balanced_small(cost, log_a, log_b, f0, g0, 0.1, 5)
    f_ref, g_ref = _balanced_twin_loop(cost, log_a.contiguous(), log_b.contiguous(), f0, g0, 0.1, 5)
    assert_rel_close(f, f_ref, 1e-5, "f")
    assert_rel_close(g, g_ref, 1e-5, "g")


def test_balanced_small_size_limit():
    assert K.balanced_small_supported(128, 128) and not K.balanced_small_supported(130, 130)
    assert K.balanced_small_supported(64, 64, torch.float64)
    assert not K.balanced_small_supported(64, 65, torch.float64)
    cost = torch.rand(1, 130, 130)
    zeros_n = torch.zeros(1, 130)
    with pytest.raises(ValueError, match="balanced_small needs"):
        K.balanced_small(cost, zeros_n, zeros_n, zeros_n, zeros_n, 0.1, 3)
    with pytest.raises(ValueError, match="n_iters"):
        z7 = zeros_n[:, :7]
        K.balanced_small(cost[:, :7, :7], z7, z7, z7, z7, 0.1, -1)


# ----------------------------------------------------------------------------- CUDA, larger shapes
CUDA_CASES = [
    _case(4, 1000, 777, "contig", FP32),
    _case(2, 4097, 513, "T", FP32),
    _case(2, 513, 4097, "perm", FP64),
    _case(3, 2048, 1000, "contig", BF16, eps=0.5),
    _case(1, 1, 100_000, "T", FP32),
]


@requires_cuda
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("shape, layout, dtypes, eps", CUDA_CASES)
def test_step_matches_torch_twin_cuda(step, shape, layout, dtypes, eps):
    cost_dtype, dtype, rtol = dtypes
    cost = make_cost(shape, layout, cost_dtype, device="cuda")
    f, g = make_potentials(shape, layout, dtype, device="cuda")
    scale = torch.rand(shape[0], dtype=dtype, device="cuda") + 0.5
    out = STEPS[step](K, cost, f, g, eps, scale)
    ref = STEPS[step](T, cost, f, g, eps, scale)
    # long sums in fp32 reorder rounding: allow 10x
    assert_rel_close(out, ref, rtol * (10 if dtype == torch.float32 else 1), step)


@requires_cuda
@pytest.mark.parametrize("shape, layout, dtypes, eps", [
    _case(64, 100, 120, "contig", FP32),
    _case(16, 128, 128, "T", FP32),
    _case(8, 60, 60, "perm", FP64),
])
def test_balanced_small_matches_twin_loop_cuda(shape, layout, dtypes, eps):
    cost_dtype, dtype, rtol = dtypes
    B, N, M = shape
    cost = make_cost(shape, layout, cost_dtype, device="cuda", forbid=0.0)
    log_a, log_b = (t.cuda() for t in _log_marginals(B, N, M, dtype))
    f0, g0 = make_potentials(shape, layout, dtype, device="cuda", zero_mass=0.0)
    f, g = K.balanced_small(cost, log_a, log_b, f0, g0, eps, 50)
    f_ref, g_ref = _balanced_twin_loop(cost, log_a, log_b, f0, g0, eps, 50)
    assert_rel_close(f, f_ref, 10 * rtol, "f")
    assert_rel_close(g, g_ref, 10 * rtol, "g")
