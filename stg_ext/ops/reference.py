"""Plain PyTorch references: the oracle every fast path is compared with.

Written for reading, not for speed. Every formula follows ``shared/STG_SPEC.md`` section 2 literally:
no algebraic shortcuts that a kernel might share with it (the kernels expand the variance of ``f``
analytically; this file computes ``f`` and takes its ``std`` directly).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Scale = Union[float, torch.Tensor]


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    """Population std of each sample over every non-batch dimension, shaped to broadcast against x.

    The correction (biased or unbiased) cancels in the ratio std(c)/std(f); population std also
    stays finite for one-element samples. Taken of x minus each sample's first element (std is shift
    invariant): a constant sample then has std exactly 0 (factor 1, as the spec says), not rounding noise.
    """
    dims = list(range(1, x.ndim))
    if not dims or x.numel() == 0:  # scalars or empty samples: zero spread
        return torch.zeros([x.shape[0]] + [1] * len(dims), dtype=x.dtype, device=x.device) if dims else torch.zeros_like(x)
    first = x.flatten(1)[:, :1].reshape([x.shape[0]] + [1] * len(dims))
    return (x - first).std(dim=dims, correction=0, keepdim=True)


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dims = list(range(1, a.ndim))
    if not dims:
        return a * b
    return (a * b).sum(dim=dims, keepdim=True)


def combine_reference(
    cond: torch.Tensor,
    perturbed: Sequence[torch.Tensor],
    uncond: Optional[torch.Tensor],
    cfg_scale: Scale,
    stg_scales: Sequence[float],
    rescale: float,
    orthogonalize: bool,
    fold: bool,
) -> torch.Tensor:
    """STG guidance combination (STG_SPEC section 2), computed in fp32 (fp64 for fp64 inputs), returned in
    ``cond``'s dtype.

    ``perturbed`` and ``stg_scales`` have equal length (1 for plain STG, 2 for factorized guidance:
    spatial first, then temporal). Inputs are assumed validated (see ``stg_ext.ops.combine``).
    """
    compute = torch.promote_types(cond.dtype, torch.float32)
    c = cond.to(compute)
    u = uncond.to(compute) if uncond is not None else None
    g = cfg_scale.to(compute) if isinstance(cfg_scale, torch.Tensor) else float(cfg_scale)

    # CFG part, or the conditional prediction alone (Algorithm 1).
    f = u + g * (c - u) if u is not None else c.clone()

    diffs = [c - p.to(compute) for p in perturbed]
    if orthogonalize:
        d_s, d_t = diffs
        dot_ts = _per_sample_dot(d_t, d_s)
        dot_ss = _per_sample_dot(d_s, d_s)
        coeff = torch.where(dot_ss == 0, torch.zeros_like(dot_ss), dot_ts / dot_ss)
        diffs = [d_s, d_t - coeff * d_s]
    for s, d in zip(stg_scales, diffs):
        f = f + float(s) * d

    if rescale > 0:
        std_c = _per_sample_std(c)
        std_f = _per_sample_std(f)
        ratio = torch.where(std_f == 0, torch.ones_like(std_f), std_c / std_f)
        factor = rescale * ratio + (1.0 - rescale)
        f = f * factor

    if fold:
        # c' with u + g (c' - u) = f: a pipeline's own CFG line then produces f.
        f = u + (f - u) / g
    return f.to(cond.dtype)


def cfg_reference(cond: torch.Tensor, uncond: Optional[torch.Tensor], cfg_scale: Scale) -> torch.Tensor:
    """What a stock pipeline computes without STG, in the inputs' own dtype (no upcast)."""
    if uncond is None:
        return cond.clone()
    return uncond + cfg_scale * (cond - uncond)


def identity_joint_attention_reference(
    q_video: torch.Tensor,
    k_video: torch.Tensor,
    v_video: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    text_bias: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """STG-A for joint attention (STG_SPEC section 3): each video query attends to itself and the text keys.

    Shapes (B, H, N, D) for video and (B, H, T, D) for text; ``text_bias`` is added to the text logits
    (broadcastable to (B, H, N, T); -inf masks a text key out), or None. A softmax over ``1 + T`` logits per
    video query, in fp32; the result has ``v_video``'s dtype.
    """
    qf, kvf, vvf = q_video.float(), k_video.float(), v_video.float()
    self_logit = (qf * kvf).sum(-1, keepdim=True) * scale
    text_logits = qf @ k_text.float().transpose(-1, -2) * scale
    if text_bias is not None:
        text_logits = text_logits + text_bias.float()
    weights = torch.softmax(torch.cat([self_logit, text_logits], dim=-1), dim=-1)
    out = weights[..., :1] * vvf + weights[..., 1:] @ v_text.float()
    return out.to(v_video.dtype)
