"""CMakeLists.txt builds the same csrc/ as setup.py, and its C++ test passes under ctest."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not found")
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch's TorchConfig.cmake needs a full CUDA toolkit "
                    "(measured: configuring fails with the registry's CUDA torch here); the CMake build covers the CPU ops")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)],
                ["ctest", "--output-on-failure"]):
        res = subprocess.run(cmd, cwd=build if cmd[0] == "ctest" else ROOT, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert "100% tests passed" in res.stdout
    # OpenMP reached the link (at::parallel_for would run serially without it).
    (lib,) = build.glob("libstg_ext_ops*.so")
    assert b"GOMP_parallel" in lib.read_bytes()
