"""Typed wrappers of stg_ext's ops: argument checks, backend choice, and the fake (meta) kernels.

Backends of every op:
  "torch"  - the plain PyTorch reference (stg_ext.reference), the oracle of the others;
  "cpu"    - the C++ op torch.ops.stg_ext.<op> (CPU tensors), from the compiled extension;
  "triton" - a torch.library.triton_op (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  "cuda"   - the CUDA kernel behind torch.ops.stg_ext.<op> (needs a CUDA build of the extension);
  "auto"   - the fastest one available for the tensors' device, dtype and arguments.
"""
from __future__ import annotations

import importlib.util
import math
import os
from numbers import Real
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _ext
from .reference import cfg_reference, combine_reference, identity_joint_attention_reference

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The fused kernels take plain STG (one perturbed prediction) or factorized STG (two).
MAX_FUSED_PERTURBED = 2

if _ext.available():

    @torch.library.register_fake("stg_ext::combine")
    def _combine_fake(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold):
        return torch.empty_like(cond, memory_format=torch.contiguous_format)

    @torch.library.register_fake("stg_ext::identity_joint_attention")
    def _identity_joint_attention_fake(q_video, k_video, v_video, k_text, v_text, text_bias, scale):
        return q_video.new_empty(q_video.shape, dtype=v_video.dtype)  # contiguous, like the kernels' output


TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _triton_runs_on(device: torch.device) -> bool:
    if not TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return True
    # The Triton interpreter runs kernels on CPU tensors (tests; slow).
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_list(perturbed, stg_scale) -> Tuple[List[torch.Tensor], List[float]]:
    if isinstance(perturbed, torch.Tensor):
        if isinstance(stg_scale, (tuple, list)):
            raise ValueError("stg_ext.combine: one perturbed tensor takes one float stg_scale, "
                             f"got a sequence of {len(stg_scale)}")
        return [perturbed], [_real(stg_scale, "stg_scale")]
    if not isinstance(perturbed, (tuple, list)) or not perturbed:
        raise TypeError("stg_ext.combine: perturbed must be a tensor or a non-empty tuple of tensors, "
                        f"got {type(perturbed).__name__}")
    if not isinstance(stg_scale, (tuple, list)) or len(stg_scale) != len(perturbed):
        got = len(stg_scale) if isinstance(stg_scale, (tuple, list)) else "a single float"
        raise ValueError(f"stg_ext.combine: {len(perturbed)} perturbed tensors need a tuple of "
                         f"{len(perturbed)} stg_scale values, got {got}")
    return list(perturbed), [_real(s, "stg_scale") for s in stg_scale]


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"stg_ext.combine: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_like(t: torch.Tensor, cond: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"stg_ext.combine: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != cond.shape:
        raise ValueError(f"stg_ext.combine: {name} has shape {tuple(t.shape)}, cond has {tuple(cond.shape)}; "
                         "they must match")
    if t.dtype != cond.dtype:
        raise ValueError(f"stg_ext.combine: {name} has dtype {t.dtype}, cond has {cond.dtype}; they must match")
    if t.device != cond.device:
        raise ValueError(f"stg_ext.combine: {name} is on {t.device}, cond on {cond.device}; they must match")


def _check_cfg(cfg_scale, cond: torch.Tensor, fold: bool):
    if isinstance(cfg_scale, torch.Tensor):
        try:
            torch.broadcast_shapes(cfg_scale.shape, cond.shape)
        except RuntimeError:
            raise ValueError(f"stg_ext.combine: cfg_scale tensor of shape {tuple(cfg_scale.shape)} does not "
                             f"broadcast to cond's shape {tuple(cond.shape)}") from None
        if torch.broadcast_shapes(cfg_scale.shape, cond.shape) != cond.shape:
            raise ValueError(f"stg_ext.combine: cfg_scale tensor of shape {tuple(cfg_scale.shape)} would "
                             f"broadcast cond {tuple(cond.shape)} to a larger shape")
        if cfg_scale.device != cond.device:
            raise ValueError(f"stg_ext.combine: cfg_scale is on {cfg_scale.device}, cond on {cond.device}")
        # A per-element scale may contain 1 (SVD's first frame: fold is the identity there); 0 is singular.
        if fold and not torch.compiler.is_compiling() and bool((cfg_scale == 0).any()):
            raise ValueError("stg_ext.combine: fold=True divides by cfg_scale; the cfg_scale tensor has zeros")
        return cfg_scale
    g = _real(cfg_scale, "cfg_scale")
    if fold and g in (0.0, 1.0):
        raise ValueError(f"stg_ext.combine: fold=True needs cfg_scale != 0 and != 1, got {g}: with g = 1 the "
                         "pipeline applies no CFG combination, so there is nothing to fold into (use fold=False)")
    return g


def _resolve_op_backend(op: str, label: str, backend: str, x: torch.Tensor, unfusable: Optional[str] = None,
                        cuda_unfit: Optional[str] = None) -> str:
    """The backend that runs `op` on tensors like `x` (see the module docstring for "auto").

    unfusable: None, or why no fused backend takes these arguments ("takes dtypes ... (got ...)");
    cuda_unfit: None, or why the CUDA kernel does not (others may still)."""
    if backend not in BACKENDS:
        raise ValueError(f"{label}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    device = x.device.type
    if backend == "auto":
        if unfusable is not None:
            return "torch"
        if device == "cpu" and _ext.has_kernel(op, "CPU"):
            return "cpu"
        if device == "cuda" and cuda_unfit is None and _ext.has_kernel(op, "CUDA"):
            return "cuda"
        if device == "cuda" and _triton_runs_on(x.device):
            return "triton"
        return "torch"
    if backend != "torch" and unfusable is not None:
        raise ValueError(f"{label}: backend {backend!r} {unfusable}; use backend='torch' or 'auto'")
    if backend in ("cpu", "cuda"):
        key = backend.upper()
        if device != backend:
            raise ValueError(f"{label}: backend {backend!r} needs {backend} tensors, got {x.device}")
        if not _ext.has_kernel(op, key):
            why = _ext.unavailable_reason or f"the extension was built without {key} kernels"
            raise RuntimeError(f"{label}: backend {backend!r} is unavailable ({why})")
    if backend == "cuda" and cuda_unfit is not None:
        raise ValueError(f"{label}: backend 'cuda' {cuda_unfit}; use backend='triton', 'torch' or 'auto'")
    if backend == "triton" and not _triton_runs_on(x.device):
        raise RuntimeError(f"{label}: backend 'triton' needs triton and CUDA tensors "
                           "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
    return backend


def _resolve_backend(backend: str, cond: torch.Tensor, n_perturbed: int) -> str:
    unfusable = None
    if cond.dtype not in FUSED_DTYPES or n_perturbed > MAX_FUSED_PERTURBED:
        unfusable = (f"takes dtypes {', '.join(str(d) for d in FUSED_DTYPES)} and at most {MAX_FUSED_PERTURBED} "
                     f"perturbed tensors (got {cond.dtype}, {n_perturbed})")
    return _resolve_op_backend("combine", "stg_ext.combine", backend, cond, unfusable)


def combine(
    cond: torch.Tensor,
    perturbed: Union[torch.Tensor, Sequence[torch.Tensor]],
    uncond: Optional[torch.Tensor] = None,
    *,
    cfg_scale: Union[float, torch.Tensor] = 1.0,
    stg_scale: Union[float, Sequence[float]] = 1.0,
    rescale: float = 0.0,
    orthogonalize: bool = False,
    fold: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """STG guidance combination (STG_SPEC section 2).

    ``f = u + g (c - u) + s (c - p)``; with ``uncond=None``, ``f = c + s (c - p)`` (Algorithm 1);
    ``perturbed=(p_s, p_t)`` with ``stg_scale=(w1, w2)`` gives factorized guidance (Algorithm 2), and
    ``orthogonalize=True`` projects ``c - p_t`` off ``c - p_s`` per sample (Algorithm 5).
    ``rescale=r`` multiplies ``f`` by ``r std(c)/std(f) + 1 - r`` per sample (Algorithm 4).
    ``fold=True`` returns ``c' = u + (f - u)/g`` instead, so a caller that applies plain CFG ends with ``f``.

    All STG scales 0 with ``rescale=0`` returns exactly what plain CFG gives (``u + g (c - u)`` in the
    inputs' dtype, or ``cond`` itself when folding), bit for bit. Otherwise the math runs in fp32 and the
    result has ``cond``'s dtype and shape.
    """
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"stg_ext.combine: cond must be a tensor, got {type(cond).__name__}")
    if not cond.is_floating_point():
        raise ValueError(f"stg_ext.combine: cond must be a floating-point tensor, got {cond.dtype}")
    plist, scales = _as_list(perturbed, stg_scale)
    for i, p in enumerate(plist):
        _check_like(p, cond, f"perturbed[{i}]" if len(plist) > 1 else "perturbed")
    if uncond is not None:
        _check_like(uncond, cond, "uncond")
    rescale = _real(rescale, "rescale")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"stg_ext.combine: rescale must be in [0, 1], got {rescale}")
    if orthogonalize and len(plist) != 2:
        raise ValueError("stg_ext.combine: orthogonalize=True needs perturbed=(p_spatial, p_temporal), "
                         f"got {len(plist)} perturbed tensor(s)")
    if fold and uncond is None:
        raise ValueError("stg_ext.combine: fold=True needs uncond (it folds f into a CFG call's cond slot)")
    g = _check_cfg(cfg_scale, cond, fold)
    chosen = _resolve_backend(backend, cond, len(plist))

    if rescale == 0.0 and all(s == 0.0 for s in scales):
        # Exactly the stock pipeline's result: no fp32 round trip, no fused arithmetic.
        return cond.clone() if fold else cfg_reference(cond, uncond, g)

    if chosen == "torch":
        return combine_reference(cond, plist, uncond, g, scales, rescale, orthogonalize, fold)

    cfg_tensor = None
    if isinstance(g, torch.Tensor):
        cfg_tensor = g.to(torch.float32).expand(cond.shape).contiguous()
        g = 1.0
    args = (cond, plist, uncond, cfg_tensor, g, scales, rescale, orthogonalize, fold)
    if chosen == "triton":
        from .kernels import combine_triton

        return combine_triton.combine_triton(*args)
    return torch.ops.stg_ext.combine(*args)


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Backends of ``combine`` that can run on ``device`` in this process (besides "auto")."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and _ext.has_kernel("combine", "CPU"):
        out.append("cpu")
    if _triton_runs_on(device):
        out.append("triton")
    if device.type == "cuda" and _ext.has_kernel("combine", "CUDA"):
        out.append("cuda")
    return out


_ATTENTION = "stg_ext.identity_joint_attention"
# Head dims the CUDA kernel takes (csrc/cuda/identity_attention_cuda.cuh); larger ones use Triton or torch.
CUDA_ATTENTION_MAX_HEAD_DIM = 256


def _resolve_attention_backend(backend: str, q: torch.Tensor) -> str:
    unfusable = cuda_unfit = None
    if q.dtype not in FUSED_DTYPES:
        unfusable = f"takes dtypes {', '.join(str(d) for d in FUSED_DTYPES)} (got {q.dtype})"
    if q.shape[-1] > CUDA_ATTENTION_MAX_HEAD_DIM:
        cuda_unfit = f"takes head dims up to {CUDA_ATTENTION_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return _resolve_op_backend("identity_joint_attention", _ATTENTION, backend, q, unfusable, cuda_unfit)


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

    ``backend``: "torch" (the reference), "cpu" (C++ op), "cuda" (CUDA op, head dims up to 256), "triton",
    or "auto" (the C++ op on CPU, CUDA then Triton on CUDA, else the reference).
    """
    scale = _check_attention_args(q_video, k_video, v_video, k_text, v_text, text_bias, scale)
    chosen = _resolve_attention_backend(backend, q_video)
    if chosen == "torch":
        return identity_joint_attention_reference(q_video, k_video, v_video, k_text, v_text, text_bias, scale)
    bias = None if text_bias is None else text_bias.to(torch.float32)
    args = (q_video, k_video, v_video, k_text, v_text, bias, scale)
    if chosen == "triton":
        from .kernels import identity_attention_triton

        return identity_attention_triton.identity_joint_attention_triton(*args)
    return torch.ops.stg_ext.identity_joint_attention(*args)
