"""Contenders: one setup function, ``make_contenders``, returns ``name -> Contender`` for a problem."""
import importlib

import torch

from .agreement import plan_from
from .core import BASELINE, OURS_PREFIX, Contender, Unavailable, potentials, raiser
from .env import HAS_POT, HAS_TRITON, has_module
from .external import pot_batched, pot_partial, pot_transposed, pot_unbalanced, samples_loss_contender
from .naive import multisk_layered, naive_multi, naive_partial, naive_sinkhorn, naive_step, swav_exp_loop
from .scenarios import Problem


def _ours():
    try:
        return importlib.import_module("ot_losses"), None
    except Exception as exc:  # the package may be mid-edit; report it in the rows
        return None, f"import ot_losses failed: {type(exc).__name__}: {exc}"


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
            out[name] = Contender(fn=raiser(msg), solution=lambda raw: {})

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
                return pot_batched(p, kind, nx_torch)
            if p.kind in ("balanced", "swav"):
                fn, sol = pot_transposed(p, nx_torch, "sinkhorn_log" if kind == "log" else "sinkhorn")
                if p.kind == "swav":
                    return Contender(fn=fn, solution=lambda raw: {"plan": plan_from(p, sol(raw))},
                                     note="on (C^T, b, a) so its update order is ours")
                return Contender(fn=fn, solution=sol, can_reduce=not nx_torch,
                                 note="on (C^T, b, a) so its update order is ours")
            if p.kind == "unbalanced":
                if kind == "log":
                    raise Unavailable("POT has no plain log-domain unbalanced Sinkhorn")
                return pot_unbalanced(p, nx_torch)
            if p.kind == "partial":
                return pot_partial(p, kind, nx_torch)
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
                if not has_module(module):
                    raise Unavailable(f"{module} not installed")
                if module == "flash_sinkhorn" and not cuda:
                    raise Unavailable("flash-sinkhorn needs CUDA")
                return samples_loss_contender(p, module)
            add(label, build)
        geom("geomloss", "GeomLoss SamplesLoss (points)")
        geom("flash_sinkhorn", "flash-sinkhorn SamplesLoss (points)")
    return out, skipped


def _ours_contender(lib, p, backend):
    eps = p.eps
    if p.kind in ("balanced", "unbalanced"):
        reach = p.reach

        def fn(n):
            return lib.sinkhorn(p.cost, p.a, p.b, eps=eps, n_iters=n, tol=None, reach=reach,
                                grad="none", backend=backend)
        return Contender(fn=fn, solution=lambda r: potentials(r.f.double(), r.g.double()))
    if p.kind == "swav":
        scores, batch = p.scores, p.scores.shape[0]

        def fn(n):
            # What a SwAV user runs: the library's SwAV targets, Q = B * sinkhorn(-S^T).plan^T.
            return lib.losses.swav_targets(scores, eps=eps, n_iters=n, backend=backend)[0]
        return Contender(fn=fn, solution=lambda q: {"plan": q.double().T / batch},
                         note="swav_targets: Q = B * plan^T, plan included")
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
                         solution=lambda fg: potentials(fg[0].double(), fg[1].double()),
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
                         note="two-layer log-domain iteration (docs/methods.md, multi-assignment)")
    raise Unavailable(p.kind)
