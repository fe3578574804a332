// CUDA kernel of the guidance combination on raw, contiguous device buffers: the twin of
// cpu/combine_cpu.h. No torch types here, so the kernels compile with plain nvcc (tests/ops/test_cuda_compile.py)
// and the torch binding (combine_cuda_op.cpp) only allocates, picks the stream and maps dtypes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../combine_math.h"

namespace stg_ext {
namespace cuda {

// Bytes of device scratch `launch_combine` needs for these sizes (per-block partial sums and the
// per-sample alpha/factor). Depends on the sizes only, so the caller can allocate before launching.
size_t combine_workspace_bytes(int64_t batch, int64_t numel_per_sample);

// Buffers are contiguous device memory, `batch` samples of `numel_per_sample` elements each. `uncond`,
// `cfg` (fp32, cond's shape) and `p1` may be null. `workspace` holds combine_workspace_bytes() bytes,
// 4-byte aligned; it is used only when rescale > 0 or orthogonalize. Kernels are enqueued on `stream`;
// the return value is the launch status (errors inside the kernels surface at the next sync).
// T: float, __half or __nv_bfloat16 (math in fp32, one rounding on store).
template <typename T>
cudaError_t launch_combine(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                           int64_t batch, int64_t numel_per_sample, const CombineScalars& s, float* workspace,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace stg_ext
