"""Costs computed from features, never materialised: :class:`FeatureCost`.

Every kind is written in one form,

    C_ij = alpha_i + beta_j - sx_i sy_j <x_i, y_j>,

with O(N + M) vectors computed once per solve ("terms"):

- ``sqeuclidean``: ``alpha = scale |x_i|^2``, ``beta = scale |y_j|^2``, ``sx = 2 scale``, ``sy = 1``;
- ``dot``: ``alpha = beta = 0``, ``sx = scale``, ``sy = 1``;
- ``cosine``: ``alpha = scale``, ``beta = 0``, ``sx = scale / |x_i|``, ``sy = 1 / |y_j|``;

so a tile of C is one matrix product plus rank-one terms. The solvers
receive a ``FeatureCost`` where they would hold a dense ``(B, N, M)`` cost
and ask it for its half-step namespace (:meth:`FeatureCost.steps`): the torch
streaming reductions of ``solvers/_feature_steps.py`` or the fused Triton
kernels of ``kernels/feature_lse.py``. The envelope gradient of ``value``
w.r.t. ``x`` and ``y`` is a plan-weighted sum, computed by one streaming
pass (:class:`_FeatureEnvelope`).
"""
from numbers import Integral

import torch

from . import _validate as V
from .solvers._loop import _FirstOrderOnly

KINDS = ("sqeuclidean", "dot", "cosine")
DEFAULT_WORKSPACE = 256 * 2 ** 20   # bytes of temporaries per streamed half-step
MIN_WORKSPACE = 2 ** 10


def _check_features(x, name):
    V.check_tensor(x, name)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape ({'N' if name == 'x' else 'M'}, D) or "
                         f"(B, {'N' if name == 'x' else 'M'}, D); got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(x.shape)}")


class FeatureCost:
    """A cost matrix given by features, ``C_ij = c(x_i, y_j)``, that is never stored.

    Kinds (``scale > 0`` multiplies the cost):

    - ``"sqeuclidean"``: ``C_ij = scale * |x_i - y_j|^2`` (POT's ``ot.dist`` default);
    - ``"dot"``: ``C_ij = -scale * <x_i, y_j>`` (a similarity turned into a cost);
    - ``"cosine"``: ``C_ij = scale * (1 - cos(x_i, y_j))``.

    Pass it as ``cost`` to :func:`~ot_losses.sinkhorn`, :func:`~ot_losses.partial_ot`
    or :func:`~ot_losses.multi_assignment_sinkhorn`: the solvers compute tiles of
    ``C`` from ``x`` and ``y`` inside each half-step (torch: row chunks of at most
    ``workspace`` bytes of temporaries; Triton: tiles from ``tl.dot`` fused with the
    online log-sum-exp), so memory is O((N + M) D) plus the workspace. The result's
    ``plan`` / ``log_plan`` are dense ``(…, N, M)`` tensors built only when accessed
    (``value``, ``transport_cost`` and a partial result's ``mass`` are streamed); a
    multi-assignment result's ``assignment`` is dense too, built at the end of the
    solve. With ``grad="envelope"`` the
    gradient of ``value`` reaches ``x`` and ``y`` through streamed plan-weighted
    sums (e.g. sqeuclidean: ``2 scale (r_i x_i - (P y)_i)``, ``r = P 1``); the plan
    is never stored.

    The squared distance is evaluated as ``|x|^2 + |y|^2 - 2 <x, y>`` (as
    ``torch.cdist`` and POT do for large inputs), in fp32 for fp16/bf16/fp32
    features and fp64 for fp64 ones; ``dense()`` uses the same formula, so a
    solve on ``cost`` and on ``cost.dense()`` agree to rounding.

    Args:
        x: (N, D) or (B, N, D) floating tensor, the row points.
        y: (M, D) or (B, M, D) floating tensor of the same dtype, device and
            number of dimensions as ``x``, the column points.
        kind: ``"sqeuclidean"``, ``"dot"`` or ``"cosine"``.
        scale: positive multiplier of the cost.
        workspace: bytes of temporaries a torch half-step may use (default
            256 MiB); the rows (or columns) of one chunk are chosen to fit.

    Raises:
        TypeError, ValueError: non-tensor or non-floating ``x``/``y``, wrong
            ndim, mismatched B, D, dtype or device, unknown ``kind``,
            ``scale <= 0``, ``workspace`` too small. Non-finite features (and,
            for cosine, zero rows) raise ``ValueError`` when a solver or
            :meth:`dense` reads them.

    Example:
        >>> import torch
        >>> from ot_losses import FeatureCost, sinkhorn
        >>> x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
        >>> cost = FeatureCost(x, y, kind="sqeuclidean")
        >>> cost.shape
        torch.Size([50, 40])
        >>> res = sinkhorn(cost, eps=0.5, n_iters=500, tol=1e-9)
        >>> ref = sinkhorn(cost.dense(), eps=0.5, n_iters=500, tol=1e-9)
        >>> bool(res.converged), torch.allclose(res.f, ref.f), torch.allclose(res.plan, ref.plan)
        (True, True, True)
    """

    def __init__(self, x, y, *, kind="sqeuclidean", scale=1.0, workspace=DEFAULT_WORKSPACE):
        _check_features(x, "x")
        _check_features(y, "y")
        if x.ndim != y.ndim:
            raise ValueError(f"x and y must both be 2-D (N, D), (M, D) or both 3-D (B, N, D), (B, M, D); "
                             f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
        if x.ndim == 3 and x.shape[0] != y.shape[0]:
            raise ValueError(f"y must have the batch size of x ({x.shape[0]}); got y {tuple(y.shape)}")
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"y must have the feature dimension D of x ({x.shape[-1]}); "
                             f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have the dtype of x ({x.dtype}); got {y.dtype}")
        V.check_same_device(y, "y", x, "x")
        V.check_choice(kind, "kind", KINDS)
        scale = V.check_positive(scale, "scale")
        if isinstance(workspace, bool) or not isinstance(workspace, Integral) or workspace < MIN_WORKSPACE:
            raise ValueError(f"workspace must be an int >= {MIN_WORKSPACE} (bytes); got {workspace!r}")
        self.x, self.y, self.kind, self.scale, self.workspace = x, y, kind, scale, int(workspace)
        self.batched = x.ndim == 3
        self._x3 = x if self.batched else x.unsqueeze(0)
        self._y3 = y if self.batched else y.unsqueeze(0)
        self._cache = {}

    # ------------------------------------------------------------------ tensor-like surface
    @property
    def shape(self):
        """``(N, M)`` or ``(B, N, M)``: the shape of the cost matrix."""
        B, N, M = self._x3.shape[0], self._x3.shape[1], self._y3.shape[1]
        return torch.Size((B, N, M) if self.batched else (N, M))

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def device(self):
        return self.x.device

    def dense(self):
        """The materialised ``(N, M)`` or ``(B, N, M)`` cost, in the dtype of the features.

        Differentiable w.r.t. ``x`` and ``y``. Raises ``ValueError`` on non-finite
        features (or zero rows for cosine).
        """
        self._check_finite()
        dtype = V.compute_dtype(self)
        t = self._terms(dtype)
        out = _tile(t, 0, None, by_row=True)
        out = out.to(self.dtype)
        return out if self.batched else out.squeeze(0)

    def __repr__(self):
        return (f"FeatureCost(shape={tuple(self.shape)}, D={self.x.shape[-1]}, kind={self.kind!r}, "
                f"scale={self.scale:g}, dtype={self.dtype})")

    # ------------------------------------------------------------------ solver protocol (private)
    def _as_batched(self):
        """The same cost seen as a batch (``(B, N, M)``), sharing the features (and their graph)."""
        if self.batched:
            return self
        return FeatureCost(self._x3, self._y3, kind=self.kind, scale=self.scale, workspace=self.workspace)

    def detach(self):
        """The same cost on detached features (itself when nothing requires grad)."""
        if not (self.x.requires_grad or self.y.requires_grad):
            return self
        return FeatureCost(self.x.detach(), self.y.detach(), kind=self.kind, scale=self.scale,
                           workspace=self.workspace)

    def new_zeros(self, size, dtype=None):
        return self.x.new_zeros(size, dtype=dtype)

    def _check_finite(self, name="cost"):
        """Finite features, and no zero rows for cosine."""
        for t, side in ((self.x, "x"), (self.y, "y")):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: features {side} must be finite; got "
                                 f"{int((~torch.isfinite(t)).sum())} NaN/Inf entries")
            if self.kind == "cosine":
                zero = (t == 0).all(-1)
                if bool(zero.any()):
                    idx = zero.nonzero()[0].tolist()
                    raise ValueError(f"{name}: features {side} must have no zero rows for kind='cosine' "
                                     f"(cosine undefined); got zero row {idx[-1]}")

    def _check_values(self, name="cost"):
        """``check_cost_values`` of a feature cost: ``(False, (row_min, row_max, col_min, col_max))``.

        A feature cost forbids nothing; the lines' extremes are streamed in one pass.
        """
        self._check_finite(name)
        from .solvers import _feature_steps
        return False, _feature_steps.line_stats(self._as_batched())

    def steps(self, backend):
        """The half-step namespace reducing over this cost on a resolved backend ("torch"/"triton")."""
        if backend == "triton":
            from .kernels import feature_lse
            return feature_lse
        from .solvers import _feature_steps
        return _feature_steps

    def _terms(self, dtype):
        """``(x, y, alpha, beta, sx, sy)`` in ``dtype``: ``C = alpha_i + beta_j - sx_i sy_j <x_i, y_j>``.

        Cached per dtype; recomputed when autograd needs a graph the cache lacks.
        """
        graph = torch.is_grad_enabled() and (self.x.requires_grad or self.y.requires_grad)
        key = (dtype, graph)
        if key not in self._cache:
            self._cache[key] = _make_terms(self._x3, self._y3, self.kind, self.scale, dtype)
        return self._cache[key]

    def max_cost(self):
        """``(B,)`` largest entry of each problem's cost, streamed (differentiable in x, y)."""
        from .solvers import _feature_steps
        return _feature_steps.max_cost(self)

    def envelope_value(self, a, b, terms, steps, eps, shift):
        """``value`` whose gradient w.r.t. x, y (and a, b) follows the envelope theorem."""
        return _FeatureEnvelope.apply(self._x3, self._y3, a, b, self, terms, steps, eps, shift)


def _make_terms(x3, y3, kind, scale, dtype):
    x, y = x3.to(dtype), y3.to(dtype)
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    if kind == "sqeuclidean":
        alpha, beta = scale * (x * x).sum(-1), scale * (y * y).sum(-1)
        sx, sy = x.new_full((B, N), 2 * scale), y.new_ones((B, M))
    elif kind == "dot":
        alpha, beta = x.new_zeros((B, N)), y.new_zeros((B, M))
        sx, sy = x.new_full((B, N), scale), y.new_ones((B, M))
    else:
        alpha, beta = x.new_full((B, N), scale), y.new_zeros((B, M))
        sx, sy = scale / x.norm(dim=-1), 1 / y.norm(dim=-1)
    return _Terms(x, y, alpha, beta, sx, sy, kind != "dot", kind, scale)


class _Terms:
    """Compute-dtype factors of a feature cost (see the module docstring).

    ``xs = sx * x`` and ``ys = sy * y`` are what the torch tiles multiply;
    ``offsets`` is False when alpha and beta are identically 0 (``dot``).
    """

    def __init__(self, x, y, alpha, beta, sx, sy, offsets, kind, scale, xs=None, ys=None):
        self.x, self.y, self.alpha, self.beta, self.sx, self.sy = x, y, alpha, beta, sx, sy
        self.offsets, self.kind, self.scale = offsets, kind, scale
        self.xs = sx.unsqueeze(-1) * x if xs is None else xs
        self.ys = sy.unsqueeze(-1) * y if ys is None else ys

    def shifted(self, shift):
        """The terms of ``C_ij - r_i - s_j`` for the solvers' offsets ``shift = (r, s)``.

        ``shift`` None: no offsets; ``s`` None: row offsets only.
        """
        if shift is None:
            return self
        r, s = shift
        alpha = self.alpha - r.to(self.alpha.dtype)
        beta = self.beta if s is None else self.beta - s.to(self.beta.dtype)
        return _Terms(self.x, self.y, alpha, beta, self.sx, self.sy, True, self.kind, self.scale,
                      self.xs, self.ys)


def _tile(t, start, stop, by_row):
    """Cost rows ``start:stop`` (``by_row``, (B, n, M)) or transposed columns ((B, m, N))."""
    if by_row:
        p, q, p_off, q_off = t.xs[:, start:stop], t.ys, t.alpha[:, start:stop], t.beta
    else:
        p, q, p_off, q_off = t.ys[:, start:stop], t.xs, t.beta[:, start:stop], t.alpha
    c = torch.bmm(p, q.transpose(1, 2))
    if torch.is_grad_enabled() and c.requires_grad:
        c = -c
        if t.offsets:
            c = c + p_off.unsqueeze(-1) + q_off.unsqueeze(-2)
        return c
    c.neg_()
    if t.offsets:
        c.add_(p_off.unsqueeze(-1)).add_(q_off.unsqueeze(-2))
    return c


def _feature_grads(t, r, c, px, py):
    """Gradients of ``<P, C>`` w.r.t. x and y from row/column sums and ``P ys``, ``P^T xs``.

    ``C_ij = alpha_i + beta_j - sx_i sy_j <x_i, y_j>`` gives
    ``dx_i = r_i grad(alpha_i) - sx_i (P ys)_i - <x_i, (P ys)_i> grad(sx_i)`` and
    likewise for y; ``grad(alpha)`` and ``grad(sx)`` are multiples of ``x_i``.
    """
    def side(feat, s, sums, prod):
        if t.kind == "sqeuclidean":      # alpha = scale |x|^2, sx constant
            return 2 * t.scale * sums.unsqueeze(-1) * feat - s.unsqueeze(-1) * prod
        if t.kind == "dot":
            return -s.unsqueeze(-1) * prod
        # cosine: sx = k / |x| (k = scale or 1), grad(sx) = -sx x / |x|^2
        inner = (feat * prod).sum(-1, keepdim=True)
        s = s.unsqueeze(-1)
        return -s * prod + s * inner * feat / (feat * feat).sum(-1, keepdim=True)

    return side(t.x, t.sx, r, px), side(t.y, t.sy, c, py)


class _FeatureEnvelope(torch.autograd.Function):
    """``value`` of a solve on a :class:`FeatureCost`; backward streams the plan-weighted sums.

    ``terms(cost, a, b) -> (value, grad_a, grad_b, fp, gp)`` as for the dense
    ``EnvelopeValue``; ``d value / d C = P`` with
    ``P = exp((fp_i + gp_j - C_ij + r_i + s_j)/eps)`` (``shift = (r, s)``),
    pushed to ``x`` and ``y`` by ``steps.feature_grads`` without storing P. As
    for dense costs, differentiating this gradient again raises.
    """

    @staticmethod
    def forward(ctx, x3, y3, a, b, cost, terms, steps, eps, shift):
        with torch.no_grad():
            value, da, db, fp, gp = terms(cost, a, b)
        ctx.cost, ctx.steps, ctx.eps, ctx.shift = cost.detach(), steps, eps, shift
        ctx.has_da, ctx.has_db = da is not None, db is not None
        ctx.save_for_backward(x3, y3, a, b, fp, gp, *(t for t in (da, db) if t is not None))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        x3, y3, a, b, fp, gp, *rest = ctx.saved_tensors
        da = rest.pop(0) if ctx.has_da else None
        db = rest.pop(0) if ctx.has_db else None
        grads = [None] * 4
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            with torch.no_grad():
                gx, gy = ctx.steps.feature_grads(ctx.cost, fp, gp, ctx.eps, scale=grad_value.detach(),
                                                 shift=ctx.shift)
            grads[0], grads[1] = gx.to(x3.dtype), gy.to(y3.dtype)
        if ctx.needs_input_grad[2] and da is not None:
            grads[2] = grad_value.unsqueeze(-1) * da
        if ctx.needs_input_grad[3] and db is not None:
            grads[3] = grad_value.unsqueeze(-1) * db
        if torch.is_grad_enabled():  # create_graph=True
            inputs = [t for t in (x3, y3, a, b) if t.requires_grad]
            grads = [None if g is None else _FirstOrderOnly.apply(g, *inputs) for g in grads]
        return (*grads, None, None, None, None, None)


def workspace_rows(workspace, batch, length, itemsize, temps):
    """Rows per chunk so that ``temps`` (batch, rows, length) temporaries fit in ``workspace`` bytes."""
    return max(1, workspace // max(1, batch * length * itemsize * temps))
