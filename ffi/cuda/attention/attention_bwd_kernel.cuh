// The attention backward on tensor cores (FlashAttention-2's math, mma.sync
// m16n8k16, float32 accumulation), as two kernels that each own their result
// rows (attention_bwd_config.h), so no atomics and a deterministic result:
//   KV kernel (dK, dV of 64 keys): per block of query rows, S^T = K Q^T and
//     dP^T = V dO^T for the warp's 16 keys, P^T = exp(S^T - lse),
//     dS^T = P^T (dP^T - delta), then dV += P^T dO and dK += dS^T Q (the
//     accumulators repacked as A operands, as the forward repacks P). The
//     query rows are (position, head-in-group) pairs as in the forward, so the
//     sum over the group's heads is part of the loop.
//   Q kernel (dQ of 64 rows): the forward's loop over key tiles with
//     S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// Both recompute P from the forward's LSE. Keys past kv_len are zero-filled in
// shared memory (never read) and masked; invisible pairs give P = dS = 0, so
// keys a row does not see add exactly nothing and keys past kv_len get dK =
// dV = 0 exactly.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/attention/attention_bwd_config.h"
#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {

namespace bwd {

// Fragment loads from row-major shared tiles of 16-bit elements (`stride`
// bytes per row), in the m16n8k16 layouts of kernel_utils.cuh.
// A operand: rows [m0, m0 + 16), k columns [16 kk, 16 kk + 16) of an [M][K] tile.
__device__ __forceinline__ void LoadA(uint32_t a[4], const char* tile, int stride, int m0, int kk,
                                      int lane) {
  LdMatrixX4(a, tile + (m0 + lane % 16) * stride + (lane / 16) * 16 + kk * 32);
}
// B operands of n-tiles n0 / 8 and n0 / 8 + 1 (b[0..1], b[2..3]) at k step kk
// from an [N][K] tile (B^T stored row-major).
__device__ __forceinline__ void LoadBNk(uint32_t b[4], const char* tile, int stride, int n0, int kk,
                                        int lane) {
  LdMatrixX4(b,
             tile + (n0 + lane % 8 + (lane / 16) * 8) * stride + ((lane / 8) % 2) * 16 + kk * 32);
}
// The same from a [K][N] tile (B stored row-major): k rows [k0, k0 + 16).
__device__ __forceinline__ void LoadBKn(uint32_t b[4], const char* tile, int stride, int k0, int n0,
                                        int lane) {
  LdMatrixX4Trans(
      b, tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * stride + (lane / 16) * 16 + n0 * 2);
}
// The A operand of k step kk from an m16 x n accumulator (k = the accumulator's n).
template <typename T>
__device__ __forceinline__ void AccToA(uint32_t a[4], const float (*acc)[4], int kk) {
  a[0] = PackPair<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = PackPair<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = PackPair<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = PackPair<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// 16-byte chunks of `rows` rows of `cols` elements from global rows at
// src(r) (element pointers) into smem rows of `stride` bytes; zero-filled
// where !ok(r), nothing read.
template <int kCols, typename T, typename Src, typename Ok>
__device__ __forceinline__ void LoadRows(char* dst, int stride, int rows, int tid, const Src& src,
                                         const Ok& ok) {
  constexpr int kChunks = kCols / 8;
  for (int c = tid; c < rows * kChunks; c += 128) {
    const int rr = c / kChunks, cc = c % kChunks;
    const bool valid = ok(rr);
    const T* g = src(valid ? rr : -1);
    CpAsync16(dst + rr * stride + cc * 16, g + cc * 8, valid);
  }
}

}  // namespace bwd

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(128) AttentionBwdKvKernel(const AttentionBwdParams p) {
  using Shape = AttnBwdShape<Dk, Dv>;
  constexpr int kKeys = Shape::kKvKeys, kQRows = Shape::kQRows, kKRow = Shape::kKRow,
                kVRow = Shape::kVRow, kStages = Shape::kStages;
  constexpr int kDkC = Dk / Shape::kSplit, kDvC = Dv / Shape::kSplit;  // this block's columns
  extern __shared__ __align__(128) char smem[];
  char* s_k = smem;                     // [keys][Dk]
  char* s_v = s_k + kKeys * kKRow;      // [keys][Dv]
  char* s_stage = s_v + kKeys * kVRow;  // per stage: [rows][Dk] q, [rows][Dv] dout, row facts
  auto s_q = [&](int st) { return s_stage + st * Shape::kKvStage; };
  auto s_do = [&](int st) { return s_q(st) + kQRows * kKRow; };
  auto s_lse = [&](int st) { return reinterpret_cast<float*>(s_do(st) + kQRows * kVRow); };
  auto s_delta = [&](int st) { return s_lse(st) + kQRows; };
  auto s_vis = [&](int st) { return reinterpret_cast<int32_t*>(s_delta(st) + kQRows); };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seq_q, Skv = p.seq_kv;
  const int64_t group = Hq / Hkv, R = Sq * group;
  const int64_t b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const int col_split = blockIdx.y;
  const int64_t j0 = int64_t(blockIdx.x) * kKeys;
  const int32_t kv_len_raw = p.kv_len[b];
  const int64_t kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
  const int64_t q_pos = p.q_pos[b];

  // The rows that see any key of this block: all of them, or under the causal
  // mask those at positions >= j0 - q_pos; none when the block is past kv_len.
  int64_t r_first = 0;
  if (p.causal && j0 - q_pos > 0) r_first = (j0 - q_pos) * group;
  const int64_t t_end = (R + kQRows - 1) / kQRows;
  const int64_t t_begin = j0 >= kv_len || r_first >= R ? t_end : r_first / kQRows;

  const T* k_base = static_cast<const T*>(p.k.data) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v_base = static_cast<const T*>(p.v.data) + b * p.v.batch_stride + hk * p.v.head_stride;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);

  // Tile t's q and dout rows by cp.async into stage st, and its row facts by
  // plain stores (visible after the barrier that precedes their use). Each
  // row has kPerRow threads, each copying every kPerRow-th 16-byte chunk: one
  // pair of 64-bit divisions per thread and tile.
  auto load_rows = [&](int64_t t, int st) {
    constexpr int kPerRow = Shape::kThreads / kQRows;
    const int rr = tid / kPerRow, part = tid % kPerRow;
    const int64_t r = t * kQRows + rr;
    const bool ok = r < R;
    const int64_t pos = ok ? r / group : 0, head = ok ? hk * group + r % group : 0;
    const int64_t off = (b * Sq + pos) * Hq + head;  // row of [B, Sq, Hq, *]
    for (int cc = part; cc < Dk / 8; cc += kPerRow)
      CpAsync16(s_q(st) + rr * kKRow + cc * 16, q + off * Dk + cc * 8, ok);
    for (int cc = part; cc < Dv / 8; cc += kPerRow)
      CpAsync16(s_do(st) + rr * kVRow + cc * 16, dout + off * Dv + cc * 8, ok);
    if (part == 0) {
      float lse2 = INFINITY, delta = 0.f;
      int32_t vis = 0;
      if (ok) {
        const int64_t stat = (b * Hq + head) * Sq + pos;  // [B, Hq, Sq]
        const float lse = p.lse[stat];
        vis = int32_t(VisibleKeys(q_pos + pos, kv_len_raw, Skv, p.causal));
        if (lse == -INFINITY) vis = 0;  // a row that saw no key contributes nothing
        lse2 = vis > 0 ? lse * kLog2e : INFINITY;
        delta = vis > 0 ? p.delta[stat] : 0.f;
      }
      s_lse(st)[rr] = lse2;
      s_delta(st)[rr] = delta;
      s_vis(st)[rr] = vis;
    }
  };

  if (t_begin < t_end) {
    auto ok = [&](int rr) { return j0 + rr < kv_len; };  // keys past kv_len: zeros, never read
    bwd::LoadRows<Dk, T>(
        s_k, kKRow, kKeys, tid,
        [&](int rr) { return k_base + (rr < 0 ? 0 : (j0 + rr) * p.k.row_stride); }, ok);
    bwd::LoadRows<Dv, T>(
        s_v, kVRow, kKeys, tid,
        [&](int rr) { return v_base + (rr < 0 ? 0 : (j0 + rr) * p.v.row_stride); }, ok);
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_rows(t_begin + s, s);
    CpAsyncCommit();
  }

  constexpr int kNT = kQRows / 8;  // n-tiles of S^T (query rows)
  float dk[kDkC / 8][4], dv[kDvC / 8][4];
#pragma unroll
  for (int n = 0; n < kDkC / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < kDvC / 8; ++n) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const int m0 = warp * 16;
  const int64_t key_lo = j0 + m0 + lane / 4, key_hi = key_lo + 8;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin), st = it % kStages;
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < t_end) load_rows(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* qt = s_q(st);
    const char* dot = s_do(st);
    const float* lse2 = s_lse(st);
    const float* delta = s_delta(st);
    const int32_t* vis = s_vis(st);

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys.
    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk) {
      uint32_t a[4];
      bwd::LoadA(a, s_k, kKRow, m0, kk, lane);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bq[4];
        bwd::LoadBNk(bq, qt, kKRow, np * 16, kk, lane);
        Mma16816<T>(s[2 * np], a, bq[0], bq[1]);
        Mma16816<T>(s[2 * np + 1], a, bq[2], bq[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk) {
      uint32_t a[4];
      bwd::LoadA(a, s_v, kVRow, m0, kk, lane);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bo[4];
        bwd::LoadBNk(bo, dot, kVRow, np * 16, kk, lane);
        Mma16816<T>(dp[2 * np], a, bo[0], bo[1]);
        Mma16816<T>(dp[2 * np + 1], a, bo[2], bo[3]);
      }
    }
    // P^T and dS^T (in place of S^T and dP^T); invisible pairs exactly 0.
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * (lane % 4) + e % 2;
        const int64_t key = e < 2 ? key_lo : key_hi;
        const bool visible = key < vis[col];
        const float pr = visible ? Exp2(s[n][e] * scale_log2 - lse2[col]) : 0.f;
        s[n][e] = pr;
        dp[n][e] = visible ? pr * (dp[n][e] - delta[col]) : 0.f;
      }
    }
    // dV += P^T dO and dK += dS^T Q over this block's columns.
    const int dv0 = col_split * kDvC, dk0 = col_split * kDkC;
#pragma unroll
    for (int kk = 0; kk < kQRows / 16; ++kk) {
      uint32_t a[4];
      bwd::AccToA<T>(a, s, kk);
#pragma unroll
      for (int np = 0; np < kDvC / 16; ++np) {
        uint32_t bo[4];
        bwd::LoadBKn(bo, dot, kVRow, kk * 16, dv0 + np * 16, lane);
        Mma16816<T>(dv[2 * np], a, bo[0], bo[1]);
        Mma16816<T>(dv[2 * np + 1], a, bo[2], bo[3]);
      }
      bwd::AccToA<T>(a, dp, kk);
#pragma unroll
      for (int np = 0; np < kDkC / 16; ++np) {
        uint32_t bq[4];
        bwd::LoadBKn(bq, qt, kKRow, kk * 16, dk0 + np * 16, lane);
        Mma16816<T>(dk[2 * np], a, bq[0], bq[1]);
        Mma16816<T>(dk[2 * np + 1], a, bq[2], bq[3]);
      }
    }
  }
  CpAsyncWait<0>();

  // Every key of the block below Skv is written (zeros past kv_len).
  const int col = 2 * (lane % 4);
  float* gk = p.grad_k + (b * Skv * Hkv + hk) * Dk + col_split * kDkC + col;
  float* gv = p.grad_v + (b * Skv * Hkv + hk) * Dv + col_split * kDvC + col;
#pragma unroll
  for (int n = 0; n < kDkC / 8; ++n) {
    if (key_lo < Skv)
      *reinterpret_cast<float2*>(gk + key_lo * Hkv * Dk + n * 8) =
          make_float2(dk[n][0] * p.scale, dk[n][1] * p.scale);
    if (key_hi < Skv)
      *reinterpret_cast<float2*>(gk + key_hi * Hkv * Dk + n * 8) =
          make_float2(dk[n][2] * p.scale, dk[n][3] * p.scale);
  }
#pragma unroll
  for (int n = 0; n < kDvC / 8; ++n) {
    if (key_lo < Skv)
      *reinterpret_cast<float2*>(gv + key_lo * Hkv * Dv + n * 8) = make_float2(dv[n][0], dv[n][1]);
    if (key_hi < Skv)
      *reinterpret_cast<float2*>(gv + key_hi * Hkv * Dv + n * 8) = make_float2(dv[n][2], dv[n][3]);
  }
}

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(128) AttentionBwdQKernel(const AttentionBwdParams p) {
  using Shape = AttnBwdShape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kStages = Shape::kStages, kKRow = Shape::kKRow,
                kVRow = Shape::kVRow, kRows = Shape::kRows;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem;                           // [rows][Dk]
  char* s_do = s_q + kRows * kKRow;           // [rows][Dv]
  char* s_k = s_do + kRows * kVRow;           // [stages][keys][Dk]
  char* s_v = s_k + kStages * kKeys * kKRow;  // [stages][keys][Dv]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seq_q, Skv = p.seq_kv;
  const int64_t group = Hq / Hkv, R = Sq * group;
  const int64_t b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  // Later row tiles see more keys under a causal mask: start them first.
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kRows;
  const int32_t kv_len_raw = p.kv_len[b];
  const int64_t kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
  const int64_t q_pos = p.q_pos[b];
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };
  auto stat_index = [&](int64_t r) { return (b * Hq + hk * group + r % group) * Sq + r / group; };
  auto visible = [&](int64_t r) -> int64_t {
    return r < R ? VisibleKeys(q_pos + r / group, kv_len_raw, Skv, p.causal) : 0;
  };
  const int64_t last_row = (row0 + kRows < R ? row0 + kRows : R) - 1;
  const int64_t n_max = visible(last_row);
  const int64_t r_lo = row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
  // The lane's two rows: visible keys (0 for a row that saw none), LSE in
  // log2 units, delta.
  int64_t n_lo = visible(r_lo), n_hi = visible(r_hi);
  float lse_lo = 0.f, lse_hi = 0.f, delta_lo = 0.f, delta_hi = 0.f;
  if (n_lo > 0) {
    const float l = p.lse[stat_index(r_lo)];
    if (l == -INFINITY) n_lo = 0;
    lse_lo = l * kLog2e;
    delta_lo = p.delta[stat_index(r_lo)];
  }
  if (n_hi > 0) {
    const float l = p.lse[stat_index(r_hi)];
    if (l == -INFINITY) n_hi = 0;
    lse_hi = l * kLog2e;
    delta_hi = p.delta[stat_index(r_hi)];
  }
  const int64_t tiles = (n_max + kKeys - 1) / kKeys;

  const T* k_base = static_cast<const T*>(p.k.data) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v_base = static_cast<const T*>(p.v.data) + b * p.v.batch_stride + hk * p.v.head_stride;
  auto load_tile = [&](int64_t t, int stage) {
    const int64_t j0 = t * kKeys;
    auto ok = [&](int rr) { return j0 + rr < kv_len; };  // keys past kv_len: zeros, never read
    bwd::LoadRows<Dk, T>(
        s_k + stage * kKeys * kKRow, kKRow, kKeys, tid,
        [&](int rr) { return k_base + (rr < 0 ? 0 : (j0 + rr) * p.k.row_stride); }, ok);
    bwd::LoadRows<Dv, T>(
        s_v + stage * kKeys * kVRow, kVRow, kKeys, tid,
        [&](int rr) { return v_base + (rr < 0 ? 0 : (j0 + rr) * p.v.row_stride); }, ok);
  };

  if (tiles > 0) {
    auto ok = [&](int rr) { return row0 + rr < R; };
    const T* q = static_cast<const T*>(p.q);
    const T* dout = static_cast<const T*>(p.dout);
    bwd::LoadRows<Dk, T>(
        s_q, kKRow, kRows, tid,
        [&](int rr) { return q + (rr < 0 ? 0 : row_offset(row0 + rr) * Dk); }, ok);
    bwd::LoadRows<Dv, T>(
        s_do, kVRow, kRows, tid,
        [&](int rr) { return dout + (rr < 0 ? 0 : row_offset(row0 + rr) * Dv); }, ok);
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_tile(s, s);
    CpAsyncCommit();
  }

  constexpr int kNT = kKeys / 8;
  float dq[Dk / 8][4];
#pragma unroll
  for (int n = 0; n < Dk / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const int m0 = warp * 16;

  for (int64_t t = 0; t < tiles; ++t) {
    const int it = int(t);
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < tiles) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* kt = s_k + (it % kStages) * kKeys * kKRow;
    const char* vt = s_v + (it % kStages) * kKeys * kVRow;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk) {
      uint32_t a[4];
      bwd::LoadA(a, s_q, kKRow, m0, kk, lane);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4];
        bwd::LoadBNk(bk, kt, kKRow, np * 16, kk, lane);
        Mma16816<T>(s[2 * np], a, bk[0], bk[1]);
        Mma16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk) {
      uint32_t a[4];
      bwd::LoadA(a, s_do, kVRow, m0, kk, lane);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bv[4];
        bwd::LoadBNk(bv, vt, kVRow, np * 16, kk, lane);
        Mma16816<T>(dp[2 * np], a, bv[0], bv[1]);
        Mma16816<T>(dp[2 * np + 1], a, bv[2], bv[3]);
      }
    }
    // dS (in place of dP); invisible pairs exactly 0.
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi = e >= 2;
        const bool vis = key + e % 2 < (hi ? n_hi : n_lo);
        const float pr = vis ? Exp2(s[n][e] * scale_log2 - (hi ? lse_hi : lse_lo)) : 0.f;
        dp[n][e] = vis ? pr * (dp[n][e] - (hi ? delta_hi : delta_lo)) : 0.f;
      }
    }
    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
      bwd::AccToA<T>(a, dp, kk);
#pragma unroll
      for (int np = 0; np < Dk / 16; ++np) {
        uint32_t bk[4];
        bwd::LoadBKn(bk, kt, kKRow, kk * 16, np * 16, lane);
        Mma16816<T>(dq[2 * np], a, bk[0], bk[1]);
        Mma16816<T>(dq[2 * np + 1], a, bk[2], bk[3]);
      }
    }
  }
  CpAsyncWait<0>();

  // Every row of the block below R is written (zeros where it saw no key).
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int n = 0; n < Dk / 8; ++n) {
    if (r_lo < R)
      *reinterpret_cast<float2*>(p.grad_q + row_offset(r_lo) * Dk + col + n * 8) =
          make_float2(dq[n][0] * p.scale, dq[n][1] * p.scale);
    if (r_hi < R)
      *reinterpret_cast<float2*>(p.grad_q + row_offset(r_hi) * Dk + col + n * 8) =
          make_float2(dq[n][2] * p.scale, dq[n][3] * p.scale);
  }
}

template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionBwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Shape = AttnBwdShape<Dk, Dv>;
  const unsigned bh = unsigned(p.batch * p.heads_kv);
  if (bh == 0) return cudaSuccess;
  cudaError_t err;
  if (p.seq_kv > 0) {
    err = cudaFuncSetAttribute(AttentionBwdKvKernel<T, Dk, Dv>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kKvSmem));
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned((p.seq_kv + Shape::kKvKeys - 1) / Shape::kKvKeys),
                    unsigned(Shape::kSplit), bh);
    AttentionBwdKvKernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kKvSmem, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  if (rows > 0) {
    err = cudaFuncSetAttribute(AttentionBwdQKernel<T, Dk, Dv>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kQSmem));
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), 1, bh);
    AttentionBwdQKernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kQSmem, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace jax_mla::cuda
