// flash_attention on Hopper (sm_90a) warpgroup MMA: a block of two
// warpgroups owns 128 query rows of one (batch, KV head), 64 per warpgroup.
// Q and each 128-key K/V tile sit in 128B-swizzled shared memory
// (ffi/cuda/wgmma.cuh); S = Q K^T is a wgmma with both operands in shared
// memory, the online softmax runs on the S accumulators in registers, and P
// stays in registers as the A operand of O += P V, whose B operand (V, stored
// key-major) is read through an N-major descriptor. K/V tiles come through a
// two-stage cp.async pipeline shared by all 256 threads, which zero-fills
// keys past kv_len (nothing past it is read: a NaN there cannot leak into
// P V). Row bookkeeping (positions, GQA rows, masks, LSE, split-KV outputs) is
// the same as attention_kernel.cuh's. The kernel body exists only in the
// sm_90a pass; LaunchAttentionSm90 must be called only where
// Sm90AttentionAvailable() says the sm_90a code is what the device runs.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/kernel_utils.cuh"
#include "ffi/cuda/wgmma.cuh"

namespace jax_mla::cuda {

template <int Dk, int Dv>
struct AttnSm90Shape {
  static_assert(Dk % 64 == 0 && Dv == 128, "the P V product is one m64n128 wgmma per 16 keys");
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kRows = 128;     // 64 per warpgroup
  static constexpr int kKeys = 128;     // the S product is m64n128
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kRows * Dk * 2;
  static constexpr int kKBytes = kKeys * Dk * 2;
  static constexpr int kVBytes = kKeys * Dv * 2;
  // + 1024: the dynamic shared memory base is rounded up to the swizzle period.
  static constexpr size_t kSmem = size_t(kQBytes) + kStages * size_t(kKBytes + kVBytes) + 1024;
};

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(256, 1) AttentionSm90Kernel(const AttentionParams p) {
#ifdef JAX_MLA_SM90A
  using Shape = AttnSm90Shape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kRows = Shape::kRows, kStages = Shape::kStages;
  constexpr int kKChunks = Dk / 8, kVChunks = Dv / 8;
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);
  char* s_q = smem;                                   // [Dk/64][128 rows][64], swizzled
  char* s_k = s_q + Shape::kQBytes;                   // [stages][Dk/64][128 keys][64]
  char* s_v = s_k + kStages * Shape::kKBytes;         // [stages][Dv/64][128 keys][64]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4, wwarp = warp % 4;  // warpgroup, warp within it
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seq_q, Skv = p.seq_kv;
  const int64_t group = Hq / Hkv, R = Sq * group;
  const int64_t b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const int split = blockIdx.y;
  // Later row tiles see more keys under a causal mask: start them first.
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kRows;
  const int32_t kv_len_raw = p.kv_len[b];
  const int64_t kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
  const int64_t q_pos = p.q_pos[b];
  auto visible = [&](int64_t r) -> int64_t {
    return r < R ? VisibleKeys(q_pos + r / group, kv_len_raw, Skv, p.causal) : 0;
  };
  const int64_t last_row = (row0 + kRows < R ? row0 + kRows : R) - 1;
  const int64_t n_max = visible(last_row);
  // This warpgroup's rows: [wg_row0, wg_row0 + 64).
  const int64_t wg_row0 = row0 + 64 * wg;
  const int64_t wg_last = (wg_row0 + 64 < R ? wg_row0 + 64 : R) - 1;
  const int64_t wg_n_min = visible(wg_row0), wg_n_max = wg_last >= wg_row0 ? visible(wg_last) : 0;
  const int64_t r_lo = wg_row0 + wwarp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = visible(r_lo), n_hi = visible(r_hi);

  const int64_t tiles = (n_max + kKeys - 1) / kKeys;
  const int64_t per = (tiles + p.num_splits - 1) / p.num_splits;
  const int64_t t_begin = split * per < tiles ? split * per : tiles;
  const int64_t t_end = t_begin + per < tiles ? t_begin + per : tiles;
  // Tiles past this warpgroup's last visible key are loaded for the other
  // warpgroup but not computed.
  const int64_t wg_t_end = (wg_n_max + kKeys - 1) / kKeys;

  const int64_t kvb = b % p.kv_batch;
  const T* k_base = static_cast<const T*>(p.k.data) + kvb * p.k.batch_stride + hk * p.k.head_stride;
  const T* v_base = static_cast<const T*>(p.v.data) + kvb * p.v.batch_stride + hk * p.v.head_stride;
  auto load_tile = [&](int64_t t, int stage) {
    char* dk = s_k + stage * Shape::kKBytes;
#pragma unroll 4
    for (int c = tid; c < kKeys * kKChunks; c += Shape::kThreads) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      const int64_t j = t * kKeys + rr;
      const bool ok = j < kv_len;  // keys past kv_len are zero-filled, never read
      CpAsync16(dk + Swizzle128(kKeys, rr, cc), k_base + (ok ? j : 0) * p.k.row_stride + cc * 8,
                ok);
    }
    char* dv = s_v + stage * Shape::kVBytes;
#pragma unroll 4
    for (int c = tid; c < kKeys * kVChunks; c += Shape::kThreads) {
      const int rr = c / kVChunks, cc = c % kVChunks;
      const int64_t j = t * kKeys + rr;
      const bool ok = j < kv_len;
      CpAsync16(dv + Swizzle128(kKeys, rr, cc), v_base + (ok ? j : 0) * p.v.row_stride + cc * 8,
                ok);
    }
  };
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };

  if (t_begin < t_end) {
    const T* q = static_cast<const T*>(p.q);
    for (int c = tid; c < kRows * kKChunks; c += Shape::kThreads) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + Swizzle128(kRows, rr, cc), q + (ok ? row_offset(row0 + rr) : 0) * Dk + cc * 8,
                ok);
    }
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    CpAsyncCommit();
  }

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = SmemAddr(s_q) + 64 * wg * 128;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();  // this thread's cp.async writes -> the wgmma (async proxy) reads
    __syncthreads();
    if (t + kStages - 1 < t_end) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    if (t >= wg_t_end) continue;  // uniform over the warpgroup
    const uint32_t k_addr = SmemAddr(s_k + (it % kStages) * Shape::kKBytes);
    const uint32_t v_addr = SmemAddr(s_v + (it % kStages) * Shape::kVBytes);

    float s[64];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // 16-wide slice kk of 64-wide block kk / 4
      WgmmaM64N128K16SS<T, 0>(s, SmemDesc128(q_addr + (kk / 4) * kRows * 128 + off, 16, 1024),
                              SmemDesc128(k_addr + (kk / 4) * kKeys * 128 + off, 16, 1024),
                              kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(s[i]);

    const bool need_mask = (t + 1) * kKeys > wg_n_min;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[4 * n + e] = (!need_mask || key + e < n_lo) ? s[4 * n + e] * scale_log2 : -INFINITY;
        s[4 * n + 2 + e] =
            (!need_mask || key + e < n_hi) ? s[4 * n + 2 + e] * scale_log2 : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[4 * n + e]);
        mx_hi = fmaxf(mx_hi, s[4 * n + 2 + e]);
      }
    }
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    // A row that has seen no key yet keeps max -inf; subtract 0 then (no inf - inf).
    const float mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
    const float mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
    const float al_lo = Exp2(m_lo - mu_lo), al_hi = Exp2(m_hi - mu_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      s[4 * n + 0] = Exp2(s[4 * n + 0] - mu_lo);
      s[4 * n + 1] = Exp2(s[4 * n + 1] - mu_lo);
      s[4 * n + 2] = Exp2(s[4 * n + 2] - mu_hi);
      s[4 * n + 3] = Exp2(s[4 * n + 3] - mu_hi);
      sum_lo += s[4 * n + 0] + s[4 * n + 1];
      sum_hi += s[4 * n + 2] + s[4 * n + 3];
    }
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[4 * n + 0] *= al_lo;
      o[4 * n + 1] *= al_lo;
      o[4 * n + 2] *= al_hi;
      o[4 * n + 3] *= al_hi;
    }
    uint32_t pf[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      pf[kk][0] = PackPair<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = PackPair<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = PackPair<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = PackPair<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
      WgmmaM64N128K16RS<T, 1>(o, pf[kk], SmemDesc128(v_addr + kk * 2048, kKeys * 128, 1024), 1);
    WgmmaCommit();
    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
  }
  CpAsyncWait<0>();

  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
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
    for (int n = 0; n < 16; ++n) {
      if (r_lo < R)
        *reinterpret_cast<uint32_t*>(out + off_lo * Dv + col0 + n * 8) =
            PackPair<T>(o[4 * n] * inv_lo, o[4 * n + 1] * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<uint32_t*>(out + off_hi * Dv + col0 + n * 8) =
            PackPair<T>(o[4 * n + 2] * inv_hi, o[4 * n + 3] * inv_hi);
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
    for (int n = 0; n < 16; ++n) {
      if (r_lo < R)
        *reinterpret_cast<float2*>(out + (off_lo + shift) * Dv + col0 + n * 8) =
            make_float2(o[4 * n] * inv_lo, o[4 * n + 1] * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<float2*>(out + (off_hi + shift) * Dv + col0 + n * 8) =
            make_float2(o[4 * n + 2] * inv_hi, o[4 * n + 3] * inv_hi);
    }
    if (lane % 4 == 0) {
      if (r_lo < R) p.part_lse[off_lo + shift] = lse_lo;
      if (r_hi < R) p.part_lse[off_hi + shift] = lse_hi;
    }
  }
#endif
}

template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionSm90(const AttentionParams& p, cudaStream_t stream) {
  using Shape = AttnSm90Shape<Dk, Dv>;
  cudaError_t err = cudaFuncSetAttribute(AttentionSm90Kernel<T, Dk, Dv>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(Shape::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), unsigned(p.num_splits),
                  unsigned(p.batch * p.heads_kv));
  AttentionSm90Kernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Whether the sm_90a kernel is what the current device would run: the device
// is compute capability 9.0 and this build carries sm_90a code (a build for
// sm_80 alone would run the empty sm_80 body). Cached per device.
bool Sm90AttentionAvailable();

}  // namespace jax_mla::cuda
