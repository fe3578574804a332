// CPU kernel of the guidance combination on raw, contiguous buffers (no torch types in the interface
// beyond the element type), so the ctest binary and the torch op share it.
#pragma once

#include <cstdint>

#include "../combine_math.h"

namespace stg_ext {
namespace cpu {

// Buffers are contiguous, `batch` samples of `numel_per_sample` elements each. `uncond`, `cfg` (fp32,
// cond's shape) and `p1` may be null. Two passes: the per-sample sums (only when rescale or
// orthogonalization needs them), then the write.
// The instruction set of the chunk loops in use: "avx512", "avx2" or "baseline" (the widest the CPU runs;
// STG_EXT_CPU_ISA=avx2 or =baseline caps it).
const char* active_isa();

template <typename T>
void combine_kernel(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                    int64_t batch, int64_t numel_per_sample, const CombineScalars& s);

}  // namespace cpu
}  // namespace stg_ext
