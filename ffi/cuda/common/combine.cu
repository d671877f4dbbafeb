// Split-KV combine: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.
//
// A warp owns 128 columns of a query row (4 per lane, one float4 load per
// split) and walks a share of the splits: the warps of one column chunk take
// splits g, g + sg, g + 2 sg, ... (sg split groups) and add their sums in
// shared memory. With few splits (sg = 1) a block of 4 warps covers a whole
// 512-wide row, one block per row; with many splits and few rows (B = 1
// decode: 16 rows, ~100 splits) 8 warps share each column chunk and a row
// gets one block per chunk, so there are many more loads in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "ffi/cuda/common/combine.h"
#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {
namespace {

constexpr int kChunk = 128;   // columns per warp: 32 lanes x 4
constexpr int kMaxWarps = 8;  // threads per block at most 256
constexpr int kUnroll = 8;    // independent float4 loads in flight per lane

// Split groups per column chunk: about 4 or more splits per warp, at most
// kMaxWarps groups.
int SplitGroups(int64_t ns) {
  int sg = 1;
  while (sg < kMaxWarps && 4 * 2 * sg <= ns) sg *= 2;
  return sg;
}

// Block x: query row blockIdx.x (over B * Sq * H), column chunks
// [blockIdx.y * cpb, blockIdx.y * cpb + cpb); warp w: chunk w / sg, split
// group w % sg.
template <typename T>
__global__ void __launch_bounds__(32 * kMaxWarps)
    CombineKernel(const AttentionParams p, int sg, int cpb) {
  __shared__ float4 s_acc[kMaxWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t R = p.seq_q * p.heads_q, ns = p.num_splits, Dv = p.dv;
  const int64_t row = blockIdx.x;
  const int64_t b = row / R, r = row % R;
  const float* __restrict__ lse_s = p.part_lse + b * ns * R + r;  // stride R between splits
  // Every warp reduces the split LSEs itself in one pass (online max and sum
  // per lane, then merged across the warp): no barrier before the main loop.
  float mx = -INFINITY, total = 0.f;
  for (int64_t s = lane; s < ns; s += 32) {
    const float v = lse_s[s * R];
    if (v > mx) {
      total = total * expf(mx - v) + 1.f;  // exp(-inf) = 0 for the first key
      mx = v;
    } else if (v != -INFINITY) {
      total += expf(v - mx);
    }
  }
  for (int off = 16; off; off /= 2) {
    const float om = __shfl_xor_sync(0xffffffffu, mx, off);
    const float ot = __shfl_xor_sync(0xffffffffu, total, off);
    const float m = fmaxf(mx, om);
    total = (mx == -INFINITY ? 0.f : total * expf(mx - m)) +
            (om == -INFINITY ? 0.f : ot * expf(om - m));
    mx = m;
  }
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(total);
  if (blockIdx.y == 0 && threadIdx.x == 0)
    p.lse[(b * p.heads_q + r % p.heads_q) * p.seq_q + r / p.heads_q] = lse;

  const int g = warp % sg;
  const int64_t c = (int64_t(blockIdx.y) * cpb + warp / sg) * kChunk + 4 * lane;
  // A split that saw no key has LSE -inf and output 0: weight exp(-inf) = 0.
  // With every split empty, lse is -inf too: use weight 0 for all.
  const float base = mx == -INFINITY ? 0.f : lse;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (c < Dv) {
    const float* __restrict__ part = p.part_out + (b * ns * R + r) * Dv + c;  // stride R * Dv
    int64_t s = g;
    for (; s + (kUnroll - 1) * sg < ns; s += kUnroll * sg) {
      float w[kUnroll];
      float4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        w[u] = lse_s[(s + u * sg) * R];
        v[u] = *reinterpret_cast<const float4*>(part + (s + u * sg) * R * Dv);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float wu = expf(w[u] - base);
        acc.x += wu * v[u].x;
        acc.y += wu * v[u].y;
        acc.z += wu * v[u].z;
        acc.w += wu * v[u].w;
      }
    }
    for (; s < ns; s += sg) {
      const float wu = expf(lse_s[s * R] - base);
      const float4 v = *reinterpret_cast<const float4*>(part + s * R * Dv);
      acc.x += wu * v.x;
      acc.y += wu * v.y;
      acc.z += wu * v.z;
      acc.w += wu * v.w;
    }
  }
  if (sg > 1) {  // the chunk's split groups add up in group 0
    s_acc[warp][lane] = acc;
    __syncthreads();
    if (g != 0) return;
    for (int k = 1; k < sg; ++k) {
      const float4 o = s_acc[warp + k][lane];
      acc.x += o.x;
      acc.y += o.y;
      acc.z += o.z;
      acc.w += o.w;
    }
  }
  if (c >= Dv) return;
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
  const int64_t chunks = (p.dv + kChunk - 1) / kChunk;
  const int sg = SplitGroups(p.num_splits);
  // Column chunks per block: up to kMaxWarps warps in all, at most 4 chunks.
  int cpb = kMaxWarps / sg < 4 ? kMaxWarps / sg : 4;
  if (cpb > chunks) cpb = int(chunks);
  const dim3 grid(unsigned(rows), unsigned((chunks + cpb - 1) / cpb));
  const unsigned threads = 32u * unsigned(sg * cpb);
  if (p.q_dtype == DType::kBF16)
    CombineKernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(p, sg, cpb);
  else
    CombineKernel<__half><<<grid, threads, 0, stream>>>(p, sg, cpb);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
