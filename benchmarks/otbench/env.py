"""The environment of a benchmark run: this checkout importable, optional packages, device, versions."""
import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# Benchmark this checkout's ot_losses, whatever (or however stale) the installed copy is.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def has_module(module):
    return importlib.util.find_spec(module) is not None


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = has_module("triton")
HAS_POT = has_module("ot")
HAS_GEOMLOSS = has_module("geomloss")
HAS_FLASH = has_module("flash_sinkhorn")
HAS_RICH = has_module("rich")
HAS_MPL = has_module("matplotlib")


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_info(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slugify(name)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})", "cpu"


def git_commit(short=False):
    """``HEAD``'s sha and ``-dirty`` when the tree is modified (``short``: abbreviated sha only)."""
    try:
        if short:
            return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           stderr=subprocess.DEVNULL).decode().strip()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


def version_of(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None
