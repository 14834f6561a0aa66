"""The one iteration loop every solver and backend shares, and the envelope gradient.

A solver describes its problem as a small object with ``step(eps)`` (one
full iteration: row update, then column update, through a namespace of
half-steps), ``error(eps)`` (``(B,)`` tensor) and ``mark()`` (remember the
potentials for a change-based error). The loop only schedules eps, checks
convergence every few iterations and stops.
"""
import math

import torch

from .. import _distributed as D
from .. import _validate as V
from .._backend import get_steps
from ._numerics import in_cost_units
from ._scaling import ScalingSteps
from ._update import Composed

# Convergence is checked every CHECK_EVERY iterations: on a GPU each check
# is a host sync, so it must not happen every step.
CHECK_EVERY = 10
GRADS = ("envelope", "unroll", "none")


def fold(pot, log_w, eps):
    """``pot + eps * log_w``, and exactly ``-inf`` where the weight is 0 (even if ``pot`` is inf)."""
    return torch.where(torch.isneginf(log_w), log_w, pot + eps * log_w)


def unbatch(x, batched):
    """Drop the leading batch dimension the solvers add to an unbatched input."""
    return x if batched else x.squeeze(0)


def make_steps(backend, grad, cost3, dtype, shift, forbidden, scaled=True, row_min=None, deferred=False):
    """Half-step namespace for a resolved backend and gradient mode.

    ``grad="unroll"`` keeps the plain differentiable reference steps; the torch
    backend otherwise uses the cached-kernel fast path when ``scaled``
    (seeded from ``row_min`` when given; ``deferred``: without host reads,
    see :class:`ScalingSteps`). Under ``torch.compile`` the reference steps,
    pure tensor operations, are traced instead of the fast path (whose
    decisions are host reads). Every namespace returned takes ``update=``
    (``_update.Update``): fused in the dense Triton kernels, as torch ops
    around the log-sum-exp elsewhere.
    """
    if not isinstance(cost3, torch.Tensor):   # a cost kind (FeatureCost) brings its own reductions
        return cost3.steps(backend)
    if backend == "torch" and grad != "unroll" and scaled and not V.compiling():
        return Composed(ScalingSteps(cost3.detach(), dtype, shift, forbidden, row_min, deferred))
    return get_steps(backend)


def shift_needed(stats, dtype, per_line, shard=D.LOCAL):
    """``(B,)`` bool: the problems whose cost offsets are worth subtracting (see :func:`cost_shift`)."""
    row_min, row_max, col_min, col_max = (x.detach().to(dtype) for x in stats)
    row_min, row_max = shard.low(row_min, D.COLS), shard.peak(row_max, D.COLS)
    col_min, col_max = shard.low(col_min, D.ROWS), shard.peak(col_max, D.ROWS)
    lo = shard.low(_finite(row_min, math.inf).amin(-1), D.ROWS)
    hi = shard.peak(_finite(row_max, -math.inf).amax(-1), D.ROWS)
    size = torch.maximum(lo.abs(), hi.abs())
    if per_line:
        row_spread = shard.peak(_finite(row_max - row_min, 0.0).amax(-1), D.ROWS)
        col_spread = shard.peak(_finite(col_max - col_min, 0.0).amax(-1), D.COLS)
        spread = torch.minimum(row_spread, col_spread)
    else:
        spread = _finite(hi - lo, 0.0)
    return size > 2 * spread  # decided per problem, so a batch solves as its problems alone


def _finite(x, fill):
    # one op (masked_fill(~isfinite) is three): these run on every call, on (B, N) vectors
    return x.nan_to_num(nan=fill, posinf=fill, neginf=fill)


def cost_checks(cost3, checks, name="cost"):
    """Queue the cost's value checks on ``checks`` (``V.Verdicts``); returns its lines' extremes.

    A FeatureCost (which forbids nothing) is checked at once.
    """
    if not isinstance(cost3, torch.Tensor):
        return cost3._check_values(name)[1]
    return V.cost_value_checks(cost3, checks, name)


def settle(checks, shard, cost3, stats, dtype, per_line, feasible=None):
    """Read every queued value check at once; returns ``(forbidden, stats, take)``.

    ``take``: whether any problem needs cost offsets (:func:`cost_shift`),
    read in the same host sync. When the cost has forbidden (``+inf``)
    entries, the maxima in ``stats`` are corrected, and ``feasible(checks)``
    (queueing the feasibility checks) and the offsets' need are read in a
    second sync. Under ``torch.compile`` nothing is read or checked:
    ``forbidden`` is then True (the cautious choice), ``take`` None.
    """
    dense = isinstance(cost3, torch.Tensor)
    if V.compiling():
        checks.flush()  # drops the checks: they would need host reads
        return True, V.allowed_maxima(cost3, stats) if dense else stats, None
    checks.read("shift", shift_needed(stats, dtype, per_line, shard).any())
    with shard.checks():  # with a group, an error on any rank is raised on every rank
        checks.flush()
    if not shard.any(checks.value("forbidden", False)):
        return False, stats, checks.value("shift")
    if dense:
        stats = V.allowed_maxima(cost3, stats)
    if feasible is not None:
        feasible(checks)
    checks.read("shift", shift_needed(stats, dtype, per_line, shard).any())
    with shard.checks():
        checks.flush()
    return True, stats, checks.value("shift")


def cost_shift(stats, dtype, per_line, unroll=False, shard=D.LOCAL, cost3=None, masses=None, take=None):
    """Offsets ``(r, s)`` that every step subtracts from the cost, or None.

    ``stats``: the lines' extreme allowed entries (``check_cost_values``).
    Potentials are about as large as the cost entries, so in floating point
    they carry an absolute error of ``ulp(max |C|)``, ``ulp(max |C|)/eps``
    in the plan's exponents: ruinous for ``C + 1e6`` in fp32. Subtracting
    offsets keeps the potentials as small as the differences the plan
    depends on. When the offsets are not larger than those differences
    (most costs: [0, 1], ``-S``) there is nothing to gain and None is
    returned (no work per step).

    ``per_line`` (problems invariant to adding constants to rows and
    columns): ``r_i = min_j C_ij`` and ``s_j = min_i C_ij - min C``; the
    steps then subtract with compensated arithmetic. Otherwise one constant
    ``min C`` per problem in ``r`` and ``s = None``. Problems of a batch
    that gain nothing get zero offsets. The offsets are constants of the solve (any give
    the same plan), detached except with ``unroll``, where a few iterations
    of some problems (the dummy partial) do depend on them.

    ``cost3``: the dense cost, if it is one; then ``s_j = min_i (C_ij - r_i)``
    exactly (one more pass, only where offsets are taken): ``min_i C_ij -
    min C`` can be far off when a column's only allowed entries lie in
    shifted rows. With ``masses = (a, b)`` too (either may be None: all
    lines carry mass), both minima skip zero-mass lines: a far-off entry
    in a column that receives nothing would otherwise set the row offsets,
    and every live entry of the row would lose precision to it.

    ``shard``: for one rank's block of a cost split across a process group,
    completes each extreme across the ranks, so every rank takes the whole
    cost's offsets and the same decision.

    ``take``: whether any problem needs offsets (``shift_needed(...).any()``,
    read by the caller with its other checks); None reads it here (one host
    sync). Under ``torch.compile`` the offsets are always returned, zero for
    the problems that do not need them: zero offsets change no iterate, and
    the graph does not branch on values.
    """
    compiling = V.compiling()
    if take is not None and not take and not compiling:  # decided by the caller: no work here
        return None
    row_min, row_max, col_min, col_max = (x if unroll else x.detach() for x in stats)
    row_min, row_max, col_min, col_max = (x.to(dtype) for x in (row_min, row_max, col_min, col_max))
    row_min, row_max = shard.low(row_min, D.COLS), shard.peak(row_max, D.COLS)
    col_min, col_max = shard.low(col_min, D.ROWS), shard.peak(col_max, D.ROWS)

    finite = _finite
    big = shift_needed(stats, dtype, per_line, shard)
    if compiling:
        take = True
    elif take is None:
        take = bool(big.any())  # one host sync
    if not take:
        return None
    lo = shard.low(finite(row_min, math.inf).amin(-1), D.ROWS)
    if not per_line:
        return finite(lo, 0.0).masked_fill(~big, 0.0).unsqueeze(-1).expand(row_min.shape), None
    keep = big.unsqueeze(-1)
    if isinstance(cost3, torch.Tensor):
        a, b = (None, None) if masses is None else masses
        # One working copy, changed in place: the live columns' row minima, then the column
        # minima of the row-shifted cost over live rows.
        with torch.no_grad():
            work = cost3.detach().to(dtype, copy=True)
            if b is not None:
                work.masked_fill_((b <= 0).unsqueeze(-2), math.inf)
                low, arg = work.min(-1)
        if b is not None:
            # unroll: the same minima, differentiable (gathered from the cost, no second copy)
            low = cost3.gather(-1, arg.unsqueeze(-1)).squeeze(-1).to(dtype) if unroll else low
            row_min = shard.low(low, D.COLS)
        r = finite(row_min, 0.0).masked_fill(~keep, 0.0)
        with torch.no_grad():
            work.sub_(r.detach().unsqueeze(-1))
            if a is not None:
                work.masked_fill_((a <= 0).unsqueeze(-1), math.inf)
            s = shard.low(work.amin(-2), D.ROWS)
        del work
    else:
        r = finite(row_min, 0.0).masked_fill(~keep, 0.0)
        s = col_min - lo.unsqueeze(-1)
    return r, finite(s, 0.0).masked_fill(~keep, 0.0)


def start_potentials(init, shift, shape, dtype, device):
    """Initial shifted potentials: the caller's ``init`` (zeros if None) minus the offsets.

    Starting from 0 in the cost's own units (not in shifted units) keeps the
    first iterates those of the textbook algorithm, e.g. SwAV's three steps.
    Infinite entries of ``init`` (a zero-mass or all-forbidden line in an
    earlier result) carry no information: they start at 0 too.
    """
    B, N, M = shape
    if init is None:
        init = tuple(torch.zeros((B, n), dtype=dtype, device=device) for n in (N, M))
    f, g = (pot.masked_fill(~torch.isfinite(pot), 0.0) for pot in init)
    rf, rg = in_cost_units(torch.zeros_like(f), torch.zeros_like(g), shift)
    return f - rf, g - rg


class Problem:
    """Base of the problem types: ``run`` defaults to ``count`` calls of ``step``."""

    def run(self, eps, count):
        for _ in range(count):
            self.step(eps)

    def restart(self, state):
        """Back to ``state`` (the attributes at the start of the loop) to solve again with new steps."""
        self.__dict__.update(state)

    def final_checks(self, eps):
        """Checks of the final state, ``[(ok, fail)]`` as for ``V.Verdicts.add`` (read with the error)."""
        return []

    def mark(self):
        """Remember the potentials (only change-based errors need it)."""


def run_loop(problem, eps, n_iters, tol, eps_schedule, solver):
    """Run ``eps_schedule`` then ``n_iters`` iterations at ``eps``; returns ``(iterations, error)``.

    With ``tol`` the error is checked every ``CHECK_EVERY`` iterations at the
    final eps (one host sync per check) and the loop stops once every
    problem of the batch is below it; the error of the returned state is
    always computed. Iterations between checks go to ``problem.run`` in one
    call, so a fused backend can run them in one launch.

    A non-finite error raises ``FloatingPointError``. With ``tol=None`` that
    is the one host read of the loop, shared with ``problem.final_checks``.
    The deferred fast path's verdict (``steps.trusted``) is read with the
    checks: if a mat-vec was not trustworthy the solve is redone from the
    start with the adaptive steps (``steps.adapt()``). Under
    ``torch.compile`` nothing is read: a non-finite error is returned as it
    is (``converged`` is then False).
    """
    start = dict(problem.__dict__)
    while True:
        it, err, trusted = _iterate(problem, eps, n_iters, tol, eps_schedule, solver)
        if trusted and not V.compiling():
            final = problem.final_checks(eps)
            if tol is None or final:  # (with tol the error was read by the last check)
                trusted = _final_checks(problem, final, err if tol is None else None, solver, it, eps)
        if trusted:
            finish = getattr(problem.steps, "stop_deferring", None)
            if finish is not None:  # later passes (value, mass) check their own products
                finish()
            return it, err
        problem.steps.adapt()
        problem.restart(start)


def _final_checks(problem, final, err, solver, it, eps):
    """One host read of the final state: ``final`` checks, ``err`` finite (unless None) and the
    deferred steps' verdict; returns whether those steps were trustworthy."""
    trusted = _trusted(problem)
    doubt = torch.zeros((), dtype=torch.bool) if trusted is None else ~trusted
    checks = V.Verdicts()
    # Verdicts on the state of an untrusted run mean nothing: they pass, and it is redone.
    if err is not None:
        checks.add(torch.isfinite(err) | doubt.to(err.device), lambda: _non_finite(solver, it, eps))
    for ok, fail in final:
        checks.add(ok | doubt, fail)
    if trusted is not None:
        checks.read("trusted", trusted)
    checks.flush()
    return checks.value("trusted", True)


def _trusted(problem):
    """The deferred fast path's on-device verdict, or None (other steps)."""
    return getattr(problem.steps, "trusted", None)


def _non_finite(solver, it, eps):
    raise FloatingPointError(f"{solver}: non-finite marginal error at iteration {it}; "
                             f"check the cost scale against eps={eps}")


def _iterate(problem, eps, n_iters, tol, eps_schedule, solver):
    """The iterations; returns ``(iterations, error, trusted)``.

    With ``tol``, a check that finds the deferred fast path untrustworthy
    goes back to the previous check's state and continues with the
    adaptive steps; before the first check it returns ``trusted=False``
    (``run_loop`` starts again).
    """
    saved = None  # (iteration, problem state, steps state) at the last check
    problem.mark()
    for e in eps_schedule:
        problem.step(e)
    start = it = len(eps_schedule)
    total = start + n_iters
    err = None
    while it < total:
        if tol is None:
            # Without checks the "previous check" is the previous iteration.
            problem.run(eps, total - it - 1)
            problem.mark()
            problem.run(eps, 1)
            it = total
        else:
            nxt = min(total, start + CHECK_EVERY * ((it - start) // CHECK_EVERY + 1))
            problem.run(eps, nxt - it)
            it = nxt
        err = problem.error(eps)
        if tol is None:
            break
        if V.compiling():  # a traced loop cannot stop on a value: run every iteration
            problem.mark()
            continue
        flags = [torch.isfinite(err).all(), (err <= tol).all()]
        trusted = _trusted(problem)
        if trusted is not None:
            flags.append(trusted)
        got = torch.stack(flags).tolist()  # the check's one host sync
        if trusted is not None and not got[2]:
            if saved is None:
                return it, err, False
            it = saved[0]
            problem.__dict__.update(saved[1])
            problem.steps.restore(saved[2])
            problem.steps.stop_deferring()  # the kernel of that state, now checked at every half-step
            continue
        if not got[0]:
            _non_finite(solver, it, eps)
        if got[1]:
            break
        problem.mark()
        if trusted is not None:
            saved = (it, dict(problem.__dict__), problem.steps.snapshot())
    return it, err, True


def converged(err, tol, scale):
    """``err <= tol``, or ``err <= 1e-3 * scale`` when ``tol`` is None."""
    return err <= (tol if tol is not None else 1e-3 * scale)


def max_change(new, old):
    """Largest change over entries finite in both (``(B,)``); infinite potentials are zero-mass entries."""
    ok = torch.isfinite(new) & torch.isfinite(old)
    return torch.where(ok, (new - old).abs(), torch.zeros_like(new)).amax(-1)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on an envelope gradient whose own derivative would be wrong: refuse it loudly."""

    @staticmethod
    def forward(x, *inputs):
        # ``inputs`` (the solve's differentiable inputs) only make the output part of the graph.
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Nothing to save: the backward pass only raises (needed for ``torch.func`` transforms)."""

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("grad='envelope' gives exact first derivatives only: its gradient treats the "
                           "optimal potentials as constants, so differentiating it again "
                           "(create_graph=True) would be wrong; use grad='unroll' (torch backend) for "
                           "higher-order derivatives")


def _in_dtype(grad, dtype):
    """``grad`` cast to the cost's dtype; an entry beyond its range (float16) is an error, not inf."""
    top = torch.finfo(dtype).max
    if top < torch.finfo(grad.dtype).max and bool((grad.abs() > top).any()):
        raise ValueError(f"d value / d cost has entries up to {float(grad.abs().max()):.4g}, beyond the "
                         f"largest {dtype} ({top:.4g}): the plan does not fit the cost's dtype; pass the "
                         f"cost in float32")
    return grad.to(dtype)


class EnvelopeValue(torch.autograd.Function):
    """``value`` of a solved problem whose gradient is given by the envelope theorem.

    ``terms(cost, a, b) -> (value, grad_a, grad_b, fp, gp)`` evaluates the
    objective at the fixed potentials; the backward pass returns
    ``upstream x plan`` for the cost (one plan materialisation through the
    backend's ``plan`` step, no graph through the iterations) and
    ``upstream x grad_a|b`` for the marginals. A second derivative through
    it raises (see :class:`_FirstOrderOnly`). Written with ``setup_context``
    so that ``torch.func.grad`` works; the potentials and marginal
    gradients ride along as non-differentiable outputs (empty when absent).
    """

    @staticmethod
    def forward(cost, a, b, terms, steps, eps, shift):
        with torch.no_grad():
            value, da, db, fp, gp = terms(cost, a, b)
        # Distinct outputs made here (one empty tensor returned twice breaks torch.compile's tracing of
        # the Function; potentials computed before the call, as partial_ot's, fail torch.func.grad).
        da = value.new_zeros(0) if da is None else da
        db = value.new_zeros(0) if db is None else db
        return value, fp.clone(), gp.clone(), da, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        cost, a, b, _, steps, eps, shift = inputs
        _, fp, gp, da, db = output
        ctx.steps, ctx.eps = steps, eps
        ctx.mark_non_differentiable(fp, gp, da, db)
        # Every tensor the backward uses is saved, and only those that exist (torch.compile fails on
        # saved empty outputs and on offsets captured as attributes).
        offsets = () if shift is None else tuple(x for x in shift if x is not None)
        # The marginals only as inputs of a second derivative's guard (unused by partial_ot's forward).
        marginals = tuple(x for x in (a, b) if x.requires_grad)
        ctx.layout = (da.numel() > 0, db.numel() > 0, shift is not None, len(offsets), len(marginals))
        ctx.save_for_backward(cost, fp, gp, *(x for x in (da, db) if x.numel() > 0), *marginals, *offsets)

    @staticmethod
    def backward(ctx, grad_value, *_):
        cost, fp, gp, *rest = ctx.saved_tensors
        has_da, has_db, shifted, n_offsets, n_marginals = ctx.layout
        da, db = (rest.pop(0) if there else None for there in (has_da, has_db))
        marginals, rest = rest[:n_marginals], rest[n_marginals:]
        shift = (rest[0], rest[1] if n_offsets == 2 else None) if shifted else None
        grad_cost = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cost = _in_dtype(ctx.steps.plan(cost.detach(), fp, gp, ctx.eps, scale=grad_value.detach(),
                                                 shift=shift), cost.dtype)
        if ctx.needs_input_grad[1] and da is not None:
            grad_a = grad_value.unsqueeze(-1) * da
        if ctx.needs_input_grad[2] and db is not None:
            grad_b = grad_value.unsqueeze(-1) * db
        if torch.is_grad_enabled():  # create_graph=True
            inputs = [x for x in (cost, *marginals) if x.requires_grad]
            grad_cost, grad_a, grad_b = (None if x is None else _FirstOrderOnly.apply(x, *inputs)
                                         for x in (grad_cost, grad_a, grad_b))
        return grad_cost, grad_a, grad_b, None, None, None, None


def value_of(grad, cost3, a, b, terms, steps, eps, shift):
    """A lazy ``value`` for a result: envelope Function, plain autograd, or detached."""
    if grad == "envelope":
        if not isinstance(cost3, torch.Tensor):  # FeatureCost: gradients go to its features
            return lambda: cost3.envelope_value(a, b, terms, steps, eps, shift)
        return lambda: EnvelopeValue.apply(cost3, a, b, terms, steps, eps, shift)[0]
    if grad == "unroll":
        return lambda: terms(cost3, a, b)[0]

    def detached():
        with torch.no_grad():
            return terms(cost3.detach(), a.detach(), b.detach())[0]
    return detached
