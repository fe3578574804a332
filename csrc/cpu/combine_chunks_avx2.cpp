// The chunk loops compiled for AVX2 + F16C (8 fp32 lanes in one register, hardware fp16 conversion);
// combine_cpu.cpp picks them at run time when the CPU has both.
#if defined(__x86_64__)
// Standard headers first, under the default target: only this project's code is compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <utility>

#pragma GCC target("avx2,f16c")
#define STG_EXT_F16C 1
#define STG_EXT_VEC_IN_ONE_REGISTER 1
#define STG_EXT_ISA avx2
#include "combine_chunks.h"

namespace stg_ext {
namespace cpu {
ChunkTable chunk_table_avx2() { return avx2::chunk_table("avx2"); }
}  // namespace cpu
}  // namespace stg_ext
#endif
