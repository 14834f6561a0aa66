"""Input validation (docs/api.md, "Errors") and the no-mutation guarantee, for every entry point."""
import re

import pytest
import torch

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn
from strategies import assert_unchanged, snapshot

F64 = torch.float64
N, M = 4, 5


def _sinkhorn(cost, a=None, b=None, **kw):
    return sinkhorn(cost, a, b, **kw)


def _unbalanced(cost, a=None, b=None, **kw):
    return sinkhorn(cost, a, b, reach=kw.pop("reach", 1.0), **kw)


def _partial(cost, a=None, b=None, **kw):
    return partial_ot(cost, a, b, mass=kw.pop("mass", 0.5), **kw)


def _dummy(cost, a=None, b=None, **kw):
    return partial_ot(cost, a, b, mass=kw.pop("mass", 0.5), method="dummy", **kw)


def _multi(cost, a=None, b=None, **kw):
    assert a is None, "multi-assignment has no row marginal"
    return multi_assignment_sinkhorn(cost, kw.pop("k", 2), b, **kw)


ENTRIES = {"sinkhorn": _sinkhorn, "unbalanced": _unbalanced, "partial": _partial, "dummy": _dummy,
           "multi": _multi}
WITH_A = ["sinkhorn", "unbalanced", "partial", "dummy"]
ALL = list(ENTRIES)


def cost_():
    return torch.rand(N, M, dtype=F64)


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def _raises(exc, pattern, fn, *args, **kw):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kw)
    return str(info.value)


# ------------------------------------------------------------------ cost

@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("shape", [(M,), (2, 2, N, M), ()], ids=str)
def test_cost_wrong_ndim(entry, shape):
    msg = _raises(ValueError, "cost", ENTRIES[entry], torch.rand(shape, dtype=F64))
    assert str(tuple(shape)) in msg or "shape" in msg, f"message should give the received shape: {msg}"


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_cost_non_floating_dtype(entry, dtype):
    cost = torch.ones(N, M, dtype=dtype)
    _raises((TypeError, ValueError), "cost", ENTRIES[entry], cost)


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_cost_nan_or_minus_inf(entry, bad):
    cost = cost_()
    cost[1, 2] = bad
    _raises(ValueError, "cost", ENTRIES[entry], cost)


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("axis", ["row", "column"])
def test_all_forbidden_row_or_column_with_mass(entry, axis):
    cost = cost_()
    if axis == "row":
        cost[2] = float("inf")
    else:
        cost[:, 3] = float("inf")
    _raises(ValueError, "cost|forbidden", ENTRIES[entry], cost)


@pytest.mark.parametrize("entry", ["sinkhorn", "unbalanced", "partial", "dummy"])
def test_all_forbidden_row_without_mass_is_allowed(entry):
    cost = cost_()
    cost[2] = float("inf")
    a = torch.tensor([0.3, 0.3, 0.0, 0.4], dtype=F64)
    res = ENTRIES[entry](cost, a, None, n_iters=50)
    assert (res.plan[2] == 0).all() and torch.isfinite(res.plan).all()


# ------------------------------------------------------------- marginals

def _marg_kwargs(entry, which, value):
    if which == "a":
        return (value, None)
    return (None, value)


@pytest.mark.parametrize("entry,which", [(e, "a") for e in WITH_A] + [(e, "b") for e in ALL])
@pytest.mark.parametrize("case", ["short", "long", "2d-mismatch", "3d", "batch-mismatch"])
def test_marginal_wrong_shape(entry, which, case):
    size = N if which == "a" else M
    cost = cost_()
    if case == "short":
        w = uniform(size - 1)
    elif case == "long":
        w = uniform(size + 1)
    elif case == "2d-mismatch":       # batched marginal for an unbatched cost of another batch size
        w = uniform(size).repeat(3, 1)
    elif case == "3d":
        w = uniform(size).reshape(1, 1, size)
    else:                             # batched cost (2, N, M), marginal (3, size)
        cost = torch.rand(2, N, M, dtype=F64)
        w = uniform(size).repeat(3, 1)
    if case == "2d-mismatch":
        cost = torch.rand(2, N, M, dtype=F64)[0]
    a, b = _marg_kwargs(entry, which, w)
    _raises(ValueError, rf"\b{which}\b", ENTRIES[entry], cost, a, b)


@pytest.mark.parametrize("entry,which", [(e, "a") for e in WITH_A] + [(e, "b") for e in ALL])
def test_marginal_non_floating_dtype(entry, which):
    size = N if which == "a" else M
    a, b = _marg_kwargs(entry, which, torch.ones(size, dtype=torch.int64))
    _raises((TypeError, ValueError), rf"\b{which}\b", ENTRIES[entry], cost_(), a, b)


@pytest.mark.parametrize("entry,which", [(e, "a") for e in WITH_A] + [(e, "b") for e in ALL])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1], ids=["nan", "inf", "negative"])
def test_marginal_bad_values(entry, which, bad):
    size = N if which == "a" else M
    w = uniform(size)
    w[1] = bad
    if bad == -0.1:
        w[0] += 0.1 + 1.0 / size   # keep the total mass unchanged: the error must be about the sign
    a, b = _marg_kwargs(entry, which, w)
    _raises(ValueError, rf"\b{which}\b", ENTRIES[entry], cost_(), a, b)


def test_unequal_mass_in_balanced_problem():
    a = uniform(N)
    b = uniform(M) * 1.01
    msg = _raises(ValueError, r"\ba\b|\bb\b|mass", sinkhorn, cost_(), a, b)
    assert re.search(r"\ba\b", msg) and re.search(r"\bb\b", msg), f"message should name a and b: {msg}"
    # within the relative tolerance 1e-5: accepted
    res = sinkhorn(cost_(), a, uniform(M) * (1 + 2e-6), n_iters=5)
    assert torch.isfinite(res.plan).all()
    # unbalanced problems take any masses
    res = sinkhorn(cost_(), a, b * 3, reach=1.0, n_iters=5)
    assert torch.isfinite(res.plan).all()


def test_unequal_mass_batched():
    a = torch.stack([uniform(N), uniform(N)])
    b = torch.stack([uniform(M), uniform(M) * 0.5])
    _raises(ValueError, r"\ba\b|\bb\b|mass", sinkhorn, torch.rand(2, N, M, dtype=F64), a, b)


@pytest.mark.parametrize("entry", ["sinkhorn", "partial"])
def test_different_devices(entry):
    a = uniform(N).to("meta")
    msg = _raises((ValueError, TypeError), r"\ba\b|device", ENTRIES[entry], cost_(), a, None)
    assert "device" in msg or "meta" in msg, msg


def test_different_devices_multi():
    b = uniform(M).to("meta")
    _raises((ValueError, TypeError), r"\bb\b|device", multi_assignment_sinkhorn, cost_(), 2, b)


@pytest.mark.parametrize("entry", ALL)
def test_shapes_checked_before_values(entry):
    cost = cost_()
    cost[0, 0] = float("nan")
    which = "a" if entry in WITH_A else "b"
    w = uniform((N if which == "a" else M) + 2)
    a, b = _marg_kwargs(entry, which, w)
    msg = _raises(ValueError, rf"\b{which}\b", ENTRIES[entry], cost, a, b)
    assert "nan" not in msg.lower(), msg


# --------------------------------------------------------------- scalars

@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan")], ids=str)
def test_eps_not_positive(entry, eps):
    _raises(ValueError, "eps", ENTRIES[entry], cost_(), eps=eps)


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("n_iters", [0, -3])
def test_n_iters_below_one(entry, n_iters):
    _raises(ValueError, "n_iters", ENTRIES[entry], cost_(), n_iters=n_iters)


@pytest.mark.parametrize("method", ["bregman", "dummy"])
@pytest.mark.parametrize("mass", [0.0, -0.2, 0.8 + 1e-3, 2.0, float("nan")], ids=str)
def test_partial_mass_out_of_range(method, mass):
    a = uniform(N)
    b = uniform(M) * 0.8          # min(sum a, sum b) = 0.8
    _raises(ValueError, "mass", partial_ot, cost_(), a, b, mass=mass, method=method)


def test_partial_full_mass_is_allowed():
    res = partial_ot(cost_(), uniform(N), uniform(M) * 0.8, mass=0.8, n_iters=5)
    assert torch.isfinite(res.plan).all()


def test_partial_unknown_method():
    _raises(ValueError, "method", partial_ot, cost_(), mass=0.5, method="exact")


@pytest.mark.parametrize("k", [0.0, 0.5, float(M), M + 1.0, float("nan")], ids=str)
def test_multi_k_out_of_range(k):
    _raises(ValueError, r"\bk\b", multi_assignment_sinkhorn, cost_(), k)


def test_multi_column_capacity_above_n():
    b = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=F64)   # k N b_0 = 2 * 4 * 0.6 = 4.8 > N = 4
    _raises(ValueError, r"\bk\b|\bb\b", multi_assignment_sinkhorn, cost_(), 2, b)


def test_multi_float_k_allowed():
    res = multi_assignment_sinkhorn(cost_(), 2.5, n_iters=5)
    assert torch.isfinite(res.assignment).all()


# -------------------------------------------------------- options, backends

@pytest.mark.parametrize("entry", ALL)
def test_unknown_backend(entry):
    _raises(ValueError, "backend", ENTRIES[entry], cost_(), backend="cuda")


@pytest.mark.parametrize("entry", ALL)
def test_triton_backend_where_it_cannot_run(entry, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # CPU tensors without the interpreter
    _raises(ValueError, "triton|backend", ENTRIES[entry], cost_(), backend="triton")


@pytest.mark.parametrize("entry", ["sinkhorn", "unbalanced", "partial", "dummy"])
def test_unroll_with_triton_backend(entry, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # triton could run: the error is about grad
    _raises(ValueError, "grad", ENTRIES[entry], cost_(), grad="unroll", backend="triton")


@pytest.mark.parametrize("entry", ALL)
def test_unknown_grad_mode(entry):
    _raises(ValueError, "grad", ENTRIES[entry], cost_(), grad="implicit")


@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("bad", ["f-short", "g-long", "batched"])
def test_init_wrong_shape(reach, bad):
    f, g = torch.zeros(N, dtype=F64), torch.zeros(M, dtype=F64)
    if bad == "f-short":
        f = f[:-1]
    elif bad == "g-long":
        g = torch.zeros(M + 1, dtype=F64)
    else:
        f, g = f.repeat(3, 1), g.repeat(3, 1)
    _raises(ValueError, "init", sinkhorn, cost_(), init=(f, g), reach=reach)


# ----------------------------------------------------------- no mutation

def _touch(res):
    """Materialise every lazy field of a result."""
    out = []
    for name in ("plan", "log_plan", "value", "transport_cost", "mass", "assignment", "f", "g",
                 "marginal_error", "converged"):
        if hasattr(type(res), name) or name in getattr(res, "__dataclass_fields__", {}):
            out.append(getattr(res, name))
    return out


def _inputs(batched, with_inf, requires_grad):
    shape = (2, N, M) if batched else (N, M)
    cost = torch.rand(shape, dtype=F64)
    if with_inf:
        cost[..., 0, 1] = float("inf")
    a = torch.rand(shape[:-1], dtype=F64) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = torch.rand(shape[:-2] + (M,), dtype=F64) + 0.1
    b = b / b.sum(-1, keepdim=True)
    if requires_grad:
        cost.requires_grad_(True)
        a.requires_grad_(True)
        b.requires_grad_(True)
    return cost, a, b


CALLS = {
    "sinkhorn": lambda c, a, b, grad: sinkhorn(c, a, b, eps=0.1, n_iters=20, grad=grad),
    "sinkhorn-tol": lambda c, a, b, grad: sinkhorn(c, a, b, eps=0.1, n_iters=200, tol=1e-6, grad=grad),
    "sinkhorn-schedule": lambda c, a, b, grad: sinkhorn(c, a, b, eps=0.1, n_iters=5, eps_schedule=[1.0, 0.5],
                                                        grad=grad),
    "unbalanced": lambda c, a, b, grad: sinkhorn(c, a, b * 2, eps=0.1, n_iters=20, reach=0.5, grad=grad),
    "unbalanced-2": lambda c, a, b, grad: sinkhorn(c, a, b, eps=0.1, n_iters=20, reach=(0.5, 2.0), grad=grad),
    "partial": lambda c, a, b, grad: partial_ot(c, a, b, mass=0.5, eps=0.1, n_iters=20, grad=grad),
    "dummy": lambda c, a, b, grad: partial_ot(c, a, b, mass=0.5, eps=0.1, n_iters=20, method="dummy",
                                              grad=grad),
}


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("grad", ["envelope", "unroll", "none"])
@pytest.mark.parametrize("call", list(CALLS))
def test_inputs_are_never_modified(call, grad, batched):
    cost, a, b = _inputs(batched, with_inf=True, requires_grad=grad != "none")
    snap = snapshot(cost, a, b)
    res = CALLS[call](cost, a, b, grad)
    fields = _touch(res)
    assert_unchanged(snap)
    if grad != "none" and res.value.requires_grad:
        res.value.sum().backward()
        assert_unchanged(snap)
    assert all(not torch.isnan(t).any() for t in fields if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("reach", [None, 1.0])
def test_init_is_never_modified(reach):
    cost, a, b = _inputs(False, with_inf=False, requires_grad=False)
    first = sinkhorn(cost, a, b, eps=0.1, n_iters=10, reach=reach)
    f, g = first.f.clone(), first.g.clone()
    snap = snapshot(cost, a, b, f, g)
    _touch(sinkhorn(cost, a, b, eps=0.1, n_iters=10, reach=reach, init=(f, g)))
    assert_unchanged(snap)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_multi_assignment_inputs_are_never_modified(batched):
    cost, _, b = _inputs(batched, with_inf=True, requires_grad=False)
    b = torch.full_like(b, 1.0 / M)
    snap = snapshot(cost, b)
    _touch(multi_assignment_sinkhorn(cost, 2, b, eps=0.1, n_iters=20))
    _touch(multi_assignment_sinkhorn(cost, 1.5, None, eps=0.1, n_iters=20, tol=1e-5))
    assert_unchanged(snap)


@pytest.mark.parametrize("call", ["sinkhorn", "partial", "dummy"])
def test_low_precision_and_non_contiguous_inputs_untouched(call):
    base = torch.rand(M, N)
    cost = base.to(torch.float16).T      # a non-contiguous fp16 (N, M) view
    assert not cost.is_contiguous()
    snap = snapshot(cost)
    res = CALLS[call](cost, None, None, "none")
    ref = CALLS[call](cost.contiguous(), None, None, "none")
    assert_unchanged(snap)
    assert torch.allclose(res.plan, ref.plan, rtol=1e-6, atol=1e-9)
