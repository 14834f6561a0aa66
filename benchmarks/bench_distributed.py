#!/usr/bin/env python
"""Data-parallel Sinkhorn: time per iteration and bytes all-reduced per iteration.

Spawns ``--world`` processes (gloo on CPU; NCCL, one GPU each, when there
are that many GPUs). Each holds a block of the same global cost, split on
rows (``shard_dim=0``) or columns (``shard_dim=1``), and runs
``sinkhorn(block, n_iters=n, tol=None, process_group=..., shard_dim=...)``.
Per row of the table:

- time per iteration: median over repeats of the slowest rank's time
  (ranks start together after a barrier), with the 20th-80th percentile;
- bytes all-reduced per iteration per rank, measured (the library's
  all-reduce byte counter, ``run(2n) - run(n)`` so the one-time setup is
  excluded) next to the expectation ``2 x B x (unsharded size) x itemsize``
  (the max and the sum of the partial log-sum-exps of one half-step): it
  depends on the unsharded side only, not on the sharded size;
- the one-process time on the whole cost with one rank's resources (its
  CPU threads, or one GPU) and the largest relative error of the
  potentials against it.

Examples::

    python benchmarks/bench_distributed.py                     # CPU default (~1 min on 2 idle cores)
    python benchmarks/bench_distributed.py --sizes 4000x2000 --shard rows --dtype f64 --iters 100
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared otbench package
    sys.path.insert(0, str(HERE))
from otbench.env import DEFAULT_OUT, device_info, git_commit, version_of  # noqa: E402  (puts ot_losses first)

from ot_losses import sinkhorn  # noqa: E402
from ot_losses._distributed import comm_bytes  # noqa: E402

DTYPES = {"f64": torch.float64, "f32": torch.float32}
EPS = 0.05


def make_cost(n, m, dtype, seed=0):
    """Squared distances of uniform points in the unit square, scaled to [0, 1] (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.rand(m, 2, generator=gen, dtype=torch.float64)
    return (torch.cdist(x, y) ** 2 / 2).to(dtype)


def _solve(cost, n_iters, backend, **group):
    return sinkhorn(cost, eps=EPS, n_iters=n_iters, tol=None, grad="none", backend=backend, **group)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank, world, tmp, configs, args):
    nccl = args["comm"] == "nccl"
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args["threads"])
    dist.init_process_group(args["comm"], init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    group = dict(process_group=dist.group.WORLD)
    out = []
    for cfg in configs:
        dim = 0 if cfg["shard"] == "rows" else 1
        full = make_cost(cfg["n"], cfg["m"], DTYPES[cfg["dtype"]])
        sizes = [len(r) for r in torch.arange(full.shape[dim]).tensor_split(world)]
        block = full.split(sizes, dim=dim)[rank].contiguous().to(device)
        del full
        n = args["iters"]
        _solve(block, n, args["backend"], shard_dim=dim, **group)  # warm-up
        b0 = comm_bytes()
        _solve(block, n, args["backend"], shard_dim=dim, **group)
        b1 = comm_bytes()
        _solve(block, 2 * n, args["backend"], shard_dim=dim, **group)
        b2 = comm_bytes()
        per_iter = ((b2 - b1) - (b1 - b0)) / n
        times = []
        for _ in range(args["repeats"]):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            res = _solve(block, n, args["backend"], shard_dim=dim, **group)
            _sync(device)
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out.append(dict(times=slowest.cpu().tolist(), bytes_per_iter=per_iter,
                        setup_bytes=(b1 - b0) - n * per_iter, f=res.f.cpu(), g=res.g.cpu()))
    torch.save(out, f"{tmp}/out{rank}.pt")
    dist.destroy_process_group()


def _quantiles(times, n_iters):
    t = torch.tensor(times, dtype=torch.float64) / n_iters * 1e3
    return [float(torch.quantile(t, q)) for q in (0.5, 0.2, 0.8)]


def _rel(x, y):
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--sizes", default="1000x400,4000x400",
                        help="global N x M for row sharding; column sharding uses M x N (the split side)")
    parser.add_argument("--shard", default="rows,cols")
    parser.add_argument("--dtype", default="f32,f64")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    gpus = torch.cuda.device_count()
    comm = "nccl" if gpus >= args.world else "gloo"
    threads = max(1, (os.cpu_count() or 1) // args.world)
    configs = []
    for shard in args.shard.split(","):
        for size in args.sizes.split(","):
            big, small = (int(v) for v in size.split("x"))
            n, m = (big, small) if shard == "rows" else (small, big)
            configs += [dict(shard=shard, n=n, m=m, dtype=d) for d in args.dtype.split(",")]
    wargs = dict(comm=comm, threads=threads, iters=args.iters, repeats=args.repeats, backend=args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.world, tmp, configs, wargs), nprocs=args.world, join=True)
        ranks = [torch.load(f"{tmp}/out{r}.pt", weights_only=False) for r in range(args.world)]

    device = torch.device("cuda", 0) if comm == "nccl" else torch.device("cpu")
    torch.set_num_threads(threads)  # the one-process baseline: one rank's resources, the whole cost
    rows = []
    for i, cfg in enumerate(configs):
        full = make_cost(cfg["n"], cfg["m"], DTYPES[cfg["dtype"]]).to(device)
        _solve(full, args.iters, args.backend)
        single = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            ref = _solve(full, args.iters, args.backend)
            _sync(device)
            single.append(time.perf_counter() - t0)
        parts = [r[i] for r in ranks]
        f = torch.cat([p["f"] for p in parts], -1) if cfg["shard"] == "rows" else parts[0]["f"]
        g = parts[0]["g"] if cfg["shard"] == "rows" else torch.cat([p["g"] for p in parts], -1)
        unsharded = cfg["m"] if cfg["shard"] == "rows" else cfg["n"]
        itemsize = DTYPES[cfg["dtype"]].itemsize
        med, p20, p80 = _quantiles(parts[0]["times"], args.iters)
        rows.append(dict(
            op="sinkhorn", shard=cfg["shard"], n=cfg["n"], m=cfg["m"], dtype=cfg["dtype"], world=args.world,
            comm=comm, ms_per_iter=med, ms_p20=p20, ms_p80=p80,
            one_process_ms_per_iter=_quantiles(single, args.iters)[0],
            bytes_per_iter=parts[0]["bytes_per_iter"], expected_bytes_per_iter=2 * unsharded * itemsize,
            setup_bytes=parts[0]["setup_bytes"],
            max_rel_err_potentials=max(_rel(f, ref.f.cpu()), _rel(g, ref.g.cpu()))))

    name, slug = device_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=name, date=now.date().isoformat(), git_commit=git_commit(), torch=torch.__version__,
                triton=version_of("triton"), world=args.world, comm=comm, threads_per_rank=threads,
                iters=args.iters, repeats=args.repeats, eps=EPS, backend=args.backend, argv=sys.argv[1:],
                load_avg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    header = ("| shard | global N x M | dtype | ms / iter [p20-p80] | one process, whole cost "
              "| bytes all-reduced / iter (expected) | setup bytes | max rel err |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['shard']} | {r['n']} x {r['m']} | {r['dtype']} | {r['ms_per_iter']:.3f} "
             f"[{r['ms_p20']:.3f}-{r['ms_p80']:.3f}] | {r['one_process_ms_per_iter']:.3f} | "
             f"{r['bytes_per_iter']:.0f} ({r['expected_bytes_per_iter']}) | {r['setup_bytes']:.0f} | "
             f"{r['max_rel_err_potentials']:.1e} |" for r in rows]
    table = "\n".join([header, *lines])
    title = (f"{args.world} processes ({comm}, {threads} thread(s) each), {name}, eps {EPS}, "
             f"{args.iters} iterations, backend {args.backend}, {meta['date']}")
    print(title)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"distributed-{slug}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(f"# Data-parallel Sinkhorn\n\n{title}\n\n{table}\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
