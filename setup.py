"""Build stg_ext: the Python package, the Triton kernels (kernels/ -> stg_ext.kernels) and the optional
compiled ops `stg_ext._C` (C++ CPU always when a compiler and torch exist; CUDA when torch has CUDA and
nvcc is found).

Environment (all optional):
  STG_EXT_NO_EXTENSION=1   build no compiled ops (the package falls back to the PyTorch reference)
  STG_EXT_SKIP_CUDA=1      build the CPU ops only, even where CUDA is available
  STG_EXT_CPU_ARCH=native  add -march=<value> to the C++ flags (default: the compiler's baseline)
  MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension)
"""
import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(f"STG_EXT_{name}", "") not in ("", "0", "false", "False")


def _extensions():
    if _flag("NO_EXTENSION"):
        warnings.warn("STG_EXT_NO_EXTENSION is set: building without compiled ops")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building without compiled ops "
                      "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    sources = ["csrc/ext_module.cpp", "csrc/combine_op.cpp", "csrc/identity_attention_op.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: u + g (c - u) must round like PyTorch's eager ops (no fused multiply-add).
    # -Wno-psabi: the chunk loops' vector values never cross a call between instruction sets (all inlined),
    # so GCC's note about the AVX vector ABI does not apply.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-Wno-psabi"]
    arch = os.environ.get("STG_EXT_CPU_ARCH")
    if arch:
        cxx.append(f"-march={arch}")
    extra = {"cxx": cxx}
    ext_cls = CppExtension

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is not None and not _flag("SKIP_CUDA"):
        if nvcc and os.path.exists(nvcc):
            sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_op.cpp"))
            extra["nvcc"] = ["-O3", "-std=c++17", "--fmad=false", "-DSTG_EXT_WITH_CUDA"]
            extra["cxx"] = cxx + ["-DSTG_EXT_WITH_CUDA"]
            ext_cls = CUDAExtension
        else:
            warnings.warn("torch has CUDA but nvcc was not found: building the CPU ops only")
    ext = ext_cls("stg_ext._C", sources, include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=extra,
                  py_limited_api=False)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="stg_ext",
    version="0.1.0",
    description="Spatiotemporal Skip Guidance (STG) for diffusers video pipelines, with fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["stg_ext.kernels"] + find_packages(include=["stg_ext", "stg_ext.*"]),
    package_dir={"stg_ext": "stg_ext", "stg_ext.kernels": "kernels"},
    # The paper's prompt lists, read by `stg-ext sweep --prompts` (stg_ext/cli/prompts.py).
    package_data={"stg_ext": ["prompts/*.txt"]},
    entry_points={"console_scripts": ["stg-ext = stg_ext.cli:run"]},
    install_requires=["torch>=2.6", "diffusers>=0.42,<0.43", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=5,<6", "sentencepiece",
                 "protobuf", "accelerate"],
        "bench": ["matplotlib"],
        # The command line: the demo's tiny text encoder (transformers), mp4 writing (imageio's ffmpeg plugin;
        # imageio-ffmpeg ships the ffmpeg binary), the optical flow of `stg-ext sweep` (OpenCV Farneback) and its
        # plot. Without the last three the CLI still runs: GIF instead of mp4, a normal-flow estimate instead of
        # Farneback, no plot.
        "cli": ["transformers>=5,<6", "imageio>=2.30", "imageio-ffmpeg>=0.5", "opencv-python-headless>=4.8",
                "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
