// CPU implementation of `identity_joint_attention` (schema in combine_op.cpp's TORCH_LIBRARY block, with the
// library's other ops). The CUDA implementation registers itself in cuda/identity_attention_cuda_op.cpp when
// built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/identity_attention_cpu.h"
#include "identity_attention_check.h"

namespace stg_ext {
namespace {

at::Tensor identity_joint_attention_cpu(const at::Tensor& q_video, const at::Tensor& k_video,
                                        const at::Tensor& v_video, const at::Tensor& k_text,
                                        const at::Tensor& v_text, const c10::optional<at::Tensor>& text_bias,
                                        double scale) {
  check_identity_attention_args(q_video, k_video, v_video, k_text, v_text, text_bias, scale);
  TORCH_CHECK(q_video.device().is_cpu(), "stg_ext.identity_joint_attention: the CPU kernel needs CPU tensors, got ",
              q_video.device());
  return cpu::identity_joint_attention_kernel(q_video, k_video, v_video, k_text, v_text,
                                              text_bias.has_value() ? *text_bias : at::Tensor(),
                                              static_cast<float>(scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(stg_ext, CPU, m) { m.impl("identity_joint_attention", &identity_joint_attention_cpu); }

}  // namespace stg_ext
