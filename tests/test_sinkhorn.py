"""Tests of ``ot_losses.sinkhorn`` (balanced and unbalanced).

Reference ladder: POT in float64 (``ot.sinkhorn(method="sinkhorn_log")``,
``ot.unbalanced.sinkhorn_unbalanced``), then properties with hypothesis,
SwAV's exp-domain loop transcribed below, and the result object.

Conventions (docs/api.md): ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``; vs POT's
``log_u, log_v``: ``f = eps (log_u - log a)``, ``g = eps (log_v - log b)`` up to
``(f + c, g - c)``.
"""
import re
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ot_losses import SinkhornResult, sinkhorn
from strategies import (assert_close, assert_potentials_close, forbidden_masks, l1_marginal_error, marginal,
                        ot_problems, permutation_problems, random_cost)

F64 = torch.float64

# (N, M): N = 1 and M = 1, N != M, one larger ragged shape.
SHAPES = [(1, 1), (1, 5), (6, 1), (5, 5), (7, 4), (12, 9), (17, 29)]
EPS_BALANCED = [1e-3, 1e-2, 1e-1, 1.0]
KINDS = ["uniform", "random"]
# Balanced vs POT: plans (relative Frobenius) and potentials (max abs after
# centring, relative to the cost scale 1).
RTOL_POT = 1e-6
# Seed offsets for the few grid problems on which POT (and any Sinkhorn) needs
# > 1e5 iterations at small eps (nearly tied optimal assignments).
SEED_OFFSET = {(5, 5, "uniform", 1e-3): 2, (5, 5, "uniform", 1e-2): 4, (12, 9, "uniform", 1e-3): 5}
MEASURED = {}   # worst relative errors seen, printed by test_zz_report_pot_errors with -s


def _np(x):
    return x.detach().cpu().numpy()


def _problem(n, m, kind, seed, mass_b=1.0):
    rng = np.random.default_rng(seed)
    cost = random_cost(rng, (n, m))
    a = marginal(rng, n, kind)
    b = marginal(rng, m, kind, total=mass_b)
    return cost, a, b


def _record(key, err):
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(err))


def _expected_plan(res, cost, a, b, eps):
    """``a_i b_j exp((f_i + g_j - C_ij)/eps)`` from the result's potentials."""
    return a[..., :, None] * b[..., None, :] * torch.exp(
        (res.f[..., :, None] + res.g[..., None, :] - cost) / eps)


# --------------------------------------------------------------------- POT

@pytest.mark.parametrize("eps", EPS_BALANCED, ids=lambda e: f"eps{e:g}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-M{s[1]}")
def test_balanced_matches_pot(shape, kind, eps):
    n, m = shape
    cost_np, a_np, b_np = _problem(n, m, kind, seed=n * 100 + m + SEED_OFFSET.get((n, m, kind, eps), 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # POT's exp overflows harmlessly for N = 1 at eps = 1e-3
        P_ref, log = ot.sinkhorn(a_np, b_np, cost_np, eps, method="sinkhorn_log", numItermax=10000,
                                 stopThr=1e-13, log=True, warn=False)
    assert np.abs(P_ref.sum(1) - a_np).sum() + np.abs(P_ref.sum(0) - b_np).sum() < 1e-11  # POT converged
    f_ref = eps * (log["log_u"] - np.log(a_np))
    g_ref = eps * (log["log_v"] - np.log(b_np))

    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = sinkhorn(cost, a, b, eps=eps, n_iters=100000, tol=1e-12)
    assert bool(res.converged)
    assert res.plan.dtype == F64 and res.f.dtype == F64
    err = assert_close(res.plan, P_ref, RTOL_POT, "plan")
    _record("balanced plan", err)
    if eps >= 1e-2:
        perr = assert_potentials_close(res.f, res.g, f_ref, g_ref, atol=RTOL_POT, name="f, g")
        _record("balanced potentials (abs, cost scale 1)", perr)
    else:
        # At eps = 1e-3 the plan can be numerically block-diagonal (cross entries ~exp(-70) far below
        # the marginal precision), leaving a free shift between the blocks' potentials: compare
        # f_i + g_j only where the plan carries mass, through the log-plan.
        support = P_ref > 1e-10 * P_ref.max()
        log_ref = log["log_u"][:, None] + log["log_v"][None, :] - cost_np / eps   # POT: P = diag(u) K diag(v)
        lerr = np.abs(res.log_plan.numpy()[support] - log_ref[support]).max() * eps
        assert lerr <= RTOL_POT, f"eps * log_plan on the support differs by {lerr:.2e}"
        _record("balanced f_i + g_j on the support, eps=1e-3 (abs)", lerr)
    # transport cost and regularised value from POT's plan (mass 1: KL(P||ab) = sum P log(P / ab)).
    lin = float((P_ref * cost_np).sum())
    log_p = log["log_u"][:, None] + log["log_v"][None, :] - cost_np / eps     # no underflow to log(0)
    kl = float((P_ref * (log_p - np.log(np.outer(a_np, b_np)))).sum())
    assert abs(float(res.transport_cost) - lin) <= 1e-6 * max(abs(lin), 1e-3)
    assert abs(float(res.value) - (lin + eps * kl)) <= 1e-6 * max(abs(lin + eps * kl), 1e-3)


UNBALANCED_CASES = [
    # (N, M, eps, rho): POT's stabilized unbalanced solver converges on these.
    (1, 5, 0.1, 1.0), (6, 1, 0.1, 10.0), (5, 5, 0.01, 0.1), (5, 5, 0.05, 1.0),
    (7, 4, 0.1, 0.1), (12, 9, 0.01, 0.1), (12, 9, 0.1, 10.0), (12, 9, 1.0, 1.0),
    (17, 29, 0.1, 1.0), (17, 29, 1.0, 10.0), (17, 29, 0.05, 0.1),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,eps,rho", UNBALANCED_CASES, ids=lambda v: f"{v}")
def test_unbalanced_matches_pot(n, m, eps, rho, kind):
    cost_np, a_np, b_np = _problem(n, m, kind, seed=n * 100 + m + 7, mass_b=2.0)   # unequal masses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P_ref = ot.unbalanced.sinkhorn_unbalanced(a_np, b_np, cost_np, eps, rho, method="sinkhorn_stabilized",
                                                  reg_type="kl", numItermax=100000, stopThr=1e-14)
        P_ref2 = ot.unbalanced.sinkhorn_unbalanced(a_np, b_np, cost_np, eps, rho, method="sinkhorn",
                                                   reg_type="kl", numItermax=100000, stopThr=1e-14)
    assert np.isfinite(P_ref).all() and np.linalg.norm(P_ref - P_ref2) <= 1e-9 * np.linalg.norm(P_ref)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = sinkhorn(cost, a, b, eps=eps, n_iters=100000, tol=1e-12, reach=rho)
    assert bool(res.converged)
    err = assert_close(res.plan, P_ref, RTOL_POT, "plan")
    _record("unbalanced plan", err)
    assert_close(res.plan, _expected_plan(res, cost, a, b, eps), 1e-12, "plan vs a b exp((f+g-C)/eps)")


def test_unbalanced_two_reaches_match_pot():
    cost_np, a_np, b_np = _problem(6, 8, "random", seed=3, mass_b=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P_ref = ot.unbalanced.sinkhorn_unbalanced(a_np, b_np, cost_np, 0.1, (0.5, 5.0), method="sinkhorn",
                                                  reg_type="kl", numItermax=100000, stopThr=1e-14)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    res = sinkhorn(cost, a, b, eps=0.1, n_iters=100000, tol=1e-12, reach=(0.5, 5.0))
    err = assert_close(res.plan, P_ref, RTOL_POT, "plan")
    _record("unbalanced plan", err)
    # and the two reaches are not silently swapped
    swapped = sinkhorn(cost, a, b, eps=0.1, n_iters=100000, tol=1e-12, reach=(5.0, 0.5))
    assert torch.linalg.norm(swapped.plan - res.plan) > 1e-3 * torch.linalg.norm(res.plan)


def test_large_reach_recovers_balanced():
    cost_np, a_np, b_np = _problem(7, 9, "random", seed=11)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    # same fixed iterations: the damping rho / (rho + eps) = 1 - 1e-7 changes each step by ~1e-7
    bal = sinkhorn(cost, a, b, eps=0.1, n_iters=300)
    unb = sinkhorn(cost, a, b, eps=0.1, n_iters=300, reach=1e6)
    assert_close(unb.plan, bal.plan, 1e-3, "plan, reach=1e6 vs balanced")
    small = sinkhorn(cost, a, b, eps=0.1, n_iters=20000, tol=1e-12, reach=0.05)
    assert torch.linalg.norm(small.plan - bal.plan) > 1e-2 * torch.linalg.norm(bal.plan)


# ------------------------------------------------------------- conventions

@pytest.mark.parametrize("reach", [None, 0.5], ids=["balanced", "unbalanced"])
def test_result_fields_follow_the_documented_formulas(reach):
    cost_np, a_np, b_np = _problem(5, 7, "random", seed=5)
    cost, a, b = (torch.tensor(x) for x in (cost_np, a_np, b_np))
    eps = 0.07
    res = sinkhorn(cost, a, b, eps=eps, n_iters=30, reach=reach)
    assert isinstance(res, SinkhornResult)
    assert res.f.shape == (5,) and res.g.shape == (7,) and res.plan.shape == (5, 7)
    assert res.value.shape == () and res.marginal_error.shape == () and res.converged.shape == ()
    assert res.converged.dtype == torch.bool
    expected = _expected_plan(res, cost, a, b, eps)
    assert_close(res.plan, expected, 1e-12, "plan")
    assert_close(res.log_plan, torch.log(expected), 1e-12, "log_plan")
    assert abs(float(res.transport_cost) - float((expected * cost).sum())) < 1e-12
    if reach is None:   # after the g update the columns are met exactly
        assert_close(res.plan.sum(0), b, 1e-12, "column sums")


def test_log_plan_does_not_underflow():
    cost = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 3.0]], dtype=F64)
    res = sinkhorn(cost, eps=1e-3, n_iters=50)
    assert (res.plan[0, 2] == 0) and torch.isfinite(res.log_plan).all()
    assert float(res.log_plan[0, 2]) < -1000.0
    expected = (res.f[:, None] + res.g[None, :] - cost) / 1e-3 + torch.log(torch.tensor(1 / 6, dtype=F64))
    assert_close(res.log_plan, expected, 1e-10, "log_plan")


def test_batched_value_equals_dual_objective():
    rng = np.random.default_rng(2)
    cost = torch.tensor(random_cost(rng, (3, 6, 4)))
    a = torch.tensor(marginal(rng, 6, "random", batch=(3,)))
    b = torch.tensor(marginal(rng, 4, "random", batch=(3,)))
    res = sinkhorn(cost, a, b, eps=0.2, n_iters=5000, tol=1e-12)
    assert res.value.shape == (3,) and res.f.shape == (3, 6) and res.g.shape == (3, 4)
    dual = (res.f * a).sum(-1) + (res.g * b).sum(-1)
    assert_close(res.value, dual, 1e-9, "value vs <f, a> + <g, b>")


# -------------------------------------------------------------- properties

REACHES = st.sampled_from([None, 1.0])


@given(ot_problems(eps=(0.05, 0.1, 0.5, 1.0), kinds=("uniform", "random", "sparse")))
def test_converged_plan_meets_marginals(p):
    tol = 1e-8
    res = sinkhorn(p.cost, p.a, p.b, eps=p.eps, n_iters=50000, tol=tol)
    assert bool(res.converged), f"not converged: {res.marginal_error}"
    assert float(res.marginal_error) <= tol
    err = float(l1_marginal_error(res.plan, p.a_full(), p.b_full()))
    assert err <= 2 * tol, f"plan L1 marginal error {err:.2e} (tol {tol})"
    assert abs(float(res.marginal_error) - err) <= 1e-3 * err + 1e-13
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    # zero-weight rows/columns receive no mass
    assert (res.plan[p.a_full() == 0].abs() <= 1e-15).all()
    assert (res.plan[:, p.b_full() == 0].abs() <= 1e-15).all()


@given(ot_problems(eps=(0.05, 0.3)), REACHES, st.data())
def test_permuting_cost_permutes_plan(p, reach, data):
    n, m = p.shape
    rows = torch.tensor(data.draw(st.permutations(list(range(n)))), dtype=torch.long)
    cols = torch.tensor(data.draw(st.permutations(list(range(m)))), dtype=torch.long)
    a, b = p.a_full(), p.b_full()
    ref = sinkhorn(p.cost, a, b, eps=p.eps, n_iters=40, reach=reach)
    res = sinkhorn(p.cost[rows][:, cols], a[rows], b[cols], eps=p.eps, n_iters=40, reach=reach)
    assert_close(res.plan, ref.plan[rows][:, cols], 1e-10, "plan")
    assert_close(res.f, ref.f[rows], 1e-10, "f")
    assert_close(res.g, ref.g[cols], 1e-10, "g")


@given(ot_problems(eps=(0.05, 0.2, 1.0), kinds=("uniform", "random")), st.integers(0, 2**32 - 1))
def test_adding_row_and_column_terms_leaves_plan_unchanged(p, seed):
    rng = np.random.default_rng(seed)
    n, m = p.shape
    u = torch.tensor(rng.normal(size=(n, 1)) * 3)
    v = torch.tensor(rng.normal(size=(1, m)) * 3)
    ref = sinkhorn(p.cost, p.a, p.b, eps=p.eps, n_iters=50000, tol=1e-11)
    res = sinkhorn(p.cost + u + v, p.a, p.b, eps=p.eps, n_iters=50000, tol=1e-11)
    assert bool(ref.converged) and bool(res.converged)
    assert_close(res.plan, ref.plan, 1e-7, "plan")
    # potentials absorb the shift: f + u, g + v (up to a constant)
    assert_potentials_close(res.f, res.g, ref.f + u[:, 0], ref.g + v[0], atol=1e-7)


@given(ot_problems(eps=(0.05, 0.3), kinds=("uniform", "random")), REACHES, st.sampled_from([0.1, 7.0]))
def test_scaling_cost_and_eps_together_keeps_plan(p, reach, lam):
    ref = sinkhorn(p.cost, p.a, p.b, eps=p.eps, n_iters=30, reach=reach)
    res = sinkhorn(p.cost * lam, p.a, p.b, eps=p.eps * lam, n_iters=30,
                   reach=None if reach is None else reach * lam)
    assert_close(res.plan, ref.plan, 1e-10, "plan")
    assert_close(res.f, ref.f * lam, 1e-10, "f")
    assert abs(float(res.value) - lam * float(ref.value)) <= 1e-10 * (1 + abs(lam * float(ref.value)))


@given(ot_problems(eps=(0.1, 0.5), kinds=("uniform", "random")))
def test_transposed_problem_gives_transposed_plan(p):
    a, b = p.a_full(), p.b_full()
    ref = sinkhorn(p.cost, a, b, eps=p.eps, n_iters=50000, tol=1e-11)
    res = sinkhorn(p.cost.T, b, a, eps=p.eps, n_iters=50000, tol=1e-11)
    assert_close(res.plan, ref.plan.T, 1e-7, "plan")
    assert abs(float(res.value) - float(ref.value)) <= 1e-7 * (1 + abs(float(ref.value)))
    assert_potentials_close(res.f, res.g, ref.g, ref.f, atol=1e-7)


@given(ot_problems(batch=(1, 3), eps=(0.05, 0.5), kinds=("uniform", "random", "sparse")), REACHES,
       st.booleans())
def test_batch_equals_loop_of_single_solves(p, reach, broadcast_a):
    a = p.a_full()
    if broadcast_a:        # an unbatched marginal broadcasts over the batch
        a = a[0]
    res = sinkhorn(p.cost, a, p.b, eps=p.eps, n_iters=25, reach=reach)
    assert res.plan.shape == p.cost.shape and res.f.shape == p.cost.shape[:2]
    assert res.value.shape == p.cost.shape[:1] and res.converged.shape == p.cost.shape[:1]
    for k in range(p.cost.shape[0]):
        a_k = a if broadcast_a else a[k]
        b_k = None if p.b is None else p.b[k]
        one = sinkhorn(p.cost[k], a_k, b_k, eps=p.eps, n_iters=25, reach=reach)
        assert_close(res.plan[k], one.plan, 1e-10, f"plan[{k}]")
        assert_close(res.f[k], one.f, 1e-10, f"f[{k}]")
        assert_close(res.g[k], one.g, 1e-10, f"g[{k}]")
        assert abs(float(res.value[k]) - float(one.value)) <= 1e-10 * (1 + abs(float(one.value)))
        assert abs(float(res.marginal_error[k]) - float(one.marginal_error)) <= 1e-9


@settings(max_examples=15)
@given(ot_problems(eps=(1e-3, 1e-2, 1.0), scales=(1.0, 1e3), kinds=("uniform", "random", "sparse")),
       st.sampled_from([torch.float32, torch.float64]), REACHES)
def test_plan_nonnegative_and_finite_for_small_eps_and_large_costs(p, dtype, reach):
    cost = p.cost.to(dtype)
    a = None if p.a is None else p.a.to(dtype)
    b = None if p.b is None else p.b.to(dtype)
    res = sinkhorn(cost, a, b, eps=p.eps, n_iters=30, reach=reach)
    for name in ("value", "transport_cost", "marginal_error"):
        t = getattr(res, name)
        assert t.dtype == dtype and torch.isfinite(t).all(), f"{name} not finite: {t}"
    # potentials of zero-weight rows/columns may be -inf (no mass); the others must be finite
    assert res.f.dtype == dtype and torch.isfinite(res.f[p.a_full() > 0]).all(), res.f
    assert res.g.dtype == dtype and torch.isfinite(res.g[p.b_full() > 0]).all(), res.g
    assert not torch.isnan(res.f).any() and not torch.isnan(res.g).any()
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    assert not torch.isnan(res.log_plan).any()
    assert float(res.plan.sum()) > 0
    if reach is None and dtype == torch.float64:   # columns are met exactly after the g update
        assert_close(res.plan.sum(0), p.b_full().to(dtype), 1e-6, "column sums")


@given(st.integers(1, 8), st.integers(1, 8), st.data(), REACHES, st.sampled_from([0.01, 0.3]))
def test_forbidden_entries_get_exactly_zero(n, m, data, reach, eps):
    mask = data.draw(forbidden_masks(n, m))
    rng = np.random.default_rng(n * 10 + m)
    cost = torch.tensor(random_cost(rng, (n, m)))
    cost = cost.masked_fill(mask, float("inf"))
    before = cost.clone()
    res = sinkhorn(cost, eps=eps, n_iters=200, reach=reach)
    assert torch.equal(cost, before)
    assert (res.plan[mask] == 0).all(), "forbidden entries must be exactly 0"
    assert (res.log_plan[mask] == float("-inf")).all()
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.log_plan[~mask]).all()
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    assert torch.isfinite(res.value) and torch.isfinite(res.transport_cost)
    if reach is None and n == m:   # a permutation is allowed: feasible with uniform marginals
        conv = sinkhorn(cost, eps=0.3, n_iters=50000, tol=1e-9)
        assert bool(conv.converged)
        assert float(l1_marginal_error(conv.plan, torch.full((n,), 1 / n, dtype=F64),
                                       torch.full((m,), 1 / m, dtype=F64))) <= 2e-9


@given(permutation_problems(), st.sampled_from([1e-2, 1e-3]))
def test_known_permutation_is_recovered_at_small_eps(problem, eps):
    cost, sigma = problem
    n = cost.shape[0]
    res = sinkhorn(cost, eps=eps, n_iters=20000, tol=1e-9)
    target = torch.zeros(n, n, dtype=F64)
    target[torch.arange(n), sigma] = 1.0
    assert torch.equal(res.plan.argmax(1), sigma)
    assert float((n * res.plan - target).abs().max()) < 1e-6


# --------------------------------------------------------------------- SwAV

def swav_distributed_sinkhorn(out, eps, n_iters):
    """Transcription of SwAV's exp-domain ``distributed_sinkhorn`` (world size 1), docs/methods.md 1."""
    Q = torch.exp(out / eps).t()          # (K, B)
    n_samples = Q.shape[1]
    n_protos = Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iters):
        Q = Q / Q.sum(dim=1, keepdim=True)    # prototype rows first ...
        Q = Q / n_protos
        Q = Q / Q.sum(dim=0, keepdim=True)    # ... then sample columns
        Q = Q / n_samples
    Q = Q * n_samples
    return Q.t()


def _cosines(rng, n, k, d=5, dtype=F64):
    z = torch.tensor(rng.normal(size=(n, d)), dtype=dtype)
    c = torch.tensor(rng.normal(size=(k, d)), dtype=dtype)
    return torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(c, dim=1).T


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.sampled_from([0.05, 0.1, 0.5]),
       st.integers(0, 2**32 - 1))
def test_swav_identity(n, k, n_iters, eps, seed):
    S = _cosines(np.random.default_rng(seed), n, k)
    Q = n * sinkhorn(-S.T, eps=eps, n_iters=n_iters).plan.T
    assert_close(Q.sum(1), torch.ones(n, dtype=F64), 1e-12, "rows of Q")
    assert_close(Q, swav_distributed_sinkhorn(S, eps, n_iters), 1e-12, "Q vs SwAV loop")


def test_swav_identity_three_iterations_fp32_and_order_matters():
    rng = np.random.default_rng(0)
    S = _cosines(rng, 64, 30)
    ref = swav_distributed_sinkhorn(S, 0.05, 3)
    Q32 = 64 * sinkhorn(-S.T.float(), eps=0.05, n_iters=3).plan.T
    assert Q32.dtype == torch.float32
    assert float((Q32.double() - ref).abs().max()) < 1e-5
    assert float((Q32.sum(1) - 1).abs().max()) < 1e-5
    # sanity of the reference: the opposite update order is a different matrix at 3 iterations
    other = 64 * sinkhorn(-S, eps=0.05, n_iters=3).plan
    assert float((other - ref).abs().max()) > 1e-2


# ------------------------------------------------------------------- results

def test_repr_shows_shape_iterations_error_and_convergence():
    cost = torch.rand(60, 70, dtype=F64)
    res = sinkhorn(cost, eps=0.1, n_iters=17)
    s = repr(res)
    assert re.search(r"60\D{1,4}70", s), s
    assert "17" in s, s
    assert "error" in s.lower() and "converged" in s.lower(), s
    assert len(s) < 1000, f"repr should summarise, not dump tensors ({len(s)} chars)"


def test_converged_false_when_tol_not_reached():
    cost = torch.rand(9, 11, dtype=F64)
    res = sinkhorn(cost, eps=0.01, n_iters=1, tol=1e-12)
    assert res.n_iters == 1
    assert not bool(res.converged)
    assert float(res.marginal_error) > 1e-12
    batched = sinkhorn(torch.rand(3, 9, 11, dtype=F64), eps=0.01, n_iters=2, tol=1e-12)
    assert batched.converged.shape == (3,) and not batched.converged.any()


def test_converged_without_tol_uses_relative_threshold():
    cost = torch.rand(9, 11, dtype=F64)
    assert not bool(sinkhorn(cost, eps=0.01, n_iters=1).converged)
    res = sinkhorn(cost, eps=0.5, n_iters=500)
    assert res.n_iters == 500 and bool(res.converged)


def test_tol_stops_early_and_reports_iterations():
    cost = torch.rand(9, 11, dtype=F64)
    res = sinkhorn(cost, eps=0.5, n_iters=10000, tol=1e-6)
    assert bool(res.converged) and 1 <= res.n_iters < 10000
    assert float(res.marginal_error) < 1e-6


def test_n_iters_counts_eps_schedule_steps():
    cost = torch.rand(6, 8, dtype=F64)
    res = sinkhorn(cost, eps=0.1, n_iters=10, eps_schedule=[1.0, 0.5, 0.25])
    assert res.n_iters == 13
    # eps-scaling changes the path, not the optimum
    ref = sinkhorn(cost, eps=0.1, n_iters=20000, tol=1e-11)
    sched = sinkhorn(cost, eps=0.1, n_iters=20000, tol=1e-11, eps_schedule=[1.0, 0.5, 0.25])
    assert bool(sched.converged)
    assert_close(sched.plan, ref.plan, 1e-7, "plan with eps_schedule")


def test_warm_start_from_converged_potentials():
    rng = np.random.default_rng(4)
    cost = torch.tensor(random_cost(rng, (10, 12)))
    cold = sinkhorn(cost, eps=0.01, n_iters=50000, tol=1e-9)
    assert bool(cold.converged) and cold.n_iters >= 50
    warm = sinkhorn(cost, eps=0.01, n_iters=50000, tol=1e-8, init=(cold.f, cold.g))
    assert bool(warm.converged)
    assert warm.n_iters <= 20 and warm.n_iters * 5 <= cold.n_iters, (warm.n_iters, cold.n_iters)
    assert_close(warm.plan, cold.plan, 1e-6, "plan")


def test_warm_start_unbalanced():
    rng = np.random.default_rng(5)
    cost = torch.tensor(random_cost(rng, (8, 6)))
    cold = sinkhorn(cost, eps=0.05, n_iters=50000, tol=1e-10, reach=1.0)
    assert bool(cold.converged)
    warm = sinkhorn(cost, eps=0.05, n_iters=50000, tol=1e-9, reach=1.0, init=(cold.f, cold.g))
    assert bool(warm.converged) and warm.n_iters <= 20 and warm.n_iters * 5 <= cold.n_iters
    assert_close(warm.plan, cold.plan, 1e-6, "plan")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_costs_give_fp32_results(dtype):
    cost = torch.rand(2, 7, 5).to(dtype)
    res = sinkhorn(cost, eps=0.1, n_iters=50)
    for name in ("f", "g", "plan", "log_plan", "value", "transport_cost", "marginal_error"):
        assert getattr(res, name).dtype == torch.float32, name
    ref = sinkhorn(cost.double(), eps=0.1, n_iters=50)
    assert_close(res.plan, ref.plan, 1e-5, "plan vs fp64 solve of the same cost")
    assert res.plan.device == cost.device


def test_fp64_in_fp64_out():
    cost = torch.rand(4, 6, dtype=F64)
    res = sinkhorn(cost, eps=0.1, n_iters=10, reach=2.0)
    for name in ("f", "g", "plan", "log_plan", "value", "transport_cost"):
        assert getattr(res, name).dtype == F64, name


def test_zz_report_pot_errors():
    """Prints the worst relative errors against POT measured in this module (run with -s)."""
    print("\nmeasured vs POT:", {k: f"{v:.2e}" for k, v in MEASURED.items()})
    assert all(v <= RTOL_POT for v in MEASURED.values())


@pytest.mark.parametrize("reach", [None, 0.5], ids=["balanced", "unbalanced"])
def test_torch_backend_equals_auto_on_cpu(reach):
    cost = torch.rand(2, 5, 7, dtype=F64)
    auto = sinkhorn(cost, eps=0.1, n_iters=30, reach=reach)
    ref = sinkhorn(cost, eps=0.1, n_iters=30, reach=reach, backend="torch")
    assert_close(auto.plan, ref.plan, 1e-12, "plan")


def test_unbalanced_tol_bounds_potential_change():
    cost = torch.rand(6, 5, dtype=F64)
    res = sinkhorn(cost, eps=0.1, n_iters=50000, tol=1e-9, reach=1.0)
    assert bool(res.converged) and float(res.marginal_error) <= 1e-9
    more = sinkhorn(cost, eps=0.1, n_iters=res.n_iters + 10, reach=1.0)
    assert float((more.f - res.f).abs().max()) < 1e-7     # the potentials had settled
