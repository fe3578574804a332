// CPU kernel of identity joint attention (STG-A on joint attention); the torch op is registered in
// ../identity_attention_op.cpp, which checks the arguments first (../identity_attention_check.h).
#pragma once

#include <ATen/ATen.h>

namespace stg_ext {
namespace cpu {

// Video tensors (B, H, N, D), text tensors (B, H, T, D), all of one dtype (float32, float16 or bfloat16),
// any strides; `text_bias` float32, broadcastable to (B, H, N, T), or undefined. Returns the contiguous
// (B, H, N, D) result in the inputs' dtype; the math is fp32.
at::Tensor identity_joint_attention_kernel(const at::Tensor& q_video, const at::Tensor& k_video,
                                           const at::Tensor& v_video, const at::Tensor& k_text,
                                           const at::Tensor& v_text, const at::Tensor& text_bias, float scale);

// The instruction set of the kernel's loops: "avx512", "avx2" or "baseline" (the widest the CPU runs;
// STG_EXT_CPU_ISA=avx2 or =baseline caps it, as for combine).
const char* identity_attention_isa();

}  // namespace cpu
}  // namespace stg_ext
