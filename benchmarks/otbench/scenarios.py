"""Scenarios and the problems they generate: every contender of a problem solves exactly it."""
import dataclasses
from typing import Optional

import torch

DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str            # balanced | unbalanced | partial | multi | swav
    doc: str
    n_iters: int
    eps: float
    cpu_sizes: tuple     # size labels: "N", "NxM", "BxNxM" (batched), "B" (swav)
    gpu_sizes: tuple
    quick_sizes: tuple
    cpu_dtypes: tuple
    gpu_dtypes: tuple
    quick_dtypes: tuple = ("f32",)


SCENARIOS = {s.name: s for s in [
    Scenario("dense", "balanced", "square dense cost 0.5|x-y|^2 of uniform points in [0,1]^2",
             100, 0.05, ("500", "2000"), ("512", "1024", "2048", "4096", "8192", "16384"),
             ("64",), ("f64", "f32"), ("f32", "f64"), ("f64", "f32")),
    Scenario("rect", "balanced", "rectangular dense cost (M = 4N)",
             100, 0.05, ("400x1600",), ("512x2048", "2048x8192", "4096x16384"),
             ("48x96",), ("f32",), ("f32",)),
    Scenario("swav", "swav", "SwAV normalisation: scores (B, 3000) cosines, cost -S^T, 3 iterations, "
             "output Q = B * plan^T", 3, 0.05, ("256",), ("256", "512", "1024", "2048", "4096"),
             ("32",), ("f32",), ("f32",)),
    Scenario("batched", "balanced", "B independent 256x256 problems in one call",
             100, 0.05, ("16x256x256",), ("64x256x256", "256x256x256", "1024x256x256"),
             ("4x32x32",), ("f32",), ("f32",)),
    Scenario("unbalanced", "unbalanced", "KL-relaxed marginals, reach rho = 1 (cost units), masses 1 vs 1.5",
             100, 0.05, ("1000",), ("4096", "16384"), ("64",), ("f32",), ("f32",)),
    Scenario("partial", "partial", "entropic partial OT (Bregman/Dykstra), mass 0.5 of 1",
             100, 0.05, ("400",), ("1024", "4096"), ("64",), ("f64",), ("f32", "f64")),
    Scenario("multi", "multi", "multi-assignment (Multi-SK): cost -0.75*S, M=64 anchors, k=32, eps 0.07",
             20, 0.07, ("1000x64",), ("5716x64", "20000x256"), ("64x16",), ("f32",), ("f32",)),
    Scenario("lowp", "balanced", "half-precision cost storage (fp16/bf16), fp32 accumulation",
             100, 0.05, ("1000",), ("4096", "16384"), ("64",), ("bf16",), ("f16", "bf16"),
             ("bf16",)),
]}

# The short GPU suite of benchmarks/gpu_check.sh (bench_sinkhorn.py --check): the shapes the GPU
# targets are stated at, in the order they are worth having when a time budget cuts the run short.
CHECK_SUITE = (
    ("dense", ("4096", "8192", "16384"), ("f32",)),
    ("lowp", ("8192",), ("bf16",)),
    ("swav", ("256", "1024", "4096"), ("f32",)),
    ("batched", ("64x256x256",), ("f32",)),
    ("unbalanced", ("4096",), ("f32",)),
    ("partial", ("4096",), ("f32",)),
    ("multi", ("5716x64",), ("f32",)),
)


@dataclasses.dataclass
class Problem:
    """One benchmark problem: every contender of its rows solves exactly this."""
    scenario: str
    kind: str
    label: str
    dtype: str
    eps: float
    n_iters: int
    cost: torch.Tensor            # (N, M) or (B, N, M) in `dtype`, on the device
    cost64: torch.Tensor          # the same values in float64 (reference input)
    a: torch.Tensor               # (N,) compute dtype
    b: torch.Tensor               # (M,)
    reach: Optional[float] = None
    mass: Optional[float] = None
    k: Optional[float] = None
    points: Optional[tuple] = None   # (x, y) when cost = 0.5|x - y|^2
    scores: Optional[torch.Tensor] = None  # swav: (B, K) cosines; cost = -scores.T

    @property
    def shape(self):
        return tuple(self.cost.shape)

    @property
    def compute_dtype(self):
        return torch.float64 if self.cost.dtype == torch.float64 else torch.float32

    @property
    def bytes_per_iter(self):
        # One Sinkhorn iteration = a row and a column half-step: two full reads of the cost.
        return 2 * self.cost.numel() * self.cost.element_size()


def parse_size(label):
    return tuple(int(v) for v in label.lower().split("x"))


def _uniform_points(n, m, gen, device, batch=None):
    shape_x = (n, 2) if batch is None else (batch, n, 2)
    shape_y = (m, 2) if batch is None else (batch, m, 2)
    x = torch.rand(shape_x, generator=gen, dtype=torch.float64).to(device)
    y = torch.rand(shape_y, generator=gen, dtype=torch.float64).to(device)
    return x, y


def _sq_dist_half(x, y):
    # 0.5 |x - y|^2 (GeomLoss' p=2 cost), exact enough and without an (N, M, 2) temporary.
    xx = (x * x).sum(-1).unsqueeze(-1)
    yy = (y * y).sum(-1).unsqueeze(-2)
    return (0.5 * (xx + yy - 2 * x @ y.transpose(-1, -2))).clamp_min(0)


def _cosines(n, m, dim, gen, device):
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(device)
    c = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device)
    z = z / z.norm(dim=1, keepdim=True)
    c = c / c.norm(dim=1, keepdim=True)
    return z @ c.T


def make_problem(scenario, label, dtype, device, n_iters=None, seed=0):
    """Build the problem of one (scenario, size, dtype) cell; cost in ``dtype`` on ``device``."""
    sc = SCENARIOS[scenario]
    gen = torch.Generator().manual_seed(seed)
    dims = parse_size(label)
    tdtype = DTYPES[dtype]
    compute = torch.float64 if tdtype == torch.float64 else torch.float32
    extra = {}
    if sc.kind == "swav":
        (batch,) = dims[:1]
        scores = _cosines(batch, 3000 if len(dims) == 1 else dims[1], 128, gen, device)
        cost64 = -scores.T                       # (K, B): prototypes are the rows, updated first
        extra["scores"] = scores.to(tdtype)
    elif sc.kind == "multi":
        n, m = dims
        cost64 = -0.75 * _cosines(n, m, 64, gen, device)
        extra["k"] = float(m // 2)
    elif len(dims) == 3:
        bsz, n, m = dims
        x, y = _uniform_points(n, m, gen, device, batch=bsz)
        cost64 = _sq_dist_half(x, y)
        extra["points"] = (x, y)
    else:
        n, m = (dims[0], dims[0]) if len(dims) == 1 else dims
        x, y = _uniform_points(n, m, gen, device)
        cost64 = _sq_dist_half(x, y)
        extra["points"] = (x, y)
    cost = cost64.to(tdtype).contiguous()
    cost64 = cost.to(torch.float64)              # reference sees exactly the stored values
    n, m = cost.shape[-2:]
    a = torch.full((n,), 1.0 / n, dtype=compute, device=device)
    b = torch.full((m,), 1.0 / m, dtype=compute, device=device)
    if sc.kind == "unbalanced":
        b = b * 1.5
        extra["reach"] = 1.0
    if sc.kind == "partial":
        extra["mass"] = 0.5
    if extra.get("points") is not None:
        extra["points"] = tuple(p.to(compute) for p in extra["points"])
    return Problem(scenario=scenario, kind=sc.kind, label=label, dtype=dtype, eps=sc.eps,
                   n_iters=n_iters or sc.n_iters, cost=cost, cost64=cost64, a=a, b=b, **extra)
