"""Triton backend of the STG guidance combination (STG_SPEC section 2): `torch.ops.stg_ext.combine_triton`.

Same arguments and result as the C++ op `torch.ops.stg_ext.combine`, and the same math
(csrc/combine_math.h), in two kernels:
  pass 1 (only with rescale > 0 or orthogonalize): per (sample, block) fp32 partial sums of the nine
         quantities of combine_math.h; torch sums them over blocks in fp64 and derives, per sample, the
         orthogonalization coefficient alpha and the rescale factor (sample_coeffs<double>);
  pass 2: writes f = (a + alpha b) * factor, or its folded form, per element.
Like the C++ and CUDA kernels, pass 1 accumulates c, a and b relative to the sample's first element
(combine_math.h's SampleShift): variances are shift invariant, and a constant or one-element sample then
has variance exactly 0 (factor 1) instead of fp32 rounding noise.

Registered with torch.library.triton_op and launched through wrap_triton, so torch.compile traces it.
"""
from __future__ import annotations

import os
import struct
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program. The interpreter pays ~3.5 ms per program instance whatever its size, so it gets
# huge blocks; on a GPU a few thousand elements per program keeps every SM busy (not tuned: no GPU here).
BLOCK = 65536 if _INTERPRET else 2048
NUM_SUMS = 9  # kSumC, kSumC2, kSumA, kSumA2, kSumB, kSumAB, kSumB2, kDotTS, kDotSS (combine_math.h order)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, offs, mask, cfg_scale, stg0, stg1,
           HAS_UNCOND: tl.constexpr, HAS_CFG: tl.constexpr, TWO: tl.constexpr, ORTHO: tl.constexpr):
    """Loads one block (or one element) in fp32 and returns (c, u, g, a, b, d0, d1): element_terms()."""
    c = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d0 = c - tl.load(p0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        g = tl.load(cfg_ptr + offs, mask=mask, other=1.0)  # 1, not 0: masked lanes of fold must not divide by 0
    else:
        g = cfg_scale
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        base = u + g * (c - u)
    else:
        u = 0.0
        base = c
    a = base + stg0 * d0
    if TWO:
        d1 = c - tl.load(p1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = a + stg1 * d1
    else:
        d1 = tl.zeros_like(d0)
    if ORTHO:
        b = -stg1 * d0
    else:
        b = tl.zeros_like(d0)
    return c, u, g, a, b, d0, d1


@triton.jit
def _reduce_kernel(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, partial_ptr, n_per_sample, cfg_scale, stg0,
                   stg1, HAS_UNCOND: tl.constexpr, HAS_CFG: tl.constexpr, TWO: tl.constexpr,
                   ORTHO: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (blocks per sample, batch): the block's fp32 sums of the nine quantities -> partial[b, k, :]."""
    k = tl.program_id(0)  # blocks on axis 0: a GPU grid's axis 1 stops at 65535
    b = tl.program_id(1)
    start = b.to(tl.int64) * n_per_sample  # int64 before multiplying: samples can exceed 2**31 elements total
    idx = k.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_per_sample
    c, u, g, a, bb, d0, d1 = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, start + idx, mask, cfg_scale,
                                    stg0, stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
    # Shift c, a, b by their values at the sample's first element: a constant sample then sums to exactly 0
    # (E[x^2] - E[x]^2 would leave fp32 rounding noise), and large means cancel less precision.
    c_0, _, _, a_0, b_0, _, _ = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, start, start >= 0,
                                       cfg_scale, stg0, stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
    c = tl.where(mask, c - c_0, 0.0)  # masked lanes loaded 0, which is not 0 once shifted
    a = tl.where(mask, a - a_0, 0.0)
    bb = tl.where(mask, bb - b_0, 0.0)
    out = partial_ptr + (b.to(tl.int64) * tl.num_programs(0) + k) * 9  # 9 = NUM_SUMS, in combine_math.h order
    tl.store(out + 0, tl.sum(c, axis=0))
    tl.store(out + 1, tl.sum(c * c, axis=0))
    tl.store(out + 2, tl.sum(a, axis=0))
    tl.store(out + 3, tl.sum(a * a, axis=0))
    tl.store(out + 4, tl.sum(bb, axis=0))
    tl.store(out + 5, tl.sum(a * bb, axis=0))
    tl.store(out + 6, tl.sum(bb * bb, axis=0))
    tl.store(out + 7, tl.sum(d1 * d0, axis=0))  # d0, d1 are 0 in masked lanes: no where needed
    tl.store(out + 8, tl.sum(d0 * d0, axis=0))


@triton.jit
def _write_kernel(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, alpha_ptr, factor_ptr, out_ptr, n_per_sample,
                  cfg_scale, stg0, stg1, HAS_UNCOND: tl.constexpr, HAS_CFG: tl.constexpr, TWO: tl.constexpr,
                  ORTHO: tl.constexpr, FOLD: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (blocks per sample, batch): element_output() of every element of the block."""
    k = tl.program_id(0)
    b = tl.program_id(1)
    idx = k.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_per_sample
    offs = b.to(tl.int64) * n_per_sample + idx
    c, u, g, a, bb, d0, d1 = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, offs, mask, cfg_scale, stg0,
                                    stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
    f = a
    if ORTHO:
        f = a + tl.load(alpha_ptr + b) * bb
    f = f * tl.load(factor_ptr + b)
    if FOLD:
        # c' = u + (f - u) / g: the pipeline's own u + g (c' - u) then yields f.
        f = u + (f - u) / g
    tl.store(out_ptr + offs, f.to(out_ptr.dtype.element_ty), mask=mask)


def _f32(x: float) -> float:
    """x rounded to fp32, as the C++ op's CombineScalars holds it (and as Triton receives a float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _sample_coeffs(sums: torch.Tensor, n: int, rescale: float, orthogonalize: bool):
    """sample_coeffs<double> of combine_math.h, vectorized over the batch: sums (batch, 9) fp64 ->
    (alpha, factor) fp32 of shape (batch,). Tensor-valued branches are torch.where, so this traces."""
    sc, sc2, sa, sa2, sb, sab, sb2, dts, dss = sums.unbind(1)
    zero = torch.zeros_like(dss)
    alpha = zero
    if orthogonalize:
        nonzero = dss != 0
        alpha = torch.where(nonzero, dts / torch.where(nonzero, dss, 1.0), zero)
    factor = torch.ones_like(dss)
    if rescale > 0:
        mean_c = sc / n
        var_c = sc2 / n - mean_c * mean_c
        mean_f = (sa + alpha * sb) / n
        ef2 = (sa2 + 2.0 * alpha * sab + alpha * alpha * sb2) / n
        var_f = ef2 - mean_f * mean_f
        spread = var_f > 0  # std(f) = 0: factor 1 (sample_coeffs in combine_math.h)
        ratio = torch.sqrt(var_c.clamp_min(0.0) / torch.where(spread, var_f, 1.0))
        r = _f32(rescale)
        factor = torch.where(spread, r * ratio + (1.0 - r), factor)
    return alpha.to(torch.float32), factor.to(torch.float32)


def _check(cond, perturbed, uncond, cfg_tensor, stg_scales, rescale, orthogonalize, fold) -> None:
    # The checks of csrc/combine_check.h, for direct calls of the op (stg_ext.combine checks first).
    if cond.dtype not in _DTYPES:
        raise ValueError(f"stg_ext.combine_triton: dtype must be float32, float16 or bfloat16, got {cond.dtype}")
    if len(perturbed) not in (1, 2) or len(stg_scales) != len(perturbed):
        raise ValueError("stg_ext.combine_triton: takes 1 or 2 perturbed tensors and as many stg_scales, got "
                         f"{len(perturbed)} and {len(stg_scales)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"stg_ext.combine_triton: rescale must be in [0, 1], got {rescale}")
    if orthogonalize and len(perturbed) != 2:
        raise ValueError("stg_ext.combine_triton: orthogonalize needs two perturbed tensors")
    if fold and uncond is None:
        raise ValueError("stg_ext.combine_triton: fold=True needs uncond")
    for name, t in [(f"perturbed[{i}]", p) for i, p in enumerate(perturbed)] + [("uncond", uncond)]:
        if t is not None and (t.shape != cond.shape or t.dtype != cond.dtype or t.device != cond.device):
            raise ValueError(f"stg_ext.combine_triton: {name} must match cond's shape, dtype and device")
    if cfg_tensor is not None and (cfg_tensor.shape != cond.shape or cfg_tensor.dtype != torch.float32
                                   or cfg_tensor.device != cond.device):
        raise ValueError("stg_ext.combine_triton: cfg_tensor must be float32 with cond's shape and device")


@triton_op("stg_ext::combine_triton", mutates_args=())
def _combine_triton_op(cond: torch.Tensor, perturbed: List[torch.Tensor], uncond: Optional[torch.Tensor],
                       cfg_tensor: Optional[torch.Tensor], cfg_scale: float, stg_scales: List[float],
                       rescale: float, orthogonalize: bool, fold: bool) -> torch.Tensor:
    _check(cond, perturbed, uncond, cfg_tensor, stg_scales, rescale, orthogonalize, fold)
    # The kernels index raw storage: everything they read must be contiguous.
    cond = cond.contiguous()
    p0 = perturbed[0].contiguous()
    two = len(perturbed) == 2
    p1 = perturbed[1].contiguous() if two else cond  # dummies stand in for absent pointers (never read)
    u = uncond.contiguous() if uncond is not None else cond
    cfg = cfg_tensor.contiguous() if cfg_tensor is not None else cond
    out = torch.empty_like(cond, memory_format=torch.contiguous_format)

    batch = cond.shape[0] if cond.dim() > 0 else 1
    if cond.numel() == 0:
        return out
    n = cond.numel() // batch
    nblocks = triton.cdiv(n, BLOCK)
    grid = (nblocks, batch)
    stg0 = float(stg_scales[0])
    stg1 = float(stg_scales[1]) if two else 0.0
    flags = dict(HAS_UNCOND=uncond is not None, HAS_CFG=cfg_tensor is not None, TWO=two, ORTHO=orthogonalize)

    if rescale > 0 or orthogonalize:
        partial = torch.empty((batch, nblocks, NUM_SUMS), dtype=torch.float32, device=cond.device)
        wrap_triton(_reduce_kernel)[grid](cond, u, cfg, p0, p1, partial, n, cfg_scale, stg0, stg1, **flags,
                                          BLOCK=BLOCK)
        # Blocks are summed in fp64, as the C++ op does with its fp32 chunk sums.
        alpha, factor = _sample_coeffs(partial.to(torch.float64).sum(dim=1), n, rescale, orthogonalize)
    else:
        alpha = torch.zeros(batch, dtype=torch.float32, device=cond.device)
        factor = torch.ones(batch, dtype=torch.float32, device=cond.device)
    wrap_triton(_write_kernel)[grid](cond, u, cfg, p0, p1, alpha, factor, out, n, cfg_scale, stg0, stg1, **flags,
                                     FOLD=fold, BLOCK=BLOCK)
    return out


def combine_triton(cond: torch.Tensor, perturbed: List[torch.Tensor], uncond: Optional[torch.Tensor],
                   cfg_tensor: Optional[torch.Tensor], cfg_scale: float, stg_scales: List[float], rescale: float,
                   orthogonalize: bool, fold: bool) -> torch.Tensor:
    """Same arguments and result as torch.ops.stg_ext.combine (see stg_ext.ops.combine for the meaning)."""
    return torch.ops.stg_ext.combine_triton(cond, list(perturbed), uncond, cfg_tensor, float(cfg_scale),
                                            [float(s) for s in stg_scales], float(rescale), bool(orthogonalize),
                                            bool(fold))
