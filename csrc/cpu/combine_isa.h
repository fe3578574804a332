// The CPU kernel's per-chunk loops exist once per instruction set (combine_chunks_<isa>.cpp); this header
// is the ISA-independent table through which combine_cpu.cpp reaches them.
#pragma once

#include <cstdint>

#include "../combine_math.h"

namespace stg_ext {
namespace cpu {

// Storage tags for 16-bit floats (same layout as c10::Half / c10::BFloat16).
struct Half16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Specializations of the two loops per element type: index HasU*8 + HasG*4 + Two*2 + Ortho.
constexpr int kNumChunkVariants = 16;

template <typename T>
struct ChunkKernels {
  // Sums of elements [begin, end) of one sample into sums[kNumSums], shifted by the SampleShift.
  using Reduce = void (*)(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, int64_t begin,
                          int64_t end, const SampleShift& shift, const CombineScalars& s, double* sums);
  // Writes elements [begin, end) of one sample, whose alpha and rescale factor are known.
  using Write = void (*)(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                         int64_t begin, int64_t end, float alpha, float factor, const CombineScalars& s);
  Reduce reduce[kNumChunkVariants];
  Write write[kNumChunkVariants];
};

struct ChunkTable {
  const char* isa;
  ChunkKernels<float> f32;
  ChunkKernels<Half16> f16;
  ChunkKernels<BFloat16> bf16;
};

ChunkTable chunk_table_base();  // baseline x86-64 (or whatever the compiler targets by default)
#if defined(__x86_64__)
ChunkTable chunk_table_avx2();    // AVX2 + F16C, 8 lanes
ChunkTable chunk_table_avx512();  // AVX-512 F/BW/VL + F16C, 16 lanes
#endif

}  // namespace cpu
}  // namespace stg_ext
