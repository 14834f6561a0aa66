#!/usr/bin/env python
"""Benchmark ``points``: Sinkhorn between point clouds, the cost never stored (``FeatureCost``).

Every row solves the same balanced problem, uniform weights, ``n_iters``
iterations at a fixed eps (``tol=None``), between ``x``, ``y`` (N x D)
standard normal points divided by sqrt(D), with the cost
``0.5 |x - y|^2`` (``sqeuclidean``; GeomLoss' p = 2 cost) or
``-<x, y>`` (``dot``). Contenders:

- ``features``: ``sinkhorn(FeatureCost(x, y, ...))`` (torch streaming on
  CPU, the fused Triton kernels on CUDA);
- ``dense``: ``sinkhorn(FeatureCost(...).dense())`` (cost built and stored);
- ``geomloss``: GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps),
  scaling=0.9, debias=False, backend="tensorized")`` (sqeuclidean only; it
  runs its own eps-scaling schedule, so its iteration count differs and it
  has no time per iteration);
- ``pot``: POT ``ot.sinkhorn(..., method="sinkhorn_log")`` on ``ot.dist``
  (numpy, CPU only);
- ``flash-sinkhorn``: flash-sinkhorn's ``SamplesLoss("sinkhorn", p=2,
  half_cost=True, backend="alternating", eps=eps, n_iters=n_iters,
  use_epsilon_scaling=False, debias=False)``: the same alternating
  iterations at the same fixed eps, streamed like ``features`` (CUDA and
  sqeuclidean only; its defaults otherwise, TF32 dot products included).

Each (contender, problem) runs in its own subprocess, which reports the
median time over ``--repeats`` after a warm-up call and its peak memory
beyond the inputs: on CPU the growth of the resident set's high-water mark
(``VmHWM``, reset after the inputs are built; glibc's mmap threshold is fixed
so that freed blocks leave the resident set at once), on CUDA
``torch.cuda.max_memory_allocated``. Contenders that would need more than
``--max-dense-gib`` for an N x M array are skipped. ``err`` is the relative
error of the returned regularised OT value (``<P, C> + eps KL(P || a b^T)``)
against a converged float64 solve (N <= 5000): with the default 100
iterations at eps = 0.1 every contender is close to convergence, so a large
``err`` means a wrong or unconverged answer.

``--target`` runs only the issue's memory target (CPU: 50000 x 50000, D = 64,
fp32, ``features``, two iterations) and prints its peak memory.
Results go to ``benchmarks/results/points-<device>-<date>.{json,md}``.

Examples::

    python benchmarks/bench_points.py                      # small CPU default
    python benchmarks/bench_points.py --sizes 1000 --dims 3 --kinds sqeuclidean --quick
    python benchmarks/bench_points.py --target
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's ot_losses, installed or not
CONTENDERS = ("features", "dense", "geomloss", "pot", "flash-sinkhorn")
STREAMED = ("features", "flash-sinkhorn")   # never store the N x M cost
GIB = 2 ** 30


# ----------------------------------------------------------------------------- worker (one subprocess)
def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _points(n, d, seed, device, dtype):
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d) + 0.1
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _scale(kind):
    return 0.5 if kind == "sqeuclidean" else 1.0


def _solver(name, kind, eps, n_iters, workspace):
    """A callable ``(x, y) -> float value`` for one contender."""
    from ot_losses import FeatureCost, sinkhorn

    def feature_cost(x, y):
        return FeatureCost(x, y, kind=kind, scale=_scale(kind), workspace=workspace)

    if name == "features":
        return lambda x, y: float(sinkhorn(feature_cost(x, y), eps=eps, n_iters=n_iters, grad="none").value)
    if name == "dense":
        return lambda x, y: float(sinkhorn(feature_cost(x, y).dense(), eps=eps, n_iters=n_iters,
                                           grad="none").value)
    if name == "geomloss":
        from geomloss import SamplesLoss
        if kind != "sqeuclidean":
            raise NotImplementedError("GeomLoss' tensorized point cost is |x - y|^p / p")
        loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=0.9, debias=False,
                           backend="tensorized")
        return lambda x, y: float(loss(x, y))
    if name == "flash-sinkhorn":
        from flash_sinkhorn import SamplesLoss as FlashLoss
        if kind != "sqeuclidean":
            raise NotImplementedError("flash-sinkhorn's cost is the squared Euclidean distance")
        flash = FlashLoss("sinkhorn", p=2, half_cost=True, backend="alternating", eps=eps, n_iters=n_iters,
                          use_epsilon_scaling=False, debias=False)
        return lambda x, y: float(flash(x, y))
    if name == "pot":
        import numpy as np
        import ot

        def pot(x, y):
            xn, yn = x.cpu().numpy(), y.cpu().numpy()
            cost = _scale(kind) * ot.dist(xn, yn) if kind == "sqeuclidean" else -(xn @ yn.T)
            a, b = np.full(len(xn), 1 / len(xn), xn.dtype), np.full(len(yn), 1 / len(yn), yn.dtype)
            plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0)
            plan = plan.astype(np.float64)
            kl = np.where(plan > 0, plan * np.log(np.maximum(plan, 1e-300) / np.outer(a, b)), 0.0).sum()
            return float((plan * cost).sum() + eps * (kl - plan.sum() + 1.0))
        return pot
    raise ValueError(name)


def worker(spec):
    """Run one contender on one problem; returns its time, peak memory and value."""
    import torch
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    x, y = _points(spec["n"], spec["d"], 0, device, dtype)
    solve = _solver(spec["contender"], spec["kind"], spec["eps"], spec["n_iters"], spec["workspace"])
    solve(x[:64], y[:64])                                   # warm-up: libraries, allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS:")
        if not _reset_peak():
            base = None
    times, value = [], None
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        value = solve(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None if base is None else _status("VmHWM:") - base
    return {"time_s": statistics.median(times), "times_s": times, "peak_bytes": peak, "value": value}


def run_worker(spec, timeout):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode]
        return {"error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def reference(n, d, kind, eps):
    """Converged float64 value (dense torch solve: the fastest exact path at these sizes)."""
    import torch

    from ot_losses import FeatureCost, sinkhorn
    x, y = _points(n, d, 0, torch.device("cpu"), torch.float64)
    cost = FeatureCost(x, y, kind=kind, scale=_scale(kind)).dense()
    return float(sinkhorn(cost, eps=eps, n_iters=20000, tol=1e-9, grad="none").value)


def _meta(device):
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=str(ROOT)).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": device, "device_name": name, "torch": torch.__version__, "commit": commit,
            "date": datetime.date.today().isoformat(), "cpus": os.cpu_count()}


def _fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2 ** 20:.1f} MiB"


def write_report(rows, meta, out, tag):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"points-{meta['device']}-{meta['date']}{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# points benchmark ({meta['device']}: {meta['device_name']}, torch {meta['torch']}, "
             f"commit {meta['commit']}, {meta['date']})", "",
             "| kind | N = M | D | dtype | iters | contender | time (s) | ms / iter | peak memory | err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            cells = [r.get("error") or r["skipped"], "", "", ""]
        else:
            geom = r["contender"] == "geomloss"   # its own eps-scaling schedule
            per_iter = float("nan") if geom else 1e3 * r["time_s"] / r["n_iters"]
            err = "n/a" if r.get("err") is None else f"{r['err']:.1e}"
            cells = [f"{r['time_s']:.3g}", "-" if math.isnan(per_iter) else f"{per_iter:.3g}",
                     _fmt_bytes(r["peak_bytes"]), err]
        head = [r["kind"], r["n"], r["d"], r["dtype"], r["n_iters"], r["contender"]]
        lines.append("| " + " | ".join(str(c) for c in head + cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return stem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", default=None, help="comma-separated N (= M)")
    p.add_argument("--dims", default=None, help="comma-separated D")
    p.add_argument("--kinds", default="sqeuclidean,dot")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workspace", type=int, default=256 * 2 ** 20)
    p.add_argument("--max-dense-gib", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="smoke run: N = 300, D = 3")
    p.add_argument("--target", action="store_true", help="CPU 50000 x 50000, D = 64, fp32, features only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.target:
        sizes, dims, kinds, contenders, iters = [50000], [64], ["sqeuclidean"], ["features"], 2
    elif args.quick:
        sizes, dims, iters = [300], [3], args.iters
        kinds, contenders = args.kinds.split(","), args.contenders.split(",")
    else:
        default_sizes = "1000,3000" if device == "cpu" else "1000,10000,20000,50000,100000"
        default_dims = "3,64" if device == "cpu" else "3,64,256"
        sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
        dims = [int(s) for s in (args.dims or default_dims).split(",")]
        kinds, contenders, iters = args.kinds.split(","), args.contenders.split(","), args.iters
    available = {"geomloss": importlib.util.find_spec("geomloss") is not None,
                 "pot": importlib.util.find_spec("ot") is not None,
                 "flash-sinkhorn": importlib.util.find_spec("flash_sinkhorn") is not None}
    itemsize = 8 if args.dtype == "float64" else 4
    rows = []
    for kind in kinds:
        for n in sizes:
            for d in dims:
                small = n <= 5000 and not args.target
                ref = reference(n, d, kind, args.eps) if small else None
                for name in contenders:
                    row = {"kind": kind, "n": n, "d": d, "dtype": args.dtype, "n_iters": iters,
                           "contender": name, "eps": args.eps}
                    if not available.get(name, True):
                        row["skipped"] = f"{name} not installed"
                    elif name in ("geomloss", "flash-sinkhorn") and kind != "sqeuclidean":
                        row["skipped"] = f"no dot cost in {name}'s samples loss"
                    elif name == "pot" and device != "cpu":
                        row["skipped"] = "numpy (CPU) contender"
                    elif name == "flash-sinkhorn" and device != "cuda":
                        row["skipped"] = "CUDA only"
                    elif name not in STREAMED and 3 * n * n * itemsize > args.max_dense_gib * GIB:
                        row["skipped"] = f"dense N x M over --max-dense-gib={args.max_dense_gib}"
                    else:
                        spec = {"contender": name, "kind": kind, "n": n, "d": d, "dtype": args.dtype,
                                "eps": args.eps, "n_iters": iters, "repeats": args.repeats,
                                "threads": args.threads, "device": device, "workspace": args.workspace}
                        row.update(run_worker(spec, timeout=3600))
                        if ref is not None and "value" in row:
                            row["err"] = abs(row["value"] - ref) / abs(ref)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = _meta(device)
    meta.update(threads=args.threads, eps=args.eps, workspace=args.workspace,
                memory="VmHWM growth, glibc MALLOC_MMAP_THRESHOLD_=131072" if device == "cpu"
                else "torch.cuda.max_memory_allocated growth")
    tag = "-target" if args.target else ("-quick" if args.quick else "")
    write_report(rows, meta, Path(args.out), tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
