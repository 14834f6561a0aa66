#!/usr/bin/env python
"""Benchmark of the ot_losses Sinkhorn family against the usual alternatives.

Run ``python benchmarks/bench_sinkhorn.py`` for the default suite: a small CPU
suite (under a minute on a 2-core machine) or, when CUDA is present, the full
GPU suite. Every row of a problem solves the *same* problem (same cost,
marginals, eps, ``n_iters`` and ``tol=None``); its contenders come from one
setup function, ``otbench.contenders.make_contenders``, which returns
``name -> callable``. This file is the command line; the scenarios,
contenders, timers and report live in the ``otbench`` package next to it,
shared with ``bench_retrieval.py``.

Each row reports the median time and its spread (20th-80th percentile) over
repeats, the time per iteration, the speed-up over a named baseline (the
eager naive torch log-sum-exp loop), the achieved bandwidth (bytes of cost
one iteration must read, i.e. two passes over the cost, divided by the time
per iteration) and its fraction of a device copy bandwidth measured in the
same run, and the agreement with a float64 reference run of the same
iterations (potentials after centring, relative plan error, marginal error),
so that a fast wrong answer is visible.

Timing: on CUDA ``triton.testing.do_bench(..., quantiles=[0.5, 0.2, 0.8])``
(CUDA events for calls over 0.5 s, or when triton is missing); on CPU
``time.perf_counter`` around each call after a warm-up call, the repeats of
a problem's contenders interleaved round by round so that a shared machine's
changing load hits all of them alike. Slow contenders (POT numpy, partial,
the layered Multi-SK) may run fewer iterations on CPU (marked ``*``; their
time per iteration is what compares, their agreement is checked against a
reference of the same length). Results go to the terminal (rich if
installed) and to ``<out>/<device>-<date>.{json,md,png}`` (``-quick`` added
for ``--quick`` runs, ``-check`` for ``--check`` runs).

``--check`` is the short GPU suite that ``benchmarks/gpu_check.sh`` runs
(``otbench.scenarios.CHECK_SUITE``: dense 4096-16384 fp32, bf16 8192, SwAV
shapes, batched 64 x 256^2, unbalanced, partial, multi) with shorter timing;
``--time-budget`` stops starting new problems after that many seconds and
lists the problems left out in the report.

Examples::

    python benchmarks/bench_sinkhorn.py                       # default suite
    python benchmarks/bench_sinkhorn.py --quick --out /tmp/b  # smoke run (~10 s)
    python benchmarks/bench_sinkhorn.py --scenario dense --sizes 1000,2000x4000 \\
        --dtype f32 --iters 50
    python benchmarks/bench_sinkhorn.py --check --time-budget 300  # short GPU suite
    python benchmarks/bench_sinkhorn.py --list                # scenarios, contenders
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared otbench package, also when this file is imported by path
    sys.path.insert(0, str(HERE))

from otbench.agreement import TOLERANCES  # noqa: E402
from otbench.env import DEFAULT_OUT, HAS_CUDA, HAS_MPL, HAS_RICH  # noqa: E402  (puts ot_losses first)
from otbench.report import (NOTES, SCENARIO_ITERS, headline, metadata, plot, print_table,  # noqa: E402
                            write_markdown)
from otbench.runner import run_problem  # noqa: E402
from otbench.scenarios import CHECK_SUITE, DTYPES, SCENARIOS, make_problem, parse_size  # noqa: E402
from otbench.timing import TimingConfig, copy_bandwidth  # noqa: E402


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def build_plan(args, device):
    cuda = device.type == "cuda"
    check = {name: (sizes, dtypes) for name, sizes, dtypes in CHECK_SUITE}
    default = ",".join(check if args.check else SCENARIOS)
    names = [s.strip() for s in (args.scenario or default).split(",") if s.strip()]
    for n in names:
        if n not in SCENARIOS:
            raise SystemExit(f"--scenario: unknown {n!r}; choose from {', '.join(SCENARIOS)}")
    plan = []
    for n in names:
        sc = SCENARIOS[n]
        if args.check and n in check:
            suite_sizes, suite_dtypes = check[n]
        elif cuda or args.check:
            suite_sizes, suite_dtypes = sc.gpu_sizes, sc.gpu_dtypes
        else:
            suite_sizes, suite_dtypes = sc.cpu_sizes, sc.cpu_dtypes
        if args.sizes:
            sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        elif args.quick:
            sizes = list(sc.quick_sizes)
        else:
            sizes = list(suite_sizes)
        if args.dtype:
            dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
            for d in dtypes:
                if d not in DTYPES:
                    raise SystemExit(f"--dtype: unknown {d!r}; choose from {', '.join(DTYPES)}")
        elif args.quick:
            dtypes = list(sc.quick_dtypes)
        else:
            dtypes = list(suite_dtypes)
        for s in sizes:
            try:
                parse_size(s)
            except ValueError:
                raise SystemExit(f"--sizes: cannot parse {s!r}; use N, NxM or BxNxM")
            for d in dtypes:
                plan.append((n, s, d))
    return plan


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, at most 10 iterations, 2 repeats (smoke test, a few seconds)")
    ap.add_argument("--check", action="store_true",
                    help="the short GPU suite of benchmarks/gpu_check.sh (CHECK_SUITE), shorter timing; "
                         "with --quick: its scenarios at their quick sizes")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new problem after this many seconds; the rest are reported as not run")
    ap.add_argument("--scenario", default=None, help=f"comma list of: {', '.join(SCENARIOS)} (default all)")
    ap.add_argument("--sizes", default=None,
                    help="comma list overriding each selected scenario's sizes: N, NxM, BxNxM (batched), "
                         "B (swav batch) or NxM (multi)")
    ap.add_argument("--dtype", default=None, help="comma list of f64,f32,f16,bf16 (cost dtype)")
    ap.add_argument("--iters", type=int, default=None,
                    help="n_iters for every problem (default per scenario)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/results)")
    ap.add_argument("--contenders", default=None,
                    help="comma list of substrings: only contenders whose name contains one")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--repeats", type=int, default=None, help="max timed repeats per contender")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this run (default: torch's choice); 1 is steadier "
                         "on a CPU shared with other jobs")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        ap.error("--iters must be >= 1")
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error("--time-budget must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:11s} {s.doc}\n{'':11s} n_iters {s.n_iters}, eps {s.eps}; CPU sizes "
                  f"{', '.join(s.cpu_sizes)} ({', '.join(s.cpu_dtypes)}); GPU sizes {', '.join(s.gpu_sizes)} "
                  f"({', '.join(s.gpu_dtypes)})")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if HAS_CUDA else "cpu"))
    cuda = device.type == "cuda"
    if args.quick:
        cfg = TimingConfig(budget_s=0.02, max_call_s=0.2, min_repeats=2, max_repeats=args.repeats or 2)
    elif cuda and args.check:
        # A dozen problems of up to 7 contenders in a few minutes: ~0.3 s timed per contender.
        cfg = TimingConfig(budget_s=0.3, max_call_s=2.0, min_repeats=3, max_repeats=args.repeats or 30)
    elif cuda:
        cfg = TimingConfig(budget_s=1.0, max_call_s=5.0, min_repeats=3, max_repeats=args.repeats or 100)
    else:
        cfg = TimingConfig(budget_s=0.3, max_call_s=0.3, min_repeats=3, max_repeats=args.repeats or 7)
    plan = build_plan(args, device)
    only = [s.strip() for s in args.contenders.split(",")] if args.contenders else None

    console = None
    if HAS_RICH:
        from rich.console import Console
        # Wide tables: let them be wide when the output is not a terminal (logs, CI).
        console = Console(width=None if sys.stdout.isatty() else 220)
    t_start = time.perf_counter()
    copy_gbps = copy_bandwidth(device)
    meta = metadata(device, args, copy_gbps)
    meta["timing_note"] = (
        "CPU timings: median of >= 3 perf_counter repeats after a warm-up call, the repeats of a "
        "problem's contenders interleaved round by round so that all see the same load; on a shared "
        "machine (other jobs may run) treat ratios, not absolute times, as the result." if not cuda else
        "CUDA timings: triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8]) after a warm-up call.")
    rows, skipped = [], []

    def run_all(progress_cb=None, advance=None):
        for sc, size, dt in plan:
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                skipped.append(dict(scenario=sc, size=size, dtype=dt, contender="(problem not run)",
                                    reason=f"{sc} {size} {dt}: time budget of {args.time_budget:g} s "
                                           f"reached"))
                if advance:
                    advance()
                continue
            n_iters = args.iters or (min(SCENARIOS[sc].n_iters, 10) if args.quick else None)
            try:
                p = make_problem(sc, size, dt, device, n_iters=n_iters)
            except Exception as exc:
                rows.append(dict(scenario=sc, kind=SCENARIOS[sc].kind, size=size, shape=[], dtype=dt,
                                 eps=SCENARIOS[sc].eps, contender="(problem setup)", inputs="cost",
                                 status="error", error=f"{type(exc).__name__}: {exc}", n_iters=args.iters,
                                 same_iterates=False, note=""))
                continue
            SCENARIO_ITERS[(sc, size, dt)] = p.n_iters
            r, s = run_problem(p, device, cfg, copy_gbps, progress=progress_cb, only=only)
            rows.extend(r)
            skipped.extend(s)
            if advance:
                advance()
            del p
            if cuda:
                torch.cuda.empty_cache()

    if console is not None and console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} problems"), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task("starting", total=len(plan))
            run_all(lambda msg: prog.update(task, description=msg), lambda: prog.advance(task))
    else:
        def cb(msg):
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
        run_all(cb)

    meta["elapsed_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    heads = headline(rows)
    print_table(rows, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"{meta['device_slug']}-{meta['date']}" + ("-check" if args.check else "")
            + ("-quick" if args.quick else ""))
    payload = dict(meta=meta, rows=rows, headline=heads, skipped=skipped, notes=NOTES,
                   tolerances={k: dict(f=v[0], plan=v[1]) for k, v in TOLERANCES.items()})
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    write_markdown(out / f"{stem}.md", meta, rows, skipped, heads)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    if HAS_MPL and not args.no_plot:
        try:
            if plot(out / f"{stem}.png", rows):
                written.append(out / f"{stem}.png")
        except Exception as exc:
            print(f"plot failed: {exc}", file=sys.stderr)
    n_err = sum(r["status"] != "ok" for r in rows)
    n_bad = sum(r.get("agrees") is False for r in rows)
    n_left = sum(s["contender"] == "(problem not run)" for s in skipped)
    left = f"; {n_left} problems not run (time budget)" if n_left else ""
    print(f"\n{len(rows)} rows ({n_err} errors, {n_bad} outside tolerance) in {meta['elapsed_s']:.1f} s; "
          f"copy bandwidth {copy_gbps:.3g} GB/s{left}")
    for h in heads:
        if h["ours"].endswith("torch") and h["scenario"] == "dense":
            print(f"  {h['scenario']} {h['size']} {h['dtype']}: {h['ours']} "
                  f"{h['ours_ms_per_iter']:.3g} ms/iter, "
                  f"{h['speedup']:.2f}x vs {h['other']} ({h['other_ms_per_iter']:.3g})")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
