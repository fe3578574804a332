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
  const CombineCall k =
      prepare_combine(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.cond.scalar_type(), "stg_ext_combine_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "stg_ext.combine: float64 has no C++ kernel; use backend='torch'");
    } else {
      auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      cpu::combine_kernel<scalar_t>(in(k.cond), in(k.uncond), k.cfg.defined() ? k.cfg.const_data_ptr<float>() : nullptr,
                                    in(k.p0), in(k.p1), k.out.mutable_data_ptr<scalar_t>(), k.batch, k.per_sample,
                                    k.s);
    }
  });
  return k.out;
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
