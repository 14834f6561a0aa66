"""Shared test configuration.

TRITON_INTERPRET must be set before triton's ``@jit`` decorators run, i.e.
before ``ot_losses.kernels`` is imported, so that the kernel tests run on CPU.
An explicit ``TRITON_INTERPRET=0`` is kept: on a GPU machine,
``TRITON_INTERPRET=0 python -m pytest -m cuda`` compiles the kernels for the
device instead of interpreting them (``benchmarks/gpu_check.sh`` does this).

CUDA tests carry the ``cuda`` marker (``@requires_cuda``), so that one
expression, ``-m cuda``, selects all of them; without a CUDA device they skip.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite is thousands of tiny problems: one intra-op thread avoids the
# thread-pool overhead that dominates them on small CPU machines.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.cuda


def pytest_collection_modifyitems(config, items):
    # The marker is the single source of truth: a test marked cuda (by decorator, pytestmark or a
    # parametrize mark) skips without a device, and `-m cuda` selects exactly those tests.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "")
    device = torch.cuda.get_device_name() if HAS_CUDA else "none"
    mode = "interpreted on the host" if interp not in ("", "0") else "compiled for the device"
    return f"ot_losses: CUDA device {device}; TRITON_INTERPRET={interp!r} (Triton kernels {mode})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
