"""Triton feature half-steps (``kernels/feature_lse``) against their torch twins (``_feature_steps``).

Runs on CPU under TRITON_INTERPRET=1 (conftest.py): tiny ragged shapes, one
past a tile side (16 rows/columns under the interpreter) and D past one
``BLOCK_D`` slice, strided features, zero-mass potentials.
``@requires_cuda`` repeats the comparison at larger shapes on a GPU.
"""
import pytest
import torch

from conftest import requires_cuda
from ot_losses import FeatureCost, multi_assignment_sinkhorn, partial_ot, sinkhorn
from ot_losses.kernels import feature_lse as K
from ot_losses.solvers import _feature_steps as S

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy log(0), interpreter

F64, F32 = torch.float64, torch.float32
INF = float("inf")
KINDS = ["sqeuclidean", "dot", "cosine"]

STEPS = {   # call(module, cost, f, g, eps, shift)
    "row_lse": lambda m, c, f, g, eps, sh: m.row_lse(c, g, eps, shift=sh),
    "col_lse": lambda m, c, f, g, eps, sh: m.col_lse(c, f, eps, shift=sh),
    "row_sigmoid_lse": lambda m, c, f, g, eps, sh: m.row_sigmoid_lse(c, f, g, eps, shift=sh),
    "col_sigmoid_lse": lambda m, c, f, g, eps, sh: m.col_sigmoid_lse(c, f, g, eps, shift=sh),
    "plan_cost": lambda m, c, f, g, eps, sh: m.plan_cost(c, 0.1 * f, 0.1 * g, eps, shift=sh),
}

# (B, N, M, D, feature dtype, layout, rtol)
CASES = [
    pytest.param(1, 1, 1, 1, F32, "contig", 1e-5, id="B1-N1-M1-D1-fp32"),
    pytest.param(2, 17, 7, 3, F32, "T", 1e-5, id="B2-N17-M7-D3-fp32-T"),
    pytest.param(1, 5, 19, 70, F32, "contig", 1e-5, id="B1-N5-M19-D70-fp32"),
    pytest.param(2, 7, 17, 5, F64, "T", 1e-12, id="B2-N7-M17-D5-fp64-T"),
    pytest.param(1, 17, 9, 4, torch.bfloat16, "contig", 1e-5, id="B1-N17-M9-D4-bf16"),
]


def _features(B, N, M, D, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "T":   # (B, D, N) storage seen as (B, N, D): strided feature loads
        x = torch.randn(B, D, N, generator=gen, dtype=F64).transpose(1, 2)
        y = torch.randn(B, D, M, generator=gen, dtype=F64).transpose(1, 2)
    else:
        x = torch.randn(B, N, D, generator=gen, dtype=F64)
        y = torch.randn(B, M, D, generator=gen, dtype=F64)
    return x.to(dtype), y.to(dtype)


def _potentials(B, N, M, dtype):
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(B, N, generator=gen, dtype=F64)
    g = torch.randn(B, M, generator=gen, dtype=F64)
    if N > 2 and M > 2:
        f[0, 1] = g[-1, 2] = -INF      # zero mass
    return f.to(dtype), g.to(dtype)


def _rel(x, ref):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), fin) and torch.equal(x[~fin], ref[~fin])
    return ((x[fin] - ref[fin]).double().norm() / ref[fin].double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B, N, M, D, dtype, layout, rtol", CASES)
def test_steps_match_torch_twins(kind, B, N, M, D, dtype, layout, rtol):
    x, y = _features(B, N, M, D, dtype, layout)
    assert layout == "contig" or not x.is_contiguous() or 1 in x.shape
    cost = FeatureCost(x, y, kind=kind, scale=0.6)
    compute = F64 if dtype == F64 else F32
    f, g = _potentials(B, N, M, compute)
    # offsets as the solvers make them: per row and column (sqeuclidean), per row only (cosine), none
    row_min, _, col_min, _ = S.line_stats(cost)
    shift = {"sqeuclidean": (row_min, col_min - row_min.amin(-1, keepdim=True)),
             "cosine": (row_min, None), "dot": None}[kind]
    for name, call in STEPS.items():
        out, ref = call(K, cost, f, g, 0.3, shift), call(S, cost, f, g, 0.3, shift)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert o.dtype == r.dtype == compute and o.shape == r.shape, name
            tol = rtol
            if name == "plan_cost" and kind == "dot":   # signed costs cancel in <P, C>
                tol = rtol * 100
            assert _rel(o, r) <= tol, f"{name}: {_rel(o, r):.3e}"


def test_all_zero_mass_gives_minus_inf_not_nan():
    x, y = _features(1, 5, 17, 3, F32, "contig")
    cost = FeatureCost(x, y)
    out = K.row_lse(cost, torch.full((1, 17), -INF), 0.1, shift=(torch.ones(1, 5), torch.ones(1, 17)))
    assert torch.equal(out, torch.full((1, 5), -INF))


def test_launcher_errors():
    x, y = _features(2, 5, 7, 3, F32, "contig")
    cost = FeatureCost(x, y)
    with pytest.raises(ValueError, match="batched FeatureCost"):
        K.row_lse(torch.rand(2, 5, 7), torch.zeros(2, 7), 0.1)
    with pytest.raises(ValueError, match="batched FeatureCost"):
        K.row_lse(FeatureCost(x[0], y[0]), torch.zeros(1, 7), 0.1)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 7\)"):
        K.row_lse(cost, torch.zeros(2, 5), 0.1)
    with pytest.raises(ValueError, match="compute dtype"):
        K.col_lse(cost, torch.zeros(2, 5, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="device"):
        K.row_sigmoid_lse(cost, torch.zeros(2, 5, device="meta"), torch.zeros(2, 7), 0.1)
    with pytest.raises(ValueError, match=r"shift\[1\] must have shape \(2, 7\)"):
        K.plan_cost(cost, torch.zeros(2, 5), torch.zeros(2, 7), 0.1,
                    shift=(torch.zeros(2, 5), torch.zeros(2, 5)))


def test_solvers_on_triton_match_dense_torch():
    """A few iterations of each solver (the interpreter is slow) give the dense torch iterates."""
    x, y = _features(2, 7, 9, 3, F64, "contig")
    cost = FeatureCost(x, y, kind="sqeuclidean", scale=0.4)
    dense = cost.dense()
    res, ref = (sinkhorn(c, eps=0.5, n_iters=4, reach=(2.0, INF), backend=b)
                for c, b in ((cost, "triton"), (dense, "torch")))
    assert _rel(res.f, ref.f) <= 1e-12 and _rel(res.g, ref.g) <= 1e-12
    assert _rel(res.value, ref.value) <= 1e-12 and _rel(res.transport_cost, ref.transport_cost) <= 1e-12
    res, ref = (partial_ot(c, mass=0.5, eps=0.5, n_iters=3, method="dummy", backend=b)
                for c, b in ((cost, "triton"), (dense, "torch")))
    assert _rel(res.plan, ref.plan) <= 1e-12
    res, ref = (multi_assignment_sinkhorn(c, k=3, eps=0.5, n_iters=3, backend=b)
                for c, b in ((cost, "triton"), (dense, "torch")))
    assert _rel(res.assignment, ref.assignment) <= 1e-12


def test_envelope_gradient_through_triton_backend():
    x, y = _features(1, 6, 5, 3, F64, "contig")
    grads = []
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_(True)
        res = sinkhorn(FeatureCost(xr, y, kind="cosine"), eps=0.5, n_iters=3, backend=backend)
        grads.append(torch.autograd.grad(res.value.sum(), xr)[0])
    assert _rel(grads[0], grads[1]) <= 1e-12


# ----------------------------------------------------------------------------- CUDA, larger shapes
@requires_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B, N, M, D, dtype, rtol", [
    (1, 3000, 2049, 64, F32, 1e-4),
    (2, 1000, 777, 3, F32, 1e-4),
    (1, 513, 700, 257, F64, 1e-10),
    (1, 2048, 1000, 128, torch.bfloat16, 1e-4),
])
def test_steps_match_torch_twins_cuda(kind, B, N, M, D, dtype, rtol):
    x, y = (t.cuda() for t in _features(B, N, M, D, dtype, "contig"))
    cost = FeatureCost(x, y, kind=kind, scale=1.0 / D)
    compute = F64 if dtype == F64 else F32
    f, g = (t.cuda() for t in _potentials(B, N, M, compute))
    for name in ("row_lse", "col_lse", "row_sigmoid_lse", "col_sigmoid_lse"):
        out, ref = STEPS[name](K, cost, f, g, 0.1, None), STEPS[name](S, cost, f, g, 0.1, None)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert _rel(o, r) <= rtol, f"{name}: {_rel(o, r):.3e}"
