"""Regression tests: results are honest under adversarial input (one test per failure class).

Each test starts from a reproducer that once returned a wrong plan reported as
converged, a NaN, or a misleading error; the assertions measure the claimed
property on the returned result.
"""
import math

import pytest
import torch

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn

INF = math.inf
F64 = torch.float64
BACKENDS = ["torch", "triton"]


def _marginal_l1(plan, a, b):
    p = plan.double()
    return float((p.sum(-1) - a.double()).abs().sum() + (p.sum(-2) - b.double()).abs().sum())


# ------------------------------------------------------------------ class 1: offsets
@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_constant_offset_fp32_plan_and_error_are_true(offset):
    torch.manual_seed(0)
    base = torch.rand(50, 60)
    res = sinkhorn(base + offset, eps=0.01, n_iters=2000, tol=1e-6, backend="torch")
    uni_a, uni_b = torch.full((50,), 1 / 50), torch.full((60,), 1 / 60)
    measured = _marginal_l1(res.plan, uni_a, uni_b)
    assert bool(res.converged)
    assert measured <= 1e-6 + 1e-5, measured  # tol plus fp32 rounding of the returned plan
    assert abs(float(res.marginal_error) - measured) <= 1e-5
    # the plan is that of the rounded cost, whatever its offset
    ref = sinkhorn((base + offset).double() - offset, eps=0.01, n_iters=2000, tol=1e-9)
    assert (res.plan.double() - ref.plan).abs().sum() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_and_column_offsets_leave_the_plan_unchanged_fp32(backend):
    torch.manual_seed(1)
    base = torch.rand(12, 9)
    rows = torch.linspace(0, 1e5, 12)[:, None]
    cols = torch.linspace(-3e4, 2e4, 9)[None, :]
    ref = sinkhorn(base.double(), eps=0.02, n_iters=500, tol=1e-9, backend=backend)
    got = sinkhorn(base + rows + cols, eps=0.02, n_iters=500, tol=1e-6, backend=backend)
    assert bool(got.converged)
    # fp32 rounds base + offsets to ~ulp(1e5) = 0.008: compare with the solve on the rounded differences
    rounded = ((base + rows + cols).double() - rows.double() - cols.double())
    ref = sinkhorn(rounded, eps=0.02, n_iters=500, tol=1e-9)
    assert (got.plan.double() - ref.plan).abs().sum() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_constant_cost_moves_the_mass(backend):
    res = partial_ot(torch.full((15, 23), 1e6), mass=0.77, eps=4e-4, n_iters=2, backend=backend)
    assert abs(float(res.mass) - 0.77) <= 1e-5


# ------------------------------------------------------------------ class 2: NaN plans
@pytest.mark.parametrize("backend", BACKENDS)
def test_unbalanced_unreachable_column_gives_finite_plan(backend):
    cost = torch.tensor([[0, INF], [0, 0]], dtype=F64)
    a, b = torch.tensor([1.0, 0], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    res = sinkhorn(cost, a, b, eps=0.1, reach=1.0, n_iters=300, tol=1e-9, backend=backend)
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.value)
    assert res.plan[0, 1] == 0 and (res.plan[1] == 0).all()
    assert bool(res.converged)
    # one live entry x: eps log(x / .5) + rho log x + rho log(x / .5) = 0 at the optimum
    x = math.exp((0.1 + 1.0) * math.log(0.5) / (0.1 + 2.0))
    assert abs(float(res.plan[0, 0]) - x) <= 1e-8


# ------------------------------------------------------------------ class 3: zero-mass lines
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mass_rows_small_eps_value_is_finite(backend):
    torch.manual_seed(0)
    cost = torch.rand(5, 6)
    a = torch.tensor([1.0, 0, 0, 0, 0])
    fast = sinkhorn(cost, a, eps=1e-3, n_iters=20, backend=backend)
    ref = sinkhorn(cost, a, eps=1e-3, n_iters=20, grad="unroll", backend="torch")
    assert torch.isfinite(fast.value)
    assert abs(float(fast.value) - float(ref.value)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["balanced", "unbalanced", "dummy"])
def test_zero_mass_all_forbidden_row_value_and_gradient(kind, dtype):
    torch.manual_seed(2)
    cost = torch.rand(5, 6, dtype=dtype)
    cost[2] = INF
    a = torch.tensor([0.25, 0.25, 0, 0.25, 0.25], dtype=dtype, requires_grad=True)
    if kind == "dummy":
        res = partial_ot(cost, a, mass=0.5, eps=0.05, method="dummy", n_iters=300)
    else:
        res = sinkhorn(cost, a, eps=0.05, n_iters=300, reach=1.0 if kind == "unbalanced" else None)
    assert torch.isfinite(res.value) and torch.isfinite(res.plan).all() and (res.plan[2] == 0).all()
    res.value.backward()
    if a.grad is not None:
        assert not torch.isnan(a.grad).any()
        # a line that can reach nothing has an infinite price in a balanced problem, a finite one otherwise
        assert torch.isfinite(a.grad[[0, 1, 3, 4]]).all()


# ------------------------------------------------------------------ class 4: dummy partial mass
@pytest.mark.parametrize("backend", BACKENDS)
def test_dummy_partial_moves_the_mass_whatever_the_cost_offset(backend):
    torch.manual_seed(0)
    sim = torch.rand(32, 32)
    for cost in (1 - sim, 0.1 * (1 - sim), 0.5 - sim, -sim):
        res = partial_ot(cost, mass=0.1, eps=0.07, tol=1e-7, n_iters=5000, method="dummy", backend=backend)
        assert bool(res.converged)
        assert abs(float(res.mass) - 0.1) <= 1e-5
    res = partial_ot(torch.rand(24, 22, dtype=F64) * 0.002, mass=0.3, eps=0.002, method="dummy", tol=1e-10,
                     n_iters=5000, backend=backend)
    assert bool(res.converged) and abs(float(res.mass) - 0.3) <= 1e-9


# ------------------------------------------------------------------ class 5: multi-assignment error
def test_multi_assignment_reports_the_column_error():
    cost = torch.tensor([[-3000.0, 3000], [-2000, 1000], [2000, -1000], [3000, -3000], [100, -100]],
                        dtype=F64)
    res = multi_assignment_sinkhorn(cost, 1, eps=1.0, n_iters=100)
    x = res.assignment
    measured = float((x.sum(1) - 1).abs().sum() + (x.sum(0) - 2.5).abs().sum())
    assert abs(float(res.marginal_error) - measured) <= 1e-9
    assert bool(res.converged) == (measured <= 1e-3 * 5)


# ------------------------------------------------------------------ class 6: fast path iterates
@pytest.mark.parametrize("n_iters", [1, 2, 3])
def test_fast_path_matches_log_domain_with_subnormal_kernel(n_iters):
    cost = torch.tensor([[0.0, 0.03, 1.02], [0.02, 0.0, 1.03]])
    fast = sinkhorn(cost, eps=0.01, n_iters=n_iters, grad="none", backend="torch")
    ref = sinkhorn(cost, eps=0.01, n_iters=n_iters, grad="unroll", backend="torch")
    assert torch.allclose(fast.plan.sum(0), torch.full((3,), 1 / 3), atol=1e-6)
    assert (fast.plan - ref.plan.detach()).abs().max() <= 1e-6


def test_swav_short_solves_match_log_domain_iterates():
    torch.manual_seed(3)
    scores = torch.randn(64, 300, dtype=F64)
    ref = sinkhorn(-scores.T, eps=0.05, n_iters=3, grad="unroll", backend="torch").plan.detach()
    fast = sinkhorn(-scores.T, eps=0.05, n_iters=3, grad="none", backend="torch").plan
    assert (fast - ref).abs().max() / ref.max() <= 1e-10
    # fp32: as close as fp32 allows (scores span ~8, eps 0.05: exponents carry ~8/0.05 ulps)
    fast32 = sinkhorn(-scores.T.float(), eps=0.05, n_iters=3, grad="none", backend="torch").plan
    assert (fast32.double() - ref).abs().max() / ref.max() <= 2e-5


# ------------------------------------------------------------------ class 7: infeasible supports
def test_infeasible_supports_raise_value_error_naming_the_line():
    cost = torch.tensor([[0, INF], [0, 0]], dtype=F64)
    a, b = torch.tensor([1.0, 0], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="column 1"):
        sinkhorn(cost, a, b, eps=0.1)
    with pytest.raises(ValueError, match="mass"):
        partial_ot(cost, a, b, mass=1.0, method="dummy")
    cm = torch.zeros(3, 4)
    cm[0, 0] = INF
    with pytest.raises(ValueError, match="row 0|column 0"):
        multi_assignment_sinkhorn(cm, 1, b=torch.tensor([1.0, 0, 0, 0]))
    cm = torch.zeros(3, 4)
    cm[1, :3] = INF
    with pytest.raises(ValueError, match="row 1"):
        multi_assignment_sinkhorn(cm, 2)


# ------------------------------------------------------------------ class 8: gradients
def test_multi_assignment_unroll_gradient_with_empty_and_full_columns():
    cost = torch.rand(4, 3, dtype=F64, requires_grad=True)
    for b in ([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]):  # k N b_j = 0 and = N
        res = multi_assignment_sinkhorn(cost, 2 if b[2] else 1, b=torch.tensor(b, dtype=F64), grad="unroll",
                                        n_iters=20)
        (grad,) = torch.autograd.grad((res.assignment * torch.rand(4, 3, dtype=F64)).sum(), cost)
        assert torch.isfinite(grad).all()


def test_dummy_value_gradient_includes_the_dummy_cost_term():
    torch.manual_seed(4)
    cost = torch.rand(6, 5, dtype=F64, requires_grad=True)

    def value(c):
        return partial_ot(c, mass=0.5, eps=0.05, method="dummy", n_iters=3000, tol=1e-12).value

    (grad,) = torch.autograd.grad(value(cost), cost)
    i = int(cost.argmax())
    step = torch.zeros(30, dtype=F64)
    step[i] = 1e-6
    step = step.view(6, 5)
    fd = (value(cost.detach() + step) - value(cost.detach() - step)) / 2e-6
    assert abs(float(grad.flatten()[i]) - float(fd)) <= 1e-5 * abs(float(fd))


def test_envelope_double_backward_raises():
    cost = torch.rand(4, 5, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(sinkhorn(cost, eps=0.1).value, cost, create_graph=True)
    with pytest.raises(RuntimeError, match="grad='unroll'"):
        torch.autograd.grad(grad.sum(), cost)


def test_unroll_double_backward_is_exact():
    cost = torch.rand(3, 3, dtype=F64, requires_grad=True)

    def value(c):
        return sinkhorn(c, eps=0.5, n_iters=5, grad="unroll").value

    assert torch.autograd.gradgradcheck(value, (cost,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ class 9: result fields
def test_bregman_f_has_the_mass_multiplier_folded_in():
    cost = torch.rand(5, 6, dtype=F64) + 3.0
    res = partial_ot(cost, mass=0.5, eps=0.05, n_iters=2000, tol=1e-12)
    plan = torch.exp((res.f[:, None] + res.g[None, :] - cost) / 0.05)
    assert torch.allclose(plan, res.plan, rtol=1e-9, atol=1e-15)
    assert abs(float(plan.sum()) - 0.5) <= 1e-9


def test_warm_start_from_result_with_infinite_potentials():
    cost = torch.rand(5, 6, dtype=F64)
    cost[1] = INF
    a = torch.tensor([0.25, 0, 0.25, 0.25, 0.25], dtype=F64)
    res = sinkhorn(cost, a, eps=0.05, n_iters=500, tol=1e-10)
    assert math.isinf(float(res.f[1]))
    again = sinkhorn(cost, a, eps=0.05, n_iters=20, tol=1e-10, init=(res.f, res.g))
    assert bool(again.converged) and again.n_iters <= 10
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(cost, a, eps=0.05, init=(torch.full((5,), math.nan, dtype=F64), res.g))


def test_tensor_mass_on_another_device_is_rejected():
    cost = torch.rand(4, 4)
    mass = torch.tensor(0.5, device="meta")
    with pytest.raises(ValueError, match="mass must be on the same device"):
        partial_ot(cost, mass=mass)


def test_solver_scalars_accept_0d_tensors_and_numpy():
    np = pytest.importorskip("numpy")
    cost = torch.rand(4, 5, dtype=F64)
    ref = sinkhorn(cost, eps=0.05, tol=1e-9, n_iters=500)
    for eps in (torch.tensor(0.05), np.float32(0.05), np.float64(0.05)):
        got = sinkhorn(cost, eps=eps, tol=torch.tensor(1e-9), n_iters=500)
        assert torch.allclose(got.plan, ref.plan, rtol=1e-5)
    assert float(partial_ot(cost, mass=0.5, eps=torch.tensor(0.1), method="dummy",
                            dummy_cost=torch.tensor(2.0)).mass) == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(TypeError, match="eps"):
        sinkhorn(cost, eps=torch.tensor([0.05, 0.1]))


def test_batch_solves_as_its_problems_alone_when_only_some_need_offsets():
    cost = torch.tensor([[[5e-4, 9.5e-4]], [[1.4e-4, 9.5e-4]]], dtype=F64)
    cost = torch.cat([cost, cost + 1e6])  # the last two problems take offsets, the first two do not
    for n_iters in (1, 7):
        batch = partial_ot(cost, mass=1e-6, eps=1e-7, method="dummy", n_iters=n_iters)
        for i in range(4):
            single = partial_ot(cost[i], mass=1e-6, eps=1e-7, method="dummy", n_iters=n_iters)
            assert torch.equal(batch.plan[i], single.plan)
            assert float(batch.marginal_error[i]) == float(single.marginal_error)


@pytest.mark.parametrize("kind", ["sinkhorn", "unbalanced", "bregman", "dummy", "multi", "features"])
def test_results_compare_by_identity_and_pickle(kind):
    import pickle

    from ot_losses import FeatureCost

    cost = torch.rand(5, 6, dtype=F64, requires_grad=True)
    res = {"sinkhorn": lambda: sinkhorn(cost, eps=0.1, tol=1e-9, n_iters=500),
           "unbalanced": lambda: sinkhorn(cost, eps=0.1, reach=1.0, n_iters=50),
           "bregman": lambda: partial_ot(cost, mass=0.5, eps=0.1),
           "dummy": lambda: partial_ot(cost, mass=0.5, eps=0.1, method="dummy"),
           "multi": lambda: multi_assignment_sinkhorn(cost.detach(), 2, eps=0.1),
           "features": lambda: sinkhorn(FeatureCost(torch.rand(5, 3, dtype=F64), torch.rand(6, 3, dtype=F64)),
                                        eps=0.1, n_iters=50)}[kind]()
    assert res == res and res != pickle.loads(pickle.dumps(res))
    back = pickle.loads(pickle.dumps(res))
    if kind == "multi":
        assert torch.equal(back.assignment, res.assignment)
        return
    assert torch.allclose(back.plan, res.plan.detach(), rtol=1e-12, atol=1e-300)
    assert torch.allclose(back.value, res.value.detach(), rtol=1e-12)
    assert torch.allclose(back.transport_cost, res.transport_cost.detach(), rtol=1e-12)
    assert not back.value.requires_grad


def test_torch_func_grad_of_envelope_value_is_the_plan_and_vmap_is_refused():
    cost = torch.rand(4, 5, dtype=F64)
    grad = torch.func.grad(lambda c: sinkhorn(c, eps=0.1, n_iters=500, tol=1e-10).value)(cost)
    assert torch.allclose(grad, sinkhorn(cost, eps=0.1, n_iters=500, tol=1e-10).plan, rtol=1e-10)
    with pytest.raises(ValueError, match="stacked"):
        torch.func.vmap(lambda c: sinkhorn(c, eps=0.1, n_iters=5).value)(torch.rand(3, 4, 5))


@pytest.mark.parametrize("grad", ["envelope", "unroll"])
def test_row_offset_with_forbidden_entries_keeps_the_first_iterate(grad):
    torch.manual_seed(0)
    cost = torch.rand(2, 6) * 1e-3
    cost[0, 5] = INF
    cost[1, 0] = INF  # column 0's only allowed entry lies in the shifted row
    offset = torch.tensor([1e6, 0.0])[:, None]
    exact = ((cost + offset).double() - offset).double()  # the differences fp32 kept
    ref = sinkhorn(exact, eps=0.01, n_iters=1).plan
    got = sinkhorn(cost + offset, eps=0.01, n_iters=1, grad=grad).plan
    assert float((got.detach().double() - ref).abs().sum()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbalanced_mass_beyond_the_dtype_raises(backend):
    cost = torch.tensor([[-1.0]], dtype=F64)
    with pytest.raises(ValueError, match="exceeds the largest"):
        sinkhorn(cost, eps=1e-7, reach=1e-6, n_iters=1, backend=backend)


def test_column_shift_on_a_zero_mass_column_does_not_move_the_plan():
    # A far-off entry in a column that receives nothing must not set the row offsets.
    torch.manual_seed(0)
    cost = torch.rand(4, 3, dtype=F64) * 1e-3
    b = torch.tensor([0.0, 0.25, 0.75], dtype=F64)
    shift = torch.tensor([-1000.0, 0, 0], dtype=F64)[None, :]
    shifted = cost + shift
    exact = shifted - shift
    p1 = sinkhorn(shifted, None, b, eps=1e-4, n_iters=2000, tol=1e-13).plan
    p2 = sinkhorn(exact, None, b, eps=1e-4, n_iters=2000, tol=1e-13).plan
    assert float((p1 - p2).abs().sum()) <= 1e-12


def test_dummy_masses_do_not_depend_on_the_marginals_layout():
    # mass = min(sum a, sum b): the dummy row's mass is a difference of nearly equal float32 sums.
    torch.manual_seed(0)
    cost = torch.rand(1, 12) * 1e-3
    a, b = torch.tensor([1e-3]), torch.full((12,), 1e-3 / 12)
    strided = torch.zeros(24)
    strided[::2] = b
    mass = float(torch.minimum(a.double().sum(), b.double().sum()))
    plans = [partial_ot(cost, a, w, mass=mass, eps=1e-7, method="dummy", n_iters=1).plan
             for w in (b, strided[::2])]
    assert torch.equal(plans[0], plans[1])


def test_float16_cost_gradient_beyond_its_range_raises():
    # An unconverged unbalanced plan may hold entries above 65504: the float16 gradient would be inf.
    cost = (torch.rand(4, 5) - 30).half().requires_grad_()
    a, b = torch.full((4,), 1e3), torch.full((5,), 1e3)
    res = sinkhorn(cost, a, b, eps=1.0, reach=1.0, n_iters=3)
    assert bool(torch.isfinite(res.plan).all())
    with pytest.raises(ValueError, match="float16"):
        res.value.backward()


def test_unbalanced_potentials_beyond_precision_raise():
    """Fuzz finding: a cost of 1e6 at eps 3e-4 in fp32, semi-unbalanced; the potentials keep the offset
    and the plan's exponents were rounding noise (exp(208) from a 0.06 ulp): value NaN, converged False."""
    cost = torch.full((1, 1), 1e6)
    with pytest.raises(ValueError, match="precision of torch.float32"):
        sinkhorn(cost, eps=3e-4, n_iters=1, reach=(1e-4, math.inf))
    res = sinkhorn(cost.double(), eps=3e-4, n_iters=1, reach=(1e-4, math.inf))
    assert torch.isfinite(res.value) and torch.isfinite(res.transport_cost)
    assert torch.allclose(res.plan, torch.ones(1, 1, dtype=torch.float64))
    # an ordinary unbalanced fp32 problem is far from the limit
    sinkhorn(torch.rand(20, 30), eps=1e-3, n_iters=50, reach=0.1)


def test_zero_mass_column_far_below_shifted_columns_fp32():
    """Fuzz finding: a zero-mass column at -1e6 (no offset: it carries no mass) beside columns shifted by
    +-1; its kernel line, rebuilt from anchors near 1e6, overflowed in fp32 and `.plan` was NaN there
    while `converged` was True. The line is now a normalised exponential: plan 0, finite."""
    base = torch.tensor([[1.0, 0.44, 0.3], [0.3, 0.55, 0.2], [0.2, 0.36, 0.5]]) * 1e-3
    cost = base + torch.tensor([1.0, -1.0, -1e6])
    a, b = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.72, 0.28, 0.0])
    res = sinkhorn(cost, a, b, eps=5e-5, n_iters=1500, tol=1e-5)
    ref = sinkhorn(base.double(), a.double(), b.double(), eps=5e-5, n_iters=1500, tol=1e-12)
    assert bool(res.converged) and torch.isfinite(res.plan).all()
    assert (res.plan[:, 2] == 0).all()
    assert torch.allclose(res.plan.double(), ref.plan, atol=1e-5)
