"""Losses on degenerate input: a clear error naming the user's argument, or a finite loss, never NaN/inf."""
import math

import pytest
import torch
import torch.nn.functional as F

from ot_losses import L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, l2rm_loss, multi_sk_loss, swamp_loss

DEV = {"backend": "torch"}
BAD = [float("nan"), float("inf"), float("-inf")]


def _with(x, value, index=(1, 2)):
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["z_a", "z_b"])
def test_info_nce_non_finite_embeddings_name_the_argument(bad, which):
    z = {"z_a": torch.randn(4, 6), "z_b": torch.randn(4, 6)}
    z[which] = _with(z[which], bad)
    with pytest.raises(ValueError, match=rf"{which} must be finite; got"):
        info_nce_loss(z["z_a"], z["z_b"])


@pytest.mark.parametrize("which", ["z_a", "z_b", "prototypes", "queue_a", "queue_b"])
def test_swamp_nan_names_the_argument(which):
    args = {"z_a": torch.randn(4, 6), "z_b": torch.randn(4, 6), "prototypes": torch.randn(5, 6),
            "queue_a": torch.randn(3, 6), "queue_b": torch.randn(3, 6)}
    args[which] = _with(args[which], float("nan"))
    with pytest.raises(ValueError, match=rf"^{which} must be finite; got 1 NaN"):
        swamp_loss(args.pop("z_a"), args.pop("z_b"), args.pop("prototypes"), **args, **DEV)
    if which in ("z_a", "z_b"):
        with pytest.raises(ValueError, match=rf"^{which} must be finite"):
            SwAMPLoss(6, n_prototypes=5, **DEV)(*(_with(torch.randn(4, 6), float("nan")) if w == which
                                                  else torch.randn(4, 6) for w in ("z_a", "z_b")))


@pytest.mark.parametrize("which", ["pred", "target", "queue"])
def test_multi_sk_nan_names_the_argument(which):
    args = {"pred": torch.rand(5, 6), "target": torch.rand(5, 6), "queue": torch.rand(4, 6)}
    args[which] = _with(args[which], float("nan"))
    with pytest.raises(ValueError, match=rf"^{which} must be finite"):
        multi_sk_loss(args.pop("pred"), args.pop("target"), **args, **DEV)


def test_multi_sk_module_nan_names_the_feature():
    mod = MultiSKLoss((5, 7, 4), n_anchors=6, **DEV)
    feats = [torch.randn(8, 5), torch.randn(8, 7), torch.randn(8, 4), _with(torch.randn(8, 4), float("nan"))]
    with pytest.raises(ValueError, match=r"^z_b must be finite"):
        mod(*feats)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_l2rm_non_finite_sim_raises_naming_sim(bad):
    sim = _with(torch.rand(6, 6), bad)
    with pytest.raises(ValueError, match=r"^sim must be finite"):
        l2rm_loss(sim, **DEV)
    with pytest.raises(ValueError, match=r"^sim must be finite"):  # not the cost the module derives from it
        L2RMLoss(6, **DEV)(sim)


def test_l2rm_user_cost_nan_names_cost_and_inf_forbids():
    sim = torch.rand(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cost must not contain NaN"):
        l2rm_loss(sim, cost=_with(1 - sim, float("nan")), **DEV)
    loss, det = l2rm_loss(sim, cost=_with(1 - sim, math.inf, (0, 3)), return_details=True, **DEV)
    assert torch.isfinite(loss) and det.plan[0, 3] == 0


def test_l2rm_batch_too_small_for_forbid_diagonal():
    with pytest.raises(ValueError, match=r"sim of shape \(1, 1\) is too small for forbid_diagonal=True"):
        l2rm_loss(torch.rand(1, 1), **DEV)
    with pytest.raises(ValueError, match=r"sim of shape \(1, 3\) is too small.*leaves column 0"):
        l2rm_loss(torch.rand(1, 3), **DEV)
    with pytest.raises(ValueError, match=r"sim of shape \(4, 1\) is too small.*leaves row 0"):
        L2RMLoss(4, **DEV)(torch.rand(4, 1))
    assert torch.isfinite(l2rm_loss(torch.rand(1, 1), forbid_diagonal=False, **DEV))
    _, det = l2rm_loss(torch.rand(2, 3, dtype=torch.float64), mass=0.5, return_details=True, **DEV)
    assert det.plan[0, 0] == 0 and det.plan[1, 1] == 0 and abs(det.plan.sum().item() - 0.5) < 1e-6


def _peaked(n=6, k_anchors=5, high=0.95, low=0.5):
    """pred high exactly where the min-max target is 1 (the row's top assignment), low elsewhere."""
    g = torch.Generator().manual_seed(3)
    target = torch.rand(n, k_anchors, generator=g)
    _, det = multi_sk_loss(torch.zeros(n, k_anchors), target, return_details=True, **DEV)
    pred = torch.where(det.target == 1, torch.full_like(target, high), torch.full_like(target, low))
    return pred, target, det.target


def test_multi_sk_small_temperature_is_finite_where_the_loss_is():
    """T = 0.01: exp(0.95 / T) overflows fp32 but only where the target is 1 (loss ~0 there):
    the old ``(1 - t) z`` gave 0 * inf = NaN."""
    pred, target, t = _peaked()
    pred = pred.requires_grad_()
    loss = multi_sk_loss(pred, target, temperature=0.01, **DEV)
    assert torch.isfinite(loss)
    z = torch.exp(pred.detach().double() / 0.01)
    ref = ((1 - t.double()) * z + F.softplus(-z)).mean()       # fp64 holds exp(95)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_multi_sk_large_entry_with_representable_mean_is_finite():
    """One entry (1 - t) exp(u) beyond fp32 max whose mean over N K entries is still representable."""
    pred, target, t = _peaked(high=0.5, low=0.5)
    i = int((t[0] == 0).nonzero()[0])
    pred[0, i] = 0.895                                          # exp(89.5) > fp32 max; / 30 entries is not
    loss = multi_sk_loss(pred, target, temperature=0.01, **DEV)
    z = torch.exp(pred.double() / 0.01)
    ref = ((1 - t.double()) * z + F.softplus(-z)).mean()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_multi_sk_overflowing_loss_raises_naming_temperature():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(8, 6, generator=g), torch.rand(8, 6, generator=g)
    pred[:, :] = 0.99
    with pytest.raises(ValueError, match=r"overflows torch.float32.*temperature=0.01"):
        multi_sk_loss(pred, target, temperature=0.01, **DEV)
    assert torch.isfinite(multi_sk_loss(pred.double(), target.double(), temperature=0.01, **DEV))
    mod = MultiSKLoss(4, n_anchors=6, temperature=0.001, **DEV)
    x = torch.ones(8, 4)
    with pytest.raises(ValueError, match=r"temperature=0.001"):
        mod(x, x, x, x)
