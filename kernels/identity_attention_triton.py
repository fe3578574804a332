"""Triton backend of identity joint attention (STG-A on joint attention):
`torch.ops.stg_ext.identity_joint_attention_triton`.

Same arguments and result as the C++ op `torch.ops.stg_ext.identity_joint_attention`, and the same
online-softmax math (csrc/identity_attention_math.h): a program takes BLOCK_N video queries of one (b, h),
starts every query from its self key (running max = self logit, running sum 1, accumulator v_i), then
streams the text keys in chunks of BLOCK_T: logits = Q K^T * scale + bias, the running max grows by
alpha = exp(m - m_new) (exactly 1 when it does not), acc = acc * alpha + P V. Keys masked with -inf and the
padding past T weigh exactly 0, so T = 0 or an all-masked row gives v_i exactly.

All tensors are read through their strides (no copies; the bias is an expanded (B, H, N, T) view).
Accumulation, the softmax state and the self logit are fp32. The dots: on a GPU, bf16/fp16 inputs go to the
tensor cores as they are (fp32 accumulation; P is rounded to the input dtype for P V, as flash attention
does), and fp32 inputs use IEEE fp32 dots (no TF32), to match the fp32 reference to 1e-5. Under the
interpreter 16-bit inputs are upcast to fp32 first (its bf16 tl.dot is wrong). Head dims up to 128.

Registered with torch.library.triton_op and launched through wrap_triton, so torch.compile traces it.
`launch_plan` lists the launch of one call without running it (the compile tests build exactly that).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535
_OP = "stg_ext.identity_joint_attention_triton"


def _config(block_n, block_t, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_T": block_t}, num_warps=warps, num_stages=stages)


# Launch configurations (BLOCK_N video queries per program, text keys streamed BLOCK_T at a time, warps,
# software-pipeline stages).
# - The interpreter pays a fixed cost per program instance: big query blocks and one config; BLOCK_T = 64 so
#   that T > 64 takes the multi-chunk softmax path in the tests.
# - GPU: the work is N (T + 1) D multiply-adds per (b, h) with T ~ 100-512 text keys, so a program is a small
#   flash-attention forward: Q (BLOCK_N x D) stays in registers, K_t/V_t tiles stream through shared memory
#   (num_stages-deep software pipeline, cp.async on sm_80+), two tl.dot per tile: bf16/fp16 on the tensor
#   cores (mma on sm_80, wgmma on sm_90), fp32 as IEEE FMA dots. Per (dot kind, head-dim block) the candidates
#   below are the ones that compiled with zero spills on sm_80 and sm_90 and at most 96 KiB of shared memory
#   (sm_86/sm_89 allow ~99 KiB a block) in a sweep of BLOCK_N 16-128, BLOCK_T 16-64, 4/8 warps, 2/3 stages
#   (triton 3.9, GPUTarget, registers from cuobjdump); e.g. D = 128 in bf16 at BLOCK_N = 128 over 4 warps
#   spills (the fp32 accumulator alone is 128 registers a thread), BLOCK_N = 64, BLOCK_T = 32 with a bias
#   spills 12 bytes on sm_80 at 4 or 8 warps and 2 stages (not at 3), and fp32 dots at BLOCK_N = 64,
#   BLOCK_T = 32 spill at every D >= 64. Autotuned per (D, T) (fixed per model). Any config gives the same result up to the
#   fp32 rounding order of the key chunks, within the 1e-5 the op owes. tests/ops/test_triton_compile.py
#   recompiles every one for sm_80 and sm_90 and asserts zero spills.
if _INTERPRET:
    CONFIGS = [_config(512, 64, 4, 1)]
    _PICK = None
else:
    _PICK = {  # (DOT_F32, BLOCK_D <= 64) -> [(BLOCK_N, BLOCK_T, warps, stages)]
        (False, True): [(128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
        (False, False): [(64, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
        (True, True): [(64, 16, 8, 2), (32, 32, 8, 2)],
        (True, False): [(64, 16, 8, 2), (32, 32, 8, 2)],
    }
    CONFIGS = [_config(*c) for c in dict.fromkeys(c for cs in _PICK.values() for c in cs)]


def _prune(configs, named_args, **kwargs):
    """The configs picked for this call's dot kind and head-dim block (see above)."""
    if _PICK is None:
        return configs
    args = {**named_args, **kwargs}
    want = set(_PICK[(bool(args["DOT_F32"]), args["BLOCK_D"] <= 64)])
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages) in want]


@triton.autotune(configs=CONFIGS, key=["BLOCK_D", "T"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _identity_attention_kernel(
        q_ptr, k_ptr, v_ptr, kt_ptr, vt_ptr, bias_ptr, out_ptr, H, N, T, D, scale,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        skt_b, skt_h, skt_t, skt_d, svt_b, svt_h, svt_t, svt_d, sb_b, sb_h, sb_n, sb_t,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr):
    """Grid (query blocks, B * H): out[b, h, block] for BLOCK_N queries. DOT_F32: fp32 IEEE dots (fp32
    inputs, or any input under the interpreter); else 16-bit tensor-core dots with fp32 accumulation."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 before multiplying: tensors can exceed 2**31 elements
    b = bh // H
    h = bh % H
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask_nd,
                other=0.0)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask_nd,
                other=0.0)
    # The self key: softmax_start (m = self logit, l = 1) and acc = v_i.
    m_i = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale
    # a self logit that is NaN or infinite makes the softmax NaN, as the reference's (softmax_start)
    l_i = tl.where(m_i - m_i == 0.0, 1.0, float("nan")).to(tl.float32)
    acc = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=mask_nd,
                  other=0.0).to(tl.float32)
    if DOT_F32:
        q = q.to(tl.float32)

    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        mask_td = mask_t[:, None] & mask_d[None, :]
        kt = tl.load(kt_ptr + b * skt_b + h * skt_h + offs_t[:, None] * skt_t + offs_d[None, :] * skt_d,
                     mask=mask_td, other=0.0)
        # text_logit: (q . k_t) * scale + bias_t
        if DOT_F32:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))  # bf16/fp16 tensor cores, fp32 accumulator
        s = s * scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sb_b + h * sb_h + offs_n[:, None] * sb_n + offs_t[None, :] * sb_t,
                         mask=mask_n[:, None] & mask_t[None, :], other=0.0)
        s = tl.where(mask_t[None, :], s, float("-inf"))
        # softmax_rescale: the self logit keeps m finite, so alpha is exactly 1 when the max does not grow
        # and masked keys (-inf) get weight exactly 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vt_ptr + b * svt_b + h * svt_h + offs_t[:, None] * svt_t + offs_d[None, :] * svt_d,
                     mask=mask_td, other=0.0)
        if DOT_F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / l_i[:, None]  # softmax_norm
    tl.store(out_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_nd)


def _check(q_video, k_video, v_video, k_text, v_text, text_bias) -> None:
    # The checks of csrc/identity_attention_check.h, for direct calls of the op.
    if q_video.dim() != 4:
        raise ValueError(f"{_OP}: q_video must be (B, H, N, D), got shape {tuple(q_video.shape)}")
    if q_video.dtype not in _DTYPES:
        raise ValueError(f"{_OP}: dtype must be float32, float16 or bfloat16, got {q_video.dtype}")
    for name, t in (("k_video", k_video), ("v_video", v_video), ("k_text", k_text), ("v_text", v_text)):
        if t.dtype != q_video.dtype or t.device != q_video.device:
            raise ValueError(f"{_OP}: {name} must have q_video's dtype and device ({q_video.dtype}, "
                             f"{q_video.device}); got {t.dtype}, {t.device}")
    if k_video.shape != q_video.shape or v_video.shape != q_video.shape:
        raise ValueError(f"{_OP}: k_video and v_video must have q_video's shape {tuple(q_video.shape)}; got "
                         f"{tuple(k_video.shape)} and {tuple(v_video.shape)}")
    B, H, _, D = q_video.shape
    if k_text.dim() != 4 or k_text.shape != v_text.shape or (k_text.shape[0], k_text.shape[1], k_text.shape[3]) \
            != (B, H, D):
        raise ValueError(f"{_OP}: k_text/v_text must be (B, H, T, D) with q_video's B, H, D "
                         f"{tuple(q_video.shape)}; got {tuple(k_text.shape)} and {tuple(v_text.shape)}")
    if text_bias is not None and (text_bias.dtype != torch.float32 or text_bias.device != q_video.device):
        raise ValueError(f"{_OP}: text_bias must be float32 on {q_video.device}, got {text_bias.dtype} on "
                         f"{text_bias.device}")


class Launch(NamedTuple):
    """The kernel launch of a call: kernel (an Autotuner), grid (a function of the config's meta-parameters),
    positional args and constexpr keyword args."""
    kernel: object
    grid: object
    args: tuple
    constexprs: dict


def launch_plan(q_video, k_video, v_video, k_text, v_text, text_bias, scale):
    """(out, launches) of one call: allocates out, launches nothing (works on meta tensors)."""
    _check(q_video, k_video, v_video, k_text, v_text, text_bias)
    B, H, N, D = q_video.shape
    T = k_text.shape[2]
    out = torch.empty((B, H, N, D), dtype=v_video.dtype, device=v_video.device)
    if out.numel() == 0:
        return out, []
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dims up to {MAX_HEAD_DIM}, got {D}; use backend='cuda' (up to 256) or "
                         "'torch'")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"{_OP}: B * H exceeds the grid limit {_MAX_GRID_Y}, got {B * H}")
    if text_bias is not None:
        bias = text_bias.expand(B, H, N, T)  # broadcast dims get stride 0
        bias_strides = bias.stride()
    else:
        bias, bias_strides = q_video, (0, 0, 0, 0)  # a dummy pointer, never read
    block_d = max(16, triton.next_power_of_2(D))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), B * H)

    args = (q_video, k_video, v_video, k_text, v_text, bias, out, H, N, T, D, float(scale),
            *q_video.stride(), *k_video.stride(), *v_video.stride(), *k_text.stride(), *v_text.stride(),
            *bias_strides)
    dot_f32 = _INTERPRET or q_video.dtype == torch.float32
    return out, [Launch(_identity_attention_kernel, grid, args,
                        dict(HAS_BIAS=text_bias is not None, DOT_F32=dot_f32, BLOCK_D=block_d))]


@triton_op("stg_ext::identity_joint_attention_triton", mutates_args=())
def _identity_joint_attention_triton_op(q_video: torch.Tensor, k_video: torch.Tensor, v_video: torch.Tensor,
                                        k_text: torch.Tensor, v_text: torch.Tensor,
                                        text_bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    out, launches = launch_plan(q_video, k_video, v_video, k_text, v_text, text_bias, scale)
    for launch in launches:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.constexprs)
    return out


def identity_joint_attention_triton(q_video: torch.Tensor, k_video: torch.Tensor, v_video: torch.Tensor,
                                    k_text: torch.Tensor, v_text: torch.Tensor, text_bias: Optional[torch.Tensor],
                                    scale: float) -> torch.Tensor:
    """Same arguments and result as torch.ops.stg_ext.identity_joint_attention."""
    return torch.ops.stg_ext.identity_joint_attention_triton(q_video, k_video, v_video, k_text, v_text, text_bias,
                                                             float(scale))
