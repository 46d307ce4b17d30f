#!/usr/bin/env bash
# Pure-Python wheels the GPU machine lacks (it has no network): diffusers (the side-by-side reference of
# benchmarks/renderer.py --diffusers) and gguf. Run here, from anywhere in the checkout; the device command carries
# .gpu_wheels and installs them offline (docs/performance.md):
#   pip install --no-deps --no-index .gpu_wheels/*.whl; python3 benchmarks/gpu_checks.py --out $OUT
# DIFFUSERS_VERSION overrides the pin (the version the benchmark was written against).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels \
    "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "gguf"
ls -l .gpu_wheels
