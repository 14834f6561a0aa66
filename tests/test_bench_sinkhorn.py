"""Smoke test of ``benchmarks/bench_sinkhorn.py`` (and its ``benchmarks/otbench`` package): the
``--quick`` CPU path end to end.

Runs the script as a user would (a subprocess, ``--out`` a temporary folder)
and checks what it writes: a row per contender with finite times, agreement
with the float64 reference within the row's tolerance, and the metadata. No
timing assertion: only that times are positive and finite. A failing contender
must give an error row, not a crash.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_sinkhorn.py"
HAS_POT = importlib.util.find_spec("ot") is not None


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_sinkhorn", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_sinkhorn", mod)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()   # puts benchmarks/ on sys.path: the otbench package imports
from otbench import agreement, contenders, core, naive, report, runner  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)       # the CPU suite never runs Triton
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    files = sorted(out.glob("cpu-*-quick.json"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    return json.loads(files[0].read_text()), files[0], proc.stdout


def test_quick_run_writes_json_markdown_and_metadata(quick_run):
    data, path, stdout = quick_run
    meta = data["meta"]
    for key in ("device", "date", "git_commit", "torch", "triton", "pot", "copy_gbps", "datetime_utc"):
        assert key in meta, key
    assert meta["device_slug"] == "cpu" and path.name == f"cpu-{meta['date']}-quick.json"
    assert meta["torch"] == torch.__version__
    assert math.isfinite(meta["copy_gbps"]) and meta["copy_gbps"] > 0
    md = path.with_suffix(".md").read_text()
    assert "| contender |" in md and "dense" in md
    assert "rows (" in stdout


def test_every_scenario_has_a_row_per_contender(quick_run):
    data, _, _ = quick_run
    groups = report.group_rows(data["rows"])
    assert {g[0] for g in groups} == set(bench.SCENARIOS)
    for key, rows in groups.items():
        names = [r["contender"] for r in rows]
        assert len(names) == len(set(names)), (key, names)
        assert "ot_losses torch" in names, key
        assert core.BASELINE in names, key
        if HAS_POT and key[0] in ("dense", "rect", "swav", "batched") and key[2] in ("f32", "f64"):
            assert "POT torch sinkhorn_log" in names, key
            assert "POT torch exp-domain sinkhorn" in names, key
    dense = {r["contender"] for r in data["rows"] if r["scenario"] == "dense"}
    if HAS_POT:
        assert "POT numpy sinkhorn_log" in dense


def test_rows_have_finite_times_and_the_same_problem(quick_run):
    data, _, _ = quick_run
    for key, rows in report.group_rows(data["rows"]).items():
        assert len({tuple(r["shape"]) for r in rows}) == 1, key
        for r in rows:
            assert r["status"] == "ok", (key, r["contender"], r.get("error"), r.get("traceback"))
            for field in ("median_ms", "p20_ms", "p80_ms", "ms_per_iter", "gbps", "frac_copy_bw"):
                assert math.isfinite(r[field]) and r[field] > 0, (key, r["contender"], field, r[field])
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], (key, r["contender"])
            if os.path.exists("/proc/self/clear_refs"):  # peak memory of one call, its result included
                assert r["peak_mib"] is not None and r["peak_mib"] >= 0, (key, r["contender"])
            if r["contender"] != core.BASELINE:
                assert r["speedup"] is not None and r["speedup"] > 0
            if not r["reduced_iters"]:
                assert r["n_iters"] == rows[0]["n_iters"] or r["inputs"] == "points", (key, r["contender"])


def test_agreement_with_the_float64_reference(quick_run):
    data, _, _ = quick_run
    judged = 0
    for r in data["rows"]:
        assert math.isfinite(r["err_plan"]) and math.isfinite(r["err_marg"]), r["contender"]
        if r["same_iterates"]:
            judged += 1
            assert r["agrees"] is True, (r["scenario"], r["size"], r["dtype"], r["contender"],
                                         r["err_f"], r["err_plan"], r["tol_f"], r["tol_plan"])
            assert r["err_plan"] <= r["tol_plan"]
            if r["err_f"] is not None:
                assert r["err_f"] <= r["tol_f"]
    assert judged >= 20


def test_a_failing_contender_is_an_error_row_not_a_crash(monkeypatch):
    real = contenders.make_contenders

    def with_broken(p, device):
        found, skipped = real(p, device)

        def boom(n_iters):
            raise RuntimeError("deliberately broken contender")
        found["broken"] = core.Contender(fn=boom, solution=lambda raw: {})
        found["wrong answer"] = core.Contender(
            fn=lambda n: naive.naive_sinkhorn(p.cost + 0.3 * torch.rand_like(p.cost), p.a, p.b, p.eps, n),
            solution=lambda fg: {"f": fg[0].double(), "g": fg[1].double()})
        return found, skipped

    monkeypatch.setattr(runner, "make_contenders", with_broken)
    p = bench.make_problem("dense", "40", "f64", torch.device("cpu"), n_iters=10)
    cfg = bench.TimingConfig(budget_s=0.01, max_call_s=0.1, min_repeats=2, max_repeats=2)
    rows, _ = bench.run_problem(p, torch.device("cpu"), cfg, copy_gbps=1.0, only=["naive", "broken", "wrong"])
    by = {r["contender"]: r for r in rows}
    assert by["broken"]["status"] == "error"
    assert "deliberately broken contender" in by["broken"]["error"]
    assert by[core.BASELINE]["status"] == "ok" and by[core.BASELINE]["agrees"] is True
    assert by["wrong answer"]["status"] == "ok" and by["wrong answer"]["agrees"] is False


def test_pot_runs_our_iterates_on_the_transposed_problem():
    if not HAS_POT:
        pytest.skip("POT not installed")
    p = bench.make_problem("rect", "13x29", "f64", torch.device("cpu"), n_iters=7)
    found, _ = contenders.make_contenders(p, torch.device("cpu"))
    ref = agreement.reference(p, 7)
    for name in ("POT numpy sinkhorn_log", "POT torch sinkhorn_log", "POT torch exp-domain sinkhorn"):
        c = found[name]
        err_f, err_plan, _ = agreement.agreement(p, c.solution(c.fn(7)), ref)
        assert err_f < 1e-12 and err_plan < 1e-12, (name, err_f, err_plan)


def test_cli_rejects_unknown_scenario_and_dtype():
    with pytest.raises(SystemExit, match="unknown"):
        bench.build_plan(bench.parse_args(["--scenario", "nope"]), torch.device("cpu"))
    with pytest.raises(SystemExit, match="unknown"):
        bench.build_plan(bench.parse_args(["--dtype", "f8"]), torch.device("cpu"))
    args = bench.parse_args(["--scenario", "dense", "--sizes", "64,32x48", "--dtype", "f32"])
    plan = bench.build_plan(args, torch.device("cpu"))
    assert plan == [("dense", "64", "f32"), ("dense", "32x48", "f32")]


def test_check_suite_plan_is_the_issue_shapes_in_priority_order():
    from otbench.scenarios import CHECK_SUITE, SCENARIOS
    plan = bench.build_plan(bench.parse_args(["--check"]), torch.device("cpu"))
    assert plan == [(sc, s, d) for sc, sizes, dtypes in CHECK_SUITE for s in sizes for d in dtypes]
    assert plan[0] == ("dense", "4096", "f32") and ("batched", "64x256x256", "f32") in plan
    assert {sc for sc, _, _ in plan} == {"dense", "lowp", "swav", "batched", "unbalanced", "partial", "multi"}
    # --quick keeps the suite's scenarios and order at their quick sizes (the CPU dry run of gpu_check.sh)
    quick = bench.build_plan(bench.parse_args(["--check", "--quick"]), torch.device("cpu"))
    expected = [(sc, s, d) for sc, _, _ in CHECK_SUITE
                for s in SCENARIOS[sc].quick_sizes for d in SCENARIOS[sc].quick_dtypes]
    assert quick == expected
    with pytest.raises(SystemExit):
        bench.parse_args(["--time-budget", "0"])
