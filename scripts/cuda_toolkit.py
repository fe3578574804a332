"""How stg_ext's CUDA ops are built: the toolkit, the arch list and the nvcc flags (used by setup.py, the nvcc
compile tests and scripts/gpu_check.sh, so what the tests compile is what the build compiles).

No torch import at module level: setup.py uses it before torch.utils.cpp_extension reads CUDA_HOME.
`python scripts/cuda_toolkit.py` prints what a build here would use.

Toolkit (find_toolkit): CUDA_HOME / CUDA_PATH if it holds bin/nvcc and include/cuda_runtime_api.h; else the
nvcc on PATH, resolved to the toolkit it really runs (a symlink, or a wrapper script: nvcc --dryrun reports its
own TOP folder); else the usual install folders (/usr/local/cuda, /usr/local/cuda-*, /opt/cuda, /usr).
Headers that torch's CUDA headers include but the toolkit lacks (cuSPARSE, cuSOLVER, cuBLAS) are taken from
the nvidia wheels the CUDA torch depends on (site-packages/nvidia/*/include, their lib folders with them).

Arch list (arch_list): TORCH_CUDA_ARCH_LIST when set; else, with a GPU visible, torch's own choice (the
visible GPUs); else DEFAULT_ARCHS, cut to what the found nvcc supports, PTX for the newest kept.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

# Ampere (A100), Ampere consumer/A10/A40, Ada (L4/L40/RTX 40), Hopper (H100/H200); PTX of the newest lets the
# driver JIT the kernels for later GPUs (Blackwell).
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0")
# Headers included by torch's ATen/cuda headers (CUDAContext.h) that a minimal toolkit may lack.
NEEDED_HEADERS = ("cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
# The nvcc flags of stg_ext's own (torch adds COMMON_NVCC_FLAGS, -fPIC and the arch flags). No --fmad=false:
# the results owed bit for bit are combine's per-element ones (STG_SPEC 2: u + g (c - u) + s (c - p), folded or
# not, must round like PyTorch's eager ops on the same device, with the per-sample factor and alpha given), and
# csrc/cuda/combine_kernels.cu computes them through __fadd_rn/__fmul_rn/__fdiv_rn, which nvcc never contracts
# into an FMA. Identity attention owes 1e-5, not bits, and its dots are explicit fmaf; the reductions' sums are
# owed a tolerance only (their order differs from torch's anyway), so contraction is welcome there.
NVCC_FLAGS = ("-O3", "-std=c++17", "-DSTG_EXT_WITH_CUDA")


@dataclass
class Toolkit:
    home: str
    nvcc: str
    version: str  # "13.0"
    how: str  # how it was found, for the build log
    include_dirs: List[str] = field(default_factory=list)  # extra -I (nvidia wheels) for missing headers
    library_dirs: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # headers found nowhere

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _has_headers(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) and \
        os.path.isfile(os.path.join(home, "bin", "nvcc"))


def nvcc_version(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit folder an nvcc (possibly a wrapper script) really runs: nvcc --dryrun prints `#$ TOP=...`."""
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.normpath(line[len("#$ TOP="):].strip())
            # TOP is the bin folder's parent for a standard layout (bin/nvcc); some layouts print bin/..
            return os.path.realpath(top)
    return None


def _candidates():
    """(home, how) in order of preference."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        yield os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc})"
        top = _nvcc_top(nvcc)
        if top:
            yield top, f"the toolkit behind the nvcc on PATH ({nvcc} runs {top}/bin/nvcc)"
    usual = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda", "/usr"]
    for home in usual:
        yield home, f"usual install folder {home}"


def _wheel_dirs(header: str) -> List[str]:
    """nvidia wheel include folders (next to the installed torch) holding `header`."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return []
    site = os.path.dirname(os.path.dirname(spec.origin))
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(site, "nvidia", "**", "include", header),
                                                        recursive=True))


def find_toolkit(log=None) -> Optional[Toolkit]:
    """The CUDA toolkit to build with, or None (then `log` gets the reasons)."""
    log = log or (lambda msg: None)
    seen = set()
    for home, how in _candidates():
        home = os.path.realpath(home)
        if home in seen:
            continue
        seen.add(home)
        if not _has_headers(home):
            if how.startswith("$"):
                log(f"{how}={home} has no include/cuda_runtime_api.h or bin/nvcc: ignored")
            continue
        nvcc = os.path.join(home, "bin", "nvcc")
        version = nvcc_version(nvcc)
        if version is None:
            log(f"{nvcc} --version failed: ignored")
            continue
        tk = Toolkit(home=home, nvcc=nvcc, version=version, how=how)
        for header in NEEDED_HEADERS:
            if os.path.isfile(os.path.join(home, "include", header)):
                continue
            dirs = [d for d in _wheel_dirs(header) if d not in tk.include_dirs]
            have = [d for d in tk.include_dirs if os.path.isfile(os.path.join(d, header))]
            if have:
                continue
            if not dirs:
                tk.missing.append(header)
                continue
            tk.include_dirs.append(dirs[0])
            lib = os.path.join(os.path.dirname(dirs[0]), "lib")
            if os.path.isdir(lib) and lib not in tk.library_dirs:
                tk.library_dirs.append(lib)
        return tk
    return None


def supported_archs(nvcc: str) -> List[str]:
    """The compute capabilities this nvcc compiles for, as "8.0" strings."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    caps = []
    for m in re.finditer(r"compute_(\d+)(\d)\b", out):
        caps.append(f"{m.group(1)}.{m.group(2)}")
    return caps


def default_arch_list(nvcc: str) -> str:
    """DEFAULT_ARCHS that `nvcc` supports, PTX for the newest: e.g. "8.0;8.6;8.9;9.0+PTX"."""
    ok = set(supported_archs(nvcc))
    archs = [a for a in DEFAULT_ARCHS if a in ok] if ok else list(DEFAULT_ARCHS)
    if not archs:
        raise RuntimeError(f"{nvcc} supports none of the default CUDA archs {', '.join(DEFAULT_ARCHS)} "
                           f"(it lists {', '.join(sorted(ok)) or 'nothing'}); set TORCH_CUDA_ARCH_LIST")
    archs[-1] += "+PTX"
    return ";".join(archs)


def arch_list(nvcc: str, gpu_count: int = 0) -> tuple:
    """(list, source): TORCH_CUDA_ARCH_LIST, else "" (torch picks the visible GPUs'), else the default."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env, "TORCH_CUDA_ARCH_LIST"
    if gpu_count > 0:
        return "", "the visible GPUs (torch's choice)"
    return default_arch_list(nvcc), "stg_ext's default (no GPU visible, TORCH_CUDA_ARCH_LIST unset)"


def gencode_flags(archs: str) -> List[str]:
    """-gencode flags for an arch list string, as torch's _get_cuda_arch_flags makes them."""
    flags = []
    for a in archs.replace(" ", ";").split(";"):
        if not a:
            continue
        num = a.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return sorted(set(flags))


def torch_nvcc_flags() -> List[str]:
    """The flags torch's BuildExtension puts before ours on every nvcc call (COMMON_NVCC_FLAGS, -fPIC)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC"]


def main() -> int:
    msgs = []
    tk = find_toolkit(msgs.append)
    for m in msgs:
        print("note:", m)
    if tk is None:
        print("no CUDA toolkit found")
        return 1
    print(f"toolkit: {tk.home} (CUDA {tk.version}; {tk.how})")
    print(f"extra include dirs: {tk.include_dirs or 'none'}; library dirs: {tk.library_dirs or 'none'}")
    if tk.missing:
        print(f"missing headers: {', '.join(tk.missing)}")
    archs, source = arch_list(tk.nvcc)
    print(f"arch list: {archs} ({source})")
    print("gencode:", " ".join(gencode_flags(archs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
