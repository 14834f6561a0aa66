"""Contenders from other libraries: POT (numpy and torch backends), GeomLoss, flash-sinkhorn."""
import importlib
import math
import warnings

import torch

from .core import Contender, Unavailable, potentials


def pot_transposed(p, nx_torch, method):
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
        return potentials(p.eps * (log_v - p.a.double().log()), p.eps * (log_u - p.b.double().log()))
    return fn, solution


def pot_batched(p, kind, nx_torch):
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
        return potentials(p.eps * (v - la), p.eps * (u - lb))
    return Contender(fn=fn, solution=solution, can_reduce=True,
                     note="Python loop over the B problems, on (C^T, b, a)")


def pot_unbalanced(p, nx_torch):
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
        return potentials(p.eps * lu, p.eps * lv)
    return Contender(fn=fn, solution=solution, can_reduce=not nx_torch,
                     note="sinkhorn_unbalanced(method='sinkhorn', reg_type='kl'), exp domain")


def pot_partial(p, kind, nx_torch):
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


def samples_loss_contender(p, module):
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
        return potentials(f.reshape(-1).double(), g.reshape(-1).double())
    return Contender(fn=fn, solution=solution, inputs="points", same_iterates=False,
                     note="input is points (cost 0.5|x-y|^2 built inside), eps-scaling schedule "
                          "(scaling=0.5), own iteration count: compare its time per call, not per iteration")
