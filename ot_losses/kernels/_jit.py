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


@triton.jit
def _row_block(R, n_rblocks, BLOCK_R: tl.constexpr):
    """This program's problem ``b`` and its ``BLOCK_R`` output rows (int64 offsets, and their mask)."""
    pid = tl.program_id(0)
    b = (pid // n_rblocks).to(tl.int64)
    rows = (pid % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    return b, rows.to(tl.int64), rows < R
