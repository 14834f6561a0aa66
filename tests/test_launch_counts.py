"""Per-iteration work of the Triton path: one launch per half-step, nothing else but its output.

Runs under the interpreter (``TRITON_INTERPRET=1``, set in conftest.py): each
launch goes through ``InterpretedFunction.run``, counted here, and every aten
op outside a launch through a ``TorchDispatchMode`` counter (ops the
interpreter itself runs inside a launch are not counted). A solver runs with
``n_iters=K`` and ``K + 10`` (``tol=None``): the difference over 10 is the
cost of one iteration, with the per-call set-up and final checks cancelling.
Per iteration: 2 launches (row pass, column pass) and at most 2 other aten
ops (their output tensors); the loop invariants (``eps * log w``, masks) are
computed once per solve.
"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn  # noqa: E402
from ot_losses.kernels import lse_steps  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="counts launches of the interpreter")

K = 3
N, M = 150, 130  # padded 256 x 256 fp32 tiles: beyond the fused small-problem kernel


class _Count(TorchDispatchMode):
    """Counts aten ops, except while ``paused`` (inside a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counter(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    mode = _Count()
    launches = []
    run = InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__)
        mode.paused += 1
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            mode.paused -= 1

    monkeypatch.setattr(InterpretedFunction, "run", counted)

    def measure(solve):
        """(launches, other aten ops) of ``solve(n_iters)`` for K and K + 10 iterations."""
        out = []
        for n in (K, K + 10):
            launches.clear()
            mode.ops.clear()
            with mode:
                solve(n)
            out.append((list(launches), list(mode.ops)))
        return out
    return measure


def _inputs():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(N, M, generator=g)
    a = torch.rand(N, generator=g) + 0.5
    b = torch.rand(M, generator=g) + 0.5
    a[3] = 0.0  # a zero-mass line: the -inf branch of every update is live
    return cost, a / a.sum(), b / b.sum()


def _solvers():
    cost, a, b = _inputs()
    kw = dict(tol=None, backend="triton")
    return {
        "sinkhorn": lambda n: sinkhorn(cost, a, b, eps=0.1, n_iters=n, **kw),
        "sinkhorn_shifted": lambda n: sinkhorn(cost + 1e4, a, b, eps=0.1, n_iters=n, **kw),
        "sinkhorn_unbalanced": lambda n: sinkhorn(cost, a, b, eps=0.1, reach=1.0, n_iters=n, **kw),
        "sinkhorn_unbalanced_shifted": lambda n: sinkhorn(cost + 1e4, a, b, eps=0.1, reach=(1.0, 2.0),
                                                          n_iters=n, **kw),
        "partial_bregman": lambda n: partial_ot(cost, a, b, mass=0.5, eps=0.1, method="bregman",
                                                n_iters=n, **kw),
        "partial_dummy": lambda n: partial_ot(cost, a, b, mass=0.5, eps=0.1, method="dummy", n_iters=n, **kw),
        "multi_assignment": lambda n: multi_assignment_sinkhorn(-cost, 4, eps=0.1, n_iters=n, **kw),
    }


def test_size_takes_the_streaming_path():
    assert not lse_steps.balanced_small_supported(N, M, torch.float32)


@pytest.mark.parametrize("name", list(_solvers()))
def test_one_launch_per_half_step(counter, name):
    (l0, o0), (l1, o1) = counter(_solvers()[name])
    launches, ops = len(l1) - len(l0), len(o1) - len(o0)
    assert launches == 2 * 10, f"{name}: {launches / 10} launches per iteration ({l1[-4:]})"
    extra = list(o1)
    for op in o0:  # the per-iteration ops: what the longer run did in addition
        if op in extra:
            extra.remove(op)
    assert ops <= 2 * 10, f"{name}: {ops / 10} aten ops per iteration besides launches: {sorted(set(extra))}"


def test_fused_small_path_is_one_launch_per_call(counter):
    cost, a, b = _inputs()
    small = cost[:20, :30]
    assert lse_steps.balanced_small_supported(20, 30, torch.float32)
    (l0, _), (l1, _) = counter(lambda n: sinkhorn(small, eps=0.1, n_iters=n, tol=None, backend="triton"))
    assert len(l1) == len(l0), "the iteration count is a kernel argument, not a launch count"
    assert l1.count("_balanced_small_kernel") == 2  # the loop runs n - 1 iterations, then the last one
