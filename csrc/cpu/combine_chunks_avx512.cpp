// The chunk loops compiled for AVX-512 (16 fp32 lanes in one register, hardware fp16 conversion);
// combine_cpu.cpp picks them at run time when the CPU has AVX-512 F, BW and VL.
#if defined(__x86_64__)
// Standard headers first, under the default target: only this project's code is compiled for AVX-512.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <utility>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,f16c")
#define STG_EXT_F16C 1
#define STG_EXT_VEC_IN_ONE_REGISTER 1
#define STG_EXT_ISA avx512
#define STG_EXT_LANES 16
#include "combine_chunks.h"

namespace stg_ext {
namespace cpu {
ChunkTable chunk_table_avx512() { return avx512::chunk_table("avx512"); }
}  // namespace cpu
}  // namespace stg_ext
#endif
