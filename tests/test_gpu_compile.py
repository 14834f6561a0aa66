"""Every Triton kernel compiles for a GPU, checked on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how the other kernel tests run on
CPU) executes kernels as Python: it accepts code that the GPU compiler
rejects, e.g. a kernel reading a plain Python global. Here the solvers run
under the interpreter while every launch's argument types and constexprs
are recorded; a subprocess without the interpreter then compiles each
distinct launch with Triton's own pipeline for an sm_90 target (an H100/
H200) down to a cubin (Triton ships ``ptxas``; no driver is needed).
"""
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import ot_losses  # noqa: E402
from ot_losses import FeatureCost, multi_assignment_sinkhorn, partial_ot, sinkhorn  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="records launches under the interpreter")

KERNEL_MODULES = ("ot_losses.kernels.lse_steps", "ot_losses.kernels.plan", "ot_losses.kernels.feature_lse")
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Constexprs that only the interpreter sets: the device build takes the other branch.
DEVICE_CONSTEXPRS = {"UPCAST": False}

COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
failures = []
for spec in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    try:
        out = triton.compile(ASTSource(kernel, spec["signature"], spec["constexprs"]), target=target,
                             options=spec["options"])
        assert out.asm.get("cubin"), "no cubin"
    except Exception as e:
        failures.append(f"{spec['name']} {spec['constexprs']}: {type(e).__name__}: {e}")
print(json.dumps(failures))
"""


def _launched_kernels():
    """Names of the module-level kernels (``*_kernel``) that the launchers call."""
    names = set()
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        names |= {(mod, n) for n, _ in inspect.getmembers(m) if n.endswith("_kernel")}
    return names


@pytest.fixture
def recorded(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    specs = {}
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        bound = inspect.signature(self.fn).bind(
            *args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
        signature, constexprs = {}, {}
        for name, param in inspect.signature(self.fn).parameters.items():
            value = bound.arguments.get(name, param.default)
            if param.annotation is not inspect.Parameter.empty and "constexpr" in str(param.annotation):
                signature[name] = "constexpr"
                value = value.value if isinstance(value, triton.language.constexpr) else value
                constexprs[name] = DEVICE_CONSTEXPRS.get(name, value)
            else:
                signature[name] = mangle_type(value)
        spec = dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature,
                    constexprs=constexprs, options=options)
        specs[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return specs


def _drive():
    """One call per kernel variant: dense, fused small, shifted, unbalanced, partial, multi, features."""
    g = torch.Generator().manual_seed(0)
    kw = dict(n_iters=3, tol=None, backend="triton")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        c = torch.rand(150, 170, generator=g).to(dtype)
        r = sinkhorn(c, eps=0.1, **kw)
        r.plan, r.value, r.log_plan
        sinkhorn(c[:12, :9], eps=0.1, **kw).plan                    # fused single-launch kernel
    sinkhorn(torch.rand(150, 170, generator=g) + 1e5, eps=0.1, **kw)  # row and column offsets, streaming
    c = torch.rand(40, 60, generator=g)
    sinkhorn(c + 1e5, eps=0.1, **kw).plan                           # cost offsets
    sinkhorn(c, torch.full((40,), 1 / 40), torch.full((60,), 1.5 / 60), eps=0.1, reach=1.0, **kw).value
    sinkhorn(c.expand(2, 40, 60), eps=0.1, **kw).plan
    sinkhorn(c + 1e5, torch.full((40,), 1 / 40), torch.full((60,), 1.5 / 60), eps=0.1, reach=1.0,
             **kw).plan                                             # damped update with its offset term
    for method in ("bregman", "dummy"):
        partial_ot(c, mass=0.5, eps=0.1, method=method, **kw).plan
        partial_ot(c + 1e5, mass=0.5, eps=0.1, method=method, **kw).plan
    multi_assignment_sinkhorn(-c[:, :8], 2, eps=0.1, **kw).assignment
    multi_assignment_sinkhorn(1e5 - c[:, :8], 2, eps=0.1, **kw).assignment
    for dtype in (torch.float32, torch.bfloat16):
        x, y = torch.randn(30, 20, generator=g).to(dtype), torch.randn(25, 20, generator=g).to(dtype)
        for kind in ("sqeuclidean", "dot"):
            r = sinkhorn(FeatureCost(x, y, kind=kind), eps=0.5, **kw)
            r.value
        multi_assignment_sinkhorn(FeatureCost(x, y[:6], kind="dot"), 2, eps=0.5, **kw).assignment


def test_every_kernel_compiles_for_sm90(recorded):
    _drive()
    specs = list(recorded.values())
    launched = {(s["module"], s["name"]) for s in specs}
    assert launched == _launched_kernels(), "every kernel is driven at least once"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(ot_losses.__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
