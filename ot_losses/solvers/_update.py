"""Potential updates around a half-step: what a solver does with a log-sum-exp, fused into the step.

A half-step ``L = eps * lse_k((h'_k - C_rk) / eps)`` is followed in every
solver by O(N + M) work that turns ``L`` into the new potential (a sign, a
damping, a cap, a mass multiplier). Passed as ``update=`` to a half-step,
an :class:`Update` makes the step return the new potential itself, so the
Triton kernels do that work in their epilogue: one launch per half-step,
nothing else per iteration. Every field is a loop invariant (``eps * log w``
is computed once per eps by the solver) or an O(N + M) operand.

The functions below are the semantics in plain torch ops: the torch twins
(``_torch_steps``) are them, and a namespace without fused updates (the
torch fast path, feature costs, sharded solves, whose log-sum-exps are
only complete after the cross-rank combine) gets them around its plain
steps through :class:`Composed`.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _distributed as D
from ._numerics import no_mass


class Update(NamedTuple):
    """How a half-step turns its log-sum-exp ``L`` into a new potential.

    Row pass: ``h`` (B, K = M), outputs (B, R = N); column pass: the reverse.
    ``fold(x, e) = x + e``, exactly ``-inf`` where ``e`` is (a zero weight, even if ``x`` is inf).

    - ``elog_h`` (B, K): ``h' = fold(h, elog_h)`` (``eps * log`` of the reduced side's weights);
    - ``log_mass`` (B,) with ``w`` (B, K) (partial bregman, row pass):
      ``t = eps * log_mass - eps * lse_k w_k``, ``h' = h + t``; returns ``(new, t)``;
    - ``new = -damp * (L + t)`` (``t`` (B,) given: bregman column pass; else 0),
      ``- (1 - damp) * off`` with ``damp_offset`` (``off``: the output side's cost offsets);
    - ``elog_cap`` (B, R): ``new = min(0, fold(new, elog_cap))``;
      with ``t`` the step returns ``(new, w)``, ``w = no_mass((new + L) / eps)``;
    - ``dummy``: the cost extended by a dummy line on each side (entries 0,
      the corner forbidden); ``h`` and the output carry it last: (B, K + 1), (B, R + 1);
    - ``bias`` (B, R), sigmoid steps only: ``new = p + bias - L1 + L0`` with
      ``p`` the output side's potential, and ``bias`` itself where it is infinite.

    ``out``: ``(t, w)`` preallocated (B,) / (B, R) tensors the Triton steps
    may write those auxiliary results into (then they return them); entries
    may be None. Solvers must use the returned tensors only.
    """

    elog_h: Optional[torch.Tensor] = None
    damp: float = 1.0
    damp_offset: bool = False
    elog_cap: Optional[torch.Tensor] = None
    log_mass: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    t: Optional[torch.Tensor] = None
    dummy: bool = False
    bias: Optional[torch.Tensor] = None
    out: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None


def fold_in(x, elog):
    """``x + elog``, exactly ``elog`` (-inf) where it is -inf."""
    return torch.where(torch.isneginf(elog), elog, x + elog)


def prepare(h, eps, update, reduced, shard=D.LOCAL):
    """``(h', t)``: the reduced side's potential as the step reduces it (``t`` None without a mass)."""
    if update.elog_h is not None:
        h = fold_in(h, update.elog_h)
    t = None
    if update.log_mass is not None:
        t = eps * update.log_mass - eps * shard.lse(update.w, reduced)
        h = h + t.unsqueeze(-1)
    return h, t


def finish(L, eps, update, off=None):
    """The new potential from the log-sum-exp ``L``; ``(new, w)`` when ``update.t`` is given."""
    new = L if update.t is None else L + update.t.unsqueeze(-1)
    new = -new if update.damp == 1 else -update.damp * new
    if update.damp_offset and off is not None:
        new = new - (1 - update.damp) * off
    if update.elog_cap is not None:
        new = fold_in(new, update.elog_cap).clamp(max=0.0)  # min(0, .); NaN stays NaN
    if update.t is not None:
        return new, no_mass((new + L) / eps)
    return new


def lse_update(plain, cost, h, eps, shift, update, by_row, shard=D.LOCAL):
    """``plain`` (a ``row_lse``/``col_lse`` without updates) followed by ``update``, in torch ops."""
    reduced = D.COLS if by_row else D.ROWS
    h, t = prepare(h, eps, update, reduced, shard)
    if update.dummy:
        hr, hd = h[..., :-1], h[..., -1:]
        block = plain(cost, hr, eps, shift=shift)
        real = eps * torch.logaddexp(block / eps, hd / eps)
        dummy = eps * shard.lse(hr / eps, reduced)  # the corner is forbidden: only real partners
        L = torch.cat([real, dummy.unsqueeze(-1)], -1)
    else:
        L = plain(cost, h, eps, shift=shift)
    off = None if shift is None else shift[0] if by_row else shift[1]
    new = finish(L, eps, update, off)
    return (new, t) if t is not None else new


def sigmoid_finish(l1, l0, p, update):
    """``p + bias - l1 + l0``, and ``bias`` where it is infinite (an empty or a full line)."""
    new = p + update.bias - l1 + l0
    return torch.where(torch.isinf(update.bias), update.bias, new)


def sigmoid_update(plain, cost, u, v, eps, shift, update, by_row):
    """``plain`` (a ``*_sigmoid_lse`` without updates) followed by ``update``, in torch ops."""
    l1, l0 = plain(cost, u, v, eps, shift=shift)
    return sigmoid_finish(l1, l0, u if by_row else v, update)


def takes_update(by_row, sigmoid=False):
    """Decorator: a plain half-step given the ``update=`` parameter, applied by torch ops (not fused).

    For the namespaces whose twins share ``_torch_steps``' signatures (the
    feature-cost steps); the wrapper keeps the plain step's name and docstring.
    """
    def wrap(plain):
        if sigmoid:
            def step(cost, u, v, eps, shift=None, update=None):
                if update is None:
                    return plain(cost, u, v, eps, shift=shift)
                return sigmoid_update(plain, cost, u, v, eps, shift, update, by_row)
        else:
            def step(cost, h, eps, shift=None, update=None):  # type: ignore[misc]
                if update is None:
                    return plain(cost, h, eps, shift=shift)
                return lse_update(plain, cost, h, eps, shift, update, by_row)
        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(step, attr, getattr(plain, attr))
        return step
    return wrap


class Composed:
    """A half-step namespace without fused updates, given ``update=`` by torch ops around its steps.

    ``shard``: the cross-rank reductions the dummy and mass terms need.
    """

    def __init__(self, steps, shard=D.LOCAL):
        self._steps, self._shard = steps, shard

    def __getattr__(self, name):
        return getattr(self._steps, name)

    def row_lse(self, cost, h, eps, shift=None, update=None):
        if update is None:
            return self._steps.row_lse(cost, h, eps, shift=shift)
        return lse_update(self._steps.row_lse, cost, h, eps, shift, update, True, self._shard)

    def col_lse(self, cost, h, eps, shift=None, update=None):
        if update is None:
            return self._steps.col_lse(cost, h, eps, shift=shift)
        return lse_update(self._steps.col_lse, cost, h, eps, shift, update, False, self._shard)

    def row_sigmoid_lse(self, cost, u, v, eps, shift=None, update=None):
        if update is None:
            return self._steps.row_sigmoid_lse(cost, u, v, eps, shift=shift)
        return sigmoid_update(self._steps.row_sigmoid_lse, cost, u, v, eps, shift, update, True)

    def col_sigmoid_lse(self, cost, u, v, eps, shift=None, update=None):
        if update is None:
            return self._steps.col_sigmoid_lse(cost, u, v, eps, shift=shift)
        return sigmoid_update(self._steps.col_sigmoid_lse, cost, u, v, eps, shift, update, False)
