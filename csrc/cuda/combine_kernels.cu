// CUDA kernels of the guidance combination, the twin of cpu/combine_cpu.cpp:
//   1. reduce_kernel: each block sums a strided slice of one sample into the 9 (shifted) sums of
//      combine_math.h
//      (fp32 per thread, warp shuffles + shared memory across the block) and writes them as one partial;
//   2. coeffs_kernel: one block per sample adds that sample's partials in fp64, in a fixed order, and
//      turns them into alpha/factor with sample_coeffs<double> (no atomics: results are deterministic);
//   3. write_kernel: the elementwise output.
// Steps 1-2 run only when rescale > 0 or orthogonalize, as on the CPU. No torch headers: plain nvcc builds
// this file. The per-element formulas are combine_math.h's, so the CPU tests cover the same arithmetic;
// build with --fmad=false so u + g (c - u) rounds like PyTorch's eager ops.
#include "combine_cuda.cuh"
#include "cuda_types.cuh"

#include <algorithm>

namespace stg_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Work per block. The reduction's block count is bounded because its partials live in the workspace;
// both counts depend on the sizes only, so the summation order (and the result) is device-independent.
constexpr int64_t kReduceElemsPerBlock = 8 * kThreads;
constexpr int64_t kReduceMaxBlocksPerSample = 1024;
constexpr int64_t kWriteElemsPerBlock = 4 * kThreads;
constexpr int64_t kWriteMaxBlocksPerSample = 1 << 14;
// Grids are capped (blocks loop over the remaining work items) so huge batches never exceed gridDim.x.
constexpr int64_t kMaxGrid = 1 << 16;

int64_t blocks_per_sample(int64_t n, int64_t elems_per_block, int64_t max_blocks) {
  return std::min(std::max((n + elems_per_block - 1) / elems_per_block, int64_t(1)), max_blocks);
}

unsigned grid_for(int64_t items) { return static_cast<unsigned>(std::min(items, kMaxGrid)); }

template <typename T>
struct Inputs {
  const T* cond;
  const T* uncond;  // may be null
  const float* cfg;  // may be null: s.cfg_scale then
  const T* p0;
  const T* p1;  // may be null
};

struct Loaded {
  float c, u, g;
  ElementTerms<float> t;
};

template <typename T>
__device__ __forceinline__ Loaded load(const Inputs<T>& in, int64_t i, const CombineScalars& s) {
  Loaded l;
  l.c = to_float(in.cond[i]);
  l.u = in.uncond ? to_float(in.uncond[i]) : 0.f;
  l.g = in.cfg ? in.cfg[i] : s.cfg_scale;
  const float q1 = in.p1 ? to_float(in.p1[i]) : 0.f;
  l.t = element_terms(l.c, l.u, l.g, to_float(in.p0[i]), q1, s);
  return l;
}

// Sums v over the block; thread 0 holds the result. Ends with a barrier so `smem` can be reused.
template <typename Acc>
__device__ __forceinline__ void block_reduce(Acc (&v)[kNumSums], Acc (*smem)[kNumSums]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kNumSums; ++j)
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kNumSums; ++j) smem[warp][j] = v[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kNumSums; ++j) {
      v[j] = lane < kWarps ? smem[lane][j] : Acc(0);
      for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
    }
  }
  __syncthreads();
}

// Work item = (sample b, block k of bps); its partial goes to partial[item * kNumSums ...].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(Inputs<T> in, int64_t batch, int64_t n, int64_t bps, CombineScalars s, float* partial) {
  __shared__ float smem[kWarps][kNumSums];
  for (int64_t item = blockIdx.x; item < batch * bps; item += gridDim.x) {
    const int64_t b = item / bps, k = item % bps;
    const Loaded first = load(in, b * n, s);
    const SampleShift sh = sample_shift(first.c, first.t);
    float acc[kNumSums] = {};
    for (int64_t j = k * kThreads + threadIdx.x; j < n; j += bps * kThreads) {
      const Loaded l = load(in, b * n + j, s);
      accumulate(acc, l.c, l.t, sh);
    }
    block_reduce(acc, smem);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int j = 0; j < kNumSums; ++j) partial[item * kNumSums + j] = acc[j];
    }
  }
}

// coeffs[2 b] = alpha, coeffs[2 b + 1] = factor of sample b.
__global__ void __launch_bounds__(kThreads)
    coeffs_kernel(const float* partial, int64_t batch, int64_t n, int64_t bps, CombineScalars s, float* coeffs) {
  __shared__ double smem[kWarps][kNumSums];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double acc[kNumSums] = {};
    for (int64_t k = threadIdx.x; k < bps; k += kThreads) {
#pragma unroll
      for (int j = 0; j < kNumSums; ++j) acc[j] += partial[(b * bps + k) * kNumSums + j];
    }
    block_reduce(acc, smem);
    if (threadIdx.x == 0) {
      const SampleCoeffs<double> c = sample_coeffs<double>(acc, double(n), s);
      coeffs[2 * b] = float(c.alpha);
      coeffs[2 * b + 1] = float(c.factor);
    }
  }
}

// `coeffs` null means alpha = 0, factor = 1 (no rescale, no orthogonalization).
template <typename T>
__global__ void __launch_bounds__(kThreads) write_kernel(Inputs<T> in, T* out, int64_t batch, int64_t n, int64_t bps,
                                                        CombineScalars s, const float* coeffs) {
  for (int64_t item = blockIdx.x; item < batch * bps; item += gridDim.x) {
    const int64_t b = item / bps, k = item % bps;
    const float alpha = coeffs ? coeffs[2 * b] : 0.f;
    const float factor = coeffs ? coeffs[2 * b + 1] : 1.f;
    for (int64_t j = k * kThreads + threadIdx.x; j < n; j += bps * kThreads) {
      const int64_t i = b * n + j;
      const Loaded l = load(in, i, s);
      out[i] = from_float<T>(element_output(l.t, l.u, l.g, alpha, factor, s));
    }
  }
}

}  // namespace

size_t combine_workspace_bytes(int64_t batch, int64_t numel_per_sample) {
  if (batch <= 0 || numel_per_sample <= 0) return 0;
  const int64_t bps = blocks_per_sample(numel_per_sample, kReduceElemsPerBlock, kReduceMaxBlocksPerSample);
  return static_cast<size_t>(batch * bps * kNumSums + 2 * batch) * sizeof(float);
}

template <typename T>
cudaError_t launch_combine(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                           int64_t batch, int64_t numel_per_sample, const CombineScalars& s, float* workspace,
                           cudaStream_t stream) {
  const int64_t n = numel_per_sample;
  if (batch <= 0 || n <= 0) return cudaSuccess;  // nothing to do, and a 0-block launch is an error
  const Inputs<T> in{cond, uncond, cfg, p0, p1};
  const float* coeffs = nullptr;
  if (s.rescale > 0.f || s.orthogonalize) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const int64_t bps = blocks_per_sample(n, kReduceElemsPerBlock, kReduceMaxBlocksPerSample);
    float* partial = workspace;
    float* sample = workspace + batch * bps * kNumSums;  // layout matches combine_workspace_bytes
    reduce_kernel<T><<<grid_for(batch * bps), kThreads, 0, stream>>>(in, batch, n, bps, s, partial);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    coeffs_kernel<<<grid_for(batch), kThreads, 0, stream>>>(partial, batch, n, bps, s, sample);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    coeffs = sample;
  }
  const int64_t bps = blocks_per_sample(n, kWriteElemsPerBlock, kWriteMaxBlocksPerSample);
  write_kernel<T><<<grid_for(batch * bps), kThreads, 0, stream>>>(in, out, batch, n, bps, s, coeffs);
  return cudaGetLastError();
}

#define STG_EXT_INSTANTIATE(T)                                                                                \
  template cudaError_t launch_combine<T>(const T*, const T*, const float*, const T*, const T*, T*, int64_t, \
                                         int64_t, const CombineScalars&, float*, cudaStream_t);
STG_EXT_INSTANTIATE(float)
STG_EXT_INSTANTIATE(__half)
STG_EXT_INSTANTIATE(__nv_bfloat16)
#undef STG_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace stg_ext
