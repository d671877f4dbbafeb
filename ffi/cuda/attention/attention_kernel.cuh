// flash_attention on tensor cores (FlashAttention-2 layout): a block of 4
// warps owns 64 query rows of one (batch, KV head); a warp owns 16 rows and
// computes S = Q K^T, the online softmax and O += P V for them entirely in
// registers (P never leaves the warp: the S accumulators are repacked as the
// A operand of the P V product). K and V tiles are staged in shared memory by
// a two-stage cp.async pipeline. Query rows are (position, head-in-group)
// pairs, so grouped heads (GQA/MQA) share every K/V tile. Dk and Dv are
// independent (DeepSeek's 192/128). Split-KV as in mla_kernel.cuh. With
// kPaged, K and V rows come from the pages the block table names
// (cache_rows.cuh): keys on skipped pages are zero-filled and masked.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/attention/attention_config.h"
#include "ffi/cuda/attention/attention_rows.cuh"
#include "ffi/cuda/common/cache_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {

template <typename T, int Dk, int Dv, bool kPaged>
__global__ void __launch_bounds__(128) AttentionKernel(const AttentionParams p) {
  using Shape = AttnShape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kStages = Shape::kStages, kKRow = Shape::kKRow,
                kVRow = Shape::kVRow;
  constexpr int kKChunks = Dk / 8, kVChunks = Dv / 8;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem;                           // [64][Dk]
  char* s_k = s_q + Shape::kRows * kKRow;     // [stages][keys][Dk]
  char* s_v = s_k + kStages * kKeys * kKRow;  // [stages][keys][Dv]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seq_q, Skv = p.seq_kv;
  const int64_t group = Hq / Hkv, R = Sq * group;
  const int64_t b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const int split = blockIdx.y;
  // Later row tiles see more keys under a causal mask: start them first.
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * Shape::kRows;
  const int32_t kv_len_raw = p.kv_len[b];
  const int64_t kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
  const int64_t q_pos = p.q_pos[b];
  auto visible = [&](int64_t r) -> int64_t {
    return r < R ? VisibleKeys(q_pos + r / group, kv_len_raw, Skv, p.causal) : 0;
  };
  const int64_t last_row = (row0 + Shape::kRows < R ? row0 + Shape::kRows : R) - 1;
  const int64_t n_max = visible(last_row), n_min = visible(row0);
  const int64_t r_lo = row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = visible(r_lo), n_hi = visible(r_hi);

  const int64_t tiles = (n_max + kKeys - 1) / kKeys;
  const int64_t per = (tiles + p.num_splits - 1) / p.num_splits;
  const int64_t t_begin = split * per < tiles ? split * per : tiles;
  const int64_t t_end = t_begin + per < tiles ? t_begin + per : tiles;

  // One block table serves k and v (the pages of both hold the same keys);
  // a paged row's offset counts from the pool (batch row 0).
  const CacheRows<kPaged> rows(p.k, b);
  const int64_t kvb = kPaged ? 0 : b % p.kv_batch;
  const T* k_base = static_cast<const T*>(p.k.data) + kvb * p.k.batch_stride + hk * p.k.head_stride;
  const T* v_base = static_cast<const T*>(p.v.data) + kvb * p.v.batch_stride + hk * p.v.head_stride;
  auto load_tile = [&](int64_t t, int stage) {
    char* dk = s_k + stage * kKeys * kKRow;
    for (int c = tid; c < kKeys * kKChunks; c += Shape::kThreads) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      const int64_t j = t * kKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dk + rr * kKRow + cc * 16, k_base + off + cc * 8, ok);
    }
    char* dv = s_v + stage * kKeys * kVRow;
    for (int c = tid; c < kKeys * kVChunks; c += Shape::kThreads) {
      const int rr = c / kVChunks, cc = c % kVChunks;
      const int64_t j = t * kKeys + rr;
      int64_t off;
      const bool ok = rows.Locate(j, kv_len, p.v.batch_stride, p.v.row_stride, &off);
      CpAsync16(dv + rr * kVRow + cc * 16, v_base + off + cc * 8, ok);
    }
  };
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };

  if (t_begin < t_end) {
    const T* q = static_cast<const T*>(p.q);
    for (int c = tid; c < Shape::kRows * kKChunks; c += Shape::kThreads) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + rr * kKRow + cc * 16, q + (ok ? row_offset(row0 + rr) : 0) * Dk + cc * 8, ok);
    }
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    CpAsyncCommit();
  }

  constexpr int kNT = kKeys / 8, kOT = Dv / 8;
  float o[kOT][4];
#pragma unroll
  for (int n = 0; n < kOT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const char* q_frag = s_q + (warp * 16 + lane % 16) * kKRow + (lane / 16) * 16;
  // Up to Dk = 192 the warp's Q fragments stay in registers for the whole key
  // loop (48 registers), so the S product reads only K from shared memory.
  constexpr bool kQInRegs = Dk <= 192;
  uint32_t qf[kQInRegs ? Dk / 16 : 1][4];

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < t_end) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* kt = s_k + (it % kStages) * kKeys * kKRow;
    const char* vt = s_v + (it % kStages) * kKeys * kVRow;
    if constexpr (kQInRegs) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < Dk / 16; ++kk) LdMatrixX4(qf[kk], q_frag + kk * 32);
      }
    }

    float s[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const char* k_frag = kt + (lane % 8 + (lane / 16) * 8) * kKRow + ((lane / 8) % 2) * 16;
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk) {
      uint32_t a_smem[4];
      if constexpr (!kQInRegs) LdMatrixX4(a_smem, q_frag + kk * 32);
      const uint32_t* a = kQInRegs ? qf[kQInRegs ? kk : 0] : a_smem;
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4];
        LdMatrixX4(bk, k_frag + np * 16 * kKRow + kk * 32);
        Mma16816<T>(s[2 * np], a, bk[0], bk[1]);
        Mma16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }
    const bool need_mask = kPaged || (t + 1) * kKeys > n_min;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
      // Keys key and key + 1 share a page (page sizes are even).
      const bool live = key >= kv_len || rows.Live(key);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = (!need_mask || (live && key + e < n_lo)) ? s[n][e] * scale_log2 : -INFINITY;
        s[n][2 + e] =
            (!need_mask || (live && key + e < n_hi)) ? s[n][2 + e] * scale_log2 : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[n][e]);
        mx_hi = fmaxf(mx_hi, s[n][2 + e]);
      }
    }
    QuadRowMax(mx_lo, mx_hi);
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const MaxStep st = StepMax(m_lo, m_hi, mn_lo, mn_hi);
    const float mu_lo = st.mu_lo, mu_hi = st.mu_hi;
    const float al_lo = st.al_lo, al_hi = st.al_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      s[n][0] = Exp2(s[n][0] - mu_lo);
      s[n][1] = Exp2(s[n][1] - mu_lo);
      s[n][2] = Exp2(s[n][2] - mu_hi);
      s[n][3] = Exp2(s[n][3] - mu_hi);
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      o[n][0] *= al_lo;
      o[n][1] *= al_lo;
      o[n][2] *= al_hi;
      o[n][3] *= al_hi;
    }
    const char* v_frag = vt + (lane % 8 + ((lane / 8) % 2) * 8) * kVRow + (lane / 16) * 16;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
      a[0] = PackPair<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = PackPair<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = PackPair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = PackPair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < kOT / 2; ++np) {
        uint32_t bv[4];
        LdMatrixX4Trans(bv, v_frag + kk * 16 * kVRow + np * 32);
        Mma16816<T>(o[2 * np], a, bv[0], bv[1]);
        Mma16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
      }
    }
  }
  CpAsyncWait<0>();

  AttentionStoreRows<T, Dv>(p, b, hk, split, lane, r_lo, r_hi, m_lo, m_hi, l_lo, l_hi,
                            [&](int n, int e) { return o[n][e]; });
}

template <typename T, int Dk, int Dv, bool kPaged>
cudaError_t LaunchAttention(const AttentionParams& p, cudaStream_t stream) {
  using Shape = AttnShape<Dk, Dv>;
  cudaError_t err =
      cudaFuncSetAttribute(AttentionKernel<T, Dk, Dv, kPaged>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), unsigned(p.num_splits),
                  unsigned(p.batch * p.heads_kv));
  AttentionKernel<T, Dk, Dv, kPaged><<<grid, Shape::kThreads, Shape::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
