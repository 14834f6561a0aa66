"""Property/fuzz suite (issue 9, "Keep it so"): random and adversarial problems against docs/api.md.

Problems come from ``fuzz_problems.py`` (1xM, Nx1, batched; f64/f32/f16/bf16;
eps 1e-4..10 x the cost scale; scales 1e-3..1e4, offsets up to 1e6; feasible
and infeasible forbidden patterns; zero-mass lines; marginals spanning
1e-12..1; transposed, strided and expanded inputs; warm starts; reach
1e-3..inf; all solvers, both partial methods, the triton interpreter).
Each call must raise a clear ``ValueError``/``TypeError`` where the contract
asks for one and return an honest result otherwise (:func:`check_result`):
finite fields, plan >= 0 and exactly 0 on forbidden entries, a reported
``marginal_error`` measured on the returned plan, marginals that hold when
``converged``, partial plans carrying ``mass``, untouched inputs. Further
properties: shift invariance (fp32 too), POT agreement in f64, batch == loop,
triton == torch, non-contiguous == contiguous, warm start == continued run,
fast path == log-domain (``grad="unroll"``) iterates, envelope gradient ==
plan.

Rounding slacks scale with the unit roundoff of the compute dtype times the
size of the exponents ``(cost range) / eps`` (``Case.arg_scale``): what a
log-domain solver that handles offsets cannot avoid; anything larger is a bug.

Default run ("ci" profile): a few dozen examples per property. The fuzz run:
``OT_LOSSES_FUZZ=1 OT_LOSSES_FUZZ_REPORT=fuzz.json pytest tests/test_fuzz.py``
runs >= 10,000 problems (``OT_LOSSES_FUZZ=2`` twice as many) with fresh random
examples each time and writes the per-solver / per-invariant counts as JSON.
"""
import contextlib
import json
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_problems as fp
from fuzz_problems import COUNTS, OUTCOMES, PROBLEMS, SOLVERS, build, count, examples, plan_of, solve, specs
from strategies import assert_close

F64 = torch.float64
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]
# The fuzz run explores fresh examples each time (the printed Spec is the reproducer), the default run is
# the derandomized "ci" profile of conftest.py.
FUZZ_SETTINGS = dict(derandomize=False, database=None) if fp.FUZZ else {}


def fuzz_settings(ci, fuzz):
    return settings(max_examples=examples(ci, fuzz), deadline=None, suppress_health_check=HEALTH,
                    **FUZZ_SETTINGS)


# ----------------------------------------------------------------------------- report

@pytest.fixture(scope="module", autouse=True)
def _fuzz_report(request):
    """At the end of the module: per-solver / per-invariant counts, to ``OT_LOSSES_FUZZ_REPORT`` (JSON)."""
    start = time.time()
    yield
    per_solver, invariants, outcomes = {}, {}, {}
    for (test, solver), n in PROBLEMS.items():
        per_solver[solver] = per_solver.get(solver, 0) + n
    for (solver, inv), n in sorted(COUNTS.items()):
        invariants.setdefault(solver, {})[inv] = n
    for (solver, what), n in sorted(OUTCOMES.items()):
        outcomes.setdefault(solver, {})[what] = n
    report = {"total_problems": sum(PROBLEMS.values()), "seconds": round(time.time() - start, 1),
              "fuzz_multiplier": fp.FUZZ, "problems_per_solver": per_solver,
              "problems_per_test": {f"{t}[{s}]": n for (t, s), n in sorted(PROBLEMS.items())},
              "outcomes": outcomes, "invariant_checks": invariants}
    path = os.environ.get("OT_LOSSES_FUZZ_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)
    if fp.FUZZ or path:
        lines = [f"\nfuzz: {report['total_problems']} problems in {report['seconds']} s; "
                 f"per solver {per_solver}"]
        lines += [f"  {solver}: " + ", ".join(f"{k}={v}" for k, v in invs.items())
                  for solver, invs in invariants.items()]
        # Module teardown output is captured (and only shown on failure): print past the capture.
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- helpers

def lead(x, case):
    """A result field with the leading batch dimension present, detached, float64 if floating."""
    x = torch.as_tensor(x).detach()
    x = x.double() if x.is_floating_point() else x
    return x if case.batched else x.unsqueeze(0)


def slack(case, mass=None):
    """(B,) rounding allowance, in mass units, for sums over the plan (see the module docstring)."""
    n, m = case.cost64.shape[-2:]
    mass = case.total_mass if mass is None else mass
    return mass * case.u * (8 * case.arg_scale + 4 * (n + m))


def plan_mass(case, plan):
    """(B,) mass scale of a problem's plans: unbalanced plans may carry much more or less than a and b."""
    if case.solver != "unbalanced":
        return case.total_mass
    return torch.maximum(case.total_mass, plan.sum(dim=(-2, -1)))


def iterate_tol(case, n_iters, mass=None):
    """(B,) allowance on ``|P1 - P2|_1`` between two computations of the same iterates.

    Rounding of the potentials (``u * arg_scale * eps``) moves plan entries by
    ``u * arg_scale`` relatively, and may build up over the iterations. Returns
    None when that allowance is too large for the comparison to say anything.
    """
    mass = case.total_mass if mass is None else mass
    tol = mass * case.u * 16 * case.iter_scale * (1 + n_iters) + slack(case, mass)
    return None if bool((tol > 0.2 * mass).any()) else tol


def snapshot(*tensors):
    """Clones and version counters of the inputs."""
    return [(t, t.detach().clone(), t._version) for t in tensors if t is not None]


def assert_unchanged(snap):
    """Values (NaN where NaN was) and version counters of :func:`snapshot`'s tensors are as they were."""
    for k, (t, before, version) in enumerate(snap):
        assert t._version == version, f"input {k} was modified in place"
        x = t.detach()
        nan = torch.isnan(before) if before.is_floating_point() else torch.zeros(before.shape, dtype=bool)
        same_nan = torch.equal(torch.isnan(x), nan) if x.is_floating_point() else True
        assert same_nan and torch.equal(x[~nan], before[~nan]), f"input {k} values changed"


def l1(x):
    return x.abs().sum(dim=(-2, -1))


def _names(types):
    return "/".join(t.__name__ for t in types)


def outcome(case, fn):
    """Run ``fn``; returns the result, or None when it raised an allowed error. Checks the contract's
    expectation: ``"raise"`` needs ``case.error`` naming the problem, ``"solve"`` allows no exception."""
    solver = case.solver
    try:
        res = fn()
    except (ValueError, TypeError) as exc:
        count(solver, "clean outcome")
        assert case.expect != "solve", (
            f"a valid, feasible problem raised {type(exc).__name__}: {exc}")
        if case.expect == "raise":
            count(solver, "required ValueError/TypeError")
            assert isinstance(exc, case.error), (
                f"expected {_names(case.error)} ({case.why}), got {type(exc).__name__}: {exc}")
            msg = str(exc).lower()
            words = case.error_words + case.extras.get("alt_words", ())
            assert not case.error_words or any(w in msg for w in words), (
                f"the message should name {' or '.join(words)} ({case.why}): {exc}")
        OUTCOMES[(solver, f"raised ({case.expect})")] += 1
        if os.environ.get("OT_LOSSES_FUZZ_WHY"):
            OUTCOMES[(solver, f"raised: {case.why.split(' (')[0]}")] += 1
        return None
    except Exception as exc:  # noqa: BLE001 - any other exception breaks the contract
        raise AssertionError(f"{type(exc).__name__} is not a ValueError/TypeError ({case.expect}: "
                             f"{case.why}): {exc}") from exc
    count(solver, "clean outcome")
    if case.expect == "raise":
        count(solver, "required ValueError/TypeError")
    assert case.expect != "raise", f"expected {_names(case.error)} ({case.why}); got {res!r}"
    OUTCOMES[(solver, "solved")] += 1
    return res


# ----------------------------------------------------------------------------- the honest-result checks

def check_result(case, res, kw=None):
    """Every invariant of docs/api.md ("Honest results", solvers) that a single result must satisfy."""
    kw = case.kwargs if kw is None else kw
    solver = case.solver
    multi = solver == "multi"
    C, a, b = case.cost64, case.a64, case.b64
    B, N, M = C.shape
    allowed = torch.isfinite(C)
    eps = kw["eps"]

    # --- fields: types, shapes, dtypes, no NaN, infinities only where the contract allows them
    raw = res.assignment if multi else res.plan
    assert raw.dtype == case.compute_dtype, f"plan dtype {raw.dtype}, expected {case.compute_dtype}"
    P = plan_of(res)
    if case.extras.get("overflow"):   # unbalanced optimum not representable: at least no NaN anywhere
        assert not torch.isnan(P).any(), "plan has NaN"
        assert not torch.isnan(lead(res.marginal_error, case)).any(), "marginal_error has NaN"
        count(solver, "no NaN (overflowing unbalanced optimum)")
        return
    mass = plan_mass(case, P)
    sl = slack(case, mass)
    f, g = lead(res.f, case), lead(res.g, case)
    err, conv = lead(res.marginal_error, case), lead(res.converged, case)
    assert P.shape == (B, N, M) and f.shape == (B, N) and g.shape == (B, M), "result shapes"
    assert err.shape == (B,) and conv.shape == (B,) and conv.dtype == torch.bool, "error/converged shapes"
    # Far from convergence (e.g. an infeasible support) the potentials drift apart and the exponents
    # outgrow arg_scale: their spread (offset- and gauge-free) bounds the rounding then.
    spread = sum(_spread(x) for x in (f, g)) / eps
    if solver == "unbalanced":
        # No gauge: a plan entry is exp((f + g - C) / eps) with f and g themselves large while
        # the iterates drift (reach >> eps), so their magnitude sets the rounding.
        spread = torch.maximum(spread, sum(_magnitude(x) for x in (f, g)) / eps)
    sl = torch.maximum(sl, slack(case, mass) * spread / case.arg_scale)
    assert not torch.isnan(P).any(), "plan has NaN"
    assert torch.isfinite(P).all(), "plan has inf"
    assert not torch.isnan(f).any() and not torch.isnan(g).any(), "potentials have NaN"
    assert not torch.isnan(err).any() and bool((err >= 0).all()), f"marginal_error {err}"
    if multi:
        assert torch.isfinite(f).all(), "multi-assignment row potentials must be finite"
        edge = (b <= 1e-6 * N) | (b >= N * (1 - 1e-6))   # empty or full, up to rounding of k N b_j
        assert bool((torch.isfinite(g) | edge).all()), "infinite g on a column neither empty nor full"
    else:
        dead_r, dead_c = case.extras["dead_rows"], case.extras["dead_cols"]
        assert bool((torch.isfinite(f) | dead_r).all()), f"infinite f on a row that can carry mass: {f}"
        assert bool((torch.isfinite(g) | dead_c).all()), f"infinite g on a column that can carry mass: {g}"
        value, tc = lead(res.value, case), lead(res.transport_cost, case)
        assert value.shape == (B,) and torch.isfinite(value).all(), f"value {value}"
        assert torch.isfinite(tc).all(), f"transport_cost {tc}"
    count(solver, "finite results, documented dtype/shape")
    tol = kw.get("tol")
    if tol is None:
        assert res.n_iters == kw["n_iters"], f"n_iters {res.n_iters} != {kw['n_iters']} with tol=None"
    else:
        assert 1 <= res.n_iters <= kw["n_iters"], f"n_iters {res.n_iters}"
    count(solver, "n_iters")

    # --- plan >= 0, exactly 0 on forbidden entries and zero-mass lines
    assert bool((P >= 0).all()), f"negative plan entry {P.min()}"
    if multi:
        assert bool((P <= 1).all()), f"assignment entry above 1: {P.max()}"
    count(solver, "plan >= 0" + (" and <= 1" if multi else ""))
    assert bool((P[~allowed] == 0).all()), "plan is not exactly 0 on forbidden entries"
    if not multi:
        lp = lead(res.log_plan, case)
        assert bool(torch.isneginf(lp[~allowed]).all()), "log_plan is not -inf on forbidden entries"
        assert not torch.isnan(lp).any(), "log_plan has NaN"
        zero = (a == 0)[:, :, None] | (b == 0)[:, None, :]
        assert bool((P[zero] == 0).all()), "plan is not exactly 0 on a zero-mass line"
        inf_pot = ~torch.isfinite(f)[:, :, None] | ~torch.isfinite(g)[:, None, :]
        assert bool((P[inf_pot] == 0).all()), "plan is not 0 where a potential is infinite"
        count(solver, "plan exactly 0 on zero-mass lines and infinite potentials")
    count(solver, "plan exactly 0 on forbidden entries")

    # --- fields agree with their documented formulas
    if not multi:
        tc_ref = torch.where(P > 0, P * torch.where(allowed, C, 0.0), 0.0).sum(dim=(-2, -1))
        cmax = C[allowed].abs().max() if allowed.any() else torch.tensor(0.0)
        tc_tol = sl * cmax + 4 * case.u * torch.where(allowed, P * C.abs(), 0.0).sum(dim=(-2, -1)) + 1e-300
        assert bool(((tc - tc_ref).abs() <= tc_tol).all()), f"transport_cost {tc} != <plan, cost> {tc_ref}"
        count(solver, "transport_cost = <plan, cost>")
        if solver in ("bregman", "dummy"):
            pm = lead(res.mass, case)
            assert bool(((pm - P.sum(dim=(-2, -1))).abs() <= sl).all()), f"mass field {pm} != plan mass"
            count(solver, "mass field = plan mass")
    _check_formula(case, res, P, f, g, eps, mass)

    # --- the reported error, converged, and the constraints
    rows, cols = P.sum(-1), P.sum(-2)
    if tol is not None:
        assert bool((err[conv] <= tol * (1 + 1e-9)).all()), f"converged with marginal_error {err} > tol {tol}"
        count(solver, "converged => marginal_error <= tol")
    if solver in ("balanced", "multi") or (solver == "unbalanced" and all(map(math.isinf, _reach(kw)))):
        measured = (rows - a).abs().sum(-1) + (cols - b).abs().sum(-1)
        # Masses equal only to rounding (docs/api.md: 1e-5 relative; multi-assignment: sum b = 1, targets
        # k N b_j <= N): whether the solver rescales or clamps a side, the L1 error can move by that much.
        sl = sl + (a.sum(-1) - b.sum(-1)).abs() + ((b - N).clamp(min=0).sum(-1) if multi else 0.0)
        assert bool(((measured - err).abs() <= sl).all()), (
            f"reported marginal_error {err.tolist()} but the returned plan's L1 marginal error is "
            f"{measured.tolist()} (allowance {sl.tolist()})")
        count(solver, "marginal_error = L1 error of the returned plan")
        thr = torch.full_like(err, tol) if tol is not None else 1e-3 * (a.sum(-1) if not multi else mass)
        near = (err - thr).abs() <= 1e-6 * thr
        assert bool(((conv == (err <= thr)) | near).all()), f"converged {conv}, error {err}, threshold {thr}"
        count(solver, "converged = (marginal_error below threshold)")
        bound = torch.maximum(thr, err) + sl
        assert bool((measured[conv] <= bound[conv]).all()), (
            f"converged, but the plan's L1 marginal error is {measured.tolist()} > {bound.tolist()}")
        count(solver, "converged => marginals hold (rows and columns, float64 sums)")
    elif solver == "dummy":
        m = case.mass
        gaps = {"mass": (P.sum(dim=(-2, -1)) - m).abs(), "row caps": (rows - a).clamp(min=0).sum(-1),
                "column caps": (cols - b).clamp(min=0).sum(-1)}
        for name, gap in gaps.items():
            assert bool((gap <= err + sl).all()), (
                f"dummy: {name} violated by {gap.tolist()} > reported extended-marginal error {err.tolist()}")
        count(solver, "marginal_error bounds the partial constraints (mass, caps)")
        if bool(conv.any()):
            count(solver, "converged => mass and caps hold")
    elif solver == "bregman":
        # Rows are projected exactly, then g and the mass multiplier move by at most the reported change
        # (cost units) of the last iterations: row sums can exceed a by a factor exp(change / eps).
        rel = torch.expm1(20 * err / eps).clamp(max=1e30)
        m = case.mass
        ok = ((rows <= a * (1 + rel[:, None]) + sl[:, None]).all(-1)
              & (cols <= b * (1 + rel[:, None]) + sl[:, None]).all(-1)
              & ((P.sum(dim=(-2, -1)) - m).abs() <= m * rel + sl))
        assert bool(ok[conv].all()), (
            f"converged partial plan breaks the caps or the mass: rows {rows.tolist()} vs a {a.tolist()}, "
            f"columns {cols.tolist()} vs b {b.tolist()}, mass {P.sum(dim=(-2, -1)).tolist()} vs {m.tolist()}")
        if bool(conv.any()):
            count(solver, "converged => mass and caps hold")
    else:
        _check_unbalanced_fixed_point(case, kw, P, f, g, err, conv, eps)


def _spread(x):
    """(B,) max - min of the finite entries of each row of ``x``."""
    fin = torch.isfinite(x)
    hi = torch.where(fin, x, -math.inf).amax(-1)
    lo = torch.where(fin, x, math.inf).amin(-1)
    return torch.where(fin.any(-1), hi - lo, 0.0)


def _magnitude(x):
    """(B,) largest finite ``|x|`` of each row of ``x``."""
    return torch.where(torch.isfinite(x), x.abs(), 0.0).amax(-1)


def _reach(kw):
    r = kw.get("reach")
    return (math.inf, math.inf) if r is None else (r, r) if not isinstance(r, tuple) else r


def _check_formula(case, res, P, f, g, eps, mass):
    """The plan is what the result's documentation says it is in terms of ``f`` and ``g``."""
    solver = case.solver
    C, a, b = case.cost64, case.a64, case.b64
    allowed = torch.isfinite(C)
    fin = [x[torch.isfinite(x)].abs().max() if torch.isfinite(x).any() else torch.tensor(0.0)
           for x in (f, g, C)]
    u_pot = float(torch.finfo(res.f.dtype).eps)
    tol = mass * u_pot * 8 * (sum(float(x) for x in fin) / eps + 60) + slack(case, mass)
    if bool((tol > 0.5 * mass).any()):
        return   # potentials too large for their rounding to say anything about the plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logit = (f[:, :, None] + g[:, None, :] - C) / eps
    if solver == "multi":
        doc = torch.where(allowed, torch.sigmoid(logit), 0.0)
        what = "sigmoid((f_i + g_j - C_ij) / eps)"
    elif solver == "bregman":
        doc = torch.exp(logit)
        what = "exp((f_i + g_j - C_ij) / eps) (mass multiplier folded into f)"
    else:
        doc = a[:, :, None] * b[:, None, :] * torch.exp(logit)
        what = "a_i b_j exp((f_i + g_j - C_ij) / eps)"
    if solver != "multi":
        dead = ~allowed | (a == 0)[:, :, None] | (b == 0)[:, None, :]
        doc = torch.where(dead, 0.0, doc)
    assert not torch.isnan(doc).any(), f"f, g give NaN in {what}"
    gap = l1(P - doc)
    assert bool((gap <= tol).all()), f"plan differs from {what} by {gap.tolist()} (L1) > {tol.tolist()}"
    count(solver, "plan = documented formula of f, g")


def _check_unbalanced_fixed_point(case, kw, P, f, g, err, conv, eps):
    """Converged unbalanced plans satisfy the optimality conditions r_i = a_i exp(-f_i / rho_a) and
    c_j = b_j exp(-g_j / rho_b) up to the reported potential change (generous factor: it is measured over
    the last check interval) and rounding."""
    if not bool(conv.any()):
        return
    rho_a, rho_b = _reach(kw)
    a, b = case.a64, case.b64
    # Rounding: unbalanced OT is not shift invariant, so potentials and exponents carry the rounding of
    # the cost's magnitude (not only of its range), and f / rho amplifies the rounding of f.
    big = sum(float(x[torch.isfinite(x)].abs().max()) if torch.isfinite(x).any() else 0.0
              for x in (f, g, case.cost64))
    rnd = 8 * case.u * (big * (1 / eps + 1 / min(rho_a, rho_b)) + case.arg_scale)
    allow = 20 * err / eps + rnd + 1e-9
    for marg, pot, rho, dim, name in ((a, f, rho_a, -1, "rows"), (b, g, rho_b, -2, "columns")):
        s = P.sum(dim)
        # Sums in the subnormal range have lost their relative precision (fp32: below ~1e-32).
        ok = (marg > 0) & (s > torch.finfo(case.compute_dtype).tiny * 1e6) & torch.isfinite(pot)
        penalty = 0.0 if math.isinf(rho) else pot / rho
        resid = torch.where(ok, (s.clamp(min=1e-300) / marg).log() + penalty, 0.0)
        bad = resid.abs().amax(-1) > allow
        assert not bool((bad & conv).any()), (
            f"converged unbalanced plan is not a fixed point on its {name}: residual "
            f"{resid.abs().amax(-1).tolist()} > {allow.tolist()}")
    count(case.solver, "converged => unbalanced optimality (fixed point)")


# ----------------------------------------------------------------------------- main property

def _extra_warm(case, res):
    """init=(f, g) from a previous result continues the iteration: same plan as one longer run."""
    n_tot = min(case.spec.n_iters, 40)
    n1, n2 = max(1, n_tot // 2), max(1, n_tot - n_tot // 2)
    first = solve(case, tol=None, n_iters=n1)
    kw = dict(case.kwargs, tol=None, n_iters=n2)
    try:
        warm = solve(case, tol=None, n_iters=n2, init=(first.f, first.g))
    except (ValueError, TypeError) as exc:
        raise AssertionError(f"warm start from the library's own result raised: {exc}") from exc
    check_result(case, warm, kw)
    whole = solve(case, tol=None, n_iters=n1 + n2)
    tol = iterate_tol(case, n1 + n2, plan_mass(case, plan_of(whole)))
    if tol is not None:
        gap = l1(plan_of(warm) - plan_of(whole))
        assert bool((gap <= tol).all()), f"warm start {n1}+{n2} != {n1 + n2} iterations: L1 {gap.tolist()}"
    count(case.solver, "warm start = continued iteration")


def _extra_grad(case, res):
    """Envelope gradient of value w.r.t. the cost is the plan; gradients w.r.t. a, b are never NaN.

    The dummy method's default ``dummy_cost`` is ``100 max C``: value then also depends on the largest
    entry, whose gradient carries that term (issue 9, class 8); those entries are left out.
    """
    leaf = case.cost.detach().clone().requires_grad_(True)
    a = None if case.a is None else case.a.detach().clone().requires_grad_(True)
    b = None if case.b is None else case.b.detach().clone().requires_grad_(True)
    out = solve(case, cost=leaf, a=a, b=b)
    try:
        out.value.sum().backward()
    except ValueError as err:  # a float16 cost whose gradient (the plan) exceeds float16's range
        top = torch.finfo(case.cost.dtype).max
        assert "d value / d cost" in str(err) and float(plan_of(out).abs().max()) > top, str(err)
        count(case.solver, "gradient beyond the cost's dtype: ValueError")
        return
    G = leaf.grad.detach().double().reshape(case.cost64.shape)
    assert not torch.isnan(G).any(), "d value / d cost has NaN"
    P = plan_of(out)
    mass = plan_mass(case, P)
    # Two computations of the plan (the gradient's may take the reference exp path when `.plan` took
    # over the fast path's kernel), each within the rounding slack.
    tol = 2 * slack(case, mass) + 4 * float(torch.finfo(case.cost.dtype).eps) * mass
    diff = G - P
    if case.solver == "dummy":
        C = case.cost64
        cmax = torch.where(torch.isfinite(C), C, -math.inf).amax(dim=(-2, -1), keepdim=True)
        diff = torch.where(C == cmax, 0.0, diff)
    gap = l1(diff)
    assert bool((gap <= tol).all()), f"d value / d cost differs from the plan by {gap.tolist()} (L1)"
    for name, x in (("a", a), ("b", b)):
        if x is not None and x.grad is not None:
            assert not torch.isnan(x.grad).any(), f"d value / d {name} has NaN: {x.grad}"
    count(case.solver, "envelope gradient = plan, no NaN gradients")


def _extra_unroll(case, res):
    """The torch fast path reproduces the log-domain iterates (grad="unroll" runs the reference steps)."""
    n = min(case.spec.n_iters, 30)
    fast = solve(case, tol=None, n_iters=n, backend="torch")
    ref = solve(case, tol=None, n_iters=n, backend="torch", grad="unroll")
    tol = iterate_tol(case, n, plan_mass(case, plan_of(ref)))
    if tol is None:
        return
    gap = l1(plan_of(fast) - plan_of(ref))
    assert bool((gap <= tol).all()), (
        f"fast path and log-domain iterates differ after {n} iterations: L1 {gap.tolist()} > {tol.tolist()}")
    count(case.solver, "fast path = log-domain iterates")


def _layout(case):
    """Non-contiguous, transposed or expanded inputs give the result of their contiguous copies."""
    n = min(case.spec.n_iters, 40)
    contiguous = [None if x is None else x.contiguous().clone() for x in (case.cost, case.a, case.b)]
    got = solve(case, tol=None, n_iters=n)
    ref = solve(case, cost=contiguous[0], a=contiguous[1], b=contiguous[2], tol=None, n_iters=n)
    tol = iterate_tol(case, n, plan_mass(case, plan_of(ref)))
    if tol is None:
        return
    gap = l1(plan_of(got) - plan_of(ref))
    assert bool((gap <= tol).all()), f"{case.spec.layout} input != its contiguous copy: L1 {gap.tolist()}"
    count(case.solver, "layout invariance")


def run_contract(case, test="contract"):
    """One problem: the call's outcome, the honest-result checks, the drawn extra property, the layout
    property for non-contiguous inputs, and untouched inputs throughout."""
    PROBLEMS[(test, case.solver)] += 1
    snap = snapshot(case.cost, case.a, case.b)
    res = outcome(case, lambda: solve(case))
    assert_unchanged(snap)
    count(case.solver, "inputs unchanged")
    if res is None:
        return
    check_result(case, res)
    assert_unchanged(snap)
    if bool(lead(res.converged, case).all()):
        OUTCOMES[(case.solver, "converged")] += 1
    extra, solver = ("" if case.extras.get("overflow") else case.spec.extra), case.solver
    if extra == "warm" and solver in ("balanced", "unbalanced"):
        _extra_warm(case, res)
    elif extra == "grad" and solver != "multi":
        _extra_grad(case, res)
    elif extra == "unroll" and solver != "multi":
        _extra_unroll(case, res)
    if case.spec.layout != "contiguous" and not case.extras.get("overflow"):
        _layout(case)
    assert_unchanged(snap)


@pytest.mark.parametrize("solver", SOLVERS)
@fuzz_settings(ci=60, fuzz=1700)
@given(data=st.data())
def test_contract(solver, data):
    spec = data.draw(specs(solver=solver), label="spec")
    run_contract(build(spec))


# ----------------------------------------------------------------------------- shift invariance

# kind -> solvers. Where the iterates are the same in exact arithmetic (balanced constant and row shifts,
# bregman constants, column shifts with init=(0, s)), plans are compared after a few iterations; the rest
# (dummy and multi-assignment constants, plain column shifts) at convergence.
SHIFTS = {
    "constant": ("balanced", "bregman", "dummy", "multi"),
    "rows": ("balanced",),
    "columns_init": ("balanced",),
    "columns": ("balanced",),
}


def _shift_values(kind, rng, mag, shape):
    """Integers (exact in every dtype's range used here) to add to the whole cost, rows or columns."""
    B, N, M = shape
    if kind == "constant":
        return np.full((B, 1, 1), float(rng.choice([-1, 1]) * mag))
    size = (B, N, 1) if kind == "rows" else (B, 1, M)
    return np.round(rng.choice([-1.0, 1.0], size=size) * rng.choice([0.0, 1.0, mag], size=size))


@pytest.mark.parametrize("kind", list(SHIFTS))
@fuzz_settings(ci=12, fuzz=160)
@given(data=st.data())
def test_shift_invariance(kind, data):
    """docs/api.md, Honest results: adding a constant to the whole cost (balanced: to rows or columns) leaves
    plans unchanged up to rounding of the differences, in fp32 too. The reference is the same dtype's
    solve of ``(C + s) - s`` computed exactly, i.e. the shifted cost's own differences."""
    solver = data.draw(st.sampled_from(SHIFTS[kind]), label="solver")
    fixed = kind in ("rows", "columns_init") or (kind == "constant" and solver in ("balanced", "bregman"))
    dtypes = ["f64"] if kind == "columns_init" else ["f64", "f32", "f32", "bf16", "f16"]
    pins = dict(solver=solver, dtype=st.sampled_from(dtypes), offset=0.0, invalid="", extra="",
                layout="contiguous", forbid=st.sampled_from(["none", "none", "keep", "diag", "zero_line"]),
                tol_rel=None)
    if fixed:
        pins.update(n_iters=st.sampled_from([1, 2, 3, 10, 40]))
    else:
        pins.update(n_iters=1500, eps_rel=st.sampled_from([0.05, 0.1, 0.3, 1.0, 10.0]),
                    structure=st.sampled_from(["uniform", "similarity", "sqeuclid"]))
    spec = data.draw(specs(**pins), label="spec")
    mag = data.draw(st.sampled_from([1.0, 1e3, 1e6]), label="shift magnitude")
    case = build(spec)
    PROBLEMS[("shift_" + kind, solver)] += 1
    if case.expect != "solve":
        OUTCOMES[(solver, "shift: skipped (not a feasible problem)")] += 1
        return
    rng = np.random.default_rng(spec.seed + 1)
    C = case.cost64
    s = _shift_values(kind, rng, mag, C.shape)
    dtype = case.cost.dtype
    shifted = torch.tensor(C.numpy() + s, dtype=dtype)
    diff = shifted.double() - torch.tensor(s)
    same = diff.to(dtype)
    if not (torch.isfinite(shifted) == torch.isfinite(C)).all() or not torch.equal(same.double(), diff):
        OUTCOMES[(solver, "shift: skipped (overflow or inexact)")] += 1   # f16 overflow at 1e6
        return
    if not case.batched:
        shifted, same = shifted[0], same[0]
    ref_case = build(spec)
    ref_case.cost = same
    fp._views(ref_case)
    kw = dict(case.kwargs)
    init_s = init_0 = None
    init_scale = 0.0   # potentials of the size of the shift are the caller's (init=): their rounding counts
    if kind == "columns_init":   # with g shifted like the columns, the iterates are the same in exact maths
        zeros = torch.zeros(C.shape[:2], dtype=F64)
        s_cols = torch.tensor(s[:, 0, :])
        lead_ = (lambda x: x) if case.batched else (lambda x: x[0])
        init_s, init_0 = (lead_(zeros), lead_(s_cols)), (lead_(zeros), lead_(torch.zeros_like(s_cols)))
        init_scale = float(np.abs(s).max()) / case.eps
    if fixed:
        got = outcome(case, lambda: solve(case, cost=shifted, **({"init": init_s} if init_s else {})))
        ref = outcome(ref_case, lambda: solve(ref_case, cost=same, **({"init": init_0} if init_0 else {})))
        ref_case.arg_scale += init_scale
        ref_case.iter_scale += init_scale
        check_result(ref_case, ref)
        tol = iterate_tol(ref_case, kw["n_iters"])
        if tol is None:
            return
        gap = l1(plan_of(got) - plan_of(ref))
        assert bool((gap <= tol).all()), (
            f"{kind} shift of {mag:g} changes the plan after {kw['n_iters']} iterations: L1 {gap.tolist()} "
            f"> {tol.tolist()}")
    else:
        # Tight, but reachable: fp32 marginals cannot be met much below u * arg_scale.
        tol_rel = 1e-10 if dtype == F64 else max(1e-5, 50 * case.u * case.arg_scale)
        tol = tol_rel * float(case.total_mass.max())
        kw = dict(kw, tol=tol)
        ref = outcome(ref_case, lambda: solve(ref_case, cost=same, tol=tol))
        check_result(ref_case, ref, kw)
        if not bool(lead(ref.converged, case).all()):
            OUTCOMES[(solver, "shift: skipped (not converged)")] += 1
            return
        # Not a failure: column shifts (and, for the dummy and multi-assignment iterations, constants) are
        # a different starting point, e.g. init g = -s, from which small eps may take long to recover.
        got = outcome(case, lambda: solve(case, cost=shifted, tol=tol))
        if not bool(lead(got.converged, case).all()):
            OUTCOMES[(solver, "shift: skipped (shifted problem not converged)")] += 1
            return
        e1, e2 = lead(got.marginal_error, case), lead(ref.marginal_error, case)
        allow = 50 * (e1 + e2) + 2 * slack(ref_case) + 2 * tol
        gap = l1(plan_of(got) - plan_of(ref))
        assert bool((gap <= allow).all()), (
            f"{kind} shift of {mag:g} changes the converged plan: L1 {gap.tolist()} > {allow.tolist()}")
    # The shifted solve is judged by the same honesty checks (with the shifted cost's own views).
    got_case = build(spec)
    got_case.cost = shifted
    fp._views(got_case)
    got_case.arg_scale += init_scale
    check_result(got_case, got, kw)
    count(solver, f"shift invariance ({kind}{', fp32/16' if dtype != F64 else ''})")


# ----------------------------------------------------------------------------- POT in float64

POT_EPS = st.sampled_from([0.05, 0.1, 0.3, 1.0, 10.0])
# Forbidden entries become max C + 40 eps for POT: negligible for balanced and partial plans (bounded
# potentials), not for unbalanced ones, whose potentials grow with the mass they create.
POT_FORBID = {"unbalanced": ["none", "zero_line"]}
POT_RTOL = {"balanced": 1e-6, "bregman": 1e-6, "unbalanced": 1e-5}   # docs/api.md states 1e-6 for partial


def _pot_reference(case, kw, keep_r, keep_c):
    """POT's plan on the problem without its zero-mass lines (they carry nothing); None if POT does not
    converge. Forbidden entries become ``max C + 40 eps`` (POT cannot take +inf)."""
    import ot
    C = case.cost64[0][keep_r][:, keep_c].clone()
    a, b = case.a64[0][keep_r].numpy(), case.b64[0][keep_c].numpy()
    eps = kw["eps"]
    fin = torch.isfinite(C)
    if case.solver != "unbalanced":   # both problems are invariant to a constant: spare POT the offset
        C = C - C[fin].min()
    C = torch.where(fin, C, C[fin].max() + 40 * eps).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.solver == "balanced":
            P = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-14, warn=False)
            ok = np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum() <= 1e-10 * a.sum()
        elif case.solver == "unbalanced":
            P, log = ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, kw["reach"], reg_type="kl", log=True,
                                                       method="sinkhorn_stabilized", numItermax=20000,
                                                       stopThr=1e-14)
            ok = len(log["err"]) > 0 and log["err"][-1] < 1e-12
        else:
            method = "sinkhorn" if eps >= 0.005 * max(float(np.ptp(C)), 1e-300) and min(C.shape) > 1 \
                else "sinkhorn_log"
            mass = min(kw["mass"], a.sum(), b.sum())   # dropping zero-mass lines re-rounds the sums
            P, log = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mass, method=method,
                                                             numItermax=20000, stopThr=1e-14, log=True)
            ok = log["err"][-1] < 1e-12
    return P if ok and np.isfinite(P).all() else None


@pytest.mark.parametrize("solver", ["balanced", "unbalanced", "bregman"])
@fuzz_settings(ci=15, fuzz=300)
@given(data=st.data())
def test_matches_pot(solver, data):
    """docs/api.md: the plans agree with POT in float64 where both converge (sinkhorn_log, sinkhorn_unbalanced
    with reg_type="kl", entropic_partial_wasserstein)."""
    pytest.importorskip("ot")
    rhos = st.sampled_from([1e-2, 0.1, 1.0, 10.0, 1e3])
    spec = data.draw(specs(solver=solver, dtype="f64", marg_dtype="cost", batch=0, invalid="", extra="",
                           eps_rel=POT_EPS, tol_rel=None, n_iters=1, reach_rel=st.tuples(rhos, rhos),
                           offset=0.0 if solver == "unbalanced" else st.sampled_from([0.0, 1e3, -1e6]),
                           forbid=st.sampled_from(POT_FORBID.get(solver, ["none", "none", "keep", "diag",
                                                                          "zero_line", "random"]))),
                     label="spec")
    case = build(spec)
    PROBLEMS[("pot", solver)] += 1
    if case.expect != "solve":
        OUTCOMES[(solver, "pot: skipped (not a feasible problem)")] += 1
        return
    unit = float(case.total_mass.max()) if solver == "balanced" else spec.scale
    kw = dict(case.kwargs, n_iters=2000, tol=1e-12 * unit)
    ours = outcome(case, lambda: solve(case, n_iters=2000, tol=kw["tol"]))
    check_result(case, ours, kw)
    if not bool(ours.converged):
        OUTCOMES[(solver, "pot: skipped (ours not converged in 2000 iterations)")] += 1
        return
    keep_r, keep_c = case.a64[0] > 0, case.b64[0] > 0
    ref = _pot_reference(case, kw, keep_r, keep_c)
    if ref is None:
        OUTCOMES[(solver, "pot: skipped (POT did not converge)")] += 1
        return
    P = plan_of(ours)[0][keep_r][:, keep_c]
    assert_close(P, ref, POT_RTOL[solver], f"{solver} plan vs POT")
    count(solver, "agrees with POT (float64)")


# ----------------------------------------------------------------------------- batch == loop

@pytest.mark.parametrize("solver", SOLVERS)
@fuzz_settings(ci=8, fuzz=100)
@given(data=st.data())
def test_batch_equals_loop(solver, data):
    """A batched solve equals the loop of single solves (fixed iterations: tol would stop the batch when
    its last problem converges)."""
    spec = data.draw(specs(solver=solver, batch=st.sampled_from([2, 3]), invalid="", extra="", tol_rel=None,
                           n_iters=st.sampled_from([1, 2, 5, 20, 60])), label="spec")
    case = build(spec)
    PROBLEMS[("batch", solver)] += 1
    if case.expect != "solve":
        OUTCOMES[(solver, "batch: skipped (not a feasible problem)")] += 1
        return
    res = outcome(case, lambda: solve(case))
    check_result(case, res)
    P, err = plan_of(res), lead(res.marginal_error, case)
    tol = iterate_tol(case, spec.n_iters, plan_mass(case, P))
    l1_error = solver in ("balanced", "multi", "dummy") or (
        solver == "unbalanced" and all(map(math.isinf, _reach(case.kwargs))))   # reach=inf: balanced
    err_units = slack(case, plan_mass(case, P)) if l1_error else (
        16 * case.u * case.arg_scale * case.eps * torch.ones_like(err))
    for p in range(case.cost.shape[0]):
        a = None if case.a is None else case.a[p] if case.a.ndim == 2 else case.a
        b = None if case.b is None else case.b[p] if case.b.ndim == 2 else case.b
        single = solve(case, cost=case.cost[p], a=a, b=b)
        if tol is not None:
            gap = float(l1(plan_of(single)[0] - P[p]))
            assert gap <= float(tol[p]), f"problem {p} of the batch != its single solve: L1 {gap:.3e}"
        e = float(single.marginal_error)
        assert abs(e - float(err[p])) <= float(err_units[p]) + 1e-6 * max(e, float(err[p])), (
            f"problem {p}: marginal_error {float(err[p]):.6e} in the batch, {e:.6e} alone")
    count(solver, "batch = loop of single solves")


# ----------------------------------------------------------------------------- triton == torch

# The interpreter evaluates masked lanes (inf - inf) in numpy: results are checked, the warnings are noise.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("solver", SOLVERS)
@fuzz_settings(ci=3, fuzz=25)
@given(data=st.data())
def test_triton_matches_torch(solver, data):
    """The same call returns the same result whatever the backend (triton under TRITON_INTERPRET=1; tiny
    shapes and few iterations: the interpreter runs one program at a time in numpy)."""
    pytest.importorskip("triton")
    m_min = 2 if solver == "multi" else 1
    spec = data.draw(specs(solver=solver, n=st.integers(1, 4), m=st.integers(m_min, 4),
                           batch=st.sampled_from([0, 0, 2]), dtype=st.sampled_from(["f64", "f32", "bf16"]),
                           tol_rel=None, n_iters=st.sampled_from([1, 2, 3, 5]), extra=""), label="spec")
    case = build(spec)
    PROBLEMS[("triton", solver)] += 1
    ref = outcome(case, lambda: solve(case, backend="torch"))
    got = outcome(case, lambda: solve(case, backend="triton"))
    assert (ref is None) == (got is None), "one backend raised, the other did not"
    if got is None:
        return
    check_result(case, ref)
    check_result(case, got)
    tol = iterate_tol(case, spec.n_iters, plan_mass(case, plan_of(ref)))
    if tol is not None:
        gap = l1(plan_of(got) - plan_of(ref))
        assert bool((gap <= tol).all()), f"triton != torch: L1 {gap.tolist()} > {tol.tolist()}"
    count(solver, "triton = torch")
