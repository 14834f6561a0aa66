"""Entropic partial optimal transport: Bregman projections or the dummy-point formulation."""
from typing import Any, Optional, Union

import torch

from .. import _distributed as D
from .. import _validate as V
from .._backend import resolve_backend
from ..results import PartialOTResult
from ._loop import (GRADS, Problem, converged, cost_checks, cost_shift, fold, make_steps, max_change,
                    run_loop, settle, unbatch, value_of)
from ._numerics import in_cost_units, no_mass, weighted_exp
from ._types import CostLike, Scalar
from ._update import Update
from .sinkhorn import _dot

METHODS = ("bregman", "dummy")


def _constant(shift):
    """The one offset per problem (B,) taken out of the cost, or 0."""
    return 0.0 if shift is None else shift[0][..., 0]


class _BregmanProblem(Problem):
    """Block dual ascent for ``min <P, C> + eps sum P (log P - 1)`` s.t. ``P 1 <= a``, ``P^T 1 <= b``, mass.

    With ``P_ij = exp((f_i + g_j + t - C_ij)/eps)``, ``f, g <= 0`` (caps) and
    ``t`` (total mass) are maximised in turn in closed form, in the order of
    POT's Bregman projections (rows, columns, mass), so both converge to the
    same plan. The mass update reuses the column pass's log-sum-exp: the
    column pass leaves ``w = (g + L_col) / eps``, whose log-sum-exp gives
    ``t``, computed where it is needed (the next row pass: in the kernel).
    The steps see the cost minus a constant ``c`` (``shift``), which ``t``
    absorbs: ``t`` here is ``t - c``.
    """

    def __init__(self, steps, cost, log_a, log_b, log_mass, eps, shift, shard=D.LOCAL):
        self.steps, self.cost, self.log_a, self.log_b, self.log_mass = steps, cost, log_a, log_b, log_mass
        self.shift, self.shard = shift, shard
        B, N, M = cost.shape
        self.f = cost.new_zeros((B, N), dtype=log_a.dtype)
        self.g = cost.new_zeros((B, M), dtype=log_a.dtype)
        self._eps0 = self._eps = eps  # the eps of w (partial_ot has no eps schedule: one eps throughout)
        self.w = self._start_w()
        self._old = None
        self._elog = (None, None, None)

    def _start_w(self):
        eps = self._eps0
        return no_mass((self.g + self.steps.col_lse(self.cost, self.f, eps, shift=self.shift)) / eps)

    def restart(self, state):
        super().restart(state)
        self.w = self._start_w()  # computed with the steps being replaced

    @property
    def t(self):
        """The mass multiplier of the current potentials (B,)."""
        eps = self._eps
        return eps * self.log_mass - eps * self.shard.lse(self.w, D.COLS)

    def run(self, eps, count):
        if count == 0:
            return
        if eps != self._elog[0]:  # loop invariants
            self._elog = (eps, eps * self.log_a, eps * self.log_b)
        _, elog_a, elog_b = self._elog
        # Scratch for t and w, written in place by the Triton steps (the torch ones return new tensors).
        B, M = self.g.shape
        out = (self.g.new_empty((B,)), self.g.new_empty((B, M)))
        rows = Update(elog_cap=elog_a, log_mass=self.log_mass, w=self.w, out=out)
        cols = Update(elog_cap=elog_b, out=out)
        for _ in range(count):
            # f = min(0, fold(-L_row(g + t), log a)); g = min(0, fold(-(L_col(f) + t), log b)):
            # a zero-mass row or column gets -inf even when it is entirely forbidden (-inf - -inf).
            self.f, t = self.steps.row_lse(self.cost, self.g, eps, shift=self.shift, update=rows)
            self.g, self.w = self.steps.col_lse(self.cost, self.f, eps, shift=self.shift,
                                                update=cols._replace(t=t))
            rows = rows._replace(w=self.w)
        self._eps = eps

    def step(self, eps):
        self.run(eps, 1)

    def mark(self):
        self._old = (self.f, self.g, self.t)

    def error(self, eps):
        f0, g0, t0 = self._old
        return torch.stack([self.shard.peak(max_change(self.f, f0), D.ROWS),
                            self.shard.peak(max_change(self.g, g0), D.COLS), (self.t - t0).abs()]).amax(0)

    def plan_potentials(self, eps):
        return self.f + self.t.unsqueeze(-1), self.g

    def potentials(self, eps):
        """``(f, g)`` in the cost's units with the mass multiplier folded into ``f``."""
        fp, gp = self.plan_potentials(eps)
        return in_cost_units(fp, gp, self.shift)

    def terms(self, eps):
        steps, shift, shard = self.steps, self.shift, self.shard
        fp, gp = self.plan_potentials(eps)

        def terms(cost, a, b):
            r = torch.exp(no_mass((fp + steps.row_lse(cost, gp, eps, shift=shift)) / eps))
            c = torch.exp(no_mass((gp + steps.col_lse(cost, fp, eps, shift=shift)) / eps))
            # eps log P = f + g + t - C: the constant taken out of C comes back once per unit of mass.
            value = (shard.total(_dot(r, fp), D.ROWS) + shard.total(_dot(c, gp), D.COLS)
                     + (_constant(shift) - eps) * shard.sum(r, D.ROWS))
            return value, None, None, fp, gp
        return terms


class _DummyProblem(Problem):
    """Balanced Sinkhorn on the cost extended by one dummy row and column (Chapel et al. 2020).

    The dummy row carries ``sum b - mass``, the dummy column ``sum a - mass``
    and the dummy-dummy corner is forbidden, so the real block carries
    exactly ``mass``. With the dummy masses fixed, the real-to-dummy cost and
    a constant added to the real block only shift the objective: the steps
    see the real block minus its minimum and real-to-dummy entries of cost
    0, and ``value`` adds both back. The extended cost is never built: the
    potentials carry the dummy entry last, ``(B, N + 1)`` and ``(B, M + 1)``,
    and each half-step (``Update(dummy=True)``) is the backend's pass over
    the real block with the dummy terms added (in the Triton kernel, or by
    O(N + M) torch ops).
    """

    def __init__(self, steps, cost, log_a, log_b, log_ad, log_bd, shift, shard=D.LOCAL):
        self.steps, self.cost, self.shift, self.shard = steps, cost, shift, shard
        self.log_a, self.log_b, self.log_ad, self.log_bd = log_a, log_b, log_ad, log_bd
        self.log_ax = torch.cat([log_a, log_ad.unsqueeze(-1)], -1)
        self.log_bx = torch.cat([log_b, log_bd.unsqueeze(-1)], -1)
        B, N, M = cost.shape
        self.fx = cost.new_zeros((B, N + 1), dtype=log_a.dtype)  # the dummy-row potential last
        self.gx = cost.new_zeros((B, M + 1), dtype=log_a.dtype)  # the dummy-column potential last
        self._eps = self._updates = None

    f = property(lambda self: self.fx[..., :-1])
    fd = property(lambda self: self.fx[..., -1])
    g = property(lambda self: self.gx[..., :-1])
    gd = property(lambda self: self.gx[..., -1])

    def updates(self, eps):
        """Row and column updates at ``eps`` (loop invariants, rebuilt when eps changes)."""
        if eps != self._eps:
            self._updates = (Update(elog_h=eps * self.log_bx, dummy=True),
                             Update(elog_h=eps * self.log_ax, dummy=True))
            self._eps = eps
        return self._updates

    def _rows(self, eps):
        """``(L, L_dummy)``: the extended row pass's log-sum-exps (minus the new row potentials)."""
        lx = -self.steps.row_lse(self.cost, self.gx, eps, shift=self.shift, update=self.updates(eps)[0])
        return lx[..., :-1], lx[..., -1]

    def _cols(self, eps):
        lx = -self.steps.col_lse(self.cost, self.fx, eps, shift=self.shift, update=self.updates(eps)[1])
        return lx[..., :-1], lx[..., -1]

    def step(self, eps):
        rows, cols = self.updates(eps)
        self.fx = self.steps.row_lse(self.cost, self.gx, eps, shift=self.shift, update=rows)
        self.gx = self.steps.col_lse(self.cost, self.fx, eps, shift=self.shift, update=cols)

    def error(self, eps):
        lr, lrd = self._rows(eps)
        r = torch.exp(no_mass(fold(self.f + lr, self.log_a, eps) / eps))
        rd = torch.exp(no_mass(fold(self.fd + lrd, self.log_ad, eps) / eps))
        return self.shard.sum((r - self.log_a.exp()).abs(), D.ROWS) + (rd - self.log_ad.exp()).abs()

    def plan_potentials(self, eps):
        return fold(self.f, self.log_a, eps), fold(self.g, self.log_b, eps)

    def potentials(self, eps):
        """``(f, g)`` in the cost's units (the plan is ``a_i b_j exp((f_i + g_j - C_ij)/eps)``)."""
        return in_cost_units(self.f, self.g, self.shift)

    def terms(self, eps):
        f, g, fd, gd, shift, shard = self.f, self.g, self.fd, self.gd, self.shift, self.shard

        def terms(cost, a, b):
            lr, lrd = self._rows(eps)
            lc, lcd = self._cols(eps)
            ad, bd = self.log_ad.exp(), self.log_bd.exp()
            r, rd = weighted_exp(a, no_mass((f + lr) / eps)), weighted_exp(ad, (fd + lrd) / eps)
            c, cd = weighted_exp(b, no_mass((g + lc) / eps)), weighted_exp(bd, (gd + lcd) / eps)
            m_ext = shard.sum(a, D.ROWS) + ad
            dummies, dummy_pots = torch.stack([rd, cd], -1), torch.stack([fd, gd], -1)
            real_mass = m_ext - ad - bd
            value = (shard.total(_dot(r, f), D.ROWS) + shard.total(_dot(c, g), D.COLS)
                     + _dot(dummies, dummy_pots) - eps * (shard.sum(r, D.ROWS) + rd - m_ext ** 2)
                     + _constant(shift) * real_mass)
            fp, gp = self.plan_potentials(eps)
            return value, None, None, fp, gp
        return terms


def partial_ot(cost: CostLike, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *,
               mass: Union[Scalar, torch.Tensor], eps: Scalar = 0.05, n_iters: int = 200,
               tol: Optional[Scalar] = None, method: str = "bregman", dummy_cost: Optional[Scalar] = None,
               grad: str = "envelope", backend: str = "auto", process_group: Optional[Any] = None,
               shard_dim: Optional[int] = None) -> PartialOTResult:
    """Entropic partial optimal transport: move only ``mass`` from ``a`` to ``b``.

    Finds a plan ``P >= 0`` with ``P 1 <= a``, ``P^T 1 <= b`` and total mass
    ``mass`` minimising the entropic transport cost.

    - ``method="bregman"``: ``min <P, C> + eps sum P (log P - 1)``, the
      problem of Benamou et al. (2015) solved by POT's
      ``ot.partial.entropic_partial_wasserstein(a, b, C, reg=eps, m=mass)``;
      the plans agree where both converge. Solved in the log domain (POT works
      with ``exp(-C/eps)`` and returns NaN when it underflows; this does not).
    - ``method="dummy"``: the dummy-point formulation used by L2RM (Chapel et
      al. 2020): a balanced problem on the cost extended by a dummy row and
      column of cost ``dummy_cost`` (default ``100 * max finite C``), dummy
      row mass ``sum b - mass`` and dummy column mass ``sum a - mass``; the
      dummy-dummy corner is forbidden, so the returned real block carries
      exactly ``mass`` whatever the cost's offset or scale. (L2RM's literal
      corner cost ``2 * dummy_cost + max C`` lets mass leak through the
      corner unless ``max C >> eps``; it is not offered.) Its entropy also
      covers the dummy entries, so its plan differs from the bregman one by
      a few percent. The extended cost is never materialised.

    Args:
        cost: (N, M) or (B, N, M) floating tensor; ``+inf`` forbids an entry.
        a: (N,) or (B, N) non-negative weights (None = uniform 1/N).
        b: (M,) or (B, M) non-negative weights (None = uniform 1/M).
        mass: mass to transport, ``0 < mass <= min(sum a, sum b)``.
        eps: entropic regularisation in cost units (> 0).
        n_iters: maximum iterations (>= 1).
        tol: stopping threshold, checked every 10 iterations: the largest
            potential change between checks (bregman, cost units) or the L1
            error of the extended marginals (dummy). None: run ``n_iters``.
        method: ``"bregman"`` or ``"dummy"``.
        dummy_cost: cost of the dummy entries (dummy method only). The dummy
            masses being fixed, it adds ``dummy_cost * (sum a + sum b - 2 mass)``
            to ``value`` and leaves the plan unchanged; the default
            ``100 * max C`` passes its gradient to the largest cost entry.
        grad: ``"envelope"`` (d value / d cost = plan), ``"unroll"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        process_group, shard_dim: data-parallel solve of a cost split across
            the group's ranks on axis ``shard_dim`` (0 rows, 1 columns), as in
            :func:`ot_losses.sinkhorn`; ``mass``, ``value``, ``transport_cost``,
            ``marginal_error`` are global (and collective to access).

    Returns:
        PartialOTResult with ``plan``/``log_plan`` (…, N, M), ``mass``,
        ``transport_cost``, ``value`` (…,), ``n_iters``, ``marginal_error``,
        ``converged``.

    Example:
        >>> import torch
        >>> from ot_losses import partial_ot
        >>> cost = torch.rand(6, 6, dtype=torch.float64)
        >>> res = partial_ot(cost, mass=0.5, eps=0.05, n_iters=2000, tol=1e-10)
        >>> round(float(res.mass), 6), bool((res.plan.sum(1) <= 1 / 6 + 1e-9).all())
        (0.5, True)
    """
    shard = D.shard_of(cost, process_group, shard_dim)
    checks = V.Verdicts()  # value checks, read from the device together (one host sync)
    with shard.checks():  # with a group, an error on any rank is raised on every rank
        cost3, batched = V.check_cost(cost)
        eps, n_iters, tol = V.check_iterations(eps, n_iters, tol)
        V.check_choice(method, "method", METHODS)
        V.check_choice(grad, "grad", GRADS)
        V.check_grad_group(grad, process_group)
        aw = shard.marginal(a, "a", cost3, 1, batched)
        bw = shard.marginal(b, "b", cost3, 2, batched)
        if dummy_cost is not None:
            dummy_cost = V.check_positive_scalar(dummy_cost, "dummy_cost")
        name = resolve_backend(backend, cost3.device)
        V.check_grad_backend(grad, name)
        stats = cost_checks(cost3, checks)
    # Totals in float64: the dummy masses are differences of nearly equal sums (mass = min(sum a,
    # sum b) is common), and a float32 sum's rounding depends on the memory layout.
    ma, mb = shard.totals(aw.double(), bw.double(), check=(a is not None, b is not None), verdicts=checks)
    with shard.checks():
        m = V.check_mass(mass, ma.unsqueeze(-1), mb.unsqueeze(-1), verdicts=checks)  # totals as marginals
    log_dummy = ((mb - m).log(), (ma - m).log())
    ma, mb, m = (x.to(aw.dtype) for x in (ma, mb, m))

    def feasible(v):
        V.check_feasible(cost3, aw, bw, balanced=False, complete=shard.total, offsets=shard.offsets,
                         verdicts=v)
        V.check_partial_feasible(cost3, aw, bw, m, complete=shard.total, verdicts=v)
    dtype = V.compute_dtype(cost3)
    forbidden, stats, take = settle(checks, shard, cost3, stats, dtype, per_line=False, feasible=feasible)

    # A fixed transported mass makes the plan invariant to a constant added to the cost (not to
    # row or column offsets: the marginals are only bounds).
    shift = cost_shift(stats, dtype, per_line=False, unroll=grad == "unroll", shard=shard, take=take)
    steps = shard.steps(make_steps(name, grad, cost3, dtype, shift, forbidden, row_min=stats[0],
                                   deferred=shard is D.LOCAL))
    unroll = grad == "unroll"
    loop_cost = cost3 if unroll else cost3.detach()
    la, lb = (aw, bw) if unroll else (aw.detach(), bw.detach())
    with torch.set_grad_enabled(unroll):
        if method == "bregman":
            problem: Union[_BregmanProblem, _DummyProblem] = _BregmanProblem(
                steps, loop_cost, la.log(), lb.log(), m.log(), eps, shift, shard)
        else:
            ld, lc = (x.to(aw.dtype) if unroll else x.detach().to(aw.dtype) for x in log_dummy)
            problem = _DummyProblem(steps, loop_cost, la.log(), lb.log(), ld, lc, shift, shard)
        iters, err = run_loop(problem, eps, n_iters, tol, [], "partial_ot")
        err = checks.poison(err)  # under compile: a failed value check reads as NaN
    fp, gp = problem.plan_potentials(eps)
    f, g = problem.potentials(eps)
    if method == "bregman":
        scale = torch.full_like(err, eps)
    else:
        scale = (ma + mb - m).detach()
    conv = converged(err, tol, scale)
    value = value_of(grad, cost3, aw, bw, problem.terms(eps), steps, eps, shift)
    if method == "dummy":
        value = _with_dummy_cost(value, cost3, ma, mb, m, dummy_cost, grad, shard)
    return PartialOTResult(
        f=unbatch(f, batched), g=unbatch(g, batched), n_iters=iters,
        marginal_error=unbatch(err, batched), converged=unbatch(conv, batched),
        _cost=loop_cost, _fp=fp, _gp=gp, _eps=eps, _batched=batched,
        _steps=steps, _differentiable=unroll, _value_fn=value, _shift=shift, _shard=shard)


def _with_dummy_cost(value_fn, cost3, ma, mb, m, dummy_cost, grad, shard):
    """``value`` plus the real-to-dummy transport ``xi (sum a + sum b - 2 mass)`` (``ma``, ``mb`` the sums).

    ``xi = dummy_cost``, or ``100 * max C`` computed with autograd so that
    its gradient reaches the largest entry (none with ``grad="none"``; with a
    group, the entry on whichever rank holds it).
    """

    def value():
        with torch.set_grad_enabled(grad != "none" and torch.is_grad_enabled()):
            if dummy_cost is not None:
                xi = torch.full((cost3.shape[0],), dummy_cost, dtype=ma.dtype, device=ma.device)
            elif not isinstance(cost3, torch.Tensor):  # FeatureCost: streamed, differentiable
                xi = 100 * cost3.max_cost().to(ma.dtype)
            else:
                finite = cost3.masked_fill(~torch.isfinite(cost3), float("-inf"))
                local = finite.amax(dim=(-2, -1)).to(ma.dtype)
                top = shard.peak_all(local.detach())
                # Only the rank holding the maximum keeps the autograd path to it.
                xi = 100 * torch.where(local == top, local, top)
            return value_fn() + xi * (ma + mb - 2 * m)
    return value
