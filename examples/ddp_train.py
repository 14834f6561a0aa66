"""Data-parallel training with an OT loss: DistributedDataParallel + ``process_group``.

Two small encoders map paired views of synthetic data (e.g. image / text
features) to a joint space and are trained with SwAMP (SwAV pseudo-labels
of the *global* batch), Multi-SK or InfoNCE (negatives from the global
batch). Each rank sees its own slice of every global batch; the loss module
lives inside the DDP wrapper with the encoders, so its prototypes/anchors
are averaged like any other parameter, and the result equals one process
training on the whole batch.

Run on CPU (gloo) or GPUs (NCCL, one per process), unchanged:

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --loss multi_sk --steps 200

Without torchrun it runs as one process (no group). The script prints the
loss and the retrieval accuracy of held-out pairs on rank 0.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ot_losses import MultiSKLoss, SwAMPLoss, info_nce_loss


def synthetic_pairs(n, dim_a, dim_b, n_clusters, generator):
    """Paired views of ``n`` latent points drawn around ``n_clusters`` centres (same data on every rank)."""
    centres = torch.randn(n_clusters, 8, generator=generator)
    latent = centres[torch.randint(n_clusters, (n,), generator=generator)]
    latent = latent + 0.3 * torch.randn(n, 8, generator=generator)
    mix_a, mix_b = torch.randn(8, dim_a, generator=generator), torch.randn(8, dim_b, generator=generator)
    return (latent @ mix_a + 0.1 * torch.randn(n, dim_a, generator=generator),
            latent @ mix_b + 0.1 * torch.randn(n, dim_b, generator=generator))


class PairModel(nn.Module):
    """Encoders of both modalities and the loss module, so DDP averages every parameter."""

    def __init__(self, loss, dim_a, dim_b, dim, group):
        super().__init__()
        self.loss_name, self.group = loss, group
        self.enc_a = nn.Sequential(nn.Linear(dim_a, 64), nn.ReLU(), nn.Linear(64, dim))
        self.enc_b = nn.Sequential(nn.Linear(dim_b, 64), nn.ReLU(), nn.Linear(64, dim))
        if loss == "swamp":
            self.loss = SwAMPLoss(dim, n_prototypes=32, queue_size=1024, info_nce_weight=0.5,
                                  process_group=group)
        elif loss == "multi_sk":
            self.loss = MultiSKLoss((dim_a, dim_b, dim), n_anchors=16, queue_size=1024,
                                    info_nce_weight=0.5, process_group=group)

    def embed(self, x_a, x_b):
        return self.enc_a(x_a), self.enc_b(x_b)

    def forward(self, x_a, x_b):
        z_a, z_b = self.embed(x_a, x_b)
        if self.loss_name == "swamp":
            return self.loss(z_a, z_b)
        if self.loss_name == "multi_sk":
            return self.loss(x_a, x_b, z_a, z_b)
        return info_nce_loss(z_a, z_b, temperature=0.1, process_group=self.group)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=("swamp", "multi_sk", "info_nce"), default="swamp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=256, help="pairs per step over all ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        group = dist.group.WORLD
    else:
        rank, world, device, group = 0, 1, torch.device("cpu"), None
    if args.global_batch % world:
        raise SystemExit(f"--global-batch must be a multiple of the number of processes ({world}); "
                         f"equal local batches make DDP equal to one process on the whole batch")
    local = args.global_batch // world

    gen = torch.Generator().manual_seed(0)  # the same data and initial weights on every rank
    x_a, x_b = synthetic_pairs(args.global_batch * args.steps + 512, 32, 24, 10, gen)
    test_a, test_b = x_a[-512:].to(device), x_b[-512:].to(device)
    torch.manual_seed(0)
    model = PairModel(args.loss, 32, 24, 16, group).to(device)
    net = DistributedDataParallel(model) if distributed else model
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    for step in range(args.steps):
        start = step * args.global_batch + rank * local  # this rank's slice of the global batch
        batch_a, batch_b = x_a[start: start + local].to(device), x_b[start: start + local].to(device)
        loss = net(batch_a, batch_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            # Each rank's loss averages its own rows; their mean is the whole-batch loss.
            mean = loss.detach().clone()
            if distributed:
                dist.all_reduce(mean)
                mean /= world
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item():.4f}")

    if rank == 0:
        with torch.no_grad():
            z_a, z_b = (F.normalize(z, dim=1) for z in model.embed(test_a, test_b))
            hits = ((z_a @ z_b.T).argmax(1) == torch.arange(len(z_a), device=device)).float().mean()
        print(f"held-out retrieval a->b top-1: {hits.item():.3f} ({len(z_a)} pairs, chance "
              f"{1 / len(z_a):.3f}), {world} process(es)")
    if distributed:
        dist.barrier()  # no rank tears the group down while another still uses it (rank 0's evaluation)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
