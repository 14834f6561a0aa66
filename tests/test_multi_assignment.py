"""Tests of ``ot_losses.multi_assignment_sinkhorn`` (capacitated multi-assignment, Multi-SK).

Optimality certificate used throughout (the primal is strictly concave): at
convergence ``X`` meets the row/column sums, ``0 <= X <= 1``, and
``logit(X) + C / eps`` is additive (``f_i + g_j``), i.e. its double-centred
residual is ~0. The official layered Multi-SK algorithm (docs/methods.md 4.2) is
transcribed below and must converge to the same ``X`` with ``C = -0.75 S``.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ot_losses import MultiAssignmentResult, multi_assignment_sinkhorn
from strategies import assert_close, forbidden_masks, marginal, permutation_problems, random_cost

F64 = torch.float64


def double_centre(z):
    return z - z.mean(-1, keepdim=True) - z.mean(-2, keepdim=True) + z.mean((-2, -1), keepdim=True)


@st.composite
def ma_problems(draw, min_n=1, max_n=12, max_m=12, eps=(0.1, 0.3, 1.0), kinds=("uniform", "random"),
                batch=None):
    """(cost, k, b, eps): cost in [0, 1], 1 <= k < M with k b_j <= 0.9 (strictly feasible caps)."""
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(2, max_m))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    cost = torch.tensor(random_cost(rng, lead + (n, m)))
    b = None if kind == "uniform" else torch.tensor(marginal(rng, m, kind, batch=lead))
    bmax = 1.0 / m if b is None else float(b.max())
    k_hi = min(m - 1.0, 0.9 / bmax)
    k = draw(st.one_of(st.integers(1, max(1, int(k_hi))).map(float),
                       st.floats(1.0, k_hi, allow_nan=False)))
    k = min(k, k_hi)
    return cost, k, b, draw(st.sampled_from(eps))


def _b_full(b, m, like):
    return torch.full(like.shape[:-2] + (m,), 1.0 / m, dtype=like.dtype) if b is None else b


@given(ma_problems())
def test_converged_assignment_meets_constraints_and_is_logistic(problem):
    cost, k, b, eps = problem
    n, m = cost.shape
    res = multi_assignment_sinkhorn(cost, k, b, eps=eps, n_iters=50000, tol=1e-9)
    assert isinstance(res, MultiAssignmentResult)
    X = res.assignment
    assert X.shape == (n, m) and X.dtype == F64
    assert bool(res.converged), float(res.marginal_error)
    assert float(res.marginal_error) <= 1e-9
    assert ((X >= 0) & (X <= 1)).all()
    assert_close(X.sum(1), torch.full((n,), k, dtype=F64), 1e-8, "row sums")
    assert_close(X.sum(0), k * n * _b_full(b, m, cost), 1e-8, "column sums")
    resid = double_centre(torch.logit(X) + cost / eps)
    assert float(resid.abs().max()) < 1e-6, "logit(X) + C/eps is not additive"
    assert_close(X, torch.sigmoid((res.f[:, None] + res.g[None, :] - cost) / eps), 1e-10,
                 "X vs sigmoid((f + g - C)/eps)")


def multi_sk_layered(S, eps, n_iters, r):
    """Official Multi-SK (docs/methods.md 4.2), discrete weights, fp64, without the +1e-5 denominators.

    ``S`` (B, K) scores; ``K`` layers, weight 0.25 for the first ``K - r``, 1 for the last ``r``;
    returns ``X = sum of the last r layers``.
    """
    n, K = S.shape
    w = torch.cat([torch.full((K - r,), 0.25, dtype=S.dtype), torch.ones(r, dtype=S.dtype)])
    A = torch.exp(w[:, None, None] * S[None] / eps)      # (layers, samples, anchors)
    A = A / A.sum()
    for _ in range(n_iters):
        A = A * (n / K) / A.sum(1, keepdim=True)          # per layer, each anchor gets B/K
        A = A / A.sum(0, keepdim=True)                    # each (sample, anchor) cell sums to 1 over layers
        A = A / A.sum(2, keepdim=True)                    # per layer, each sample sums to 1
    A = A / A.sum(2, keepdim=True)
    return A[K - r:].sum(0)


@pytest.mark.parametrize("n,K,r,eps", [(10, 6, 3, 0.5), (12, 8, 4, 0.3), (7, 5, 1, 0.5), (9, 4, 3, 1.0)])
def test_matches_official_layered_multi_sk(n, K, r, eps):
    rng = np.random.default_rng(n + K)
    z = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(n, 6))), dim=1)
    c = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(K, 6))), dim=1)
    S = z @ c.T
    ref = multi_sk_layered(S, eps, 3000, r)
    assert_close(ref.sum(1), torch.full((n,), float(r), dtype=F64), 1e-10, "reference rows")
    assert_close(ref.sum(0), torch.full((K,), r * n / K, dtype=F64), 1e-8, "reference columns (converged)")
    res = multi_assignment_sinkhorn(-0.75 * S, r, eps=eps, n_iters=50000, tol=1e-11)
    assert bool(res.converged)
    assert_close(res.assignment, ref, 1e-7, "X vs official layered Multi-SK")


@given(ma_problems(eps=(0.1, 0.5)), st.data())
def test_permuting_cost_permutes_assignment(problem, data):
    cost, k, b, eps = problem
    n, m = cost.shape
    rows = torch.tensor(data.draw(st.permutations(list(range(n)))), dtype=torch.long)
    cols = torch.tensor(data.draw(st.permutations(list(range(m)))), dtype=torch.long)
    b_full = _b_full(b, m, cost)
    ref = multi_assignment_sinkhorn(cost, k, b_full, eps=eps, n_iters=30)
    res = multi_assignment_sinkhorn(cost[rows][:, cols], k, b_full[cols], eps=eps, n_iters=30)
    assert_close(res.assignment, ref.assignment[rows][:, cols], 1e-10, "X")


@given(ma_problems(eps=(0.1, 0.5)), st.integers(0, 2**32 - 1))
def test_adding_row_and_column_terms_leaves_assignment_unchanged(problem, seed):
    cost, k, b, eps = problem
    n, m = cost.shape
    rng = np.random.default_rng(seed)
    shifted = cost + torch.tensor(rng.normal(size=(n, 1))) + torch.tensor(rng.normal(size=(1, m)))
    ref = multi_assignment_sinkhorn(cost, k, b, eps=eps, n_iters=50000, tol=1e-10)
    res = multi_assignment_sinkhorn(shifted, k, b, eps=eps, n_iters=50000, tol=1e-10)
    assert bool(ref.converged) and bool(res.converged)
    assert_close(res.assignment, ref.assignment, 1e-7, "X")


@given(ma_problems(batch=3, eps=(0.1, 0.5)))
def test_batch_equals_loop_of_single_solves(problem):
    cost, k, b, eps = problem
    res = multi_assignment_sinkhorn(cost, k, b, eps=eps, n_iters=20)
    assert res.assignment.shape == cost.shape and res.converged.shape == (3,)
    assert res.f.shape == cost.shape[:2] and res.g.shape == (3, cost.shape[2])
    for i in range(3):
        one = multi_assignment_sinkhorn(cost[i], k, None if b is None else b[i], eps=eps, n_iters=20)
        assert_close(res.assignment[i], one.assignment, 1e-10, f"X[{i}]")
        assert abs(float(res.marginal_error[i]) - float(one.marginal_error)) <= 1e-9


@settings(max_examples=15)
@given(ma_problems(eps=(1e-3, 1e-2, 1.0)), st.sampled_from([1.0, 1e3]), st.sampled_from([torch.float32, F64]))
def test_finite_and_in_unit_interval_for_small_eps_and_large_costs(problem, scale, dtype):
    cost, k, b, eps = problem
    res = multi_assignment_sinkhorn((cost * scale).to(dtype), k, None if b is None else b.to(dtype),
                                    eps=eps, n_iters=30)
    X = res.assignment
    assert X.dtype == dtype and torch.isfinite(X).all() and ((X >= 0) & (X <= 1)).all()
    assert torch.isfinite(res.marginal_error).all()
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()


@settings(max_examples=15)
@given(st.integers(1, 8), st.integers(3, 8), st.data(), st.sampled_from([0.05, 0.5]))
def test_forbidden_entries_get_exactly_zero(n, m, data, eps):
    mask = data.draw(forbidden_masks(n, m))
    rng = np.random.default_rng(n * 10 + m)
    cost = torch.tensor(random_cost(rng, (n, m))).masked_fill(mask, float("inf"))
    res = multi_assignment_sinkhorn(cost, 1, eps=eps, n_iters=100)
    assert (res.assignment[mask] == 0).all()
    assert torch.isfinite(res.assignment).all()


@settings(max_examples=8)
@given(permutation_problems(min_n=2, max_n=8))
def test_known_permutation_with_k_one(problem):
    # eps = 0.05 against a cost gap of 0.4: off-permutation entries ~ exp(-8) each. (At 0.01 < eps <= 0.03
    # these problems need > 20000 iterations, as balanced Sinkhorn does at eps ~ 0.05.)
    cost, sigma = problem
    n = cost.shape[0]
    res = multi_assignment_sinkhorn(cost, 1, eps=0.05, n_iters=2000, tol=1e-6)
    target = torch.zeros(n, n, dtype=F64)
    target[torch.arange(n), sigma] = 1.0
    assert torch.equal(res.assignment.argmax(1), sigma)
    assert float((res.assignment - target).abs().max()) < 0.05


def test_column_capacities_bind_against_cheap_columns():
    # two columns are far cheaper for every row, but each column must carry k N / M = 2:
    # by symmetry X_ij = x_j and 4 x_j = 2, so X = 0.5 everywhere whatever eps.
    n, m = 4, 4
    cost = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n, dtype=F64)
    res = multi_assignment_sinkhorn(cost, 2, eps=0.05, n_iters=20000, tol=1e-10)
    # columns must each carry k N / M = 2: half of every row's units go to the expensive columns
    assert_close(res.assignment.sum(0), torch.full((m,), 2.0, dtype=F64), 1e-8, "columns")
    assert_close(res.assignment, torch.full((n, m), 0.5, dtype=F64), 1e-6, "X (symmetry: all 0.5)")


# ------------------------------------------------------------------- results

def test_results_repr_convergence_and_dtypes():
    cost = torch.rand(60, 70, dtype=F64)
    res = multi_assignment_sinkhorn(cost, 5, eps=0.1, n_iters=4)
    s = repr(res)
    assert "60" in s and "70" in s and "4" in s and "converged" in s.lower() and len(s) < 1000, s
    stuck = multi_assignment_sinkhorn(cost, 5, eps=0.01, n_iters=1, tol=1e-14)
    assert stuck.n_iters == 1 and not bool(stuck.converged) and float(stuck.marginal_error) > 1e-14
    done = multi_assignment_sinkhorn(cost[:8, :6], 2.5, eps=0.3, n_iters=20000, tol=1e-9)
    assert bool(done.converged) and done.n_iters < 20000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64], ids=str)
def test_result_dtypes(dtype):
    cost = torch.rand(6, 5).to(dtype)
    res = multi_assignment_sinkhorn(cost, 2, eps=0.1, n_iters=20)
    out = F64 if dtype == F64 else torch.float32
    assert res.assignment.dtype == out and res.f.dtype == out and res.g.dtype == out
    assert not res.assignment.requires_grad


@pytest.mark.parametrize("shape", [(37, 23), (3, 37, 23)])
def test_row_blocked_steps_match_one_block(monkeypatch, shape):
    """Large problems run their steps in row blocks (bounded memory): same iterates as one block."""
    from ot_losses.solvers import _numerics
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(*shape, generator=g, dtype=torch.float64) + 50.0  # offsets: shifted steps
    cost[..., 2, :5] = math.inf
    mask = torch.ones(shape[-2], dtype=torch.bool)
    mask[-4:] = False

    def solve():
        return multi_assignment_sinkhorn(cost, 4, eps=0.05, n_iters=30, row_mask=mask)

    whole = solve()
    batch = shape[0] if len(shape) == 3 else 1
    monkeypatch.setattr(_numerics, "_BLOCK", 5 * batch * shape[-1])  # 5 rows per block, the last 2
    blocked = solve()
    torch.testing.assert_close(blocked.assignment, whole.assignment, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocked.marginal_error, whole.marginal_error, rtol=1e-9, atol=1e-12)
