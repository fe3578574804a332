"""Compile checks of the CUDA sources (no GPU needed, nothing is run).

The kernels and the shared math headers compile with plain nvcc, with the flags the build gives them
(torch's COMMON_NVCC_FLAGS and -fPIC, stg_ext's own nvcc flags and the -gencode flags of the build's default
arch list, all from scripts/cuda_toolkit.py, which setup.py uses too) and warnings as errors; the objects hold
SASS for sm_80 and sm_90, and no kernel spills (cuobjdump --dump-resource-usage). The torch bindings
(csrc/cuda/*_cuda_op.cpp) need a CUDA build of torch to link; here they get a syntax check (g++
-fsyntax-only) against the CPU wheel's ATen/cuda headers, the CUDA toolkit's headers and stub declarations
of the cuBLAS / cuSPARSE / cuSOLVER handle types that the CPU wheel's headers name but the toolkit
install here lacks. (scripts/ci_cuda_build.sh builds and links them for real against the CUDA torch.)
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_toolkit  # noqa: E402

NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: CUDA kernels are compile-checked only where nvcc exists")


def _flags():
    """What BuildExtension passes nvcc for the .cu files (minus -I of torch, which these files do not use)."""
    archs = cuda_toolkit.default_arch_list(NVCC)
    return (cuda_toolkit.torch_nvcc_flags() + list(cuda_toolkit.NVCC_FLAGS) + cuda_toolkit.gencode_flags(archs)
            + ["-c", "-Werror", "all-warnings", "-Xcompiler", "-Wall", f"-I{CSRC}"])


def _nvcc(source, out):
    proc = subprocess.run([NVCC, *_flags(), source, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc {source} failed:\n{proc.stderr}"


def _resources(obj):
    """{(kernel, arch): (registers, stack, local)} of an object file, read with cuobjdump."""
    tool = shutil.which("cuobjdump")
    if tool is None:
        import glob

        import triton
        hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
        if not hits:
            pytest.skip("no cuobjdump (toolkit or triton's)")
        tool = hits[0]
    out = subprocess.run([tool, "--dump-resource-usage", str(obj)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res, arch = {}, None
    for line in out.stdout.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m:
            res[(fn, arch)] = (int(m.group(1)), int(m.group(2)), int(m.group(4)))
    return res


@pytest.mark.parametrize("source", ["combine_kernels.cu", "identity_attention_kernels.cu"])
def test_kernels_compile_with_the_build_flags_without_spills(source, tmp_path):
    obj = tmp_path / (source + ".o")
    _nvcc(os.path.join(CSRC, "cuda", source), obj)
    res = _resources(obj)
    archs = {arch for _, arch in res}
    assert {"sm_80", "sm_90"} <= archs, f"SASS for {sorted(archs)} only"
    spills = {k: v for k, v in res.items() if v[1] or v[2]}
    assert not spills, f"kernels with stack/local memory (spills): {spills}"


def test_combine_math_header_compiles_for_host_and_device(tmp_path):
    # Uses every function of the header from a kernel and from host code, in both accumulator types.
    source = tmp_path / "math_check.cu"
    source.write_text(
        '#include "combine_math.h"\n'
        "using namespace stg_ext;\n"
        "template <typename Acc>\n"
        "__host__ __device__ float use(const Acc* sums, const CombineScalars& s) {\n"
        "  const ElementTerms t = element_terms(1.f, 2.f, 3.f, 4.f, 5.f, s);\n"
        "  const SampleCoeffs<Acc> k = sample_coeffs<Acc>(sums, Acc(8), s);\n"
        "  return element_output(t, 2.f, 3.f, float(k.alpha), float(k.factor), s);\n"
        "}\n"
        "__global__ void kernel(const double* sd, const float* sf, CombineScalars s, float* out) {\n"
        "  out[0] = use(sd, s) + use(sf, s);\n"
        "}\n"
        "float host(CombineScalars s) {\n"
        "  const double sd[kNumSums] = {};\n"
        "  const float sf[kNumSums] = {};\n"
        "  return use(sd, s) + use(sf, s);\n"
        "}\n")
    _nvcc(str(source), tmp_path / "math_check.o")


def test_identity_attention_math_header_compiles_for_host_and_device(tmp_path):
    # Every function of the header from a kernel and from host code, next to combine_math.h (both define STG_HD).
    source = tmp_path / "identity_math_check.cu"
    source.write_text(
        '#include "identity_attention_math.h"\n'
        '#include "combine_math.h"\n'
        "using namespace stg_ext;\n"
        "__host__ __device__ float use(const float* logits, int n, float self_dot, float v) {\n"
        "  SoftmaxState s = softmax_start(self_logit(self_dot, 0.125f));\n"
        "  float acc = v, sum = 0.f;\n"
        "  float mx = -INFINITY;\n"
        "  for (int i = 0; i < n; ++i) mx = fmaxf(mx, text_logit(logits[i], 0.125f, 0.f));\n"
        "  acc *= softmax_rescale(s, mx);\n"
        "  for (int i = 0; i < n; ++i) {\n"
        "    const float w = softmax_weight(text_logit(logits[i], 0.125f, 0.f), s);\n"
        "    acc += w * v;\n"
        "    sum += w;\n"
        "  }\n"
        "  softmax_add(s, sum);\n"
        "  return acc * softmax_norm(s);\n"
        "}\n"
        "__global__ void kernel(const float* logits, float* out) { out[0] = use(logits, 4, 1.f, 2.f); }\n"
        "float host(const float* logits) { return use(logits, 4, 1.f, 2.f); }\n")
    _nvcc(str(source), tmp_path / "identity_math_check.o")


def _nvcc_include_dir():
    """The toolkit's include folder, as nvcc itself reports it (nvcc may be a wrapper script)."""
    proc = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True, timeout=60)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(os.path.join(line[len("#$ TOP="):].strip(), "include"))
    return None


# Only what torch's ATen/cuda headers name; enough for a syntax check, never for a build.
_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n"
                  "#define CUSPARSE_STATUS_SUCCESS 0\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n"
                   "#define CUBLAS_STATUS_SUCCESS 0\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cusolverStatus_t;\n"
                    "#define CUSOLVER_STATUS_SUCCESS 0\n",
    "cusolver_common.h": "",
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("binding", ["combine_cuda_op.cpp", "identity_attention_cuda_op.cpp"])
def test_torch_binding_passes_a_syntax_check(binding, tmp_path):
    cuda_include = _nvcc_include_dir()
    if cuda_include is None or not os.path.exists(os.path.join(cuda_include, "cuda_runtime_api.h")):
        pytest.skip(f"no CUDA runtime headers next to nvcc ({cuda_include})")
    for name, text in _STUBS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-DSTG_EXT_WITH_CUDA", f"-I{tmp_path}",
           *(f"-I{p}" for p in include_paths()), f"-I{cuda_include}", f"-I{CSRC}",
           os.path.join(CSRC, "cuda", binding)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"syntax check of {binding} failed:\n{proc.stderr[-4000:]}"
