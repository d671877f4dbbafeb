// The end of a flash_attention block, shared by the mma.sync kernel
// (attention_kernel.cuh) and the sm_90a one (attention_sm90_kernel.cuh): both
// leave each lane with two rows (r_lo, r_hi = r_lo + 8 of the block's (position,
// head-in-group) rows) and an accumulator in the m16n8 fragment layout,
// acc(n, e) = column 8n + 2 (lane % 4) + e % 2 of row lo (e < 2) or hi.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {

// Row sums over the quad's lanes, then the normalized rows and their LSE into
// the output, or into the split partials when the keys are split.
template <typename T, int Dv, typename Acc>
__device__ __forceinline__ void AttentionStoreRows(const AttentionParams& p, int64_t b, int64_t hk,
                                                   int split, int lane, int64_t r_lo, int64_t r_hi,
                                                   float m_lo, float m_hi, float l_lo, float l_hi,
                                                   const Acc& acc) {
  constexpr int kTiles = Dv / 8;
  const int64_t Hq = p.heads_q, Sq = p.seq_q, group = Hq / p.heads_kv, R = Sq * group;
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };
  QuadRowSum(l_lo, l_hi);
  // A row that saw no key: output 0, LSE -inf.
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  const float lse_lo = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : -INFINITY;
  const float lse_hi = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : -INFINITY;
  const int col0 = 2 * (lane % 4);
  const int64_t off_lo = r_lo < R ? row_offset(r_lo) : 0, off_hi = r_hi < R ? row_offset(r_hi) : 0;
  // LSE index [B, Hq, Sq] of row r: (b * Hq + hq) * Sq + i.
  auto lse_index = [&](int64_t r) { return (b * Hq + hk * group + r % group) * Sq + r / group; };
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      if (r_lo < R)
        *reinterpret_cast<uint32_t*>(out + off_lo * Dv + col0 + n * 8) =
            PackPair<T>(acc(n, 0) * inv_lo, acc(n, 1) * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<uint32_t*>(out + off_hi * Dv + col0 + n * 8) =
            PackPair<T>(acc(n, 2) * inv_hi, acc(n, 3) * inv_hi);
    }
    if (lane % 4 == 0) {
      if (r_lo < R) p.lse[lse_index(r_lo)] = lse_lo;
      if (r_hi < R) p.lse[lse_index(r_hi)] = lse_hi;
    }
  } else {
    // part_out [B, ns, Sq, Hq, Dv]: row offset (b * Sq + i) * Hq + hq shifted by split.
    const int64_t shift = (b * (p.num_splits - 1) + split) * Sq * Hq;
    float* out = p.part_out;
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      if (r_lo < R)
        *reinterpret_cast<float2*>(out + (off_lo + shift) * Dv + col0 + n * 8) =
            make_float2(acc(n, 0) * inv_lo, acc(n, 1) * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<float2*>(out + (off_hi + shift) * Dv + col0 + n * 8) =
            make_float2(acc(n, 2) * inv_hi, acc(n, 3) * inv_hi);
    }
    if (lane % 4 == 0) {
      if (r_lo < R) p.part_lse[off_lo + shift] = lse_lo;
      if (r_hi < R) p.part_lse[off_hi + shift] = lse_hi;
    }
  }
}
}  // namespace jax_mla::cuda
