"""Metadata of a run and its outputs: terminal tables, Markdown, plot."""
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from .core import OURS_PREFIX
from .env import device_info, git_commit, version_of


def metadata(device, args, copy_gbps):
    name, slug = device_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=name, device_slug=slug, date=now.date().isoformat(),
                datetime_utc=now.isoformat(timespec="seconds"), git_commit=git_commit(),
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=version_of("triton"), pot=version_of("ot"), geomloss=version_of("geomloss"),
                flash_sinkhorn=version_of("flash_sinkhorn"), ot_losses=version_of("ot_losses"),
                numpy=np.__version__, copy_gbps=copy_gbps, torch_threads=torch.get_num_threads(),
                copy_note="dst.copy_(src) of a large fp32 tensor, bytes read + written / time",
                bandwidth_note="bytes/iter = 2 passes over the cost (row + column half-step) x its "
                               "element size; GB/s = that / time per iteration",
                argv=sys.argv[1:], quick=args.quick, check=args.check,
                load_avg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    return meta


def _fmt(v, spec):
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


COLUMNS = ["contender", "input", "iters", "median ms [p20-p80]", "ms/iter", "x vs naive",
           "GB/s", "% copy", "peak MiB", "|f-f_ref|", "plan rel err", "marg err", "check"]


def row_cells(r):
    if r["status"] != "ok":
        return [r["contender"], r["inputs"], str(r["n_iters"]), "ERROR: " + (r["error"] or ""),
                "", "", "", "", "", "", "", "", "error"]
    iters = str(r["n_iters"]) + ("*" if r.get("reduced_iters") else "")
    if r["inputs"] == "points":
        iters = "own"
    check = {True: "ok", False: "MISMATCH", None: "n/a"}[r["agrees"]]
    return [r["contender"], r["inputs"], iters,
            f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]",
            "-" if r["inputs"] == "points" else f"{r['ms_per_iter']:.4g}",
            _fmt(r.get("speedup_per_call") if r["inputs"] == "points" else r.get("speedup"), ".2f"),
            "-" if r["inputs"] == "points" else _fmt(r["gbps"], ".3g"),
            "-" if r["inputs"] == "points" or not r["frac_copy_bw"] else _fmt(100 * r["frac_copy_bw"], ".1f"),
            _fmt(r.get("peak_mib"), ".3g"),
            _fmt(r["err_f"], ".1e"), _fmt(r["err_plan"], ".1e"), _fmt(r["err_marg"], ".1e"), check]


def group_rows(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["size"], r["dtype"]), []).append(r)
    return groups


def headline(rows):
    """Ratios of ot_losses (torch, and triton where present) against each contender, per problem."""
    out = []
    for (sc, size, dt), rs in group_rows(rows).items():
        ok = {r["contender"]: r for r in rs if r["status"] == "ok" and r["inputs"] == "cost"}
        for ours in (f"{OURS_PREFIX}triton", f"{OURS_PREFIX}torch"):
            if ours not in ok:
                continue
            for other, r in ok.items():
                if other.startswith(OURS_PREFIX):
                    continue
                out.append(dict(scenario=sc, size=size, dtype=dt, ours=ours, other=other,
                                ours_ms_per_iter=ok[ours]["ms_per_iter"], other_ms_per_iter=r["ms_per_iter"],
                                speedup=r["ms_per_iter"] / ok[ours]["ms_per_iter"]))
    return out


NOTES = [
    "Same problem per row group: same cost tensor, marginals, eps, n_iters and tol=None (never an "
    "early stop). POT is given stopThr=-1 so it runs exactly n_iters; it still computes its marginal "
    "error every 10 iterations (part of its cost).",
    "POT's balanced solvers update columns first; they are called on (C^T, b, a), which makes their "
    "iterates those of ot_losses (rows first), so agreement is exact up to rounding.",
    "Agreement: float64 reference = the naive log-domain loop on the stored cost values (half-precision "
    "costs upcast exactly), same n_iters. |f-f_ref|: max over f and g after removing mean(f) from f "
    "and adding it to g (cost units). plan rel err: ||P - P_ref||_F / ||P_ref||_F. marg err: L1 "
    "violation of the constraints / transported mass (unbalanced: distance to the reference plan's "
    "marginals). check: within the dtype's tolerance (TOLERANCES); n/a for contenders with their own "
    "algorithm (eps-scaling, layered Multi-SK), whose errors are shown but not judged.",
    "iters with * = a slow contender ran fewer iterations to fit the time budget; its per-iteration "
    "time is the comparable number and its agreement is checked against a reference of the same "
    "iteration count.",
    "x vs naive = time per iteration of the eager naive torch loop / this row's (per call for "
    "point-cloud rows, whose iteration count is their own).",
    "Point-cloud rows (GeomLoss, flash-sinkhorn) take the points x, y, not the dense cost, and build "
    "0.5|x-y|^2 themselves (blur = sqrt(eps), debias=False); their time per call is what compares.",
    "SwAV rows time the full Q = B * plan^T (3 iterations + forming Q) for every contender; time per "
    "iteration = call / 3.",
    "peak MiB: memory one call holds at its peak beyond its inputs, result included (CUDA: the "
    "allocator's peak; CPU: the resident-set high-water mark with a fixed mmap threshold, so freed "
    "buffers do not count).",
]


def write_markdown(path, meta, rows, skipped, heads):
    lines = [f"# bench_sinkhorn: {meta['device']}", "",
             f"- date (UTC): {meta['datetime_utc']}; git commit: `{meta['git_commit']}`",
             f"- torch {meta['torch']} (CUDA {meta.get('cuda')}), triton {meta['triton']}, "
             f"POT {meta['pot']}, GeomLoss {meta['geomloss']}, flash-sinkhorn {meta['flash_sinkhorn']}, "
             f"numpy {meta['numpy']}, python {meta['python']}",
             f"- copy bandwidth measured in this run: {meta['copy_gbps']:.3g} GB/s ({meta['copy_note']})",
             f"- load average (1, 5, 15 min) at start {meta.get('load_avg')}, at end "
             f"{meta.get('load_avg_end')}; run took {meta.get('elapsed_s', 0):.0f} s",
             f"- command: `bench_sinkhorn.py "
             f"{' '.join(meta['argv'])}`", ""]
    if meta.get("timing_note"):
        lines += [f"> {meta['timing_note']}", ""]
    for (sc, size, dt), rs in group_rows(rows).items():
        r0 = rs[0]
        lines += [f"## {sc} {size} {dt} (shape {tuple(r0['shape'])}, eps {r0['eps']}, "
                  f"n_iters {SCENARIO_ITERS.get((sc, size, dt), r0['n_iters'])})", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in rs:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(r)) + " |")
        lines.append("")
    if heads:
        lines += ["## ot_losses speed-up per iteration over each contender", "",
                  "| problem | ours | other | ours ms/iter | other ms/iter | speed-up |",
                  "|---|---|---|---|---|---|"]
        for h in heads:
            lines.append(f"| {h['scenario']} {h['size']} {h['dtype']} | {h['ours']} | {h['other']} | "
                         f"{h['ours_ms_per_iter']:.4g} | {h['other_ms_per_iter']:.4g} | "
                         f"{h['speedup']:.2f}x |")
        lines.append("")
    if skipped:
        lines += ["## Contenders without a row", ""]
        seen = set()
        for s in skipped:
            key = (s["contender"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {s['contender']}: {s['reason']}")
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    Path(path).write_text("\n".join(lines))


SCENARIO_ITERS = {}


def print_table(rows, console=None):
    for (sc, size, dt), rs in group_rows(rows).items():
        n_iters = SCENARIO_ITERS.get((sc, size, dt), rs[0]["n_iters"])
        title = f"{sc} {size} {dt}  (eps {rs[0]['eps']}, n_iters {n_iters})"
        if console is not None:
            from rich.table import Table
            table = Table(title=title, title_justify="left")
            for c in COLUMNS:
                table.add_column(c, overflow="fold")
            for r in rs:
                style = "red" if r["status"] != "ok" or r.get("agrees") is False else None
                if r["contender"].startswith(OURS_PREFIX) and style is None:
                    style = "bold"
                table.add_row(*row_cells(r), style=style)
            console.print(table)
        else:
            cells = [COLUMNS] + [row_cells(r) for r in rs]
            widths = [min(60, max(len(c[i]) for c in cells)) for i in range(len(COLUMNS))]
            print("\n" + title)
            for c in cells:
                print("  ".join(s[:60].ljust(w) for s, w in zip(c, widths)))


def plot(path, rows):
    """Time per iteration vs problem size, one line per contender, per (scenario, dtype)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {}
    for r in rows:
        if r["status"] == "ok" and r["inputs"] == "cost":
            panels.setdefault((r["scenario"], r["dtype"]), []).append(r)
    panels = {k: v for k, v in panels.items() if len({r["size"] for r in v}) >= 2} or panels
    if not panels:
        return False
    n = len(panels)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.5 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, ((sc, dt), rs) in zip(axes.flat, sorted(panels.items())):
        by = {}
        for r in rs:
            by.setdefault(r["contender"], []).append((int(np.prod(r["shape"])), r["ms_per_iter"]))
        for name, pts in sorted(by.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    linewidth=2.5 if name.startswith(OURS_PREFIX) else 1.2, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cost entries (B*N*M)")
        ax.set_ylabel("ms / iteration")
        ax.set_title(f"{sc} {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
