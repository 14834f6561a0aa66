"""The float64 reference of a problem and the agreement of a contender's answer with it."""
import torch

from .naive import naive_multi, naive_partial, naive_sinkhorn
from .scenarios import Problem

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


def plan_from(p, sol):
    """Plan ``a b exp((f + g - C)/eps)`` in float64 from potentials in our convention."""
    c = p.cost64
    la, lb = p.a.double().log(), p.b.double().log()
    f, g = sol["f"], sol["g"]
    return torch.exp(la.unsqueeze(-1) + lb.unsqueeze(-2) + (f.unsqueeze(-1) + g.unsqueeze(-2) - c) / p.eps)


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
    return plan_from(p, sol)


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
