// CUDA kernel of identity joint attention, the twin of cpu/identity_attention_cpu.cpp, with the same
// online-softmax math (../identity_attention_math.h):
//   a block takes kRows video queries of one (b, h); each of its warps owns kRowsPerWarp of them. A query's
//   q row sits in shared memory (fp32); its softmax state and accumulator live in the registers of its warp
//   (lane l holds output dims l, l + 32, ...). Text keys stream through shared memory in tiles of 32: for a
//   tile, lane l computes the logit of key l for each of the warp's queries (q row broadcast, K row padded
//   to an odd stride: no bank conflicts), the warp reduces the tile's max and weight sum with shuffles, and
//   every lane adds w_t v_t for its dims, w_t broadcast from lane t.
// CUDA cores only, fp32 throughout (no tensor cores: T is small, and the result must match the fp32
// reference to 1e-5). No torch headers: plain nvcc builds this file.
#include "identity_attention_cuda.cuh"
#include "cuda_types.cuh"

#include <algorithm>

namespace stg_ext {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // video queries per block
constexpr int kKeyTile = 32;                  // text keys per shared-memory tile: one per lane
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridY = 65535;

// Butterfly reductions: every lane ends with the result (the softmax state stays identical across lanes).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ int64_t at4(const int64_t (&s)[4], int64_t b, int64_t h, int64_t r, int64_t d) {
  return b * s[0] + h * s[1] + r * s[2] + d * s[3];
}

// Row strides of the shared-memory tiles: K rows odd (conflict-free column reads), V rows 32 * DPL wide
// (zero padded: the accumulate loop needs no bounds check).
__host__ __device__ __forceinline__ int k_tile_stride(int64_t d) { return int(d % 2 == 0 ? d + 1 : d); }

template <int DPL>
__host__ __device__ __forceinline__ size_t smem_bytes(int64_t d) {
  return sizeof(float) * (size_t(kKeyTile) * k_tile_stride(d) + size_t(kKeyTile) * 32 * DPL + size_t(kRows) * d);
}

// DPL: output dims per lane, head_dim <= 32 * DPL.
// __launch_bounds__(kThreads, 4): a budget of 128 registers a thread (4 blocks of 128 threads per SM). With
// the bare thread bound, ptxas picked 72-80 registers for DPL 1 and 2 and spilled 12-20 bytes (sm_86..sm_90,
// CUDA 13.0); with this one no instantiation spills (tests/ops/test_cuda_compile.py checks it).
template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads, 4) identity_attention_kernel(IdentityAttentionParams<T> p) {
  extern __shared__ float smem[];
  const int64_t D = p.head_dim, N = p.n_video, NT = p.n_text;
  const int ks = k_tile_stride(D);
  constexpr int VS = 32 * DPL;
  float* k_tile = smem;                     // kKeyTile x ks
  float* v_tile = k_tile + kKeyTile * ks;   // kKeyTile x VS
  float* q_rows = v_tile + kKeyTile * VS;   // kRows x D
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = int64_t(blockIdx.x) * kRows;

  for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    __syncthreads();  // the previous (b, h) is done with shared memory
    for (int64_t i = threadIdx.x; i < kRows * D; i += kThreads) {
      const int64_t r = i / D, d = i % D, n = n0 + r;
      q_rows[i] = n < N ? to_float(p.q_video[at4(p.q_stride, b, h, n, d)]) : 0.f;
    }
    __syncthreads();

    // The self key: softmax_start, acc = v_i (queries past N compute on zeros and are not written).
    SoftmaxState st[kRowsPerWarp];
    float acc[kRowsPerWarp][DPL];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t n = n0 + r;
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int64_t d = lane + 32 * j;
        const bool in = n < N && d < D;
        if (in) part += q_rows[r * D + d] * to_float(p.k_video[at4(p.k_stride, b, h, n, d)]);
        acc[rr][j] = in ? to_float(p.v_video[at4(p.v_stride, b, h, n, d)]) : 0.f;
      }
      st[rr] = softmax_start(self_logit(warp_sum(part), p.scale));
    }

    for (int64_t t0 = 0; t0 < NT; t0 += kKeyTile) {
      const int kc = int(NT - t0 < kKeyTile ? NT - t0 : kKeyTile);
      __syncthreads();  // every warp is done with the previous tile
      for (int64_t i = threadIdx.x; i < kKeyTile * VS; i += kThreads) {
        const int64_t t = i / VS, d = i % VS;
        const bool in = t < kc && d < D;
        if (d < D) k_tile[t * ks + d] = in ? to_float(p.k_text[at4(p.kt_stride, b, h, t0 + t, d)]) : 0.f;
        v_tile[i] = in ? to_float(p.v_text[at4(p.vt_stride, b, h, t0 + t, d)]) : 0.f;
      }
      __syncthreads();

      const bool key_in = lane < kc;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t n = n0 + r;
        const float* qr = q_rows + r * D;
        const float* kr = k_tile + lane * ks;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);  // explicit FMA: built with --fmad=false
        float bias = 0.f;
        if (p.text_bias != nullptr && key_in && n < N) bias = p.text_bias[at4(p.bias_stride, b, h, n, t0 + lane)];
        const float logit = key_in ? text_logit(dot, p.scale, bias) : -INFINITY;
        const float alpha = softmax_rescale(st[rr], warp_max(logit));
#pragma unroll
        for (int j = 0; j < DPL; ++j) acc[rr][j] *= alpha;
        const float w = softmax_weight(logit, st[rr]);
        softmax_add(st[rr], warp_sum(w));
        for (int t = 0; t < kc; ++t) {
          const float wt = __shfl_sync(kFullMask, w, t);
#pragma unroll
          for (int j = 0; j < DPL; ++j) acc[rr][j] = fmaf(wt, v_tile[t * VS + lane + 32 * j], acc[rr][j]);
        }
      }
    }

    T* out = p.out + bh * N * D;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t n = n0 + warp * kRowsPerWarp + rr;
      const float norm = softmax_norm(st[rr]);
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int64_t d = lane + 32 * j;
        if (n < N && d < D) out[n * D + d] = from_float<T>(acc[rr][j] * norm);
      }
    }
  }
}

template <typename T, int DPL>
cudaError_t launch_dpl(const IdentityAttentionParams<T>& p, cudaStream_t stream) {
  const size_t bytes = smem_bytes<DPL>(p.head_dim);
  if (bytes > 48 * 1024) {  // beyond the default limit: opt in (head dims above 128)
    const cudaError_t err = cudaFuncSetAttribute(identity_attention_kernel<T, DPL>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = (p.n_video + kRows - 1) / kRows;
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(tiles), unsigned(std::min(p.batch * p.heads, kMaxGridY)));
  identity_attention_kernel<T, DPL><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_identity_attention(const IdentityAttentionParams<T>& p, cudaStream_t stream) {
  if (p.head_dim > kIdentityAttentionMaxHeadDim || p.head_dim < 0) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.heads <= 0 || p.n_video <= 0 || p.head_dim == 0) return cudaSuccess;  // nothing to write
  if (p.head_dim <= 32) return launch_dpl<T, 1>(p, stream);
  if (p.head_dim <= 64) return launch_dpl<T, 2>(p, stream);
  if (p.head_dim <= 128) return launch_dpl<T, 4>(p, stream);
  return launch_dpl<T, 8>(p, stream);
}

#define STG_EXT_INSTANTIATE(T) \
  template cudaError_t launch_identity_attention<T>(const IdentityAttentionParams<T>&, cudaStream_t);
STG_EXT_INSTANTIATE(float)
STG_EXT_INSTANTIATE(__half)
STG_EXT_INSTANTIATE(__nv_bfloat16)
#undef STG_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace stg_ext
