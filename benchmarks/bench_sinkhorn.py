#!/usr/bin/env python
"""Benchmark of the ot_losses Sinkhorn family against the usual alternatives.

Run ``python benchmarks/bench_sinkhorn.py`` for the default suite: a small CPU
suite (under a minute on a 2-core machine) or, when CUDA is present, the full
GPU suite. Every row of a problem solves the *same* problem (same cost,
marginals, eps, ``n_iters`` and ``tol=None``); its contenders come from one
setup function, :func:`make_contenders`, which returns ``name -> callable``.

Each row reports the median time and its spread (20th-80th percentile) over
repeats, the time per iteration, the speed-up over a named baseline (the
eager naive torch log-sum-exp loop), the achieved bandwidth (bytes of cost
one iteration must read, i.e. two passes over the cost, divided by the time
per iteration) and its fraction of a device copy bandwidth measured in the
same run, and the agreement with a float64 reference run of the same
iterations (potentials after centring, relative plan error, marginal error),
so that a fast wrong answer is visible.

Timing: on CUDA ``triton.testing.do_bench(..., quantiles=[0.5, 0.2, 0.8])``
(CUDA events for calls over 0.5 s, or when triton is missing); on CPU
``time.perf_counter`` around each call after a warm-up call, the repeats of
a problem's contenders interleaved round by round so that a shared machine's
changing load hits all of them alike. Slow contenders (POT numpy, partial,
the layered Multi-SK) may run fewer iterations on CPU (marked ``*``; their
time per iteration is what compares, their agreement is checked against a
reference of the same length). Results go to the terminal (rich if
installed) and to ``<out>/<device>-<date>.{json,md,png}`` (``-quick`` added
for ``--quick`` runs).

Examples::

    python benchmarks/bench_sinkhorn.py                       # default suite
    python benchmarks/bench_sinkhorn.py --quick --out /tmp/b  # smoke run (~10 s)
    python benchmarks/bench_sinkhorn.py --scenario dense --sizes 1000,2000x4000 \\
        --dtype f32 --iters 50
    python benchmarks/bench_sinkhorn.py --list                # scenarios, contenders
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# Benchmark this checkout's ot_losses, whatever (or however stale) the installed copy is.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results"

DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BASELINE = "naive torch (eager)"
OURS_PREFIX = "ot_losses "

# Agreement tolerances per cost dtype: (max |f - f_ref| after centring, in cost
# units; relative Frobenius plan error). Rows whose contender runs the same
# iterates as the reference must be within them; a contender with its own
# algorithm (eps-scaling, layered Multi-SK) is reported but not judged.
TOLERANCES = {
    "f64": (1e-7, 1e-6),
    "f32": (1e-3, 1e-2),
    "f16": (1e-2, 5e-2),
    "bf16": (1e-2, 5e-2),
}


def _has(module):
    return importlib.util.find_spec(module) is not None


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _has("triton")
HAS_POT = _has("ot")
HAS_GEOMLOSS = _has("geomloss")
HAS_FLASH = _has("flash_sinkhorn")
HAS_RICH = _has("rich")
HAS_MPL = _has("matplotlib")


# ----------------------------------------------------------------------------
# Scenarios and the problems they generate
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str            # balanced | unbalanced | partial | multi | swav
    doc: str
    n_iters: int
    eps: float
    cpu_sizes: tuple     # size labels: "N", "NxM", "BxNxM" (batched), "B" (swav)
    gpu_sizes: tuple
    quick_sizes: tuple
    cpu_dtypes: tuple
    gpu_dtypes: tuple
    quick_dtypes: tuple = ("f32",)


SCENARIOS = {s.name: s for s in [
    Scenario("dense", "balanced", "square dense cost 0.5|x-y|^2 of uniform points in [0,1]^2",
             100, 0.05, ("500", "2000"), ("512", "1024", "2048", "4096", "8192", "16384"),
             ("64",), ("f64", "f32"), ("f32", "f64"), ("f64", "f32")),
    Scenario("rect", "balanced", "rectangular dense cost (M = 4N)",
             100, 0.05, ("400x1600",), ("512x2048", "2048x8192", "4096x16384"),
             ("48x96",), ("f32",), ("f32",)),
    Scenario("swav", "swav", "SwAV normalisation: scores (B, 3000) cosines, cost -S^T, 3 iterations, "
             "output Q = B * plan^T", 3, 0.05, ("256",), ("256", "512", "1024", "2048", "4096"),
             ("32",), ("f32",), ("f32",)),
    Scenario("batched", "balanced", "B independent 256x256 problems in one call",
             100, 0.05, ("16x256x256",), ("64x256x256", "256x256x256", "1024x256x256"),
             ("4x32x32",), ("f32",), ("f32",)),
    Scenario("unbalanced", "unbalanced", "KL-relaxed marginals, reach rho = 1 (cost units), masses 1 vs 1.5",
             100, 0.05, ("1000",), ("4096", "16384"), ("64",), ("f32",), ("f32",)),
    Scenario("partial", "partial", "entropic partial OT (Bregman/Dykstra), mass 0.5 of 1",
             100, 0.05, ("400",), ("1024", "4096"), ("64",), ("f64",), ("f32", "f64")),
    Scenario("multi", "multi", "multi-assignment (Multi-SK): cost -0.75*S, M=64 anchors, k=32, eps 0.07",
             20, 0.07, ("1000x64",), ("5716x64", "20000x256"), ("64x16",), ("f32",), ("f32",)),
    Scenario("lowp", "balanced", "half-precision cost storage (fp16/bf16), fp32 accumulation",
             100, 0.05, ("1000",), ("4096", "16384"), ("64",), ("bf16",), ("f16", "bf16"),
             ("bf16",)),
]}


@dataclasses.dataclass
class Problem:
    """One benchmark problem: every contender of its rows solves exactly this."""
    scenario: str
    kind: str
    label: str
    dtype: str
    eps: float
    n_iters: int
    cost: torch.Tensor            # (N, M) or (B, N, M) in `dtype`, on the device
    cost64: torch.Tensor          # the same values in float64 (reference input)
    a: torch.Tensor               # (N,) compute dtype
    b: torch.Tensor               # (M,)
    reach: Optional[float] = None
    mass: Optional[float] = None
    k: Optional[float] = None
    points: Optional[tuple] = None   # (x, y) when cost = 0.5|x - y|^2
    scores: Optional[torch.Tensor] = None  # swav: (B, K) cosines; cost = -scores.T

    @property
    def shape(self):
        return tuple(self.cost.shape)

    @property
    def compute_dtype(self):
        return torch.float64 if self.cost.dtype == torch.float64 else torch.float32

    @property
    def bytes_per_iter(self):
        # One Sinkhorn iteration = a row and a column half-step: two full reads of the cost.
        return 2 * self.cost.numel() * self.cost.element_size()


def _parse_size(label):
    return tuple(int(v) for v in label.lower().split("x"))


def _uniform_points(n, m, gen, device, batch=None):
    shape_x = (n, 2) if batch is None else (batch, n, 2)
    shape_y = (m, 2) if batch is None else (batch, m, 2)
    x = torch.rand(shape_x, generator=gen, dtype=torch.float64).to(device)
    y = torch.rand(shape_y, generator=gen, dtype=torch.float64).to(device)
    return x, y


def _sq_dist_half(x, y):
    # 0.5 |x - y|^2 (GeomLoss' p=2 cost), exact enough and without an (N, M, 2) temporary.
    xx = (x * x).sum(-1).unsqueeze(-1)
    yy = (y * y).sum(-1).unsqueeze(-2)
    return (0.5 * (xx + yy - 2 * x @ y.transpose(-1, -2))).clamp_min(0)


def _cosines(n, m, dim, gen, device):
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(device)
    c = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device)
    z = z / z.norm(dim=1, keepdim=True)
    c = c / c.norm(dim=1, keepdim=True)
    return z @ c.T


def make_problem(scenario, label, dtype, device, n_iters=None, seed=0):
    """Build the problem of one (scenario, size, dtype) cell; cost in ``dtype`` on ``device``."""
    sc = SCENARIOS[scenario]
    gen = torch.Generator().manual_seed(seed)
    dims = _parse_size(label)
    tdtype = DTYPES[dtype]
    compute = torch.float64 if tdtype == torch.float64 else torch.float32
    extra = {}
    if sc.kind == "swav":
        (batch,) = dims[:1]
        scores = _cosines(batch, 3000 if len(dims) == 1 else dims[1], 128, gen, device)
        cost64 = -scores.T                       # (K, B): prototypes are the rows, updated first
        extra["scores"] = scores.to(tdtype)
    elif sc.kind == "multi":
        n, m = dims
        cost64 = -0.75 * _cosines(n, m, 64, gen, device)
        extra["k"] = float(m // 2)
    elif len(dims) == 3:
        bsz, n, m = dims
        x, y = _uniform_points(n, m, gen, device, batch=bsz)
        cost64 = _sq_dist_half(x, y)
        extra["points"] = (x, y)
    else:
        n, m = (dims[0], dims[0]) if len(dims) == 1 else dims
        x, y = _uniform_points(n, m, gen, device)
        cost64 = _sq_dist_half(x, y)
        extra["points"] = (x, y)
    cost = cost64.to(tdtype).contiguous()
    cost64 = cost.to(torch.float64)              # reference sees exactly the stored values
    n, m = cost.shape[-2:]
    a = torch.full((n,), 1.0 / n, dtype=compute, device=device)
    b = torch.full((m,), 1.0 / m, dtype=compute, device=device)
    if sc.kind == "unbalanced":
        b = b * 1.5
        extra["reach"] = 1.0
    if sc.kind == "partial":
        extra["mass"] = 0.5
    if extra.get("points") is not None:
        extra["points"] = tuple(p.to(compute) for p in extra["points"])
    return Problem(scenario=scenario, kind=sc.kind, label=label, dtype=dtype, eps=sc.eps,
                   n_iters=n_iters or sc.n_iters, cost=cost, cost64=cost64, a=a, b=b, **extra)


# ----------------------------------------------------------------------------
# Naive torch references (the maths, written plainly; also the f64 reference)
# ----------------------------------------------------------------------------

def _as3(cost):
    return cost if cost.dim() == 3 else cost.unsqueeze(0)


def naive_step(cost, f, g, log_a, log_b, eps, damp=1.0):
    """One iteration, rows then columns, plan = a b exp((f + g - C) / eps).

    ``f = -damp * eps * lse_j(log b_j + (g_j - C_ij) / eps)``, then ``g`` likewise
    from the new ``f``; ``damp = rho / (rho + eps)`` for unbalanced, 1 balanced.
    cost (B, N, M) any dtype (upcast on the fly), f (B, N), g (B, M).
    """
    c = cost.to(f.dtype)
    f = -damp * eps * torch.logsumexp(log_b.unsqueeze(-2) + (g.unsqueeze(-2) - c) / eps, dim=-1)
    g = -damp * eps * torch.logsumexp(log_a.unsqueeze(-1) + (f.unsqueeze(-1) - c) / eps, dim=-2)
    return f, g


def naive_sinkhorn(cost, a, b, eps, n_iters, damp=1.0, step=naive_step, dtype=None):
    """Log-domain Sinkhorn loop (eager torch); returns (f, g), each with the batch dim of cost."""
    c = _as3(cost)
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    log_a = torch.log(a.to(dtype)).expand(c.shape[0], -1)
    log_b = torch.log(b.to(dtype)).expand(c.shape[0], -1)
    f = torch.zeros(c.shape[:2], dtype=dtype, device=c.device)
    g = torch.zeros((c.shape[0], c.shape[2]), dtype=dtype, device=c.device)
    for _ in range(n_iters):
        f, g = step(c, f, g, log_a, log_b, eps, damp)
    if cost.dim() == 2:
        f, g = f[0], g[0]
    return f, g


def naive_partial(cost, a, b, eps, n_iters, mass, dtype=None):
    """Entropic partial OT by Dykstra/Bregman projections in the log domain (Benamou et al. 2015).

    Plan ``log P = -C/eps + u_i + v_j + s``; each iteration projects on
    ``{P 1 <= a}``, ``{P^T 1 <= b}``, ``{sum P = mass}`` in turn, with Dykstra's
    corrections (a row vector, a column vector and a scalar, since every
    projection here is a diagonal scaling). Same iterates as POT's
    ``entropic_partial_wasserstein``. Returns the plan (N, M).
    """
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    lk = -cost.to(dtype) / eps
    log_a, log_b = torch.log(a.to(dtype)), torch.log(b.to(dtype))
    n, m = cost.shape
    u = torch.zeros(n, dtype=dtype, device=cost.device)
    v = torch.zeros(m, dtype=dtype, device=cost.device)
    s = math.log(mass) - torch.logsumexp(lk.reshape(-1), 0)
    q1 = torch.zeros_like(u)
    q2 = torch.zeros_like(v)
    q3 = torch.zeros((), dtype=dtype, device=cost.device)
    for _ in range(n_iters):
        u = u + q1
        d1 = torch.clamp_max(log_a - torch.logsumexp(lk + v + s, dim=1) - u, 0.0)
        u, q1 = u + d1, -d1
        v = v + q2
        d2 = torch.clamp_max(log_b - torch.logsumexp(lk + u[:, None] + s, dim=0) - v, 0.0)
        v, q2 = v + d2, -d2
        s = s + q3
        d3 = math.log(mass) - torch.logsumexp((lk + u[:, None] + v + s).reshape(-1), 0)
        s, q3 = s + d3, -d3
    return torch.exp(lk + u[:, None] + v + s)


def naive_multi(cost, k, b, eps, n_iters, dtype=None):
    """Multi-assignment (METHODS.md section 4) by the two-layer log-domain iteration.

    ``X = sigmoid((u_i + v_j - C_ij)/eps)``, rows summing to ``k``, columns to
    ``c_j = k N b_j``. With ``z = (u + v - C)/eps`` one iteration is
    ``u += eps*(log k - log(M - k)) - eps*(lse_j log s(z) - lse_j log s(-z))``
    then the same for ``v`` with ``c_j`` and ``N - c_j``. Returns (u, v).
    """
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    c = cost.to(dtype)
    n, m = c.shape
    col = k * n * b.to(dtype)
    u = torch.zeros(n, dtype=dtype, device=c.device)
    v = torch.zeros(m, dtype=dtype, device=c.device)
    ls = torch.nn.functional.logsigmoid
    for _ in range(n_iters):
        z = (u[:, None] + v - c) / eps
        u = u + eps * (math.log(k) - math.log(m - k)
                       - torch.logsumexp(ls(z), dim=1) + torch.logsumexp(ls(-z), dim=1))
        z = (u[:, None] + v - c) / eps
        v = v + eps * (torch.log(col) - torch.log(n - col)
                       - torch.logsumexp(ls(z), dim=0) + torch.logsumexp(ls(-z), dim=0))
    return u, v


def swav_exp_loop(scores, eps, n_iters):
    """SwAV's ``distributed_sinkhorn`` (world size 1), exp domain, written from METHODS.md section 1.

    scores (B, K) -> Q (B, K) with rows summing to 1. Prototype side first.
    """
    q = torch.exp(scores.float() / eps).t()      # (K, B)
    k_protos, batch = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k_protos
        q = q / q.sum(dim=0, keepdim=True)
        q = q / batch
    return (q * batch).t()


def multisk_layered(scores, r, eps, n_iters):
    """The official Multi-SK layered algorithm (a (K, B, K) tensor), from METHODS.md section 4.2.

    A different algorithm with the same fixed point as ``multi_assignment_sinkhorn(-0.75 S, r)``;
    exp domain, +1e-5 in every denominator. scores (B, K) -> X (B, K).
    """
    s = scores.float()
    batch, k_anchors = s.shape
    w = torch.full((k_anchors, 1, 1), 0.25, dtype=s.dtype, device=s.device)
    w[k_anchors - int(r):] = 1.0
    big = torch.finfo(s.dtype).max

    def fix(t):
        return torch.nan_to_num(t, posinf=big)

    a = fix(torch.exp(w * s.unsqueeze(0) / eps))
    a = a / a.sum()
    target = batch / k_anchors
    for _ in range(n_iters):
        a = fix(a * (target / (a.sum(dim=1, keepdim=True) + 1e-5)))
        a = fix(a / (a.sum(dim=0, keepdim=True) + 1e-5))
        a = fix(a / (a.sum(dim=2, keepdim=True) + 1e-5))
    a = a / a.sum(dim=2, keepdim=True)
    return a[k_anchors - int(r):].sum(dim=0)


# ----------------------------------------------------------------------------
# Contenders: one setup function, name -> callable(n_iters) -> raw output
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Contender:
    """A callable ``fn(n_iters) -> raw`` and how to read its answer.

    ``solution(raw)`` returns a dict with ``f``/``g`` (our convention, plan =
    a b exp((f + g - C)/eps)) and/or ``plan`` (the plan in the reference's
    normalisation), computed outside the timed region.
    """
    fn: Callable[[int], Any]
    solution: Callable[[Any], dict]
    inputs: str = "cost"          # "cost" or "points" (the contender builds its own cost)
    same_iterates: bool = True    # runs the reference's iterates exactly (judged by tolerance)
    can_reduce: bool = False      # slow contender: may run fewer iterations (per-iteration time kept)
    note: str = ""


class Unavailable(Exception):
    """The contender does not apply here (not installed / not meaningful); it gets no row."""


def _fg(f, g):
    return {"f": f, "g": g}


def _ours():
    try:
        return importlib.import_module("ot_losses"), None
    except Exception as exc:  # the package may be mid-edit; report it in the rows
        return None, f"import ot_losses failed: {type(exc).__name__}: {exc}"


def _pot_transposed(p, nx_torch, method):
    """POT's ``ot.sinkhorn`` (``method`` "sinkhorn_log" or "sinkhorn") on ``(C^T, b, a)``.

    POT updates columns first; on the transposed problem its iterates are ours (rows first).
    """
    import ot
    if nx_torch:
        ct, aa, bb = p.cost.T.contiguous(), p.b, p.a
    else:
        ct, aa, bb = (p.cost.T.contiguous().cpu().numpy(), p.b.cpu().numpy(), p.a.cpu().numpy())

    def fn(n_iters):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ot.sinkhorn(aa, bb, ct, p.eps, method=method, numItermax=n_iters,
                               stopThr=-1.0, log=True, warn=False)

    def solution(raw):
        log = raw[1]
        if method == "sinkhorn_log":
            log_u, log_v = log["log_u"], log["log_v"]        # (M,): columns of C, (N,): rows of C
        else:
            log_u, log_v = torch.as_tensor(log["u"]).log(), torch.as_tensor(log["v"]).log()
        log_u = torch.as_tensor(log_u).double().to(p.cost.device)
        log_v = torch.as_tensor(log_v).double().to(p.cost.device)
        return _fg(p.eps * (log_v - p.a.double().log()), p.eps * (log_u - p.b.double().log()))
    return fn, solution


def make_contenders(p: Problem, device: torch.device):
    """Every contender of problem ``p``: returns ``(dict name -> Contender, skipped)``.

    ``skipped`` lists ``(name, reason)`` for contenders not meaningful or not
    installed here; each skipped contender is named in the report.
    """
    out, skipped = {}, []
    cuda = device.type == "cuda"
    lowp = p.dtype in ("f16", "bf16")
    pot_dtype_ok = not lowp

    def add(name, builder):
        try:
            out[name] = builder()
        except Unavailable as why:
            skipped.append((name, str(why)))
        except Exception as exc:  # building failed: still a row, with the error
            msg = f"{type(exc).__name__}: {exc}"
            out[name] = Contender(fn=_raiser(msg), solution=lambda raw: {})

    # --- ot_losses ---------------------------------------------------------
    lib, lib_err = _ours()
    for backend in ("triton", "torch"):
        name = f"{OURS_PREFIX}{backend}"

        def build(backend=backend):
            if backend == "triton" and not (cuda and HAS_TRITON):
                raise Unavailable("CUDA only (the Triton interpreter on CPU is a correctness tool)")
            if lib is None:
                raise RuntimeError(lib_err)
            return _ours_contender(lib, p, backend)
        add(name, build)

    # --- naive torch loops (the anchor for a fused kernel) ------------------
    def naive_eager():
        return _naive_contender(p, compiled=False)
    add(BASELINE, naive_eager)

    def naive_compiled():
        if not cuda:
            raise Unavailable("torch.compile timed on CUDA only (CPU compile time dwarfs a small suite)")
        return _naive_contender(p, compiled=True)
    add("naive torch (compiled)", naive_compiled)

    # --- SwAV ----------------------------------------------------------------
    if p.kind == "swav":
        def swav():
            scores = p.scores
            batch = scores.shape[0]
            return Contender(fn=lambda n: swav_exp_loop(scores, p.eps, n),
                             solution=lambda q: {"plan": q.double().T / batch},
                             note="exp domain, as SwAV's distributed_sinkhorn")
        add("SwAV exp loop", swav)

    # --- POT -----------------------------------------------------------------
    def pot(kind, nx_torch):
        def build():
            if not HAS_POT:
                raise Unavailable("POT not installed")
            if not pot_dtype_ok:
                raise Unavailable("POT takes fp32/fp64 only")
            if p.cost.dim() == 3:
                return _pot_batched(p, kind, nx_torch)
            if p.kind in ("balanced", "swav"):
                fn, sol = _pot_transposed(p, nx_torch, "sinkhorn_log" if kind == "log" else "sinkhorn")
                if p.kind == "swav":
                    return Contender(fn=fn, solution=lambda raw: {"plan": _plan_from(p, sol(raw))},
                                     note="on (C^T, b, a) so its update order is ours")
                return Contender(fn=fn, solution=sol, can_reduce=not nx_torch,
                                 note="on (C^T, b, a) so its update order is ours")
            if p.kind == "unbalanced":
                if kind == "log":
                    raise Unavailable("POT has no plain log-domain unbalanced Sinkhorn")
                return _pot_unbalanced(p, nx_torch)
            if p.kind == "partial":
                return _pot_partial(p, kind, nx_torch)
            raise Unavailable(f"no POT solver for {p.kind}")
        return build

    if p.kind != "multi":
        numpy_limit = 2048 * 2048 if p.kind == "partial" else 4096 * 4096
        if not (cuda and p.cost.numel() > numpy_limit):
            add("POT numpy sinkhorn_log" if p.kind != "partial" else "POT numpy partial (log)",
                pot("log", False))
        else:
            skipped.append(("POT numpy", "too slow at this size"))
        add("POT torch sinkhorn_log" if p.kind != "partial" else "POT torch partial (log)",
            pot("log", True))
        add("POT torch exp-domain sinkhorn" if p.kind != "partial" else "POT torch partial (exp)",
            pot("exp", True))
        if not cuda:
            add("POT numpy exp-domain sinkhorn" if p.kind != "partial" else "POT numpy partial (exp)",
                pot("exp", False))

    # --- multi-assignment: the official layered algorithm -------------------
    if p.kind == "multi":
        def official():
            k = int(p.k)
            scores = (-p.cost.float() / 0.75)
            return Contender(fn=lambda n: multisk_layered(scores, k, p.eps, n),
                             solution=lambda x: {"plan": x.double()}, same_iterates=False,
                             can_reduce=True,
                             note="official layered (K,N,K) exp-domain algorithm: same fixed point, "
                                  "different iterates")
        add("Multi-SK layered (official algo)", official)

    # --- point-cloud solvers (their input is points, not the dense cost) ----
    if p.points is not None and p.kind == "balanced" and p.cost.dim() == 2 and not lowp:
        def geom(module, label):
            def build():
                if not _has(module):
                    raise Unavailable(f"{module} not installed")
                if module == "flash_sinkhorn" and not cuda:
                    raise Unavailable("flash-sinkhorn needs CUDA")
                return _samples_loss_contender(p, module)
            add(label, build)
        geom("geomloss", "GeomLoss SamplesLoss (points)")
        geom("flash_sinkhorn", "flash-sinkhorn SamplesLoss (points)")
    return out, skipped


def _raiser(msg):
    def fn(n_iters):
        raise RuntimeError(msg)
    return fn


def _plan_from(p, sol):
    """Plan ``a b exp((f + g - C)/eps)`` in float64 from potentials in our convention."""
    c = p.cost64
    la, lb = p.a.double().log(), p.b.double().log()
    f, g = sol["f"], sol["g"]
    return torch.exp(la.unsqueeze(-1) + lb.unsqueeze(-2) + (f.unsqueeze(-1) + g.unsqueeze(-2) - c) / p.eps)


def _ours_contender(lib, p, backend):
    eps = p.eps
    if p.kind in ("balanced", "unbalanced"):
        reach = p.reach

        def fn(n):
            return lib.sinkhorn(p.cost, p.a, p.b, eps=eps, n_iters=n, tol=None, reach=reach,
                                grad="none", backend=backend)
        return Contender(fn=fn, solution=lambda r: _fg(r.f.double(), r.g.double()))
    if p.kind == "swav":
        scores, batch = p.scores, p.scores.shape[0]

        def fn(n):
            # What a SwAV user runs: Q = B * sinkhorn(-S^T).plan^T (plan materialised, timed).
            return batch * lib.sinkhorn(-scores.T, eps=eps, n_iters=n, tol=None, grad="none",
                                        backend=backend).plan.T
        return Contender(fn=fn, solution=lambda q: {"plan": q.double().T / batch},
                         note="times Q = B * plan^T, plan included")
    if p.kind == "partial":
        if not hasattr(lib, "partial_ot"):
            raise RuntimeError("ot_losses.partial_ot not available yet")

        def fn(n):
            return lib.partial_ot(p.cost, p.a, p.b, mass=p.mass, eps=eps, n_iters=n, tol=None,
                                  method="bregman", grad="none", backend=backend)
        return Contender(fn=fn, solution=lambda r: {"plan": r.plan.double()})
    if p.kind == "multi":
        if not hasattr(lib, "multi_assignment_sinkhorn"):
            raise RuntimeError("ot_losses.multi_assignment_sinkhorn not available yet")

        def fn(n):
            return lib.multi_assignment_sinkhorn(p.cost, p.k, p.b, eps=eps, n_iters=n, tol=None,
                                                 backend=backend)
        return Contender(fn=fn, solution=lambda r: {"plan": r.assignment.double()})
    raise Unavailable(f"unknown kind {p.kind}")


def _naive_contender(p, compiled):
    eps = p.eps
    step = naive_step
    if compiled:
        # A fresh compile cache per problem: one wrapper, one shape, never the recompile-limit
        # fallback to eager (which would silently time the eager loop under this name).
        torch._dynamo.reset()
        step = torch.compile(naive_step, dynamic=False)
    if p.kind in ("balanced", "unbalanced"):
        damp = 1.0 if p.reach is None else p.reach / (p.reach + eps)
        lowp = p.cost.dtype in (torch.float16, torch.bfloat16)
        return Contender(fn=lambda n: naive_sinkhorn(p.cost, p.a, p.b, eps, n, damp=damp, step=step),
                         solution=lambda fg: _fg(fg[0].double(), fg[1].double()),
                         # eager fp16 -> fp32 upcasts are very slow on some CPUs: allow fewer iterations
                         can_reduce=lowp and p.cost.device.type == "cpu",
                         note="torch.compile of one iteration" if compiled else "")
    if p.kind == "swav":
        batch = p.scores.shape[0]
        scores = p.scores
        k_protos = scores.shape[1]
        dt = p.compute_dtype
        a = torch.full((k_protos,), 1.0 / k_protos, dtype=dt, device=scores.device)
        b = torch.full((batch,), 1.0 / batch, dtype=dt, device=scores.device)

        def fn(n):
            cost = -scores.T
            f, g = naive_sinkhorn(cost, a, b, eps, n, step=step)
            c = cost.to(f.dtype)
            plan = torch.exp(a.log()[:, None] + b.log() + (f[:, None] + g - c) / eps)
            return batch * plan.T
        return Contender(fn=fn, solution=lambda q: {"plan": q.double().T / batch})
    if compiled:
        raise Unavailable("compiled naive loop only for balanced/unbalanced/swav")
    if p.kind == "partial":
        return Contender(fn=lambda n: naive_partial(p.cost, p.a, p.b, eps, n, p.mass),
                         solution=lambda plan: {"plan": plan.double()},
                         note="log-domain Dykstra, same iterates as POT")
    if p.kind == "multi":
        def sol(uv):
            u, v = uv[0].double(), uv[1].double()
            return {"plan": torch.sigmoid((u[:, None] + v - p.cost64) / eps)}
        return Contender(fn=lambda n: naive_multi(p.cost, p.k, p.b, eps, n), solution=sol,
                         note="two-layer log-domain iteration (METHODS.md 4)")
    raise Unavailable(p.kind)


def _pot_batched(p, kind, nx_torch):
    import ot
    if not nx_torch:
        raise Unavailable("batched rows: POT torch backend only (loop over problems)")
    costs_t = [c.T.contiguous() for c in p.cost]
    method = "sinkhorn_log" if kind == "log" else "sinkhorn"

    def fn(n):
        res = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ct in costs_t:
                res.append(ot.sinkhorn(p.b, p.a, ct, p.eps, method=method, numItermax=n,
                                       stopThr=-1.0, log=True, warn=False)[1])
        return res

    def solution(logs):
        la, lb = p.a.double().log(), p.b.double().log()
        if kind == "log":
            u = torch.stack([lg["log_u"] for lg in logs]).double()
            v = torch.stack([lg["log_v"] for lg in logs]).double()
        else:
            u = torch.stack([lg["u"] for lg in logs]).double().log()
            v = torch.stack([lg["v"] for lg in logs]).double().log()
        return _fg(p.eps * (v - la), p.eps * (u - lb))
    return Contender(fn=fn, solution=solution, can_reduce=True,
                     note="Python loop over the B problems, on (C^T, b, a)")


def _pot_unbalanced(p, nx_torch):
    import ot
    if nx_torch:
        cost, a, b = p.cost, p.a, p.b
    else:
        cost, a, b = p.cost.cpu().numpy(), p.a.cpu().numpy(), p.b.cpu().numpy()

    def fn(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ot.unbalanced.sinkhorn_unbalanced(a, b, cost, p.eps, p.reach, method="sinkhorn",
                                                     reg_type="kl", numItermax=n, stopThr=-1.0,
                                                     log=True)

    def solution(raw):
        log = raw[1]
        lu = torch.as_tensor(log["logu"]).double().to(p.cost.device)
        lv = torch.as_tensor(log["logv"]).double().to(p.cost.device)
        return _fg(p.eps * lu, p.eps * lv)
    return Contender(fn=fn, solution=solution, can_reduce=not nx_torch,
                     note="sinkhorn_unbalanced(method='sinkhorn', reg_type='kl'), exp domain")


def _pot_partial(p, kind, nx_torch):
    import ot
    if nx_torch:
        cost, a, b = p.cost, p.a, p.b
    else:
        cost, a, b = p.cost.cpu().numpy(), p.a.cpu().numpy(), p.b.cpu().numpy()
    method = "sinkhorn_log" if kind == "log" else "sinkhorn"
    # POT's torch log-scale path calls nx.log(m): give it a tensor there.
    mass = torch.tensor(p.mass, dtype=p.a.dtype, device=p.a.device) if nx_torch else p.mass

    def fn(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ot.partial.entropic_partial_wasserstein(a, b, cost, p.eps, m=mass, method=method,
                                                           numItermax=n, stopThr=-1.0)

    def solution(plan):
        return {"plan": torch.as_tensor(plan).double().to(p.cost.device)}
    return Contender(fn=fn, solution=solution, can_reduce=True,
                     note="(N,N)/(M,M) diag matmuls and three (N,M) Dykstra matrices per iteration")


def _samples_loss_contender(p, module):
    mod = importlib.import_module(module)
    x, y = p.points
    blur = math.sqrt(p.eps)   # GeomLoss: eps = blur ** p, cost |x - y|^2 / 2 for p = 2
    kwargs = dict(loss="sinkhorn", p=2, blur=blur, debias=False, potentials=True)
    if module == "geomloss":
        kwargs["backend"] = "tensorized"
    loss = mod.SamplesLoss(**kwargs)

    def fn(n):   # n_iters cannot be set: it follows its own eps-scaling schedule
        return loss(p.a, x, p.b, y)

    def solution(fg):
        f, g = fg
        return _fg(f.reshape(-1).double(), g.reshape(-1).double())
    return Contender(fn=fn, solution=solution, inputs="points", same_iterates=False,
                     note="input is points (cost 0.5|x-y|^2 built inside), eps-scaling schedule "
                          "(scaling=0.5), own iteration count: compare its time per call, not per iteration")


# ----------------------------------------------------------------------------
# Reference and agreement
# ----------------------------------------------------------------------------

def reference(p: Problem, n_iters):
    """Float64 run of the reference maths on the stored cost values, same n_iters."""
    c64, a, b = p.cost64, p.a.double(), p.b.double()
    if p.kind in ("balanced", "unbalanced"):
        damp = 1.0 if p.reach is None else p.reach / (p.reach + p.eps)
        f, g = naive_sinkhorn(c64, a, b, p.eps, n_iters, damp=damp)
        return {"f": f, "g": g}
    if p.kind == "swav":
        k_protos, batch = c64.shape
        a = torch.full((k_protos,), 1.0 / k_protos, dtype=torch.float64, device=c64.device)
        b = torch.full((batch,), 1.0 / batch, dtype=torch.float64, device=c64.device)
        f, g = naive_sinkhorn(c64, a, b, p.eps, n_iters)
        return {"plan": torch.exp(a.log()[:, None] + b.log() + (f[:, None] + g - c64) / p.eps)}
    if p.kind == "partial":
        return {"plan": naive_partial(c64, a, b, p.eps, n_iters, p.mass)}
    if p.kind == "multi":
        u, v = naive_multi(c64, p.k, b, p.eps, n_iters)
        return {"plan": torch.sigmoid((u[:, None] + v - c64) / p.eps)}
    raise ValueError(p.kind)


def _plan_of(p, sol):
    if "plan" in sol:
        return sol["plan"]
    if p.kind == "swav":
        raise ValueError("swav solutions carry a plan")
    return _plan_from(p, sol)


def _centred(f, g):
    shift = f.mean(dim=-1, keepdim=True)
    return f - shift, g + shift


def agreement(p: Problem, sol: dict, ref: dict):
    """(max |f - f_ref| centred or None, relative plan error, relative marginal error)."""
    err_f = None
    if "f" in sol and "f" in ref:
        f, g = _centred(sol["f"], sol["g"])
        fr, gr = _centred(ref["f"], ref["g"])
        err_f = max((f - fr).abs().max().item(), (g - gr).abs().max().item())
    plan = _plan_of(p, sol)
    plan_ref = _plan_of(p, ref)
    num = (plan - plan_ref).flatten(-2).norm(dim=-1)
    den = plan_ref.flatten(-2).norm(dim=-1)
    err_plan = (num / den).max().item()
    rows, cols = plan.sum(-1), plan.sum(-2)
    if p.kind in ("balanced", "swav"):
        n, m = plan.shape[-2:]
        if p.kind == "swav":
            ta, tb = torch.full_like(rows, 1.0 / n), torch.full_like(cols, 1.0 / m)
        else:
            ta, tb = p.a.double(), p.b.double()
        viol = (rows - ta).abs().sum(-1) + (cols - tb).abs().sum(-1)
        mass = ta.sum()
    elif p.kind == "partial":
        a, b = p.a.double(), p.b.double()
        viol = ((rows - a).clamp_min(0).sum(-1) + (cols - b).clamp_min(0).sum(-1)
                + (plan.sum((-2, -1)) - p.mass).abs())
        mass = torch.tensor(p.mass, dtype=torch.float64)
    elif p.kind == "multi":
        n = plan.shape[-2]
        tr = torch.full_like(rows, p.k)
        tc = p.k * n * p.b.double()
        viol = (rows - tr).abs().sum(-1) + (cols - tc).abs().sum(-1)
        mass = torch.tensor(p.k * n, dtype=torch.float64)
    else:   # unbalanced: marginals are not met at the optimum; compare with the reference's
        viol = ((rows - plan_ref.sum(-1)).abs().sum(-1) + (cols - plan_ref.sum(-2)).abs().sum(-1))
        mass = plan_ref.sum((-2, -1))
    err_marg = (viol / mass).max().item()
    return err_f, err_plan, err_marg


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TimingConfig:
    budget_s: float        # target timed seconds per contender (repeats adapt to it)
    max_call_s: float      # a can_reduce contender slower than this runs fewer iterations
    min_repeats: int
    max_repeats: int


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe_cpu(fn, n_iters, cfg: TimingConfig, can_reduce):
    """Warm-up call (a few iterations); returns (n_iters to time, number of timed repeats)."""
    probe_iters = min(n_iters, 5)
    t0 = time.perf_counter()
    fn(probe_iters)                              # warm-up (allocator, lazy imports, caches)
    per_iter = (time.perf_counter() - t0) / probe_iters
    n_used = n_iters
    if can_reduce and per_iter * n_iters > cfg.max_call_s:
        n_used = max(probe_iters, int(cfg.max_call_s / per_iter))
        if n_used >= 10:
            n_used -= n_used % 10                # POT checks its error every 10 iterations
    est = per_iter * n_used
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(est, 1e-9))))
    return n_used, repeats


def time_cpu_interleaved(contenders, n_iters, cfg: TimingConfig, progress=None):
    """``perf_counter`` around each call, in rounds: one call of every contender per round.

    On a shared machine the load changes over seconds; interleaving makes every
    contender of a problem see the same conditions, so their ratios stay meaningful.
    Returns ``name -> dict(times, n_used, raw, error)``.
    """
    state = {}
    for name, c in contenders.items():
        if progress:
            progress(f"warm-up {name}")
        try:
            n_used, repeats = probe_cpu(c.fn, n_iters, cfg, c.can_reduce)
            state[name] = dict(times=[], n_used=n_used, repeats=repeats, raw=None, error=None)
        except Exception as exc:
            state[name] = dict(times=[], n_used=n_iters, repeats=0, raw=None, error=exc,
                               tb=traceback.format_exc(limit=3)[-1500:])
    rounds = max([st["repeats"] for st in state.values()] + [0])
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        for name, c in contenders.items():
            st = state[name]
            if st["error"] is not None or len(st["times"]) >= st["repeats"]:
                continue
            try:
                t0 = time.perf_counter()
                st["raw"] = c.fn(st["n_used"])
                st["times"].append(time.perf_counter() - t0)
            except Exception as exc:
                st["error"], st["tb"] = exc, traceback.format_exc(limit=3)[-1500:]
    return state


def time_cuda(fn, n_iters, cfg: TimingConfig, can_reduce, device):
    """``triton.testing.do_bench`` (median, 20th, 80th percentile); CUDA events for calls > 0.5 s.

    Returns (times_s, n_iters_used, last_raw, is_quantiles): ``times_s`` is the
    (median, p20, p80) triple when ``is_quantiles``, else the per-repeat times.
    """
    torch.cuda.synchronize()
    probe_iters = min(n_iters, 5)
    fn(probe_iters)                              # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(probe_iters)
    torch.cuda.synchronize()
    per_iter = (time.perf_counter() - t0) / probe_iters
    n_used = n_iters
    if can_reduce and per_iter * n_iters > cfg.max_call_s:
        n_used = max(probe_iters, int(cfg.max_call_s / per_iter))
    est_ms = 1e3 * per_iter * n_used
    raw = fn(n_used)
    torch.cuda.synchronize()
    if HAS_TRITON and est_ms < 500:
        # do_bench spends ~5 calls estimating before it times; long calls use events x3 instead.
        from triton.testing import do_bench
        rep = max(3 * est_ms, min(1e3 * cfg.budget_s, cfg.max_repeats * est_ms))
        q = do_bench(lambda: fn(n_used), warmup=max(1.0, est_ms), rep=rep, quantiles=[0.5, 0.2, 0.8])
        return [v / 1e3 for v in q], n_used, raw, True
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, 1e3 * cfg.budget_s / max(est_ms, 1e-6))))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        raw = fn(n_used)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times, n_used, raw, False


def copy_bandwidth(device, nbytes=None):
    """Device copy bandwidth in GB/s, counting bytes read + bytes written (``dst.copy_(src)``)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        if HAS_TRITON:
            from triton.testing import do_bench
            ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        else:
            ts = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                dst.copy_(src)
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            ms = float(np.median(ts))
        sec = ms / 1e3
    else:
        dst.copy_(src)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        sec = float(np.median(ts))
    return 2 * nbytes / sec / 1e9


# ----------------------------------------------------------------------------
# Running one problem
# ----------------------------------------------------------------------------

def run_problem(p: Problem, device, cfg: TimingConfig, copy_gbps, progress=None, only=None):
    """Time and check every contender of ``p``; returns (rows, skipped). Never raises for a contender."""
    contenders, skipped = make_contenders(p, device)
    if only:
        contenders = {k: v for k, v in contenders.items() if any(o.lower() in k.lower() for o in only)}
    refs = {}
    rows = []
    order = list(contenders)
    # Run the baseline first (its f64 answer doubles as the reference); report in dict order.
    run_order = sorted(order, key=lambda n: n != BASELINE)
    tag = f"{p.scenario} {p.label} {p.dtype}"
    if device.type == "cuda":
        timed = {}
        for name in run_order:
            if progress:
                progress(f"{tag}: {name}")
            try:
                times, n_used, raw, quant = time_cuda(contenders[name].fn, p.n_iters, cfg,
                                                      contenders[name].can_reduce, device)
                timed[name] = dict(n_used=n_used, raw=raw, error=None)
                timed[name]["quantiles" if quant else "times"] = times
            except Exception as exc:
                timed[name] = dict(n_used=p.n_iters, raw=None, error=exc,
                                   tb=traceback.format_exc(limit=3)[-1500:])
            torch.cuda.empty_cache()
    else:
        timed = time_cpu_interleaved({n: contenders[n] for n in run_order}, p.n_iters, cfg,
                                     progress=(lambda m: progress(f"{tag}: {m}")) if progress else None)
    for name in run_order:
        c, st = contenders[name], timed[name]
        row = dict(scenario=p.scenario, kind=p.kind, size=p.label, shape=list(p.shape), dtype=p.dtype,
                   eps=p.eps, contender=name, inputs=c.inputs, same_iterates=c.same_iterates,
                   note=c.note, status="ok", error=None, n_iters=p.n_iters)
        try:
            if st["error"] is not None:
                raise st["error"]
            n_used, raw = st["n_used"], st["raw"]
            if "quantiles" in st:
                med, lo, hi = st["quantiles"]
                repeats, fastest = None, None
            else:
                times = st["times"]
                med = float(np.median(times))
                lo, hi = (float(v) for v in np.quantile(times, [0.2, 0.8]))
                repeats, fastest = len(times), 1e3 * min(times)
            row.update(n_iters=n_used, reduced_iters=n_used != p.n_iters, repeats=repeats,
                       median_ms=1e3 * med, p20_ms=1e3 * lo, p80_ms=1e3 * hi, min_ms=fastest,
                       ms_per_iter=1e3 * med / n_used)
            row["gbps"] = p.bytes_per_iter / (med / n_used) / 1e9
            row["frac_copy_bw"] = row["gbps"] / copy_gbps if copy_gbps else None
            sol = c.solution(raw)
            if name == BASELINE and p.dtype == "f64" and p.kind in ("balanced", "unbalanced"):
                refs.setdefault(n_used, sol)     # the f64 naive loop *is* the reference computation
            if n_used not in refs:
                refs[n_used] = reference(p, n_used)
            err_f, err_plan, err_marg = agreement(p, sol, refs[n_used])
            tol_f, tol_plan = TOLERANCES[p.dtype]
            row.update(err_f=err_f, err_plan=err_plan, err_marg=err_marg, tol_f=tol_f, tol_plan=tol_plan)
            finite = all(v is None or math.isfinite(v) for v in (err_f, err_plan, err_marg))
            if c.same_iterates:
                row["agrees"] = bool(finite and err_plan <= tol_plan and (err_f is None or err_f <= tol_f))
            else:
                row["agrees"] = None
        except Exception as exc:  # a failing contender is a row, not a crash
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip()[:400],
                       traceback=st.get("tb") or traceback.format_exc(limit=3)[-1500:])
        st["raw"] = None
        rows.append(row)
    rows.sort(key=lambda r: order.index(r["contender"]))
    base = next((r for r in rows if r["contender"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["baseline"] = BASELINE
        if base is not None and r["status"] == "ok":
            r["speedup"] = base["ms_per_iter"] / r["ms_per_iter"]
            r["speedup_per_call"] = base["median_ms"] * r["n_iters"] / base["n_iters"] / r["median_ms"]
        else:
            r["speedup"] = None
    skipped = [dict(scenario=p.scenario, size=p.label, dtype=p.dtype, contender=n, reason=why)
               for n, why in skipped]
    return rows, skipped


# ----------------------------------------------------------------------------
# Metadata, output
# ----------------------------------------------------------------------------

def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_info(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slugify(name)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})", "cpu"


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def metadata(device, args, copy_gbps):
    name, slug = device_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=name, device_slug=slug, date=now.date().isoformat(),
                datetime_utc=now.isoformat(timespec="seconds"), git_commit=git_commit(),
                python=platform.python_version(), torch=torch.__version__,
                triton=_version("triton"), pot=_version("ot"), geomloss=_version("geomloss"),
                flash_sinkhorn=_version("flash_sinkhorn"), ot_losses=_version("ot_losses"),
                numpy=np.__version__, copy_gbps=copy_gbps, torch_threads=torch.get_num_threads(),
                copy_note="dst.copy_(src) of a large fp32 tensor, bytes read + written / time",
                bandwidth_note="bytes/iter = 2 passes over the cost (row + column half-step) x its "
                               "element size; GB/s = that / time per iteration",
                argv=sys.argv[1:], quick=args.quick,
                load_avg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    return meta


def _fmt(v, spec):
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


COLUMNS = ["contender", "input", "iters", "median ms [p20-p80]", "ms/iter", "x vs naive",
           "GB/s", "% copy", "|f-f_ref|", "plan rel err", "marg err", "check"]


def row_cells(r):
    if r["status"] != "ok":
        return [r["contender"], r["inputs"], str(r["n_iters"]), "ERROR: " + (r["error"] or ""),
                "", "", "", "", "", "", "", "error"]
    iters = str(r["n_iters"]) + ("*" if r.get("reduced_iters") else "")
    if r["inputs"] == "points":
        iters = "own"
    check = {True: "ok", False: "MISMATCH", None: "n/a"}[r["agrees"]]
    return [r["contender"], r["inputs"], iters,
            f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]",
            "-" if r["inputs"] == "points" else f"{r['ms_per_iter']:.4g}",
            _fmt(r.get("speedup_per_call") if r["inputs"] == "points" else r.get("speedup"), ".2f"),
            "-" if r["inputs"] == "points" else _fmt(r["gbps"], ".3g"),
            "-" if r["inputs"] == "points" or not r["frac_copy_bw"] else _fmt(100 * r["frac_copy_bw"], ".1f"),
            _fmt(r["err_f"], ".1e"), _fmt(r["err_plan"], ".1e"), _fmt(r["err_marg"], ".1e"), check]


def group_rows(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["size"], r["dtype"]), []).append(r)
    return groups


def headline(rows):
    """Ratios of ot_losses (torch, and triton where present) against each contender, per problem."""
    out = []
    for (sc, size, dt), rs in group_rows(rows).items():
        ok = {r["contender"]: r for r in rs if r["status"] == "ok" and r["inputs"] == "cost"}
        for ours in (f"{OURS_PREFIX}triton", f"{OURS_PREFIX}torch"):
            if ours not in ok:
                continue
            for other, r in ok.items():
                if other.startswith(OURS_PREFIX):
                    continue
                out.append(dict(scenario=sc, size=size, dtype=dt, ours=ours, other=other,
                                ours_ms_per_iter=ok[ours]["ms_per_iter"], other_ms_per_iter=r["ms_per_iter"],
                                speedup=r["ms_per_iter"] / ok[ours]["ms_per_iter"]))
    return out


NOTES = [
    "Same problem per row group: same cost tensor, marginals, eps, n_iters and tol=None (never an "
    "early stop). POT is given stopThr=-1 so it runs exactly n_iters; it still computes its marginal "
    "error every 10 iterations (part of its cost).",
    "POT's balanced solvers update columns first; they are called on (C^T, b, a), which makes their "
    "iterates those of ot_losses (rows first), so agreement is exact up to rounding.",
    "Agreement: float64 reference = the naive log-domain loop on the stored cost values (half-precision "
    "costs upcast exactly), same n_iters. |f-f_ref|: max over f and g after removing mean(f) from f "
    "and adding it to g (cost units). plan rel err: ||P - P_ref||_F / ||P_ref||_F. marg err: L1 "
    "violation of the constraints / transported mass (unbalanced: distance to the reference plan's "
    "marginals). check: within the dtype's tolerance (TOLERANCES); n/a for contenders with their own "
    "algorithm (eps-scaling, layered Multi-SK), whose errors are shown but not judged.",
    "iters with * = a slow contender ran fewer iterations to fit the time budget; its per-iteration "
    "time is the comparable number and its agreement is checked against a reference of the same "
    "iteration count.",
    "x vs naive = time per iteration of the eager naive torch loop / this row's (per call for "
    "point-cloud rows, whose iteration count is their own).",
    "Point-cloud rows (GeomLoss, flash-sinkhorn) take the points x, y, not the dense cost, and build "
    "0.5|x-y|^2 themselves (blur = sqrt(eps), debias=False); their time per call is what compares.",
    "SwAV rows time the full Q = B * plan^T (3 iterations + forming Q) for every contender; time per "
    "iteration = call / 3.",
]


def write_markdown(path, meta, rows, skipped, heads):
    lines = [f"# bench_sinkhorn: {meta['device']}", "",
             f"- date (UTC): {meta['datetime_utc']}; git commit: `{meta['git_commit']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}, POT {meta['pot']}, GeomLoss "
             f"{meta['geomloss']}, flash-sinkhorn {meta['flash_sinkhorn']}, numpy {meta['numpy']}, "
             f"python {meta['python']}",
             f"- copy bandwidth measured in this run: {meta['copy_gbps']:.3g} GB/s ({meta['copy_note']})",
             f"- load average (1, 5, 15 min) at start {meta.get('load_avg')}, at end "
             f"{meta.get('load_avg_end')}; run took {meta.get('elapsed_s', 0):.0f} s",
             f"- command: `bench_sinkhorn.py "
             f"{' '.join(meta['argv'])}`", ""]
    if meta.get("timing_note"):
        lines += [f"> {meta['timing_note']}", ""]
    for (sc, size, dt), rs in group_rows(rows).items():
        r0 = rs[0]
        lines += [f"## {sc} {size} {dt} (shape {tuple(r0['shape'])}, eps {r0['eps']}, "
                  f"n_iters {SCENARIO_ITERS.get((sc, size, dt), r0['n_iters'])})", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in rs:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(r)) + " |")
        lines.append("")
    if heads:
        lines += ["## ot_losses speed-up per iteration over each contender", "",
                  "| problem | ours | other | ours ms/iter | other ms/iter | speed-up |",
                  "|---|---|---|---|---|---|"]
        for h in heads:
            lines.append(f"| {h['scenario']} {h['size']} {h['dtype']} | {h['ours']} | {h['other']} | "
                         f"{h['ours_ms_per_iter']:.4g} | {h['other_ms_per_iter']:.4g} | "
                         f"{h['speedup']:.2f}x |")
        lines.append("")
    if skipped:
        lines += ["## Contenders without a row", ""]
        seen = set()
        for s in skipped:
            key = (s["contender"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {s['contender']}: {s['reason']}")
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    Path(path).write_text("\n".join(lines))


SCENARIO_ITERS = {}


def print_table(rows, console=None):
    for (sc, size, dt), rs in group_rows(rows).items():
        n_iters = SCENARIO_ITERS.get((sc, size, dt), rs[0]["n_iters"])
        title = f"{sc} {size} {dt}  (eps {rs[0]['eps']}, n_iters {n_iters})"
        if console is not None:
            from rich.table import Table
            table = Table(title=title, title_justify="left")
            for c in COLUMNS:
                table.add_column(c, overflow="fold")
            for r in rs:
                style = "red" if r["status"] != "ok" or r.get("agrees") is False else None
                if r["contender"].startswith(OURS_PREFIX) and style is None:
                    style = "bold"
                table.add_row(*row_cells(r), style=style)
            console.print(table)
        else:
            cells = [COLUMNS] + [row_cells(r) for r in rs]
            widths = [min(60, max(len(c[i]) for c in cells)) for i in range(len(COLUMNS))]
            print("\n" + title)
            for c in cells:
                print("  ".join(s[:60].ljust(w) for s, w in zip(c, widths)))


def plot(path, rows):
    """Time per iteration vs problem size, one line per contender, per (scenario, dtype)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {}
    for r in rows:
        if r["status"] == "ok" and r["inputs"] == "cost":
            panels.setdefault((r["scenario"], r["dtype"]), []).append(r)
    panels = {k: v for k, v in panels.items() if len({r["size"] for r in v}) >= 2} or panels
    if not panels:
        return False
    n = len(panels)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.5 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, ((sc, dt), rs) in zip(axes.flat, sorted(panels.items())):
        by = {}
        for r in rs:
            by.setdefault(r["contender"], []).append((int(np.prod(r["shape"])), r["ms_per_iter"]))
        for name, pts in sorted(by.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    linewidth=2.5 if name.startswith(OURS_PREFIX) else 1.2, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cost entries (B*N*M)")
        ax.set_ylabel("ms / iteration")
        ax.set_title(f"{sc} {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def build_plan(args, device):
    cuda = device.type == "cuda"
    names = [s.strip() for s in (args.scenario or ",".join(SCENARIOS)).split(",") if s.strip()]
    for n in names:
        if n not in SCENARIOS:
            raise SystemExit(f"--scenario: unknown {n!r}; choose from {', '.join(SCENARIOS)}")
    plan = []
    for n in names:
        sc = SCENARIOS[n]
        if args.sizes:
            sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        elif args.quick:
            sizes = list(sc.quick_sizes)
        else:
            sizes = list(sc.gpu_sizes if cuda else sc.cpu_sizes)
        if args.dtype:
            dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
            for d in dtypes:
                if d not in DTYPES:
                    raise SystemExit(f"--dtype: unknown {d!r}; choose from {', '.join(DTYPES)}")
        elif args.quick:
            dtypes = list(sc.quick_dtypes)
        else:
            dtypes = list(sc.gpu_dtypes if cuda else sc.cpu_dtypes)
        for s in sizes:
            try:
                _parse_size(s)
            except ValueError:
                raise SystemExit(f"--sizes: cannot parse {s!r}; use N, NxM or BxNxM")
            for d in dtypes:
                plan.append((n, s, d))
    return plan


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, at most 10 iterations, 2 repeats (smoke test, a few seconds)")
    ap.add_argument("--scenario", default=None, help=f"comma list of: {', '.join(SCENARIOS)} (default all)")
    ap.add_argument("--sizes", default=None,
                    help="comma list overriding each selected scenario's sizes: N, NxM, BxNxM (batched), "
                         "B (swav batch) or NxM (multi)")
    ap.add_argument("--dtype", default=None, help="comma list of f64,f32,f16,bf16 (cost dtype)")
    ap.add_argument("--iters", type=int, default=None,
                    help="n_iters for every problem (default per scenario)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/results)")
    ap.add_argument("--contenders", default=None,
                    help="comma list of substrings: only contenders whose name contains one")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--repeats", type=int, default=None, help="max timed repeats per contender")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this run (default: torch's choice); 1 is steadier "
                         "on a CPU shared with other jobs")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        ap.error("--iters must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:11s} {s.doc}\n{'':11s} n_iters {s.n_iters}, eps {s.eps}; CPU sizes "
                  f"{', '.join(s.cpu_sizes)} ({', '.join(s.cpu_dtypes)}); GPU sizes {', '.join(s.gpu_sizes)} "
                  f"({', '.join(s.gpu_dtypes)})")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if HAS_CUDA else "cpu"))
    cuda = device.type == "cuda"
    if args.quick:
        cfg = TimingConfig(budget_s=0.02, max_call_s=0.2, min_repeats=2, max_repeats=args.repeats or 2)
    elif cuda:
        cfg = TimingConfig(budget_s=1.0, max_call_s=5.0, min_repeats=3, max_repeats=args.repeats or 100)
    else:
        cfg = TimingConfig(budget_s=0.3, max_call_s=0.3, min_repeats=3, max_repeats=args.repeats or 7)
    plan = build_plan(args, device)
    only = [s.strip() for s in args.contenders.split(",")] if args.contenders else None

    console = None
    if HAS_RICH:
        from rich.console import Console
        # Wide tables: let them be wide when the output is not a terminal (logs, CI).
        console = Console(width=None if sys.stdout.isatty() else 220)
    t_start = time.perf_counter()
    copy_gbps = copy_bandwidth(device)
    meta = metadata(device, args, copy_gbps)
    meta["timing_note"] = (
        "CPU timings: median of >= 3 perf_counter repeats after a warm-up call, the repeats of a "
        "problem's contenders interleaved round by round so that all see the same load; on a shared "
        "machine (other jobs may run) treat ratios, not absolute times, as the result." if not cuda else
        "CUDA timings: triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8]) after a warm-up call.")
    rows, skipped = [], []

    def run_all(progress_cb=None, advance=None):
        for sc, size, dt in plan:
            n_iters = args.iters or (min(SCENARIOS[sc].n_iters, 10) if args.quick else None)
            try:
                p = make_problem(sc, size, dt, device, n_iters=n_iters)
            except Exception as exc:
                rows.append(dict(scenario=sc, kind=SCENARIOS[sc].kind, size=size, shape=[], dtype=dt,
                                 eps=SCENARIOS[sc].eps, contender="(problem setup)", inputs="cost",
                                 status="error", error=f"{type(exc).__name__}: {exc}", n_iters=args.iters,
                                 same_iterates=False, note=""))
                continue
            SCENARIO_ITERS[(sc, size, dt)] = p.n_iters
            r, s = run_problem(p, device, cfg, copy_gbps, progress=progress_cb, only=only)
            rows.extend(r)
            skipped.extend(s)
            if advance:
                advance()
            del p
            if cuda:
                torch.cuda.empty_cache()

    if console is not None and console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} problems"), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task("starting", total=len(plan))
            run_all(lambda msg: prog.update(task, description=msg), lambda: prog.advance(task))
    else:
        def cb(msg):
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
        run_all(cb)

    meta["elapsed_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    heads = headline(rows)
    print_table(rows, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['device_slug']}-{meta['date']}" + ("-quick" if args.quick else "")
    payload = dict(meta=meta, rows=rows, headline=heads, skipped=skipped, notes=NOTES,
                   tolerances={k: dict(f=v[0], plan=v[1]) for k, v in TOLERANCES.items()})
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    write_markdown(out / f"{stem}.md", meta, rows, skipped, heads)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    if HAS_MPL and not args.no_plot:
        try:
            if plot(out / f"{stem}.png", rows):
                written.append(out / f"{stem}.png")
        except Exception as exc:
            print(f"plot failed: {exc}", file=sys.stderr)
    n_err = sum(r["status"] != "ok" for r in rows)
    n_bad = sum(r.get("agrees") is False for r in rows)
    print(f"\n{len(rows)} rows ({n_err} errors, {n_bad} outside tolerance) in {meta['elapsed_s']:.1f} s; "
          f"copy bandwidth {copy_gbps:.3g} GB/s")
    for h in heads:
        if h["ours"].endswith("torch") and h["scenario"] == "dense":
            print(f"  {h['scenario']} {h['size']} {h['dtype']}: {h['ours']} "
                  f"{h['ours_ms_per_iter']:.3g} ms/iter, "
                  f"{h['speedup']:.2f}x vs {h['other']} ({h['other_ms_per_iter']:.3g})")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
