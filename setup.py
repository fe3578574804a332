"""Build stg_ext: the Python package, the Triton kernels (kernels/ -> stg_ext.kernels) and the optional
compiled ops `stg_ext._C` (C++ CPU always when a compiler and torch exist; CUDA too when torch has CUDA and a
CUDA toolkit is found; no GPU is needed to build them).

CUDA (scripts/cuda_toolkit.py does the finding; the build log prints what it found):
  toolkit      $CUDA_HOME if it holds the headers, else the real toolkit behind the nvcc on PATH (wrapper
               scripts included), else the usual install folders; headers it lacks (cuSPARSE, cuSOLVER, ...)
               come from the nvidia wheels the installed torch depends on (site-packages/nvidia/*/include).
  archs        $TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' (torch's choice); else, with no GPU
               visible, sm_80, sm_86, sm_89, sm_90 + PTX of the newest, cut to what the found nvcc supports.
  fallback     a CUDA build that fails (or a toolkit whose major version differs from torch.version.cuda)
               leaves the CPU build, with a warning naming the error; STG_EXT_REQUIRE_CUDA=1 makes it an error.

Environment (all optional):
  STG_EXT_NO_EXTENSION=1   build no compiled ops (the package falls back to the PyTorch reference)
  STG_EXT_SKIP_CUDA=1      build the CPU ops only, even where CUDA is available
  STG_EXT_REQUIRE_CUDA=1   fail the build unless the CUDA ops build
  STG_EXT_CPU_ARCH=native  add -march=<value> to the C++ flags (default: the compiler's baseline)
  TORCH_CUDA_ARCH_LIST     CUDA archs, e.g. "8.0;9.0+PTX" (read by torch's BuildExtension)
  MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension)
"""
import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "scripts"))


def _flag(name):
    return os.environ.get(f"STG_EXT_{name}", "") not in ("", "0", "false", "False")


def _log(msg):
    # stderr, unbuffered: pip shows it with -v, and in full when the build fails.
    print(f"stg_ext build: {msg}", file=sys.stderr, flush=True)


def _loud(msg):
    bar = "!" * 100
    _log(f"\n{bar}\n{msg}\n{bar}")
    warnings.warn(msg)


def _cuda_unavailable(reason):
    """No CUDA build: an error with STG_EXT_REQUIRE_CUDA=1, else a loud warning and the CPU build."""
    if _flag("REQUIRE_CUDA"):
        raise RuntimeError(f"stg_ext: STG_EXT_REQUIRE_CUDA=1 but the CUDA ops cannot be built: {reason}")
    _loud(f"stg_ext: building the CPU ops only, WITHOUT the CUDA ops: {reason}")


def _find_cuda(torch):
    """The toolkit to build the CUDA ops with (a cuda_toolkit.Toolkit), or None after saying why. Sets CUDA_HOME
    for this build process before torch.utils.cpp_extension reads it."""
    import cuda_toolkit

    notes = []
    tk = cuda_toolkit.find_toolkit(notes.append)
    for n in notes:
        _log(n)
    if tk is None:
        _cuda_unavailable(f"torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit (nvcc "
                          "with its headers) was found in $CUDA_HOME, behind the nvcc on PATH, or in "
                          "/usr/local/cuda*, /opt/cuda, /usr; install the CUDA toolkit or set CUDA_HOME")
        return None
    torch_major = int(torch.version.cuda.split(".")[0])
    if tk.major != torch_major:
        _cuda_unavailable(f"the CUDA toolkit at {tk.home} is CUDA {tk.version}, but torch {torch.__version__} was "
                          f"built with CUDA {torch.version.cuda}: the major versions must match. Install a CUDA "
                          f"{torch_major}.x toolkit (and point CUDA_HOME at it) or a torch built for CUDA "
                          f"{tk.major}")
        return None
    if tk.missing:
        _cuda_unavailable(f"the CUDA toolkit at {tk.home} lacks {', '.join(tk.missing)}, and no nvidia wheel "
                          "next to torch provides it")
        return None
    os.environ["CUDA_HOME"] = tk.home
    import torch.utils.cpp_extension as cpp_ext
    cpp_ext.CUDA_HOME = tk.home  # in case it was imported (and guessed) already
    _log(f"CUDA toolkit {tk.version} at {tk.home} ({tk.how})")
    if tk.include_dirs:
        _log(f"headers the toolkit lacks, from torch's nvidia wheels: -I {' -I '.join(tk.include_dirs)}")
    archs, source = cuda_toolkit.arch_list(tk.nvcc, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _log(f"CUDA archs: {archs or 'those of the visible GPUs'} (from {source})")
    return tk


def _extensions():
    if _flag("NO_EXTENSION"):
        warnings.warn("STG_EXT_NO_EXTENSION is set: building without compiled ops")
        return [], {}
    try:
        import torch
    except ImportError:
        warnings.warn("torch is not importable at build time: building without compiled ops "
                      "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    tk = None
    if torch.version.cuda is not None and not _flag("SKIP_CUDA"):
        tk = _find_cuda(torch)
    elif _flag("REQUIRE_CUDA"):
        raise RuntimeError(f"stg_ext: STG_EXT_REQUIRE_CUDA=1 but torch {torch.__version__} has no CUDA"
                           + (" (and STG_EXT_SKIP_CUDA is set)" if _flag("SKIP_CUDA") else ""))
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = ["csrc/ext_module.cpp", "csrc/combine_op.cpp", "csrc/identity_attention_op.cpp"]
    cpu_sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: u + g (c - u) must round like PyTorch's eager ops (no fused multiply-add).
    # -Wno-psabi: the chunk loops' vector values never cross a call between instruction sets (all inlined),
    # so GCC's note about the AVX vector ABI does not apply.
    # -fopenmp (compile and link): at::parallel_for is inline and runs its items serially unless the caller is
    # compiled with OpenMP; the work split is fixed by the sizes, so results do not depend on the thread count.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-Wno-psabi", "-fopenmp"]
    link = ["-fopenmp"]
    arch = os.environ.get("STG_EXT_CPU_ARCH")
    if arch:
        cxx.append(f"-march={arch}")
    include = [os.path.join(HERE, "csrc")]

    def cpu_extension():
        return CppExtension("stg_ext._C", list(cpu_sources), include_dirs=list(include),
                            extra_compile_args={"cxx": list(cxx)}, extra_link_args=list(link), py_limited_api=False)

    class Build(BuildExtension):
        """torch's BuildExtension, which falls back to the CPU build when the CUDA build fails."""

        def build_extension(self, ext):
            if not getattr(ext, "stg_ext_cuda", False):
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except (Exception, SystemExit) as err:  # distutils reports compile errors as CompileError/SystemExit
                if _flag("REQUIRE_CUDA"):
                    raise
                # Without -v, torch's ninja build puts the compiler output in the exception: name its errors.
                text = str(err)
                errors = [ln.strip() for ln in text.splitlines() if " error" in ln or ln.startswith("error")]
                detail = " | ".join(errors[:6]) if errors else text[-1500:]
                _cuda_unavailable(f"the CUDA build failed ({type(err).__name__}: {detail}); the full compiler "
                                  "output is above. Set STG_EXT_REQUIRE_CUDA=1 to make this an error")
            cpu = cpu_extension()
            for key in ("sources", "include_dirs", "library_dirs", "libraries", "runtime_library_dirs",
                        "extra_compile_args", "extra_link_args", "define_macros"):
                setattr(ext, key, getattr(cpu, key))
            ext.stg_ext_cuda = False
            self.force = True  # rebuild every object without -DSTG_EXT_WITH_CUDA
            return super().build_extension(ext)

    cmdclass = {"build_ext": Build.with_options(no_python_abi_suffix=False)}
    if tk is None:
        return [cpu_extension()], cmdclass
    import cuda_toolkit
    sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_op.cpp"))
    ext = CUDAExtension("stg_ext._C", sources, include_dirs=list(include), library_dirs=list(tk.library_dirs),
                        extra_compile_args={"cxx": cxx + ["-DSTG_EXT_WITH_CUDA"],
                                            "nvcc": list(cuda_toolkit.NVCC_FLAGS)},
                        extra_link_args=link, py_limited_api=False)
    # After torch's and the toolkit's own include folders (CUDAExtension appended those): the wheels' headers
    # only fill what the toolkit lacks.
    ext.include_dirs += tk.include_dirs
    ext.stg_ext_cuda = True
    return [ext], cmdclass


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
    package_data={"stg_ext": ["prompts/*.txt", "world/model/**/*", "world/classifier.pt"]},
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
