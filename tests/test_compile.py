"""``torch.compile`` of the solvers and loss modules (torch backend) and host syncs (docs/api.md).

The compiled problems are tiny and traced with the ``eager`` / ``aot_eager``
backends: what is checked is that Dynamo captures one graph with no break
and no recompile, and that its results are the eager ones; Inductor's code
generation is PyTorch's concern (and slow on a small CPU).
"""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn
from ot_losses.losses import InfoNCELoss, L2RMLoss, MultiSKLoss, SwAMPLoss

F64 = torch.float64
ITERS = 4


def _solve(kind, cost, n_iters=ITERS, tol=None, **kw):
    """One solver call on the torch backend (``tol=None`` by default)."""
    common = dict(n_iters=n_iters, tol=tol, backend="torch", **kw)
    if kind == "sinkhorn":
        return sinkhorn(cost, eps=0.05, **common)
    if kind == "unbalanced":
        return sinkhorn(cost, eps=0.05, reach=1.0, **common)
    if kind in ("bregman", "dummy"):
        return partial_ot(cost, mass=0.5, eps=0.05, method=kind, **common)
    return multi_assignment_sinkhorn(cost, k=2, eps=0.1, **common)


KINDS = ("sinkhorn", "unbalanced", "bregman", "dummy", "multi")


def _outputs(kind, res):
    if kind == "multi":
        return res.assignment, res.f, res.g, res.marginal_error, res.converged
    return res.f, res.g, res.plan, res.value, res.marginal_error, res.converged


def _close(got, want, dtype):
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, **tol)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_solvers_compile_to_one_graph_and_match_eager(kind, dtype):
    torch.manual_seed(0)
    cost = torch.rand(2, 4, 5, dtype=dtype) + (100.0 if kind == "sinkhorn" else 0.0)  # offsets taken

    def fn(c):
        return _outputs(kind, _solve(kind, c))
    explained = dynamo.explain(fn)(cost)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(cost)
    _close(got, fn(cost), dtype)


@pytest.mark.parametrize("kind", ["sinkhorn", "unbalanced", "bregman", "dummy"])
def test_envelope_value_and_gradient_under_compile(kind):
    torch.manual_seed(1)
    cost = torch.rand(3, 4, dtype=F64)

    def fn(c):
        res = _solve(kind, c, grad="envelope")
        return res.value, res.plan

    def run(f):
        leaf = cost.clone().requires_grad_()
        value, plan = f(leaf)
        (grad,) = torch.autograd.grad(value, leaf)  # the backward of the compiled graph
        return value.detach(), plan, grad

    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    want = run(fn)
    _close(got, want, F64)
    if kind != "dummy":  # (the dummy's default dummy_cost = 100 max C adds to the largest entry's)
        torch.testing.assert_close(want[2], want[1])  # d value / d cost = plan


def test_a_nan_cost_under_compile_is_reported_not_converged():
    """Value checks need host reads: under compile they are skipped, and the result says so."""
    cost = torch.rand(3, 4, dtype=F64)
    cost[1, 2] = float("nan")
    for kind in KINDS:
        res = torch.compile(lambda c: _solve(kind, c), fullgraph=True, backend="eager")(cost)
        assert not bool(res.converged.any()), kind
        assert not bool(torch.isfinite(res.marginal_error).all()), kind
        with pytest.raises(ValueError, match="cost must not contain NaN"):
            _solve(kind, cost)  # eager: the usual error


# ----------------------------------------------------------------------------- host syncs
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
          torch.ops.aten.allclose.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: ``item``/``bool``/``float``/``int`` (one
    ``_local_scalar_dense`` each), ``equal``/``allclose`` and ``tolist`` (which bypasses dispatch)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t, *args, **kwargs):
            self.count += 1
            return self._tolist(t, *args, **kwargs)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads(fn):
    with HostReads() as reads:
        fn()
    return reads.count


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_at_most_two_host_syncs_per_call_and_none_per_iteration(kind, dtype):
    torch.manual_seed(2)
    cost = torch.rand(2, 6, 7, dtype=dtype)
    a, b = torch.full((6,), 1 / 6, dtype=dtype), torch.full((7,), 1 / 7, dtype=dtype)
    kw = {} if kind == "multi" else dict(a=a, b=b)  # marginals given: their checks are in the same read
    counts = [_reads(lambda: _solve(kind, cost, n_iters=n, **kw)) for n in (10, 30)]
    assert counts[0] == counts[1] <= 2, counts


@pytest.mark.parametrize("kind", KINDS)
def test_with_tol_one_host_sync_per_convergence_check(kind):
    torch.manual_seed(2)
    cost = torch.rand(2, 6, 7, dtype=F64)
    counts = [_reads(lambda: _solve(kind, cost, n_iters=n, tol=1e-14)) for n in (10, 30)]  # 1 and 3 checks
    final = 1 if kind == "unbalanced" else 0  # its plan's mass is checked after the last check
    assert counts == [1 + 1 + final, 1 + 3 + final], counts


def test_reads_counter_sees_every_kind_of_host_read():
    x = torch.ones(3)
    assert _reads(lambda: (x.sum().item(), bool(x.any()), float(x[0]), int(x[1]), x.tolist(),
                           torch.allclose(x, x), torch.equal(x, x))) == 7


# ----------------------------------------------------------------------------- loss modules
def _modules():
    torch.manual_seed(3)
    return {
        "swamp": (lambda: SwAMPLoss(6, n_prototypes=5, queue_size=8, n_iters=3, freeze_prototypes_steps=2,
                                    backend="torch"), lambda: (torch.randn(4, 6), torch.randn(4, 6))),
        "multi_sk": (lambda: MultiSKLoss((5, 7, 4), n_anchors=6, queue_size=12, n_iters=3, backend="torch"),
                     lambda: tuple(torch.randn(4, d) for d in (5, 7, 4, 4))),
        "info_nce": (lambda: InfoNCELoss(temperature=0.1), lambda: (torch.randn(4, 6), torch.randn(4, 6))),
        "l2rm": (lambda: L2RMLoss(4, n_iters=3, tol=None, backend="torch"), lambda: (torch.rand(4, 4),)),
    }


@pytest.mark.parametrize("name", ["swamp", "multi_sk", "info_nce", "l2rm"])
def test_loss_modules_compile_once_while_their_queues_fill(name):
    make, batch = _modules()[name]
    torch.manual_seed(4)
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    run = torch.compile(compiled, fullgraph=True, backend=counter)
    steps = [batch() for _ in range(5)]  # queues of 8 / 12 rows, batches of 4: filling, full, wrapping
    with torch._dynamo.config.patch(error_on_recompile=True):
        for inputs in steps:
            leaves = [x.clone().requires_grad_() for x in inputs]
            want = eager(*[x.clone().requires_grad_() for x in inputs])
            got = run(*leaves)
            got.backward()
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # one graph for every step
    for key, buf in eager.state_dict().items():
        if isinstance(buf, torch.Tensor):
            torch.testing.assert_close(compiled.state_dict()[key], buf, msg=key)


# ----------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("kind", ["sinkhorn", "unbalanced", "bregman", "dummy"])
def test_envelope_gradient_under_torch_func_grad_and_vmap_refused_naming_the_batch(kind):
    torch.manual_seed(5)
    cost = torch.rand(4, 5, dtype=F64)
    grad = torch.func.grad(lambda c: _solve(kind, c, n_iters=50, grad="envelope").value)(cost)
    leaf = cost.clone().requires_grad_()
    (want,) = torch.autograd.grad(_solve(kind, leaf, n_iters=50, grad="envelope").value, leaf)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"torch.func.vmap.*stacked \(B, N, M\) cost"):
        torch.func.vmap(lambda c: _solve(kind, c, grad="envelope").value)(torch.rand(3, 4, 5, dtype=F64))


def test_multi_assignment_refuses_vmap_naming_the_batch():
    with pytest.raises(ValueError, match=r"torch.func.vmap.*stacked \(B, N, M\) cost"):
        torch.func.vmap(lambda c: _solve("multi", c).assignment)(torch.rand(3, 4, 5, dtype=F64))


@pytest.mark.parametrize("tol", [None, 1e-12])
@pytest.mark.parametrize("late", [False, True])
def test_deferred_fast_path_falls_back_to_the_adaptive_iterates(tol, late, monkeypatch):
    """A cached-kernel product found untrustworthy (fp32, small eps, at the start; or, forced, at
    iteration 15) sends the solve back to the adaptive steps: to the start, or with ``tol`` to the
    previous check's state (iteration 10). The result is the adaptive steps' result."""
    from ot_losses.solvers import _scaling, sinkhorn as sk
    torch.manual_seed(0)
    cost = torch.cdist(torch.randn(30, 3), torch.randn(35, 3)) ** 2
    eps = 0.2 if late else 0.02  # eps = 0.2 needs no fallback of its own
    deferred_rows, adaptive_rows = [], []
    row_lse = _scaling.ScalingSteps.row_lse

    def counted(self, *args, **kw):
        (deferred_rows if self._deferred else adaptive_rows).append(1)
        out = row_lse(self, *args, **kw)
        if self._deferred and late and len(deferred_rows) == 15:
            self.trusted = self.trusted & False
        return out
    monkeypatch.setattr(_scaling.ScalingSteps, "row_lse", counted)
    got = sinkhorn(cost, eps=eps, n_iters=40, tol=tol)
    if late and tol is not None:  # iterations 11..40 again, adaptive (+ the row passes of 3 checks)
        assert 30 <= len(adaptive_rows) <= 33, len(adaptive_rows)
    else:  # all 40 again
        assert len(adaptive_rows) >= 40, len(adaptive_rows)
    make = sk.make_steps
    monkeypatch.setattr(sk, "make_steps", lambda *a, **kw: make(*a, **{**kw, "deferred": False}))
    want = sinkhorn(cost, eps=eps, n_iters=40, tol=tol)
    assert got.n_iters == want.n_iters == 40
    torch.testing.assert_close(got.plan, want.plan, rtol=1e-5, atol=1e-8)
