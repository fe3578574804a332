"""Triton backend of the STG guidance combination (STG_SPEC section 2): `torch.ops.stg_ext.combine_triton`.

Same arguments and result as the C++ op `torch.ops.stg_ext.combine`, and the same math
(csrc/combine_math.h), in up to three kernels:
  reduce (only with rescale > 0 or orthogonalize): per (sample, chunk of REDUCE_CHUNK elements) fp32 partial
         sums of the nine quantities of combine_math.h;
  coeffs (same condition): one program per sample adds its partials in fp64, in a fixed order, and derives
         the orthogonalization coefficient alpha and the rescale factor (sample_coeffs<double>), so no string
         of small torch ops runs between the other two;
  write: f = (a + alpha b) * factor, or its folded form, per element.
Like the C++ and CUDA kernels, the reduction accumulates c, a and b relative to the sample's first element
(combine_math.h's SampleShift): variances are shift invariant, and a constant or one-element sample then
has variance exactly 0 (factor 1) instead of fp32 rounding noise.

Registered with torch.library.triton_op and launched through wrap_triton, so torch.compile traces it.
`launch_plan` lists the launches of one call without running them (the compile tests build exactly those).
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NUM_SUMS = 9  # kSumC, kSumC2, kSumA, kSumA2, kSumB, kSumAB, kSumB2, kDotTS, kDotSS (combine_math.h order)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configurations. combine is memory-bound: 3-5 input streams and one output per element, ~2 flops per
# byte, so what matters is enough bytes in flight per SM and wide accesses, not arithmetic.
# - The interpreter pays ~3.5 ms per program instance whatever its size: one huge block, one config.
# - write (GPU): BLOCK elements per program, num_warps * 32 threads; with BLOCK = 2048 and 4 warps a thread
#   holds 16 consecutive elements per stream, i.e. four 16-byte loads (fp32) or two (16-bit): ptxas emits
#   ld.global.v4 when the pointers are 16-byte aligned (Triton specializes on that) and the block is
#   contiguous. A few thousand elements per program leaves >= 4 programs per SM for a 1M-element sample on
#   132 SMs. Autotuned (once per sample size): the best size/warps pair depends on the GPU's bandwidth and
#   occupancy, and every config writes bit-identical results (each element is computed alone).
# - reduce (GPU): NOT autotuned: the fp32 partial sums depend on how elements are grouped, so one fixed
#   configuration keeps the result independent of the machine and of tuning. A program sums REDUCE_CHUNK
#   elements in BLOCK-wide steps (4 warps: 8 elements per thread per step, 2 x 16-byte loads per fp32
#   stream), which bounds the partials (REDUCE_CHUNK / BLOCK = 8 steps of loads in flight per program).
# - coeffs: one program per sample over its partials in COEFF_CHUNK rows; negligible time.
if _INTERPRET:
    REDUCE_CHUNK = REDUCE_BLOCK = 65536
    REDUCE_WARPS = 4
    WRITE_CONFIGS = [triton.Config({"BLOCK": 65536}, num_warps=4)]
else:
    REDUCE_CHUNK, REDUCE_BLOCK, REDUCE_WARPS = 8192, 1024, 4
    WRITE_CONFIGS = [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=4),
        triton.Config({"BLOCK": 4096}, num_warps=8),
    ]
COEFF_CHUNK = 256
COEFF_WARPS = 4


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
                   ORTHO: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (chunks per sample, batch): the chunk's fp32 sums of the nine quantities -> partial[b, k, :]."""
    k = tl.program_id(0)  # chunks on axis 0: a GPU grid's axis 1 stops at 65535
    b = tl.program_id(1)
    start = b.to(tl.int64) * n_per_sample  # int64 before multiplying: samples can exceed 2**31 elements total
    # Shift c, a, b by their values at the sample's first element: a constant sample then sums to exactly 0
    # (E[x^2] - E[x]^2 would leave fp32 rounding noise), and large means cancel less precision.
    c_0, _, _, a_0, b_0, _, _ = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, start, start >= 0,
                                       cfg_scale, stg0, stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
    s_c = tl.zeros([BLOCK], dtype=tl.float32)
    s_c2 = tl.zeros([BLOCK], dtype=tl.float32)
    s_a = tl.zeros([BLOCK], dtype=tl.float32)
    s_a2 = tl.zeros([BLOCK], dtype=tl.float32)
    s_b = tl.zeros([BLOCK], dtype=tl.float32)
    s_ab = tl.zeros([BLOCK], dtype=tl.float32)
    s_b2 = tl.zeros([BLOCK], dtype=tl.float32)
    s_ts = tl.zeros([BLOCK], dtype=tl.float32)
    s_ss = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK):
        idx = k.to(tl.int64) * CHUNK + step + tl.arange(0, BLOCK)
        mask = idx < n_per_sample
        c, u, g, a, bb, d0, d1 = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, start + idx, mask,
                                        cfg_scale, stg0, stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
        c = tl.where(mask, c - c_0, 0.0)  # masked lanes loaded 0, which is not 0 once shifted
        a = tl.where(mask, a - a_0, 0.0)
        s_c += c
        s_c2 += c * c
        s_a += a
        s_a2 += a * a
        if ORTHO:  # b, d0 d1 and d0 d0 only feed alpha: without orthogonalization they stay 0
            bb = tl.where(mask, bb - b_0, 0.0)
            s_b += bb
            s_ab += a * bb
            s_b2 += bb * bb
            s_ts += d1 * d0  # d0, d1 are 0 in masked lanes: no where needed
            s_ss += d0 * d0
    out = partial_ptr + (b.to(tl.int64) * tl.num_programs(0) + k) * 9  # 9 = NUM_SUMS, in combine_math.h order
    tl.store(out + 0, tl.sum(s_c, axis=0))
    tl.store(out + 1, tl.sum(s_c2, axis=0))
    tl.store(out + 2, tl.sum(s_a, axis=0))
    tl.store(out + 3, tl.sum(s_a2, axis=0))
    tl.store(out + 4, tl.sum(s_b, axis=0))
    tl.store(out + 5, tl.sum(s_ab, axis=0))
    tl.store(out + 6, tl.sum(s_b2, axis=0))
    tl.store(out + 7, tl.sum(s_ts, axis=0))
    tl.store(out + 8, tl.sum(s_ss, axis=0))


@triton.jit
def _coeffs_kernel(partial_ptr, coeffs_ptr, n_chunks, n_per_sample, rescale, ORTHO: tl.constexpr,
                   RESCALE: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (batch,): sample_coeffs<double> of combine_math.h from the sample's partials, summed in fp64 in
    a fixed order -> coeffs[b] = (alpha, factor) in fp32."""
    b = tl.program_id(0).to(tl.int64)
    base = partial_ptr + b * n_chunks * 9
    acc_c = tl.zeros([CHUNK], dtype=tl.float64)
    acc_c2 = tl.zeros([CHUNK], dtype=tl.float64)
    acc_a = tl.zeros([CHUNK], dtype=tl.float64)
    acc_a2 = tl.zeros([CHUNK], dtype=tl.float64)
    acc_b = tl.zeros([CHUNK], dtype=tl.float64)
    acc_ab = tl.zeros([CHUNK], dtype=tl.float64)
    acc_b2 = tl.zeros([CHUNK], dtype=tl.float64)
    acc_ts = tl.zeros([CHUNK], dtype=tl.float64)
    acc_ss = tl.zeros([CHUNK], dtype=tl.float64)
    for r0 in range(0, n_chunks, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        m = rows < n_chunks
        p = base + rows * 9
        acc_c += tl.load(p + 0, mask=m, other=0.0).to(tl.float64)
        acc_c2 += tl.load(p + 1, mask=m, other=0.0).to(tl.float64)
        acc_a += tl.load(p + 2, mask=m, other=0.0).to(tl.float64)
        acc_a2 += tl.load(p + 3, mask=m, other=0.0).to(tl.float64)
        if ORTHO:
            acc_b += tl.load(p + 4, mask=m, other=0.0).to(tl.float64)
            acc_ab += tl.load(p + 5, mask=m, other=0.0).to(tl.float64)
            acc_b2 += tl.load(p + 6, mask=m, other=0.0).to(tl.float64)
            acc_ts += tl.load(p + 7, mask=m, other=0.0).to(tl.float64)
            acc_ss += tl.load(p + 8, mask=m, other=0.0).to(tl.float64)
    n = tl.zeros([1], dtype=tl.float64) + n_per_sample  # works for an int specialized as a constexpr, too
    alpha = tl.zeros([1], dtype=tl.float64)
    if ORTHO:
        dss = tl.sum(acc_ss, axis=0)
        alpha = tl.where(dss != 0.0, tl.sum(acc_ts, axis=0) / tl.where(dss != 0.0, dss, 1.0), 0.0) + alpha
    factor = tl.full([1], 1.0, dtype=tl.float64)
    if RESCALE:
        mean_c = tl.sum(acc_c, axis=0) / n
        var_c = tl.sum(acc_c2, axis=0) / n - mean_c * mean_c
        mean_f = (tl.sum(acc_a, axis=0) + alpha * tl.sum(acc_b, axis=0)) / n
        ef2 = (tl.sum(acc_a2, axis=0) + 2.0 * alpha * tl.sum(acc_ab, axis=0)
               + alpha * alpha * tl.sum(acc_b2, axis=0)) / n
        var_f = ef2 - mean_f * mean_f
        spread = var_f > 0.0  # std(f) = 0 (a constant sample): factor 1
        ratio = tl.sqrt(  # fp64: correctly rounded (sqrt.rn.f64)
            tl.maximum(var_c, 0.0) / tl.where(spread, var_f, 1.0))
        # rescale arrives as fp32 (a float argument), as the C++ op's CombineScalars holds it
        r = (tl.zeros([1], dtype=tl.float32) + rescale).to(tl.float64)
        factor = tl.where(spread, r * ratio + (1.0 - r), factor)
        # a NaN or infinity in the sample makes its variance NaN: the factor is NaN, as the reference's std
        factor = tl.where((var_f != var_f) | (var_c != var_c), float("nan"), factor)
    one = tl.arange(0, 1)
    tl.store(coeffs_ptr + 2 * b + one, alpha.to(tl.float32))
    tl.store(coeffs_ptr + 2 * b + 1 + one, factor.to(tl.float32))


@triton.autotune(configs=WRITE_CONFIGS, key=["n_per_sample"])
@triton.jit
def _write_kernel(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, coeffs_ptr, out_ptr, n_per_sample,
                  cfg_scale, stg0, stg1, HAS_UNCOND: tl.constexpr, HAS_CFG: tl.constexpr, TWO: tl.constexpr,
                  ORTHO: tl.constexpr, FOLD: tl.constexpr, COEFFS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (blocks per sample, batch): element_output() of every element of the block. COEFFS: read the
    sample's (alpha, factor) from coeffs_ptr (else alpha 0, factor 1: nothing to multiply)."""
    k = tl.program_id(0)
    b = tl.program_id(1)
    idx = k.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_per_sample
    offs = b.to(tl.int64) * n_per_sample + idx
    c, u, g, a, bb, d0, d1 = _terms(cond_ptr, uncond_ptr, cfg_ptr, p0_ptr, p1_ptr, offs, mask, cfg_scale, stg0,
                                    stg1, HAS_UNCOND, HAS_CFG, TWO, ORTHO)
    f = a
    if COEFFS:
        if ORTHO:
            f = a + tl.load(coeffs_ptr + 2 * b) * bb
        f = f * tl.load(coeffs_ptr + 2 * b + 1)
    if FOLD:
        # c' = u + (f - u) / g: the pipeline's own u + g (c' - u) then yields f.
        f = u + (f - u) / g
    tl.store(out_ptr + offs, f.to(out_ptr.dtype.element_ty), mask=mask)


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


class Launch(NamedTuple):
    """One kernel launch of a combine call: kernel (a JITFunction or an Autotuner), grid (a tuple or a
    function of the config's meta-parameters), positional args and constexpr keyword args."""
    kernel: object
    grid: object
    args: tuple
    constexprs: dict


def launch_plan(cond: torch.Tensor, perturbed: List[torch.Tensor], uncond: Optional[torch.Tensor],
                cfg_tensor: Optional[torch.Tensor], cfg_scale: float, stg_scales: List[float], rescale: float,
                orthogonalize: bool, fold: bool):
    """(out, launches) of one call: allocates out and scratch, launches nothing (works on meta tensors)."""
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
        return out, []
    n = cond.numel() // batch
    stg0 = float(stg_scales[0])
    stg1 = float(stg_scales[1]) if two else 0.0
    flags = dict(HAS_UNCOND=uncond is not None, HAS_CFG=cfg_tensor is not None, TWO=two, ORTHO=orthogonalize)
    launches = []
    coeffs = cond  # a dummy pointer when there are no coefficients (never read)
    needs_coeffs = rescale > 0 or orthogonalize
    if needs_coeffs:
        chunks = triton.cdiv(n, REDUCE_CHUNK)
        partial = torch.empty((batch, chunks, NUM_SUMS), dtype=torch.float32, device=cond.device)
        coeffs = torch.empty((batch, 2), dtype=torch.float32, device=cond.device)
        launches.append(Launch(_reduce_kernel, (chunks, batch),
                               (cond, u, cfg, p0, p1, partial, n, cfg_scale, stg0, stg1),
                               dict(**flags, CHUNK=REDUCE_CHUNK, BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS)))
        launches.append(Launch(_coeffs_kernel, (batch,), (partial, coeffs, chunks, n, rescale),
                               dict(ORTHO=orthogonalize, RESCALE=rescale > 0, CHUNK=COEFF_CHUNK,
                                    num_warps=COEFF_WARPS)))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]), batch)

    launches.append(Launch(_write_kernel, grid, (cond, u, cfg, p0, p1, coeffs, out, n, cfg_scale, stg0, stg1),
                           dict(**flags, FOLD=fold, COEFFS=needs_coeffs)))
    return out, launches


@triton_op("stg_ext::combine_triton", mutates_args=())
def _combine_triton_op(cond: torch.Tensor, perturbed: List[torch.Tensor], uncond: Optional[torch.Tensor],
                       cfg_tensor: Optional[torch.Tensor], cfg_scale: float, stg_scales: List[float],
                       rescale: float, orthogonalize: bool, fold: bool) -> torch.Tensor:
    out, launches = launch_plan(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale,
                                orthogonalize, fold)
    for launch in launches:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.constexprs)
    return out


def combine_triton(cond: torch.Tensor, perturbed: List[torch.Tensor], uncond: Optional[torch.Tensor],
                   cfg_tensor: Optional[torch.Tensor], cfg_scale: float, stg_scales: List[float], rescale: float,
                   orthogonalize: bool, fold: bool) -> torch.Tensor:
    """Same arguments and result as torch.ops.stg_ext.combine (see stg_ext.ops.combine for the meaning)."""
    return torch.ops.stg_ext.combine_triton(cond, list(perturbed), uncond, cfg_tensor, float(cfg_scale),
                                            [float(s) for s in stg_scales], float(rescale), bool(orthogonalize),
                                            bool(fold))
