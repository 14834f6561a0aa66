"""Hypothesis strategies and comparison helpers shared by the solver tests.

Strategies draw the *structure* of a problem (sizes, marginal kind, eps,
cost scale) and a seed; the tensors are then built from the seed with a
numpy generator, so shrinking stays cheap and every example is
reproducible from its printed seed. Sizes stay small (N, M <= 12).

Helpers:
- :func:`rel_err` / :func:`assert_close`: ``||x - ref|| / ||ref||`` with a
  message naming the worst index and both values (fla's ``assert_close``).
- :func:`assert_potentials_close`: potentials are defined up to
  ``(f + c, g - c)``; the best shift is removed before comparing (GeomLoss
  ``check_ot_result``).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from hypothesis import strategies as st

MAX_SIZE = 12
MARGINAL_KINDS = ("uniform", "random", "sparse")


@dataclass
class Problem:
    """One (possibly batched) OT problem built from a seed."""

    cost: torch.Tensor                 # (N, M) or (B, N, M)
    a: Optional[torch.Tensor]          # (N,) / (B, N) or None (uniform)
    b: Optional[torch.Tensor]          # (M,) / (B, M) or None (uniform)
    eps: float
    seed: int

    @property
    def shape(self):
        return tuple(self.cost.shape)

    def a_full(self):
        """``a`` with ``None`` expanded to uniform weights (same leading dims as cost)."""
        n = self.cost.shape[-2]
        if self.a is not None:
            return self.a
        return torch.full(self.cost.shape[:-1], 1.0 / n, dtype=self.cost.dtype)

    def b_full(self):
        m = self.cost.shape[-1]
        if self.b is not None:
            return self.b
        shape = self.cost.shape[:-2] + (m,)
        return torch.full(shape, 1.0 / m, dtype=self.cost.dtype)


def marginal(rng, size, kind, total=1.0, batch=()):
    """Non-negative weights of shape ``batch + (size,)`` summing to ``total``.

    ``kind``: ``"uniform"``; ``"random"`` (in [0.2, 1] before normalising, so
    ratios stay below 5); ``"sparse"`` (random with some zero entries, at
    least one positive entry per problem).
    """
    shape = tuple(batch) + (size,)
    if kind == "uniform":
        w = np.ones(shape)
    elif kind == "random":
        w = rng.uniform(0.2, 1.0, size=shape)
    elif kind == "sparse":
        w = rng.uniform(0.2, 1.0, size=shape)
        w = w * (rng.uniform(size=shape) > 0.3)
        w[..., 0] = np.where(w.sum(-1) == 0, 1.0, w[..., 0])
    else:
        raise ValueError(kind)
    return w / w.sum(-1, keepdims=True) * total


def random_cost(rng, shape, scale=1.0):
    """Costs uniform in ``[0, scale]``."""
    return rng.uniform(0.0, 1.0, size=shape) * scale


@st.composite
def ot_problems(draw, *, min_n=1, max_n=MAX_SIZE, min_m=1, max_m=MAX_SIZE, eps=(0.05, 0.1, 0.3, 1.0),
                scales=(1.0,), kinds=("uniform", "random"), batch=(None,), square=False,
                dtype=torch.float64, mass_a=1.0, mass_b=None):
    """A cost in ``[0, scale]`` with marginals of the drawn kinds.

    ``mass_b=None`` gives ``b`` the same total as ``a`` (balanced problem).
    ``batch``: candidate batch sizes, ``None`` for an unbatched problem.
    Uniform marginals of mass 1 are passed as ``None`` half of the time.
    """
    n = draw(st.integers(min_n, max_n))
    m = n if square else draw(st.integers(min_m, max_m))
    bsz = draw(st.sampled_from(batch))
    eps_ = draw(st.sampled_from(eps))
    scale = draw(st.sampled_from(scales))
    kind_a = draw(st.sampled_from(kinds))
    kind_b = draw(st.sampled_from(kinds))
    as_none = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lead = () if bsz is None else (bsz,)
    cost = torch.tensor(random_cost(rng, lead + (n, m), scale), dtype=dtype)
    mass_b = mass_a if mass_b is None else mass_b

    def build(size, kind, total):
        if kind == "uniform" and total == 1.0 and as_none:
            return None
        return torch.tensor(marginal(rng, size, kind, total, lead), dtype=dtype)

    return Problem(cost, build(n, kind_a, mass_a), build(m, kind_b, mass_b), eps_, seed)


@st.composite
def permutation_problems(draw, *, min_n=1, max_n=MAX_SIZE, dtype=torch.float64):
    """A square cost whose unique optimal plan is a drawn permutation ``sigma``.

    ``C[i, sigma(i)]`` in ``[0, 0.1]``, every other entry in ``[0.5, 1]``: any
    plan moving mass ``t`` off ``sigma`` pays at least ``0.4 t`` more, so with
    uniform marginals the optimum is ``P = perm(sigma) / N``.
    Returns ``(cost, sigma)`` with ``sigma`` a LongTensor.
    """
    n = draw(st.integers(min_n, max_n))
    sigma = draw(st.permutations(list(range(n))))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.5, 1.0, size=(n, n))
    cost[np.arange(n), sigma] = rng.uniform(0.0, 0.1, size=n)
    return torch.tensor(cost, dtype=dtype), torch.tensor(sigma, dtype=torch.long)


@st.composite
def forbidden_masks(draw, n, m):
    """A boolean ``(n, m)`` mask of forbidden entries that leaves every row and
    column at least one allowed entry (a "diagonal" ``(i, i mod m)`` /
    ``(j mod n, j)`` is always allowed) and forbids at least one entry when
    ``n * m > max(n, m)``."""
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from((0.2, 0.5, 0.8)))
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(n, m)) < density
    keep = np.zeros((n, m), dtype=bool)
    for i in range(max(n, m)):
        keep[i % n, i % m] = True
    mask &= ~keep
    if not mask.any():
        free = np.argwhere(~keep)
        if len(free):
            i, j = free[0]
            mask[i, j] = True
    return torch.tensor(mask)


# ---------------------------------------------------------------- comparisons

def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(x, ref):
    """``||x - ref||_F / ||ref||_F`` (absolute error when ``ref`` is zero)."""
    x, ref = _np(x), _np(ref)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return num / den if den > 0 else num


def _worst(x, ref):
    x, ref = _np(x), _np(ref)
    d = np.abs(x - ref)
    d = np.where(np.isnan(d), np.inf, d)
    if d.size == 0:
        return "empty"
    idx = np.unravel_index(int(np.argmax(d)), d.shape)
    return f"worst at {tuple(int(i) for i in idx)}: got {x[idx]!r}, expected {ref[idx]!r}"


def assert_close(x, ref, rtol, name="value"):
    """Relative Frobenius error below ``rtol``; the message names the worst entry.

    Non-finite entries (e.g. ``-inf`` in a log-plan) must sit at the same
    places with the same values in both; only finite entries are compared.
    """
    x_, ref_ = _np(x), _np(ref)
    assert x_.shape == ref_.shape, f"{name}: shape {x_.shape} != {ref_.shape}"
    fin = np.isfinite(ref_)
    assert np.array_equal(np.isfinite(x_), fin) and np.array_equal(x_[~fin], ref_[~fin]), (
        f"{name}: non-finite entries differ; {_worst(x_, ref_)}")
    err = rel_err(x_[fin], ref_[fin])
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}; {_worst(x_, ref_)}"
    return err


def centre_shift(f, g, f_ref, g_ref):
    """Best constant ``c`` with ``(f - c, g + c) ~ (f_ref, g_ref)`` (least squares)."""
    f, g, f_ref, g_ref = map(_np, (f, g, f_ref, g_ref))
    return float(np.concatenate([f - f_ref, g_ref - g]).mean())


def assert_potentials_close(f, g, f_ref, g_ref, atol, name="potentials"):
    """Potentials equal up to ``(f + c, g - c)``; max abs error after the best shift <= atol."""
    c = centre_shift(f, g, f_ref, g_ref)
    ef = np.abs(_np(f) - c - _np(f_ref)).max(initial=0.0)
    eg = np.abs(_np(g) + c - _np(g_ref)).max(initial=0.0)
    assert max(ef, eg) <= atol, (f"{name}: max abs error after centring f {ef:.3e}, g {eg:.3e} > {atol:.1e}; "
                                 f"f {_worst(_np(f) - c, f_ref)}; g {_worst(_np(g) + c, g_ref)}")
    return max(ef, eg)


def l1_marginal_error(plan, a, b):
    """``|P 1 - a|_1 + |P^T 1 - b|_1`` per problem (last two dims of ``plan``)."""
    return ((plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1))


def snapshot(*tensors):
    """Clones and version counters of the tensors (``None`` passes through)."""
    return [(None if t is None else (t, t.detach().clone(), t._version)) for t in tensors]


def assert_unchanged(snap):
    """Every tensor of :func:`snapshot` still has its values and version counter."""
    for k, item in enumerate(snap):
        if item is None:
            continue
        t, before, version = item
        assert t._version == version, f"input {k} was modified in place (version {version} -> {t._version})"
        assert torch.equal(t.detach(), before), f"input {k} values changed"
