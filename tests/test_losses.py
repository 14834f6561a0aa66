"""Tests of the losses (docs/methods.md sections 1-5) against transcriptions of the papers' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

import ot_losses.losses.l2rm as l2rm_mod
import ot_losses.losses.multi_sk as multi_sk_mod
import ot_losses.losses.swamp as swamp_mod
from ot_losses.losses import (L2RMCost, L2RMDetails, L2RMLoss, MultiSKDetails, MultiSKLoss, SwAMPDetails,
                              SwAMPLoss, info_nce_loss, l2rm_loss, multi_sk_loss, split_clean_noisy,
                              swamp_loss, swav_targets)
from ot_losses.solvers.multi_assignment import multi_assignment_sinkhorn
from ot_losses.solvers.partial import partial_ot
from ot_losses.solvers.sinkhorn import sinkhorn

from conftest import requires_cuda

DEV = {"backend": "torch"}


# ----------------------------------------------------------------------------- transcriptions
def swav_sinkhorn_ref(out, eps, n_iters):
    """SwAV's ``distributed_sinkhorn`` (world size 1), exp domain, as in main_swav.py (docs/methods.md 1)."""
    q = torch.exp(out / eps).T  # (K, B)
    q = q / q.sum()
    n_protos, batch = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / n_protos
        q = q / q.sum(dim=0, keepdim=True)
        q = q / batch
    return (q * batch).T


def swamp_ref(z_a, z_b, c, q_a, q_b, temperature):
    """docs/methods.md section 2: 1/2 [ -1/N sum Q_b log p_a - 1/N sum Q_a log p_b ] (normalised inputs)."""
    z_a, z_b, c = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1), F.normalize(c, dim=1)
    p_a = torch.softmax(z_a @ c.T / temperature, dim=1)
    p_b = torch.softmax(z_b @ c.T / temperature, dim=1)
    n = z_a.shape[0]
    return 0.5 * (-(q_b * p_a.log()).sum() / n - (q_a * p_b.log()).sum() / n)


def sym_kl_ref(sim, plan, tau):
    """docs/methods.md 3.4 as in the official code: exp/(sum + 1e-10), clip 1e-10, KLDivLoss(batchmean)."""
    def softmax_raw(x):
        e = torch.exp(x / tau)
        return e / (e.sum(dim=1, keepdim=True) + 1e-10)

    def rownorm(x):
        return x / x.sum(dim=1, keepdim=True)

    def kl_bm(t, p):  # KLDivLoss(batchmean)(log p, t)
        return (t * (t.log() - p.log())).sum() / t.shape[0]

    p_i2t, p_t2i = softmax_raw(sim), softmax_raw(sim.T)
    l_i2t, l_t2i = rownorm(plan.clamp_min(1e-10)), rownorm(plan.clamp_min(1e-10).T)
    return 0.5 * (kl_bm(l_i2t, p_i2t) + kl_bm(l_t2i, p_t2i) + kl_bm(p_i2t, l_i2t) + kl_bm(p_t2i, l_t2i))


def double_centred(x):
    return x - x.mean(dim=1, keepdim=True) - x.mean(dim=0, keepdim=True) + x.mean()


def cosines(n, k, d=16, dtype=torch.float64, gen=None):
    a = F.normalize(torch.randn(n, d, dtype=dtype, generator=gen), dim=1)
    b = F.normalize(torch.randn(k, d, dtype=dtype, generator=gen), dim=1)
    return a @ b.T


# ----------------------------------------------------------------------------- SwAV / SwAMP
@pytest.mark.parametrize("n,k", [(64, 30), (7, 17), (1, 5), (33, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_swav_targets_match_exp_domain_loop(n, k, n_iters):
    scores = cosines(n, k)
    q, _ = swav_targets(scores, eps=0.05, n_iters=n_iters, **DEV)
    ref = swav_sinkhorn_ref(scores, 0.05, n_iters)
    assert q.dtype == torch.float64
    assert torch.allclose(q, ref, atol=1e-6, rtol=0), (q - ref).abs().max()
    assert torch.allclose(q.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert (q >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swav_targets_leave_the_result_plan_intact(backend):
    """Q is scaled as the plan is formed (in the solver's kernel buffer): the result's plan stays the
    plan, Q shares no memory with it, and forming the plan first gives the same Q."""
    scores = cosines(48, 20)
    q, res = swav_targets(scores, eps=0.05, n_iters=3, backend=backend)
    plan = res.plan
    assert plan.data_ptr() != q.data_ptr()
    assert torch.allclose(plan.sum(), torch.ones((), dtype=plan.dtype), atol=1e-12)
    assert torch.allclose(q, 48 * plan.T, atol=1e-12, rtol=1e-12), (q - 48 * plan.T).abs().max()
    # with the plan already formed, the scaled copy comes from it and does not alias it
    again = res._plan_times(torch.full((1,), 48.0, dtype=plan.dtype))
    assert again.data_ptr() != plan.data_ptr() and torch.equal(again, 48 * plan)
    assert torch.allclose(q, swav_sinkhorn_ref(scores, 0.05, 3), atol=1e-6, rtol=0)


def test_swav_targets_order_matters():
    """Running the sample side first gives another matrix at 3 iterations (docs/methods.md section 1)."""
    scores = cosines(64, 30)
    q, _ = swav_targets(scores, eps=0.05, n_iters=3, **DEV)
    wrong = 64 * sinkhorn(-scores, eps=0.05, n_iters=3, grad="none", **DEV).plan
    assert (q - wrong).abs().max() > 1e-2


def test_swav_targets_fp32_close_to_fp64():
    scores = cosines(64, 30)
    q64, _ = swav_targets(scores, **DEV)
    q32, _ = swav_targets(scores.float(), **DEV)
    assert q32.dtype == torch.float32
    assert (q32.double() - q64).abs().max() < 3e-6


def test_swamp_loss_matches_transcription_and_detail_targets():
    z_a, z_b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    c = torch.randn(5, 8, dtype=torch.float64)
    loss, det = swamp_loss(z_a, z_b, c, return_details=True, **DEV)
    assert isinstance(det, SwAMPDetails)
    s_a = F.normalize(z_a, dim=1) @ F.normalize(c, dim=1).T
    s_b = F.normalize(z_b, dim=1) @ F.normalize(c, dim=1).T
    q_a, q_b = swav_sinkhorn_ref(s_a, 0.05, 3), swav_sinkhorn_ref(s_b, 0.05, 3)
    assert torch.allclose(det.q_a, q_a, atol=1e-6) and torch.allclose(det.q_b, q_b, atol=1e-6)
    ref = swamp_ref(z_a, z_b, c, q_a, q_b, 0.1)
    assert torch.allclose(loss, ref, atol=1e-10, rtol=1e-10)
    assert loss.item() >= 0


def test_swamp_equal_scores_gives_log_k():
    z_a, z_b = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    c = torch.ones(7, 4, dtype=torch.float64)
    loss, det = swamp_loss(z_a, z_b, c, return_details=True, **DEV)
    assert torch.allclose(det.q_a, torch.full((9, 7), 1 / 7, dtype=torch.float64), atol=1e-12)
    assert abs(loss.item() - math.log(7)) < 1e-12


def test_swamp_queue_joins_the_problem():
    z_a, z_b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    c, qa, qb = (torch.randn(n, 8, dtype=torch.float64) for n in (5, 10, 10))
    _, det = swamp_loss(z_a, z_b, c, queue_a=qa, queue_b=qb, return_details=True, **DEV)
    cn = F.normalize(c, dim=1)
    s_a = torch.cat([F.normalize(qa, dim=1), F.normalize(z_a, dim=1)]) @ cn.T
    ref = swav_sinkhorn_ref(s_a, 0.05, 3)[-6:]
    assert det.q_a.shape == (6, 5)
    assert torch.allclose(det.q_a, ref, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_swamp_large_queue_streams_from_features(monkeypatch, normalize):
    """A queue whose scores would exceed STREAM_QUEUE_BYTES is solved on a FeatureCost: same loss, targets."""
    torch.manual_seed(3)
    z_a, z_b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    c, qa, qb = (torch.randn(n, 8, dtype=torch.float64) for n in (5, 30, 20))
    kw = dict(queue_a=qa, queue_b=qb, normalize=normalize, return_details=True, eps=0.1, **DEV)
    dense_loss, dense = swamp_loss(z_a, z_b, c, **kw)
    kinds = []
    real = swamp_mod.sinkhorn

    def spy(cost, *args, **kwargs):
        kinds.append(type(cost).__name__)
        return real(cost, *args, **kwargs)
    monkeypatch.setattr(swamp_mod, "sinkhorn", spy)
    monkeypatch.setattr(swamp_mod, "STREAM_QUEUE_BYTES", 0)
    loss, det = swamp_loss(z_a, z_b, c, **kw)
    assert kinds == ["FeatureCost", "FeatureCost"]
    assert abs(float(loss - dense_loss)) <= 1e-12 * abs(float(dense_loss))
    for got, want in ((det.q_a, dense.q_a), (det.q_b, dense.q_b)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
        assert torch.allclose(got.sum(1), torch.ones(6, dtype=torch.float64))
    assert abs(det.marginal_error_a - dense.marginal_error_a) <= 1e-12


def test_swamp_gradients_reach_embeddings_and_prototypes_not_targets():
    z_a = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss, det = swamp_loss(z_a, z_b, c, return_details=True, **DEV)
    assert not det.q_a.requires_grad and not det.q_b.requires_grad
    g = torch.autograd.grad(loss, (z_a, z_b, c))
    ref = torch.autograd.grad(swamp_ref(z_a, z_b, c, det.q_a, det.q_b, 0.1), (z_a, z_b, c))
    for got, want in zip(g, ref):
        assert got.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-10)


def _frozen(monkeypatch, module, attr):
    """Patch a loss module's solver so that it always solves the first problem it saw.

    Freezing the OT input makes the targets constants, so ``gradcheck``'s finite
    differences see exactly the stop-gradient loss whose gradient we implement.
    """
    real = getattr(module, attr)
    seen = []
    state = {"i": 0, "first_pass_calls": None}

    def solver(cost, *args, **kwargs):
        if state["first_pass_calls"] is None:
            seen.append(cost.clone())
            return real(cost, *args, **kwargs)
        i = state["i"] % len(seen)
        state["i"] += 1
        return real(seen[i], *args, **kwargs)

    monkeypatch.setattr(module, attr, solver)
    return state


def test_swamp_gradcheck(monkeypatch):
    z_a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    state = _frozen(monkeypatch, swamp_mod, "sinkhorn")
    swamp_loss(z_a, z_b, c, **DEV)
    state["first_pass_calls"] = 2
    assert torch.autograd.gradcheck(lambda a, b, p: swamp_loss(a, b, p, **DEV), (z_a, z_b, c))


def test_swamp_module_freeze_queue_and_info_nce():
    torch.manual_seed(0)
    mod = SwAMPLoss(6, n_prototypes=4, queue_size=8, freeze_prototypes_steps=1, info_nce_weight=0.5, **DEV)
    za, zb = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    mod(za, zb).backward()
    assert mod.prototypes.grad is None  # frozen for the first step
    for _ in range(2):
        mod(torch.randn(4, 6), torch.randn(4, 6)).backward()
    assert mod.prototypes.grad is not None and mod.prototypes.grad.abs().sum() > 0
    assert int(mod.queue_count) == 12
    # queue is full now: the targets come from the (8 + 4)-row problem
    za, zb = torch.randn(4, 6), torch.randn(4, 6)
    qa, qb = mod.queue_a.clone(), mod.queue_b.clone()
    loss, det = mod(za, zb, return_details=True)
    protos = F.normalize(mod.prototypes.detach(), dim=1)
    s = torch.cat([qa, F.normalize(za, dim=1)]) @ protos.T
    assert torch.allclose(det.q_a, swav_sinkhorn_ref(s.double(), 0.05, 3)[-4:].float(), atol=1e-5)
    swamp_only = swamp_loss(za, zb, mod.prototypes, queue_a=qa, queue_b=qb, **DEV)
    nce = info_nce_loss(za, zb)
    assert torch.isfinite(loss)
    assert abs(loss.item() - (swamp_only.item() + 0.5 * nce.item())) < 1e-4


# ----------------------------------------------------------------------------- L2RM
def test_l2rm_plan_zero_diagonal_and_mass():
    sim = torch.rand(32, 32, dtype=torch.float64)
    loss, det = l2rm_loss(sim, mass=0.1, eps=0.07, return_details=True, **DEV)
    assert isinstance(det, L2RMDetails)
    assert (det.plan.diagonal() == 0).all()
    assert abs(det.plan.sum().item() - 0.1) < 1e-6
    assert (det.plan.sum(1) <= 1 / 32 + 1e-9).all() and (det.plan.sum(0) <= 1 / 32 + 1e-9).all()
    assert det.converged
    assert torch.isinf(det.cost.diagonal()).all()
    # the loss is the formula of docs/methods.md 3.4 on that plan
    assert torch.allclose(loss, sym_kl_ref(sim, det.plan, 0.05), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,m", [(7, 12), (12, 7)])
def test_l2rm_rectangular_and_plan_matches_solver(n, m):
    sim = torch.rand(n, m, dtype=torch.float64)
    _, det = l2rm_loss(sim, mass=0.2, eps=0.05, return_details=True, **DEV)
    cost = (1 - sim).clamp_min(1e-10)
    d = min(n, m)
    cost[torch.arange(d), torch.arange(d)] = math.inf
    ref = partial_ot(cost, mass=0.2, eps=0.05, method="dummy", n_iters=1000, tol=1e-6, grad="none",
                     **DEV).plan
    assert torch.allclose(det.plan, ref, atol=1e-12)
    assert (det.plan[torch.arange(d), torch.arange(d)] == 0).all()
    assert abs(det.plan.sum().item() - 0.2) < 1e-6


def test_l2rm_no_overflow_and_no_forbid():
    sim = torch.rand(8, 8)
    loss = l2rm_loss(sim, tau=1e-3, **DEV)  # exp(S / tau) would overflow fp32
    assert torch.isfinite(loss)
    _, det = l2rm_loss(sim.double(), forbid_diagonal=False, return_details=True, **DEV)
    assert (det.plan.diagonal() > 0).all()


def test_l2rm_gradients_and_gradcheck(monkeypatch):
    sim = torch.rand(5, 6, dtype=torch.float64, requires_grad=True)
    loss, det = l2rm_loss(sim, return_details=True, **DEV)
    assert not det.plan.requires_grad
    (g,) = torch.autograd.grad(loss, sim)
    (g_ref,) = torch.autograd.grad(sym_kl_ref(sim, det.plan, 0.05), sim)
    assert torch.allclose(g, g_ref, atol=1e-8)
    state = _frozen(monkeypatch, l2rm_mod, "partial_ot")
    l2rm_loss(sim, **DEV)
    state["first_pass_calls"] = 1
    assert torch.autograd.gradcheck(lambda s: l2rm_loss(s, tau=0.5, **DEV), (sim,))


def test_l2rm_cost_net_init_and_step():
    net = L2RMCost(6)
    s = torch.rand(4, 6)
    assert torch.allclose(net(s), torch.relu(1 - s))
    loss_fn = L2RMLoss(6, lr_cost=1e-2, **DEV)
    keys = torch.rand(6, 6)
    pairs = torch.tensor([[0, 2], [3, 1], [5, 5]])
    y = torch.zeros(6, 6)
    y[pairs[:, 0], pairs[:, 1]] = 1
    before = (y * loss_fn.cost_net(keys)).sum().item()
    v0 = loss_fn.cost_step(keys, pairs)
    assert abs(v0.item() - before) < 1e-6
    v1 = loss_fn.cost_step(keys, y)
    assert v1.item() < v0.item()
    assert all(p.grad is None for p in loss_fn.cost_net.parameters())
    # the forward uses the learned cost, detached
    sim = torch.rand(6, 6, requires_grad=True)
    loss, det = loss_fn(sim, return_details=True)
    c = loss_fn.cost_net(sim.detach()).clamp_min(1e-10)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(det.cost[off], c.detach()[off])
    loss.backward()
    assert sim.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.cost_net.parameters())


def test_l2rm_module_initial_cost_equals_default():
    sim = torch.rand(8, 8, dtype=torch.float64)
    loss_fn = L2RMLoss(8, **DEV).double()
    assert torch.allclose(loss_fn(sim), l2rm_loss(sim, **DEV), atol=1e-10)


@pytest.mark.parametrize("method", ["beta", "gmm"])
def test_split_clean_noisy(method):
    g = torch.Generator().manual_seed(0)
    clean = 0.2 + 0.1 * torch.rand(150, generator=g)
    noisy = 1.5 + 0.3 * torch.rand(50, generator=g)
    loss = torch.cat([clean, noisy])[torch.randperm(200, generator=g)]
    p, is_clean = split_clean_noisy(loss, method=method)
    truth = loss < 1.0
    assert (is_clean == truth).float().mean() > 0.97
    assert ((p >= 0) & (p <= 1)).all()
    p_const, c_const = split_clean_noisy(torch.ones(10), method=method)
    assert c_const.all()
    with pytest.raises(ValueError, match="per_pair_loss"):
        split_clean_noisy(torch.ones(3, 3))
    with pytest.raises(ValueError, match="method"):
        split_clean_noisy(loss, method="kmeans")


# ----------------------------------------------------------------------------- Multi-SK
def test_multi_sk_targets_properties():
    target = cosines(40, 8)
    eps, k = 0.07, 4
    loss, det = multi_sk_loss(torch.zeros(40, 8, dtype=torch.float64), target, eps=eps, n_iters=2000,
                              return_details=True, **DEV)
    assert isinstance(det, MultiSKDetails)
    x = det.assignment
    assert torch.allclose(x.sum(1), torch.full((40,), float(k), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(x.sum(0), torch.full((8,), k * 40 / 8, dtype=torch.float64), atol=1e-6)
    assert ((x >= 0) & (x <= 1)).all()
    # logit(X) + C / eps is additive (f_i + g_j), C = -0.75 * target
    resid = double_centred(torch.logit(x) - 0.75 * target / eps)
    assert resid.abs().max() < 1e-6
    # min-max normalised rows
    assert torch.allclose(det.target.min(1).values, torch.zeros(40, dtype=torch.float64))
    assert torch.allclose(det.target.max(1).values, torch.ones(40, dtype=torch.float64))
    assert not det.target.requires_grad


def test_multi_sk_targets_equal_solver_and_queue():
    target, queue = torch.rand(6, 8, dtype=torch.float64), torch.rand(10, 8, dtype=torch.float64)
    _, det = multi_sk_loss(torch.zeros(6, 8, dtype=torch.float64), target, queue=queue, k=3,
                           return_details=True, **DEV)
    cost = -0.75 * torch.cat([queue, target])
    x = multi_assignment_sinkhorn(cost, 3, eps=0.07, n_iters=20, **DEV).assignment
    assert torch.allclose(det.assignment, x[-6:], atol=1e-12)
    lo, hi = x[-6:].min(1, keepdim=True).values, x[-6:].max(1, keepdim=True).values
    assert torch.allclose(det.target, (x[-6:] - lo) / (hi - lo), atol=1e-12)


def test_multi_sk_constant_row_no_nan():
    target = torch.rand(5, 6)
    target[2] = 0.3
    pred = torch.rand(5, 6)
    loss, det = multi_sk_loss(pred, target, n_iters=5, return_details=True, **DEV)
    assert torch.isfinite(det.target).all() and torch.isfinite(loss)


def test_multi_sk_bce_identity():
    pred = torch.rand(7, 6, dtype=torch.float64) * 2 - 1
    loss, det = multi_sk_loss(pred, torch.rand(7, 6, dtype=torch.float64), return_details=True, **DEV)
    t = det.target
    z = torch.exp(pred / 0.1)
    assert torch.allclose(loss, (F.softplus(z) - t * z).mean(), rtol=1e-12)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(z, t), rtol=1e-12)
    # large (unnormalised) scores: z = exp(80) ~ 5.5e34 is still fp32 and the loss stays finite
    big, t = torch.full((3, 4), 8.0), torch.rand(3, 4)
    out, det = multi_sk_loss(big, t, temperature=0.1, return_details=True, **DEV)
    assert torch.isfinite(out)
    assert torch.allclose(out, ((1 - det.target) * math.exp(80.0)).mean(), rtol=1e-5)


def test_multi_sk_gradcheck(monkeypatch):
    pred = (torch.rand(5, 4, dtype=torch.float64) - 0.5).requires_grad_()
    target = torch.rand(5, 4, dtype=torch.float64)
    state = _frozen(monkeypatch, multi_sk_mod, "multi_assignment_sinkhorn")
    multi_sk_loss(pred, target, **DEV)
    state["first_pass_calls"] = 1
    assert torch.autograd.gradcheck(lambda p, t: multi_sk_loss(p, t, temperature=0.5, **DEV),
                                    (pred, target.clone().requires_grad_()))


def test_multi_sk_module_gradients_and_queue():
    torch.manual_seed(0)
    mod = MultiSKLoss((5, 7, 4), n_anchors=6, queue_size=16, **DEV)
    feats = [torch.randn(8, 5), torch.randn(8, 7), torch.randn(8, 4, requires_grad=True),
             torch.randn(8, 4, requires_grad=True)]
    loss, det = mod(*feats, return_details=True)
    assert loss.item() > 0 and det.queue_rows == 0  # the batch alone while the queue is empty
    loss.backward()
    mod(*[torch.randn(8, d) for d in (5, 7, 4, 4)])
    assert int(mod.queue_count) == 16
    loss, det = mod(*feats, return_details=True)
    assert det.queue_rows == 16 and len(det.terms) == 8 and loss.item() > 0
    loss.backward()
    assert feats[2].grad.abs().sum() > 0 and feats[3].grad.abs().sum() > 0
    for p in (mod.anchors_in_a, mod.anchors_in_b, mod.anchors_joint_a, mod.anchors_joint_b):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for d in det.terms.values():
        assert not d.target.requires_grad


def test_multi_sk_module_equals_sum_of_pure_terms():
    """The module's batched solve gives the same loss as one multi_sk_loss call per term."""
    torch.manual_seed(0)
    mod = MultiSKLoss((5, 7, 4), n_anchors=6, queue_size=0, **DEV).double()
    x_a, x_b, z_a, z_b = (torch.randn(8, d, dtype=torch.float64) for d in (5, 7, 4, 4))
    n = {"x_a": F.normalize(x_a, dim=1), "x_b": F.normalize(x_b, dim=1),
         "z_a": F.normalize(z_a, dim=1), "z_b": F.normalize(z_b, dim=1)}
    anc = {"in_a": mod.anchors_in_a, "in_b": mod.anchors_in_b, "joint_a": mod.anchors_joint_a,
           "joint_b": mod.anchors_joint_b}
    anc = {key: F.normalize(v, dim=1) for key, v in anc.items()}
    terms = []
    for m in "ab":
        for j in "ab":
            terms.append((f"x_{m}", f"in_{m}", f"z_{j}", f"joint_{m}"))   # input space <- joint space
            terms.append((f"z_{m}", f"joint_{j}", f"x_{j}", f"in_{j}"))   # joint space <- input space
    want = sum(multi_sk_loss(n[pf] @ anc[pa].T, n[tf] @ anc[ta].T, **DEV) for pf, pa, tf, ta in terms) / 8
    assert torch.allclose(mod(x_a, x_b, z_a, z_b), want, atol=1e-10)


# ----------------------------------------------------------------------------- InfoNCE
def test_info_nce_matches_formula_and_gradcheck():
    z_a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss, det = info_nce_loss(z_a, z_b, temperature=0.5, return_details=True)
    s = F.normalize(z_a, dim=1) @ F.normalize(z_b, dim=1).T / 0.5
    ref = 0.5 * (-(torch.log_softmax(s, 1).diagonal().mean()) - torch.log_softmax(s, 0).diagonal().mean())
    assert torch.allclose(loss, ref, atol=1e-12)
    assert 0 <= det.accuracy_ab <= 1
    assert torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b, temperature=0.5), (z_a, z_b))


# ----------------------------------------------------------------------------- shared contract
def _all_losses(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(8, 6, dtype=dtype, generator=g), torch.randn(8, 6, dtype=dtype, generator=g)
    c = torch.randn(5, 6, dtype=dtype, generator=g)
    sim = torch.rand(8, 8, dtype=dtype, generator=g)
    pred, target = torch.rand(8, 6, dtype=dtype, generator=g), torch.rand(8, 6, dtype=dtype, generator=g)
    return {
        "info_nce": (lambda a, b: info_nce_loss(a, b), (z_a, z_b)),
        "swamp": (lambda a, b, p: swamp_loss(a, b, p, **DEV), (z_a, z_b, c)),
        "l2rm": (lambda s: l2rm_loss(s, **DEV), (sim,)),
        "multi_sk": (lambda p, t: multi_sk_loss(p, t, **DEV), (pred, target)),
    }


@pytest.mark.parametrize("name", ["info_nce", "swamp", "l2rm", "multi_sk"])
def test_inputs_unchanged(name):
    fn, args = _all_losses()[name]
    args = [a.clone().requires_grad_() for a in args]
    before = [a.detach().clone() for a in args]
    fn(*args).backward()
    for a, b in zip(args, before):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("name", ["info_nce", "swamp", "l2rm", "multi_sk"])
def test_autocast_bf16_runs_in_fp32(name):
    fn, args = _all_losses()[name]
    ref = fn(*args)
    lin = torch.nn.Linear(args[0].shape[1], args[0].shape[1], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(args[0].shape[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fn(lin(args[0]), *args[1:])  # a bf16 activation under autocast
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - ref.item()) < 0.05 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("name", ["swamp", "l2rm", "multi_sk"])
def test_backend_is_passed_to_solver(name, monkeypatch):
    module, attr = {"swamp": (swamp_mod, "sinkhorn"), "l2rm": (l2rm_mod, "partial_ot"),
                    "multi_sk": (multi_sk_mod, "multi_assignment_sinkhorn")}[name]
    real, seen = getattr(module, attr), []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, spy)
    fn, args = _all_losses()[name]
    fn(*args)
    assert seen and all(b == "torch" for b in seen)


def test_toy_optimisation_reduces_each_loss():
    torch.manual_seed(0)
    cases = {
        "info_nce": lambda p: info_nce_loss(p["a"], p["b"]),
        "swamp": lambda p: swamp_loss(p["a"], p["b"], p["c"], **DEV),
        "l2rm": lambda p: l2rm_loss(F.normalize(p["a"], dim=1) @ F.normalize(p["b"], dim=1).T, **DEV),
        "multi_sk": lambda p: multi_sk_loss(F.normalize(p["a"], dim=1) @ F.normalize(p["c"], dim=1).T,
                                            F.normalize(p["b"], dim=1) @ F.normalize(p["c"], dim=1).T,
                                            k=2, **DEV),
    }
    for name, fn in cases.items():
        params = {"a": torch.randn(16, 8, requires_grad=True), "b": torch.randn(16, 8, requires_grad=True),
                  "c": torch.randn(5, 8, requires_grad=True)}
        opt = torch.optim.Adam(params.values(), lr=0.05)
        first = fn(params).item()
        for _ in range(30):
            opt.zero_grad()
            loss = fn(params)
            loss.backward()
            opt.step()
        assert fn(params).item() < first, name


def test_errors_name_the_argument():
    z, c = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"z_a and z_b .*got z_a \(4, 6\) and z_b \(3, 6\)"):
        swamp_loss(z, torch.randn(3, 6), c)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(K, D\) with D=6 like z_a and z_b; "
                                         r"got \(5, 7\)"):
        swamp_loss(z, z, torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"queue_a .*D=6 like z_a; got \(3, 5\)"):
        swamp_loss(z, z, c, queue_a=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"z_a must have shape \(N, D\); got \(4,\)"):
        swamp_loss(torch.randn(4), z, c)
    with pytest.raises(TypeError, match="z_b must be a floating tensor"):
        info_nce_loss(z, torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match=r"z_a and z_b"):
        info_nce_loss(z, torch.randn(5, 6))
    with pytest.raises(ValueError, match="eps"):
        swamp_loss(z, z, c, eps=-1.0)
    with pytest.raises(ValueError, match=r"sim must have shape \(N, m\); got \(4, 3, 2\)"):
        l2rm_loss(torch.rand(4, 3, 2))
    with pytest.raises(ValueError, match=r"cost must have the shape of sim \(4, 4\); got \(4, 5\)"):
        l2rm_loss(torch.rand(4, 4), cost=torch.rand(4, 5))
    with pytest.raises(ValueError, match="mass"):
        l2rm_loss(torch.rand(4, 4), mass=2.0, **DEV)
    with pytest.raises(ValueError, match=r"pred and target .*got pred \(4, 6\) and target \(4, 5\)"):
        multi_sk_loss(torch.rand(4, 6), torch.rand(4, 5))
    with pytest.raises(ValueError, match=r"queue .*K=6 like pred; got \(3, 5\)"):
        multi_sk_loss(torch.rand(4, 6), torch.rand(4, 6), queue=torch.rand(3, 5))
    with pytest.raises(ValueError, match="k"):
        multi_sk_loss(torch.rand(4, 6), torch.rand(4, 6), k=6, **DEV)
    with pytest.raises(ValueError, match="backend"):
        swamp_loss(z, z, c, backend="cuda")
    with pytest.raises(ValueError, match=r"sim must have at most batch_size=6 columns"):
        L2RMLoss(6)(torch.rand(6, 7))
    with pytest.raises(ValueError, match=r"z_b must have N=4 rows"):
        MultiSKLoss(6, n_anchors=4, queue_size=0)(z, z, z, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"matches must have the shape of sim_keys"):
        L2RMLoss(6).cost_step(torch.rand(6, 6), torch.rand(3))


# ----------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("name", ["info_nce", "swamp", "l2rm", "multi_sk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_cpu(name, dtype):
    fn, args = _all_losses()[name]
    ref = fn(*args)
    cuda_args = [a.cuda() for a in args]
    with torch.autocast("cuda", dtype=dtype):
        out = fn(*cuda_args)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 0.05 * max(1.0, abs(ref.item()))
    out32 = fn(*cuda_args)
    assert abs(out32.item() - ref.item()) < 1e-3 * max(1.0, abs(ref.item()))
