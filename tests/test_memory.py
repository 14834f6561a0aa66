"""Peak memory of dense solves on CPU: at most one N x M buffer beyond the caller's cost.

Each case runs in a fresh process with a fixed glibc mmap threshold (every
freed buffer goes back to the system at once), and reads the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) around
the call: the growth is what the solve held at its peak. A 2000 x 2000
fp32 buffer is 15.3 MiB; ``.plan`` must not add another (the solve's
cached kernel becomes the plan). Multi-assignment returns its N x M
assignment: that is its one buffer, its steps' temporaries are row blocks.
``swav_targets`` takes scores, not a cost: the cost ``-S^T`` is a second
buffer, and its targets ``Q = N plan^T`` are formed in the kernel's buffer.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, sys, types, torch
    import ot_losses as lib
    from ot_losses.losses import swav_targets

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def reset():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    torch.set_num_threads(1)
    n, kind = int(sys.argv[1]), sys.argv[2]
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    if kind == "offsets":
        cost += 1e4
    if kind == "bf16":
        cost = cost.bfloat16()
    calls = {
        "balanced": lambda c: lib.sinkhorn(c, eps=0.05, n_iters=200, tol=1e-6),
        "offsets": lambda c: lib.sinkhorn(c, eps=0.05, n_iters=50),
        "bf16": lambda c: lib.sinkhorn(c, eps=0.05, n_iters=50),
        "small_eps": lambda c: lib.sinkhorn(c, eps=1e-3, n_iters=30),
        "swav": lambda c: lib.sinkhorn(c, eps=0.05, n_iters=3),
        "unbalanced": lambda c: lib.sinkhorn(c, eps=0.05, n_iters=50, reach=1.0),
        "bregman": lambda c: lib.partial_ot(c, mass=0.5, eps=0.05, n_iters=50),
        "dummy": lambda c: lib.partial_ot(c, mass=0.5, eps=0.05, n_iters=50, method="dummy"),
        "multi": lambda c: lib.multi_assignment_sinkhorn(c, 10, eps=0.05, n_iters=20),
        # c as scores: the solve's cost -c^T is a buffer of its own, Q is formed in the kernel's
        "swav_targets": lambda c: types.SimpleNamespace(plan=swav_targets(c, n_iters=3)[0]),
    }
    solve = calls[kind]
    solve(cost[:40, :40].contiguous())   # warm-up: libraries, allocator
    buffer = n * n * 4
    base = status("VmRSS:")
    reset()
    res = solve(cost)
    peak_solve = status("VmHWM:") - base
    kept = status("VmRSS:") - base
    plan = res.assignment if kind == "multi" else res.plan
    peak_plan = status("VmHWM:") - base
    print(json.dumps({"solve": peak_solve / buffer, "kept": kept / buffer, "plan": peak_plan / buffer,
                      "finite": bool(torch.isfinite(plan).all())}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["balanced", "offsets", "bf16", "small_eps", "swav", "unbalanced",
                                  "bregman", "dummy", "multi", "swav_targets"])
def test_dense_solve_holds_one_buffer(kind):
    env = dict(os.environ, TRITON_INTERPRET="0", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, "2000", kind], capture_output=True, text=True,
                         env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"]
    # one fp32 N x M buffer (the cached kernel; multi: the assignment it returns), plus O(N + M)
    # vectors and block temporaries
    extra = 1.0 if kind == "swav_targets" else 0.0  # its cost, -S^T
    assert got["solve"] < 1.3 + extra, f"solve peaked at {got['solve']:.2f} buffers beyond the cost"
    assert got["kept"] < 1.1, f"the result keeps {got['kept']:.2f} buffers"
    assert got["plan"] < 1.3 + extra, f".plan peaked at {got['plan']:.2f} buffers beyond the cost"
