// CUDA implementation of `stg_ext::combine` (schema in ../combine_op.cpp): the twin of combine_cpu there.
// This file only checks arguments, allocates `out` and the scratch with torch (stream-ordered caching
// allocator), and maps torch's dtypes onto the CUDA types of combine_kernels.cu.
// Built only where torch has CUDA (see setup.py). On the CPU-only dev machine: syntax-checked against the CPU
// wheel (tests/ops/test_cuda_compile.py) and built and linked against the CUDA torch by CI
// (scripts/ci_cuda_build.sh); never run (no GPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../combine_check.h"
#include "combine_cuda.cuh"
#include "torch_cuda_types.h"

namespace stg_ext {
namespace {

at::Tensor combine_cuda(const at::Tensor& cond, at::TensorList perturbed, const c10::optional<at::Tensor>& uncond,
                        const c10::optional<at::Tensor>& cfg_tensor, double cfg_scale,
                        at::ArrayRef<double> stg_scales, double rescale, bool orthogonalize, bool fold) {
  TORCH_CHECK(cond.is_cuda(), "stg_ext.combine: the CUDA kernel needs CUDA tensors, cond is on ", cond.device());
  TORCH_CHECK(cond.scalar_type() != at::kDouble,
              "stg_ext.combine: float64 has no CUDA kernel; use backend='torch'");
  const c10::cuda::CUDAGuard guard(cond.device());
  const CombineCall k =
      prepare_combine(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold);
  // The workspace is float; combine_workspace_bytes is a multiple of sizeof(float).
  const int64_t ws_floats =
      static_cast<int64_t>(cuda::combine_workspace_bytes(k.batch, k.per_sample) / sizeof(float));
  at::Tensor ws = at::empty({ws_floats}, k.cond.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.cond.scalar_type(), "stg_ext_combine_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // double was rejected above
      using T = typename CudaType<scalar_t>::type;
      auto in = [](const at::Tensor& t) -> const T* {
        return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<scalar_t>()) : nullptr;
      };
      err = cuda::launch_combine<T>(in(k.cond), in(k.uncond), k.cfg.defined() ? k.cfg.const_data_ptr<float>() : nullptr,
                                    in(k.p0), in(k.p1), reinterpret_cast<T*>(k.out.mutable_data_ptr<scalar_t>()),
                                    k.batch, k.per_sample, k.s, ws_floats > 0 ? ws.mutable_data_ptr<float>() : nullptr,
                                    stream);
    }
  });
  TORCH_CHECK(err == cudaSuccess, "stg_ext.combine: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return k.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stg_ext, CUDA, m) { m.impl("combine", &combine_cuda); }

}  // namespace stg_ext
