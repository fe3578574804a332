// CUDA implementation of `stg_ext::identity_joint_attention` (schema in ../combine_op.cpp): the twin of
// ../identity_attention_op.cpp. This file only checks arguments, allocates `out` with torch, passes every
// tensor's strides (nothing is made contiguous; the bias is an expanded view) and maps torch's dtypes onto
// the CUDA types of identity_attention_kernels.cu.
// Built only where torch has CUDA (see setup.py). On the CPU-only dev machine: syntax-checked against the CPU
// wheel (tests/ops/test_cuda_compile.py) and built and linked against the CUDA torch by CI
// (scripts/ci_cuda_build.sh); never run (no GPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../identity_attention_check.h"
#include "identity_attention_cuda.cuh"
#include "torch_cuda_types.h"

namespace stg_ext {
namespace {

void strides_of(const at::Tensor& t, int64_t (&s)[4]) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

at::Tensor identity_joint_attention_cuda(const at::Tensor& q_video, const at::Tensor& k_video,
                                         const at::Tensor& v_video, const at::Tensor& k_text,
                                         const at::Tensor& v_text, const c10::optional<at::Tensor>& text_bias,
                                         double scale) {
  const IdentityAttentionSizes s =
      check_identity_attention_args(q_video, k_video, v_video, k_text, v_text, text_bias, scale);
  TORCH_CHECK(q_video.is_cuda(), "stg_ext.identity_joint_attention: the CUDA kernel needs CUDA tensors, got ",
              q_video.device());
  TORCH_CHECK(s.D <= cuda::kIdentityAttentionMaxHeadDim, "stg_ext.identity_joint_attention: the CUDA kernel takes "
              "head dims up to ", cuda::kIdentityAttentionMaxHeadDim, ", got ", s.D, "; use backend='torch'");
  const c10::cuda::CUDAGuard guard(q_video.device());
  at::Tensor out = at::empty({s.B, s.H, s.N, s.D}, v_video.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor bias = text_bias.has_value() ? text_bias->expand({s.B, s.H, s.N, s.T}) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_video.scalar_type(), "stg_ext_identity_attention_cuda",
                                  [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // double was rejected by the checks
      using T = typename CudaType<scalar_t>::type;
      auto in = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr<scalar_t>()); };
      cuda::IdentityAttentionParams<T> p;
      p.q_video = in(q_video);
      p.k_video = in(k_video);
      p.v_video = in(v_video);
      p.k_text = in(k_text);
      p.v_text = in(v_text);
      p.text_bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
      p.out = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
      p.batch = s.B;
      p.heads = s.H;
      p.n_video = s.N;
      p.n_text = s.T;
      p.head_dim = s.D;
      strides_of(q_video, p.q_stride);
      strides_of(k_video, p.k_stride);
      strides_of(v_video, p.v_stride);
      strides_of(k_text, p.kt_stride);
      strides_of(v_text, p.vt_stride);
      if (bias.defined()) strides_of(bias, p.bias_stride);
      else for (int64_t& x : p.bias_stride) x = 0;
      p.scale = static_cast<float>(scale);
      err = cuda::launch_identity_attention<T>(p, stream);
    }
  });
  TORCH_CHECK(err == cudaSuccess, "stg_ext.identity_joint_attention: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stg_ext, CUDA, m) { m.impl("identity_joint_attention", &identity_joint_attention_cuda); }

}  // namespace stg_ext
