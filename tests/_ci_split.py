"""Which tests each CI part leaves out (`.ci/run` runs its two parts side by side, one core each).

STG_EXT_CI_PART=main (part 1: the CPU torch, .venv) or cuda (part 2: the registry's CUDA torch, .venv-cuda, against
the installed wheel) selects a row; unset (the README's test command, a developer's run) runs everything. Every test
runs in at least one part. The split balances the parts: each runs about 2x slower next to the other, so CI takes
about as long as the part with more work.
"""
from __future__ import annotations

# Tests that run in part 2 only: the nvcc compile tests (torch's CUDAExtension flags are the CUDA torch's there, the
# nvcc is the same) and the cache + compiled-denoiser tests (dynamo and AOTAutograd are the same Python in both wheels).
CUDA_PART_ONLY = ("tests/ops/test_cuda_compile.py", "tests/guidance/caches/test_compiled.py")
# Tests part 2 leaves out, run in part 1: the Triton compile tests (part 2's triton is the CUDA torch's pinned one,
# not the project's) and the other tests that trace a denoiser (marker `dynamo`).
MAIN_PART_ONLY = ("tests/ops/test_triton_compile.py",)

PARTS = ("main", "cuda")


def left_out(part: str, path: str, markers: set[str]) -> bool:
    """True when the CI part `part` does not run the test in file `path` (relative to the repo) with `markers`."""
    if part not in PARTS:
        raise ValueError(f"STG_EXT_CI_PART={part!r}: valid: {', '.join(PARTS)} (or unset: every test)")
    if part == "main":
        return path in CUDA_PART_ONLY
    return path in MAIN_PART_ONLY or ("dynamo" in markers and path not in CUDA_PART_ONLY)
