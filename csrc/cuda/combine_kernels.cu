// CUDA kernels of the guidance combination, the twin of cpu/combine_cpu.cpp:
//   1. reduce_kernel: each block sums a strided slice of one sample into the 9 (shifted) sums of
//      combine_math.h
//      (fp32 per thread, warp shuffles + shared memory across the block) and writes them as one partial;
//   2. coeffs_kernel: one block per sample adds that sample's partials in fp64, in a fixed order, and
//      turns them into alpha/factor with sample_coeffs<double> (no atomics: results are deterministic);
//   3. write_kernel: the elementwise output.
// Steps 1-2 run only when rescale > 0 or orthogonalize, as on the CPU; nothing else is launched (no memset,
// no torch op). No torch headers: plain nvcc builds this file. The per-element formulas are combine_math.h's,
// so the CPU tests cover the same arithmetic.
//
// Memory: combine moves 3-5 input streams and one output for ~10 flops an element, so the kernels are
// bandwidth-bound. Where every buffer is 16-byte aligned (torch's allocations are; a view with an odd offset
// is not), each thread moves 16 bytes per stream per access (Vec: 4 fp32 or 8 fp16/bf16, the per-element cfg
// in float4s), with a scalar tail; otherwise the same kernels run with VEC = 1.
//
// Bit-exactness: the element values (element_terms / element_output: u + g (c - u) + s0 d0 ..., fold) must
// round like PyTorch's eager ops, one rounding per operation, so they are computed in RnFloat, whose
// operators are __fadd_rn/__fsub_rn/__fmul_rn/__fdiv_rn: nvcc never contracts those into an FMA, whatever
// --fmad says. The per-sample sums only owe a tolerance (their order differs from torch's anyway), so they
// are plain float and may contract.
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
// The write kernel: each thread takes kWriteAccessesPerThread accesses (of VEC elements) per grid pass.
constexpr int64_t kWriteAccessesPerThread = 2;
// Grids are capped (blocks loop over the remaining work items) so huge batches never exceed gridDim.x.
constexpr int64_t kMaxGrid = 1 << 16;

int64_t blocks_per_sample(int64_t n, int64_t elems_per_block, int64_t max_blocks) {
  return std::min(std::max((n + elems_per_block - 1) / elems_per_block, int64_t(1)), max_blocks);
}

unsigned grid_for(int64_t items) { return static_cast<unsigned>(std::min(items, kMaxGrid)); }

// A float whose arithmetic rounds once per operation (never fused), for the bit-exact element formulas.
struct RnFloat {
  float v;
};
__device__ __forceinline__ RnFloat operator+(RnFloat a, RnFloat b) { return {__fadd_rn(a.v, b.v)}; }
__device__ __forceinline__ RnFloat operator-(RnFloat a, RnFloat b) { return {__fsub_rn(a.v, b.v)}; }
__device__ __forceinline__ RnFloat operator*(RnFloat a, RnFloat b) { return {__fmul_rn(a.v, b.v)}; }
__device__ __forceinline__ RnFloat operator/(RnFloat a, RnFloat b) { return {__fdiv_rn(a.v, b.v)}; }
__device__ __forceinline__ RnFloat operator*(float a, RnFloat b) { return {__fmul_rn(a, b.v)}; }
__device__ __forceinline__ RnFloat operator*(RnFloat a, float b) { return {__fmul_rn(a.v, b)}; }

__device__ __forceinline__ ElementTerms<float> plain(const ElementTerms<RnFloat>& t) {
  return ElementTerms<float>{t.a.v, t.b.v, t.d0.v, t.d1.v};
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T x[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[VEC]) {
  const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);  // one 16-byte load when VEC = kVec<T>
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = v.x[j];
}

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
  ElementTerms<RnFloat> t;
};

__device__ __forceinline__ Loaded terms(float c, float u, float g, float p0, float p1, const CombineScalars& s) {
  Loaded l;
  l.c = c;
  l.u = u;
  l.g = g;
  l.t = element_terms(RnFloat{c}, RnFloat{u}, RnFloat{g}, RnFloat{p0}, RnFloat{p1}, s);
  return l;
}

template <typename T>
__device__ __forceinline__ Loaded load(const Inputs<T>& in, int64_t i, const CombineScalars& s) {
  return terms(to_float(in.cond[i]), in.uncond ? to_float(in.uncond[i]) : 0.f, in.cfg ? in.cfg[i] : s.cfg_scale,
               to_float(in.p0[i]), in.p1 ? to_float(in.p1[i]) : 0.f, s);
}

// VEC consecutive elements from i (a multiple of VEC, buffers aligned to 16 bytes when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_block(const Inputs<T>& in, int64_t i, const CombineScalars& s,
                                           Loaded (&l)[VEC]) {
  T c[VEC], u[VEC], p0[VEC], p1[VEC];
  float g[VEC];
  load_vec(in.cond + i, c);
  load_vec(in.p0 + i, p0);
  if (in.uncond) load_vec(in.uncond + i, u);
  if (in.p1) load_vec(in.p1 + i, p1);
  if (in.cfg) {
#pragma unroll
    for (int j = 0; j < VEC; j += (VEC < 4 ? VEC : 4)) {
      float q[VEC < 4 ? VEC : 4];
      load_vec(in.cfg + i + j, q);
#pragma unroll
      for (int k = 0; k < (VEC < 4 ? VEC : 4); ++k) g[j + k] = q[k];
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    l[j] = terms(to_float(c[j]), in.uncond ? to_float(u[j]) : 0.f, in.cfg ? g[j] : s.cfg_scale, to_float(p0[j]),
                 in.p1 ? to_float(p1[j]) : 0.f, s);
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

// Work item = (sample b, block k of bps); its partial goes to partial[item * kNumSums ...]. VEC > 1 needs
// n % VEC == 0 and 16-byte aligned buffers: a thread then reads VEC consecutive elements per access.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(Inputs<T> in, int64_t batch, int64_t n, int64_t bps, CombineScalars s, float* partial) {
  __shared__ float smem[kWarps][kNumSums];
  for (int64_t item = blockIdx.x; item < batch * bps; item += gridDim.x) {
    const int64_t b = item / bps, k = item % bps;
    const Loaded first = load(in, b * n, s);
    const SampleShift sh = sample_shift(first.c, plain(first.t));
    float acc[kNumSums] = {};
    for (int64_t j = (k * kThreads + threadIdx.x) * VEC; j < n; j += bps * kThreads * VEC) {
      Loaded l[VEC];
      load_block<T, VEC>(in, b * n + j, s, l);
#pragma unroll
      for (int e = 0; e < VEC; ++e) accumulate(acc, l[e].c, plain(l[e].t), sh);
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

__device__ __forceinline__ float output(const Loaded& l, int64_t b, const float* coeffs, const CombineScalars& s) {
  const float alpha = coeffs ? coeffs[2 * b] : 0.f;
  const float factor = coeffs ? coeffs[2 * b + 1] : 1.f;
  return element_output(l.t, RnFloat{l.u}, RnFloat{l.g}, alpha, factor, s).v;
}

// The elementwise output over the flattened (batch * n) elements; `coeffs` null means alpha = 0, factor = 1
// (no rescale, no orthogonalization). VEC > 1 needs 16-byte aligned buffers: a thread writes VEC consecutive
// elements per access (samples may start inside a vector: each element finds its own sample), and block 0
// writes the last total % VEC elements one by one.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) write_kernel(Inputs<T> in, T* out, int64_t total, int64_t n,
                                                        CombineScalars s, const float* coeffs) {
  const int64_t nvec = total / VEC;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec; v += int64_t(gridDim.x) * kThreads) {
    const int64_t i = v * VEC;
    const int64_t b = i / n, next = (b + 1) * n;  // the first element of the next sample
    Loaded l[VEC];
    load_block<T, VEC>(in, i, s, l);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.x[j] = from_float<T>(output(l[j], i + j < next ? b : (i + j) / n, coeffs, s));
    *reinterpret_cast<Vec<T, VEC>*>(out + i) = o;
  }
  if (VEC > 1 && blockIdx.x == 0) {
    for (int64_t i = nvec * VEC + threadIdx.x; i < total; i += kThreads)
      out[i] = from_float<T>(output(load(in, i, s), i / n, coeffs, s));
  }
}

template <typename T>
bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;  // null counts as aligned (absent input)
}

}  // namespace

size_t combine_workspace_bytes(int64_t batch, int64_t numel_per_sample) {
  if (batch <= 0 || numel_per_sample <= 0) return 0;
  const int64_t bps = blocks_per_sample(numel_per_sample, kReduceElemsPerBlock, kReduceMaxBlocksPerSample);
  return static_cast<size_t>(batch * bps * kNumSums + 2 * batch) * sizeof(float);
}

namespace {

template <typename T, int VEC>
cudaError_t launch_vec(const Inputs<T>& in, T* out, int64_t batch, int64_t n, const CombineScalars& s,
                       float* workspace, bool reduce_vec, cudaStream_t stream) {
  const float* coeffs = nullptr;
  if (s.rescale > 0.f || s.orthogonalize) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const int64_t bps = blocks_per_sample(n, kReduceElemsPerBlock, kReduceMaxBlocksPerSample);
    float* partial = workspace;
    float* sample = workspace + batch * bps * kNumSums;  // layout matches combine_workspace_bytes
    if (reduce_vec)
      reduce_kernel<T, VEC><<<grid_for(batch * bps), kThreads, 0, stream>>>(in, batch, n, bps, s, partial);
    else
      reduce_kernel<T, 1><<<grid_for(batch * bps), kThreads, 0, stream>>>(in, batch, n, bps, s, partial);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    coeffs_kernel<<<grid_for(batch), kThreads, 0, stream>>>(partial, batch, n, bps, s, sample);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    coeffs = sample;
  }
  const int64_t total = batch * n;
  const int64_t per_block = kThreads * kWriteAccessesPerThread * VEC;
  const int64_t blocks = std::max<int64_t>((total + per_block - 1) / per_block, 1);  // capped: blocks then loop
  write_kernel<T, VEC><<<grid_for(blocks), kThreads, 0, stream>>>(in, out, total, n, s, coeffs);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_combine(const T* cond, const T* uncond, const float* cfg, const T* p0, const T* p1, T* out,
                           int64_t batch, int64_t numel_per_sample, const CombineScalars& s, float* workspace,
                           cudaStream_t stream) {
  const int64_t n = numel_per_sample;
  if (batch <= 0 || n <= 0) return cudaSuccess;  // nothing to do, and a 0-block launch is an error
  const Inputs<T> in{cond, uncond, cfg, p0, p1};
  constexpr int V = kVec<T>;
  const bool vec = aligned16(cond) && aligned16(uncond) && aligned16(cfg) && aligned16(p0) && aligned16(p1) &&
                   aligned16(out);
  if (!vec) return launch_vec<T, 1>(in, out, batch, n, s, workspace, false, stream);
  // The reduction walks each sample on its own: vectors there also need every sample to start aligned.
  return launch_vec<T, V>(in, out, batch, n, s, workspace, n % V == 0, stream);
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
