// CUDA kernel of identity joint attention on raw device buffers: the twin of cpu/identity_attention_cpu.h.
// No torch types here, so the kernel compiles with plain nvcc (tests/ops/test_cuda_compile.py) and the torch
// binding (identity_attention_cuda_op.cpp) only checks, allocates, picks the stream and maps dtypes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../identity_attention_math.h"

namespace stg_ext {
namespace cuda {

// The largest head dim the kernel takes (each lane of a warp holds up to 8 of the D output values).
constexpr int64_t kIdentityAttentionMaxHeadDim = 256;

// Strides are in elements, in (B, H, rows, D) order for every tensor (any layout: nothing is copied).
template <typename T>
struct IdentityAttentionParams {
  const T* q_video;  // (B, H, N, D)
  const T* k_video;  // (B, H, N, D)
  const T* v_video;  // (B, H, N, D)
  const T* k_text;   // (B, H, n_text, D)
  const T* v_text;   // (B, H, n_text, D)
  const float* text_bias;  // broadcast view of (B, H, N, n_text) (stride 0 on broadcast dims), or null
  T* out;            // contiguous (B, H, N, D)
  int64_t batch, heads, n_video, n_text, head_dim;
  int64_t q_stride[4], k_stride[4], v_stride[4], kt_stride[4], vt_stride[4], bias_stride[4];
  float scale;
};

// Enqueues the kernel on `stream`; returns the launch status (cudaErrorInvalidValue for head_dim beyond
// kIdentityAttentionMaxHeadDim). T: float, __half or __nv_bfloat16 (math in fp32, one rounding on store).
template <typename T>
cudaError_t launch_identity_attention(const IdentityAttentionParams<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace stg_ext
