"""Compile checks of the CUDA sources with plain nvcc (no torch headers, no GPU needed).

The torch binding (csrc/cuda/combine_cuda_op.cpp) needs a CUDA build of torch and is not covered here;
these tests keep the kernels and the shared math header nvcc-clean on machines without CUDA torch.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: CUDA kernels are compile-checked only where nvcc exists")

# The flags setup.py gives nvcc (--fmad=false: no contraction of u + g (c - u), STG_SPEC 2), warnings as errors.
FLAGS = ["-c", "-std=c++17", "--fmad=false", "-Werror", "all-warnings", "-Xcompiler", "-Wall", f"-I{CSRC}"]


def _nvcc(source, out, arch):
    proc = subprocess.run([NVCC, *FLAGS, f"-arch={arch}", source, "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"nvcc -arch={arch} {source} failed:\n{proc.stderr}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_combine_kernels_compile(arch, tmp_path):
    _nvcc(os.path.join(CSRC, "cuda", "combine_kernels.cu"), tmp_path / "combine_kernels.o", arch)


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
    _nvcc(str(source), tmp_path / "math_check.o", "sm_90")
