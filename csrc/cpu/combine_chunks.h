// The per-chunk loops of the CPU kernel (reduction and write), compiled once per instruction set: the
// including file defines STG_EXT_ISA (a namespace name) and may set a `#pragma GCC target` first.
// Deliberately free of torch headers, so that nothing inline from torch gets compiled for an instruction
// set the running CPU may lack; fp16/bf16 are handled as raw 16-bit storage here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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
#ifndef STG_EXT_F16C  // set by the including file when its target has F16C (then <immintrin.h> is included)
#define STG_EXT_F16C 0
#endif
#ifndef STG_EXT_VEC_IN_ONE_REGISTER  // set by the including file when kLanes floats fill one register
#define STG_EXT_VEC_IN_ONE_REGISTER 0
#endif
// fp32 lanes per vector: 8 (two SSE registers on baseline x86-64, one AVX register in the AVX2 build) or 16
// (AVX-512). Explicit vector types because GCC does not vectorize these loops on its own (measured: scalar
// code, several times slower).
constexpr int kLanes = STG_EXT_LANES;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));

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

// kLanes elements of storage type T, loaded straight into fp32 registers (16-bit types widened there:
// no fp32 copy of the inputs is ever written to memory), and back.
inline VecF load_vec(const float* src) {
  VecF v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}
inline VecF load_vec(const BFloat16* src) {
  VecU16 h;
  std::memcpy(&h, src, sizeof(h));
  return bits_of<VecF>(__builtin_convertvector(h, VecU32) << 16);
}
// fp16: the F16C instructions where the build has them (GCC 12 lowers _Float16 vector conversions to a
// library call per element without AVX512-FP16); both round to nearest even, as torch's conversions do.
inline VecF load_vec(const Half16* src) {
#if STG_EXT_F16C && STG_EXT_LANES == 16
  return VecF(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
#elif STG_EXT_F16C && STG_EXT_LANES == 8
  return VecF(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
#else
  VecH h;
  std::memcpy(&h, src, sizeof(h));
  return __builtin_convertvector(h, VecF);
#endif
}
inline void store_vec(float* dst, VecF f) { std::memcpy(dst, &f, sizeof(f)); }
// All ones in the lanes whose bits are a NaN (magnitude above infinity's), by a subtraction and an
// arithmetic shift: GCC splits compares of vectors wider than the machine's (8 lanes on baseline
// x86-64) into scalar ones.
inline VecU32 nan_mask(VecU32 bits) {
  return bits_of<VecU32>((VecI32{} + 0x7F800000 - bits_of<VecI32>(bits & 0x7FFFFFFFu)) >> 31);
}
inline void store_vec(BFloat16* dst, VecF f) {
  const VecU32 u = bits_of<VecU32>(f);
  const VecU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const VecU32 is_nan = nan_mask(u);
  const VecU16 out = __builtin_convertvector((is_nan & 0x7FC0u) | (~is_nan & rounded), VecU16);
  std::memcpy(dst, &out, sizeof(out));
}
inline void store_vec(Half16* dst, VecF f) {
#if STG_EXT_F16C && STG_EXT_LANES == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(__m512(f), _MM_FROUND_TO_NEAREST_INT));
#elif STG_EXT_F16C && STG_EXT_LANES == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(__m256(f), _MM_FROUND_TO_NEAREST_INT));
#else
  const VecH h = __builtin_convertvector(f, VecH);
  std::memcpy(dst, &h, sizeof(h));
#endif
}

// Element i (F = float) or elements i .. i + kLanes (F = VecF), as fp32.
template <typename F, typename T>
inline F load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<F, float>) return to_f32(p[i]);
  else return load_vec(p + i);
}
template <typename T>
inline void store(T* p, int64_t i, float x) { p[i] = from_f32<T>(x); }
template <typename T>
inline void store(T* p, int64_t i, VecF x) { store_vec(p + i, x); }

// Blocks of 2 kLanes elements as two fp32 vectors h0, h1. Every input of a block and its output use the
// same layout, so the arithmetic, which is element-wise, does not depend on it (and the sums do not
// depend on the order of their terms beyond rounding):
//  - ordered: h0 holds elements 0 .. kLanes, h1 the next kLanes;
//  - split (bf16): h0 holds the even elements, h1 the odd ones. A bf16 is the top half of an fp32, so one
//    32-bit lane holding elements 2k, 2k+1 widens to two fp32 with a shift and a mask, and two rounded
//    fp32 narrow back with a shift, a mask and an or: no shuffles, the same code for every instruction set.
//    An fp32 input read alongside (the cfg tensor) is split into even and odd elements by two shuffles,
//    where a VecF is one register (AVX2, AVX-512); baseline x86-64 (two SSE registers) would do them
//    element by element, so there bf16 blocks with a cfg tensor stay ordered.
template <typename T, bool HasG>
constexpr bool kSplit = std::is_same_v<T, BFloat16> && (!HasG || STG_EXT_VEC_IN_ONE_REGISTER);

inline VecF load_even(VecU32 w) { return bits_of<VecF>(w << 16); }
inline VecF load_odd(VecU32 w) { return bits_of<VecF>(w & 0xFFFF0000u); }
// x rounded to bf16 (c10's rounding, as from_f32<BFloat16>) in the top 16 bits of each lane.
inline VecU32 round_bf16_high(VecF x) {
  const VecU32 u = bits_of<VecU32>(x);
  const VecU32 rounded = u + (((u >> 16) & 1u) + 0x7FFFu);
  const VecU32 is_nan = nan_mask(u);
  return (is_nan & 0x7FC00000u) | (~is_nan & rounded);
}

template <int... I>
inline void deinterleave(VecF a, VecF b, VecF& even, VecF& odd, std::integer_sequence<int, I...>) {
  even = __builtin_shufflevector(a, b, (2 * I)...);
  odd = __builtin_shufflevector(a, b, (2 * I + 1)...);
}

template <bool Split, typename T>
inline void load_block(const T* src, VecF& h0, VecF& h1) {
  if constexpr (Split && std::is_same_v<T, float>) {
    deinterleave(load_vec(src), load_vec(src + kLanes), h0, h1, std::make_integer_sequence<int, kLanes>{});
  } else if constexpr (Split) {
    static_assert(std::is_same_v<T, BFloat16>, "split blocks are bf16");
    VecU32 w;
    std::memcpy(&w, src, sizeof(w));
    h0 = load_even(w);
    h1 = load_odd(w);
  } else {
    h0 = load_vec(src);
    h1 = load_vec(src + kLanes);
  }
}
template <bool Split, typename T>
inline void store_block(T* dst, VecF h0, VecF h1) {
  if constexpr (Split) {
    static_assert(std::is_same_v<T, BFloat16>, "split blocks are bf16");
    const VecU32 w = (round_bf16_high(h0) >> 16) | (round_bf16_high(h1) & 0xFFFF0000u);
    std::memcpy(dst, &w, sizeof(w));
  } else {
    store_vec(dst, h0);
    store_vec(dst + kLanes, h1);
  }
}

inline float lane_sum(VecF v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// A copy of the scalars whose flags are compile-time constants: no branch (and no multiply by a 0 that
// IEEE arithmetic could not drop) is left on them.
template <bool HasU, bool Two, bool Ortho>
inline CombineScalars specialized(const CombineScalars& s) {
  CombineScalars out = s;
  out.has_uncond = HasU;
  out.two_perturbed = Two;
  out.orthogonalize = Ortho;
  return out;
}

// The inputs of one sample, read in place in their storage type. Optional inputs are touched only when
// present.
template <typename T, bool HasU, bool HasG, bool Two>
struct Inputs {
  const T* c;
  const T* u;
  const float* g;
  const T* p0;
  const T* p1;

  template <typename F>
  struct Loaded {
    F c, u, g;
    ElementTerms<F> t;
  };
  // Element i (F = float) or elements i .. i + kLanes (F = VecF): the inputs and their terms.
  template <typename F>
  Loaded<F> at(int64_t i, const CombineScalars& s) const {
    Loaded<F> l;
    l.c = load<F>(c, i);
    if constexpr (HasU) l.u = load<F>(u, i);
    else l.u = F{};
    if constexpr (HasG) l.g = load<F>(g, i);
    else l.g = F{} + s.cfg_scale;
    F q1{};
    if constexpr (Two) q1 = load<F>(p1, i);
    l.t = element_terms<F>(l.c, l.u, l.g, load<F>(p0, i), q1, s);
    return l;
  }
  // Elements i .. i + 2 kLanes, as the two halves of a block (layout kSplit<T, HasG>).
  static constexpr bool kSplitBlock = kSplit<T, HasG>;
  void block(int64_t i, const CombineScalars& s, Loaded<VecF>& l0, Loaded<VecF>& l1) const {
    constexpr bool S = kSplitBlock;
    VecF q00, q01, q10{}, q11{};
    load_block<S>(c + i, l0.c, l1.c);
    if constexpr (HasU) load_block<S>(u + i, l0.u, l1.u);
    else l0.u = l1.u = VecF{};
    if constexpr (HasG) load_block<S>(g + i, l0.g, l1.g);
    else l0.g = l1.g = VecF{} + s.cfg_scale;
    load_block<S>(p0 + i, q00, q01);
    if constexpr (Two) load_block<S>(p1 + i, q10, q11);
    l0.t = element_terms<VecF>(l0.c, l0.u, l0.g, q00, q10, s);
    l1.t = element_terms<VecF>(l1.c, l1.u, l1.g, q01, q11, s);
  }
};

// The nine sums in registers: VecF lanes for the vector body, floats for the tail.
template <typename F, bool Ortho>
struct Sums {
  F v[kNumSums] = {};
  void add(F c, const ElementTerms<F>& t, const SampleShift& sh) {
    accumulate<Ortho>(c, t, sh, v[kSumC], v[kSumC2], v[kSumA], v[kSumA2], v[kSumB], v[kSumAB], v[kSumB2],
                      v[kDotTS], v[kDotSS]);
  }
};

// Sums of elements [begin, end) (one chunk of one sample) into sums[kNumSums], shifted by `sh`: one
// read of every input, converted in registers. The two halves of a block go to separate accumulators, so
// the additions into one sum do not wait on each other.
template <typename T, bool HasU, bool HasG, bool Two, bool Ortho>
void reduce_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, int64_t begin,
                  int64_t end, const SampleShift& sh, const CombineScalars& scalars, double* sums) {
  const CombineScalars s = specialized<HasU, Two, Ortho>(scalars);
  const Inputs<T, HasU, HasG, Two> in{cond, uncond, cfg, p0, p1};
  Sums<VecF, Ortho> even, odd;
  Sums<float, Ortho> tail;
  int64_t i = begin;
  for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
    typename Inputs<T, HasU, HasG, Two>::template Loaded<VecF> l0, l1;
    in.block(i, s, l0, l1);
    even.add(l0.c, l0.t, sh);
    odd.add(l1.c, l1.t, sh);
  }
  for (; i + kLanes <= end; i += kLanes) {
    const auto l = in.template at<VecF>(i, s);
    even.add(l.c, l.t, sh);
  }
  for (; i < end; ++i) {
    const auto l = in.template at<float>(i, s);
    tail.add(l.c, l.t, sh);
  }
  for (int k = 0; k < kNumSums; ++k)
    sums[k] = double(lane_sum(even.v[k])) + double(lane_sum(odd.v[k])) + double(tail.v[k]);
}

// Writes elements [begin, end) of one sample, whose alpha and rescale factor are known: one read of every
// input, one write, conversions in registers.
template <typename T, bool HasU, bool HasG, bool Two, bool Ortho>
void write_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out, int64_t begin,
                 int64_t end, float alpha, float factor, const CombineScalars& scalars) {
  const CombineScalars s = specialized<HasU, Two, Ortho>(scalars);
  using In = Inputs<T, HasU, HasG, Two>;
  const In in{cond, uncond, cfg, p0, p1};
  int64_t i = begin;
  for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
    typename In::template Loaded<VecF> l0, l1;
    in.block(i, s, l0, l1);
    store_block<In::kSplitBlock>(out + i, element_output<VecF>(l0.t, l0.u, l0.g, alpha, factor, s),
                                 element_output<VecF>(l1.t, l1.u, l1.g, alpha, factor, s));
  }
  for (; i + kLanes <= end; i += kLanes) {
    const auto l = in.template at<VecF>(i, s);
    store(out, i, element_output<VecF>(l.t, l.u, l.g, alpha, factor, s));
  }
  for (; i < end; ++i) {
    const auto l = in.template at<float>(i, s);
    store(out, i, element_output<float>(l.t, l.u, l.g, alpha, factor, s));
  }
}

// Index HasU * 8 + HasG * 4 + Two * 2 + Ortho (orthogonalization needs two perturbed predictions: the
// Ortho entries without Two are never used and point to the plain loops).
template <typename T, int Key>
constexpr auto reduce_at = reduce_chunk<T, bool(Key & 8), bool(Key & 4), bool(Key & 2), (Key & 3) == 3>;
template <typename T, int Key>
constexpr auto write_at = write_chunk<T, bool(Key & 8), bool(Key & 4), bool(Key & 2), (Key & 3) == 3>;

template <typename T, int... Keys>
ChunkKernels<T> chunk_kernels(std::integer_sequence<int, Keys...>) {
  return ChunkKernels<T>{{reduce_at<T, Keys>...}, {write_at<T, Keys>...}};
}
template <typename T>
ChunkKernels<T> chunk_kernels() {
  return chunk_kernels<T>(std::make_integer_sequence<int, kNumChunkVariants>{});
}

inline ChunkTable chunk_table(const char* isa) {
  return ChunkTable{isa, chunk_kernels<float>(), chunk_kernels<Half16>(), chunk_kernels<BFloat16>()};
}

}  // namespace STG_EXT_ISA
}  // namespace cpu
}  // namespace stg_ext
