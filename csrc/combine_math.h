// Per-element and per-sample math of the STG guidance combination (STG_SPEC section 2).
//
// Shared, unchanged, by the C++ CPU kernel and the CUDA kernel (hence __host__ __device__ and no torch
// headers), so the CPU tests exercise the arithmetic the CUDA kernel runs.
//
// Notation: c cond, u uncond, g cfg scale, p0/p1 perturbed (p1 only for factorized guidance),
// s0/s1 their scales. With d_i = c - p_i:
//   a = (has_u ? u + g (c - u) : c) + s0 d0 + s1 d1
//   b = orthogonalize ? -s1 d0 : 0
//   f = a + alpha b,      alpha = <d1, d0> / <d0, d0>  (Algorithm 5; 0 when <d0, d0> = 0)
// f is affine in alpha, so its per-sample mean and variance follow from sums of a, a^2, b, ab, b^2 that one
// pass accumulates together with <d1, d0> and <d0, d0>; the second pass writes f * k (Algorithm 4).
// c, a and b enter those sums shifted by their value at the sample's first element (SampleShift): the
// variance E[x^2] - E[x]^2 then cancels far less in fp32, and a constant sample gives exactly 0.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define STG_HD __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernel compiles these for several instruction sets (cpu/combine_chunks.h), and
// an out-of-line copy shared between them could run AVX code on a CPU without AVX.
#define STG_HD inline __attribute__((always_inline))
#endif

namespace stg_ext {

// Slots of the per-sample sums written by the reduction pass.
enum CombineSum : int {
  kSumC = 0,   // sum c
  kSumC2,      // sum c^2
  kSumA,       // sum a
  kSumA2,      // sum a^2
  kSumB,       // sum b
  kSumAB,      // sum a b
  kSumB2,      // sum b^2
  kDotTS,      // sum d1 d0   (orthogonalization numerator)
  kDotSS,      // sum d0 d0   (orthogonalization denominator)
  kNumSums
};

struct CombineScalars {
  float cfg_scale;    // used when no per-element cfg tensor is given
  float stg0;         // scale of the first perturbed prediction
  float stg1;         // scale of the second one (factorized guidance), else 0
  float rescale;      // r in [0, 1]
  bool has_uncond;
  bool two_perturbed;
  bool orthogonalize;
  bool fold;
};

// F is the value type: float (CUDA, scalar loops) or a GCC vector of floats (the CPU kernel's SIMD
// loops). The formulas are written once, for both.
template <typename F = float>
struct ElementTerms {
  F a;
  F b;
  F d0;
  F d1;
};

// STG_SPEC 2: the CFG part (or c alone) plus the STG terms, before orthogonalization and rescale.
template <typename F>
STG_HD ElementTerms<F> element_terms(F c, F u, F g, F p0, F p1, const CombineScalars& s) {
  ElementTerms<F> t;
  const F base = s.has_uncond ? u + g * (c - u) : c;
  t.d0 = c - p0;
  t.d1 = s.two_perturbed ? c - p1 : F{};
  // Absent terms are left out rather than added as 0 * x: the reference never adds them (a -0 stays -0,
  // an infinite d0 does not become NaN), and a kernel whose flags are compile-time constants does no work.
  t.a = base + s.stg0 * t.d0;
  if (s.two_perturbed) t.a = t.a + s.stg1 * t.d1;
  t.b = s.orthogonalize ? -s.stg1 * t.d0 : F{};
  return t;
}

// The value written for one element once alpha and the rescale factor of its sample are known.
template <typename F>
STG_HD F element_output(const ElementTerms<F>& t, F u, F g, float alpha, float factor, const CombineScalars& s) {
  const F f = (s.orthogonalize ? t.a + alpha * t.b : t.a) * factor;
  // fold: c' = u + (f - u) / g, so that the pipeline's own u + g (c' - u) yields f.
  return s.fold ? u + (f - u) / g : f;
}

// Values at a sample's first element, subtracted from c, a and b before they are summed.
struct SampleShift {
  float c;
  float a;
  float b;
};

STG_HD SampleShift sample_shift(float c0, const ElementTerms<float>& t0) {
  SampleShift sh;
  sh.c = c0;
  sh.a = t0.a;
  sh.b = t0.b;
  return sh;
}

// Adds one element (or one vector of elements) to the nine per-sample sums, in CombineSum order,
// shifted as described above. Scalar references rather than an array, so that they stay in registers.
// Ortho = false (no orthogonalization: b = 0, alpha = 0) skips the five sums only alpha needs; they stay 0.
template <bool Ortho = true, typename F, typename Acc>
STG_HD void accumulate(F c, const ElementTerms<F>& t, const SampleShift& sh, Acc& sum_c, Acc& sum_c2, Acc& sum_a,
                       Acc& sum_a2, Acc& sum_b, Acc& sum_ab, Acc& sum_b2, Acc& dot_ts, Acc& dot_ss) {
  const F dc = c - sh.c, da = t.a - sh.a;
  sum_c += dc;
  sum_c2 += dc * dc;
  sum_a += da;
  sum_a2 += da * da;
  if (Ortho) {
    const F db = t.b - sh.b;
    sum_b += db;
    sum_ab += da * db;
    sum_b2 += db * db;
    dot_ts += t.d1 * t.d0;
    dot_ss += t.d0 * t.d0;
  }
}

template <typename Acc>
STG_HD void accumulate(Acc* sums, float c, const ElementTerms<float>& t, const SampleShift& sh) {
  accumulate(c, t, sh, sums[kSumC], sums[kSumC2], sums[kSumA], sums[kSumA2], sums[kSumB], sums[kSumAB],
             sums[kSumB2], sums[kDotTS], sums[kDotSS]);
}

template <typename Acc>
struct SampleCoeffs {
  Acc alpha;
  Acc factor;
};

// Per-sample orthogonalization coefficient and rescale factor from the reduction pass's sums (of shifted
// values: mean and variance of f - (a0 + alpha b0) equal those of f up to the mean, which cancels).
template <typename Acc>
STG_HD SampleCoeffs<Acc> sample_coeffs(const Acc* sums, Acc n, const CombineScalars& s) {
  SampleCoeffs<Acc> out;
  out.alpha = Acc(0);
  if (s.orthogonalize && sums[kDotSS] != Acc(0)) out.alpha = sums[kDotTS] / sums[kDotSS];
  out.factor = Acc(1);
  if (s.rescale > 0.0f) {
    const Acc al = out.alpha;
    const Acc mean_c = sums[kSumC] / n;
    const Acc var_c = sums[kSumC2] / n - mean_c * mean_c;
    const Acc mean_f = (sums[kSumA] + al * sums[kSumB]) / n;
    const Acc ef2 = (sums[kSumA2] + Acc(2) * al * sums[kSumAB] + al * al * sums[kSumB2]) / n;
    const Acc var_f = ef2 - mean_f * mean_f;
    if (var_f != var_f || var_c != var_c) {  // a NaN or infinity in the sample: NaN, as the reference's std
      out.factor = Acc(NAN);
    } else if (var_f > Acc(0)) {  // std(f) = 0 (a constant sample): factor 1
      const Acc vc = var_c > Acc(0) ? var_c : Acc(0);
      const Acc ratio = Acc(sqrt(double(vc / var_f)));
      out.factor = Acc(s.rescale) * ratio + (Acc(1) - Acc(s.rescale));
    }
  }
  return out;
}

}  // namespace stg_ext
