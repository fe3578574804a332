import os
from pathlib import Path

import torch

from tests._ci_split import left_out

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported. Only where no
# CUDA device is present: on a GPU machine the Triton tests run the compiled kernels on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile caches its generated code here so repeated test runs stay fast.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # CI's two parts share the suite between them (tests/_ci_split.py); without STG_EXT_CI_PART every test runs.
    part = os.environ.get("STG_EXT_CI_PART")
    if not part:
        return
    root = Path(__file__).resolve().parent.parent
    keep, dropped = [], []
    for item in items:
        path = Path(str(item.path)).resolve().relative_to(root).as_posix()
        (dropped if left_out(part, path, {m.name for m in item.iter_markers()}) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
