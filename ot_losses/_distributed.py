"""Data-parallel solves: one cost split across the ranks of a ``torch.distributed`` group.

Rank ``r`` holds a block of the global ``(B, N, M)`` cost: rows ``N_r`` of it
(``shard_dim=0``) or columns ``M_r`` (``shard_dim=1``), in rank order. A
half-step that reduces over the unsharded side is local; one that reduces
over the sharded side computes the local log-sum-exp and combines the
ranks' partials with two all-reduces of the *unsharded* side's size

    lse = m + log sum_r exp(lse_r - m),   m = max_r lse_r,

so the cost is never gathered and the traffic per half-step does not grow
with the sharded size. The few problem-level reductions over the sharded
side (marginal errors, masses, ``value``) go through the same object.

:class:`Local` is the no-group case (every reduction is already complete);
:class:`Shard` the group case. Solvers hold one of them and call it
unconditionally, so no solver branches on the layout. Both expose:

- ``steps(namespace)``: the half-steps to iterate with;
- ``total(x, dim)``, ``peak(x, dim)``, ``low(x, dim)``, ``merge_lse(x, dim)``:
  complete a partial sum / max / min / log-sum-exp over side ``dim`` (``ROWS``,
  ``COLS``), and ``sum``, ``lse`` that first reduce the last axis locally;
  ``total_all``, ``peak_all`` over the whole block;
- ``size(cost3, dim)``: the global size of a side;
- ``checks()``: a context in which an error raised on any rank is raised
  on every rank (a bad shard must not leave the other ranks waiting).

Collectives are blocking and issued in the same order on every rank: a
result's lazy ``value``, ``transport_cost`` and ``mass`` are collective too.
"""
import contextlib
import warnings

import torch

from . import _validate as V

ROWS, COLS = 1, 2  # sides of a (B, N, M) cost
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "FloatingPointError": FloatingPointError}

# Bytes this process has all-reduced (benchmarks read it through comm_bytes()).
_COMM_BYTES = [0]


def comm_bytes():
    """Total bytes this process has passed to all-reduces of sharded solves so far."""
    return _COMM_BYTES[0]


class Local:
    """No process group: the whole cost is on this process; every reduction is already complete."""

    group = None
    dim = None

    def steps(self, steps):
        return steps

    def size(self, cost3, dim):
        return cost3.shape[dim]

    def total(self, x, dim):
        return x

    def peak(self, x, dim):
        return x

    def merge_lse(self, x, dim):
        return x

    def low(self, x, dim):
        return x

    def any(self, flag):
        return bool(flag)

    def total_all(self, x):
        """Complete a ``(B,)`` (or scalar) sum over this rank's whole block."""
        return self.total(x, self.dim)

    def peak_all(self, x):
        """Complete a ``(B,)`` max over this rank's whole block."""
        return self.peak(x, self.dim)

    def sum(self, x, dim):
        """Sum over the last axis of ``x`` (side ``dim``): ``(B, K)`` -> ``(B,)``."""
        return self.total(x.sum(-1), dim)

    def lse(self, x, dim):
        """Log-sum-exp over the last axis of ``x`` (side ``dim``): ``(B, K)`` -> ``(B,)``."""
        return self.merge_lse(torch.logsumexp(x, -1), dim)

    def marginal(self, x, name, cost3, dim, batched):
        """:func:`_validate.check_marginal`; ``None`` is uniform over the side's global size."""
        return V.check_marginal(x, name, cost3, dim, batched)

    def totals(self, a, b, check=(True, True), verdicts=None):
        """``(sum a, sum b)``, ``(B,)`` each, over the whole problem; value checks where ``check`` says.

        The checks are queued on ``verdicts`` when given (the caller flushes them inside ``checks()``).
        """
        ma, mb = self.sum(a, ROWS), self.sum(b, COLS)
        queue = V.Verdicts() if verdicts is None else verdicts
        for w, name, total, wanted in ((a, "a", ma, check[0]), (b, "b", mb, check[1])):
            if wanted:
                V.check_marginal_values(w, name, total, verdicts=queue)
        if verdicts is None:
            with self.checks():
                queue.flush()
        return ma, mb

    offsets = (0, 0)  # global index of this block's first row and column

    def checks(self):
        return contextlib.nullcontext()


LOCAL = Local()


def _comm_device(group):
    """Device for control tensors: NCCL only moves CUDA tensors, gloo prefers CPU ones."""
    import torch.distributed as dist
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_of(cost, process_group, shard_dim):
    """The layout of a solve: :data:`LOCAL` without a group, else a :class:`Shard`.

    Collective when ``process_group`` is given: the ranks exchange their
    cost shapes, and a missing, empty or inconsistent shard raises the same
    ``ValueError`` on every rank.
    """
    dim = V.check_process_group(process_group, shard_dim)
    if process_group is None:
        return LOCAL
    import torch.distributed as dist
    # Per rank: ndim (-1: not a tensor) and (B, N, M) (B = 1 for a 2-D cost; zeros if no shape).
    ndim = cost.ndim if isinstance(cost, torch.Tensor) else -1
    shape = tuple(cost.shape) if ndim == 3 else (1, *cost.shape) if ndim == 2 else (0, 0, 0)
    info = torch.tensor([ndim, *shape], dtype=torch.int64, device=_comm_device(process_group))
    gathered = [torch.empty_like(info) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, info, group=process_group)
    rows = [t.tolist() for t in gathered]
    V.check_shard_shapes([r[0] for r in rows], [tuple(r[1:]) for r in rows], dim)
    sizes = [r[1 + dim] for r in rows]  # r = (ndim, B, N, M)
    return Shard(process_group, dim, sizes, dist.get_rank(process_group))


class Shard(Local):
    """A cost split on side ``dim`` (``ROWS`` or ``COLS``) across ``group``; ``sizes[r]`` on rank ``r``."""

    def __init__(self, group, dim, sizes, rank):
        self.group, self.dim, self.sizes, self.rank = group, dim, list(sizes), rank
        self.offset = sum(self.sizes[:rank])
        self.global_size = sum(self.sizes)
        # Global index of this rank's first row and column (for error messages).
        self.offsets = (self.offset, 0) if dim == ROWS else (0, self.offset)

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, x, op):
        import torch.distributed as dist
        x = x.detach().contiguous().clone()  # never reduce into a caller's (or a saved) tensor
        _COMM_BYTES[0] += x.numel() * x.element_size()
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def combine_lse(self, x, scale=1.0):
        """Global ``scale * lse`` from each rank's ``scale * lse`` partial ``x`` (same shape on all ranks).

        The max is all-reduced first so no rank's ``exp`` overflows; an entry
        that is ``-inf`` on every rank (nothing allowed, or zero mass) stays
        ``-inf`` instead of becoming NaN.
        """
        import torch.distributed as dist
        m = self._all_reduce(x, dist.ReduceOp.MAX)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = self._all_reduce(torch.exp((x - m) / scale), dist.ReduceOp.SUM)
        return m + scale * torch.log(s)

    def steps(self, steps):
        # The updates apply after the cross-rank combine: torch ops around the combined steps.
        from .solvers._update import Composed
        return Composed(ShardedSteps(steps, self), self)

    def size(self, cost3, dim):
        return self.global_size if dim == self.dim else cost3.shape[dim]

    def total(self, x, dim):
        import torch.distributed as dist
        if dim != self.dim:
            return x
        out = self._all_reduce(x, dist.ReduceOp.SUM)
        # Every rank holds the same global sum; its gradient w.r.t. this rank's partial is 1
        # (the envelope gradient of a global value w.r.t. the local block is local).
        return x + (out - x).detach() if x.requires_grad else out

    def peak(self, x, dim):
        import torch.distributed as dist
        return self._all_reduce(x, dist.ReduceOp.MAX) if dim == self.dim else x

    def merge_lse(self, x, dim):
        return self.combine_lse(x) if dim == self.dim else x

    def low(self, x, dim):
        import torch.distributed as dist
        return self._all_reduce(x, dist.ReduceOp.MIN) if dim == self.dim else x

    def any(self, flag):
        """``flag`` is True on some rank (collective)."""
        import torch.distributed as dist
        t = torch.tensor([int(bool(flag))], device=_comm_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def marginal(self, x, name, cost3, dim, batched):
        w = V.check_marginal(x, name, cost3, dim, batched)
        if x is None and dim == self.dim:
            w = torch.full_like(w, 1.0 / self.global_size)
        return w

    @contextlib.contextmanager
    def checks(self):
        """Run local checks; an exception on any rank is raised on every rank, with the same message."""
        import torch.distributed as dist
        error = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        if not self.any(error is not None):
            return
        world = dist.get_world_size(self.group)
        errors = [None] * world
        mine = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(errors, mine, group=self.group)
        if error is not None and all(e == mine for e in errors):
            raise error  # the same error everywhere (e.g. a bad scalar argument): as without a group
        rank = next(r for r, e in enumerate(errors) if e is not None)
        kind, message = errors[rank]
        raised = _ERRORS.get(kind, RuntimeError)(f"{message} (raised on rank {rank} of process_group)")
        raise raised from error


class ShardedSteps:
    """A backend's half-steps on one rank's block, completed across the group where they reduce over it.

    Reductions along the unsharded side (``row_lse`` on a row shard) are
    local; those along the sharded side combine the local partials with
    :meth:`Shard.combine_lse`. ``plan``/``log_plan`` stay local (the local
    block of the global plan); ``plan_cost`` sums over every rank. The
    fused small-problem kernel runs many iterations without communicating,
    so it is reported unsupported. Updates (``update=``) apply only after the
    combine, so :meth:`Shard.steps` wraps this in ``_update.Composed``
    (torch ops around the combined steps) instead of fusing them.
    """

    def __init__(self, steps, shard):
        self._steps, self._shard = steps, shard

    def __getattr__(self, name):
        return getattr(self._steps, name)

    def row_lse(self, cost, h, eps, shift=None):
        out = self._steps.row_lse(cost, h, eps, shift=shift)
        return self._shard.combine_lse(out, eps) if self._shard.dim == COLS else out

    def col_lse(self, cost, h, eps, shift=None):
        out = self._steps.col_lse(cost, h, eps, shift=shift)
        return self._shard.combine_lse(out, eps) if self._shard.dim == ROWS else out

    def row_sigmoid_lse(self, cost, u, v, eps, shift=None):
        pair = self._steps.row_sigmoid_lse(cost, u, v, eps, shift=shift)
        if self._shard.dim != COLS:
            return pair
        both = self._shard.combine_lse(torch.stack(pair), eps)  # one pair of all-reduces for both sums
        return both[0], both[1]

    def col_sigmoid_lse(self, cost, u, v, eps, shift=None):
        pair = self._steps.col_sigmoid_lse(cost, u, v, eps, shift=shift)
        if self._shard.dim != ROWS:
            return pair
        both = self._shard.combine_lse(torch.stack(pair), eps)
        return both[0], both[1]

    def plan_cost(self, cost, f, g, eps, shift=None):
        return self._shard.total_all(self._steps.plan_cost(cost, f, g, eps, shift=shift))

    def balanced_small_supported(self, n, m, dtype=torch.float32):
        return False


# ----------------------------------------------------------------------------- losses
def loss_group(process_group):
    """Check a loss's ``process_group`` (None or a group this process belongs to); returns it."""
    if process_group is not None:
        V.check_process_group(process_group, 0)
    return process_group


def _sizes(n, group, device):
    """Every rank's ``n`` (rows of its local batch), in rank order."""
    import torch.distributed as dist
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x.item()) for x in out]


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (uneven counts allowed); backward sums the gradients of all ranks.

    Rank ``s``'s rows feed every rank's loss, so their gradient is the sum over
    ranks of each loss's gradient w.r.t. them: one all-reduce of the gathered
    gradient, then this rank's slice (any backend; gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx, x, group, sizes):
        import torch.distributed as dist
        rank = dist.get_rank(group)
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.start, ctx.n = group, sum(sizes[:rank]), x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start: ctx.start + ctx.n], None, None


def gather_rows(x, group):
    """``(cat over ranks of x, offset of this rank's rows)``; differentiable (see :class:`_GatherRows`)."""
    import torch.distributed as dist
    sizes = _sizes(x.shape[0], group, x.device)
    return _GatherRows.apply(x, group, sizes), sum(sizes[: dist.get_rank(group)])


def rank_slice(n, group):
    """This rank's ``slice`` of ``n`` rows split into near-equal consecutive parts (rank order).

    Used for a buffer that is identical on every rank (a queue of gathered
    past batches): each rank takes its part into the sharded OT problem, so
    every row is counted once.
    """
    import torch.distributed as dist
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    bounds = [n * r // world for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def total_rows(n, group, device):
    """Sum over the ranks of ``n``."""
    return sum(_sizes(n, group, device))


def warn_if_diverged(module, group):
    """Warn (once per module) when ``module``'s parameters differ across the ranks of ``group``.

    A loss module outside the ``DistributedDataParallel`` wrapper gets only
    its local gradients, so its prototypes/anchors drift apart silently. Two
    all-reduces of a per-parameter fingerprint; the same decision on every rank.
    """
    if group is None or getattr(module, "_replicas_warned", False):
        return
    params = [p.detach().double() for p in module.parameters()]
    if not params:
        return
    import torch.distributed as dist
    fingerprint = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params]).flatten()
    lo, hi = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        warnings.warn(f"{type(module).__name__}: parameters differ across the ranks of process_group; "
                      f"keep the loss module inside the DistributedDataParallel wrapper with the encoders "
                      f"(or average its gradients) so every rank trains the same prototypes/anchors",
                      RuntimeWarning, stacklevel=3)
        module._replicas_warned = True
