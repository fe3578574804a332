// Schema of every stg_ext op (one TORCH_LIBRARY block for the library) and the CPU implementation of
// `combine`. The CUDA implementation registers itself in cuda/combine_cuda_op.cpp when built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "combine_check.h"
#include "cpu/combine_cpu.h"

namespace stg_ext {
namespace {

at::Tensor combine_cpu(const at::Tensor& cond, at::TensorList perturbed, const c10::optional<at::Tensor>& uncond,
                       const c10::optional<at::Tensor>& cfg_tensor, double cfg_scale,
                       at::ArrayRef<double> stg_scales, double rescale, bool orthogonalize, bool fold) {
  const CombineScalars s =
      check_combine_args(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold);
  const at::Tensor c = cond.contiguous();
  const at::Tensor p0 = perturbed[0].contiguous();
  const at::Tensor p1 = s.two_perturbed ? perturbed[1].contiguous() : at::Tensor();
  const at::Tensor u = s.has_uncond ? uncond->contiguous() : at::Tensor();
  const at::Tensor g = cfg_tensor.has_value() ? cfg_tensor->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(c, at::MemoryFormat::Contiguous);
  const int64_t batch = c.dim() == 0 ? 1 : c.size(0);
  const int64_t per_sample = batch == 0 ? 0 : c.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "stg_ext_combine_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "stg_ext.combine: float64 has no C++ kernel; use backend='torch'");
    } else {
      cpu::combine_kernel<scalar_t>(c.const_data_ptr<scalar_t>(), u.defined() ? u.const_data_ptr<scalar_t>() : nullptr,
                                    g.defined() ? g.const_data_ptr<float>() : nullptr, p0.const_data_ptr<scalar_t>(),
                                    p1.defined() ? p1.const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), batch, per_sample, s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(stg_ext, m) {
  m.def(
      "combine(Tensor cond, Tensor[] perturbed, Tensor? uncond, Tensor? cfg_tensor, float cfg_scale, "
      "float[] stg_scales, float rescale, bool orthogonalize, bool fold) -> Tensor");
  // STG-A on joint attention; CPU kernel in identity_attention_op.cpp, CUDA in cuda/identity_attention_cuda_op.cpp.
  m.def(
      "identity_joint_attention(Tensor q_video, Tensor k_video, Tensor v_video, Tensor k_text, Tensor v_text, "
      "Tensor? text_bias, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(stg_ext, CPU, m) { m.impl("combine", &combine_cpu); }

}  // namespace stg_ext
