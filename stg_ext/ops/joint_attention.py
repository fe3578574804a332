"""`stg_ext.identity_joint_attention`: STG-A on joint attention, its argument checks and backend choice."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from .backends import FUSED_DTYPES, resolve_op_backend
from .reference import identity_joint_attention_reference

_ATTENTION = "stg_ext.identity_joint_attention"
# Head dims the CUDA kernel takes (csrc/cuda/identity_attention_cuda.cuh); larger ones use Triton or torch.
CUDA_ATTENTION_MAX_HEAD_DIM = 256
TRITON_ATTENTION_MAX_HEAD_DIM = 128  # kernels/identity_attention_triton.py MAX_HEAD_DIM


def resolve_attention_backend(backend: str, q: torch.Tensor) -> str:
    unfusable = cuda_unfit = None
    if q.dtype not in FUSED_DTYPES:
        unfusable = f"takes dtypes {', '.join(str(d) for d in FUSED_DTYPES)} (got {q.dtype})"
    if q.shape[-1] > CUDA_ATTENTION_MAX_HEAD_DIM:
        cuda_unfit = f"takes head dims up to {CUDA_ATTENTION_MAX_HEAD_DIM}, got {q.shape[-1]}"
    triton_unfit = None
    if q.dim() == 4 and q.shape[-1] > TRITON_ATTENTION_MAX_HEAD_DIM:  # its launch configs are sized for <= 128
        triton_unfit = f"takes head dims up to {TRITON_ATTENTION_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return resolve_op_backend("identity_joint_attention", _ATTENTION, backend, q, unfusable, cuda_unfit,
                              triton_unfit)


def _check_attention_args(q_video, k_video, v_video, k_text, v_text, text_bias, scale) -> float:
    """The wrapper's checks (the C++ and Triton ops repeat them); returns the softmax scale as a float."""
    tensors = (("q_video", q_video), ("k_video", k_video), ("v_video", v_video), ("k_text", k_text),
               ("v_text", v_text))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_ATTENTION}: {name} must be a tensor, got {type(t).__name__}")
    if q_video.dim() != 4:
        raise ValueError(f"{_ATTENTION}: q_video must be (B, H, N, D), got shape {tuple(q_video.shape)}")
    if not q_video.is_floating_point():
        raise ValueError(f"{_ATTENTION}: q_video must be a floating-point tensor, got {q_video.dtype}")
    for name, t in (("k_video", k_video), ("v_video", v_video)):
        if t.shape != q_video.shape:
            raise ValueError(f"{_ATTENTION}: {name} has shape {tuple(t.shape)}, q_video has "
                             f"{tuple(q_video.shape)}; they must match")
    B, H, N, D = q_video.shape
    if (k_text.dim() != 4 or k_text.shape != v_text.shape
            or (k_text.shape[0], k_text.shape[1], k_text.shape[3]) != (B, H, D)):
        raise ValueError(f"{_ATTENTION}: k_text/v_text must be (B, H, T, D) matching q_video "
                         f"{tuple(q_video.shape)}; got {tuple(k_text.shape)} and {tuple(v_text.shape)}")
    for name, t in tensors[1:]:
        if t.dtype != q_video.dtype:
            raise ValueError(f"{_ATTENTION}: {name} has dtype {t.dtype}, q_video has {q_video.dtype}; they must match")
        if t.device != q_video.device:
            raise ValueError(f"{_ATTENTION}: {name} is on {t.device}, q_video on {q_video.device}; they must match")
    if text_bias is not None:
        if not isinstance(text_bias, torch.Tensor):
            raise TypeError(f"{_ATTENTION}: text_bias must be a tensor or None, got {type(text_bias).__name__}")
        if not text_bias.is_floating_point():
            raise ValueError(f"{_ATTENTION}: text_bias must be an additive floating-point mask (-inf hides a key), "
                             f"got {text_bias.dtype}")
        target = (B, H, N, k_text.shape[2])
        try:
            ok = torch.broadcast_shapes(text_bias.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{_ATTENTION}: text_bias of shape {tuple(text_bias.shape)} does not broadcast to "
                             f"(B, H, N, T) = {target}")
        if text_bias.device != q_video.device:
            raise ValueError(f"{_ATTENTION}: text_bias is on {text_bias.device}, q_video on {q_video.device}")
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"{_ATTENTION}: scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def identity_joint_attention(
    q_video: torch.Tensor,
    k_video: torch.Tensor,
    v_video: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    *,
    text_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """STG-A on joint attention: each video query attends to itself and the text keys only.

    Video tensors (B, H, N, D), text tensors (B, H, T, D), all of one dtype and device; ``text_bias`` an
    additive mask (-inf hides a text key) broadcastable to (B, H, N, T), or None; ``scale`` defaults to
    D^-1/2. ``out[b, h, i] = softmax([q_i . k_i, q_i . K_text^T] * scale + [0, bias]) @ [v_i; V_text]``, in
    fp32, returned in ``v_video``'s dtype. Cost O(N (T + 1) D) instead of attention's
    O((N + T)^2 D). With T = 0, or every text key masked, the result is ``v_video``.

    ``backend``: "torch" (the reference), "cpu" (C++ op), "cuda" (CUDA op, head dims up to 256), "triton" (up to 128),
    or "auto" (the C++ op on CPU, CUDA then Triton on CUDA, else the reference).
    """
    scale = _check_attention_args(q_video, k_video, v_video, k_text, v_text, text_bias, scale)
    chosen = resolve_attention_backend(backend, q_video)
    if chosen == "torch":
        return identity_joint_attention_reference(q_video, k_video, v_video, k_text, v_text, text_bias, scale)
    bias = None if text_bias is None else text_bias.to(torch.float32)
    args = (q_video, k_video, v_video, k_text, v_text, bias, scale)
    if chosen == "triton":
        from ..kernels import identity_attention_triton

        return identity_attention_triton.identity_joint_attention_triton(*args)
    return torch.ops.stg_ext.identity_joint_attention(*args)
