"""FeatureCost: streaming torch steps vs their dense twins, solvers vs ``cost.dense()``, gradients, memory.

Reference ladder: each ``_feature_steps`` function against its ``_torch_steps``
twin on ``cost.dense()``; each solver on a ``FeatureCost`` against the same
solver on ``cost.dense()`` (float64, 1e-10 relative); envelope gradients
w.r.t. the features against autograd through ``dense()`` (float64, 1e-8).
A small ``workspace`` forces many chunks everywhere.
"""
import doctest
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ot_losses.features
from ot_losses import FeatureCost, multi_assignment_sinkhorn, partial_ot, sinkhorn
from ot_losses.features import MIN_WORKSPACE
from ot_losses.solvers import _feature_steps as S
from ot_losses.solvers import _torch_steps as T
from strategies import assert_close, assert_unchanged, snapshot

F64 = torch.float64
INF = float("inf")
KINDS = ["sqeuclidean", "dot", "cosine"]
TINY = MIN_WORKSPACE   # a few rows per chunk at these sizes: every loop runs many chunks

# name -> call(module, cost, f, g, eps, scale, shift); f (B, N), g (B, M), shift None or ((B, N), (B, M))
STEPS = {
    "row_lse": lambda m, c, f, g, eps, s, sh: m.row_lse(c, g, eps, shift=sh),
    "col_lse": lambda m, c, f, g, eps, s, sh: m.col_lse(c, f, eps, shift=sh),
    "row_sigmoid_lse": lambda m, c, f, g, eps, s, sh: m.row_sigmoid_lse(c, f, g, eps, shift=sh),
    "col_sigmoid_lse": lambda m, c, f, g, eps, s, sh: m.col_sigmoid_lse(c, f, g, eps, shift=sh),
    "log_plan": lambda m, c, f, g, eps, s, sh: m.log_plan(c, f, g, eps, shift=sh),
    "plan": lambda m, c, f, g, eps, s, sh: m.plan(c, f, g, eps, shift=sh),
    "plan_scaled": lambda m, c, f, g, eps, s, sh: m.plan(c, f, g, eps, scale=s, shift=sh),
    "plan_cost": lambda m, c, f, g, eps, s, sh: m.plan_cost(c, f, g, eps, shift=sh),
}


def features(B, N, M, D, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=gen, dtype=F64)
    y = torch.randn(B, M, D, generator=gen, dtype=F64) * 0.8 + 0.3
    return x.to(dtype), y.to(dtype)


def potentials(B, N, M, dtype, zero_mass=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, N, generator=gen, dtype=F64)
    g = torch.randn(B, M, generator=gen, dtype=F64)
    if zero_mass and N > 2 and M > 2:
        f[0, 1] = g[-1, 2] = -INF
    return f.to(dtype), g.to(dtype)


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), fin) and torch.equal(x[~fin], ref[~fin])
    return ((x[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- the object
@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_formula(kind):
    x, y = features(2, 5, 7, 3)
    cost = FeatureCost(x, y, kind=kind, scale=0.7)
    if kind == "sqeuclidean":
        ref = 0.7 * ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    elif kind == "dot":
        ref = -0.7 * x @ y.transpose(1, 2)
    else:
        ref = 0.7 * (1 - torch.nn.functional.cosine_similarity(x[:, :, None], y[:, None], dim=-1))
    assert cost.shape == (2, 5, 7) and cost.dtype == F64
    assert_close(cost.dense(), ref, 1e-13, "dense")
    single = FeatureCost(x[0], y[0], kind=kind, scale=0.7)
    assert single.shape == (5, 7) and single.dense().shape == (5, 7)
    assert_close(single.dense(), ref[0], 1e-13, "dense (unbatched)")


def test_dense_dtype_follows_features():
    x, y = features(1, 4, 6, 3, dtype=torch.bfloat16)
    out = FeatureCost(x, y).dense()
    assert out.dtype == torch.bfloat16
    ref = FeatureCost(x.double(), y.double()).dense()
    assert_close(out.double(), ref, 1e-2, "bf16 dense")


def test_errors_name_the_argument():
    x, y = features(2, 4, 5, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        FeatureCost([[1.0]], y)
    with pytest.raises(TypeError, match="y must be a floating tensor"):
        FeatureCost(x, y.long())
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\) or \(B, N, D\)"):
        FeatureCost(x[0, 0], y)
    with pytest.raises(ValueError, match="must both be 2-D"):
        FeatureCost(x[0], y)
    with pytest.raises(ValueError, match="batch size of x"):
        FeatureCost(x, y[:1])
    with pytest.raises(ValueError, match="feature dimension D of x"):
        FeatureCost(x, y[..., :2])
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        FeatureCost(x, y.float())
    with pytest.raises(ValueError, match="y must be on the same device as x"):
        FeatureCost(x, y.to("meta"))
    with pytest.raises(ValueError, match="kind must be one of"):
        FeatureCost(x, y, kind="euclidean")
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        FeatureCost(x, y, scale=0.0)
    with pytest.raises(ValueError, match="workspace must be an int"):
        FeatureCost(x, y, workspace=10)
    with pytest.raises(ValueError, match="no empty dimension"):
        FeatureCost(x[:, :0], y)
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="features x must be finite"):
        sinkhorn(FeatureCost(bad, y), eps=0.1, n_iters=1)
    with pytest.raises(ValueError, match="features x must be finite"):
        FeatureCost(bad, y).dense()
    zero = y.clone()
    zero[0, 3] = 0
    with pytest.raises(ValueError, match="zero rows for kind='cosine'"):
        partial_ot(FeatureCost(x, zero, kind="cosine"), mass=0.5, n_iters=1)
    with pytest.raises(ValueError, match=r"a must have shape \(4,\)"):
        sinkhorn(FeatureCost(x, y), torch.ones(5) / 5)
    with pytest.raises(TypeError, match=r"cost must be a torch.Tensor \(or an ot_losses.FeatureCost\)"):
        sinkhorn([[0.0]])


def test_repr_and_docstring_example():
    x, y = features(1, 3, 4, 2)
    assert "kind='sqeuclidean'" in repr(FeatureCost(x, y)) and "(1, 3, 4)" in repr(FeatureCost(x, y))
    result = doctest.testmod(ot_losses.features, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- steps vs dense twins
CASES = [  # (B, N, M, D, dtype, rtol)
    pytest.param(1, 1, 1, 1, F64, 1e-12, id="B1-N1-M1-D1-fp64"),
    pytest.param(2, 13, 7, 5, F64, 1e-12, id="B2-N13-M7-D5-fp64"),
    pytest.param(1, 6, 17, 33, F64, 1e-12, id="B1-N6-M17-D33-fp64"),
    pytest.param(2, 13, 7, 5, torch.float32, 1e-5, id="B2-N13-M7-D5-fp32"),
]


def _shift(B, N, M, dtype, seed=2):
    """Offsets ``(r, s)`` as the solvers make them: ~ the cost's row minima, then column minima."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, generator=gen, dtype=F64).to(dtype),
            0.3 * torch.randn(B, M, generator=gen, dtype=F64).to(dtype))


@pytest.mark.parametrize("shifted", [None, "rows", "lines"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B, N, M, D, dtype, rtol", CASES)
def test_steps_match_dense_twins(kind, B, N, M, D, dtype, rtol, shifted):
    x, y = features(B, N, M, D, dtype)
    cost = FeatureCost(x, y, kind=kind, scale=0.6, workspace=TINY)
    dense = cost.dense()
    f, g = potentials(B, N, M, dtype)
    scale = torch.rand(B, dtype=dtype) + 0.5
    shift = None if shifted is None else _shift(B, N, M, dtype)
    if shifted == "rows":   # one offset per row (or problem), none per column
        shift = (shift[0], None)
    for name, call in STEPS.items():
        small = name == "plan_cost"   # a sum of plan-weighted costs: potentials scaled to keep it O(1)
        fs, gs = (f * 0.1, g * 0.1) if small else (f, g)
        out, ref = call(S, cost, fs, gs, 0.3, scale, shift), call(T, dense, fs, gs, 0.3, scale, shift)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert o.dtype == r.dtype and o.shape == r.shape, name
            if small:   # <P, C> may cancel (signed costs, offsets): error relative to sum |P C| terms
                terms = dense.abs()
                if shift is not None:
                    terms = terms + shift[0].abs()[..., None]
                    terms = terms if shift[1] is None else terms + shift[1].abs()[..., None, :]
                mag = T.plan(dense, fs, gs, 0.3, shift=shift) * terms
                assert ((o - r).abs() <= rtol * mag.sum(dim=(-2, -1))).all(), f"{name}: {o} vs {r}"
            else:
                assert rel(o, r) <= rtol, f"{name}: {rel(o, r):.3e}"


def test_chunking_does_not_change_results():
    x, y = features(2, 23, 9, 4)
    f, g = potentials(2, 23, 9, F64)
    one = FeatureCost(x, y, workspace=2 ** 30)
    many = FeatureCost(x, y, workspace=TINY)
    assert len(S._chunks(many, F64, True, 2)) > 1 and len(S._chunks(one, F64, True, 2)) == 1
    for name in ("row_lse", "col_lse", "plan_cost"):
        call = STEPS[name]
        assert rel(call(S, many, f, g, 0.2, None, None), call(S, one, f, g, 0.2, None, None)) <= 1e-14


def test_all_zero_mass_reduces_to_minus_inf():
    x, y = features(1, 4, 5, 2)
    cost = FeatureCost(x, y)
    h = torch.full((1, 5), -INF, dtype=F64)
    out = S.row_lse(cost, h, 0.1)
    assert torch.equal(out, torch.full((1, 4), -INF, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
def test_feature_grads_match_autograd_through_dense(kind):
    x, y = features(2, 9, 11, 4)
    f, g = potentials(2, 9, 11, F64)
    scale = torch.tensor([0.7, 1.3], dtype=F64)
    shift = _shift(2, 9, 11, F64)
    cost = FeatureCost(x, y, kind=kind, scale=0.8, workspace=TINY)
    gx, gy = S.feature_grads(cost, f, g, 0.4, scale=scale, shift=shift)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    plan = T.plan(cost.dense(), f, g, 0.4, shift=shift).detach()
    inner = (plan * FeatureCost(xr, yr, kind=kind, scale=0.8).dense()).sum(dim=(-2, -1))
    rx, ry = torch.autograd.grad((inner * scale).sum(), (xr, yr))
    assert rel(gx, rx) <= 1e-12 and rel(gy, ry) <= 1e-12


REDUCTIONS = {   # streamed set-up reductions vs the same reduction of dense()
    "max_cost": (lambda c: S.max_cost(c), lambda d: d.amax(dim=(-2, -1))),
    "row_min": (lambda c: S.line_stats(c)[0], lambda d: d.amin(-1)),
    "row_max": (lambda c: S.line_stats(c)[1], lambda d: d.amax(-1)),
    "col_min": (lambda c: S.line_stats(c)[2], lambda d: d.amin(-2)),
    "col_max": (lambda c: S.line_stats(c)[3], lambda d: d.amax(-2)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_setup_reductions_and_their_gradients_match_dense(kind, name):
    x, y = features(3, 17, 6, 3)
    ours, dense_ref = REDUCTIONS[name]
    out, weights = [], torch.rand(3, 17 if name.startswith("row") else 6, dtype=F64)
    if name == "max_cost":
        weights = weights[:, 0]
    for dense in (False, True):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        cost = FeatureCost(xr, yr, kind=kind, workspace=TINY)
        val = dense_ref(cost.dense()) if dense else ours(cost)
        out.append((val,) + torch.autograd.grad((val * weights).sum(), (xr, yr)))
    for o, d in zip(out[0], out[1]):
        assert rel(o, d) <= 1e-13
    with torch.no_grad():   # without a graph: the streamed values themselves
        assert rel(ours(FeatureCost(x, y, kind=kind, workspace=TINY)), out[1][0]) <= 1e-13


def test_check_values_gives_the_dense_line_stats():
    from ot_losses import _validate as V
    x, y = features(2, 9, 5, 3)
    cost = FeatureCost(x, y, workspace=TINY)
    forbidden, stats = V.check_cost_values(cost)
    dense_forbidden, dense_stats = V.check_cost_values(cost.dense())
    assert forbidden is dense_forbidden is False
    for o, d in zip(stats, dense_stats):
        assert rel(o, d) <= 1e-14


def test_twin_names_and_signatures():
    from ot_losses.kernels import feature_lse as K
    for name in list(STEPS)[:4] + ["log_plan", "plan", "plan_cost", "feature_grads", "max_cost"]:
        assert inspect.signature(getattr(S, name)) == inspect.signature(getattr(K, name)), name
        if hasattr(T, name):
            assert inspect.signature(getattr(S, name)) == inspect.signature(getattr(T, name)), name


# ----------------------------------------------------------------------------- solvers vs dense()
def _pair(kind, batch=(2,), N=9, M=7, D=3, seed=0):
    x, y = features(batch[0] if batch else 1, N, M, D, seed=seed)
    if not batch:
        x, y = x[0], y[0]
    return FeatureCost(x, y, kind=kind, scale=0.5, workspace=TINY)


def _compare(res, ref, fields, rtol=1e-10):
    for name in fields:
        err = rel(getattr(res, name), getattr(ref, name))
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"
    # a converged error is rounding noise (~1e-13): compare it absolutely
    diff = (res.marginal_error - ref.marginal_error).abs().max().item()
    limit = rtol * ref.marginal_error.abs().max().item() + 1e-12
    assert diff <= limit, f"marginal_error differs by {diff:.3e}"
    assert res.n_iters == ref.n_iters


SINKHORN_CASES = {
    "balanced": dict(),
    "unbalanced": dict(reach=0.8),
    "two-reaches": dict(reach=(0.5, float("inf"))),
    "tol": dict(tol=1e-9, n_iters=2000),
    "eps-schedule": dict(eps_schedule=[2.0, 1.0, 0.5]),
    "weights": dict(a="random", b="random"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(SINKHORN_CASES))
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_sinkhorn_matches_dense(kind, case, batch):
    cost = _pair(kind, batch)
    kw = dict(eps=0.3, n_iters=60)
    kw.update(SINKHORN_CASES[case])
    if kw.get("a") == "random":
        gen = torch.Generator().manual_seed(3)
        kw["a"] = torch.softmax(torch.randn(cost.shape[:-1], generator=gen, dtype=F64), -1)
        kw["b"] = torch.softmax(torch.randn(cost.shape[:-2] + cost.shape[-1:], generator=gen, dtype=F64), -1)
    res, ref = sinkhorn(cost, **kw), sinkhorn(cost.dense(), **kw)
    _compare(res, ref, ["f", "g", "plan", "log_plan", "value", "transport_cost"])
    assert torch.equal(res.converged, ref.converged)


def test_sinkhorn_warm_start_matches_dense():
    cost = _pair("sqeuclidean")
    first = sinkhorn(cost.dense(), eps=0.3, n_iters=5)
    res = sinkhorn(cost, eps=0.3, n_iters=20, init=(first.f, first.g))
    ref = sinkhorn(cost.dense(), eps=0.3, n_iters=20, init=(first.f, first.g))
    _compare(res, ref, ["f", "g", "plan"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["bregman", "dummy"])
def test_partial_matches_dense(kind, method):
    cost = _pair(kind)
    kw = dict(mass=0.6, eps=0.3, n_iters=300, tol=1e-10, method=method)
    res, ref = partial_ot(cost, **kw), partial_ot(cost.dense(), **kw)
    _compare(res, ref, ["f", "g", "plan", "mass", "value", "transport_cost"])


@pytest.mark.parametrize("kind", KINDS)
def test_multi_assignment_matches_dense(kind):
    cost = _pair(kind, N=8, M=6)
    kw = dict(k=2.5, eps=0.3, n_iters=300, tol=1e-10)
    res, ref = multi_assignment_sinkhorn(cost, **kw), multi_assignment_sinkhorn(cost.dense(), **kw)
    _compare(res, ref, ["f", "g", "assignment"])


@pytest.mark.parametrize("solve", ["sinkhorn", "unbalanced", "partial", "multi"])
def test_large_offsets_shifted_like_dense(solve):
    """Clouds far apart: costs ~3e4 with spreads ~10, so the solvers take offsets out of the cost."""
    from ot_losses import _validate as V
    from ot_losses.solvers._loop import cost_shift
    x, y = features(2, 9, 7, 3)
    cost = FeatureCost(x + 100.0, y, workspace=TINY)
    assert cost_shift(V.check_cost_values(cost)[1], F64, per_line=solve != "partial") is not None
    call = {"sinkhorn": lambda c: sinkhorn(c, eps=0.3, n_iters=500, tol=1e-10),
            "unbalanced": lambda c: sinkhorn(c, eps=0.3, n_iters=500, reach=2.0),
            "partial": lambda c: partial_ot(c, mass=0.5, eps=0.3, n_iters=500, tol=1e-10, method="dummy"),
            "multi": lambda c: multi_assignment_sinkhorn(c, k=2, eps=0.3, n_iters=500, tol=1e-10)}[solve]
    res, ref = call(cost), call(cost.dense())
    _compare(res, ref, ["f", "g", "assignment" if solve == "multi" else "plan"])


def test_inputs_not_modified_and_result_lazy():
    x, y = features(2, 6, 5, 3)
    a = torch.full((6,), 1 / 6, dtype=F64)
    snap = snapshot(x, y, a)
    res = sinkhorn(FeatureCost(x, y, kind="cosine"), a, eps=0.2, n_iters=10)
    assert "plan" not in res.__dict__          # materialised on access only
    _ = res.plan, res.value, res.transport_cost
    part = partial_ot(FeatureCost(x, y), a, mass=0.5, method="dummy", n_iters=10)
    _ = part.mass, part.value, part.transport_cost
    assert "plan" not in part.__dict__         # mass is streamed too
    assert torch.allclose(part.mass, part.plan.sum(dim=(-2, -1)), rtol=1e-12, atol=0)
    assert_unchanged(snap)


# ----------------------------------------------------------------------------- gradients
def _grads(fn, kind, dense, batch=(2,)):
    x, y = features(batch[0] if batch else 1, 7, 6, 3)
    if not batch:
        x, y = x[0], y[0]
    x.requires_grad_(True)
    y.requires_grad_(True)
    cost = FeatureCost(x, y, kind=kind, scale=0.5, workspace=TINY)
    value = fn(cost.dense() if dense else cost)
    return torch.autograd.grad((value * torch.linspace(0.5, 1.5, value.numel(), dtype=F64)
                                .reshape(value.shape)).sum(), (x, y))


GRAD_SOLVES = {
    "balanced": lambda c: sinkhorn(c, eps=0.3, n_iters=500, tol=1e-12).value,
    "unbalanced": lambda c: sinkhorn(c, eps=0.3, n_iters=500, tol=1e-12, reach=0.7).value,
    "partial-bregman": lambda c: partial_ot(c, mass=0.6, eps=0.3, n_iters=2000, tol=1e-12).value,
    "partial-dummy": lambda c: partial_ot(c, mass=0.6, eps=0.3, n_iters=2000, tol=1e-12,
                                          method="dummy", dummy_cost=3.0).value,
    "partial-dummy-max": lambda c: partial_ot(c, mass=0.6, eps=0.3, n_iters=2000, tol=1e-12,
                                              method="dummy").value,   # xi = 100 max C: its gradient too
    "unroll": lambda c: sinkhorn(c, eps=0.3, n_iters=7, grad="unroll").value,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solve", list(GRAD_SOLVES))
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_value_gradients_match_autograd_through_dense(kind, solve, batch):
    got = _grads(GRAD_SOLVES[solve], kind, dense=False, batch=batch)
    want = _grads(GRAD_SOLVES[solve], kind, dense=True, batch=batch)
    for name, g, w in zip("xy", got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel(g, w) <= 1e-8, f"d value / d {name}: {rel(g, w):.3e}"


def test_marginal_gradients_match_dense():
    x, y = features(1, 6, 5, 3)
    out = []
    for dense in (False, True):
        a = torch.full((6,), 1 / 6, dtype=F64, requires_grad=True)
        cost = FeatureCost(x[0], y[0])
        res = sinkhorn(cost.dense() if dense else cost, a, eps=0.3, reach=0.9, n_iters=500, tol=1e-12)
        out.append(torch.autograd.grad(res.value, a)[0])
    assert rel(out[0], out[1]) <= 1e-8


def test_envelope_gradient_cannot_be_differentiated_again():
    x, y = features(1, 5, 4, 2)
    x.requires_grad_(True)
    res = sinkhorn(FeatureCost(x, y), eps=0.3, n_iters=20)
    (gx,) = torch.autograd.grad(res.value.sum(), x, create_graph=True)   # first derivative: fine
    assert rel(gx, torch.autograd.grad(res.value.sum(), x)[0]) == 0
    with pytest.raises(RuntimeError, match="exact first derivatives only"):
        gx.sum().backward()


def test_low_precision_features_gradient_dtype():
    x, y = features(1, 6, 5, 3, dtype=torch.float32)
    x.requires_grad_(True)
    res = sinkhorn(FeatureCost(x, y, kind="dot"), eps=0.3, n_iters=50)
    assert res.f.dtype == torch.float32
    (gx,) = torch.autograd.grad(res.value.sum(), x)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()


# ----------------------------------------------------------------------------- memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from ot_losses import FeatureCost, sinkhorn

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    n, d, workspace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    x, y = torch.randn(n, d), torch.randn(n, d)
    sinkhorn(FeatureCost(x[:64], y[:64]), eps=1.0, n_iters=2)   # warm-up: libraries, allocator
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:   # reset the high-water mark to the current RSS
        fh.write("5")
    res = sinkhorn(FeatureCost(x, y, workspace=workspace), eps=1.0, n_iters=2)
    _ = res.transport_cost, res.marginal_error
    print(json.dumps({"peak": status("VmHWM:"), "base": base}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_solve_memory_is_bounded_by_the_workspace():
    """6000 x 6000 fp32 (a 137 MiB dense cost): the solve's peak RSS grows by about the workspace.

    A fixed glibc mmap threshold returns every freed tile to the system at once, so the
    peak RSS is the live memory; with glibc's default (dynamic) threshold a few freed
    tiles may stay cached in the heap and count as resident.
    """
    n, d, workspace = 6000, 16, 16 * 2 ** 20
    env = dict(os.environ, TRITON_INTERPRET="0", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(d), str(workspace)],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    growth = stats["peak"] - stats["base"]
    dense = n * n * 4
    # a workspace of tiles plus allocator slack (the peak has measured 17-24 MiB here)
    assert growth < 2 * workspace, f"peak grew by {growth / 2 ** 20:.1f} MiB"
    assert growth < dense / 4
