// CPU kernel of identity joint attention: out_i = softmax([q_i.k_i, q_i.K_text^T] * scale + [0, bias_i])
// @ [v_i; V_text], with the online-softmax bookkeeping of ../identity_attention_math.h.
//
// Layout. K_text is packed once per call as fp32 K^T (D x Tp per (b, h)) and V_text as fp32 (Tp x Dp), T and
// D zero-padded to the vector tiles (padded keys get bias -inf, so weight 0). Work items are (b, h, block of
// kRows queries), spread over threads with at::parallel_for. An item converts its q, k, v rows to fp32
// scratch, then for every chunk of kKeyChunk text keys: logits = Q K^T (register-tiled R queries x W
// vectors of keys), the online-softmax update per query (vector exp), acc += P V (R queries x J vectors of D).
// Cost O(N (T + 1) D) per head; K_text/V_text chunks stay in L1/L2 for all queries of an item.
//
// Instruction sets. The block routine is one template compiled three times in this file: through
// function-level target attributes for AVX-512 (16 lanes) and AVX2+FMA (8 lanes), and for the baseline
// (4 lanes); the widest the CPU runs is picked once (STG_EXT_CPU_ISA=avx2|baseline caps it, as for
// combine). Only the three entry points carry a target attribute and everything they call is inlined into
// them, so no AVX code can leak into a function the baseline path shares.
#include "identity_attention_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../identity_attention_math.h"

// The project builds with -ffp-contract=off (combine must round like PyTorch's eager ops). Attention has no
// such bit-exactness contract, and without contraction the dot products below would run as separate
// multiplies and adds at half the throughput: this file's own functions may fuse a * b + c into an FMA.
#pragma GCC optimize("fp-contract=fast")

#define STG_IA_INLINE inline __attribute__((always_inline))

namespace stg_ext {
namespace cpu {
namespace {

constexpr int64_t kRows = 64;       // queries per work item
constexpr int64_t kKeyChunk = 128;  // text keys per online-softmax chunk (a multiple of every key tile)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One work item, everything fp32. Rows are padded to the ISA's R, D to Dp, T to Tp.
struct Block {
  int64_t rows;        // query rows in the scratch buffers (a multiple of R)
  int64_t D, Dp, Tp;
  float scale;
  const float* q;      // rows x Dp, zero padded
  const float* k;      // rows x Dp
  const float* v;      // rows x Dp
  const float* kt;     // D x Tp: K_text^T of this (b, h), zero padded keys
  const float* vt;     // Tp x Dp: V_text of this (b, h), zero padded
  const float* bias;   // row r at bias + r * bias_rs, Tp entries, -inf on padded keys
  int64_t bias_rs;     // 0 when every query shares one bias row
  float* logits;       // rows x kKeyChunk scratch: logits, then weights
  SoftmaxState* state; // rows
  float* out;          // rows x Dp accumulator, normalized at the end
};

template <int L>
struct Vec {
  typedef float F __attribute__((vector_size(L * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(L * sizeof(int32_t))));
};

template <int L>
STG_IA_INLINE typename Vec<L>::F vload(const float* p) {
  typename Vec<L>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int L>
STG_IA_INLINE void vstore(float* p, typename Vec<L>::F v) {
  std::memcpy(p, &v, sizeof(v));
}
// A broadcast. Through the integer bits: F{} + x is an fp addition the compiler must keep (0 + -0 = +0), and
// a lane-by-lane loop compiles to masked inserts; an integer 0 + bits folds away to one vpbroadcastd.
template <int L>
STG_IA_INLINE typename Vec<L>::F vset(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const typename Vec<L>::I vi = typename Vec<L>::I{} + bits;
  typename Vec<L>::F v;
  std::memcpy(&v, &vi, sizeof(v));
  return v;
}
template <int L>
STG_IA_INLINE float hsum(typename Vec<L>::F v) {
  float s = 0.f;
  for (int l = 0; l < L; ++l) s += v[l];
  return s;
}
template <int L>
STG_IA_INLINE float hmax(typename Vec<L>::F v) {
  float m = v[0];
  for (int l = 1; l < L; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp(x) for x <= 0 (logit - running max), lane-wise: Cephes' expf (range reduction by ln 2, degree-6
// polynomial, ~1 ulp). Exactly 1 at 0 and exactly 0 below -87.3 (so at -inf: masked keys weigh nothing).
template <int L>
STG_IA_INLINE typename Vec<L>::F vexp(typename Vec<L>::F x) {
  using F = typename Vec<L>::F;
  using I = typename Vec<L>::I;
  const I tiny = x < -87.3f;
  x = tiny ? vset<L>(-87.3f) : x;
  const F t = x * 1.44269504088896341f + 0.5f;
  F n = __builtin_convertvector(__builtin_convertvector(t, I), F);  // trunc ...
  n = n > t ? n - 1.0f : n;                                          // ... to floor
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F y = vset<L>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;  // 2^n, n in [-126, 0]
  F pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return tiny ? F{} : y * pow2;
}

// logits[r, 0:kc] = q_r . K_text[c0:c0+kc]: tiles of R queries x W vectors of keys in registers.
template <int L, int R, int W>
STG_IA_INLINE void qk_chunk(const Block& b, int64_t c0, int64_t kc) {
  using F = typename Vec<L>::F;
  for (int64_t r0 = 0; r0 < b.rows; r0 += R) {
    for (int64_t j0 = 0; j0 < kc; j0 += L * W) {
      F acc[R][W];
#pragma GCC unroll 16
      for (int i = 0; i < R * W; ++i) acc[i / W][i % W] = F{};
      const float* kcol = b.kt + c0 + j0;
      const float* qrow = b.q + r0 * b.Dp;
      for (int64_t d = 0; d < b.D; ++d) {
        F kv[W];
#pragma GCC unroll 8
        for (int w = 0; w < W; ++w) kv[w] = vload<L>(kcol + d * b.Tp + w * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const F qb = vset<L>(qrow[r * b.Dp + d]);
#pragma GCC unroll 8
          for (int w = 0; w < W; ++w) acc[r][w] = acc[r][w] + qb * kv[w];
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < R * W; ++i)
        vstore<L>(b.logits + (r0 + i / W) * kKeyChunk + j0 + (i % W) * L, acc[i / W][i % W]);
    }
  }
}

// Per query: text logits of the chunk, the online-softmax update (identity_attention_math.h), weights.
template <int L>
STG_IA_INLINE void softmax_chunk(const Block& b, int64_t c0, int64_t kc) {
  using F = typename Vec<L>::F;
  for (int64_t r = 0; r < b.rows; ++r) {
    float* x = b.logits + r * kKeyChunk;
    const float* bias = b.bias + r * b.bias_rs + c0;
    F mx = vset<L>(kNegInf);
    for (int64_t j = 0; j < kc; j += L) {
      const F lg = text_logit<F>(vload<L>(x + j), b.scale, vload<L>(bias + j));
      vstore<L>(x + j, lg);
      mx = lg > mx ? lg : mx;
    }
    SoftmaxState& st = b.state[r];
    const float alpha = softmax_rescale(st, hmax<L>(mx));
    float* acc = b.out + r * b.Dp;
    if (alpha != 1.0f)
      for (int64_t j = 0; j < b.Dp; j += L) vstore<L>(acc + j, vload<L>(acc + j) * alpha);
    // softmax_weight(), vectorized: exp(logit - m), 0 for masked keys.
    F sum = F{};
    for (int64_t j = 0; j < kc; j += L) {
      const F p = vexp<L>(vload<L>(x + j) - st.m);
      vstore<L>(x + j, p);
      sum += p;
    }
    softmax_add(st, hsum<L>(sum));
  }
}

// out[r] += sum_t w[r, t] V_text[c0 + t]: tiles of R queries x J vectors of D in registers.
template <int L, int R, int J>
STG_IA_INLINE void pv_chunk(const Block& b, int64_t c0, int64_t kc) {
  using F = typename Vec<L>::F;
  for (int64_t r0 = 0; r0 < b.rows; r0 += R) {
    for (int64_t j0 = 0; j0 < b.Dp; j0 += L * J) {
      F acc[R][J];
#pragma GCC unroll 16
      for (int i = 0; i < R * J; ++i) acc[i / J][i % J] = vload<L>(b.out + (r0 + i / J) * b.Dp + j0 + (i % J) * L);
      const float* vcol = b.vt + c0 * b.Dp + j0;
      const float* prow = b.logits + r0 * kKeyChunk;
      for (int64_t t = 0; t < kc; ++t) {
        F vv[J];
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) vv[j] = vload<L>(vcol + t * b.Dp + j * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const F pb = vset<L>(prow[r * kKeyChunk + t]);
#pragma GCC unroll 8
          for (int j = 0; j < J; ++j) acc[r][j] = acc[r][j] + pb * vv[j];
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < R * J; ++i) vstore<L>(b.out + (r0 + i / J) * b.Dp + j0 + (i % J) * L, acc[i / J][i % J]);
    }
  }
}

template <int L, int R, int W, int J>
STG_IA_INLINE void attend_block(const Block& b) {
  using F = typename Vec<L>::F;
  // The self key: softmax_start, acc = v_i.
  for (int64_t r = 0; r < b.rows; ++r) {
    F dot = F{};
    for (int64_t j = 0; j < b.Dp; j += L) dot += vload<L>(b.q + r * b.Dp + j) * vload<L>(b.k + r * b.Dp + j);
    b.state[r] = softmax_start(self_logit(hsum<L>(dot), b.scale));
    std::memcpy(b.out + r * b.Dp, b.v + r * b.Dp, sizeof(float) * b.Dp);
  }
  for (int64_t c0 = 0; c0 < b.Tp; c0 += kKeyChunk) {
    const int64_t kc = std::min(kKeyChunk, b.Tp - c0);
    qk_chunk<L, R, W>(b, c0, kc);
    softmax_chunk<L>(b, c0, kc);
    pv_chunk<L, R, J>(b, c0, kc);
  }
  for (int64_t r = 0; r < b.rows; ++r) {
    const float norm = softmax_norm(b.state[r]);
    float* acc = b.out + r * b.Dp;
    for (int64_t j = 0; j < b.Dp; j += L) vstore<L>(acc + j, vload<L>(acc + j) * norm);
  }
}

// Tile shapes: R x W and R x J accumulators fit the register file (32 zmm / 16 ymm / 16 xmm) with room for
// the loaded vectors.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void attend_avx512(const Block& b) {
  attend_block<16, 4, 4, 4>(b);
}
__attribute__((target("avx2,fma,f16c"))) void attend_avx2(const Block& b) { attend_block<8, 4, 2, 2>(b); }
#endif
void attend_baseline(const Block& b) { attend_block<4, 4, 2, 2>(b); }

struct Isa {
  const char* name;
  void (*attend)(const Block&);
  int64_t rows_tile;  // R
  int64_t key_tile;   // L * W: Tp is a multiple
  int64_t dim_tile;   // L * J: Dp is a multiple
};

const Isa& isa() {
  static const Isa chosen = [] {
    const char* env = std::getenv("STG_EXT_CPU_ISA");
    const std::string cap = env ? env : "";
#if defined(__x86_64__)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    if (cap.empty() && avx512) return Isa{"avx512", attend_avx512, 4, 64, 64};
    if ((cap.empty() || cap == "avx2") && avx2) return Isa{"avx2", attend_avx2, 4, 16, 16};
#endif
    return Isa{"baseline", attend_baseline, 4, 8, 8};
  }();
  return chosen;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename scalar_t>
void load_rows(const scalar_t* base, int64_t stride_n, int64_t stride_d, int64_t rows, int64_t D, int64_t Dp,
               float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + r * stride_n;
    float* row = dst + r * Dp;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stride_d == 1) {
        std::memcpy(row, src, sizeof(float) * D);
        continue;
      }
    }
    if (stride_d == 1) {
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d * stride_d]);
    }
  }
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kt,
         const at::Tensor& vt, const at::Tensor& bias, float scale, const Isa& is, int64_t T, int64_t Tp,
         int64_t Dp, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t rows_p = round_up(kRows, is.rows_tile);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const float* ktp = kt.const_data_ptr<float>();
  const float* vtp = vt.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  // Keys beyond T (tile padding) are masked with -inf; without a bias every query shares this row.
  std::vector<float> pad_row(Tp, 0.0f);
  std::fill(pad_row.begin() + T, pad_row.end(), kNegInf);

  at::parallel_for(0, B * H * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qs(rows_p * Dp, 0.f), ks(rows_p * Dp, 0.f), vs(rows_p * Dp, 0.f), acc(rows_p * Dp, 0.f);
    std::vector<float> logits(rows_p * kKeyChunk), bias_rows;
    std::vector<SoftmaxState> state(rows_p);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / blocks, n0 = (item % blocks) * kRows;
      const int64_t b = bh / H, h = bh % H;
      const int64_t rows = std::min(kRows, N - n0);
      if (rows < rows_p) {  // a tail block: padded rows computed but never written, keep them zero
        for (std::vector<float>* buf : {&qs, &ks, &vs})
          std::fill(buf->begin() + rows * Dp, buf->end(), 0.f);
      }
      load_rows(qp + b * q.stride(0) + h * q.stride(1) + n0 * q.stride(2), q.stride(2), q.stride(3), rows, D, Dp,
                qs.data());
      load_rows(kp + b * k.stride(0) + h * k.stride(1) + n0 * k.stride(2), k.stride(2), k.stride(3), rows, D, Dp,
                ks.data());
      load_rows(vp + b * v.stride(0) + h * v.stride(1) + n0 * v.stride(2), v.stride(2), v.stride(3), rows, D, Dp,
                vs.data());

      Block blk;
      blk.rows = rows_p;
      blk.D = D;
      blk.Dp = Dp;
      blk.Tp = Tp;
      blk.scale = scale;
      blk.q = qs.data();
      blk.k = ks.data();
      blk.v = vs.data();
      blk.kt = ktp + bh * D * Tp;
      blk.vt = vtp + bh * Tp * Dp;
      blk.bias = pad_row.data();
      blk.bias_rs = 0;
      if (bp != nullptr && Tp > 0) {
        // bias is the (B, H, N, T) expanded view: broadcast dims have stride 0.
        const int64_t sn = bias.stride(2), st = bias.stride(3);
        const int64_t shared = sn == 0 ? 1 : rows;
        bias_rows.assign((sn == 0 ? 1 : rows_p) * Tp, kNegInf);  // padded keys and rows (never written): -inf
        const float* src = bp + b * bias.stride(0) + h * bias.stride(1) + n0 * sn;
        for (int64_t r = 0; r < shared; ++r)
          for (int64_t t = 0; t < T; ++t) bias_rows[r * Tp + t] = src[r * sn + t * st];
        blk.bias = bias_rows.data();
        blk.bias_rs = sn == 0 ? 0 : Tp;
      }
      blk.logits = logits.data();
      blk.state = state.data();
      blk.out = acc.data();
      is.attend(blk);

      scalar_t* dst = op + ((bh * N) + n0) * D;
      for (int64_t r = 0; r < rows; ++r) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          std::memcpy(dst + r * D, acc.data() + r * Dp, sizeof(float) * D);
        } else {
          for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<scalar_t>(acc[r * Dp + d]);
        }
      }
    }
  });
}

}  // namespace

const char* identity_attention_isa() { return isa().name; }

at::Tensor identity_joint_attention_kernel(const at::Tensor& q_video, const at::Tensor& k_video,
                                           const at::Tensor& v_video, const at::Tensor& k_text,
                                           const at::Tensor& v_text, const at::Tensor& text_bias, float scale) {
  const int64_t B = q_video.size(0), H = q_video.size(1), N = q_video.size(2), D = q_video.size(3);
  const int64_t T = k_text.size(2);
  at::Tensor out = at::empty({B, H, N, D}, v_video.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const Isa& is = isa();
  const int64_t Tp = round_up(T, is.key_tile), Dp = round_up(D, is.dim_tile);
  // K_text^T and V_text of every (b, h) as zero-padded fp32 tiles (ATen's copy_ converts and transposes).
  const auto f32 = v_video.options().dtype(at::kFloat);
  at::Tensor kt = at::zeros({B * H, D, Tp}, f32);
  at::Tensor vt = at::zeros({B * H, Tp, Dp}, f32);
  if (T > 0) {
    kt.view({B, H, D, Tp}).narrow(3, 0, T).copy_(k_text.transpose(2, 3));
    vt.view({B, H, Tp, Dp}).narrow(2, 0, T).narrow(3, 0, D).copy_(v_text);
  }
  const at::Tensor bias = text_bias.defined() ? text_bias.expand({B, H, N, T}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v_video.scalar_type(), "stg_ext_identity_attention_cpu",
                                  [&] {
                                    if constexpr (std::is_same_v<scalar_t, double>) {
                                      TORCH_CHECK(false, "stg_ext.identity_joint_attention: float64 has no C++ "
                                                         "kernel; use backend='torch'");
                                    } else {
                                      run<scalar_t>(q_video, k_video, v_video, kt, vt, bias, scale, is, T, Tp, Dp,
                                                    out);
                                    }
                                  });
  return out;
}

}  // namespace cpu
}  // namespace stg_ext
