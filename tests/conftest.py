import os

import torch

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported. Only where no
# CUDA device is present: on a GPU machine the Triton tests run the compiled kernels on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile caches its generated code here so repeated test runs stay fast.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
