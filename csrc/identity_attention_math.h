// Online-softmax math of identity joint attention (STG-A on joint attention, STG_SPEC section 3):
//   out_i = softmax([q_i.k_i, q_i.K_text^T] * scale + [0, bias_i]) @ [v_i; V_text]
//
// Shared, unchanged, by the C++ CPU kernel and the CUDA kernel (hence __host__ __device__ and no torch
// headers), so the CPU tests exercise the arithmetic the CUDA kernel runs.
//
// Every video query starts from its self key: running max m = the self logit, running sum l = 1 (its
// weight exp(0); NaN when the self logit is not finite) and accumulator acc = v_i. Text keys then arrive in chunks; per chunk:
//   alpha = softmax_rescale(state, max of the chunk's logits)   -> acc *= alpha (when alpha != 1)
//   w_t   = softmax_weight(logit_t, state)                       -> acc += w_t v_t
//   softmax_add(state, sum_t w_t)
// and finally out = acc * softmax_norm(state). The self logit is finite for finite inputs, so m is always
// finite: text keys masked with -inf get weight exactly 0 and never produce inf - inf, and a query whose
// text keys are all masked (or T = 0) gets exactly v_i.
#pragma once

#include <cmath>

#ifndef STG_HD
#if defined(__CUDACC__)
#define STG_HD __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernel compiles its loops for several instruction sets, and an out-of-line copy
// shared between them could run AVX code on a CPU without AVX (same definition as combine_math.h).
#define STG_HD inline __attribute__((always_inline))
#endif
#endif

namespace stg_ext {

// Running max and running sum of exp(logit - m) of one query's softmax.
struct SoftmaxState {
  float m;
  float l;
};

// The state after the self key alone: its weight is exp(self - m) = 1. The caller sets acc = v_i.
// A self logit that is NaN or infinite (a NaN or infinity in q_i or k_i) makes the softmax NaN, as the
// reference's: l = NaN, so the output is NaN whatever the text keys are (T = 0 included).
STG_HD SoftmaxState softmax_start(float self_logit) {
  SoftmaxState s;
  s.m = self_logit;
  s.l = (self_logit - self_logit == 0.0f) ? 1.0f : NAN;
  return s;
}

// The self logit q.k * scale, from the fp32 dot product.
STG_HD float self_logit(float dot, float scale) { return dot * scale; }

// One text logit: (q.k_t) * scale + bias_t, the reference's order of operations. F is float or a vector of
// floats (the CPU kernel's SIMD loops); bias -inf hides the key.
template <typename F>
STG_HD F text_logit(F dot, float scale, F bias) {
  return dot * scale + bias;
}

// Merges a chunk whose largest logit is `chunk_max` into the state: returns the factor alpha by which the
// caller multiplies its accumulator (the state's sum is rescaled here). alpha is exactly 1 when the max does
// not grow (including an all-masked chunk, chunk_max = -inf).
STG_HD float softmax_rescale(SoftmaxState& s, float chunk_max) {
  if (!(chunk_max > s.m)) return 1.0f;
  const float alpha = expf(s.m - chunk_max);
  s.m = chunk_max;
  s.l *= alpha;
  return alpha;
}

// Weight of one key once the state has seen its chunk's max: exp(logit - m), exactly 0 for a masked key.
STG_HD float softmax_weight(float logit, const SoftmaxState& s) {
  return logit == -INFINITY ? 0.0f : expf(logit - s.m);
}

// Adds the chunk's weights (after softmax_weight) to the running sum.
STG_HD void softmax_add(SoftmaxState& s, float weight_sum) { s.l += weight_sum; }

// The factor applied to the accumulator at the end: 1 / l. l >= 1 (the key holding the max has weight 1), so
// this never divides by 0.
STG_HD float softmax_norm(const SoftmaxState& s) { return 1.0f / s.l; }

}  // namespace stg_ext
