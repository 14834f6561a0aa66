"""Every solver through the Triton backend (interpreter on CPU) against the torch backend."""
import pytest
import torch

from conftest import requires_cuda
from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn
from ot_losses.kernels import lse_steps

pytest.importorskip("triton")

# (B, N, M): the first two take the fused one-launch path, the last the streaming kernels.
SHAPES = [(1, 7, 33), (3, 1, 5), (1, 65, 130)]
IDS = ["B{}-N{}-M{}".format(*s) for s in SHAPES]


def _rel(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


def test_shapes_cover_fused_and_streaming_paths():
    fits = [lse_steps.balanced_small_supported(n, m, torch.float32) for _, n, m in SHAPES]
    assert fits == [True, True, False]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_sinkhorn_triton_matches_torch(shape, dtype, tol):
    cost = torch.rand(*shape, dtype=dtype)
    cost[..., 0, -1] = float("inf")
    if shape[1] == 1:
        cost[..., 0, -1] = 0.5  # a single row must keep every column reachable
    kw = dict(eps=0.05, n_iters=40, tol=1e-7)
    ref = sinkhorn(cost, backend="torch", **kw)
    got = sinkhorn(cost, backend="triton", **kw)
    assert got.n_iters == ref.n_iters
    assert _rel(got.plan, ref.plan) < tol
    assert torch.equal(got.converged, ref.converged)
    assert torch.equal(got.plan == 0, ref.plan == 0)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_unbalanced_and_partial_triton_match_torch(shape):
    cost = torch.rand(*shape, dtype=torch.float64)
    for kw in (dict(reach=0.5), dict(reach=(1.0, 0.2))):
        ref = sinkhorn(cost, eps=0.1, n_iters=12, backend="torch", **kw)
        got = sinkhorn(cost, eps=0.1, n_iters=12, backend="triton", **kw)
        assert _rel(got.plan, ref.plan) < 1e-10
    for method in ("bregman", "dummy"):
        ref = partial_ot(cost, mass=0.3, eps=0.1, n_iters=12, method=method, backend="torch")
        got = partial_ot(cost, mass=0.3, eps=0.1, n_iters=12, method=method, backend="triton")
        assert _rel(got.plan, ref.plan) < 1e-10
        assert torch.allclose(got.mass, ref.mass, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=IDS[:1] + IDS[2:])
def test_multi_assignment_triton_matches_torch(shape):
    cost = -0.75 * torch.rand(*shape, dtype=torch.float64)
    ref = multi_assignment_sinkhorn(cost, k=3, eps=0.07, n_iters=12, backend="torch")
    got = multi_assignment_sinkhorn(cost, k=3, eps=0.07, n_iters=12, backend="triton")
    assert _rel(got.assignment, ref.assignment) < 1e-10


def test_bf16_cost_triton_matches_torch():
    cost = torch.rand(2, 33, 20).bfloat16()
    ref = sinkhorn(cost, eps=0.05, n_iters=30, backend="torch")
    got = sinkhorn(cost, eps=0.05, n_iters=30, backend="triton")
    assert got.f.dtype == torch.float32
    assert _rel(got.plan, ref.plan) < 1e-5


@pytest.mark.parametrize("shape", [(1, 9, 12), (1, 65, 130)], ids=["fused", "streaming"])
def test_envelope_gradient_through_triton_equals_reference(shape):
    base = torch.rand(*shape, dtype=torch.float64)
    grads = {}
    for backend in ("torch", "triton"):
        cost = base.clone().requires_grad_()
        res = sinkhorn(cost, eps=0.1, n_iters=20, backend=backend)
        (res.value * torch.arange(1.0, shape[0] + 1, dtype=torch.float64)).sum().backward()
        grads[backend] = cost.grad
    assert _rel(grads["triton"], grads["torch"]) < 1e-10


def test_triton_unroll_is_an_error():
    with pytest.raises(ValueError, match="unroll"):
        sinkhorn(torch.rand(4, 5), grad="unroll", backend="triton")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sinkhorn(torch.rand(4, 5), backend="triton")


def test_auto_uses_torch_on_cpu_tensors():
    from ot_losses._backend import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
@requires_cuda
@pytest.mark.parametrize("shape", [(1, 1000, 1500), (4, 256, 256), (1, 3000, 256)],
                         ids=["N1000-M1500", "B4-N256", "swav-3000x256"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-4), (torch.float64, 1e-10)],
                         ids=["fp32", "bf16", "fp64"])
def test_cuda_auto_uses_triton_and_matches_torch(shape, dtype, tol):
    cost = torch.rand(*shape, device="cuda").to(dtype)
    ref = sinkhorn(cost, eps=0.05, n_iters=50, backend="torch")
    got = sinkhorn(cost, eps=0.05, n_iters=50, backend="auto")
    assert got.f.device.type == "cuda"
    assert _rel(got.plan, ref.plan) < tol


@requires_cuda
def test_cuda_partial_multi_and_gradient_match_torch():
    cost = torch.rand(2, 300, 200, device="cuda", dtype=torch.float64)
    for method in ("bregman", "dummy"):
        ref = partial_ot(cost, mass=0.3, eps=0.05, n_iters=100, method=method, backend="torch")
        got = partial_ot(cost, mass=0.3, eps=0.05, n_iters=100, method=method, backend="triton")
        assert _rel(got.plan, ref.plan) < 1e-10
    ref = multi_assignment_sinkhorn(-cost, k=20, eps=0.07, n_iters=50, backend="torch")
    got = multi_assignment_sinkhorn(-cost, k=20, eps=0.07, n_iters=50, backend="triton")
    assert _rel(got.assignment, ref.assignment) < 1e-10
    grads = []
    for backend in ("torch", "triton"):
        c = cost.clone().requires_grad_()
        sinkhorn(c, eps=0.05, n_iters=50, backend=backend).value.sum().backward()
        grads.append(c.grad)
    assert _rel(grads[1], grads[0]) < 1e-10
