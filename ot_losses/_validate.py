"""Every input check of the public entry points, and every error message.

Shapes, dtypes and devices are checked before any value is read (reading
values syncs a GPU); value checks (NaN, sign, mass) come last, and the
solvers queue them on a :class:`Verdicts` that reads them all in one host
sync. Messages name the argument, what was expected and what was received.
Under ``torch.compile`` value checks cannot raise (docs/api.md).
"""
import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x):
    return tuple(x.shape)


def check_tensor(x, name):
    """``x`` must be a floating torch tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); "
                        f"got {x.dtype}")


def check_cost(cost, name="cost"):
    """Check the cost's type and shape; return it as ``(B, N, M)`` and whether it was batched.

    A :class:`~ot_losses.FeatureCost` (checked when built) is returned as its batched view.
    """
    if not isinstance(cost, torch.Tensor):
        from .features import FeatureCost
        if isinstance(cost, FeatureCost):
            return cost._as_batched(), cost.batched
        raise TypeError(f"{name} must be a torch.Tensor (or an ot_losses.FeatureCost); "
                        f"got {type(cost).__name__}")
    check_tensor(cost, name)
    if torch._C._functorch.is_batchedtensor(cost):
        # the loop's convergence checks and the fast path's re-anchoring branch on values
        raise ValueError(f"{name}: the solvers cannot run under torch.func.vmap (they branch on values "
                         f"between iterations); pass the stacked (B, N, M) cost instead, which solves "
                         f"every problem of the batch at once")
    if cost.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (N, M) or (B, N, M); got {_shape(cost)}")
    if any(s == 0 for s in cost.shape):
        raise ValueError(f"{name} must have no empty dimension; got shape {_shape(cost)}")
    batched = cost.ndim == 3
    return (cost if batched else cost.unsqueeze(0)), batched


def compute_dtype(cost):
    """fp64 stays fp64; every other floating dtype is computed in fp32."""
    return torch.float64 if cost.dtype == torch.float64 else torch.float32


def check_marginal(x, name, cost3, dim, batched):
    """Check a marginal (``dim`` = 1 for rows/``a``, 2 for columns/``b``) and return ``(B, size)`` weights.

    ``None`` gives uniform weights ``1/size``. Values are checked later by
    :func:`check_marginal_values` (after every shape check).
    """
    B, size = cost3.shape[0], cost3.shape[dim]
    dtype = compute_dtype(cost3)
    if x is None:
        return torch.full((B, size), 1.0 / size, dtype=dtype, device=cost3.device)
    check_tensor(x, name)
    ok = _shape(x) == (size,) or (batched and _shape(x) == (B, size))
    if not ok:
        want = f"({size},)" + (f" or ({B}, {size})" if batched else "")
        raise ValueError(f"{name} must have shape {want} to match cost of shape "
                         f"{_shape(cost3) if batched else _shape(cost3)[1:]}; got {_shape(x)}")
    check_same_device(x, name, cost3)
    return x.to(dtype).expand(B, size)


def check_same_device(x, name, cost, cost_name="cost"):
    if x.device != cost.device:
        raise ValueError(f"{name} must be on the same device as {cost_name} ({cost.device}); got {x.device}")


def compiling():
    """Inside ``torch.compile`` tracing: value checks that need a host read are skipped (docs/api.md)."""
    return torch.compiler.is_compiling()


class Verdicts:
    """Value checks whose verdicts are read from the device together, in one host sync.

    ``add(ok, fail)``: ``ok`` a bool tensor (every entry must be True),
    ``fail()`` raises the check's error (it may read values: it only runs on
    failure). ``read(key, x)``: a 0-d tensor whose value ``flush`` also
    reads. ``flush()`` reads everything at once and raises the first failed
    check, in the order added. Under ``torch.compile`` nothing is read:
    ``value`` returns the default, and the checks' verdicts are kept on
    the device in ``valid``, which :meth:`poison` folds into a result's
    error (a failed check then reads as a NaN error, not converged).
    """

    def __init__(self):
        self._checks, self._reads, self.values = [], {}, {}
        self.valid = None

    def add(self, ok, fail):
        self._checks.append((ok, fail))

    def read(self, key, x):
        self._reads[key] = x

    def value(self, key, default=None):
        return self.values.get(key, default)

    def flush(self):
        checks, reads = self._checks, self._reads
        self._checks, self._reads = [], {}
        if compiling():
            if checks:
                ok = torch.stack([ok.all() for ok, _ in checks]).all()
                self.valid = ok if self.valid is None else self.valid & ok
            return
        if not (checks or reads):
            return
        flags = [ok.all() for ok, _ in checks] + [x.reshape(()).to(torch.bool) for x in reads.values()]
        got = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # the one host sync
        self.values.update(zip(reads, got[len(checks):]))
        for good, (_, fail) in zip(got, checks):
            if not good:
                fail()

    def poison(self, err):
        """``err``, NaN everywhere if a check failed under compile (where nothing could raise)."""
        if self.valid is None:
            return err
        return torch.where(self.valid, err, torch.full_like(err, math.nan))


def cost_value_checks(cost3, verdicts, name="cost"):
    """Queue the NaN / ``-inf`` checks of a dense cost on ``verdicts``; returns the lines' extremes.

    ``(row_min, row_max, col_min, col_max)``, ``(B, N)`` and ``(B, M)``, from
    which the solvers choose the offsets they subtract from the cost. The
    maxima include ``+inf`` entries: after the flush, ``verdicts.value("forbidden")``
    says whether there are any, and :func:`allowed_maxima` corrects them
    (under compile the value is unknown: correct them unconditionally).
    """
    # amin/amax, not aminmax: the fused op is ~10x slower on CPU. NaN propagates into all four.
    row_min, row_max, col_min, col_max = cost3.amin(-1), cost3.amax(-1), cost3.amin(-2), cost3.amax(-2)

    def nan():
        raise ValueError(f"{name} must not contain NaN; got {int(torch.isnan(cost3).sum())} NaN entries")

    def neg():
        raise ValueError(f"{name} must not contain -inf (+inf marks forbidden entries); "
                         f"got {int(torch.isneginf(cost3).sum())} -inf entries")
    verdicts.add(~torch.isnan(row_min).any(), nan)
    verdicts.add(~torch.isneginf(row_min).any(), neg)
    verdicts.read("forbidden", torch.isposinf(row_max).any())
    return row_min, row_max, col_min, col_max


def allowed_maxima(cost3, stats):
    """``stats`` with the maxima over the allowed (finite) entries only."""
    allowed = cost3.masked_fill(torch.isposinf(cost3), float("-inf"))
    return stats[0], allowed.amax(-1), stats[2], allowed.amax(-2)


def check_cost_values(cost3, name="cost"):
    """No NaN and no ``-inf``; returns ``(forbidden, stats)``.

    ``forbidden``: whether ``+inf`` (forbidden) entries exist. ``stats``:
    ``(row_min, row_max, col_min, col_max)``, ``(B, N)`` and ``(B, M)``, the
    extreme allowed entries of each line (``+inf`` / ``-inf`` for an
    all-forbidden line). Two passes over the cost (three with forbidden
    entries) and one host sync (none under compile, where nothing is checked).
    """
    if not isinstance(cost3, torch.Tensor):  # FeatureCost: finite features, nothing forbidden
        return cost3._check_values(name)
    verdicts = Verdicts()
    stats = cost_value_checks(cost3, verdicts, name)
    verdicts.flush()
    forbidden = verdicts.value("forbidden", True)
    return bool(forbidden), allowed_maxima(cost3, stats) if forbidden else stats


def _now(check, *args, **kwargs):
    """Run a ``verdicts``-taking check on its own (one host sync)."""
    verdicts = Verdicts()
    out = check(*args, verdicts=verdicts, **kwargs)
    verdicts.flush()
    return out


def check_marginal_values(w, name, total=None, verdicts=None):
    """Finite, non-negative, positive total mass per problem (queued on ``verdicts`` if given).

    ``total``: the ``(B,)`` total mass when ``w`` is one rank's slice of a
    sharded marginal (a slice may carry no mass), else ``w.sum(-1)``.
    """
    if verdicts is None:
        return _now(check_marginal_values, w, name, total)

    def not_finite():
        raise ValueError(f"{name} must be finite; got NaN or Inf entries")

    def negative():
        raise ValueError(f"{name} must be non-negative; got minimum {w.min().item():.3g}")

    def empty():
        raise ValueError(f"{name} must have positive total mass; got a problem with total mass 0")
    verdicts.add(torch.isfinite(w), not_finite)
    verdicts.add(w >= 0, negative)
    verdicts.add((w.sum(-1) if total is None else total) > 0, empty)


def check_equal_mass(a, b, verdicts=None):
    if verdicts is None:
        return _now(check_equal_mass, a, b)
    ma, mb = a.sum(-1), b.sum(-1)

    def fail():
        i = int(torch.argmax((ma - mb).abs()))
        raise ValueError(f"a and b must have equal total mass (relative tolerance 1e-5) for a balanced "
                         f"problem; got sum(a)={ma[i].item():.8g}, sum(b)={mb[i].item():.8g}; "
                         f"pass reach= for unbalanced OT")
    verdicts.add(torch.isclose(ma, mb, rtol=1e-5, atol=0.0), fail)  # the test of torch.allclose


def _where(mask, B, offset=0):
    """``" i"`` or ``" i of problem p"`` for the first True entry of a (B, L) mask (plus ``offset``)."""
    p, i = mask.nonzero()[0].tolist()
    return f" {i + offset}" + (f" of problem {p}" if B > 1 else "")


def _local(x, side):
    return x


# The feasibility checks take ``complete`` and ``offsets`` for one rank's block of a cost split across
# a process group: ``complete(x, side)`` finishes a per-line sum over side 1 (rows) or 2 (columns)
# across the ranks (a collective: every rank makes the same calls, before any error is raised), and
# ``offsets`` are the global indices of the block's first row and column, for the messages.
def check_feasible(cost3, a, b, name="cost", balanced=True, complete=_local, offsets=(0, 0), verdicts=None):
    """Every row (column) with positive mass must have an allowed entry.

    ``balanced``: moreover an allowed entry in a column (row) with positive
    mass, since the line must send all of its mass somewhere.
    """
    if verdicts is None:
        return _now(check_feasible, cost3, a, b, name, balanced, complete, offsets)
    allowed = torch.isfinite(cost3)
    if balanced:
        rows_n = (allowed & (b > 0).unsqueeze(-2)).sum(-1)
        cols_n = (allowed & (a > 0).unsqueeze(-1)).sum(-2)
    else:
        rows_n, cols_n = allowed.sum(-1), allowed.sum(-2)
    rows_ok, cols_ok = complete(rows_n, 2) > 0, complete(cols_n, 1) > 0
    bad_rows, bad_cols = (a > 0) & ~rows_ok, (b > 0) & ~cols_ok
    B = cost3.shape[0]
    for bad, line, other, off in ((bad_rows, "row", "columns", offsets[0]),
                                  (bad_cols, "column", "rows", offsets[1])):
        def fail(bad=bad, line=line, other=other, off=off):
            raise ValueError(f"{name} makes the problem infeasible: {line}{_where(bad, B, off)} has positive "
                             f"mass but every entry of it is forbidden (+inf) or lies in one of the "
                             f"zero-mass {other}, so its mass cannot be transported")
        verdicts.add(~bad, fail)


def check_partial_feasible(cost3, a, b, mass, name="cost", complete=_local, verdicts=None):
    """Partial OT: ``mass`` must not exceed what the allowed entries can carry, line by line.

    Row i can send at most ``min(a_i, sum of b over its allowed columns)``
    (likewise for columns); a ``mass`` above either total cannot be moved.
    """
    if verdicts is None:
        return _now(check_partial_feasible, cost3, a, b, mass, name, complete)
    allowed = torch.isfinite(cost3).to(a.dtype)
    row_cap = torch.minimum(a, complete((allowed * b.unsqueeze(-2)).sum(-1), 2))
    col_cap = torch.minimum(b, complete((allowed * a.unsqueeze(-1)).sum(-2), 1))
    cap = torch.minimum(complete(row_cap.sum(-1), 1), complete(col_cap.sum(-1), 2))
    bad = mass > cap * (1 + 1e-6)

    def fail():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} makes the problem infeasible: mass={float(mass[i]):.6g} exceeds the "
                         f"{float(cap[i]):.6g} that the allowed (finite) entries can carry (rows whose "
                         f"partners are forbidden or have little mass)"
                         + (f" in problem {i}" if cost3.shape[0] > 1 else ""))
    verdicts.add(~bad, fail)


def check_multi_feasible(cost3, k, target, name="cost", complete=_local, offsets=(0, 0), verdicts=None,
                         forbidden=True):
    """Multi-assignment: each row needs k allowed entries in columns that take units; each column
    j needs ``target_j`` allowed rows (entries are at most 1).

    ``forbidden=False``: the cost is known to have no ``+inf`` entry (no pass over it).
    """
    if verdicts is None:
        return _now(check_multi_feasible, cost3, k, target, name, complete, offsets, forbidden=forbidden)
    B, N, _ = cost3.shape
    if isinstance(cost3, torch.Tensor) and forbidden:
        allowed = torch.isfinite(cost3)
        per_row = complete((allowed & (target > 0).unsqueeze(-2)).sum(-1), 2)
        per_col = complete(allowed.sum(-2), 1)
    else:  # no forbidden entry (a FeatureCost has none)
        per_row = complete((target > 0).sum(-1, keepdim=True).expand(B, N), 2)
        per_col = complete(torch.full_like(target, N, dtype=torch.long), 1)
    bad_row = per_row < k * (1 - 1e-6)
    bad_col = per_col < target * (1 - 1e-6)

    def row():
        raise ValueError(f"{name} makes the problem infeasible: row{_where(bad_row, B, offsets[0])} needs "
                         f"k={k:g} assignments (each at most 1) but has only {int(per_row[bad_row][0])} "
                         f"allowed entries in columns with a positive target k * N * b_j")

    def col():
        raise ValueError(f"{name} makes the problem infeasible: column{_where(bad_col, B, offsets[1])} "
                         f"must receive k * N * b_j = {float(target[bad_col][0]):.6g} units (each entry at "
                         f"most 1) but has only {int(per_col[bad_col][0])} allowed entries")
    verdicts.add(~bad_row, row)
    verdicts.add(~bad_col, col)


def check_positive(x, name):
    """A finite real number > 0."""
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a positive real number; got {type(x).__name__}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {x}")
    return float(x)


def check_n_iters(n_iters, name="n_iters"):
    if isinstance(n_iters, bool) or not isinstance(n_iters, int):
        raise TypeError(f"{name} must be an int >= 1; got {type(n_iters).__name__}")
    if n_iters < 1:
        raise ValueError(f"{name} must be >= 1; got {n_iters}")
    return n_iters


def check_iterations(eps: object, n_iters: object, tol: object) -> Tuple[float, int, Optional[float]]:
    """The loop's settings: ``eps > 0``, ``n_iters >= 1``, ``tol > 0`` or None."""
    return check_positive_scalar(eps, "eps"), check_n_iters(n_iters), check_tol(tol)


def check_tol(tol):
    return None if tol is None else check_positive_scalar(tol, "tol")


def check_choice(x, name, choices):
    if x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {x!r}")
    return x


def check_reach(reach):
    """``None`` (balanced), a float rho, or a pair; ``inf`` means balanced on that side."""
    if reach is None:
        return None
    pair = tuple(reach) if isinstance(reach, (tuple, list)) else (reach, reach)
    if len(pair) != 2:
        raise ValueError(f"reach must be a float or a pair (rho_a, rho_b); got {len(pair)} values")
    out = []
    for r in pair:
        if isinstance(r, bool) or not isinstance(r, Real):
            raise TypeError(f"reach must be a positive float or a pair of them; got {type(r).__name__}")
        if not r > 0 or math.isnan(r):
            raise ValueError(f"reach must be > 0 (inf for a balanced side); got {r}")
        out.append(float(r))
    return tuple(out)


def check_eps_schedule(eps_schedule, eps):
    if eps_schedule is None:
        return []
    sched = [check_positive_scalar(e, "eps_schedule") for e in eps_schedule]
    if any(e < eps for e in sched) or any(x < y for x, y in zip(sched, sched[1:])):
        raise ValueError(f"eps_schedule must be a decreasing sequence of values >= eps={eps}; got {sched}")
    return sched


def check_init(init, cost3, batched, verdicts=None):
    """Warm-start potentials ``(f, g)``: shapes of the marginals; returns ``(B, N)``, ``(B, M)``.

    Infinite entries are allowed (a result's zero-mass or all-forbidden
    lines have them); NaN is not (queued on ``verdicts`` if given).
    """
    if init is None:
        return None
    if verdicts is None:
        return _now(check_init, init, cost3, batched)
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError(f"init must be a pair (f, g) of tensors; got {type(init).__name__}")
    dtype = compute_dtype(cost3)
    out = []
    for x, name, dim in ((init[0], "init[0] (f)", 1), (init[1], "init[1] (g)", 2)):
        w = check_marginal(x, name, cost3, dim, batched)

        def fail(w=w, name=name):
            raise ValueError(f"{name} must not contain NaN; got {int(torch.isnan(w).sum())} NaN entries")
        verdicts.add(~torch.isnan(w), fail)
        out.append(w.to(dtype))
    return tuple(out)


def check_mass(mass, a, b, verdicts=None):
    """Partial OT: ``0 < mass <= min(sum a, sum b)`` per problem; returns a ``(B,)`` tensor."""
    if verdicts is None:
        return _now(check_mass, mass, a, b)
    if isinstance(mass, bool) or not isinstance(mass, (Real, torch.Tensor)):
        raise TypeError(f"mass must be a positive float; got {type(mass).__name__}")
    if isinstance(mass, torch.Tensor):
        if mass.numel() != 1 and tuple(mass.shape) != (a.shape[0],):
            raise ValueError(f"mass must be a number, a 0-d tensor or a ({a.shape[0]},) tensor (one per "
                             f"problem); got shape {tuple(mass.shape)}")
        check_same_device(mass, "mass", a)
        mass = mass.detach().reshape(-1)
    m = torch.as_tensor(mass, dtype=a.dtype, device=a.device).expand(a.shape[0])
    limit = torch.minimum(a.sum(-1), b.sum(-1))

    def fail():
        raise ValueError(f"mass must satisfy 0 < mass <= min(sum(a), sum(b)) = {limit.min().item():.6g}; "
                         f"got {mass}")
    verdicts.add(torch.isfinite(m) & (m > 0) & (m <= limit * (1 + 1e-6)), fail)
    return torch.minimum(m, limit)


def check_k(k, n_cols):
    if isinstance(k, bool) or not isinstance(k, Real):
        raise TypeError(f"k must be a real number; got {type(k).__name__}")
    if not (1 <= k < n_cols):
        raise ValueError(f"k must satisfy 1 <= k < M = {n_cols} (number of columns); got {k}")
    return float(k)


def check_grad_backend(grad, backend):
    if grad == "unroll" and backend == "triton":
        raise ValueError("grad='unroll' needs the torch backend (autograd through the iterations); "
                         "got backend='triton': use grad='envelope' or backend='torch'")


# ----------------------------------------------------------------------------- losses
def check_matrix(x, name, *, cols=None, cols_desc="D", rows_desc="N", like=None):
    """``x`` must be a 2-D floating tensor (optionally with ``cols`` columns, as those of ``like``)."""
    check_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape ({rows_desc}, {cols_desc}); got {_shape(x)}")
    if cols is not None and x.shape[1] != cols:
        source = f" like {like}" if like else ""
        raise ValueError(f"{name} must have shape ({rows_desc}, {cols_desc}) with {cols_desc}={cols}"
                         f"{source}; got {_shape(x)}")


def check_pair(z_a, z_b, names=("z_a", "z_b")):
    """Paired batches: both (N, D) with the same N and D (row i of each is a pair)."""
    check_matrix(z_a, names[0])
    check_matrix(z_b, names[1])
    if z_a.shape != z_b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (N, D) (row i of each "
                         f"is a pair); got {names[0]} {_shape(z_a)} and {names[1]} {_shape(z_b)}")
    if z_a.shape[0] < 1:
        raise ValueError(f"{names[0]} must have at least one row; got {_shape(z_a)}")


def check_devices(ref, ref_name, *others):
    """Every ``(tensor_or_None, name)`` of ``others`` on ``ref``'s device."""
    for x, name in others:
        if x is not None:
            check_same_device(x, name, ref, ref_name)


def check_count(x, name, minimum, maximum=None, maximum_desc=None):
    """A count such as ``dim``, ``queue_size`` or ``k``: an int in ``[minimum, maximum]``, else ValueError.

    numpy integers are accepted; bools and floats (even ``2.0``) are not.
    """
    ok = isinstance(x, Integral) and not isinstance(x, bool) and x >= minimum
    if ok and maximum is not None and x > maximum:
        raise ValueError(f"{name} must be an int with {minimum} <= {name} <= {maximum_desc or maximum}; "
                         f"got {x!r}")
    if not ok:
        raise ValueError(f"{name} must be an int >= {minimum}; got {x!r}")
    return int(x)


def check_weight(x: object, name: str) -> float:
    """A finite real number >= 0 (loss weights), as a float; see :func:`as_real`."""
    x = as_real(x, name)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {x}")
    return x


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def as_real(x: object, name: str) -> float:
    """A real number given as a Python/numpy scalar or a 0-dim real tensor, as a Python float."""
    if isinstance(x, torch.Tensor) and x.ndim == 0 and (x.is_floating_point() or x.dtype in _INTS):
        return float(x.item())
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number (a Python or numpy scalar, or a 0-dim tensor); "
                        f"got {type(x).__name__}")
    return float(x)


def check_positive_scalar(x: object, name: str) -> float:
    """A finite real number > 0 (eps, temperatures, learning rates), as a float; see :func:`as_real`."""
    return check_positive(as_real(x, name), name)


def check_fraction(x: object, name: str) -> float:
    """A real number in (0, 1] (a transported mass of uniform marginals), as a float."""
    v = as_real(x, name)
    if not (0 < v <= 1):
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1 (the marginals are uniform with total mass "
                         f"1); got {v}")
    return v


def check_optional_tol(tol: object) -> Optional[float]:
    """``None`` or a finite real number > 0."""
    return None if tol is None else check_positive_scalar(tol, "tol")


def check_flag(x: object, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False; got {x!r}")
    return x


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_finite_inputs(*named: Tuple[Optional[torch.Tensor], str]) -> None:
    """Every ``(tensor_or_None, name)`` is free of NaN and +-inf; the error names the first offender.

    One reduction (one device sync) in the common all-finite case, as in
    :func:`check_cost_values`; an overflowing sum merely takes the detailed path.
    """
    tensors = [(x, name) for x, name in named if x is not None and x.numel() > 0]
    if not tensors or compiling():  # a host read: skipped under torch.compile (docs/api.md)
        return
    acc = torch.float64 if any(x.dtype == torch.float64 for x, _ in tensors) else torch.float32
    with torch.no_grad():
        total = torch.stack([x.detach().sum(dtype=acc) for x, _ in tensors]).sum()
        if bool(torch.isfinite(total)):
            return
        for x, name in tensors:
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            if n_nan or n_inf:
                raise ValueError(f"{name} must be finite; got {n_nan} NaN and {n_inf} infinite entries "
                                 f"(shape {_shape(x)})")


def check_forbid_diagonal(shape: Tuple[int, int]) -> None:
    """With the given pairs ``(i, i)`` forbidden, a batch of one row (column) leaves the column (row) of
    pair (0, 0) without an allowed entry: a problem the solvers reject, so say why here."""
    n, m = shape
    if min(n, m) == 1:
        line = "column" if n == 1 else "row"
        raise ValueError(f"sim of shape {tuple(shape)} is too small for forbid_diagonal=True: forbidding "
                         f"the given pair (0, 0) leaves {line} 0 with no allowed entry; use a batch with at "
                         f"least 2 rows and 2 columns, or forbid_diagonal=False")


def check_exp_logits_finite(loss: torch.Tensor, preds: Sequence[torch.Tensor], temperature: float) -> None:
    """A BCE on logits ``exp(pred / temperature)`` whose true value exceeds its dtype raises, naming
    ``temperature``, instead of returning inf (one sync; the message is built only on failure)."""
    if compiling() or bool(torch.isfinite(loss)):  # a host read: skipped under torch.compile
        return
    u_max = max(float(p.detach().max()) for p in preds) / temperature
    raise ValueError(f"the Multi-SK loss overflows {loss.dtype}: its value exceeds the largest {loss.dtype} "
                     f"(about exp({math.log(torch.finfo(loss.dtype).max):.4g})) as the logits "
                     f"exp(pred / temperature) reach exp({u_max:.4g}) with temperature={temperature}; use a "
                     f"larger temperature or float64 inputs")


# ----------------------------------------------------------------------------- data-parallel solves
_SHARD_DIMS = {0: 1, -2: 1, 1: 2, -1: 2}  # shard_dim -> side of the (B, N, M) cost


def check_process_group(process_group, shard_dim):
    """``process_group`` None (then no ``shard_dim``) or a group of an initialised ``torch.distributed``.

    Returns the sharded side of the ``(B, N, M)`` cost (1 rows, 2 columns), or None.
    """
    if process_group is None:
        if shard_dim is not None:
            raise ValueError(f"shard_dim needs a process_group (the ranks the cost is split across); "
                             f"got shard_dim={shard_dim!r} with process_group=None")
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group needs an initialised torch.distributed "
                         "(dist.init_process_group); got process_group with no default group")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD) "
                        f"or None; got {type(process_group).__name__}")
    if isinstance(shard_dim, bool) or shard_dim not in _SHARD_DIMS:
        raise ValueError(f"shard_dim must be 0 (-2, rows split across the ranks) or 1 (-1, columns) "
                         f"with a process_group; got {shard_dim!r}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group must contain this process; got a group this rank is not part of")
    return _SHARD_DIMS[shard_dim]


def check_shard_shapes(ndims, shapes, side, name="cost"):
    """Every rank's cost (``ndims[r]``, ``shapes[r] = (B, N, M)``, -1 = not a tensor) fits one global cost.

    Same number of dimensions and batch size everywhere, the same unsharded
    size, and a non-empty block on every rank. The arguments are identical on
    every rank, so every rank raises the same error.
    """
    ranks = f"ranks 0..{len(ndims) - 1}"
    if any(d not in (2, 3) for d in ndims) or len(set(ndims)) > 1:
        got = ["not a tensor" if d < 0 else f"{d}-D" for d in ndims]
        raise ValueError(f"{name} must be an (N, M) or (B, N, M) tensor with the same number of dimensions "
                         f"on every rank of process_group; got {got} on {ranks}")
    if len({s[0] for s in shapes}) > 1:
        raise ValueError(f"{name} must have the same batch size B on every rank of process_group (shards "
                         f"split N or M, never B); got B = {[s[0] for s in shapes]} on {ranks}")
    other = 3 - side
    letter, kind = ("N", "row") if side == 1 else ("M", "column")
    other_letter = "M" if side == 1 else "N"
    if len({s[other] for s in shapes}) > 1:
        raise ValueError(f"{name} shards must have the same {other_letter} (the side that is not split, "
                         f"shard_dim={side - 1}) on every rank of process_group; got "
                         f"{other_letter} = {[s[other] for s in shapes]} on {ranks}")
    empty = [r for r, s in enumerate(shapes) if s[side] == 0]
    if empty:
        raise ValueError(f"{name} shard on rank {empty[0]} of process_group is empty ({letter} = 0); every "
                         f"rank must hold at least one {kind} (got {letter} = {[s[side] for s in shapes]})")


def check_grad_group(grad, process_group):
    if grad == "unroll" and process_group is not None:
        raise ValueError("grad='unroll' is not supported with a process_group (it would need autograd "
                         "through the all-reduces); got grad='unroll': use grad='envelope' or 'none'")


def check_l2rm_group(process_group):
    if process_group is not None:
        raise ValueError("process_group is not supported by the L2RM loss (its column softmax spans the "
                         "global (N, N) similarity and its learned cost steps outside DDP); got a group: "
                         "gather the embeddings with torch.distributed.nn.functional.all_gather, build the "
                         "global sim on every rank and call l2rm_loss without process_group")
