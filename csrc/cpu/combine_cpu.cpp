// CPU kernel of the guidance combination: one pass for the per-sample sums, one for the write.
//
// Every sample is split into fixed chunks, the work items of at::parallel_for (so a batch of one can use
// all cores; note that at::parallel_for is inline and runs the items serially unless this file is compiled
// with -fopenmp). The chunk loops (combine_chunks.h) come in baseline, AVX2 and AVX-512 builds, picked once
// at run time; each reads its inputs once per pass in their own dtype and converts in registers. Sums are
// fp32 within a chunk and fp64 across chunks, in a fixed order (deterministic for any thread count).
// Element types: float, c10::Half, c10::BFloat16 (math in fp32, one rounding on store).
#include "combine_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "combine_isa.h"

namespace stg_ext {
namespace cpu {
namespace {

// Elements per work item: large enough to amortize scheduling, small enough to split one sample.
constexpr int64_t kChunk = 1 << 15;

// The widest build the CPU runs; STG_EXT_CPU_ISA=baseline|avx2 caps it (tests use that to check each).
const ChunkTable& chunk_table() {
  static const ChunkTable table = [] {
    const char* env = std::getenv("STG_EXT_CPU_ISA");
    const std::string cap = env ? env : "";
#if defined(__x86_64__)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    if (cap.empty() && avx512) return chunk_table_avx512();
    if ((cap.empty() || cap == "avx2") && avx2) return chunk_table_avx2();
#endif
    return chunk_table_base();
  }();
  return table;
}

// c10's 16-bit types map onto the storage tags of the chunk loops (same layout).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::Half> {
  using type = Half16;
};
template <>
struct Storage<c10::BFloat16> {
  using type = BFloat16;
};
static_assert(sizeof(c10::Half) == sizeof(Half16) && sizeof(c10::BFloat16) == sizeof(BFloat16));

template <typename S>
const ChunkKernels<S>& kernels_for(const ChunkTable& t) {
  if constexpr (std::is_same_v<S, float>) return t.f32;
  else if constexpr (std::is_same_v<S, Half16>) return t.f16;
  else return t.bf16;
}

template <typename T>
float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
ElementTerms<float> terms_at(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, int64_t i,
                             const CombineScalars& s) {
  return element_terms<float>(load(cond, i), uncond ? load(uncond, i) : 0.f, cfg ? cfg[i] : s.cfg_scale,
                              load(p0, i), p1 ? load(p1, i) : 0.f, s);
}

}  // namespace

const char* active_isa() { return chunk_table().isa; }

template <typename T>
void combine_kernel(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                    int64_t batch, int64_t numel_per_sample, const CombineScalars& s) {
  const int64_t n = numel_per_sample;
  if (batch == 0 || n == 0) return;
  using S = typename Storage<T>::type;
  const int key = (uncond ? 8 : 0) | (cfg ? 4 : 0) | (p1 ? 2 : 0) | (p1 && s.orthogonalize ? 1 : 0);
  const auto reduce = kernels_for<S>(chunk_table()).reduce[key];
  const auto write = kernels_for<S>(chunk_table()).write[key];
  auto raw = [](const T* p) { return reinterpret_cast<const S*>(p); };

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
        reduce(raw(cond), raw(uncond), cfg, raw(p0), raw(p1), begin, end, sh, s, &partial[item * kNumSums]);
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
      write(raw(cond), raw(uncond), cfg, raw(p0), raw(p1), reinterpret_cast<S*>(out), begin, end, alpha[b],
            factor[b], s);
    }
  });
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
