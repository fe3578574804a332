#!/usr/bin/env bash
# One GPU check (see scripts/gpu_check.py): on a CUDA machine, builds stg_ext with its CUDA ops
# (STG_EXT_REQUIRE_CUDA=1: no silent CPU fallback), then runs every backend on the GPU against the reference,
# the GPU-marked tests, the combine / identity-attention timings and the real-width Wan step cost, and writes
# OUT/gpu_check.md and OUT/gpu_check.csv. No weights are downloaded. Without a GPU it says so, runs the
# compile-only parts (toolkit, nvcc compile tests, Triton kernels compiled for sm_80/sm_90) and exits 0.
#   usage: scripts/gpu_check.sh [OUT]        (default gpu_check_out)
#   PYTHON  the interpreter whose torch to use (default: .venv-cuda's if present, else .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv-cuda/bin/python ]; then py=.venv-cuda/bin/python
else py=.venv/bin/python
fi
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: $("$py" -c 'import torch; print(torch.cuda.get_device_name(0))'); building stg_ext with CUDA"
  t0=$(date +%s)
  STG_EXT_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$py" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
  echo "gpu_check: built in $(( $(date +%s) - t0 )) s (log $out/build.log)"
  exec "$py" scripts/gpu_check.py --out "$out"
fi
echo "gpu_check: no CUDA device visible to $py: nothing runs on a GPU here; running the compile-only parts"
exec "$py" scripts/gpu_check.py --compile-only --out "$out"   # exit 0 unless a compile-only part failed
