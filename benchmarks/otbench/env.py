"""The environment of a benchmark run: this checkout importable, optional packages, device, versions."""
import importlib
import importlib.metadata
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


# Optional packages of the tests and benchmarks: import name -> distribution name.
OPTIONAL = {"ot": "POT", "hypothesis": "hypothesis", "pytest": "pytest", "xdist": "pytest-xdist",
            "rich": "rich", "matplotlib": "matplotlib", "flash_sinkhorn": "flash-sinkhorn",
            "geomloss": "geomloss", "numpy": "numpy", "scipy": "scipy"}


def installed_version(module):
    """The installed version of an optional package (``None`` when it is absent)."""
    if not has_module(module):
        return None
    try:
        return importlib.metadata.version(OPTIONAL.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return version_of(module)


def environment_report(device):
    """Lines naming the device, driver, torch / CUDA / triton versions and optional packages."""
    name, _ = device_info(device)
    lines = [f"device: {name}"]
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        lines.append(f"  compute capability {prop.major}.{prop.minor}, {prop.multi_processor_count} SMs, "
                     f"{prop.total_memory / 2**30:.1f} GiB")
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            driver = ""
        lines.append(f"  driver: {driver.splitlines()[0] if driver else 'unknown (no nvidia-smi)'}")
    lib = importlib.util.find_spec("ot_losses")
    cudnn = torch.backends.cudnn.version()
    lines += [f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn})",
              f"triton: {version_of('triton')}",
              f"python: {platform.python_version()} ({sys.executable})",
              f"ot_losses: {version_of('ot_losses')} from {Path(lib.origin).parent if lib else None}",
              f"git commit: {git_commit()}",
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}",
              "optional packages: " + ", ".join(f"{dist} {installed_version(m) or '-'}"
                                                for m, dist in OPTIONAL.items())]
    return lines
