"""scripts/cuda_toolkit.py, which setup.py uses to find the CUDA toolkit and pick the arch list (no GPU needed)."""
import os
import shutil
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_toolkit  # noqa: E402

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_default_arch_list_is_cut_to_what_nvcc_supports(monkeypatch):
    monkeypatch.setattr(cuda_toolkit, "supported_archs", lambda nvcc: ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0"])
    assert cuda_toolkit.default_arch_list("nvcc") == "8.0;8.6;8.9;9.0+PTX"
    monkeypatch.setattr(cuda_toolkit, "supported_archs", lambda nvcc: ["7.5", "8.0", "8.6"])  # an old nvcc
    assert cuda_toolkit.default_arch_list("nvcc") == "8.0;8.6+PTX"
    monkeypatch.setattr(cuda_toolkit, "supported_archs", lambda nvcc: ["7.0", "7.5"])
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_toolkit.default_arch_list("nvcc")


def test_arch_list_source(monkeypatch):
    monkeypatch.setattr(cuda_toolkit, "supported_archs", lambda nvcc: ["8.0", "8.6", "8.9", "9.0"])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_toolkit.arch_list("nvcc", gpu_count=0)[0] == "8.0;8.6;8.9;9.0+PTX"
    assert cuda_toolkit.arch_list("nvcc", gpu_count=1)[0] == ""  # torch picks the visible GPUs'
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cuda_toolkit.arch_list("nvcc", gpu_count=1) == ("9.0", "TORCH_CUDA_ARCH_LIST")


def test_gencode_flags_match_torchs():
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
    try:
        assert cuda_toolkit.gencode_flags("8.0;8.6;8.9;9.0+PTX") == _get_cuda_arch_flags()
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


@needs_nvcc
def test_finds_the_toolkit_behind_a_wrapper_script(tmp_path, monkeypatch):
    """A two-line wrapper on PATH (as on this machine) leads to the toolkit it runs, not to the wrapper's folder."""
    real = cuda_toolkit._nvcc_top(NVCC)
    assert real and os.path.isfile(os.path.join(real, "include", "cuda_runtime_api.h"))
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {os.path.join(real, "bin", "nvcc")} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    tk = cuda_toolkit.find_toolkit()
    assert tk.home == os.path.realpath(real) and "behind the nvcc on PATH" in tk.how
    assert tk.version == cuda_toolkit.nvcc_version(NVCC)


@needs_nvcc
def test_a_cuda_home_without_headers_is_ignored(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    notes = []
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    tk = cuda_toolkit.find_toolkit(notes.append)
    assert tk is not None and tk.home != str(tmp_path)
    assert any("has no include/cuda_runtime_api.h" in n for n in notes)


@needs_nvcc
def test_missing_headers_come_from_the_nvidia_wheels_or_are_named():
    tk = cuda_toolkit.find_toolkit()
    for header in cuda_toolkit.NEEDED_HEADERS:
        found = os.path.isfile(os.path.join(tk.home, "include", header)) or any(
            os.path.isfile(os.path.join(d, header)) for d in tk.include_dirs)
        assert found or header in tk.missing, header
    for d in tk.include_dirs:
        assert os.sep + "nvidia" + os.sep in d
