"""Backend resolution: which namespace of half-steps a solver runs with.

``"torch"``: ``solvers/_torch_steps`` (reference maths), accelerated on the
balanced/unbalanced/partial problems by ``solvers/_scaling`` (same iterates).
``"triton"``: ``kernels/lse_steps`` (same function names and signatures).
``"auto"``: triton for CUDA tensors when triton imports, torch otherwise.
"""
import importlib.util
import os

BACKENDS = ("auto", "torch", "triton")


def triton_available():
    """True when the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend, device):
    """Map ``backend`` and the tensors' device to ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: ``backend`` unknown, or ``"triton"`` where it cannot run
            (triton missing, or a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton'; got {backend!r}")
    if backend == "torch":
        return "torch"
    can_run = triton_available() and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))
    if backend == "auto":
        return "triton" if can_run and device.type == "cuda" else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; got no importable triton "
                         "(pip install 'ot_losses[triton]', or use backend='torch')")
    if not can_run:
        raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors under "
                         f"TRITON_INTERPRET=1; got tensors on {device} without TRITON_INTERPRET=1")
    return "triton"


def get_steps(name):
    """The half-step namespace of a resolved backend name."""
    if name == "triton":
        from .kernels import lse_steps
        return lse_steps
    from .solvers import _torch_steps
    return _torch_steps
