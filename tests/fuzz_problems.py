"""Random and adversarial problems for the property/fuzz suite (``tests/test_fuzz.py``).

Hypothesis draws a :class:`Spec`: plain values (solver, sizes, dtype, cost
scale and offset, eps, marginal kinds, forbidden pattern, memory layout,
iteration budget, a seed). :func:`build` turns it into tensors with a numpy
generator and works out what docs/api.md lets the call do:

- ``"raise"``: invalid input (NaN/-inf cost, bad marginals, unequal mass,
  ``k`` out of range...) or a support that is infeasible line by line (a
  positive-mass line reaching only forbidden entries or zero-mass partners;
  in multi-assignment a row with fewer than ``k`` allowed entries or a column
  asked for more than it can hold): a ``ValueError`` (``TypeError`` for a
  non-floating cost) is required;
- ``"solve"``: a valid problem whose support is feasible (max-flow check):
  any exception is a failure;
- ``"either"``: feasibility too close to call, or infeasible in a way the
  contract does not list (Hall-type deficits): a ``ValueError`` or an honest
  result.

A falsifying example is therefore a self-contained reproducer:
``case = build(Spec(...)); solve(case)``.

The module also keeps the counters of the fuzz run (problems per solver,
checks per invariant) that ``test_fuzz.py`` writes out at the end.
"""
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from hypothesis import strategies as st

from ot_losses import multi_assignment_sinkhorn, partial_ot, sinkhorn

MAX_SIZE = 12
SOLVERS = ("balanced", "unbalanced", "bregman", "dummy", "multi")
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
INF = math.inf

# ----------------------------------------------------------------------------- run switches and counters

FUZZ = float(os.environ.get("OT_LOSSES_FUZZ", "0") or 0)
COUNTS = Counter()          # (solver, invariant) -> number of times the invariant was checked
PROBLEMS = Counter()        # (test, solver) -> number of generated problems
OUTCOMES = Counter()        # (solver, outcome) -> count: raised / solved / converged / skipped...


def examples(ci, fuzz):
    """``max_examples`` for a property: ``ci`` by default, ``fuzz * OT_LOSSES_FUZZ`` in the fuzz run."""
    return max(1, int(round(fuzz * FUZZ))) if FUZZ > 0 else ci


def count(solver, invariant, n=1):
    COUNTS[(solver, invariant)] += n


# ----------------------------------------------------------------------------- the drawn description

@dataclass(frozen=True)
class Spec:
    """Everything :func:`build` needs; its repr is the reproducer hypothesis prints."""

    solver: str = "balanced"    # one of SOLVERS
    n: int = 4
    m: int = 5
    batch: int = 0              # 0: unbatched (N, M) cost, else B
    dtype: str = "f64"          # cost dtype, key of DTYPES
    marg_dtype: str = "cost"    # dtype of the marginal tensors ("cost": the cost's)
    structure: str = "uniform"  # uniform | ties | similarity | sqeuclid | gap
    scale: float = 1.0          # cost range before the offset
    offset: float = 0.0         # constant added to the whole cost
    eps_rel: float = 0.1        # eps / scale
    kind_a: str = "none"        # none (None = uniform) | uniform | random | wide (1e-12..1) | zeros
    kind_b: str = "none"
    total: float = 1.0          # sum a
    ratio_b: float = 1.0        # sum b / sum a (unbalanced, partial)
    forbid: str = "none"        # none | random | keep | diag | line | zero_line | partner
    layout: str = "contiguous"  # contiguous | transposed | strided | expanded
    marg_batched: bool = False  # (B, N) marginals instead of broadcast (N,) ones
    n_iters: int = 50
    tol_rel: Optional[float] = None   # tol / (mass or scale); None: run n_iters
    reach_rel: Optional[tuple] = None  # unbalanced (rho_a, rho_b) / scale; inf allowed
    mass_frac: float = 0.5      # partial: mass / min(sum a, sum b)
    k_frac: float = 0.5         # multi: k = 1 + k_frac (M - 1)
    invalid: str = ""           # "" | nan_cost | neginf_cost | neg_marg | nan_marg | int_cost
    extra: str = ""             # extra property of the main test: "" | warm | grad | unroll
    seed: int = 0


@dataclass
class Case:
    """A built problem: the call's arguments, what the contract expects, float64 views for the checks."""

    spec: Spec
    cost: torch.Tensor                  # as passed
    a: Optional[torch.Tensor]           # as passed (None = uniform); unused by multi
    b: Optional[torch.Tensor]
    kwargs: dict                        # the solver's keyword arguments
    eps: float
    expect: str                         # "raise" | "solve" | "either"
    why: str                            # reason for the expectation
    error: tuple = (ValueError,)        # exception types allowed when expect == "raise"
    error_words: tuple = ()             # one of these must appear in the message
    # float64 views, leading batch dimension always present
    cost64: torch.Tensor = None         # (B, N, M), the passed values
    a64: torch.Tensor = None            # (B, N) marginals as the solver sees them (compute dtype)
    b64: torch.Tensor = None            # (B, M); multi: column targets k N b_j
    mass: Optional[torch.Tensor] = None  # partial: (B,) requested mass
    k: Optional[float] = None           # multi
    u: float = 2.0 ** -52               # unit roundoff of the compute dtype
    arg_scale: float = 1.0              # size of the exponents (cost range / eps + log-marginal range)
    iter_scale: float = 1.0             # the same for comparisons of unconverged iterates
    extras: dict = field(default_factory=dict)

    @property
    def solver(self):
        return self.spec.solver

    @property
    def batched(self):
        return self.cost.ndim == 3

    @property
    def compute_dtype(self):
        return torch.float64 if self.cost.dtype == torch.float64 else torch.float32

    @property
    def total_mass(self):
        """(B,) scale of the plan's entries: sum a (balanced/unbalanced/partial), k N (multi)."""
        if self.solver == "multi":
            return torch.full((self.cost64.shape[0],), self.k * self.cost64.shape[1], dtype=torch.float64)
        return torch.maximum(self.a64.sum(-1), self.b64.sum(-1))


# ----------------------------------------------------------------------------- strategies

def _sizes():
    """1 (a 1xM / Nx1 problem) about one time in seven, else uniform in 2..12."""
    return st.sampled_from([1, 1] + list(range(2, MAX_SIZE + 1)))


@st.composite
def specs(draw, **pins):
    """A :class:`Spec`; keyword pins fix a field (a value) or narrow it (a strategy)."""

    def pick(name, strategy):
        if name in pins:
            v = pins[name]
            return draw(v) if isinstance(v, st.SearchStrategy) else v
        return draw(strategy)

    solver = pick("solver", st.sampled_from(SOLVERS))
    n = pick("n", _sizes())
    m = pick("m", st.sampled_from([1] + 4 * list(range(2, MAX_SIZE + 1))) if solver == "multi" else _sizes())
    batch = pick("batch", st.sampled_from([0, 0, 0, 1, 2, 3]))
    dtype = pick("dtype", st.sampled_from(["f64", "f64", "f32", "f32", "f16", "bf16"]))
    low = dtype in ("f16", "bf16")
    marg_dtype = pick("marg_dtype", st.sampled_from(["f32", "f32", "f64", "cost"] if low
                                                    else ["cost", "cost", "cost", "f64", "f32"]))
    structure = pick("structure", st.sampled_from(["uniform", "ties", "similarity", "sqeuclid", "gap"]))
    scale = pick("scale", st.sampled_from([1e-3, 0.1, 1.0, 1.0, 30.0, 1e4]))
    offset = pick("offset", st.sampled_from([0.0, 0.0, 0.0, 1.0, -1.0, 1e3, -1e3, 1e6, -1e6]))
    eps_rel = pick("eps_rel", st.sampled_from([1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0, 10.0]))
    kinds = st.sampled_from(["none", "uniform", "random", "wide", "zeros"])
    kind_a = pick("kind_a", kinds)
    kind_b = pick("kind_b", kinds)
    total = pick("total", st.sampled_from([1.0, 1.0, 1e-3, 50.0]))
    ratio_b = pick("ratio_b", st.sampled_from([1.0, 0.5, 3.0]) if solver in ("unbalanced", "bregman", "dummy")
                   else st.just(1.0))
    forbid = pick("forbid", st.sampled_from(["none", "none", "none", "random", "keep", "keep", "diag", "line",
                                             "zero_line", "zero_line", "partner"]))
    layouts = ["contiguous", "contiguous", "transposed", "strided"] + (["expanded"] if batch else [])
    layout = pick("layout", st.sampled_from(layouts))
    marg_batched = pick("marg_batched", st.booleans()) if batch else False
    tol_rel = pick("tol_rel", st.sampled_from([None, None, 1e-3, 1e-6, 1e-9]))
    n_iters = pick("n_iters", st.sampled_from([1, 2, 3, 10, 40, 150]) if tol_rel is None
                   else st.sampled_from([30, 200, 1000]))
    reach_rel = None
    if solver == "unbalanced":
        rhos = st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3, INF])
        ra = draw(rhos)
        reach_rel = pick("reach_rel", st.one_of(st.just((ra, ra)), st.tuples(st.just(ra), rhos)))
    mass_frac = pick("mass_frac", st.sampled_from([1e-6, 0.1, 0.5, 0.9, 1.0]))
    k_frac = pick("k_frac", st.sampled_from([0.0, 0.25, 0.5, 0.9]))
    invalid = pick("invalid", st.sampled_from([""] * 70 + ["nan_cost", "neginf_cost", "neg_marg", "nan_marg",
                                                           "int_cost"]))
    extra = pick("extra", st.sampled_from(["", "", "warm", "grad", "unroll"]))
    seed = pick("seed", st.integers(0, 2 ** 32 - 1))
    return Spec(solver=solver, n=n, m=m, batch=batch, dtype=dtype, marg_dtype=marg_dtype, structure=structure,
                scale=scale, offset=offset, eps_rel=eps_rel, kind_a=kind_a, kind_b=kind_b, total=total,
                ratio_b=ratio_b, forbid=forbid, layout=layout, marg_batched=marg_batched, n_iters=n_iters,
                tol_rel=tol_rel, reach_rel=reach_rel, mass_frac=mass_frac, k_frac=k_frac, invalid=invalid,
                extra=extra, seed=seed)


# ----------------------------------------------------------------------------- building

def _base_cost(rng, shape, structure):
    """Costs of range ~1 (before scale and offset) with different kinds of structure."""
    n, m = shape[-2:]
    if structure == "ties":       # few distinct values: many exactly tied entries
        return rng.integers(0, 3, size=shape) / 2.0
    if structure == "similarity":  # the library's convention for similarities: cost = -S
        x = rng.normal(size=shape[:-2] + (n, 3))
        y = rng.normal(size=shape[:-2] + (m, 3))
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        y /= np.linalg.norm(y, axis=-1, keepdims=True)
        return -(x @ np.swapaxes(y, -1, -2))
    if structure == "sqeuclid":   # squared distances of points on a line (POT's default cost)
        x = rng.uniform(size=shape[:-2] + (n, 1))
        y = rng.uniform(size=shape[:-2] + (1, m))
        return (x - y) ** 2
    if structure == "gap":        # a near-assignment: a cheap entry per row, the rest at 1
        c = rng.uniform(0.9, 1.0, size=shape)
        idx = rng.integers(0, m, size=shape[:-1])
        np.put_along_axis(c, idx[..., None], rng.uniform(0.0, 0.05, size=shape[:-1] + (1,)), axis=-1)
        return c
    return rng.uniform(size=shape)


def _weights(rng, shape, kind, total):
    """Non-negative weights of ``shape`` summing to ``total`` along the last axis."""
    if kind in ("none", "uniform"):
        w = np.ones(shape)
    elif kind == "random":
        w = rng.uniform(0.2, 1.0, size=shape)
    elif kind == "wide":          # entries spanning 1e-12 .. 1
        w = 10.0 ** rng.uniform(-12, 0, size=shape)
    else:                         # zeros: some zero-mass lines, at least one positive entry
        w = rng.uniform(0.2, 1.0, size=shape) * (rng.uniform(size=shape) > 0.35)
        w[..., 0] = np.where(w.sum(-1) == 0, 1.0, w[..., 0])
    return w / w.sum(-1, keepdims=True) * total


def _cap(w, cap):
    """Water-filling: weights summing to 1 with every entry <= cap, where possible."""
    total = w.sum(-1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / w.shape[-1])
    fixed = np.zeros(w.shape, dtype=bool)
    for _ in range(w.shape[-1]):
        over = w > cap * (1 + 1e-12)
        if not over.any():
            break
        fixed |= over
        excess = np.where(over, w - cap, 0.0).sum(-1, keepdims=True)
        w = np.where(fixed, cap, w)
        free = ~fixed & (w > 0)
        room = np.where(free, w, 0.0).sum(-1, keepdims=True)
        w = np.where(free, w + excess * w / np.where(room > 0, room, 1.0), w)
    return w


def _zero(w, i):
    """Zero entry ``i`` (last axis) in place, keeping each total."""
    tot = w.sum(-1, keepdims=True)
    w[..., i] = 0.0
    j = (i + 1) % w.shape[-1]
    w[..., j] = np.where(w.sum(-1) == 0, 1.0, w[..., j])   # keep a positive entry
    w *= tot / w.sum(-1, keepdims=True)


def _forbidden(rng, spec, cshape, a, b):
    """The mask of ``+inf`` entries; may zero marginal entries (zero_line, partner). Returns (mask, a, b)."""
    n, m = cshape[-2:]
    mask = np.zeros(cshape, dtype=bool)
    kind = spec.forbid
    if kind in ("random", "keep"):
        density = rng.choice([0.1, 0.3] if spec.solver == "multi" else [0.2, 0.5, 0.8])
        mask = rng.uniform(size=cshape) < density
        if spec.solver == "multi":   # rows keep a band of ceil(k) + 1 entries (random: rarely infeasible)
            width = int(math.ceil(1.0 + spec.k_frac * (m - 1))) + 1
            for i in range(n):
                for t in range(width):
                    mask[..., i, (i + t) % m] = False
        elif kind == "keep":      # every line keeps the entry (i mod n, i mod m)
            for i in range(max(n, m)):
                mask[..., i % n, i % m] = False
    elif kind == "diag":          # L2RM: given pairs (i, i) forbidden
        for i in range(min(n, m)):
            mask[..., i, i] = True
    elif kind == "line":          # a whole row or column forbidden (infeasible if it carries mass)
        if rng.uniform() < 0.5:
            mask[..., rng.integers(n), :] = True
        else:
            mask[..., :, rng.integers(m)] = True
    elif kind in ("zero_line", "partner") and spec.solver != "multi":
        on_rows = rng.uniform() < 0.5 if n > 1 and m > 1 else n > 1   # the side with more than one line
        w, other = (a, b) if on_rows else (b, a)
        i = int(rng.integers(w.shape[-1]))
        line = (..., i, slice(None)) if on_rows else (..., slice(None), i)
        if kind == "zero_line" and w.shape[-1] > 1:   # a zero-mass line, entirely forbidden (f or g = inf)
            _zero(w, i)
            mask[line] = True
        elif other.shape[-1] > 1:  # partner: a positive line whose only allowed partner has zero mass
            j = int(rng.integers(other.shape[-1]))
            _zero(other, j)
            mask[line] = True
            mask[(..., i, j) if on_rows else (..., j, i)] = False
    elif kind == "zero_line":     # multi: an empty column (b_j = 0), entirely forbidden
        j = int(rng.integers(m))
        if m > 1:
            b[..., j] = 0.0
        mask[..., :, j] = True
    elif kind == "partner":       # multi: a row with a single allowed entry (infeasible unless k = 1)
        i = int(rng.integers(n))
        mask[..., i, :] = True
        mask[..., i, 0] = False
    return mask, a, b


def _tensor(x, dtype, layout, rng):
    """``x`` (numpy) as a tensor of ``dtype`` with the requested memory layout (values unchanged)."""
    if layout == "transposed" and x.ndim >= 2:
        return torch.tensor(np.swapaxes(x, -1, -2).copy(), dtype=dtype).transpose(-1, -2)
    if layout == "strided":
        big = torch.tensor(rng.uniform(size=tuple(2 * s for s in x.shape)), dtype=dtype)
        view = big[tuple(slice(None, None, 2) for _ in x.shape)]
        view.copy_(torch.tensor(x, dtype=dtype))
        return view
    return torch.tensor(x, dtype=dtype)


def build(spec):
    """Tensors, keyword arguments and the contract's expectation for ``spec`` (see the module docstring)."""
    rng = np.random.default_rng(spec.seed)
    n, m, B = spec.n, spec.m, spec.batch
    dtype = DTYPES[spec.dtype]
    mdtype = dtype if spec.marg_dtype == "cost" else DTYPES[spec.marg_dtype]
    expanded = spec.layout == "expanded" and B > 0
    cshape = (n, m) if (B == 0 or expanded) else (B, n, m)
    cost_np = _base_cost(rng, cshape, spec.structure) * spec.scale + spec.offset

    mb = (B,) if (B and spec.marg_batched) else ()
    multi = spec.solver == "multi"
    total_b = 1.0 if multi else spec.total * spec.ratio_b
    a_np = _weights(rng, mb + (n,), spec.kind_a, spec.total)
    b_np = _weights(rng, mb + (m,), spec.kind_b, total_b)
    k = None
    if multi:
        k = 1.0 + spec.k_frac * (m - 1) if m > 1 else 1.0
        b_np = _cap(b_np, 1.0 / k)
    a0, b0 = a_np.copy(), b_np.copy()
    mask, a_np, b_np = _forbidden(rng, spec, cshape, a_np, b_np)
    if multi:
        b_np = _cap(b_np, 1.0 / k)
        if np.abs(b_np.sum(-1) - 1).max() > 1e-12:   # too few positive columns for k: back to uniform
            b_np = np.full_like(b_np, 1.0 / m)
    a_edit, b_edit = not np.array_equal(a_np, a0), not np.array_equal(b_np, b0)
    cost_np = np.where(mask, np.inf, cost_np)

    if spec.invalid == "nan_cost":
        cost_np.flat[rng.integers(cost_np.size)] = np.nan
    elif spec.invalid == "neginf_cost":
        cost_np.flat[rng.integers(cost_np.size)] = -np.inf
    keep = spec.invalid not in ("neg_marg", "nan_marg")   # None (uniform) only where nothing was edited
    a_none = spec.kind_a == "none" and spec.total == 1.0 and not a_edit and keep
    b_none = spec.kind_b == "none" and total_b == 1.0 and not b_edit and keep
    if spec.invalid == "neg_marg":
        (b_np if multi else a_np).flat[0] = -0.1 * spec.total
    elif spec.invalid == "nan_marg":
        (b_np if multi else a_np).flat[-1] = np.nan

    if spec.invalid == "int_cost":
        cost = torch.tensor(np.nan_to_num(cost_np, posinf=1e9, neginf=-1e9)).to(torch.int64)
    else:
        cost = _tensor(cost_np, dtype, "contiguous" if expanded else spec.layout, rng)
    if expanded:
        cost = cost.expand(B, n, m)
    marg_layout = "strided" if spec.layout == "strided" else "contiguous"
    a = None if (a_none or multi) else _tensor(a_np, mdtype, marg_layout, rng)
    b = None if b_none else _tensor(b_np, mdtype, marg_layout, rng)
    if expanded and spec.marg_batched:
        a = None if a is None else a[0].expand(B, n) if a.ndim == 2 else a.expand(B, n)
        b = None if b is None else b[0].expand(B, m) if b.ndim == 2 else b.expand(B, m)

    eps = spec.eps_rel * spec.scale
    kwargs = dict(eps=eps, n_iters=spec.n_iters)
    case = Case(spec=spec, cost=cost, a=a, b=b, kwargs=kwargs, eps=eps, expect="solve", why="valid, feasible",
                k=k)
    _views(case)
    tol_unit = {"balanced": case.total_mass, "dummy": None, "multi": case.total_mass}.get(spec.solver)
    if spec.tol_rel is not None:
        if spec.solver == "dummy":
            kwargs["tol"] = spec.tol_rel * spec.total
        elif tol_unit is not None:
            kwargs["tol"] = spec.tol_rel * float(tol_unit.max())
        else:                      # unbalanced, bregman: a change of the potentials, in cost units
            kwargs["tol"] = spec.tol_rel * spec.scale
    if spec.solver == "unbalanced":
        ra, rb = (r * spec.scale for r in spec.reach_rel)
        kwargs["reach"] = ra if ra == rb else (ra, rb)
    elif spec.solver in ("bregman", "dummy"):
        kwargs["method"] = spec.solver
        limit = torch.minimum(case.a64.sum(-1), case.b64.sum(-1))
        lim = float(limit.min()) if torch.isfinite(limit).all() else 1.0
        mass = spec.mass_frac * lim if lim > 0 else 0.5
        kwargs["mass"] = mass
        case.mass = torch.full_like(limit, mass)
    _classify(case)
    return case


def _views(case):
    """float64 views of the problem as the solver sees it (marginals through the compute dtype)."""
    cost = case.cost
    if not cost.dtype.is_floating_point:
        case.cost64 = cost.double().reshape((-1,) + tuple(cost.shape[-2:]))
    else:
        case.cost64 = cost.detach().double().reshape((-1,) + tuple(cost.shape[-2:]))
    B, N, M = case.cost64.shape
    cd = torch.float64 if cost.dtype == torch.float64 else torch.float32
    case.u = float(torch.finfo(cd).eps)

    def seen(x, size):
        if x is None:
            return torch.full((B, size), 1.0 / size, dtype=cd).double()
        return x.detach().to(cd).double().expand(B, size).clone()

    if case.solver == "multi":
        case.a64 = torch.full((B, N), case.k, dtype=torch.float64)
        b = seen(case.b, M)
        case.extras["b_weights"] = b
        case.b64 = case.k * N * b
    else:
        case.a64, case.b64 = seen(case.a, N), seen(case.b, M)
    case.arg_scale = exponent_scale(case.cost64, case.a64, case.b64, case.eps,
                                    offset_free=case.solver != "unbalanced")
    # Multi-assignment converges to a shift-invariant answer, but its iterates are not shift covariant
    # (zero initial potentials, a fixed-point step rather than an exact projection): two computations of
    # the same early iterates round at the scale of the cost's magnitude.
    case.iter_scale = case.arg_scale if case.solver != "multi" else exponent_scale(
        case.cost64, case.a64, case.b64, case.eps, offset_free=False)


def exponent_scale(cost64, a64, b64, eps, offset_free=True):
    """Size of the exponents ``(f_i + g_j - C_ij) / eps`` a solver handles: (finite cost range) / eps plus
    the range of the log-marginals. Rounding slacks are proportional to it; a constant offset of the
    cost does not count (docs/api.md: invariance "up to rounding of the differences"), except for unbalanced
    problems (``offset_free=False``), which are not shift invariant: their potentials carry the offset."""
    finite = cost64[torch.isfinite(cost64)]
    if not finite.numel():
        spread = 0.0
    elif offset_free:
        spread = float(finite.max() - finite.min())
    else:
        spread = float(finite.abs().max())
    logs = [w[w > 0].log().abs() for w in (a64, b64) if torch.isfinite(w).all()]
    lmax = max([float(x.max()) for x in logs if x.numel()] + [0.0])
    return spread / eps + 2 * min(lmax, 60.0) + 20.0


# ----------------------------------------------------------------------------- expectations

def max_flow(allowed, supply, demand, cell_cap=INF):
    """Max flow source -> rows (``supply``) -> allowed cells (``cell_cap``) -> columns (``demand``) -> sink.

    Edmonds-Karp on at most 26 nodes, in float64; capacities below 1e-15 x the
    total are treated as exhausted.
    """
    n, m = allowed.shape
    V = n + m + 2
    s, t = n + m, n + m + 1
    cap = np.zeros((V, V))
    cap[s, :n] = supply
    cap[n:n + m, t] = demand
    cap[:n, n:n + m] = np.where(allowed, cell_cap, 0.0)
    thr = 1e-15 * max(float(np.sum(supply)), float(np.sum(demand)), 1e-300)
    flow = 0.0
    for _ in range(10 * V * V):
        parent = [-1] * V
        parent[s] = s
        queue = [s]
        while queue and parent[t] < 0:
            x = queue.pop(0)
            for y in np.nonzero(cap[x] > thr)[0]:
                if parent[y] < 0:
                    parent[y] = x
                    queue.append(y)
        if parent[t] < 0:
            break
        path, y = [], t
        while y != s:
            path.append((parent[y], y))
            y = parent[y]
        push = min(cap[x, y] for x, y in path)
        for x, y in path:
            cap[x, y] -= push
            cap[y, x] += push
        flow += push
    return flow


def _set(case, expect, why, error=ValueError, words=()):
    """Raise the expectation to ``expect``; every reason to raise is kept (the solver may report any)."""
    order = {"raise": 2, "either": 1, "solve": 0}
    if expect == "raise":
        if case.expect != "raise":
            case.why, case.error, case.error_words = why, (), ()
        else:
            case.why += "; " + why
        case.error = tuple(dict.fromkeys(case.error + (error,)))
        case.error_words = tuple(dict.fromkeys(case.error_words + tuple(words)))
        case.expect = "raise"
    else:
        # A borderline reason may still be the one the solver reports: its words are accepted too.
        case.extras["alt_words"] = case.extras.get("alt_words", ()) + tuple(words)
        if order[expect] > order[case.expect]:
            case.expect, case.why = expect, why


def _classify(case):
    """Set ``case.expect`` from the tensors actually passed (after dtype rounding)."""
    spec, cost = case.spec, case.cost
    if not cost.dtype.is_floating_point:
        _set(case, "raise", "integer cost", TypeError, ("cost",))
    C, a, b = case.cost64, case.a64, case.b64
    if torch.isnan(C).any():
        _set(case, "raise", "NaN in cost", words=("cost",))
    if torch.isneginf(C).any():
        _set(case, "raise", "-inf in cost", words=("cost",))
    weights = (("b", case.extras["b_weights"]),) if case.solver == "multi" else (("a", a), ("b", b))
    valid = True
    for name, w in weights:
        valid &= bool(torch.isfinite(w).all() and (w >= 0).all() and (w.sum(-1) > 0).all())
        if not torch.isfinite(w).all():
            _set(case, "raise", f"non-finite {name}", words=(name,))
        if (w < 0).any():
            _set(case, "raise", f"negative {name}", words=(name,))
        if (w.sum(-1) <= 0).any():
            _set(case, "raise", f"{name} has zero total mass", words=(name,))
    B, N, M = C.shape
    allowed = torch.isfinite(C)
    solver = case.solver
    if solver == "balanced" or (solver == "unbalanced" and all(math.isinf(r) for r in spec.reach_rel)):
        rel = ((a.sum(-1) - b.sum(-1)).abs() / b.sum(-1)).max().item()
        if rel > 2e-5:
            _set(case, "raise", f"unequal masses (relative {rel:.1e})", words=("mass", "sum"))
        if rel > 0.5e-5:
            _set(case, "either", "masses equal only to ~1e-5", words=("mass", "sum"))
    if solver == "multi":
        k = case.k
        if not (1 <= k < M):
            _set(case, "raise", "k out of range", words=("k",))
        bsum = case.extras["b_weights"].sum(-1)
        dev = (bsum - 1).abs().max().item()
        if dev > 2e-5:
            _set(case, "raise", f"b sums to 1 {dev:+.1e}", words=("b",))
        if dev > 0.5e-5:
            _set(case, "either", "b sums to 1 only to ~1e-5", words=("b",))
        over = (b - N).max().item()
        if over > 2e-6 * N:
            _set(case, "raise", "a column target k N b_j > N", words=("b",))
        if over > 0:
            _set(case, "either", "a column target k N b_j within rounding of N", words=("b", "column"))
    if solver in ("bregman", "dummy"):
        limit = torch.minimum(a.sum(-1), b.sum(-1))
        if (case.mass > limit * (1 + 1e-6)).any():
            _set(case, "raise", "mass > min(sum a, sum b)", words=("mass",))

    # Lines that can carry nothing (zero mass, or no allowed partner with mass): their potentials may be
    # infinite (docs/api.md, Honest results), their plan lines are 0.
    pos_a, pos_b = a > 0, b > 0
    case.extras["dead_rows"] = ~pos_a | ~(allowed & pos_b[:, None, :]).any(-1)
    case.extras["dead_cols"] = ~pos_b | ~(allowed & pos_a[:, :, None]).any(-2)
    if solver == "unbalanced" and valid and not any(math.isinf(r) for r in spec.reach_rel):
        # The optimum's mass grows like exp(-min C / (eps + rho_a + rho_b)): with negative costs and small
        # reach it is not representable. Such problems may raise; a result must still hold no NaN.
        fin = C[allowed]
        ra, rb = (r * spec.scale for r in spec.reach_rel)
        grow = float(-fin.min()) / (case.eps + ra + rb) if fin.numel() else 0.0
        logmax = math.log(torch.finfo(case.compute_dtype).max)
        if grow + math.log(max(float(a.sum(-1).max()), float(b.sum(-1).max()))) > 0.7 * logmax:
            case.extras["overflow"] = True
            _set(case, "either", f"unbalanced optimum of mass ~exp({grow:.0f}) overflows")
    if solver == "unbalanced" and valid and not all(math.isinf(r) for r in spec.reach_rel):
        # Unbalanced potentials keep the cost's offset: once u * |C| / eps nears 1 the plan's exponents are
        # rounding noise, and the solver refuses (docs/api.md, Honest results); 20x margin for |f| + |g|.
        if torch.finfo(case.compute_dtype).eps * case.arg_scale > 0.05:
            _set(case, "either", "unbalanced exponents beyond the dtype's precision", words=("precision",))
    if not valid:
        return
    for p in range(B):
        al, ap, bp = allowed[p], a[p], b[p]
        # Any solver: a line with positive mass whose entries are all forbidden (docs/api.md, Conventions).
        if ((ap > 0) & ~al.any(-1)).any() or ((bp > 0) & ~al.any(-2)).any():
            _set(case, "raise", "a positive-mass line is entirely forbidden", words=("row", "column"))
        reach_rows = (al & (bp > 0)[None, :]).any(-1)
        reach_cols = (al & (ap > 0)[:, None]).any(-2)
        lonely = ((ap > 0) & ~reach_rows).any() or ((bp > 0) & ~reach_cols).any()
        if solver == "balanced":
            if lonely:   # docs/api.md, Honest results: reaches only forbidden entries or zero-mass partners
                _set(case, "raise", "a positive-mass line reaches only zero-mass partners",
                     words=("row", "column"))
            need = float(min(ap.sum(), bp.sum()))
            flow = max_flow(al.numpy(), ap.numpy(), bp.numpy())
            if flow < need * (1 - 1e-9):
                _set(case, "either", f"Hall-infeasible support (max flow {flow:.6g} < {need:.6g})")
        elif solver == "unbalanced":
            if lonely:   # well posed with KL penalties, but the balanced rule may be applied
                _set(case, "either", "a positive-mass line reaches only zero-mass partners")
        elif solver in ("bregman", "dummy"):
            need = float(case.mass[p])
            flow = max_flow(al.numpy(), ap.numpy(), bp.numpy())
            if flow < need * (1 - 1e-9):
                _set(case, "either", f"mass {need:.6g} exceeds the support's max flow {flow:.6g}")
        else:
            k = case.k
            if (al.sum(-1) < k - 1e-9).any():
                _set(case, "raise", "a row has fewer than k allowed entries", words=("row", "k"))
            excess = float((bp - al.sum(-2)).max())
            if excess > 2e-6 * N:
                _set(case, "raise", "a column is asked for more than its allowed entries hold",
                     words=("column",))
            elif excess > 0:
                _set(case, "either", "a column target within rounding of its allowed entries",
                     words=("column",))
            flow = max_flow(al.numpy(), np.full(N, k), bp.numpy(), cell_cap=1.0)
            if flow < k * N * (1 - 1e-9):
                _set(case, "either", f"Hall-infeasible multi-assignment (max flow {flow:.6g} < {k * N:.6g})")


# ----------------------------------------------------------------------------- calling

def solve(case, cost=None, a="same", b="same", **over):
    """Call the case's solver; ``cost``/``a``/``b``/keyword overrides replace the case's."""
    cost = case.cost if cost is None else cost
    a = case.a if isinstance(a, str) else a
    b = case.b if isinstance(b, str) else b
    kw = dict(case.kwargs)
    kw.update(over)
    if case.solver == "multi":
        kw.pop("init", None)
        return multi_assignment_sinkhorn(cost, case.k, b, **kw)
    if case.solver in ("bregman", "dummy"):
        return partial_ot(cost, a, b, **kw)
    return sinkhorn(cost, a, b, **kw)


def plan_of(res):
    """The plan (``assignment`` for multi-assignment) as a detached float64 (B, N, M) tensor."""
    p = res.assignment if hasattr(res, "assignment") else res.plan
    p = p.detach().double()
    return p if p.ndim == 3 else p.unsqueeze(0)
