"""``@triton.jit`` helpers shared by the step and plan kernels."""
import triton
import triton.language as tl


@triton.jit
def _no_mass(z):
    """NaN (``inf - inf``: a forbidden entry meeting an infinite potential) -> ``-inf``: no mass."""
    return tl.where(z != z, float("-inf"), z)


@triton.jit
def _shifted(c, r, s):
    """``c - r - s`` with the rounding error of ``c - r`` added back (TwoSum); +inf stays +inf."""
    t = c - r
    back = t - c
    err = (c - (t - back)) - (r + back)
    return tl.where(c == float("inf"), c, (t - s) + err)
