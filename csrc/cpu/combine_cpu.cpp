// CPU kernel of the guidance combination: one pass for the per-sample sums, one for the write.
//
// Threads split every sample into fixed chunks (so a batch of one still uses all cores); each chunk
// accumulates in fp32 SIMD lanes, chunks are summed in fp64. Element types: float, c10::Half,
// c10::BFloat16 (math in fp32, one rounding on store).
#include "combine_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace stg_ext {
namespace cpu {
namespace {

// Elements per work item: large enough to amortize scheduling, small enough to split one sample.
constexpr int64_t kChunk = 1 << 15;
// Elements converted to fp32 at a time: the tiles of one item stay in L1.
constexpr int64_t kTile = 512;

template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t m) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<float>(src[j]);
}

// The inputs of one tile in fp32; optional ones are filled only when present (compile-time flags keep
// the per-element loops free of null checks, so they vectorize).
template <typename T, bool HasU, bool HasG, bool Two>
struct Tile {
  alignas(64) float c[kTile];
  alignas(64) float u[kTile];
  alignas(64) float g[kTile];
  alignas(64) float p0[kTile];
  alignas(64) float p1[kTile];

  void load(const T* cond, const T* uncond, const float* cfg, const T* q0, const T* q1, int64_t i0, int64_t m) {
    to_float(cond + i0, c, m);
    to_float(q0 + i0, p0, m);
    if (HasU) to_float(uncond + i0, u, m);
    if (HasG) to_float(cfg + i0, g, m);
    if (Two) to_float(q1 + i0, p1, m);
  }
  ElementTerms terms(int64_t j, const CombineScalars& s) const {
    return element_terms(c[j], HasU ? u[j] : 0.f, HasG ? g[j] : s.cfg_scale, p0[j], Two ? p1[j] : 0.f, s);
  }
};

template <typename T>
ElementTerms terms_at(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, int64_t i,
                      const CombineScalars& s) {
  return element_terms(load(cond, i), uncond ? load(uncond, i) : 0.f, cfg ? cfg[i] : s.cfg_scale, load(p0, i),
                       p1 ? load(p1, i) : 0.f, s);
}

template <typename T, bool HasU, bool HasG, bool Two>
void reduce_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1,
                  int64_t begin, int64_t end, const SampleShift& sh, const CombineScalars& s, double* sums) {
  Tile<T, HasU, HasG, Two> tile;
  // Nine scalar accumulators (not an array) so `omp simd reduction` keeps each in a vector register.
  float sc = 0.f, sc2 = 0.f, sa = 0.f, sa2 = 0.f, sb = 0.f, sab = 0.f, sb2 = 0.f, dts = 0.f, dss = 0.f;
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t m = std::min(kTile, end - i0);
    tile.load(cond, uncond, cfg, p0, p1, i0, m);
#pragma omp simd reduction(+ : sc, sc2, sa, sa2, sb, sab, sb2, dts, dss)
    for (int64_t j = 0; j < m; ++j) {
      float acc[kNumSums] = {0.f};
      accumulate(acc, tile.c[j], tile.terms(j, s), sh);
      sc += acc[kSumC];
      sc2 += acc[kSumC2];
      sa += acc[kSumA];
      sa2 += acc[kSumA2];
      sb += acc[kSumB];
      sab += acc[kSumAB];
      sb2 += acc[kSumB2];
      dts += acc[kDotTS];
      dss += acc[kDotSS];
    }
  }
  const float partial[kNumSums] = {sc, sc2, sa, sa2, sb, sab, sb2, dts, dss};
  for (int j = 0; j < kNumSums; ++j) sums[j] = partial[j];
}

template <typename T, bool HasU, bool HasG, bool Two>
void write_chunk(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                 int64_t begin, int64_t end, float alpha, float factor, const CombineScalars& s) {
  Tile<T, HasU, HasG, Two> tile;
  alignas(64) float result[kTile];
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t m = std::min(kTile, end - i0);
    tile.load(cond, uncond, cfg, p0, p1, i0, m);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float u = HasU ? tile.u[j] : 0.f;
      const float g = HasG ? tile.g[j] : s.cfg_scale;
      result[j] = element_output(tile.terms(j, s), u, g, alpha, factor, s);
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) out[i0 + j] = static_cast<T>(result[j]);
  }
}

template <typename T, bool HasU, bool HasG, bool Two>
void run_passes(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                int64_t batch, int64_t n, const CombineScalars& s) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t items = batch * chunks;
  auto bounds = [&](int64_t item, int64_t& b, int64_t& begin, int64_t& end) {
    b = item / chunks;
    const int64_t k = item % chunks;
    begin = b * n + k * kChunk;
    end = b * n + std::min(n, (k + 1) * kChunk);
  };

  std::vector<float> alpha(batch, 0.f), factor(batch, 1.f);
  if (s.rescale > 0.f || s.orthogonalize) {
    std::vector<double> partial(items * kNumSums, 0.0);
    at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        int64_t b, begin, end;
        bounds(item, b, begin, end);
        const int64_t first = b * n;
        const SampleShift sh = sample_shift(load(cond, first), terms_at(cond, uncond, cfg, p0, p1, first, s));
        reduce_chunk<T, HasU, HasG, Two>(cond, uncond, cfg, p0, p1, begin, end, sh, s, &partial[item * kNumSums]);
      }
    });
    for (int64_t b = 0; b < batch; ++b) {
      double sums[kNumSums] = {0.0};
      for (int64_t k = 0; k < chunks; ++k)
        for (int j = 0; j < kNumSums; ++j) sums[j] += partial[(b * chunks + k) * kNumSums + j];
      const SampleCoeffs<double> coeffs = sample_coeffs<double>(sums, double(n), s);
      alpha[b] = float(coeffs.alpha);
      factor[b] = float(coeffs.factor);
    }
  }

  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      int64_t b, begin, end;
      bounds(item, b, begin, end);
      write_chunk<T, HasU, HasG, Two>(cond, uncond, cfg, p0, p1, out, begin, end, alpha[b], factor[b], s);
    }
  });
}

}  // namespace

template <typename T>
void combine_kernel(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                    int64_t batch, int64_t numel_per_sample, const CombineScalars& s) {
  if (batch == 0 || numel_per_sample == 0) return;
  // Which optional inputs exist picks one of eight specializations.
  const int key = (uncond ? 4 : 0) | (cfg ? 2 : 0) | (p1 ? 1 : 0);
  switch (key) {
#define STG_EXT_CASE(K) \
  case K:               \
    return run_passes<T, bool(K & 4), bool(K & 2), bool(K & 1)>(cond, uncond, cfg, p0, p1, out, batch, numel_per_sample, s);
    STG_EXT_CASE(0) STG_EXT_CASE(1) STG_EXT_CASE(2) STG_EXT_CASE(3)
    STG_EXT_CASE(4) STG_EXT_CASE(5) STG_EXT_CASE(6) STG_EXT_CASE(7)
#undef STG_EXT_CASE
  }
}

#define STG_EXT_INSTANTIATE(T)                                                                          \
  template void combine_kernel<T>(const T*, const T*, const float*, const T*, const T*, T*, int64_t, \
                                  int64_t, const CombineScalars&);
STG_EXT_INSTANTIATE(float)
STG_EXT_INSTANTIATE(c10::Half)
STG_EXT_INSTANTIATE(c10::BFloat16)
#undef STG_EXT_INSTANTIATE

}  // namespace cpu
}  // namespace stg_ext
