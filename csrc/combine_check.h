// Argument checks of `combine` shared by the CPU and CUDA registrations. The Python wrapper
// (stg_ext/ops.py) checks the same things first with friendlier messages; these keep direct
// `torch.ops.stg_ext.combine` calls safe.
#pragma once

#include <ATen/ATen.h>

#include "combine_math.h"

namespace stg_ext {

inline CombineScalars check_combine_args(const at::Tensor& cond, at::TensorList perturbed,
                                         const c10::optional<at::Tensor>& uncond,
                                         const c10::optional<at::Tensor>& cfg_tensor, double cfg_scale,
                                         at::ArrayRef<double> stg_scales, double rescale, bool orthogonalize,
                                         bool fold) {
  TORCH_CHECK(perturbed.size() == 1 || perturbed.size() == 2,
              "stg_ext.combine: the fused kernels take 1 or 2 perturbed tensors, got ", perturbed.size());
  TORCH_CHECK(stg_scales.size() == perturbed.size(), "stg_ext.combine: ", perturbed.size(),
              " perturbed tensors need as many stg_scales, got ", stg_scales.size());
  TORCH_CHECK(rescale >= 0.0 && rescale <= 1.0, "stg_ext.combine: rescale must be in [0, 1], got ", rescale);
  TORCH_CHECK(!orthogonalize || perturbed.size() == 2,
              "stg_ext.combine: orthogonalize needs two perturbed tensors (spatial, temporal)");
  TORCH_CHECK(!fold || uncond.has_value(), "stg_ext.combine: fold=True needs uncond");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == cond.sizes(), "stg_ext.combine: ", name, " has shape ", t.sizes(),
                ", cond has ", cond.sizes());
    TORCH_CHECK(t.scalar_type() == cond.scalar_type(), "stg_ext.combine: ", name, " has dtype ", t.scalar_type(),
                ", cond has ", cond.scalar_type());
    TORCH_CHECK(t.device() == cond.device(), "stg_ext.combine: ", name, " is on ", t.device(), ", cond on ",
                cond.device());
  };
  for (const auto& p : perturbed) same(p, "perturbed");
  if (uncond.has_value()) same(*uncond, "uncond");
  if (cfg_tensor.has_value()) {
    TORCH_CHECK(cfg_tensor->sizes() == cond.sizes() && cfg_tensor->scalar_type() == at::kFloat &&
                    cfg_tensor->device() == cond.device(),
                "stg_ext.combine: cfg_tensor must be float32 with cond's shape and device (expand it first)");
  }
  CombineScalars s;
  s.cfg_scale = static_cast<float>(cfg_scale);
  s.stg0 = static_cast<float>(stg_scales[0]);
  s.stg1 = perturbed.size() == 2 ? static_cast<float>(stg_scales[1]) : 0.0f;
  s.rescale = static_cast<float>(rescale);
  s.has_uncond = uncond.has_value();
  s.two_perturbed = perturbed.size() == 2;
  s.orthogonalize = orthogonalize;
  s.fold = fold;
  return s;
}

// One `combine` call as the kernels take it: checked scalars, contiguous inputs (undefined when absent),
// the contiguous output, and the batch split. Shared by the CPU and CUDA registrations.
struct CombineCall {
  CombineScalars s;
  at::Tensor cond, p0, p1, uncond, cfg, out;
  int64_t batch = 0;
  int64_t per_sample = 0;
};

inline CombineCall prepare_combine(const at::Tensor& cond, at::TensorList perturbed,
                                   const c10::optional<at::Tensor>& uncond, const c10::optional<at::Tensor>& cfg_tensor,
                                   double cfg_scale, at::ArrayRef<double> stg_scales, double rescale,
                                   bool orthogonalize, bool fold) {
  CombineCall call;
  call.s = check_combine_args(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold);
  call.cond = cond.contiguous();
  call.p0 = perturbed[0].contiguous();
  if (call.s.two_perturbed) call.p1 = perturbed[1].contiguous();
  if (call.s.has_uncond) call.uncond = uncond->contiguous();
  if (cfg_tensor.has_value()) call.cfg = cfg_tensor->contiguous();
  call.out = at::empty_like(call.cond, at::MemoryFormat::Contiguous);
  call.batch = call.cond.dim() == 0 ? 1 : call.cond.size(0);
  call.per_sample = call.batch == 0 ? 0 : call.cond.numel() / call.batch;
  return call;
}

}  // namespace stg_ext
