"""Triton backend: log-domain half-steps (``lse_steps``) and plan kernels (``plan``).

``lse_steps`` exposes the same names and signatures as
``ot_losses.solvers._torch_steps``; ``_backend.get_steps("triton")`` returns it.
Importing this package does not import triton; its submodules do.

The launchers share the operand check below: kernels never validate, launchers
raise ``ValueError`` before launching on a size, dtype, device or layout they
do not support (user-facing checks live in ``ot_losses._validate``).
"""
import contextlib
import os

import torch

COST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPUTE_DTYPES = (torch.float32, torch.float64)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_operands(cost, rows=(), cols=(), batch=()):
    """Check a launch: cost (B, N, M); ``rows`` (B, N), ``cols`` (B, M), ``batch`` (B,).

    ``rows``/``cols``/``batch`` are ``(name, tensor)`` pairs; the first of rows+cols
    fixes the compute dtype (fp32 or fp64), which every potential must share.
    Any strides are accepted (including 0 and transposed views). Returns the
    compute dtype.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape (B, N, M); got {tuple(cost.shape)}")
    if cost.dtype not in COST_DTYPES:
        raise ValueError(f"cost must be float16, bfloat16, float32 or float64; got {cost.dtype}")
    B, N, M = cost.shape
    if B == 0 or N == 0 or M == 0:
        raise ValueError(f"cost must have non-empty B, N, M; got {tuple(cost.shape)}")
    device = cost.device
    if device.type == "cpu" and not _interpreting():
        raise ValueError("triton kernels run on CUDA tensors, or on CPU tensors under "
                         "TRITON_INTERPRET=1; got CPU tensors without TRITON_INTERPRET=1")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"triton kernels run on CUDA (or interpreted CPU) tensors; got {device}")
    named = [(n, t, (B, N)) for n, t in rows] + [(n, t, (B, M)) for n, t in cols]
    named += [(n, t, (B,)) for n, t in batch]
    if not named:
        return None
    dtype = named[0][1].dtype
    for name, t, shape in named:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for cost of shape "
                             f"{tuple(cost.shape)}; got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on the device of cost ({device}); got {t.device}")
        if t.dtype not in COST_DTYPES:
            raise ValueError(f"{name} must be a floating tensor; got {t.dtype}")
    for name, t, _ in named[: len(rows) + len(cols)]:
        if t.dtype not in COMPUTE_DTYPES or t.dtype != dtype:
            raise ValueError(f"{name} must be float32 or float64, with the dtype of the other "
                             f"potentials ({dtype}); got {t.dtype}")
    return dtype


def _full_shift(cost, shift):
    """A cost shift as two tensors: ``(r, s)``, with zero column offsets for ``(r, None)``; or None."""
    if shift is None or shift[1] is not None:
        return shift
    r = shift[0]
    return r, torch.zeros((), dtype=r.dtype, device=r.device).expand(cost.shape[0], cost.shape[2])


def _device_of(t):
    """Context that makes ``t``'s CUDA device current: triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
