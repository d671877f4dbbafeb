// Split-KV combine: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.
// One block per query row; each thread owns 4 columns and walks the splits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "ffi/cuda/combine.h"
#include "ffi/cuda/kernel_utils.cuh"

namespace jax_mla::cuda {
namespace {

constexpr int kThreads = 128;  // a block per query row; thread i owns columns [4i, 4i + 4)

template <typename T>
__global__ void __launch_bounds__(kThreads) CombineKernel(const AttentionParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t R = p.seq_q * p.heads_q, ns = p.num_splits, Dv = p.dv;
  const int64_t row = blockIdx.x;
  const int64_t b = row / R, r = row % R;
  const float* __restrict__ lse_s = p.part_lse + b * ns * R + r;  // stride R between splits
  // Every warp reduces the (few) split LSEs itself: no shared memory, no barrier.
  float mx = -INFINITY;
  for (int64_t s = lane; s < ns; s += 32) mx = fmaxf(mx, lse_s[s * R]);
  for (int off = 16; off; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float total = 0.f;
  if (mx != -INFINITY)
    for (int64_t s = lane; s < ns; s += 32) total += expf(lse_s[s * R] - mx);
  for (int off = 16; off; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(total);
  if (threadIdx.x == 0) p.lse[(b * p.heads_q + r % p.heads_q) * p.seq_q + r / p.heads_q] = lse;

  const int64_t c = 4 * int64_t(threadIdx.x);
  if (c >= Dv) return;
  // A split that saw no key has LSE -inf and output 0: weight exp(-inf) = 0.
  // With every split empty, lse is -inf too: use weight 0 for all.
  const float base = mx == -INFINITY ? 0.f : lse;
  const float* __restrict__ part = p.part_out + (b * ns * R + r) * Dv + c;  // stride R * Dv
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  int64_t s = 0;
  for (; s + 4 <= ns; s += 4) {  // four independent loads in flight
    float w[4];
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      w[u] = lse_s[(s + u) * R];
      v[u] = *reinterpret_cast<const float4*>(part + (s + u) * R * Dv);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float wu = expf(w[u] - base);
      acc.x += wu * v[u].x;
      acc.y += wu * v[u].y;
      acc.z += wu * v[u].z;
      acc.w += wu * v[u].w;
    }
  }
  for (; s < ns; ++s) {
    const float wu = expf(lse_s[s * R] - base);
    const float4 v = *reinterpret_cast<const float4*>(part + s * R * Dv);
    acc.x += wu * v.x;
    acc.y += wu * v.y;
    acc.z += wu * v.z;
    acc.w += wu * v.w;
  }
  if (mx == -INFINITY) acc = make_float4(0.f, 0.f, 0.f, 0.f);
  uint2 packed;
  packed.x = PackPair<T>(acc.x, acc.y);
  packed.y = PackPair<T>(acc.z, acc.w);
  *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + row * Dv + c) = packed;
}

}  // namespace

cudaError_t LaunchCombine(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  if (rows == 0) return cudaSuccess;
  if (p.q_dtype == DType::kBF16)
    CombineKernel<__nv_bfloat16><<<unsigned(rows), kThreads, 0, stream>>>(p);
  else
    CombineKernel<__half><<<unsigned(rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
