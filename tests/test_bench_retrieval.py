"""Smoke test of benchmarks/bench_retrieval.py --quick (writes into a tmp dir)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_retrieval.py")

pytest.importorskip("sklearn")


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--out-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert result["quick"] is True
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"infonce", "swamp", "swamp+infonce", "l2rm", "multisk+infonce"}
    assert {r["mismatch_rate"] for r in result["rows"]} == {0.0, 0.5}
    for row in result["rows"]:
        for key in ("a2b_R@1", "a2b_R@5", "a2b_R@10", "b2a_R@1", "b2a_R@5", "b2a_R@10"):
            mean, std = row[key]
            assert 0.0 <= mean <= 100.0 and std >= 0.0
        assert row["a2b_R@1"][0] <= row["a2b_R@5"][0] <= row["a2b_R@10"][0]
        assert abs(row["rsum"][0] - sum(row[k][0] for k in row if "R@" in k)) < 1e-6
        assert row["sec_per_epoch"][0] > 0
    md = (tmp_path / "retrieval.md").read_text()
    assert "| mismatch | method |" in md and "QUICK" in md
