"""The data-parallel example runs as the README shows it: ``torchrun --nproc_per_node=2`` on CPU (gloo)."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU, process groups")
def test_ddp_example_trains_on_two_processes():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [torchrun, "--standalone", "--nproc_per_node=2", "examples/ddp_train.py", "--steps", "3",
               "--global-batch", "32"]
    # A session of its own, so that a timeout also ends the workers torchrun started.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the example did not finish within 120 s:\n{stdout[-2000:]}{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "held-out retrieval" in stdout and "2 process(es)" in stdout, stdout
