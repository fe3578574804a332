"""Checks of an installed CUDA build of stg_ext (no GPU needed; run by scripts/ci_cuda_build.sh and
scripts/gpu_check.sh):
  - the extension's fat binary holds SASS for each of --sass (default sm_80, sm_90) and PTX for --ptx
    (default compute_90), read with cuobjdump (the toolkit's, else the one triton bundles);
  - every op of torch.ops.stg_ext with a C++ kernel has a CUDA kernel in the dispatch table.
Prints what it found; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

OPS = ("stg_ext::combine", "stg_ext::identity_joint_attention")


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return hits[0] if hits else None


def embedded(cuobjdump: str, so: str) -> tuple[set, set]:
    """(SASS archs like 'sm_80', PTX archs like 'compute_90') in the fat binary of `so`."""
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, timeout=300)
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, timeout=300)
    if elf.returncode != 0:
        raise RuntimeError(f"{cuobjdump} --list-elf {so} failed: {elf.stderr.strip()}")
    sass = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf.stdout))
    ptxs = set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx.stdout))
    return sass, {p.replace("sm_", "compute_") for p in ptxs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", nargs="*", default=["sm_80", "sm_90"])
    ap.add_argument("--ptx", nargs="*", default=["compute_90"])
    args = ap.parse_args(argv)

    import torch  # before the extension: it links torch's libraries
    import stg_ext._C as ext

    failures = []
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); extension {ext.__file__}")
    tool = find_cuobjdump()
    if tool is None:
        failures.append("no cuobjdump found (toolkit or triton's)")
    else:
        sass, ptx = embedded(tool, ext.__file__)
        print(f"SASS in the extension: {' '.join(sorted(sass)) or 'none'}; PTX: {' '.join(sorted(ptx)) or 'none'} "
              f"(read with {tool})")
        failures += [f"no {a} SASS in {ext.__file__}" for a in args.sass if a not in sass]
        failures += [f"no {a} PTX in {ext.__file__}" for a in args.ptx if a not in ptx]
    for op in OPS:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        cpu = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        print(f"{op}: CUDA kernel {'registered' if has else 'MISSING'}, CPU kernel {'registered' if cpu else 'MISSING'}")
        if not has:
            failures.append(f"{op} has no CUDA kernel in the dispatch table")
        if not cpu:
            failures.append(f"{op} has no CPU kernel in the dispatch table")
    for f in failures:
        print("FAIL:", f)
    print("check_cuda_build:", "FAILED" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
