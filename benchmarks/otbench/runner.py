"""One problem, every contender: time, check against the reference, return the result rows."""
import math
import traceback

import numpy as np
import torch

from .agreement import TOLERANCES, agreement, reference
from .contenders import make_contenders
from .core import BASELINE
from .scenarios import Problem
from .timing import TimingConfig, peak_memory, time_cpu_interleaved, time_cuda


def run_problem(p: Problem, device, cfg: TimingConfig, copy_gbps, progress=None, only=None):
    """Time and check every contender of ``p``; returns (rows, skipped). Never raises for a contender."""
    contenders, skipped = make_contenders(p, device)
    if only:
        contenders = {k: v for k, v in contenders.items() if any(o.lower() in k.lower() for o in only)}
    refs = {}
    rows = []
    order = list(contenders)
    # Run the baseline first (its f64 answer doubles as the reference); report in dict order.
    run_order = sorted(order, key=lambda n: n != BASELINE)
    tag = f"{p.scenario} {p.label} {p.dtype}"
    if device.type == "cuda":
        timed = {}
        for name in run_order:
            if progress:
                progress(f"{tag}: {name}")
            try:
                times, n_used, raw, quant = time_cuda(contenders[name].fn, p.n_iters, cfg,
                                                      contenders[name].can_reduce, device)
                timed[name] = dict(n_used=n_used, raw=raw, error=None)
                timed[name]["quantiles" if quant else "times"] = times
            except Exception as exc:
                timed[name] = dict(n_used=p.n_iters, raw=None, error=exc,
                                   tb=traceback.format_exc(limit=3)[-1500:])
            torch.cuda.empty_cache()
    else:
        timed = time_cpu_interleaved({n: contenders[n] for n in run_order}, p.n_iters, cfg,
                                     progress=(lambda m: progress(f"{tag}: {m}")) if progress else None)
    for name in run_order:
        st = timed[name]
        st["peak"] = None
        if st["error"] is None:
            try:
                st["peak"] = peak_memory(contenders[name].fn, st["n_used"], device)
            except Exception:  # memory is reported where it can be measured; timing already ran
                pass
    for name in run_order:
        c, st = contenders[name], timed[name]
        row = dict(scenario=p.scenario, kind=p.kind, size=p.label, shape=list(p.shape), dtype=p.dtype,
                   eps=p.eps, contender=name, inputs=c.inputs, same_iterates=c.same_iterates,
                   note=c.note, status="ok", error=None, n_iters=p.n_iters)
        try:
            if st["error"] is not None:
                raise st["error"]
            n_used, raw = st["n_used"], st["raw"]
            if "quantiles" in st:
                med, lo, hi = st["quantiles"]
                repeats, fastest = None, None
            else:
                times = st["times"]
                med = float(np.median(times))
                lo, hi = (float(v) for v in np.quantile(times, [0.2, 0.8]))
                repeats, fastest = len(times), 1e3 * min(times)
            row.update(n_iters=n_used, reduced_iters=n_used != p.n_iters, repeats=repeats,
                       median_ms=1e3 * med, p20_ms=1e3 * lo, p80_ms=1e3 * hi, min_ms=fastest,
                       ms_per_iter=1e3 * med / n_used)
            row["peak_mib"] = None if st["peak"] is None else st["peak"] / 2 ** 20
            row["gbps"] = p.bytes_per_iter / (med / n_used) / 1e9
            row["frac_copy_bw"] = row["gbps"] / copy_gbps if copy_gbps else None
            sol = c.solution(raw)
            if name == BASELINE and p.dtype == "f64" and p.kind in ("balanced", "unbalanced"):
                refs.setdefault(n_used, sol)     # the f64 naive loop *is* the reference computation
            if n_used not in refs:
                refs[n_used] = reference(p, n_used)
            err_f, err_plan, err_marg = agreement(p, sol, refs[n_used])
            tol_f, tol_plan = TOLERANCES[p.dtype]
            row.update(err_f=err_f, err_plan=err_plan, err_marg=err_marg, tol_f=tol_f, tol_plan=tol_plan)
            finite = all(v is None or math.isfinite(v) for v in (err_f, err_plan, err_marg))
            if c.same_iterates:
                row["agrees"] = bool(finite and err_plan <= tol_plan and (err_f is None or err_f <= tol_f))
            else:
                row["agrees"] = None
        except Exception as exc:  # a failing contender is a row, not a crash
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip()[:400],
                       traceback=st.get("tb") or traceback.format_exc(limit=3)[-1500:])
        st["raw"] = None
        rows.append(row)
    rows.sort(key=lambda r: order.index(r["contender"]))
    base = next((r for r in rows if r["contender"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["baseline"] = BASELINE
        if base is not None and r["status"] == "ok":
            r["speedup"] = base["ms_per_iter"] / r["ms_per_iter"]
            r["speedup_per_call"] = base["median_ms"] * r["n_iters"] / base["n_iters"] / r["median_ms"]
        else:
            r["speedup"] = None
    skipped = [dict(scenario=p.scenario, size=p.label, dtype=p.dtype, contender=n, reason=why)
               for n, why in skipped]
    return rows, skipped
