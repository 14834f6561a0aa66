"""Smoke test of ``benchmarks/bench_points.py``: the ``--quick`` CPU path end to end.

Runs the script as a user would (a subprocess, ``--out`` a temporary
folder; the dot kind only, whose GeomLoss row is skipped, to stay fast) and
checks what it writes: one row per contender with a positive time, a peak
memory and a value that agrees with the converged float64 reference; a
contender that cannot run is a ``skipped`` row, not a crash. No timing
assertion.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_points.py"


def test_quick_run_writes_rows(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    args = ["--quick", "--device", "cpu", "--kinds", "dot", "--contenders",
            "features,dense,geomloss,flash-sinkhorn", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("points-cpu-*-quick.json")
    report = json.loads(path.read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["torch"]
    rows = {(r["kind"], r["contender"]): r for r in report["rows"]}
    assert len(rows) == 4
    assert "skipped" in rows[("dot", "geomloss")]     # no dot cost there: a row saying so, no subprocess
    assert "skipped" in rows[("dot", "flash-sinkhorn")]
    for name in ("features", "dense"):
        row = rows[("dot", name)]
        assert "error" not in row, row
        assert row["time_s"] > 0 and math.isfinite(row["time_s"])
        assert row["peak_bytes"] is None or row["peak_bytes"] >= 0
        assert row["err"] < 1e-4, row       # 100 iterations at eps 0.1: converged to fp32 rounding
    assert path.with_suffix(".md").exists()
    assert f"wrote {path}" in proc.stdout
