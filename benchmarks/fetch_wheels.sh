#!/usr/bin/env bash
# Prepare the wheels directory that benchmarks/gpu_check.sh installs from, on a machine WITH internet,
# for the GPU machine's Python version and platform (that machine needs no index at all).
#
# Usage (from the repository root):
#   bash benchmarks/fetch_wheels.sh [--dest DIR] [--python X.Y] [--arch x86_64|aarch64] [--glibc 2.N]
#                                   [--no-deps] [PKG ...]
#     --dest     where the wheels go (default: $OT_LOSSES_WHEELS, else the checkout's wheels/, git-ignored)
#     --python   the GPU machine's `python3 --version`, major.minor (default: this python3's)
#     --arch     the GPU machine's `uname -m` (default x86_64)
#     --glibc    the newest manylinux (glibc) tag to accept (default 2.28; `ldd --version` there)
#     --no-deps  only the named packages: for an image that already has numpy, scipy and pytest's needs
#     PKG        default: pytest hypothesis pytest-xdist pot rich flash-sinkhorn geomloss
# Then copy DIR next to the checkout on the GPU machine and run `bash benchmarks/gpu_check.sh`.
#
# Test and benchmark packages are resolved with their dependencies (numpy, scipy, pluggy, ...), except
# those whose dependencies are torch and triton (flash-sinkhorn, geomloss): the GPU machine has its
# own CUDA build of those, and pip would otherwise fetch gigabytes of another one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
dest=${OT_LOSSES_WHEELS:-$ROOT/wheels}
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
arch=x86_64
glibc=2.28
no_deps=0
pkgs=()
while [ $# -gt 0 ]; do
  case $1 in
    --dest) dest=$2; shift 2 ;;
    --python) pyver=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --glibc) glibc=$2; shift 2 ;;
    --no-deps) no_deps=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fetch_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) pkgs+=("$1"); shift ;;
  esac
done
[ ${#pkgs[@]} -gt 0 ] || pkgs=(pytest hypothesis pytest-xdist pot rich flash-sinkhorn geomloss)

# pip matches platform tags exactly: list every manylinux tag the target glibc accepts, newest first.
minor=${glibc#2.}
platforms=()
for ((n = minor; n >= 17; n--)); do platforms+=(--platform "manylinux_2_${n}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}")
[ "$arch" = x86_64 ] && platforms+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
target=(--only-binary=:all: --implementation cp --python-version "$pyver" "${platforms[@]}")

with_deps=() without_deps=()
for p in "${pkgs[@]}"; do
  case $p in
    flash-sinkhorn|flash_sinkhorn|geomloss) without_deps+=("$p") ;;
    *) if [ "$no_deps" = 1 ]; then without_deps+=("$p"); else with_deps+=("$p"); fi ;;
  esac
done

mkdir -p "$dest"
echo "fetch_wheels: Python $pyver, ${arch}, glibc <= $glibc -> $dest"
if [ ${#with_deps[@]} -gt 0 ]; then
  "$PYTHON" -m pip download --quiet "${target[@]}" -d "$dest" "${with_deps[@]}"
fi
if [ ${#without_deps[@]} -gt 0 ]; then
  "$PYTHON" -m pip download --quiet --no-deps "${target[@]}" -d "$dest" "${without_deps[@]}"
fi
for f in "$dest"/*.whl; do echo "  ${f##*/}"; done
du -sh "$dest" | awk '{print "fetch_wheels: " $1 " in total"}'
