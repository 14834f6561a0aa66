"""Ergonomics of the loss modules and loss functions: partial batches, optimiser state, reductions,
queues, printing, constructor checks and scalar arguments."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ot_losses
from ot_losses import (InfoNCELoss, L2RMCost, L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, l2rm_loss,
                       multi_sk_loss, swamp_loss)

DEV = {"backend": "torch"}


# ----------------------------------------------------------------------------- L2RM: partial batches
def test_l2rm_cost_on_a_partial_batch_is_the_leading_block():
    torch.manual_seed(0)
    net = L2RMCost(8)
    with torch.no_grad():
        net.linear.weight.add_(0.1 * torch.randn(8, 8))
        net.linear.bias.add_(0.1 * torch.randn(8))
    sim = torch.rand(5, 6)
    padded = torch.cat([sim, torch.zeros(5, 2)], dim=1)  # the missing columns as similarity 0
    assert torch.allclose(net(sim), net(padded)[:, :6], atol=1e-6)
    assert torch.allclose(L2RMCost(8)(sim), torch.relu(1 - sim))
    with pytest.raises(ValueError, match=r"sim must have at most batch_size=8 columns"):
        net(torch.rand(5, 9))


def test_l2rm_module_last_partial_batch_and_cost_step():
    loss_fn = L2RMLoss(8, lr_cost=1e-2, **DEV).double()
    sim = torch.rand(5, 5, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(sim)
    assert torch.allclose(loss, l2rm_loss(sim, **DEV), atol=1e-10)  # initial cost = relu(1 - S)
    loss.backward()
    assert torch.isfinite(sim.grad).all()
    w0 = loss_fn.cost_net.linear.weight.detach().clone()
    v = loss_fn.cost_step(torch.rand(5, 5, dtype=torch.float64), torch.tensor([[0, 1], [2, 3]]))
    assert torch.isfinite(v)
    changed = (loss_fn.cost_net.linear.weight.detach() != w0)
    assert changed[:5, :5].any() and not changed[5:].any() and not changed[:, 5:].any()


# ----------------------------------------------------------------------------- L2RM: optimiser state
def _stepped(lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss_fn = L2RMLoss(6, lr_cost=lr, **DEV)
    for _ in range(3):
        loss_fn.cost_step(torch.rand(6, 6, generator=g), torch.tensor([[0, 1], [2, 2], [4, 5]]))
    return loss_fn


def test_l2rm_optimiser_state_round_trips_through_state_dict():
    trained = _stepped()
    sd = trained.state_dict()
    assert "_extra_state" in sd and sd["_extra_state"]["cost_optimizer"]["state"]
    restored = L2RMLoss(6, lr_cost=1e-2, **DEV)
    restored.load_state_dict(copy.deepcopy(sd))
    fresh = L2RMLoss(6, lr_cost=1e-2, **DEV)
    fresh.cost_net.load_state_dict(trained.cost_net.state_dict())  # same weights, no Adam moments
    keys, pairs = torch.rand(6, 6), torch.tensor([[1, 0], [3, 3]])
    for m in (trained, restored, fresh):
        m.cost_step(keys, pairs)
    w = trained.cost_net.linear.weight
    assert torch.equal(restored.cost_net.linear.weight, w)
    assert not torch.allclose(fresh.cost_net.linear.weight, w, atol=1e-6, rtol=0)  # the moments matter


def test_l2rm_optimiser_follows_double_and_to():
    loss_fn = _stepped()
    loss_fn.double()
    state = loss_fn._cost_optimizer.state
    assert all(s["exp_avg"].dtype == torch.float64 for s in state.values())
    assert all(p is q for p, q in zip(loss_fn._cost_optimizer.param_groups[0]["params"],
                                      loss_fn.cost_net.parameters()))
    w0 = loss_fn.cost_net.linear.weight.detach().clone()
    v = loss_fn.cost_step(torch.rand(6, 6, dtype=torch.float64), torch.tensor([[0, 0]]))
    assert v.dtype == torch.float64 and not torch.equal(loss_fn.cost_net.linear.weight, w0)
    loss_fn.to(torch.float32)
    assert all(s["exp_avg"].dtype == torch.float32 for s in loss_fn._cost_optimizer.state.values())
    loss_fn.cost_step(torch.rand(6, 6), torch.tensor([[0, 0]]))
    sim = torch.rand(6, 6, requires_grad=True)
    loss_fn(sim).backward()


# ----------------------------------------------------------------------------- reductions
def test_info_nce_reductions_and_module():
    z_a, z_b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    per = info_nce_loss(z_a, z_b, temperature=0.3, reduction="none")
    s = F.normalize(z_a, dim=1) @ F.normalize(z_b, dim=1).T / 0.3
    want = -0.5 * (torch.log_softmax(s, 1).diagonal() + torch.log_softmax(s, 0).diagonal())
    assert per.shape == (7,) and torch.allclose(per, want, atol=1e-12)
    assert torch.allclose(info_nce_loss(z_a, z_b, temperature=0.3), per.mean(), atol=1e-12)
    assert torch.allclose(info_nce_loss(z_a, z_b, temperature=0.3, reduction="sum"), per.sum(), atol=1e-12)
    mod = InfoNCELoss(temperature=0.3, reduction="none")
    assert torch.allclose(mod(z_a, z_b), per, atol=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        info_nce_loss(z_a, z_b, reduction="batchmean")


def test_l2rm_reductions():
    sim = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    mean, det = l2rm_loss(sim, return_details=True, **DEV)
    per = l2rm_loss(sim, reduction="none", **DEV)
    assert per.shape == (6,) and (per >= 0).all()
    assert torch.allclose(per.mean(), mean, atol=1e-12)
    assert torch.allclose(l2rm_loss(sim, reduction="sum", **DEV), per.sum(), atol=1e-12)
    # per pair i: 1/2 [KL + reverse KL] of image row i and of caption row i
    log_p_i2t, log_p_t2i = torch.log_softmax(sim / 0.05, 1), torch.log_softmax(sim.T / 0.05, 1)
    c = det.plan.clamp_min(1e-10)
    log_l_i2t, log_l_t2i = (c / c.sum(1, keepdim=True)).log(), (c.T / c.T.sum(1, keepdim=True)).log()

    def both(lt, lp):
        return (lt.exp() * (lt - lp) + lp.exp() * (lp - lt)).sum(1)
    want = 0.5 * (both(log_l_i2t, log_p_i2t) + both(log_l_t2i, log_p_t2i))
    assert torch.allclose(per, want, atol=1e-10)
    assert L2RMLoss(6, reduction="none", **DEV)(sim).shape == (6,)
    with pytest.raises(ValueError, match="reduction='none'.*square"):
        l2rm_loss(torch.rand(5, 6), reduction="none", **DEV)


# ----------------------------------------------------------------------------- Multi-SK queue
def test_multi_sk_default_has_no_queue_and_a_queue_fills_without_zero_losses():
    assert MultiSKLoss(4).queue_size == 0
    torch.manual_seed(0)
    mod = MultiSKLoss((5, 7, 4), n_anchors=6, queue_size=12, **DEV).double()
    batches = [[torch.randn(4, d, dtype=torch.float64) for d in (5, 7, 4, 4)] for _ in range(4)]
    seen = []
    for step, feats in enumerate(batches):
        z_a = feats[2].clone().requires_grad_()
        loss, det = mod(feats[0], feats[1], z_a, feats[3], return_details=True)
        assert loss.item() > 0 and det.queue_rows == min(4 * step, 12)
        loss.backward()
        assert z_a.grad.abs().sum() > 0
        seen.append(feats)
    # the queue rows join the OT problem: term "in_a<-joint_a[z_a]" with the last 12 past rows of z_a
    feats = [torch.randn(4, d, dtype=torch.float64) for d in (5, 7, 4, 4)]
    past = torch.cat([F.normalize(f[2], dim=1) for f in seen[1:]])
    anc_in, anc_joint = F.normalize(mod.anchors_in_a, dim=1), F.normalize(mod.anchors_joint_a, dim=1)
    _, det = mod(*feats, return_details=True)
    pred, target = F.normalize(feats[0], dim=1) @ anc_in.T, F.normalize(feats[2], dim=1) @ anc_joint.T
    _, ref = multi_sk_loss(pred, target, queue=past @ anc_joint.T, return_details=True, **DEV)
    assert det.queue_rows == 12
    assert torch.allclose(det.terms["in_a<-joint_a[z_a]"].target, ref.target, atol=1e-10)


# ----------------------------------------------------------------------------- printing, exports
def test_every_module_prints_its_settings():
    swamp = SwAMPLoss(4, n_prototypes=3, eps=0.03, temperature=0.2, n_iters=5)
    assert "dim=4, n_prototypes=3, queue_size=0, eps=0.03, temperature=0.2, n_iters=5" in repr(swamp)
    text = repr(L2RMLoss(6, mass=0.2, eps=0.01))
    assert "batch_size=6, mass=0.2, eps=0.01, tau=0.05" in text and "lr_cost=2e-06" in text
    msk = MultiSKLoss((5, 7, 4), n_anchors=6)
    assert "dims=(5, 7, 4), n_anchors=6, queue_size=0, k=3, eps=0.07" in repr(msk)
    assert repr(InfoNCELoss()) == "InfoNCELoss(temperature=0.07, normalize=True, reduction='mean')"


def test_info_nce_module_is_exported_sorted():
    assert "InfoNCELoss" in ot_losses.__all__ and ot_losses.InfoNCELoss is InfoNCELoss
    assert ot_losses.__all__ == sorted(ot_losses.__all__)
    assert all(hasattr(ot_losses, name) for name in ot_losses.__all__)


# ----------------------------------------------------------------------------- constructor checks
@pytest.mark.parametrize("build,arg", [
    (lambda: MultiSKLoss(4, eps=0), "eps"),
    (lambda: MultiSKLoss(4, n_anchors=16, k=20), "k"),
    (lambda: MultiSKLoss(4, n_anchors=16, k=16), "k"),
    (lambda: MultiSKLoss(4, n_anchors=16, k=2.5), "k"),
    (lambda: MultiSKLoss(4, n_iters=0), "n_iters"),
    (lambda: MultiSKLoss(4, temperature=-1.0), "temperature"),
    (lambda: MultiSKLoss(4, backend="cuda"), "backend"),
    (lambda: SwAMPLoss(4, n_iters=0), "n_iters"),
    (lambda: SwAMPLoss(4, eps=float("nan")), "eps"),
    (lambda: SwAMPLoss(4, info_nce_temperature=0.0), "info_nce_temperature"),
    (lambda: SwAMPLoss(4, freeze_prototypes_steps=-1), "freeze_prototypes_steps"),
    (lambda: L2RMLoss(4, mass=5), "mass"),
    (lambda: L2RMLoss(4, mass=0.0), "mass"),
    (lambda: L2RMLoss(4, tol=0.0), "tol"),
    (lambda: L2RMLoss(4, n_iters=0), "n_iters"),
    (lambda: L2RMLoss(4, reduction="avg"), "reduction"),
    (lambda: InfoNCELoss(temperature=0), "temperature"),
])
def test_bad_settings_fail_at_construction(build, arg):
    with pytest.raises(ValueError, match=rf"^{arg} "):
        build()


@pytest.mark.parametrize("build,arg", [
    (lambda: SwAMPLoss(4, eps="0.05"), "eps"),
    (lambda: SwAMPLoss(4, normalize=1), "normalize"),
    (lambda: L2RMLoss(4, forbid_diagonal=None), "forbid_diagonal"),
    (lambda: L2RMLoss(4, eps=torch.ones(2)), "eps"),
])
def test_bad_setting_types_fail_at_construction(build, arg):
    with pytest.raises(TypeError, match=rf"^{arg} "):
        build()


def test_k_must_be_an_int_for_the_losses_but_may_be_real_for_the_solver():
    pred, target = torch.rand(6, 5), torch.rand(6, 5)
    with pytest.raises(ValueError, match=r"^k must be an int"):
        multi_sk_loss(pred, target, k=2.5, **DEV)
    assert torch.isfinite(multi_sk_loss(pred, target, k=np.int64(2), **DEV))
    assert ot_losses.multi_assignment_sinkhorn(-target, 2.5, **DEV).assignment.sum(1).allclose(
        torch.full((6,), 2.5), atol=1e-2)


# ----------------------------------------------------------------------------- scalar arguments
SCALARS = [0.05, np.float32(0.05), np.float64(0.05), torch.tensor(0.05),
           torch.tensor(0.05, dtype=torch.float64)]


@pytest.mark.parametrize("eps", SCALARS, ids=["float", "np32", "np64", "t32", "t64"])
def test_eps_like_scalars_are_accepted_everywhere(eps):
    g = torch.Generator().manual_seed(0)
    z_a, z_b, c = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (6, 6, 3))
    sim, pred = torch.rand(6, 6, generator=g, dtype=torch.float64), torch.rand(6, 5, generator=g)
    ref = float(np.float32(0.05)) if isinstance(eps, np.float32) or (
        isinstance(eps, torch.Tensor) and eps.dtype == torch.float32) else 0.05
    cases = [
        (swamp_loss(z_a, z_b, c, eps=eps, temperature=eps, **DEV),
         swamp_loss(z_a, z_b, c, eps=ref, temperature=ref, **DEV)),
        (l2rm_loss(sim, eps=eps, mass=eps, tau=eps, **DEV),
         l2rm_loss(sim, eps=ref, mass=ref, tau=ref, **DEV)),
        (multi_sk_loss(pred, pred, eps=eps, temperature=eps * 2, **DEV),
         multi_sk_loss(pred, pred, eps=ref, temperature=ref * 2, **DEV)),
        (info_nce_loss(z_a, z_b, temperature=eps), info_nce_loss(z_a, z_b, temperature=ref)),
    ]
    for got, want in cases:
        assert torch.equal(got, want)
    for mod in (SwAMPLoss(4, eps=eps, temperature=eps), L2RMLoss(6, eps=eps, mass=eps, lr_cost=eps),
                MultiSKLoss(4, eps=eps, temperature=eps), InfoNCELoss(temperature=eps)):
        assert isinstance(mod.eps if hasattr(mod, "eps") else mod.temperature, float)


# ----------------------------------------------------------------------------- width errors
def test_wrong_embedding_width_names_the_embedding():
    mod = SwAMPLoss(16, n_prototypes=5)
    with pytest.raises(ValueError, match=r"^z_a must have shape \(N, D\) with D=16 like this module's dim; "
                                         r"got \(8, 7\)"):
        mod(torch.randn(8, 7), torch.randn(8, 7))
    with pytest.raises(ValueError, match=r"^z_b must have shape"):
        mod(torch.randn(8, 16), torch.randn(8, 7))
    with pytest.raises(ValueError, match=r"^x_b must have shape \(N, D\) with D=7 like this module's dim_b"):
        MultiSKLoss((5, 7, 4), n_anchors=6)(torch.randn(8, 5), torch.randn(8, 6), torch.randn(8, 4),
                                            torch.randn(8, 4))
