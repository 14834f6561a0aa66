"""Tests of ``ot_losses.partial_ot`` (methods ``"bregman"`` and ``"dummy"``).

``"bregman"`` is compared with POT's ``entropic_partial_wasserstein`` in
float64 (POT cannot take ``+inf``: forbidden entries become ``max C + 40 eps``
there). ``"dummy"`` is compared with a balanced ``sinkhorn`` on the padded
problem built here from docs/methods.md's description.
"""
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ot_losses import PartialOTResult, partial_ot, sinkhorn
from strategies import (assert_close, forbidden_masks, marginal, ot_problems, permutation_problems,
                        random_cost)

F64 = torch.float64
RTOL_POT = 1e-6
MEASURED = {}

SHAPES = [(1, 5), (6, 1), (5, 5), (7, 4), (12, 9), (17, 29)]
EPS = [1e-2, 1e-1, 1.0]
MASS_FRACTIONS = [0.3, 0.8, 1.0]   # of min(sum a, sum b)


def _problem(n, m, kind, seed, mass_b=1.3):
    rng = np.random.default_rng(seed)
    return random_cost(rng, (n, m)), marginal(rng, n, kind), marginal(rng, m, kind, total=mass_b)


def _pot_partial(a, b, cost, eps, mass, n_iter=20000):
    """POT's plan; asserts POT converged (change of the plan between checks < 1e-12)."""
    # exp(-C/eps) is representable in fp64 down to eps ~ 1/700 on costs in [0, 1]; below, POT's log
    # solver. POT's exp-domain solver also stalls on N = 1 or M = 1 (it stops after 10 iterations with
    # caps violated, e.g. a 6x1 problem with a row sum 0.3 > a_i = 0.22), its log solver does not.
    method = "sinkhorn" if eps >= 0.005 and min(cost.shape) > 1 else "sinkhorn_log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, log = ot.partial.entropic_partial_wasserstein(a, b, cost, eps, m=mass, method=method,
                                                         numItermax=n_iter, stopThr=1e-14, log=True)
    assert np.isfinite(P).all() and log["err"][-1] < 1e-12, "POT did not converge on this problem"
    return P


def _record(key, err):
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(err))


def _caps_ok(plan, a, b, rtol=1e-7):
    rows, cols = plan.sum(-1), plan.sum(-2)
    return bool((rows <= a * (1 + rtol) + 1e-15).all()) and bool((cols <= b * (1 + rtol) + 1e-15).all())


# --------------------------------------------------------------------- POT

@pytest.mark.parametrize("frac", MASS_FRACTIONS, ids=lambda f: f"mass{f}")
@pytest.mark.parametrize("eps", EPS, ids=lambda e: f"eps{e:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-M{s[1]}")
def test_bregman_matches_pot(shape, eps, frac):
    n, m = shape
    kind = "random" if (n + m) % 2 else "uniform"
    cost_np, a_np, b_np = _problem(n, m, kind, seed=n * 100 + m)
    mass = frac * min(a_np.sum(), b_np.sum())
    P_ref = _pot_partial(a_np, b_np, cost_np, eps, mass)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = partial_ot(cost, a, b, mass=mass, eps=eps, n_iters=100000, tol=1e-12)
    assert isinstance(res, PartialOTResult)
    assert bool(res.converged)
    err = assert_close(res.plan, P_ref, RTOL_POT, "plan")
    _record("partial (bregman) plan", err)
    assert abs(float(res.mass) - mass) <= 1e-8 * mass
    lin = float((P_ref * cost_np).sum())
    assert abs(float(res.transport_cost) - lin) <= 1e-6 * lin
    assert _caps_ok(res.plan, a, b)


@pytest.mark.parametrize("n,m,frac", [(5, 5, 0.3), (12, 9, 0.3), (12, 9, 0.8), (6, 1, 0.8)])
def test_bregman_matches_pot_eps_1e3(n, m, frac):
    eps = 1e-3      # problems on which POT's log-domain solver converges within 2000 iterations
    kind = "random" if (n + m) % 2 else "uniform"
    cost_np, a_np, b_np = _problem(n, m, kind, seed=n * 100 + m)
    mass = frac * min(a_np.sum(), b_np.sum())
    P_ref = _pot_partial(a_np, b_np, cost_np, eps, mass, n_iter=2000)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = partial_ot(cost, a, b, mass=mass, eps=eps, n_iters=100000, tol=1e-13)
    assert bool(res.converged)
    _record("partial (bregman) plan", assert_close(res.plan, P_ref, RTOL_POT, "plan"))


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_bregman_with_forbidden_entries_matches_pot(eps):
    n = 8
    cost_np, a_np, b_np = _problem(n, n, "uniform", seed=42, mass_b=1.0)
    cost_np[np.arange(n), np.arange(n)] = np.inf      # L2RM's forbidden diagonal
    finite_max = cost_np[np.isfinite(cost_np)].max()
    pot_cost = np.where(np.isfinite(cost_np), cost_np, finite_max + 40 * eps)
    P_ref = _pot_partial(a_np, b_np, pot_cost, eps, 0.4)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = partial_ot(cost, a, b, mass=0.4, eps=eps, n_iters=100000, tol=1e-12)
    assert bool(res.converged)
    assert (res.plan.diagonal() == 0).all() and (res.log_plan.diagonal() == float("-inf")).all()
    _record("partial (bregman) plan, +inf diagonal", assert_close(res.plan, P_ref, RTOL_POT, "plan"))
    assert torch.isfinite(res.transport_cost)


def test_bregman_does_not_nan_on_huge_costs():
    rng = np.random.default_rng(0)
    cost = torch.tensor(random_cost(rng, (6, 7), scale=1e4))
    res = partial_ot(cost, mass=0.5, eps=1e-2, n_iters=500)
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    assert torch.isfinite(res.transport_cost) and torch.isfinite(res.mass)


# ------------------------------------------------------------- dummy method

def _padded_solve(cost, a, b, mass, eps, dummy_cost=None):
    """Balanced sinkhorn on the explicit (N+1, M+1) dummy problem, dummy-dummy corner forbidden."""
    finite = cost[torch.isfinite(cost)]
    cmax = finite.max()
    xi = 100 * cmax if dummy_cost is None else torch.tensor(dummy_cost, dtype=cost.dtype)
    n, m = cost.shape
    ext = torch.empty(n + 1, m + 1, dtype=cost.dtype)
    ext[:n, :m] = cost
    ext[n, :m] = xi
    ext[:n, m] = xi
    ext[n, m] = float("inf")
    a_ext = torch.cat([a, (b.sum() - mass).reshape(1)])
    b_ext = torch.cat([b, (a.sum() - mass).reshape(1)])
    return sinkhorn(ext, a_ext, b_ext, eps=eps, n_iters=100000, tol=1e-12)


@pytest.mark.parametrize("dummy_cost", [None, 5.0])
@pytest.mark.parametrize("n,m,mass,eps", [(6, 6, 0.3, 0.05), (5, 9, 0.7, 0.1), (12, 4, 0.2, 0.5),
                                          (1, 4, 0.5, 0.1), (10, 10, 0.1, 0.07)])
def test_dummy_equals_padded_balanced_problem(n, m, mass, eps, dummy_cost):
    cost_np, a_np, b_np = _problem(n, m, "random", seed=n * 7 + m, mass_b=1.0)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    ref = _padded_solve(cost, a, b, mass, eps, dummy_cost)
    res = partial_ot(cost, a, b, mass=mass, eps=eps, method="dummy", dummy_cost=dummy_cost,
                     n_iters=100000, tol=1e-12)
    assert bool(res.converged) and bool(ref.converged)
    _record("partial (dummy) plan vs padded sinkhorn", assert_close(res.plan, ref.plan[:n, :m], 1e-7, "plan"))
    assert res.plan.shape == (n, m)
    # the corner is forbidden: the real block carries exactly the mass
    assert abs(float(res.mass) - mass) <= 1e-9 * mass
    assert _caps_ok(res.plan, a, b, rtol=1e-6)


def test_dummy_forbidden_diagonal_is_zero_and_mass_is_met():
    rng = np.random.default_rng(1)
    n = 10
    cost = torch.tensor(random_cost(rng, (n, n)))
    cost.fill_diagonal_(float("inf"))
    res = partial_ot(cost, mass=0.1, eps=0.07, method="dummy", n_iters=5000, tol=1e-9)
    assert bool(res.converged)
    assert (res.plan.diagonal() == 0).all()
    assert abs(float(res.plan.sum()) - 0.1) <= 1e-5
    assert _caps_ok(res.plan, torch.full((n,), 1 / n, dtype=F64), torch.full((n,), 1 / n, dtype=F64), 1e-6)


# -------------------------------------------------------------- properties

METHODS = st.sampled_from(["bregman", "dummy"])


@given(ot_problems(eps=(0.05, 0.2, 1.0), kinds=("uniform", "random", "sparse"), mass_b=1.5),
       st.sampled_from([0.2, 0.6, 1.0]), METHODS)
def test_converged_plan_carries_mass_within_caps(p, frac, method):
    a, b = p.a_full(), p.b_full()
    mass = frac * float(min(a.sum(), b.sum()))
    res = partial_ot(p.cost, p.a, p.b, mass=mass, eps=p.eps, method=method, n_iters=50000, tol=1e-10)
    assert bool(res.converged), float(res.marginal_error)
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    assert abs(float(res.plan.sum()) - mass) <= 1e-6 * mass
    assert abs(float(res.mass) - float(res.plan.sum())) <= 1e-12
    assert _caps_ok(res.plan, a, b, rtol=1e-6)


@given(ot_problems(eps=(0.1, 0.5), kinds=("uniform", "random")))
def test_full_mass_bregman_equals_balanced_sinkhorn(p):
    mass = float(p.a_full().sum())
    res = partial_ot(p.cost, p.a, p.b, mass=mass, eps=p.eps, n_iters=50000, tol=1e-12)
    ref = sinkhorn(p.cost, p.a, p.b, eps=p.eps, n_iters=50000, tol=1e-12)
    assert_close(res.plan, ref.plan, 1e-7, "plan")


@given(ot_problems(eps=(0.05, 0.3), kinds=("uniform", "random")), METHODS, st.data())
def test_permuting_cost_permutes_plan(p, method, data):
    n, m = p.shape
    rows = torch.tensor(data.draw(st.permutations(list(range(n)))), dtype=torch.long)
    cols = torch.tensor(data.draw(st.permutations(list(range(m)))), dtype=torch.long)
    a, b = p.a_full(), p.b_full()
    ref = partial_ot(p.cost, a, b, mass=0.5, eps=p.eps, method=method, n_iters=40)
    res = partial_ot(p.cost[rows][:, cols], a[rows], b[cols], mass=0.5, eps=p.eps, method=method, n_iters=40)
    assert_close(res.plan, ref.plan[rows][:, cols], 1e-10, "plan")


@given(ot_problems(batch=(1, 3), eps=(0.05, 0.5), kinds=("uniform", "random")), METHODS)
def test_batch_equals_loop_of_single_solves(p, method):
    res = partial_ot(p.cost, p.a, p.b, mass=0.4, eps=p.eps, method=method, n_iters=25)
    assert res.plan.shape == p.cost.shape and res.mass.shape == p.cost.shape[:1]
    assert res.converged.shape == p.cost.shape[:1] and res.transport_cost.shape == p.cost.shape[:1]
    for k in range(p.cost.shape[0]):
        one = partial_ot(p.cost[k], None if p.a is None else p.a[k], None if p.b is None else p.b[k],
                         mass=0.4, eps=p.eps, method=method, n_iters=25)
        assert_close(res.plan[k], one.plan, 1e-10, f"plan[{k}]")
        assert abs(float(res.transport_cost[k]) - float(one.transport_cost)) <= 1e-10


@settings(max_examples=15)
@given(ot_problems(eps=(1e-3, 1e-2, 1.0), scales=(1.0, 1e3), kinds=("uniform", "random", "sparse")),
       st.sampled_from([torch.float32, torch.float64]), METHODS)
def test_plan_nonnegative_and_finite_for_small_eps_and_large_costs(p, dtype, method):
    cost = p.cost.to(dtype)
    a = None if p.a is None else p.a.to(dtype)
    b = None if p.b is None else p.b.to(dtype)
    res = partial_ot(cost, a, b, mass=0.5, eps=p.eps, method=method, n_iters=30)
    assert res.plan.dtype == dtype
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    assert not torch.isnan(res.log_plan).any()
    assert torch.isfinite(res.transport_cost) and torch.isfinite(res.mass) and float(res.mass) > 0
    assert torch.isfinite(res.marginal_error)


@given(st.integers(1, 8), st.integers(1, 8), st.data(), METHODS, st.sampled_from([0.01, 0.3]))
def test_forbidden_entries_get_exactly_zero(n, m, data, method, eps):
    mask = data.draw(forbidden_masks(n, m))
    rng = np.random.default_rng(n * 10 + m)
    cost = torch.tensor(random_cost(rng, (n, m))).masked_fill(mask, float("inf"))
    res = partial_ot(cost, mass=0.5, eps=eps, method=method, n_iters=200)
    assert (res.plan[mask] == 0).all()
    assert (res.log_plan[mask] == float("-inf")).all()
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.transport_cost)


@given(permutation_problems(min_n=1, max_n=10))
def test_known_permutation_at_full_mass(problem):
    cost, sigma = problem
    n = cost.shape[0]
    res = partial_ot(cost, mass=1.0, eps=1e-2, n_iters=20000, tol=1e-10)
    target = torch.zeros(n, n, dtype=F64)
    target[torch.arange(n), sigma] = 1.0
    assert float((n * res.plan - target).abs().max()) < 1e-5


def test_smaller_mass_picks_cheapest_entries():
    # the mass-0.25 plan at small eps sits on the two cheapest entries of a 4x4 problem
    cost = torch.full((4, 4), 1.0, dtype=F64)
    cost[0, 1] = 0.0
    cost[2, 3] = 0.1
    res = partial_ot(cost, mass=0.5, eps=1e-3, n_iters=20000, tol=1e-10)
    expected = torch.zeros(4, 4, dtype=F64)
    expected[0, 1] = expected[2, 3] = 0.25
    assert float((res.plan - expected).abs().max()) < 1e-6


# ------------------------------------------------------------------- results

@pytest.mark.parametrize("method", ["bregman", "dummy"])
def test_results(method):
    cost = torch.rand(60, 70, dtype=F64)
    res = partial_ot(cost, mass=0.5, eps=0.05, method=method, n_iters=3)
    s = repr(res)
    assert "60" in s and "70" in s and "3" in s and "converged" in s.lower() and len(s) < 1000, s
    stuck = partial_ot(cost, mass=0.5, eps=0.01, method=method, n_iters=1, tol=1e-14)
    assert stuck.n_iters == 1 and not bool(stuck.converged)
    done = partial_ot(cost[:6, :7], mass=0.5, eps=0.2, method=method, n_iters=20000, tol=1e-9)
    assert bool(done.converged) and done.n_iters < 20000
    assert abs(float(done.transport_cost) - float((done.plan * cost[:6, :7]).sum())) < 1e-12


@pytest.mark.parametrize("method", ["bregman", "dummy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_result_dtypes(method, dtype):
    cost = torch.rand(5, 6).to(dtype)
    res = partial_ot(cost, mass=0.5, eps=0.1, method=method, n_iters=20)
    out = F64 if dtype == F64 else torch.float32
    for name in ("plan", "log_plan", "transport_cost", "mass"):
        assert getattr(res, name).dtype == out, name
    if dtype != F64:
        ref = partial_ot(cost.double(), mass=0.5, eps=0.1, method=method, n_iters=20)
        # dummy: the dummy potentials are O(dummy_cost = 100 max C); fp32 must not lose the real block to them
        assert_close(res.plan, ref.plan, 1e-5, "plan vs fp64")


def test_zz_report_pot_errors():
    print("\nmeasured vs references:", {k: f"{v:.2e}" for k, v in MEASURED.items()})
    assert all(v <= RTOL_POT for v in MEASURED.values())
