// Argument checks of `identity_joint_attention` shared by the CPU and CUDA registrations. The Python wrapper
// (stg_ext/ops.py) checks the same things first with friendlier messages; these keep direct
// `torch.ops.stg_ext.identity_joint_attention` calls safe.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <cmath>

namespace stg_ext {

struct IdentityAttentionSizes {
  int64_t B, H, N, T, D;
};

inline IdentityAttentionSizes check_identity_attention_args(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& kt,
                                                            const at::Tensor& vt,
                                                            const c10::optional<at::Tensor>& bias, double scale) {
  constexpr const char* op = "stg_ext.identity_joint_attention: ";
  TORCH_CHECK(q.dim() == 4, op, "q_video must be (B, H, N, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              op, "the fused kernels take float32, float16 or bfloat16, got ", q.scalar_type(),
              "; use backend='torch'");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, name, " has dtype ", t.scalar_type(), ", q_video has ",
                q.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, name, " is on ", t.device(), ", q_video on ", q.device());
  };
  same(k, "k_video");
  same(v, "v_video");
  same(kt, "k_text");
  same(vt, "v_text");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, "k_video ", k.sizes(), " and v_video ",
              v.sizes(), " must have q_video's shape ", q.sizes());
  TORCH_CHECK(kt.dim() == 4 && kt.sizes() == vt.sizes() && kt.size(0) == q.size(0) && kt.size(1) == q.size(1) &&
                  kt.size(3) == q.size(3),
              op, "k_text/v_text must be (B, H, T, D) with q_video's B, H, D ", q.sizes(), "; got ", kt.sizes(),
              " and ", vt.sizes());
  IdentityAttentionSizes s{q.size(0), q.size(1), q.size(2), kt.size(2), q.size(3)};
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat, op, "text_bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == q.device(), op, "text_bias is on ", bias->device(), ", q_video on ", q.device());
    TORCH_CHECK(at::is_expandable_to(bias->sizes(), {s.B, s.H, s.N, s.T}), op, "text_bias of shape ",
                bias->sizes(), " does not broadcast to (B, H, N, T) = (", s.B, ", ", s.H, ", ", s.N, ", ", s.T, ")");
  }
  TORCH_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);
  return s;
}

}  // namespace stg_ext
