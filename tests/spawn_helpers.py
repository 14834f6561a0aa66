"""Helpers for the data-parallel tests: run a function on W spawned gloo processes.

``spawn(worker, world, payload)`` starts ``world`` processes, each calling
``worker(rank, world, payload)`` inside an initialised gloo group (file
rendezvous, short timeout so a hang fails instead of stalling CI), and
returns the list of their return values in rank order. Workers must be
module-level functions (the spawn start method pickles them by name).
"""
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 30


def _entry(rank, world, tmp, worker, payload):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before ot_losses.kernels is imported
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        out = worker(rank, world, payload)
        torch.save(out, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, world, payload):
    """``[worker(r, world, payload) for r in range(world)]``, each in its own gloo process."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, tmp, worker, payload), nprocs=world, join=True)
        return [torch.load(f"{tmp}/out{r}.pt", weights_only=False) for r in range(world)]


def shard(x, dim, sizes, rank):
    """Rank ``rank``'s block of ``x`` split along ``dim`` into ``sizes``."""
    return None if x is None else torch.split(x, sizes, dim=dim)[rank]
