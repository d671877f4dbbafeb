// Split-KV combine: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.
// One warp per query row; lanes stride over the row's float4 columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "ffi/cuda/combine.h"
#include "ffi/cuda/kernel_utils.cuh"

namespace jax_mla::cuda {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerBlock) CombineKernel(const AttentionParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t R = p.seq_q * p.heads_q, ns = p.num_splits, Dv = p.dv;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= p.batch * R) return;
  const int64_t b = row / R, r = row % R;
  const float* lse_s = p.part_lse + b * ns * R + r;  // stride R between splits
  float mx = -INFINITY;
  for (int64_t s = lane; s < ns; s += 32) mx = fmaxf(mx, lse_s[s * R]);
  for (int off = 16; off; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float total = 0.f;
  if (mx != -INFINITY)
    for (int64_t s = lane; s < ns; s += 32) total += expf(lse_s[s * R] - mx);
  for (int off = 16; off; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(total);
  const int64_t h = r % p.heads_q, i = r / p.heads_q;
  if (lane == 0) p.lse[(b * p.heads_q + h) * p.seq_q + i] = lse;

  T* out = static_cast<T*>(p.out) + row * Dv;
  const float* part = p.part_out + (b * ns * R + r) * Dv;  // stride R * Dv between splits
  for (int64_t c = 4 * lane; c < Dv; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != -INFINITY) {
      for (int64_t s = 0; s < ns; ++s) {
        const float l = lse_s[s * R];
        if (l == -INFINITY) continue;  // that split saw no key (its output is 0)
        const float w = expf(l - lse);
        const float4 v = *reinterpret_cast<const float4*>(part + s * R * Dv + c);
        acc.x += w * v.x;
        acc.y += w * v.y;
        acc.z += w * v.z;
        acc.w += w * v.w;
      }
    }
    uint2 packed;
    packed.x = PackPair<T>(acc.x, acc.y);
    packed.y = PackPair<T>(acc.z, acc.w);
    *reinterpret_cast<uint2*>(out + c) = packed;
  }
}

}  // namespace

cudaError_t LaunchCombine(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  if (p.q_dtype == DType::kBF16)
    CombineKernel<__nv_bfloat16><<<blocks, 32 * kRowsPerBlock, 0, stream>>>(p);
  else
    CombineKernel<__half><<<blocks, 32 * kRowsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
