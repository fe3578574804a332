#!/usr/bin/env bash
# CI, second half: the build a GPU user runs, on a machine without a GPU. In a second venv holding the
# registry's CUDA torch (scripts/setup_cuda_venv.sh; pip's cache keeps its wheels between runs), from a clean
# copy of the working tree (no build/ or .so left over), with no CUDA variables set by hand:
#   1. pip install --no-build-isolation . builds stg_ext with its CUDA ops (log: $STG_EXT_CI_OUT/cuda_build.log);
#   2. the installed extension holds sm_80 and sm_90 code (cuobjdump --list-elf) and PTX for compute_90;
#   3. both torch.ops.stg_ext ops have CUDA kernels in the dispatch table;
#   4. the CPU test suite passes in that venv (a CUDA-torch user on a CPU path), from the clean copy, against the
#      installed package (the share tests/_ci_split.py gives part 2).
# Exits non-zero on any failure.
#   usage: scripts/ci_cuda_build.sh [VENV]   (default .venv-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$(realpath -m "${1:-.venv-cuda}")
out=$(realpath -m "${STG_EXT_CI_OUT:-$root/build/ci_cuda}")
mkdir -p "$out"
# The user's build sees none of these (the point is that none are needed).
unset CUDA_HOME CUDA_PATH TORCH_CUDA_ARCH_LIST CPATH LIBRARY_PATH STG_EXT_SKIP_CUDA STG_EXT_NO_EXTENSION
export MAX_JOBS=${MAX_JOBS:-2}

t0=$(date +%s)
bash scripts/setup_cuda_venv.sh "$venv"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
# The test requirements (torch is there already and satisfies the pins).
"${pip[@]}" install "numpy" "diffusers>=0.42,<0.43" pytest pytest-benchmark hypothesis "transformers>=5,<6" \
  sentencepiece protobuf accelerate matplotlib "imageio>=2.30" "imageio-ffmpeg>=0.5" "opencv-python-headless>=4.8"
t1=$(date +%s)

copy=$(mktemp -d /tmp/stg_ext_ci_copy.XXXXXX)
trap 'rm -rf "$copy"' EXIT
# Tracked and untracked-but-not-ignored files of the working tree: what a user's checkout holds.
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$copy"

echo "== CUDA build (pip install --no-build-isolation -v .) in a clean copy: $copy"
# STG_EXT_REQUIRE_CUDA=1: in CI a silent fall back to the CPU build must fail the run.
if ! (cd "$copy" && STG_EXT_REQUIRE_CUDA=1 "$py" -m pip --disable-pip-version-check install --no-build-isolation --no-deps \
      --force-reinstall -v . \
      > "$out/cuda_build.log" 2>&1); then
  tail -60 "$out/cuda_build.log"
  echo "CUDA build FAILED (log: $out/cuda_build.log)"
  exit 1
fi
t2=$(date +%s)
grep "stg_ext build:" "$out/cuda_build.log" || true

echo "== checks of the installed extension"
(cd "$copy" && "$py" scripts/check_cuda_build.py)
t3=$(date +%s)

echo "== CPU test suite with the CUDA torch (from the clean copy, against the installed package)"
# The package sources leave the copy, so `import stg_ext` is the installed wheel's (with its _C), not the tree's;
# the layout and error-catalog tests read the package as imported (tests/_package.py), so they check the wheel.
rm -rf "$copy/stg_ext" "$copy/kernels"
# The suite's share of part 2 (tests/_ci_split.py): all but the Triton compile tests and the `dynamo` tests
# (torch.compile tracing a denoiser) outside the cache tests; part 1 runs those. The op tests under torch.compile
# (register_fake, the custom ops) run here too.
(cd "$copy" && STG_EXT_CI_PART=cuda "$py" -m pytest -q -p no:cacheprovider ${STG_EXT_CI_PYTEST_ARGS:-} tests) 2>&1 \
  | tee "$out/cpu_tests.log" && rc=0 || rc=$?  # (set -e would leave before the times line on a failure)
t4=$(date +%s)
echo "ci_cuda_build times (s): venv+deps $((t1 - t0)), CUDA build $((t2 - t1)), checks $((t3 - t2)), CPU tests $((t4 - t3)), total $((t4 - t0))"
exit "$rc"
