"""Solver results: potentials and diagnostics; plans materialised on first access.

Gradients: with ``grad="unroll"`` every tensor of a result is differentiable
(autograd through the iterations). With ``grad="envelope"`` only ``value`` is
(its gradient w.r.t. the cost is the plan); ``plan``, ``log_plan`` and
``transport_cost`` are computed from detached potentials and cost. With
``grad="none"`` nothing carries gradient.
"""
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch

from ._backend import get_steps
from ._distributed import LOCAL, ROWS
from .solvers._numerics import no_mass


class cached_property:
    """``functools.cached_property`` without its lock, so that ``torch.compile`` can trace it.

    (Python < 3.12 takes an ``RLock`` on every first access, which Dynamo
    cannot enter.) The value is stored in the instance's ``__dict__`` under
    the property's name, as functools does.
    """

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        cache = obj.__dict__
        if self.name not in cache:
            cache[self.name] = self.fn(obj)
        return cache[self.name]


@dataclass(frozen=True, repr=False, eq=False)
class _PlanResult:
    f: torch.Tensor
    g: torch.Tensor
    n_iters: int
    marginal_error: torch.Tensor
    converged: torch.Tensor
    # Private: what the lazy fields are computed from.
    _cost: torch.Tensor = field(compare=False)  # (B, N, M)
    _fp: torch.Tensor = field(compare=False)  # row potential with reference weights folded in, (B, N)
    _gp: torch.Tensor = field(compare=False)  # (B, M)
    _eps: float = field(compare=False)
    _batched: bool = field(compare=False)
    _steps: Any = field(compare=False)
    _differentiable: bool = field(compare=False)
    _value_fn: Optional[Callable] = field(default=None, compare=False)
    _shift: Any = field(default=None, compare=False)  # (r, s) offsets the steps subtract from the cost
    _shard: Any = field(default=LOCAL, compare=False)  # layout across a process group (data-parallel)

    def _out(self, x):
        return x if self._batched else x.squeeze(0)

    def _compute(self, fn):
        if self._differentiable:
            return fn(self._cost, self._fp, self._gp, self._eps, shift=self._shift)
        with torch.no_grad():
            return fn(self._cost.detach(), self._fp.detach(), self._gp.detach(), self._eps, shift=self._shift)

    @cached_property
    def log_plan(self):
        """``(…, N, M)`` log of the plan; ``-inf`` exactly where the cost is ``+inf``."""
        return self._out(self._compute(self._steps.log_plan))

    @cached_property
    def plan(self):
        """``(…, N, M)`` transport plan."""
        return self._out(self._compute(self._steps.plan))

    def _plan_times(self, scale):
        """``scale`` (B,) times the plan, as a tensor the caller owns; ``plan`` stays the plan.

        Scaled as it is formed (the torch fast path: in the cached kernel's
        buffer), so a caller that wants ``scale * plan`` pays no extra pass
        over the plan, nor a second (…, N, M) buffer.
        """
        if "plan" in self.__dict__:
            return self._out(self.plan * scale.to(self.plan.dtype)[:, None, None])
        return self._out(self._compute(functools.partial(self._steps.plan, scale=scale)))

    @cached_property
    def transport_cost(self):
        """``(…,)`` ``<plan, cost>`` (forbidden entries contribute 0)."""
        return self._out(self._compute(self._steps.plan_cost))

    @cached_property
    def value(self):
        """``(…,)`` regularised OT objective; its gradient w.r.t. the cost is the plan."""
        return self._out(self._value_fn())

    def __getstate__(self):
        """Pickled with ``value`` computed and everything detached (no closures, no process group).

        An unpickled result carries no gradient; its lazy fields are
        recomputed with the reference steps on first access.
        """
        def detached(x):
            return x.detach() if isinstance(x, torch.Tensor) else x

        state = {f.name: detached(getattr(self, f.name)) for f in fields(self)}
        state.update(_value_fn=None, _steps=None, _differentiable=False, _shard=LOCAL,
                     _shift=None if self._shift is None else tuple(detached(x) for x in self._shift))
        state["_lazy"] = {k: detached(v) for k, v in self.__dict__.items()
                          if k in ("plan", "log_plan", "transport_cost", "mass")}
        state["_lazy"]["value"] = detached(self.value)
        return state

    def __setstate__(self, state):
        lazy = state.pop("_lazy")
        for name, x in state.items():
            object.__setattr__(self, name, x)
        cost = self._cost
        object.__setattr__(self, "_steps", get_steps("torch") if isinstance(cost, torch.Tensor)
                           else cost.steps("torch"))
        self.__dict__.update(lazy)  # cached_property values

    def __repr__(self):
        shape = tuple(self._cost.shape) if self._batched else tuple(self._cost.shape[1:])
        conv = self.converged
        conv_s = str(bool(conv.all())) if conv.numel() == 1 else f"{int(conv.sum())}/{conv.numel()}"
        return (f"{type(self).__name__}(shape={shape}, n_iters={self.n_iters}, "
                f"marginal_error={self.marginal_error.max().item():.3g}, converged={conv_s})")


@dataclass(frozen=True, repr=False, eq=False)
class SinkhornResult(_PlanResult):
    """Result of :func:`ot_losses.sinkhorn`.

    Attributes:
        f: (…, N) row potentials. g: (…, M) column potentials; the plan is
            ``a_i b_j exp((f_i + g_j - C_ij) / eps)``.
        plan, log_plan: (…, N, M), materialised on first access.
        value: (…,) ``<P, C> + eps KL(P || a b^T)`` (+ ``rho KL`` marginal
            penalties when unbalanced).
        transport_cost: (…,) ``<P, C>``.
        n_iters: iterations run (eps-scaling steps included).
        marginal_error: (…,) L1 marginal violation (balanced) or largest
            potential change between the last two checks (unbalanced).
        converged: (…,) bool, ``marginal_error`` below ``tol`` (or below
            1e-3 x mass, resp. 1e-3 x eps, when ``tol`` is None).
    """


@dataclass(frozen=True, repr=False, eq=False)
class PartialOTResult(_PlanResult):
    """Result of :func:`ot_losses.partial_ot`.

    Attributes:
        plan, log_plan: (…, N, M) plan carrying ``mass``; row sums <= a,
            column sums <= b.
        transport_cost: (…,) ``<P, C>``. value: (…,) the regularised
            objective of the chosen method (gradient w.r.t. cost = plan).
        mass: (…,) mass transported by the returned plan.
        f, g: (…, N), (…, M) potentials (``method="bregman"``: the plan is
            ``exp((f_i + g_j - C_ij)/eps)`` with the total-mass multiplier
            folded into ``f``; ``"dummy"``: ``a_i b_j exp((f_i + g_j - C_ij)/eps)``).
        n_iters, marginal_error, converged: as for :class:`SinkhornResult`
            (bregman: potential change; dummy: extended-problem L1 error).
    """

    @cached_property
    def mass(self):
        """``(…,)`` total mass of the returned plan, from its row sums (one pass; the plan is not built).

        Over every rank's block: collective with a process group (the row sums are
        complete across a column split, partial across a row split).
        """

        def total(cost, f, g, eps, shift=None):
            lr = self._steps.row_lse(cost, g, eps, shift=shift)
            return torch.exp(no_mass((f + lr) / eps)).sum(-1)
        return self._shard.total(self._out(self._compute(total)), ROWS)


@dataclass(frozen=True, repr=False, eq=False)
class MultiAssignmentResult:
    """Result of :func:`ot_losses.multi_assignment_sinkhorn`.

    Attributes:
        assignment: (…, N, M) ``X = sigmoid((f_i + g_j - C_ij) / eps)``,
            entries in [0, 1], rows summing to k, columns to ``k N b_j``.
        f, g: (…, N), (…, M) potentials.
        n_iters, marginal_error ((…,) L1 violation of the row and column
            constraints), converged ((…,) bool).
    """

    assignment: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iters: int
    marginal_error: torch.Tensor
    converged: torch.Tensor

    def __repr__(self):
        conv = self.converged
        conv_s = str(bool(conv.all())) if conv.numel() == 1 else f"{int(conv.sum())}/{conv.numel()}"
        return (f"MultiAssignmentResult(shape={tuple(self.assignment.shape)}, n_iters={self.n_iters}, "
                f"marginal_error={self.marginal_error.max().item():.3g}, converged={conv_s})")
