// CUDA implementation of `stg_ext::combine` (schema in ../combine_op.cpp): the twin of combine_cpu there.
// This file only checks arguments, allocates `out` and the scratch with torch (stream-ordered caching
// allocator), and maps torch's dtypes onto the CUDA types of combine_kernels.cu.
// Built only where torch has CUDA (see setup.py); it has not been compiled on the CPU-only dev machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../combine_check.h"
#include "combine_cuda.cuh"

namespace stg_ext {
namespace {

// c10::Half / c10::BFloat16 have the same 16-bit layout as __half / __nv_bfloat16.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

at::Tensor combine_cuda(const at::Tensor& cond, at::TensorList perturbed, const c10::optional<at::Tensor>& uncond,
                        const c10::optional<at::Tensor>& cfg_tensor, double cfg_scale,
                        at::ArrayRef<double> stg_scales, double rescale, bool orthogonalize, bool fold) {
  const CombineScalars s =
      check_combine_args(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold);
  TORCH_CHECK(cond.is_cuda(), "stg_ext.combine: the CUDA kernel needs CUDA tensors, cond is on ", cond.device());
  TORCH_CHECK(cond.scalar_type() != at::kDouble,
              "stg_ext.combine: float64 has no CUDA kernel; use backend='torch'");
  const c10::cuda::CUDAGuard guard(cond.device());
  const at::Tensor c = cond.contiguous();
  const at::Tensor p0 = perturbed[0].contiguous();
  const at::Tensor p1 = s.two_perturbed ? perturbed[1].contiguous() : at::Tensor();
  const at::Tensor u = s.has_uncond ? uncond->contiguous() : at::Tensor();
  const at::Tensor g = cfg_tensor.has_value() ? cfg_tensor->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(c, at::MemoryFormat::Contiguous);
  const int64_t batch = c.dim() == 0 ? 1 : c.size(0);
  const int64_t per_sample = batch == 0 ? 0 : c.numel() / batch;
  // The workspace is float; combine_workspace_bytes is a multiple of sizeof(float).
  const int64_t ws_floats = static_cast<int64_t>(cuda::combine_workspace_bytes(batch, per_sample) / sizeof(float));
  at::Tensor ws = at::empty({ws_floats}, c.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "stg_ext_combine_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // double was rejected above
      using T = typename CudaType<scalar_t>::type;
      auto in = [](const at::Tensor& t) -> const T* {
        return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<scalar_t>()) : nullptr;
      };
      err = cuda::launch_combine<T>(in(c), in(u), g.defined() ? g.const_data_ptr<float>() : nullptr, in(p0), in(p1),
                                    reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), batch, per_sample, s,
                                    ws_floats > 0 ? ws.mutable_data_ptr<float>() : nullptr, stream);
    }
  });
  TORCH_CHECK(err == cudaSuccess, "stg_ext.combine: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stg_ext, CUDA, m) { m.impl("combine", &combine_cuda); }

}  // namespace stg_ext
