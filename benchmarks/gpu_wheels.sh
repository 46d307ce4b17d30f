#!/usr/bin/env bash
# What the GPU machine lacks (it has no network), prepared here for benchmarks/gpu_checks.py (docs/performance.md):
#  - .gpu_wheels/: pure-Python diffusers (the side-by-side reference of benchmarks/renderer.py --diffusers) and gguf,
#    and comfy-aimdo at the version ComfyUI 0.33.0 pins (comfy.model_patcher imports it; section g);
#  - .gpu_comfyui/ComfyUI: the ComfyUI source the integration suite tests against, for section g, unpacked from
#    $BERNINI_COMFYUI_SHARED or the comfyui folder of the nearest "shared" folder above the checkout (skipped with
#    a note when absent).
# The device command carries both and installs the wheels offline:
#   pip install --no-deps --no-index .gpu_wheels/*.whl; python3 benchmarks/gpu_checks.py --out $OUT
# DIFFUSERS_VERSION overrides the pin (the version the benchmark was written against).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels .gpu_comfyui
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels \
    "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "gguf"
# the GPU image runs Python 3.12 on x86_64 Linux
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .gpu_wheels "comfy-aimdo==0.4.13"
ls -l .gpu_wheels
shared="${BERNINI_COMFYUI_SHARED:-}"
if [ -z "$shared" ]; then
    dir="$(pwd)"
    while [ "$dir" != "/" ]; do
        if [ -d "$dir/shared/comfyui" ]; then shared="$dir/shared/comfyui"; break; fi
        dir="$(dirname "$dir")"
    done
fi
tarball="$(ls "$shared"/ComfyUI-*.tar.gz 2>/dev/null | head -n 1 || true)"
if [ -n "$tarball" ]; then
    mkdir -p .gpu_comfyui
    tar -xzf "$tarball" -C .gpu_comfyui
    [ -d .gpu_comfyui/ComfyUI ] || mv .gpu_comfyui/* .gpu_comfyui/ComfyUI
    du -sh .gpu_comfyui
else
    echo "no ComfyUI tarball found (set BERNINI_COMFYUI_SHARED): section g of gpu_checks.py will be skipped" >&2
fi
