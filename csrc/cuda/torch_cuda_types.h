// The CUDA element type of a torch scalar type, for the torch bindings of the CUDA kernels:
// c10::Half / c10::BFloat16 have the same 16-bit layout as __half / __nv_bfloat16.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stg_ext {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace stg_ext
