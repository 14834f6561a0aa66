#!/usr/bin/env bash
# One-command GPU validation of ot_losses: on a CUDA machine with torch and triton but no internet,
#   1. installs what the checks need from a directory of wheels (no index), and this checkout (-e .);
#   2. prints and records the GPU, driver, torch, CUDA and triton versions;
#   3. runs every CUDA test (`pytest -m cuda`, Triton kernels compiled: TRITON_INTERPRET=0);
#   4. runs the short GPU benchmark (`bench_sinkhorn.py --check`: dense 4096-16384 fp32, bf16 8192,
#      SwAV shapes, batched 64 x 256^2, unbalanced, partial, multi; POT, flash-sinkhorn and GeomLoss
#      where installed) within the time budget, tables under benchmarks/results/<device>-<date>-check.*;
#   5. runs the feature-cost benchmark (`bench_points.py`: N = M = 4000 and 20000, D = 3 and 64,
#      sqeuclidean; FeatureCost against flash-sinkhorn at the same iterations, and the dense path),
#      tables under benchmarks/results/points-cuda-<date>.*;
#   6. prints a summary; exits 1 if a CUDA test fails or errs, a benchmark crashes, or an ot_losses
#      benchmark row errs or disagrees with the float64 reference.
# The whole run stays under GPU_CHECK_BUDGET seconds (default 480): the benchmark starts no new
# problem once its share is spent and lists the problems it left out.
#
# Usage (from anywhere; it works in the repository root):
#   bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR] [--budget SECONDS]
#     --dry-run  (or GPU_CHECK_DRY_RUN=1) CPU stand-in for CI: installs nothing (shows what it would),
#                the CUDA tests are collected and skip, the benchmark runs --quick on the CPU, and the
#                outputs go to a temporary directory unless --out is given
#     --wheels   wheels directory (default $OT_LOSSES_WHEELS, else wheels/); a package that is neither
#                installed nor there is reported, and the part that needs it is skipped
#     --out      where the tables, the test log and the environment record go (default benchmarks/results)
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET, GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers for the CUDA tests, default 8, 0 for one process).
#
# Preparing the wheels, on a machine with internet, for the GPU machine's Python (`python3 --version`
# there), then copying wheels/ next to the checkout there:
#   bash benchmarks/fetch_wheels.sh --python 3.12 [--no-deps]      # see its --help
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Paths given by the caller are relative to where it stands; the defaults to the repository root.
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
PY=${PYTHON:-python3}
dry_run=${GPU_CHECK_DRY_RUN:-0}
[ "$dry_run" = 0 ] || [ "$dry_run" = 1 ] || dry_run=1
wheels=$(absolute "${OT_LOSSES_WHEELS:-$ROOT/wheels}")
out=""
budget=${GPU_CHECK_BUDGET:-480}
workers=${GPU_CHECK_TEST_WORKERS:-8}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --wheels) wheels=$(absolute "$2"); shift 2 ;;
    --out) out=$(absolute "$2"); shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: the budget must be whole seconds, got $budget" >&2; exit 2; }
cd "$ROOT"
SECONDS=0
# Compiled Triton kernels, not the interpreter (tests/conftest.py keeps an explicit 0); the checkout
# itself is what the tests and the benchmark import, installed or not.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

section() { printf '\n==== [%3ds] %s\n' "$SECONDS" "$*"; }
have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
with_limit() {  # with_limit SECONDS cmd...: a hung GPU job must not outlast the budget
  if command -v timeout >/dev/null; then timeout -k 10 "$@"; else shift; "$@"; fi
}
run_script() {  # run_script SECONDS LOG script args...: prints the command, tees its output to LOG, sets script_rc
  local limit=$1 log=$2
  shift 2
  echo "  $PY $*"
  set +e
  with_limit "$limit" "$PY" "$@" 2>&1 | tee "$log"
  script_rc=${PIPESTATUS[0]}
  set -e
}
joined() { if [ $# -eq 0 ]; then echo nothing; else local IFS=';' s; s="$*"; echo "${s//;/; }"; fi; }
has_wheel() {  # wheel file names spell the project lower-case, '_' for '-'
  local f name
  for f in "$wheels"/*.whl; do
    name=${f##*/}
    [[ ${name,,} == "${1//-/_}-"* ]] && return 0
  done
  return 1
}

if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  cuda=1
else
  cuda=0
fi
if [ "$dry_run" = 0 ] && [ "$cuda" = 0 ]; then
  echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)." >&2
  echo "  On a CPU-only machine run the stand-in: bash benchmarks/gpu_check.sh --dry-run" >&2
  exit 2
fi
if [ "$dry_run" = 1 ]; then
  device=cpu suffix=-check-quick
  [ -n "$out" ] || out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  echo "gpu_check: DRY RUN (CPU stand-ins; nothing is installed), outputs in $out"
else
  device=cuda suffix=-check
  [ -n "$out" ] || out=benchmarks/results
fi
mkdir -p "$out"

# ---------------------------------------------------------------------------- 1. install
section "1. packages from wheels in $wheels"
# pip name, import name, what needs it. flash-sinkhorn and geomloss install without their
# dependencies (torch, triton, numpy): the machine's own builds must stay, and fetch_wheels.sh brings none.
packages=(
  "pytest pytest the_CUDA_tests"
  "hypothesis hypothesis the_CUDA_tests_(tests/conftest.py)"
  "pytest-xdist xdist parallel_test_workers"
  "pot ot the_POT_contenders"
  "rich rich rich_terminal_tables"
  "flash-sinkhorn flash_sinkhorn the_flash-sinkhorn_contender"
  "geomloss geomloss the_GeomLoss_contender"
)
missing=() pip_failed=0
pip_log=$(mktemp "${TMPDIR:-/tmp}/gpu_check_pip.XXXXXX")
pip_install=("$PY" -m pip install --no-index --find-links "$wheels")
for spec in "${packages[@]}"; do
  read -r dist module purpose <<<"$spec"
  purpose=${purpose//_/ }
  opts=()
  case $dist in flash-sinkhorn|geomloss) opts=(--no-deps) ;; esac
  if have "$module"; then
    echo "  $dist: installed"
    continue
  fi
  if has_wheel "$dist"; then
    if [ "$dry_run" = 1 ]; then
      if "${pip_install[@]}" --dry-run ${opts[@]+"${opts[@]}"} "$dist" >>"$pip_log" 2>&1; then
        echo "  $dist: would install from $wheels (resolves offline)"
      else
        echo "  $dist: its wheel in $wheels does not install offline (see $pip_log): skipping $purpose"
        pip_failed=1
      fi
      missing+=("$dist ($purpose)")
    elif "${pip_install[@]}" ${opts[@]+"${opts[@]}"} "$dist" >>"$pip_log" 2>&1 && have "$module"; then
      echo "  $dist: installed from $wheels"
    else
      echo "  $dist: pip install from $wheels FAILED (see $pip_log): skipping $purpose"
      missing+=("$dist ($purpose)")
      pip_failed=1
    fi
  else
    echo "  $dist: not installed and no wheel in $wheels: skipping $purpose"
    missing+=("$dist ($purpose)")
  fi
done
if [ "$dry_run" = 1 ]; then
  echo "  ot_losses: would run $PY -m pip install --no-index --no-deps --no-build-isolation -e ."
elif "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >>"$pip_log" 2>&1; then
  echo "  ot_losses: installed from this checkout (pip install -e .)"
else
  # An old setuptools cannot build this pyproject offline; PYTHONPATH already points at the checkout.
  echo "  ot_losses: pip install -e . failed (see $pip_log); using the checkout through PYTHONPATH"
  pip_failed=1
fi
[ "$pip_failed" = 1 ] || rm -f "$pip_log"

# ---------------------------------------------------------------------------- 2. environment
section "2. environment"
env_txt=$(PYTHONPATH="$ROOT/benchmarks:$PYTHONPATH" "$PY" - "$device" <<'PY'
import datetime
import sys

import torch
from otbench.env import device_info, environment_report

device = torch.device(sys.argv[1])
print("\n".join(environment_report(device)))
print(f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
print(f"slug: {device_info(device)[1]}")
PY
)
slug=$(sed -n 's/^slug: //p' <<<"$env_txt")
stem="$slug-$(date -u +%F)$suffix"
env_file="$out/$stem-env.txt"
{
  grep -v '^slug: ' <<<"$env_txt"
  echo "wheels directory: $wheels"
  echo "skipped for lack of a package: $(joined "${missing[@]}")"
} >"$env_file"
sed 's/^/  /' "$env_file"
gpu_line=$(head -n 1 "$env_file")

# ---------------------------------------------------------------------------- 3. CUDA tests
section "3. CUDA tests (pytest -m cuda)"
tests_log="$out/$stem-tests.txt"
tests_status="NOT RUN" tests_counts="" tests_failed=0
# The files that mark tests cuda: collecting only them keeps the run independent of packages (POT)
# that other test modules import at collection time.
mapfile -t test_files < <(grep -lE 'requires_cuda|mark\.cuda' tests/test_*.py || true)
if ! have pytest || ! have hypothesis; then
  echo "  pytest and hypothesis are needed (no wheel for one of them): CUDA tests NOT RUN"
elif [ ${#test_files[@]} -eq 0 ]; then
  echo "  no test file marks a test cuda: nothing to run"; tests_failed=1; tests_status="FAILED (none found)"
else
  pytest_args=(-m cuda -p no:cacheprovider)
  if [ "$cuda" = 1 ] && [ "$dry_run" = 0 ] && [ "$workers" != 0 ] && have xdist; then
    pytest_args+=(-n "$workers")   # Triton compiles dominate: spread them over the CPU cores
  fi
  [ "$cuda" = 1 ] || echo "  no CUDA device: the CUDA tests are collected and skip (dry run)"
  echo "  $PY -m pytest ${pytest_args[*]} ${test_files[*]}"
  set +e
  with_limit $((budget * 45 / 100)) "$PY" -m pytest "${pytest_args[@]}" "${test_files[@]}" 2>&1 \
    | tee "$tests_log"
  rc=${PIPESTATUS[0]}
  set -e
  tests_counts=$(grep -E '^=+ .*[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$tests_log" \
    | tail -n 1 | sed -E 's/^=+ //; s/ =+$//' || true)
  case $rc in
    0) if [ "$cuda" = 1 ]; then tests_status=passed; else tests_status="skipped (no CUDA device)"; fi ;;
    124|137) tests_status="FAILED (timed out after $((budget * 45 / 100)) s)"; tests_failed=1 ;;
    5) tests_status="FAILED (no CUDA test selected)"; tests_failed=1 ;;
    *) tests_status="FAILED (pytest exit $rc)"; tests_failed=1 ;;
  esac
fi

# ---------------------------------------------------------------------------- 4. benchmark
section "4. benchmark (bench_sinkhorn.py --check)"
# Leave 90 s after the last problem starts (one large problem, the reference, the tables), and kill
# the run 15 s before the budget ends at the latest.
points_share=${GPU_CHECK_POINTS_SECONDS:-150}   # kept for step 5
left=$((budget - SECONDS - points_share))
bench_budget=$((left - 90 > 20 ? left - 90 : 20))
bench_kill=$((left - 15 > 30 ? left - 15 : 30))
bench_args=(--check --time-budget "$bench_budget" --out "$out")
[ "$dry_run" = 0 ] || bench_args+=(--quick --device cpu)
bench_log=$(mktemp "${TMPDIR:-/tmp}/gpu_check_bench.XXXXXX")
run_script "$bench_kill" "$bench_log" benchmarks/bench_sinkhorn.py "${bench_args[@]}"
bench_rc=$script_rc
tables=$(sed -n 's/^wrote //p' "$bench_log" | tail -n 1)
bench_failed=0 bench_status="FAILED (exit $bench_rc)"
if [ "$bench_rc" = 0 ] && [ -n "$tables" ]; then
  json=${tables%%,*}
  # Our rows must run and agree with the float64 reference; other libraries' rows are data.
  bench_status=$("$PY" - "$json" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
rows = data["rows"]
ours = [r for r in rows if r["contender"].startswith("ot_losses")]
bad = [f"{r['scenario']} {r['size']} {r['dtype']} {r['contender']}" for r in ours
       if r["status"] != "ok" or r.get("agrees") is False]
left = sum(s["contender"] == "(problem not run)" for s in data["skipped"])
print(f"{len(rows)} rows ({sum(r['status'] != 'ok' for r in rows)} errors, "
      f"{sum(r.get('agrees') is False for r in rows)} outside tolerance), {left} problems not run"
      f"{' (time budget)' if left else ''}; ot_losses rows: {len(ours)}, "
      + ("all ran and agree" if not bad else "FAILED: " + "; ".join(bad)))
PY
)
  case $bench_status in *FAILED*) bench_failed=1 ;; esac
else
  if [ "$bench_rc" = 124 ] || [ "$bench_rc" = 137 ]; then
    bench_status="FAILED (killed after $bench_kill s)"
  fi
  bench_failed=1
fi
rm -f "$bench_log"

# ---------------------------------------------------------------------------- 5. feature costs
section "5. feature-cost benchmark (bench_points.py)"
points_kill=$((budget - SECONDS - 10 > 30 ? budget - SECONDS - 10 : 30))
points_args=(--sizes 4000,20000 --dims 3,64 --kinds sqeuclidean --contenders features,flash-sinkhorn,dense
             --out "$out")
[ "$dry_run" = 0 ] || points_args=(--quick --device cpu --kinds sqeuclidean --contenders features,dense
                                   --out "$out")
points_log=$(mktemp "${TMPDIR:-/tmp}/gpu_check_points.XXXXXX")
run_script "$points_kill" "$points_log" benchmarks/bench_points.py "${points_args[@]}"
points_rc=$script_rc
# One JSON line per row as it finishes: a run cut short by the budget still reports its rows.
points_status=$("$PY" - "$points_log" "$points_rc" <<'PY'
import json
import sys

rows = []
for line in open(sys.argv[1]):
    if line.startswith("{"):
        rows.append(json.loads(line))
ours = [r for r in rows if r["contender"] == "features"]
bad = [f"N={r['n']} D={r['d']}: {r['error']}" for r in ours if "error" in r]
bad += [f"N={r['n']} D={r['d']}: err {r['err']:.1e}" for r in ours if r.get("err", 0) > 1e-3]
done = "" if sys.argv[2] == "0" else f" (cut short: exit {sys.argv[2]})"
print(f"{len(rows)} rows{done}; FeatureCost rows: {len(ours)}, "
      + ("all ran and agree" if not bad else "FAILED: " + "; ".join(bad)))
PY
)
points_failed=0
case $points_status in *FAILED*) points_failed=1 ;; esac
points_tables=$(sed -n 's/^wrote //p' "$points_log" | tail -n 1)
rm -f "$points_log"

# ---------------------------------------------------------------------------- summary
section "summary (${SECONDS} s of a ${budget} s budget)"
echo "  $gpu_line"
grep -E '^(torch|triton):' "$env_file" | sed 's/^/  /'
echo "  CUDA tests: $tests_status${tests_counts:+ - $tests_counts}"
echo "  benchmark: $bench_status"
echo "  tables: ${tables:-none}"
echo "  feature costs: $points_status"
echo "  feature-cost tables: ${points_tables:-none}"
echo "  environment: $env_file; test log: $( [ -f "$tests_log" ] && echo "$tests_log" || echo none)"
if [ ${#missing[@]} -gt 0 ]; then
  echo "  skipped for lack of a package: $(joined "${missing[@]}")"
fi
if [ "$tests_failed" = 1 ] || [ "$bench_failed" = 1 ] || [ "$points_failed" = 1 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
if [ "$dry_run" = 1 ]; then echo "gpu_check: OK (dry run)"; else echo "gpu_check: OK"; fi
