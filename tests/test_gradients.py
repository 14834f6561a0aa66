"""Gradients: ``grad="unroll"`` (gradcheck), ``"envelope"`` (d value / d cost = plan,
d value / d a = f along mass-preserving directions, finite differences) and ``"none"``."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn
from strategies import assert_close, marginal, random_cost

F64 = torch.float64


def _problem(n, m, seed, batch=()):
    rng = np.random.default_rng(seed)
    cost = torch.tensor(random_cost(rng, tuple(batch) + (n, m)))
    a = torch.tensor(marginal(rng, n, "random", batch=batch))
    b = torch.tensor(marginal(rng, m, "random", batch=batch))
    return cost, a, b


# ------------------------------------------------------------------ unroll

@pytest.mark.parametrize("reach", [None, 0.7, (0.5, 2.0)], ids=["balanced", "unbalanced", "two-reaches"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_unroll_gradcheck_cost(reach, batch):
    cost, a, b = _problem(3, 4, seed=1, batch=batch)
    cost.requires_grad_(True)

    def fn(c):
        res = sinkhorn(c, a, b, eps=0.3, n_iters=5, reach=reach, grad="unroll")
        return res.value, res.plan, res.f, res.g

    assert gradcheck(fn, (cost,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reach", [None, 0.7], ids=["balanced", "unbalanced"])
def test_unroll_gradcheck_marginals(reach):
    cost, _, _ = _problem(3, 4, seed=2)
    x = torch.randn(3, dtype=F64, requires_grad=True)
    y = torch.randn(4, dtype=F64, requires_grad=True)

    def fn(x, y):   # softmax keeps the masses equal (balanced problems demand it)
        res = sinkhorn(cost, torch.softmax(x, 0), torch.softmax(y, 0), eps=0.3, n_iters=5, reach=reach,
                       grad="unroll")
        return res.value, res.plan

    assert gradcheck(fn, (x, y), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", ["bregman", "dummy"])
def test_unroll_gradcheck_partial(method):
    cost, a, b = _problem(3, 4, seed=3)
    cost.requires_grad_(True)

    def fn(c):
        res = partial_ot(c, a, b, mass=0.6, eps=0.3, n_iters=5, method=method, dummy_cost=3.0, grad="unroll")
        return res.plan, res.transport_cost

    assert gradcheck(fn, (cost,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unroll_gradient_with_forbidden_entries_is_finite():
    cost, a, b = _problem(4, 4, seed=4)
    cost = cost.clone()
    cost[0, 1] = float("inf")
    cost.requires_grad_(True)
    res = sinkhorn(cost, a, b, eps=0.2, n_iters=10, grad="unroll")
    res.value.backward()
    assert torch.isfinite(cost.grad).all()
    assert cost.grad[0, 1] == 0


def test_unroll_converged_gradient_approaches_plan():
    cost, a, b = _problem(4, 5, seed=5)
    cost.requires_grad_(True)
    res = sinkhorn(cost, a, b, eps=0.5, n_iters=300, grad="unroll")
    (grad,) = torch.autograd.grad(res.value, cost)
    assert_close(grad, res.plan.detach(), 1e-6, "d value / d cost (unrolled, converged)")


# ---------------------------------------------------------------- envelope

@pytest.mark.parametrize("reach", [None, 0.7], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batched"])
def test_envelope_gradient_is_plan(reach, batch):
    cost, a, b = _problem(5, 6, seed=6, batch=batch)
    cost.requires_grad_(True)
    res = sinkhorn(cost, a, b, eps=0.1, n_iters=100000, tol=1e-12, reach=reach)
    assert res.value.requires_grad
    weights = torch.arange(1.0, 1.0 + res.value.numel(), dtype=F64).reshape(res.value.shape)
    (grad,) = torch.autograd.grad((res.value * weights).sum(), cost)
    expected = res.plan.detach() * weights.reshape(weights.shape + (1, 1))
    assert_close(grad, expected, 1e-10, "d value / d cost vs plan")


def _fd(fn, x, direction, h):
    return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("reach", [None, 0.7], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_envelope_gradient_matches_finite_differences_of_value(reach, eps):
    cost, a, b = _problem(5, 6, seed=7)
    direction = torch.tensor(np.random.default_rng(0).normal(size=(5, 6)))

    def value(c):
        return float(sinkhorn(c, a, b, eps=eps, n_iters=100000, tol=1e-13, reach=reach).value)

    fd = _fd(value, cost, direction, 1e-5)
    res = sinkhorn(cost, a, b, eps=eps, n_iters=100000, tol=1e-13, reach=reach)
    assert abs(fd - float((res.plan * direction).sum())) <= 1e-6 * (1 + abs(fd))


def test_envelope_gradient_wrt_marginals_is_potentials():
    cost, a, b = _problem(5, 6, seed=8)
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    res = sinkhorn(cost, a, b, eps=0.1, n_iters=100000, tol=1e-13)
    ga, gb = torch.autograd.grad(res.value, (a, b))
    # potentials are defined up to (f + c, g - c): compare along mass-preserving directions
    assert_close(ga - ga.mean(), res.f.detach() - res.f.detach().mean(), 1e-8, "d value / d a vs f")
    assert_close(gb - gb.mean(), res.g.detach() - res.g.detach().mean(), 1e-8, "d value / d b vs g")

    rng = np.random.default_rng(1)
    da = torch.tensor(rng.normal(size=5))
    da -= da.mean()                       # keeps sum a fixed
    db = torch.tensor(rng.normal(size=6))
    db -= db.mean()

    def value_a(x):
        return float(sinkhorn(cost, x, b.detach(), eps=0.1, n_iters=100000, tol=1e-13).value)

    def value_b(y):
        return float(sinkhorn(cost, a.detach(), y, eps=0.1, n_iters=100000, tol=1e-13).value)

    fd_a = _fd(value_a, a.detach(), da, 1e-5)
    fd_b = _fd(value_b, b.detach(), db, 1e-5)
    assert abs(fd_a - float((res.f.detach() * da).sum())) <= 1e-6 * (1 + abs(fd_a))
    assert abs(fd_b - float((res.g.detach() * db).sum())) <= 1e-6 * (1 + abs(fd_b))


def test_envelope_gradient_wrt_marginals_matches_finite_differences_unbalanced():
    """Whatever the closed form, autograd of ``value`` must be its derivative."""
    cost, a, b = _problem(4, 5, seed=9)
    a = a.clone().requires_grad_(True)
    res = sinkhorn(cost, a, b * 1.5, eps=0.2, n_iters=100000, tol=1e-13, reach=0.7)
    (ga,) = torch.autograd.grad(res.value, a)
    da = torch.tensor(np.random.default_rng(2).normal(size=4))

    def value_a(x):
        return float(sinkhorn(cost, x, b * 1.5, eps=0.2, n_iters=100000, tol=1e-13, reach=0.7).value)

    fd = _fd(value_a, a.detach(), da, 1e-6)
    assert abs(fd - float((ga * da).sum())) <= 1e-5 * (1 + abs(fd)), (fd, float((ga * da).sum()))


def test_envelope_low_precision_cost_gets_gradient_in_its_dtype():
    cost = torch.rand(4, 5, dtype=torch.float32).requires_grad_(True)
    res = sinkhorn(cost, eps=0.1, n_iters=500, tol=1e-6)
    res.value.backward()
    assert cost.grad.dtype == torch.float32 and cost.grad.shape == cost.shape
    assert_close(cost.grad, res.plan.detach(), 1e-5, "grad vs plan")


# -------------------------------------------------------------------- none

def test_grad_none_returns_detached_tensors():
    cost, a, b = _problem(4, 5, seed=10)
    cost.requires_grad_(True)
    a = a.clone().requires_grad_(True)
    for reach in (None, 0.5):
        res = sinkhorn(cost, a, b, eps=0.1, n_iters=10, reach=reach, grad="none")
        for name in ("f", "g", "plan", "log_plan", "value", "transport_cost"):
            assert not getattr(res, name).requires_grad, name
    for method in ("bregman", "dummy"):
        res = partial_ot(cost, a, b, mass=0.5, eps=0.1, n_iters=10, method=method, grad="none")
        for name in ("plan", "log_plan", "transport_cost", "mass"):
            assert not getattr(res, name).requires_grad, (method, name)
    res = multi_assignment_sinkhorn(cost, 2, eps=0.1, n_iters=10)     # default grad="none"
    assert not res.assignment.requires_grad and not res.f.requires_grad


def test_unroll_and_envelope_do_carry_gradient():
    cost, a, b = _problem(4, 5, seed=11)
    cost.requires_grad_(True)
    assert sinkhorn(cost, a, b, n_iters=5, grad="unroll").plan.requires_grad
    assert sinkhorn(cost, a, b, n_iters=5, grad="envelope").value.requires_grad
    assert partial_ot(cost, a, b, mass=0.5, n_iters=5, grad="unroll").plan.requires_grad
