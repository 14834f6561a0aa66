"""``benchmarks/gpu_check.sh``, as far as a CPU allows: its ``--dry-run`` end to end.

The dry run takes the GPU script's every step with CPU stand-ins (nothing is
installed, the CUDA tests are collected and skip, the benchmark runs its
``--check`` suite at ``--quick`` sizes on the CPU) and writes into a temporary
folder; it takes well under a minute on a 2-core machine.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _env(tmp_path, wheels):
    env = dict(os.environ, PYTHON=sys.executable, OT_LOSSES_WHEELS=str(wheels), TMPDIR=str(tmp_path))
    env.pop("GPU_CHECK_DRY_RUN", None)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, wheels = tmp / "out", tmp / "wheels"
    wheels.mkdir()
    # A wheel that cannot install: its package is reported and skipped, never fatal.
    (wheels / "flash_sinkhorn-0.0.0-py3-none-any.whl").write_bytes(b"not a zip")
    proc = subprocess.run([BASH, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp), env=_env(tmp, wheels))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout, out


def test_dry_run_writes_tables_test_log_and_environment(dry_run):
    stdout, out = dry_run
    assert "gpu_check: OK (dry run)" in stdout
    (table,) = out.glob("cpu-*-check-quick.json")
    stem = table.name[:-len(".json")]
    for suffix in (".md", "-env.txt", "-tests.txt"):
        assert (out / f"{stem}{suffix}").is_file(), suffix
    data = json.loads(table.read_text())
    assert data["meta"]["check"] and data["meta"]["quick"]
    scenarios = {"dense", "lowp", "swav", "batched", "unbalanced", "partial", "multi"}
    assert {r["scenario"] for r in data["rows"]} == scenarios
    env = (out / f"{stem}-env.txt").read_text()
    assert f"torch: {torch.__version__}" in env and "TRITON_INTERPRET='0'" in env


def test_dry_run_runs_the_feature_cost_benchmark(dry_run):
    stdout, out = dry_run
    (table,) = out.glob("points-cpu-*-quick.json")
    rows = json.loads(table.read_text())["rows"]
    assert {r["contender"] for r in rows} == {"features", "dense"}
    assert all("error" not in r and r["err"] < 1e-4 for r in rows), rows
    assert "feature costs: 2 rows; FeatureCost rows: 1, all ran and agree" in stdout


def test_dry_run_collects_the_cuda_tests_and_they_skip(dry_run):
    stdout, out = dry_run
    (log,) = out.glob("*-tests.txt")
    text = log.read_text()
    assert " skipped" in text and " failed" not in text and " error" not in text
    assert "needs a CUDA device" in text
    assert "CUDA tests: skipped (no CUDA device)" in stdout


def test_dry_run_reports_missing_packages_without_failing(dry_run):
    stdout, _ = dry_run
    assert "would run" in stdout and "pip install --no-index --no-deps --no-build-isolation -e ." in stdout
    if importlib.util.find_spec("flash_sinkhorn") is None:
        assert "flash-sinkhorn: its wheel in" in stdout and "does not install offline" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_a_gpu_the_real_check_refuses_and_names_the_dry_run(tmp_path):
    proc = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env=_env(tmp_path, tmp_path))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
