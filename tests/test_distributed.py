"""Data-parallel solves and losses (``process_group``, ``shard_dim``) on spawned gloo processes.

Each rank solves its block of a float64 cost; the blocks of the sharded-side
outputs, concatenated in rank order, must equal the one-process solve of the
whole cost (relative error 1e-10), and the global outputs (other potential,
``value``, ``marginal_error``, ``n_iters``, ...) must be identical on every
rank and equal to the one-process ones. Bad shards must raise the same error
on every rank, and DDP training with the losses must equal one process on
the whole batch. Process start-up dominates on small CPUs, so everything
runs in one spawn of 3 processes: the three-rank grid on the whole group,
the two-rank checks on the group of global ranks 1 and 2.
"""
import re

import pytest
import torch
import torch.distributed as dist

from ot_losses import _distributed as D
from ot_losses import (L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, l2rm_loss, multi_assignment_sinkhorn,
                       partial_ot, sinkhorn)
from spawn_helpers import shard, spawn

pytest.importorskip("triton")  # the grid includes backend="triton" (interpreted on CPU)

F64 = torch.float64
RTOL = 1e-10
MEASURED = {}  # case id -> worst relative error, printed by the last test (pytest -s)


def _rel(x, y):
    """Relative error over the finite entries; infinite entries must match exactly."""
    assert torch.equal(torch.isinf(x), torch.isinf(y)) and torch.equal(x[torch.isinf(x)], y[torch.isinf(y)])
    fin = torch.isfinite(y)
    x, y = x[fin], y[fin]
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item() if y.numel() else 0.0


def _marginal(gen, size, batch=(), total=1.0, zero=None):
    w = torch.rand(*batch, size, generator=gen, dtype=F64) + 0.1
    if zero is not None:
        w[..., zero] = 0.0
    return total * w / w.sum(-1, keepdim=True)


def _case(cid, solver, n, m, dim, sizes, *, batch=(), backend="torch", uniform=False, forbid=None, seed=0,
          total_b=1.0, zero_a=None, init=False, offsets=0.0, **kw):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(*batch, n, m, generator=gen, dtype=F64)
    if offsets:  # large row and column offsets: the solvers take out minima over the whole cost
        cost = (cost + offsets * torch.rand(*batch, n, 1, generator=gen, dtype=F64)
                + offsets * torch.rand(*batch, 1, m, generator=gen, dtype=F64))
    if solver == "multi":
        cost = -0.75 * cost
    if forbid == "diagonal":
        idx = torch.arange(min(n, m))
        cost[..., idx, idx] = float("inf")
    a = None if uniform or solver == "multi" else _marginal(gen, n, batch, zero=zero_a)
    b = None if uniform else _marginal(gen, m, batch, total=total_b)
    if init:
        kw["init"] = (0.1 * torch.randn(*batch, n, generator=gen, dtype=F64),
                      0.1 * torch.randn(*batch, m, generator=gen, dtype=F64))
    return dict(id=cid, solver=solver, cost=cost, a=a, b=b, dim=dim, sizes=sizes,
                kw=dict(backend=backend, **kw))


def _solve(case, cost, a, b, kw, **group):
    solver = case["solver"]
    if solver == "sinkhorn":
        return sinkhorn(cost, a, b, **kw, **group)
    if solver == "partial":
        return partial_ot(cost, a, b, **kw, **group)
    return multi_assignment_sinkhorn(cost, b=b, **kw, **group)


def _summary(case, res, cost):
    """What a rank (or the one-process reference) returns; lazy collective fields in a fixed order."""
    out = dict(f=res.f, g=res.g, n_iters=res.n_iters, marginal_error=res.marginal_error,
               converged=res.converged)
    if case["solver"] == "multi":
        out["plan"] = res.assignment
        return out
    out.update(plan=res.plan, value=res.value.detach(), transport_cost=res.transport_cost)
    if case["solver"] == "partial":
        out["mass"] = res.mass
    res.value.sum().backward()
    out["grad"] = cost.grad
    return out


def _local_inputs(case, rank):
    """This rank's cost block, marginals and init potentials for a case."""
    side = -2 if case["dim"] in (0, -2) else -1
    sizes = case["sizes"]
    a, b, kw = case["a"], case["b"], dict(case["kw"])
    if side == -2:
        a = shard(a, -1, sizes, rank)
    else:
        b = shard(b, -1, sizes, rank)
    if "init" in kw:
        f0, g0 = kw["init"]
        kw["init"] = (shard(f0, -1, sizes, rank), g0) if side == -2 else (f0, shard(g0, -1, sizes, rank))
    return shard(case["cost"], side, sizes, rank).clone(), a, b, kw


def _solve_cases(rank, group, cases):
    out = {}
    for case in cases:
        cost, a, b, kw = _local_inputs(case, rank)
        cost.requires_grad_(case["solver"] != "multi")
        res = _solve(case, cost, a, b, kw, process_group=group, shard_dim=case["dim"])
        out[case["id"]] = _summary(case, res, cost)
    return out


def _check_case(case, ranks):
    cost = case["cost"].clone().requires_grad_(case["solver"] != "multi")
    ref = _summary(case, _solve(case, cost, case["a"], case["b"], case["kw"]), cost)
    rows = case["dim"] in (0, -2)
    sharded = {"f": -1, "plan": -2, "grad": -2} if rows else {"g": -1, "plan": -1, "grad": -1}
    worst = 0.0
    for key, want in ref.items():
        got = [r[key] for r in ranks]
        if key in sharded:
            got = torch.cat(got, dim=sharded[key])
        else:  # global: identical on every rank
            for r, other in enumerate(got[1:], 1):
                assert torch.equal(torch.as_tensor(other), torch.as_tensor(got[0])), \
                    f"{case['id']}: {key} differs between rank 0 and rank {r}"
            got = got[0]
        if key == "n_iters":
            assert got == want, f"{case['id']}: n_iters {got} != {want}"
        elif key == "converged":
            assert torch.equal(got, want), f"{case['id']}: converged {got} != {want}"
        elif key == "marginal_error":  # a residual near 0: absolute, in units of the mass / cost (~1)
            err = (got - want).abs().max().item()
            assert err < RTOL, f"{case['id']}: marginal_error {got} != {want}"
        else:
            err = _rel(got, want)
            worst = max(worst, err)
            assert err < RTOL, f"{case['id']}: {key} relative error {err:.3g} >= {RTOL}"
    MEASURED[case["id"]] = worst


def _cases_two():
    c = _case
    return [
        c("sinkhorn-rows-uneven-tol-init", "sinkhorn", 13, 11, 0, [5, 8], eps=0.1, n_iters=500, tol=1e-9,
          zero_a=2, init=True),
        c("sinkhorn-cols-batched-uniform-forbidden-schedule", "sinkhorn", 12, 11, -1, [3, 8], batch=(2,),
          uniform=True, forbid="diagonal", eps=0.05, n_iters=40, eps_schedule=[1.0, 0.5, 0.2], seed=1),
        c("unbalanced-rows-even-tol", "sinkhorn", 12, 9, -2, [6, 6], eps=0.1, n_iters=300, tol=1e-8,
          reach=(0.5, 2.0), total_b=1.5, seed=2),
        c("unbalanced-cols-batched", "sinkhorn", 10, 13, 1, [7, 6], batch=(2,), eps=0.1, n_iters=30,
          reach=1.0, seed=3),
        c("bregman-rows-uneven-tol", "partial", 13, 11, 0, [4, 9], eps=0.05, n_iters=600, tol=1e-9,
          mass=0.6, total_b=1.3, seed=4),
        c("bregman-cols-batched-uniform", "partial", 9, 12, 1, [5, 7], batch=(3,), uniform=True, eps=0.1,
          n_iters=50, mass=0.5, seed=5),
        c("dummy-rows-batched-forbidden-tol", "partial", 12, 11, 0, [7, 5], batch=(2,), forbid="diagonal",
          eps=0.05, n_iters=800, tol=1e-8, mass=0.4, method="dummy", seed=6),
        c("dummy-cols-uneven", "partial", 11, 13, 1, [2, 11], eps=0.1, n_iters=60, mass=0.7,
          method="dummy", total_b=1.2, seed=7),
        c("multi-rows-uneven-tol", "multi", 13, 8, 0, [6, 7], k=3, eps=0.07, n_iters=500, tol=1e-9, seed=8),
        c("multi-cols-batched", "multi", 12, 8, 1, [3, 5], batch=(2,), k=2.5, eps=0.07, n_iters=40, seed=9),
        c("sinkhorn-cols-offsets", "sinkhorn", 10, 9, 1, [5, 4], eps=0.05, n_iters=60, offsets=1e3, seed=16),
        c("sinkhorn-rows-offsets", "sinkhorn", 10, 9, 0, [2, 8], eps=0.05, n_iters=60, offsets=1e3, seed=17),
        c("bregman-rows-offsets", "partial", 10, 9, 0, [6, 4], eps=0.1, n_iters=60, offsets=50.0, mass=0.5,
          seed=18),
        c("multi-cols-offsets", "multi", 10, 9, 1, [4, 5], k=3, eps=0.07, n_iters=40, offsets=1e3, seed=19),
        # The Triton interpreter is slow on CPU: few iterations (the first check comes at n_iters).
        c("triton-sinkhorn-cols-tol", "sinkhorn", 9, 7, 1, [3, 4], backend="triton", eps=0.1, n_iters=5,
          tol=1e-12, seed=10),
        c("triton-unbalanced-rows", "sinkhorn", 9, 7, 0, [5, 4], backend="triton", eps=0.1, n_iters=4,
          reach=0.5, seed=11),
        c("triton-bregman-cols", "partial", 8, 9, 1, [4, 5], backend="triton", eps=0.1, n_iters=4,
          mass=0.5, seed=12),
        c("triton-dummy-rows-batched", "partial", 9, 7, 0, [4, 5], batch=(2,), backend="triton", eps=0.1,
          n_iters=4, mass=0.5, method="dummy", seed=13),
        c("triton-multi-cols", "multi", 9, 8, 1, [5, 3], backend="triton", k=3, eps=0.07, n_iters=4,
          seed=14),
    ]


def _cases_three():
    c = _case
    return [
        # Rank 0 holds one row, of zero mass.
        c("3-sinkhorn-rows-zero-mass-shard", "sinkhorn", 13, 11, 0, [1, 5, 7], eps=0.1, n_iters=400,
          tol=1e-9, zero_a=0, seed=20),
        c("3-bregman-cols-tol", "partial", 11, 12, -1, [5, 1, 6], eps=0.1, n_iters=600, tol=1e-9, mass=0.8,
          seed=22),
        c("3-dummy-rows", "partial", 12, 10, 0, [3, 3, 6], eps=0.1, n_iters=80, mass=0.5, method="dummy",
          seed=23),
        c("3-multi-cols", "multi", 11, 9, 1, [3, 3, 3], k=2, eps=0.07, n_iters=40, seed=25),
        c("3-triton-multi-rows", "multi", 9, 6, 0, [3, 2, 4], backend="triton", k=2, eps=0.07, n_iters=4,
          seed=26),
    ]


def _worker(rank, world, _):
    """Every check in one spawn of 3 processes (process start-up dominates on small CPUs).

    The three-rank grid runs on the whole group; the two-rank checks on the
    group of global ranks 1 and 2 (group ranks 0 and 1), while rank 0 waits.
    """
    pair = dist.new_group([1, 2])
    out = {"three": _solve_cases(rank, dist.group.WORLD, _cases_three())}
    if rank > 0:
        r = dist.get_rank(pair)
        out.update(solve=_solve_cases(r, pair, _cases_two()), raise_=_raise_cases(r, pair),
                   ddp=_ddp_cases(r, pair))
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks():
    """Per global rank: the three-rank grid and (ranks 1, 2) the two-rank solves, errors and DDP runs."""
    return spawn(_worker, 3, None)


@pytest.fixture(scope="module")
def two_ranks(ranks):
    """The two-rank results, in group rank order."""
    return ranks[1:]


def test_sharded_solve_equals_one_process_two_ranks(two_ranks):
    for case in _cases_two():
        _check_case(case, [r["solve"][case["id"]] for r in two_ranks])


def test_sharded_solve_equals_one_process_three_ranks(ranks):
    for case in _cases_three():
        _check_case(case, [r["three"][case["id"]] for r in ranks])


# ----------------------------------------------------------------------------- bad shards
def _bad_inputs(rank, group):
    """(case id, call) pairs whose input is wrong on some rank(s); every rank must raise the same error."""
    g = torch.Generator().manual_seed(rank)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    world = dict(process_group=group)
    cost_nan = rand(4, 5)
    if rank == 1:
        cost_nan[0, 0] = float("nan")
    a_neg = torch.full((4,), 1 / 8, dtype=F64)
    if rank == 0:
        a_neg[1] = -1 / 8
    col_forbidden = rand(4, 5)
    col_forbidden[:, 2] = float("inf")
    row_forbidden = rand(4, 3)
    row_forbidden[1, :] = float("inf")
    # Each rank's only row with mass may use column 0 (b_0 = 0.2) alone: at most 0.2 can move.
    one_column, a_first = rand(4, 5), torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=F64)
    one_column[0, 1:] = float("inf")
    return [
        ("empty", lambda: sinkhorn(rand(4 if rank == 0 else 0, 5), **world, shard_dim=0)),
        ("other-side", lambda: sinkhorn(rand(4, 5 + rank), **world, shard_dim=0)),
        ("batch", lambda: partial_ot(rand(2 + rank, 4, 5), mass=0.5, **world, shard_dim=1)),
        ("ndim", lambda: sinkhorn(rand(4, 5) if rank == 0 else rand(1, 4, 5), **world, shard_dim=0)),
        ("not-tensor", lambda: sinkhorn(rand(4, 5) if rank == 0 else [[0.0]], **world, shard_dim=0)),
        ("nan-on-rank-1", lambda: sinkhorn(cost_nan, **world, shard_dim=0)),
        ("negative-a-on-rank-0", lambda: sinkhorn(rand(4, 5), a_neg, **world, shard_dim=0)),
        ("unequal-mass", lambda: sinkhorn(rand(4, 5), torch.full((4,), 0.1, dtype=F64), **world,
                                          shard_dim=0)),
        ("infeasible-column", lambda: sinkhorn(col_forbidden, **world, shard_dim=0)),
        ("infeasible-row", lambda: multi_assignment_sinkhorn(row_forbidden, k=1, **world, shard_dim=1)),
        ("partial-capacity", lambda: partial_ot(one_column, a_first, mass=0.5, **world, shard_dim=0)),
        ("no-shard-dim", lambda: sinkhorn(rand(4, 5), **world)),
        ("unroll", lambda: sinkhorn(rand(4, 5), grad="unroll", **world, shard_dim=0)),
        ("k-global-m", lambda: multi_assignment_sinkhorn(rand(4, 3), k=6, **world, shard_dim=1)),
        ("mass-global", lambda: partial_ot(rand(4, 5), mass=1.5, **world, shard_dim=0)),
    ]


EXPECTED = {
    "empty": (ValueError, r"cost shard on rank 1 of process_group is empty \(N = 0\)"),
    "other-side": (ValueError, r"same M .* got M = \[5, 6\]"),
    "batch": (ValueError, r"same batch size B .* got B = \[2, 3\]"),
    "ndim": (ValueError, r"same number of dimensions .* \['2-D', '3-D'\]"),
    "not-tensor": (ValueError, r"\['2-D', 'not a tensor'\]"),
    "nan-on-rank-1": (ValueError, r"cost must not contain NaN.*\(raised on rank 1 of process_group\)"),
    "negative-a-on-rank-0": (ValueError, r"a must be non-negative.*raised on rank 0"),
    "unequal-mass": (ValueError, r"equal total mass.*sum\(a\)=0\.8"),
    "infeasible-column": (ValueError, r"infeasible: column 2 has positive mass"),
    "infeasible-row": (ValueError, r"infeasible: row 1 needs k=1 assignments .* only 0 allowed"),
    "partial-capacity": (ValueError, r"infeasible: mass=0\.5 exceeds the 0\.2 that the allowed"),
    "no-shard-dim": (ValueError, r"shard_dim must be 0"),
    "unroll": (ValueError, r"grad='unroll' is not supported with a process_group"),
    "k-global-m": (ValueError, r"k must satisfy 1 <= k < M = 6"),
    "mass-global": (ValueError, r"mass must satisfy 0 < mass <= min\(sum\(a\), sum\(b\)\) = 1"),
}


def _raise_cases(rank, group):
    out = {}
    for cid, call in _bad_inputs(rank, group):
        try:
            call()
            out[cid] = None
        except Exception as exc:  # noqa: BLE001 - compared across ranks by the parent
            out[cid] = (type(exc), str(exc))
    # The group is still in step after the errors: a valid solve, k above the local M but below the global.
    cost = torch.rand(4, 3, generator=torch.Generator().manual_seed(rank), dtype=F64)
    res = multi_assignment_sinkhorn(cost, k=4, process_group=group, shard_dim=1, n_iters=5)
    out["after"] = res.marginal_error
    # The LSE all-reduce: entries -inf on every rank stay -inf (no NaN), others match logsumexp.
    x = torch.tensor([[0.5, -torch.inf, -torch.inf, 700.0 * (rank + 1)]], dtype=F64)
    x[0, 1] = -torch.inf if rank else 3.0
    shard_ = D.Shard(group, D.ROWS, [1, 1], rank)
    out["lse"] = (x, shard_.combine_lse(x, 0.5))
    return out


def test_bad_shard_raises_same_error_on_every_rank(two_ranks):
    ranks = [r["raise_"] for r in two_ranks]
    for cid, (kind, pattern) in EXPECTED.items():
        got = [r[cid] for r in ranks]
        assert got[0] is not None, f"{cid}: no error raised"
        assert got[0] == got[1], f"{cid}: ranks raised different errors: {got}"
        assert got[0][0] is kind, f"{cid}: {got[0]}"
        assert re.search(pattern, got[0][1]), f"{cid}: {got[0][1]}"
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])
    xs = torch.stack([r["lse"][0] for r in ranks])
    want = 0.5 * torch.logsumexp(xs / 0.5, dim=0)
    for r in ranks:
        assert torch.equal(torch.isneginf(r["lse"][1]), torch.isneginf(want))
        fin = torch.isfinite(want)
        assert torch.allclose(r["lse"][1][fin], want[fin], rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- DDP-exact losses
STEPS, N_GLOBAL = 3, 8   # 3 SGD steps on global batches of 8 pairs (4 per rank with W = 2)


class _Model(torch.nn.Module):
    """Two small encoders and a loss (module or function), all float64."""

    def __init__(self, kind, group):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.in_a, self.in_b = torch.nn.Linear(6, 6), torch.nn.Linear(7, 7)
        self.enc_a, self.enc_b = torch.nn.Linear(6, 5), torch.nn.Linear(7, 5)
        if kind == "swamp":
            self.loss = SwAMPLoss(5, n_prototypes=7, queue_size=2 * N_GLOBAL, n_iters=3, info_nce_weight=0.5,
                                  backend="torch", process_group=group)
        elif kind == "multi_sk":
            self.loss = MultiSKLoss((6, 7, 5), n_anchors=6, queue_size=2 * N_GLOBAL, n_iters=10,
                                    info_nce_weight=0.5, backend="torch", process_group=group)
        self.group = group
        self.double()

    def forward(self, raw_a, raw_b):
        x_a, x_b = torch.tanh(self.in_a(raw_a)), torch.tanh(self.in_b(raw_b))
        z_a, z_b = self.enc_a(x_a), self.enc_b(x_b)
        if self.kind == "swamp":
            return self.loss(z_a, z_b)
        if self.kind == "multi_sk":
            return self.loss(x_a, x_b, z_a, z_b)
        return info_nce_loss(z_a, z_b, temperature=0.2, process_group=self.group)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(N_GLOBAL, d, generator=g, dtype=F64) for d in (6, 7)) for _ in range(STEPS)]


def _train(kind, group=None, rank=0, world=1):
    """``STEPS`` SGD steps; with a group, DDP on this rank's rows. Returns the state and the losses."""
    model = _Model(kind, group)
    net = model if group is None else torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses, rows = [], slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    for raw_a, raw_b in _batches():
        opt.zero_grad()
        loss = net(raw_a[rows], raw_b[rows])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, torch.stack(losses)


def _ddp_cases(rank, group):
    out = {kind: _train(kind, group, rank, 2) for kind in KINDS}
    # A loss module left outside DDP whose prototypes drifted: every rank warns.
    loss_fn = SwAMPLoss(4, n_prototypes=5, process_group=group).double()
    if rank == 1:
        with torch.no_grad():
            loss_fn.prototypes[0, 0] += 0.1
    z = torch.randn(3, 4, dtype=F64)
    with pytest.warns(RuntimeWarning, match="parameters differ across the ranks"):
        loss_fn(z, z)
    out["warned"] = True
    return out


KINDS = ("swamp", "multi_sk", "info_nce")


def test_ddp_training_equals_one_process_on_the_whole_batch(two_ranks):
    ranks = [r["ddp"] for r in two_ranks]
    for kind in KINDS:
        state, losses = _train(kind)
        for name, want in state.items():
            got = [r[kind][0][name] for r in ranks]
            assert torch.equal(got[0], got[1]), f"{kind}: {name} differs between the ranks"
            if want.is_floating_point():
                err = _rel(got[0], want)
                MEASURED[f"ddp-{kind}"] = max(MEASURED.get(f"ddp-{kind}", 0.0), err)
                assert err < 1e-8, f"{kind}: {name} relative error {err:.3g} vs one process"
            else:
                assert torch.equal(got[0], want), f"{kind}: {name} {got[0]} != {want}"
        # Each rank averages its rows; with equal local batches their mean is the whole-batch loss.
        mean = (ranks[0][kind][1] + ranks[1][kind][1]) / 2
        assert torch.allclose(mean, losses, rtol=1e-10, atol=0), (kind, mean, losses)
        if kind != "info_nce":
            assert losses[-1] != 0  # the queue filled and the OT-based term was active at the last step
    assert all(r["warned"] for r in ranks)


def test_l2rm_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="process_group is not supported by the L2RM loss"):
        l2rm_loss(torch.rand(4, 4), process_group=object())
    with pytest.raises(ValueError, match="process_group is not supported by the L2RM loss"):
        L2RMLoss(4, process_group=object())


def test_report_measured_agreement():
    """Prints the worst relative error per case (``pytest -s``); needs the grid tests above to have run."""
    for cid, err in sorted(MEASURED.items()):
        print(f"{cid:55s} {err:.2e}")
    assert all(err < RTOL for err in MEASURED.values())
