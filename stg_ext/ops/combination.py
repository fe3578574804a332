"""`stg_ext.combine`: the guidance combination (STG_SPEC section 2), its argument checks and backend choice."""
from __future__ import annotations

from numbers import Real
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .backends import FUSED_DTYPES, resolve_op_backend
from .reference import cfg_reference, combine_reference

# The fused kernels take plain STG (one perturbed prediction) or factorized STG (two).
MAX_FUSED_PERTURBED = 2


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


def _check_cfg(cfg_scale, cond: torch.Tensor, fold: bool, cfg_checked: bool = False):
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
        if fold and not cfg_checked and not torch.compiler.is_compiling() and bool((cfg_scale == 0).any()):
            raise ValueError("stg_ext.combine: fold=True divides by cfg_scale; the cfg_scale tensor has zeros")
        return cfg_scale
    g = _real(cfg_scale, "cfg_scale")
    if fold and g in (0.0, 1.0):
        raise ValueError(f"stg_ext.combine: fold=True needs cfg_scale != 0 and != 1, got {g}: with g = 1 the "
                         "pipeline applies no CFG combination, so there is nothing to fold into (use fold=False)")
    return g


def _resolve_backend(backend: str, cond: torch.Tensor, n_perturbed: int) -> str:
    unfusable = None
    if cond.dtype not in FUSED_DTYPES or n_perturbed > MAX_FUSED_PERTURBED:
        unfusable = (f"takes dtypes {', '.join(str(d) for d in FUSED_DTYPES)} and at most {MAX_FUSED_PERTURBED} "
                     f"perturbed tensors (got {cond.dtype}, {n_perturbed})")
    return resolve_op_backend("combine", "stg_ext.combine", backend, cond, unfusable)


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
    cfg_checked: bool = False,
) -> torch.Tensor:
    """STG guidance combination (STG_SPEC section 2).

    ``f = u + g (c - u) + s (c - p)``; with ``uncond=None``, ``f = c + s (c - p)`` (Algorithm 1);
    ``perturbed=(p_s, p_t)`` with ``stg_scale=(w1, w2)`` gives factorized guidance (Algorithm 2), and
    ``orthogonalize=True`` projects ``c - p_t`` off ``c - p_s`` per sample (Algorithm 5).
    ``rescale=r`` multiplies ``f`` by ``r std(c)/std(f) + 1 - r`` per sample (Algorithm 4).
    ``fold=True`` returns ``c' = u + (f - u)/g`` instead, so a caller that applies plain CFG ends with ``f``.
    ``cfg_checked=True``: the caller has checked a cfg_scale tensor for zeros already (that check reads the tensor
    on the host: a device sync, which a sampling loop does once per run, not at every step).

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
    exact = rescale == 0.0 and all(s == 0.0 for s in scales)  # the documented stock path (below)
    if cond.dim() <= 1:
        # Each sample is one element (or the tensor a scalar): its spread is 0 by definition, so the rescale factor
        # is 1 (the reference's rule), also for an infinite element, whose variance the kernels would make NaN.
        rescale = 0.0
    if orthogonalize and len(plist) != 2:
        raise ValueError("stg_ext.combine: orthogonalize=True needs perturbed=(p_spatial, p_temporal), "
                         f"got {len(plist)} perturbed tensor(s)")
    if fold and uncond is None:
        raise ValueError("stg_ext.combine: fold=True needs uncond (it folds f into a CFG call's cond slot)")
    g = _check_cfg(cfg_scale, cond, fold, cfg_checked)
    chosen = _resolve_backend(backend, cond, len(plist))

    if exact:
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
        from ..kernels import combine_triton

        return combine_triton.combine_triton(*args)
    return torch.ops.stg_ext.combine(*args)
