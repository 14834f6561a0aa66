"""The torch backend's cached-kernel fast path against the plain log-domain reference steps."""
import pytest
import torch

from ot_losses import partial_ot, sinkhorn
from ot_losses.solvers import _torch_steps
from ot_losses.solvers._scaling import ScalingSteps


def _reference_loop(cost, eps, n_iters):
    """Balanced Sinkhorn with uniform marginals through ``_torch_steps`` only."""
    B, N, M = cost.shape
    log_a = torch.full((B, N), -torch.log(torch.tensor(float(N), dtype=cost.dtype)).item(), dtype=cost.dtype)
    log_b = torch.full((B, M), -torch.log(torch.tensor(float(M), dtype=cost.dtype)).item(), dtype=cost.dtype)
    f, g = torch.zeros(B, N, dtype=cost.dtype), torch.zeros(B, M, dtype=cost.dtype)
    for _ in range(n_iters):
        f = -_torch_steps.row_lse(cost, g + eps * log_b, eps)
        g = -_torch_steps.col_lse(cost, f + eps * log_a, eps)
    return f, g


@pytest.mark.parametrize("eps", [1.0, 0.05, 1e-3])
@pytest.mark.parametrize("shape", [(1, 40, 40), (2, 33, 70), (1, 1, 9), (1, 9, 1)],
                         ids=lambda s: "B{}-N{}-M{}".format(*s))
def test_scaled_iterates_match_log_domain_fp64(shape, eps):
    cost = torch.rand(*shape, dtype=torch.float64)
    res = sinkhorn(cost, eps=eps, n_iters=60, grad="none", backend="torch")
    f_ref, g_ref = _reference_loop(cost, eps, 60)
    scale = max(1.0, f_ref.abs().max().item())
    assert (res.f - f_ref).abs().max().item() <= 1e-8 * scale
    assert (res.g - g_ref).abs().max().item() <= 1e-8 * scale


@pytest.mark.parametrize("eps", [0.05, 1e-3])
def test_scaled_iterates_match_log_domain_fp32(eps):
    cost = torch.rand(1, 64, 48, dtype=torch.float64)
    res = sinkhorn(cost.float(), eps=eps, n_iters=50, grad="none", backend="torch")
    f_ref, _ = _reference_loop(cost, eps, 50)
    assert (res.f.double() - f_ref).abs().max().item() <= 1e-5 * max(1.0, f_ref.abs().max().item())


def test_reanchors_when_potentials_jump():
    """A query far from the anchors must fall back to the exact step and re-anchor."""
    cost = torch.rand(1, 20, 30, dtype=torch.float64) * 10
    steps = ScalingSteps(cost, torch.float64)
    h = torch.zeros(1, 30, dtype=torch.float64)
    first = steps.row_lse(cost, h, 0.01)
    assert torch.allclose(first, _torch_steps.row_lse(cost, h, 0.01), rtol=1e-12, atol=1e-12)
    far = torch.linspace(0, 5, 30, dtype=torch.float64).unsqueeze(0)  # 500 eps away from the anchor
    got = steps.row_lse(cost, far, 0.01)
    assert torch.allclose(got, _torch_steps.row_lse(cost, far, 0.01), rtol=1e-12, atol=1e-12)
    near = far + 1e-3
    got = steps.row_lse(cost, near, 0.01)
    assert torch.allclose(got, _torch_steps.row_lse(cost, near, 0.01), rtol=1e-10, atol=1e-12)


def test_zero_mass_and_forbidden_entries():
    cost = torch.rand(1, 6, 5, dtype=torch.float64)
    cost[0, 0, :] = float("inf")  # fully forbidden row, allowed because its mass is 0
    cost[0, 2, 3] = float("inf")
    a = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    res = sinkhorn(cost[0], a, eps=0.05, n_iters=500, tol=1e-10, backend="torch")
    assert res.plan[2, 3].item() == 0.0
    assert torch.isfinite(res.plan).all() and res.plan[0].abs().max().item() == 0.0
    assert bool(res.converged)


def test_partial_fast_path_matches_unrolled_reference():
    cost = torch.rand(12, 9, dtype=torch.float64)
    fast = partial_ot(cost, mass=0.4, eps=0.05, n_iters=300, grad="none", backend="torch")
    ref = partial_ot(cost, mass=0.4, eps=0.05, n_iters=300, grad="unroll", backend="torch")
    assert torch.allclose(fast.plan, ref.plan.detach(), rtol=1e-9, atol=1e-13)


def test_autocast_region_does_not_lower_precision():
    """A solver called inside a caller's autocast region still computes in the cost's precision."""
    cost = torch.rand(40, 60)
    ref = sinkhorn(cost, eps=0.05, n_iters=50, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn(cost, eps=0.05, n_iters=50, backend="torch")
        value = got.value
    assert got.f.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.allclose(got.f, ref.f, rtol=0, atol=1e-6)
    assert torch.allclose(value, ref.value, rtol=1e-6, atol=0)
    ref_p = partial_ot(cost, mass=0.3, eps=0.05, n_iters=50, method="dummy", backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_p = partial_ot(cost, mass=0.3, eps=0.05, n_iters=50, method="dummy", backend="torch")
        plan = got_p.plan
    assert plan.dtype == torch.float32
    assert torch.allclose(plan, ref_p.plan, rtol=1e-5, atol=1e-9)
