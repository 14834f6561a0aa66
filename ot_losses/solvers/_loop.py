"""The one iteration loop every solver and backend shares, and the envelope gradient.

A solver describes its problem as a small object with ``step(eps)`` (one
full iteration: row update, then column update, through a namespace of
half-steps), ``error(eps)`` (``(B,)`` tensor) and ``mark()`` (remember the
potentials for a change-based error). The loop only schedules eps, checks
convergence every few iterations and stops.
"""
import torch

from .._backend import get_steps
from ._scaling import ScalingSteps

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


def make_steps(backend, grad, cost3, dtype, scaled=True):
    """Half-step namespace for a resolved backend and gradient mode.

    ``grad="unroll"`` keeps the plain differentiable reference steps; the torch
    backend otherwise uses the cached-kernel fast path when ``scaled``. A cost
    that is not a dense tensor (``FeatureCost``) brings its own reductions.
    """
    if not isinstance(cost3, torch.Tensor):
        return cost3.steps(backend)
    if backend == "torch" and grad != "unroll" and scaled:
        return ScalingSteps(cost3.detach(), dtype)
    return get_steps(backend)


class Problem:
    """Base of the problem types: ``run`` defaults to ``count`` calls of ``step``."""

    def run(self, eps, count):
        for _ in range(count):
            self.step(eps)

    def mark(self):
        """Remember the potentials (only change-based errors need it)."""


def run_loop(problem, eps, n_iters, tol, eps_schedule, solver):
    """Run ``eps_schedule`` then ``n_iters`` iterations at ``eps``; returns ``(iterations, error)``.

    With ``tol`` the error is checked every ``CHECK_EVERY`` iterations at the
    final eps and the loop stops once every problem of the batch is below it;
    the error of the returned state is always computed. Iterations between
    checks go to ``problem.run`` in one call, so a fused backend can run them
    in one launch.
    """
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
        if not torch.isfinite(err).all():
            raise FloatingPointError(f"{solver}: non-finite marginal error at iteration {it}; "
                                     f"check the cost scale against eps={eps}")
        if tol is not None and bool((err <= tol).all()):
            break
        problem.mark()
    return it, err


def converged(err, tol, scale):
    """``err <= tol``, or ``err <= 1e-3 * scale`` when ``tol`` is None."""
    return err <= (tol if tol is not None else 1e-3 * scale)


def max_change(new, old):
    """Largest change over entries finite in both (``(B,)``); infinite potentials are zero-mass entries."""
    ok = torch.isfinite(new) & torch.isfinite(old)
    return torch.where(ok, (new - old).abs(), torch.zeros_like(new)).amax(-1)


class EnvelopeValue(torch.autograd.Function):
    """``value`` of a solved problem whose gradient is given by the envelope theorem.

    ``terms(cost, a, b) -> (value, grad_a, grad_b, fp, gp)`` evaluates the
    objective at the fixed potentials; the backward pass returns
    ``upstream x plan`` for the cost (one plan materialisation through the
    backend's ``plan`` step, no graph through the iterations) and
    ``upstream x grad_a|b`` for the marginals.
    """

    @staticmethod
    def forward(ctx, cost, a, b, terms, steps, eps):
        with torch.no_grad():
            value, da, db, fp, gp = terms(cost, a, b)
        ctx.steps, ctx.eps = steps, eps
        ctx.has_da, ctx.has_db = da is not None, db is not None
        ctx.save_for_backward(cost, fp, gp, *(x for x in (da, db) if x is not None))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        cost, fp, gp, *rest = ctx.saved_tensors
        da = rest.pop(0) if ctx.has_da else None
        db = rest.pop(0) if ctx.has_db else None
        grad_cost = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cost = ctx.steps.plan(cost, fp, gp, ctx.eps, scale=grad_value).to(cost.dtype)
        if ctx.needs_input_grad[1] and da is not None:
            grad_a = grad_value.unsqueeze(-1) * da
        if ctx.needs_input_grad[2] and db is not None:
            grad_b = grad_value.unsqueeze(-1) * db
        return grad_cost, grad_a, grad_b, None, None, None


def value_of(grad, cost3, a, b, terms, steps, eps):
    """A lazy ``value`` for a result: envelope Function, plain autograd, or detached."""
    if grad == "envelope":
        if not isinstance(cost3, torch.Tensor):  # FeatureCost: gradients go to its features
            return lambda: cost3.envelope_value(a, b, terms, steps, eps)
        return lambda: EnvelopeValue.apply(cost3, a, b, terms, steps, eps)
    if grad == "unroll":
        return lambda: terms(cost3, a, b)[0]

    def detached():
        with torch.no_grad():
            return terms(cost3.detach(), a.detach(), b.detach())[0]
    return detached
