"""Timers: CPU ``perf_counter`` with interleaved repeats, CUDA ``do_bench``; copy bandwidth; peak memory."""
import ctypes
import dataclasses
import os
import time
import traceback

import numpy as np
import torch

from .env import HAS_TRITON


@dataclasses.dataclass
class TimingConfig:
    budget_s: float        # target timed seconds per contender (repeats adapt to it)
    max_call_s: float      # a can_reduce contender slower than this runs fewer iterations
    min_repeats: int
    max_repeats: int


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe_cpu(fn, n_iters, cfg: TimingConfig, can_reduce):
    """Warm-up call (a few iterations); returns (n_iters to time, number of timed repeats)."""
    probe_iters = min(n_iters, 5)
    t0 = time.perf_counter()
    fn(probe_iters)                              # warm-up (allocator, lazy imports, caches)
    per_iter = (time.perf_counter() - t0) / probe_iters
    n_used = n_iters
    if can_reduce and per_iter * n_iters > cfg.max_call_s:
        n_used = max(probe_iters, int(cfg.max_call_s / per_iter))
        if n_used >= 10:
            n_used -= n_used % 10                # POT checks its error every 10 iterations
    est = per_iter * n_used
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, cfg.budget_s / max(est, 1e-9))))
    return n_used, repeats


def time_cpu_interleaved(contenders, n_iters, cfg: TimingConfig, progress=None):
    """``perf_counter`` around each call, in rounds: one call of every contender per round.

    On a shared machine the load changes over seconds; interleaving makes every
    contender of a problem see the same conditions, so their ratios stay meaningful.
    Returns ``name -> dict(times, n_used, raw, error)``.
    """
    state = {}
    for name, c in contenders.items():
        if progress:
            progress(f"warm-up {name}")
        try:
            n_used, repeats = probe_cpu(c.fn, n_iters, cfg, c.can_reduce)
            state[name] = dict(times=[], n_used=n_used, repeats=repeats, raw=None, error=None)
        except Exception as exc:
            state[name] = dict(times=[], n_used=n_iters, repeats=0, raw=None, error=exc,
                               tb=traceback.format_exc(limit=3)[-1500:])
    rounds = max([st["repeats"] for st in state.values()] + [0])
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        for name, c in contenders.items():
            st = state[name]
            if st["error"] is not None or len(st["times"]) >= st["repeats"]:
                continue
            try:
                t0 = time.perf_counter()
                st["raw"] = c.fn(st["n_used"])
                st["times"].append(time.perf_counter() - t0)
            except Exception as exc:
                st["error"], st["tb"] = exc, traceback.format_exc(limit=3)[-1500:]
    return state


def time_cuda(fn, n_iters, cfg: TimingConfig, can_reduce, device):
    """``triton.testing.do_bench`` (median, 20th, 80th percentile); CUDA events for calls > 0.5 s.

    Returns (times_s, n_iters_used, last_raw, is_quantiles): ``times_s`` is the
    (median, p20, p80) triple when ``is_quantiles``, else the per-repeat times.
    """
    torch.cuda.synchronize()
    probe_iters = min(n_iters, 5)
    fn(probe_iters)                              # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(probe_iters)
    torch.cuda.synchronize()
    per_iter = (time.perf_counter() - t0) / probe_iters
    n_used = n_iters
    if can_reduce and per_iter * n_iters > cfg.max_call_s:
        n_used = max(probe_iters, int(cfg.max_call_s / per_iter))
    est_ms = 1e3 * per_iter * n_used
    raw = fn(n_used)
    torch.cuda.synchronize()
    if HAS_TRITON and est_ms < 500:
        # do_bench spends ~5 calls estimating before it times; long calls use events x3 instead.
        from triton.testing import do_bench
        rep = max(3 * est_ms, min(1e3 * cfg.budget_s, cfg.max_repeats * est_ms))
        q = do_bench(lambda: fn(n_used), warmup=max(1.0, est_ms), rep=rep, quantiles=[0.5, 0.2, 0.8])
        return [v / 1e3 for v in q], n_used, raw, True
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, 1e3 * cfg.budget_s / max(est_ms, 1e-6))))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        raw = fn(n_used)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times, n_used, raw, False


def copy_bandwidth(device, nbytes=None):
    """Device copy bandwidth in GB/s, counting bytes read + bytes written (``dst.copy_(src)``)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        if HAS_TRITON:
            from triton.testing import do_bench
            ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        else:
            ts = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                dst.copy_(src)
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            ms = float(np.median(ts))
        sec = ms / 1e3
    else:
        dst.copy_(src)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        sec = float(np.median(ts))
    return 2 * nbytes / sec / 1e9


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


_CPU_PEAK = os.path.exists("/proc/self/clear_refs")
try:
    _LIBC = ctypes.CDLL("libc.so.6") if _CPU_PEAK else None
except OSError:
    _CPU_PEAK, _LIBC = False, None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _while_held(result, read):
    """``read()`` while ``result`` (a call's output, counted in its peak) is still referenced."""
    return read()


def _cpu_peak(fn, n_iters):
    """RSS high-water mark of one call, beyond the RSS before it (glibc; see :func:`peak_memory`)."""
    # During the call, blocks over 128 KiB are mapped and unmapped on free, so the high-water
    # mark is live memory, not freed blocks the heap kept. Only here: unmapping every temporary
    # costs page faults (SwAV's loop runs 2.5x slower), so the timings run with the thresholds a
    # warm process reaches on its own (glibc raises them up to 32 MiB as large blocks are freed).
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    _LIBC.malloc_trim(0)  # free heap pages the timings left resident would hide new allocations
    try:
        base = _status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        peak = _while_held(fn(n_iters), lambda: _status("VmHWM:") - base)
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    return max(peak, 0)


def peak_memory(fn, n_iters, device):
    """Bytes one call of ``fn(n_iters)`` holds at its peak beyond what existed before (result included).

    CUDA: the allocator's peak. CPU (Linux): the resident-set high-water mark
    (reset through ``/proc/self/clear_refs``) with a fixed mmap threshold; None elsewhere.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

        def read():
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(device) - base
        return _while_held(fn(n_iters), read)
    if not _CPU_PEAK:
        return None
    return _cpu_peak(fn, n_iters)
