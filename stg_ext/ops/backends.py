"""Which backend runs an op: the resolver shared by every op of stg_ext.

Backends of every op:
  "torch"  - the plain PyTorch reference (stg_ext.ops.reference), the oracle of the others;
  "cpu"    - the C++ op torch.ops.stg_ext.<op> (CPU tensors), from the compiled extension;
  "triton" - a torch.library.triton_op (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  "cuda"   - the CUDA kernel behind torch.ops.stg_ext.<op> (needs a CUDA build of the extension);
  "auto"   - the fastest one available for the tensors' device, dtype and arguments.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Union

import torch

from . import extension

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    if not TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return True
    # The Triton interpreter runs kernels on CPU tensors (tests; slow).
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_op_backend(op: str, label: str, backend: str, x: torch.Tensor, unfusable: Optional[str] = None,
                        cuda_unfit: Optional[str] = None, triton_unfit: Optional[str] = None) -> str:
    """The backend that runs `op` on tensors like `x` (see the module docstring for "auto").

    unfusable: None, or why no fused backend takes these arguments ("takes dtypes ... (got ...)");
    cuda_unfit / triton_unfit: None, or why the CUDA / Triton kernel does not (others may still)."""
    if backend not in BACKENDS:
        raise ValueError(f"{label}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    device = x.device.type
    if backend == "auto":
        if unfusable is not None:
            return "torch"
        if device == "cpu" and extension.has_kernel(op, "CPU"):
            return "cpu"
        if device == "cuda" and cuda_unfit is None and extension.has_kernel(op, "CUDA"):
            return "cuda"
        if device == "cuda" and triton_unfit is None and triton_runs_on(x.device):
            return "triton"
        return "torch"
    if backend != "torch" and unfusable is not None:
        raise ValueError(f"{label}: backend {backend!r} {unfusable}; use backend='torch' or 'auto'")
    if backend in ("cpu", "cuda"):
        key = backend.upper()
        if device != backend:
            raise ValueError(f"{label}: backend {backend!r} needs {backend} tensors, got {x.device}")
        if not extension.has_kernel(op, key):
            why = extension.unavailable_reason or f"the extension was built without {key} kernels"
            raise RuntimeError(f"{label}: backend {backend!r} is unavailable ({why})")
    if backend == "cuda" and cuda_unfit is not None:
        raise ValueError(f"{label}: backend 'cuda' {cuda_unfit}; use backend='triton', 'torch' or 'auto'")
    if backend == "triton" and triton_unfit is not None:
        raise ValueError(f"{label}: backend 'triton' {triton_unfit}; use backend='cuda', 'torch' or 'auto'")
    if backend == "triton" and not triton_runs_on(x.device):
        raise RuntimeError(f"{label}: backend 'triton' needs triton and CUDA tensors "
                           "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
    return backend


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Backends of ``combine`` that can run on ``device`` in this process (besides "auto")."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and extension.has_kernel("combine", "CPU"):
        out.append("cpu")
    if triton_runs_on(device):
        out.append("triton")
    if device.type == "cuda" and extension.has_kernel("combine", "CUDA"):
        out.append("cuda")
    return out
