// The per-chunk loops of the CPU kernel (reduction and write), compiled once per instruction set: the
// including file defines STG_EXT_ISA (a namespace name) and may set a `#pragma GCC target` first.
// Deliberately free of torch headers, so that nothing inline from torch gets compiled for an instruction
// set the running CPU may lack; fp16/bf16 are handled as raw 16-bit storage here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "combine_isa.h"

#ifndef STG_EXT_ISA
#error "define STG_EXT_ISA before including combine_chunks.h"
#endif

namespace stg_ext {
namespace cpu {

namespace STG_EXT_ISA {

#ifndef STG_EXT_LANES
#define STG_EXT_LANES 8
#endif
// fp32 lanes per vector: 8 (two SSE registers on baseline x86-64, one AVX register in the AVX2 build) or 16
// (AVX-512). Explicit vector types because GCC does not vectorize these loops on its own (measured: scalar
// code, several times slower).
constexpr int kLanes = STG_EXT_LANES;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
// Elements converted to fp32 at a time (a multiple of kLanes): one tile of every input stays in L1.
constexpr int64_t kTile = 512;

inline float to_f32(float x) { return x; }
inline float to_f32(BFloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_f32(Half16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof(h));
  return static_cast<float>(h);
}

template <typename T>
inline T from_f32(float x);
template <>
inline float from_f32<float>(float x) { return x; }
// Round to nearest even, NaN stays NaN: the rounding c10::BFloat16 applies.
template <>
inline BFloat16 from_f32<BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>(x != x ? 0x7FC0u : rounded)};
}
template <>
inline Half16 from_f32<Half16>(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  Half16 out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}

// Lane-wise conversions of 16-bit floats, kLanes at a time (bit-exact with the scalar ones above).
typedef uint16_t VecU16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t VecU32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t VecI32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef _Float16 VecH __attribute__((vector_size(kLanes * sizeof(_Float16))));

template <typename V, typename T>
inline V bits_of(const T& x) {
  static_assert(sizeof(V) == sizeof(T), "bit cast between equal sizes");
  V v;
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

inline void widen(const BFloat16* src, float* dst) {
  VecU16 h;
  std::memcpy(&h, src, sizeof(h));
  const VecU32 w = __builtin_convertvector(h, VecU32) << 16;
  std::memcpy(dst, &w, sizeof(w));
}
inline void widen(const Half16* src, float* dst) {
  VecH h;
  std::memcpy(&h, src, sizeof(h));
  const VecF f = __builtin_convertvector(h, VecF);
  std::memcpy(dst, &f, sizeof(f));
}
inline void narrow(const float* src, BFloat16* dst) {
  VecF f;
  std::memcpy(&f, src, sizeof(f));
  const VecU32 u = bits_of<VecU32>(f);
  const VecU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const VecU32 is_nan = bits_of<VecU32>(VecI32(f != f));
  const VecU16 out = __builtin_convertvector((is_nan & 0x7FC0u) | (~is_nan & rounded), VecU16);
  std::memcpy(dst, &out, sizeof(out));
}
inline void narrow(const float* src, Half16* dst) {
  VecF f;
  std::memcpy(&f, src, sizeof(f));
  const VecH h = __builtin_convertvector(f, VecH);
  std::memcpy(dst, &h, sizeof(h));
}

// m elements from 16-bit storage to fp32 and back, vectorized except for the tail.
template <typename T>
inline void to_f32_tile(const T* src, float* dst, int64_t m) {
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) widen(src + j, dst + j);
  for (; j < m; ++j) dst[j] = to_f32(src[j]);
}
template <typename T>
inline void from_f32_tile(const float* src, T* dst, int64_t m) {
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) narrow(src + j, dst + j);
  for (; j < m; ++j) dst[j] = from_f32<T>(src[j]);
}

inline VecF vload(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float lane_sum(VecF v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// A copy of the scalars whose presence flags are compile-time constants: no branch is left on them.
template <bool HasU, bool Two>
inline CombineScalars specialized(const CombineScalars& s) {
  CombineScalars out = s;
  out.has_uncond = HasU;
  out.two_perturbed = Two;
  return out;
}

// The inputs of one tile as fp32 arrays: fp32 inputs are read in place, others are converted into
// scratch buffers. Optional inputs are touched only when present.
template <typename T, bool HasU, bool HasG, bool Two>
struct Tile {
  static constexpr bool kInPlace = std::is_same_v<T, float>;
  struct Scratch {
    alignas(64) float c[kTile];
    alignas(64) float u[kTile];
    alignas(64) float p0[kTile];
    alignas(64) float p1[kTile];
  };
  Scratch scratch;  // unused when kInPlace
  const float* c = nullptr;
  const float* u = nullptr;
  const float* g = nullptr;
  const float* p0 = nullptr;
  const float* p1 = nullptr;

  static const float* view(const T* src, float* buf, int64_t i0, int64_t m) {
    if constexpr (kInPlace) {
      return src + i0;
    } else {
      to_f32_tile(src + i0, buf, m);
      return buf;
    }
  }
  void load(const T* cond, const T* uncond, const float* cfg, const T* q0, const T* q1, int64_t i0, int64_t m) {
    c = view(cond, scratch.c, i0, m);
    p0 = view(q0, scratch.p0, i0, m);
    if (HasU) u = view(uncond, scratch.u, i0, m);
    if (HasG) g = cfg + i0;
    if (Two) p1 = view(q1, scratch.p1, i0, m);
  }
  // Element j (F = float) or elements j .. j + kLanes (F = VecF) of the tile.
  template <typename F>
  static F at(const float* buf, int64_t j) {
    if constexpr (std::is_same_v<F, float>) return buf[j];
    else return vload(buf + j);
  }
  template <typename F>
  F uncond_at(int64_t j) const { return HasU ? at<F>(u, j) : F{}; }
  template <typename F>
  F cfg_at(int64_t j, const CombineScalars& s) const { return HasG ? at<F>(g, j) : F{} + s.cfg_scale; }
  template <typename F>
  ElementTerms<F> terms(int64_t j, const CombineScalars& s) const {
    return element_terms<F>(at<F>(c, j), uncond_at<F>(j), cfg_at<F>(j, s), at<F>(p0, j), Two ? at<F>(p1, j) : F{},
                            s);
  }
};

// The nine sums in registers: VecF lanes for the vector body, floats for the tail.
template <typename F>
struct Sums {
  F v[kNumSums] = {};
  void add(F c, const ElementTerms<F>& t, const SampleShift& sh) {
    accumulate(c, t, sh, v[kSumC], v[kSumC2], v[kSumA], v[kSumA2], v[kSumB], v[kSumAB], v[kSumB2], v[kDotTS],
               v[kDotSS]);
  }
};

// Sums of elements [begin, end) (one chunk of one sample) into sums[kNumSums], shifted by `sh`.
template <typename T, bool HasU, bool HasG, bool Two>
void reduce_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, int64_t begin,
                  int64_t end, const SampleShift& sh, const CombineScalars& scalars, double* sums) {
  const CombineScalars s = specialized<HasU, Two>(scalars);
  Tile<T, HasU, HasG, Two> tile;
  Sums<VecF> vec;
  Sums<float> tail;
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t m = std::min(kTile, end - i0);
    tile.load(cond, uncond, cfg, p0, p1, i0, m);
    int64_t j = 0;
    for (; j + kLanes <= m; j += kLanes) vec.add(tile.template at<VecF>(tile.c, j), tile.template terms<VecF>(j, s), sh);
    for (; j < m; ++j) tail.add(tile.c[j], tile.template terms<float>(j, s), sh);
  }
  for (int k = 0; k < kNumSums; ++k) sums[k] = double(lane_sum(vec.v[k])) + double(tail.v[k]);
}

// Writes elements [begin, end) of one sample, whose alpha and rescale factor are known.
template <typename T, bool HasU, bool HasG, bool Two>
void write_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out, int64_t begin,
                 int64_t end, float alpha, float factor, const CombineScalars& scalars) {
  const CombineScalars s = specialized<HasU, Two>(scalars);
  Tile<T, HasU, HasG, Two> tile;
  alignas(64) float scratch_out[kTile];
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t m = std::min(kTile, end - i0);
    tile.load(cond, uncond, cfg, p0, p1, i0, m);
    // fp32 results go straight to `out`; others are rounded from a scratch tile.
    float* result = nullptr;
    if constexpr (std::is_same_v<T, float>) result = out + i0;
    else result = scratch_out;
    int64_t j = 0;
    for (; j + kLanes <= m; j += kLanes) {
      const VecF r = element_output<VecF>(tile.template terms<VecF>(j, s), tile.template uncond_at<VecF>(j),
                                          tile.template cfg_at<VecF>(j, s), alpha, factor, s);
      std::memcpy(result + j, &r, sizeof(r));
    }
    for (; j < m; ++j)
      result[j] = element_output<float>(tile.template terms<float>(j, s), tile.template uncond_at<float>(j),
                                        tile.template cfg_at<float>(j, s), alpha, factor, s);
    if constexpr (!std::is_same_v<T, float>) from_f32_tile(result, out + i0, m);
  }
}

template <typename T>
ChunkKernels<T> chunk_kernels() {
  return ChunkKernels<T>{
      {reduce_chunk<T, 0, 0, 0>, reduce_chunk<T, 0, 0, 1>, reduce_chunk<T, 0, 1, 0>, reduce_chunk<T, 0, 1, 1>,
       reduce_chunk<T, 1, 0, 0>, reduce_chunk<T, 1, 0, 1>, reduce_chunk<T, 1, 1, 0>, reduce_chunk<T, 1, 1, 1>},
      {write_chunk<T, 0, 0, 0>, write_chunk<T, 0, 0, 1>, write_chunk<T, 0, 1, 0>, write_chunk<T, 0, 1, 1>,
       write_chunk<T, 1, 0, 0>, write_chunk<T, 1, 0, 1>, write_chunk<T, 1, 1, 0>, write_chunk<T, 1, 1, 1>}};
}

inline ChunkTable chunk_table(const char* isa) {
  return ChunkTable{isa, chunk_kernels<float>(), chunk_kernels<Half16>(), chunk_kernels<BFloat16>()};
}

}  // namespace STG_EXT_ISA
}  // namespace cpu
}  // namespace stg_ext
