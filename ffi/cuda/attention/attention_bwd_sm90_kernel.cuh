// The attention backward on Hopper (sm_90a) warpgroup MMA: the mma.sync
// backward's math and structure (attention_bwd_kernel.cuh: two kernels, each
// the only writer of its results, so no atomics and a deterministic result)
// with every product a wgmma (ffi/cuda/common/wgmma.cuh). A block is two
// warpgroups that both load (cp.async into 128B-swizzled tiles, two stages,
// one __syncthreads per tile) and both compute:
//   KV kernel (dK, dV of 128 keys, 64 per warpgroup): per block of kQRows
//     (32) query rows (every head of the GQA group, as in the mma.sync kernel),
//     S^T = K Q^T and dP^T = V dO^T with both operands in shared memory,
//     P^T = exp(S^T - lse) and dS^T = P^T (dP^T - delta) on the accumulators,
//     then dV += P^T dO and dK += dS^T Q with P^T and dS^T repacked as
//     register A operands (as the forward's P) and dO, Q read through
//     MN-major descriptors.
//   Q kernel (dQ of 128 query rows, 64 per warpgroup): per tile of 64 keys,
//     S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K (K MN-major).
// Keys past kv_len and rows past the end are zero-filled in shared memory
// (nothing past kv_len is read) and masked, so invisible pairs give P = dS =
// 0 exactly: keys past kv_len get dK = dV = 0, a row that saw no key dQ = 0.
// The kernel bodies exist only in the sm_90a pass; LaunchAttentionBwdSm90
// must be called only where RunsSm90a() (device.h) holds.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/wgmma.cuh"

namespace jax_mla::cuda {

template <int Dk, int Dv>
struct AttnBwdSm90Shape {
  static_assert(Dk % 64 == 0 && Dv == 128, "dV is one m64n128 wgmma per 16 query rows");
  static_assert(Dk <= 192, "dK, dV and the S^T, dP^T tiles must fit 255 registers");
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kStages = 2;
  // KV kernel: dK (Dk / 2 registers a thread) + dV (64) + S^T and dP^T
  // (kQRows / 2 each) + their packed copies must fit 255 registers without
  // spills: 32 query rows a step (64 spilled 148 bytes at Dk = 192, and at
  // Dk = 128 4 to 12 bytes, in the loop or not, with every small change).
  static constexpr int kKvKeys = 128;
  static constexpr int kQRows = 32;
  static constexpr int kKBytes = kKvKeys * Dk * 2, kVBytes = kKvKeys * Dv * 2;
  static constexpr int kQTileBytes = kQRows * Dk * 2, kDoTileBytes = kQRows * Dv * 2;
  // Per stage: the Q and dO tiles, then the rows' LSE (log2 units), delta and
  // visible-key count; rounded up so every tile starts on a swizzle period.
  static constexpr int kKvStage = (kQTileBytes + kDoTileBytes + kQRows * 12 + 1023) / 1024 * 1024;
  // + 1024: the dynamic shared memory base is rounded up to the swizzle period.
  static constexpr size_t kKvSmem = size_t(kKBytes) + kVBytes + size_t(kStages) * kKvStage + 1024;
  // Q kernel.
  static constexpr int kRows = 128;
  static constexpr int kKeys = 64;
  static constexpr int kRowQBytes = kRows * Dk * 2, kRowDoBytes = kRows * Dv * 2;
  static constexpr int kTileKBytes = kKeys * Dk * 2, kTileVBytes = kKeys * Dv * 2;
  static constexpr size_t kQSmem =
      size_t(kRowQBytes) + kRowDoBytes + size_t(kStages) * (kTileKBytes + kTileVBytes) + 1024;
};

namespace bwd90 {

// 16-byte chunks of `rows` rows of kCols elements, row rr from src(rr), into
// a 128B-swizzled tile (wgmma.cuh's layout) by cp.async from 256 threads;
// zero-filled where !ok(rr), nothing read there.
template <int kCols, typename T, typename Src, typename Ok>
__device__ __forceinline__ void LoadTile(char* dst, int rows, int tid, const Src& src,
                                         const Ok& ok) {
  constexpr int kChunks = kCols / 8;
  for (int c = tid; c < rows * kChunks; c += 256) {
    const int rr = c / kChunks, cc = c % kChunks;
    const bool valid = ok(rr);
    const T* g = src(valid ? rr : -1);
    CpAsync16(dst + Swizzle128(rows, rr, cc), g + cc * 8, valid);
  }
}

// m64 x kN x 16 with both operands K-major in shared memory (kN = 32 or 64).
template <typename T, int kN>
__device__ __forceinline__ void WgmmaSS(float (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc,
                                        int accumulate) {
  if constexpr (kN == 64)
    WgmmaN64<T>(d, a_desc, b_desc, accumulate);
  else
    WgmmaN32<T, 0>(d, a_desc, b_desc, accumulate);
}

// The A operands (one per 16 columns) of an m64 x kN accumulator, as the
// forward packs P (wgmma.cuh's accumulator and A-fragment layouts).
template <typename T, int kN>
__device__ __forceinline__ void AccToA(uint32_t (&a)[kN / 16][4], const float (&acc)[kN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      a[kk][e] = PackPair<T>(acc[8 * kk + 2 * e], acc[8 * kk + 2 * e + 1]);
}

// x, opaque to the compiler: the shared-memory descriptors built from it in
// the tile loop stay there instead of being hoisted out of it, where 20 of
// them (64-bit) would hold registers the accumulators need.
__device__ __forceinline__ uint32_t Opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

template <int N>
__device__ __forceinline__ void Fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) FenceOperand(d[i]);
}
template <int N>
__device__ __forceinline__ void Fence(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) FenceOperand(a[i][e]);
}

}  // namespace bwd90

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(256, 1) AttentionBwdSm90KvKernel(const AttentionBwdParams p) {
#ifdef JAX_MLA_SM90A
  using Shape = AttnBwdSm90Shape<Dk, Dv>;
  constexpr int kKeys = Shape::kKvKeys, kQ = Shape::kQRows, kStages = Shape::kStages;
  constexpr int kDkB = Dk / 64;  // dK as m64n64 accumulators
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);
  char* s_k = smem;                      // [Dk/64][128 keys][64], swizzled
  char* s_v = s_k + Shape::kKBytes;      // [Dv/64][128 keys][64]
  char* s_stage = s_v + Shape::kVBytes;  // per stage: q [Dk/64][kQ][64], dout, row facts
  auto s_q = [&](int st) { return s_stage + st * Shape::kKvStage; };
  auto s_do = [&](int st) { return s_q(st) + Shape::kQTileBytes; };
  auto s_lse = [&](int st) { return reinterpret_cast<float*>(s_do(st) + Shape::kDoTileBytes); };
  auto s_delta = [&](int st) { return s_lse(st) + kQ; };
  auto s_vis = [&](int st) { return reinterpret_cast<int32_t*>(s_delta(st) + kQ); };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int cw = warp / 4, wwarp = warp % 4;  // warpgroup cw owns keys [j0 + 64 cw, + 64)
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seq_q, Skv = p.seq_kv;
  const int64_t group = Hq / Hkv, R = Sq * group;
  const int64_t b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const int64_t j0 = int64_t(blockIdx.x) * kKeys;
  const int32_t kv_len_raw = p.kv_len[b];
  const int64_t kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
  const int64_t q_pos = p.q_pos[b];

  // The rows that see any key of this block: all of them, or under the causal
  // mask those at positions >= j0 - q_pos; none when the block is past kv_len.
  int64_t r_first = 0;
  if (p.causal && j0 - q_pos > 0) r_first = (j0 - q_pos) * group;
  const int64_t t_end = (R + kQ - 1) / kQ;
  const int64_t t_begin = j0 >= kv_len || r_first >= R ? t_end : r_first / kQ;

  const T* k_base = static_cast<const T*>(p.k.data) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v_base = static_cast<const T*>(p.v.data) + b * p.v.batch_stride + hk * p.v.head_stride;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);

  // Tile t's q and dout rows by cp.async into stage st, and its row facts by
  // plain stores (visible after the barrier that precedes their use).
  auto load_rows = [&](int64_t t, int st) {
    constexpr int kPerRow = Shape::kThreads / kQ;
    const int rr = tid / kPerRow, part = tid % kPerRow;
    const int64_t r = t * kQ + rr;
    const bool ok = r < R;
    const int64_t pos = ok ? r / group : 0, head = ok ? hk * group + r % group : 0;
    const int64_t off = (b * Sq + pos) * Hq + head;  // row of [B, Sq, Hq, *]
    for (int cc = part; cc < Dk / 8; cc += kPerRow)
      CpAsync16(s_q(st) + Swizzle128(kQ, rr, cc), q + off * Dk + cc * 8, ok);
    for (int cc = part; cc < Dv / 8; cc += kPerRow)
      CpAsync16(s_do(st) + Swizzle128(kQ, rr, cc), dout + off * Dv + cc * 8, ok);
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
    bwd90::LoadTile<Dk, T>(
        s_k, kKeys, tid, [&](int rr) { return k_base + (rr < 0 ? 0 : (j0 + rr) * p.k.row_stride); },
        ok);
    bwd90::LoadTile<Dv, T>(
        s_v, kKeys, tid, [&](int rr) { return v_base + (rr < 0 ? 0 : (j0 + rr) * p.v.row_stride); },
        ok);
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_rows(t_begin + s, s);
    CpAsyncCommit();
  }

  float dk[kDkB][32], dv[64];
#pragma unroll
  for (int c = 0; c < kDkB; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[c][i] = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) dv[i] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  // The lane's two keys as int32 for the masks (row facts hold visible-key
  // counts as int32, so a key at or past 2^31 - 1 is never visible).
  const int64_t key0 = j0 + 64 * cw + 16 * wwarp + lane / 4;
  const int32_t mkey_lo = int32_t(key0 < INT32_MAX ? key0 : INT32_MAX);
  const int32_t mkey_hi = int32_t(key0 + 8 < INT32_MAX ? key0 + 8 : INT32_MAX);

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin), st = it % kStages;
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();  // this thread's cp.async writes -> the wgmma reads after the barrier
    __syncthreads();
    if (t + kStages - 1 < t_end) load_rows(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const uint32_t k_addr = bwd90::Opaque(SmemAddr(s_k) + 64 * cw * 128);
    const uint32_t v_addr = bwd90::Opaque(SmemAddr(s_v) + 64 * cw * 128);
    const uint32_t q_addr = bwd90::Opaque(SmemAddr(s_q(st))),
                   do_addr = bwd90::Opaque(SmemAddr(s_do(st)));
    const float* lse2 = s_lse(st);
    const float* delta = s_delta(st);
    const int32_t* vis = s_vis(st);

    // S^T = K Q^T and dP^T = V dO^T for the warpgroup's 64 keys.
    float s[kQ / 2], dp[kQ / 2];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk)  // 16-wide slice kk of 64-wide block kk / 4
      bwd90::WgmmaSS<T, kQ>(
          s, SmemDesc128(k_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024),
          SmemDesc128(q_addr + (kk / 4) * kQ * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    WgmmaCommit();
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk)
      bwd90::WgmmaSS<T, kQ>(
          dp, SmemDesc128(v_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024),
          SmemDesc128(do_addr + (kk / 4) * kQ * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    WgmmaCommit();
    WgmmaWait<1>();  // S^T done; dP^T may still run
    bwd90::Fence(s);
    // P^T in place of S^T; invisible pairs exactly 0, and their bits of
    // `seen` clear (one bit per accumulator: kQ / 2 <= 32).
    uint32_t seen = 0;
#pragma unroll
    for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * (lane % 4) + e % 2;
        const bool visible = (e < 2 ? mkey_lo : mkey_hi) < vis[col];
        s[4 * n + e] = visible ? Exp2(s[4 * n + e] * scale_log2 - lse2[col]) : 0.f;
        seen |= uint32_t(visible) << (4 * n + e);
      }
    }
    uint32_t pt[kQ / 16][4];
    bwd90::AccToA<T, kQ>(pt, s);
    WgmmaWait<0>();
    bwd90::Fence(dp);
    // dS^T in place of dP^T.
#pragma unroll
    for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * (lane % 4) + e % 2;
        const bool visible = (seen >> (4 * n + e)) & 1;
        dp[4 * n + e] = visible ? s[4 * n + e] * (dp[4 * n + e] - delta[col]) : 0.f;
      }
    }
    uint32_t dst[kQ / 16][4];
    bwd90::AccToA<T, kQ>(dst, dp);
    // dV += P^T dO and dK += dS^T Q (B operands MN-major: the tiles are
    // stored query-row-major, 64-column blocks kQ * 128 bytes apart). Issuing
    // dV before dS^T is computed, to overlap them, spilled at Dk = 192.
    bwd90::Fence(dv);
#pragma unroll
    for (int c = 0; c < kDkB; ++c) bwd90::Fence(dk[c]);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kQ / 16; ++kk) {
      WgmmaM64N128K16RS<T, 1>(dv, pt[kk], SmemDesc128(do_addr + kk * 2048, kQ * 128, 1024), 1);
#pragma unroll
      for (int c = 0; c < kDkB; ++c)
        WgmmaN64RS<T, 1>(dk[c], dst[kk],
                         SmemDesc128(q_addr + c * kQ * 128 + kk * 2048, kQ * 128, 1024), 1);
    }
    WgmmaCommit();
    // Before the next barrier, after which this stage is overwritten.
    WgmmaWait<0>();
    bwd90::Fence(dv);
#pragma unroll
    for (int c = 0; c < kDkB; ++c) bwd90::Fence(dk[c]);
    bwd90::Fence(pt);
    bwd90::Fence(dst);
  }
  CpAsyncWait<0>();

  // Every key of the block below Skv is written (zeros past kv_len). The
  // lane's keys are recomputed from opaque indices: kept across the loop, a
  // register of them was spilled.
  const int etid = int(bwd90::Opaque(threadIdx.x)), elane = etid % 32;
  const int64_t key_lo = int64_t(bwd90::Opaque(blockIdx.x)) * kKeys + (etid / 128) * 64 +
                         ((etid / 32) % 4) * 16 + elane / 4;
  const int64_t key_hi = key_lo + 8;
  const int col = 2 * (elane % 4);
  float* gk = p.grad_k + (b * Skv * Hkv + hk) * Dk + col;
  float* gv = p.grad_v + (b * Skv * Hkv + hk) * Dv + col;
#pragma unroll
  for (int c = 0; c < kDkB; ++c)
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (key_lo < Skv)
        *reinterpret_cast<float2*>(gk + key_lo * Hkv * Dk + c * 64 + n * 8) =
            make_float2(dk[c][4 * n] * p.scale, dk[c][4 * n + 1] * p.scale);
      if (key_hi < Skv)
        *reinterpret_cast<float2*>(gk + key_hi * Hkv * Dk + c * 64 + n * 8) =
            make_float2(dk[c][4 * n + 2] * p.scale, dk[c][4 * n + 3] * p.scale);
    }
#pragma unroll
  for (int n = 0; n < Dv / 8; ++n) {
    if (key_lo < Skv)
      *reinterpret_cast<float2*>(gv + key_lo * Hkv * Dv + n * 8) =
          make_float2(dv[4 * n], dv[4 * n + 1]);
    if (key_hi < Skv)
      *reinterpret_cast<float2*>(gv + key_hi * Hkv * Dv + n * 8) =
          make_float2(dv[4 * n + 2], dv[4 * n + 3]);
  }
#endif
}

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(256, 1) AttentionBwdSm90QKernel(const AttentionBwdParams p) {
#ifdef JAX_MLA_SM90A
  using Shape = AttnBwdSm90Shape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kRows = Shape::kRows, kStages = Shape::kStages;
  constexpr int kDkB = Dk / 64;  // dQ as m64n64 accumulators
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);
  char* s_q = smem;                                // [Dk/64][128 rows][64], swizzled
  char* s_do = s_q + Shape::kRowQBytes;            // [Dv/64][128 rows][64]
  char* s_k = s_do + Shape::kRowDoBytes;           // [stages][Dk/64][64 keys][64]
  char* s_v = s_k + kStages * Shape::kTileKBytes;  // [stages][Dv/64][64 keys][64]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int cw = warp / 4, wwarp = warp % 4;  // warpgroup cw owns rows [row0 + 64 cw, + 64)
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
  const int64_t r_lo = row0 + 64 * cw + 16 * wwarp + lane / 4, r_hi = r_lo + 8;
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
    bwd90::LoadTile<Dk, T>(
        s_k + stage * Shape::kTileKBytes, kKeys, tid,
        [&](int rr) { return k_base + (rr < 0 ? 0 : (j0 + rr) * p.k.row_stride); }, ok);
    bwd90::LoadTile<Dv, T>(
        s_v + stage * Shape::kTileVBytes, kKeys, tid,
        [&](int rr) { return v_base + (rr < 0 ? 0 : (j0 + rr) * p.v.row_stride); }, ok);
  };

  if (tiles > 0) {
    auto ok = [&](int rr) { return row0 + rr < R; };
    const T* q = static_cast<const T*>(p.q);
    const T* dout = static_cast<const T*>(p.dout);
    bwd90::LoadTile<Dk, T>(
        s_q, kRows, tid, [&](int rr) { return q + (rr < 0 ? 0 : row_offset(row0 + rr) * Dk); }, ok);
    bwd90::LoadTile<Dv, T>(
        s_do, kRows, tid, [&](int rr) { return dout + (rr < 0 ? 0 : row_offset(row0 + rr) * Dv); },
        ok);
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_tile(s, s);
    CpAsyncCommit();
  }

  float dq[kDkB][32];
#pragma unroll
  for (int c = 0; c < kDkB; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) dq[c][i] = 0.f;
  const float scale_log2 = p.scale * kLog2e;

  for (int64_t t = 0; t < tiles; ++t) {
    const int it = int(t), st = it % kStages;
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();  // this thread's cp.async writes -> the wgmma reads after the barrier
    __syncthreads();
    if (t + kStages - 1 < tiles) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const uint32_t k_addr = bwd90::Opaque(SmemAddr(s_k + st * Shape::kTileKBytes));
    const uint32_t v_addr = bwd90::Opaque(SmemAddr(s_v + st * Shape::kTileVBytes));
    const uint32_t q_addr = bwd90::Opaque(SmemAddr(s_q) + 64 * cw * 128);
    const uint32_t do_addr = bwd90::Opaque(SmemAddr(s_do) + 64 * cw * 128);

    // S = Q K^T and dP = dO V^T for the warpgroup's 64 rows.
    float s[32], dp[32];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk)
      WgmmaN64<T>(s, SmemDesc128(q_addr + (kk / 4) * kRows * 128 + (kk % 4) * 32, 16, 1024),
                  SmemDesc128(k_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    WgmmaCommit();
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk)
      WgmmaN64<T>(dp, SmemDesc128(do_addr + (kk / 4) * kRows * 128 + (kk % 4) * 32, 16, 1024),
                  SmemDesc128(v_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    WgmmaCommit();
    WgmmaWait<1>();  // S done; dP may still run
    bwd90::Fence(s);
    // P in place of S; invisible pairs exactly 0.
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi = e >= 2;
        const bool vis = key + e % 2 < (hi ? n_hi : n_lo);
        s[4 * n + e] = vis ? Exp2(s[4 * n + e] * scale_log2 - (hi ? lse_hi : lse_lo)) : 0.f;
      }
    }
    WgmmaWait<0>();
    bwd90::Fence(dp);
    // dS in place of dP.
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi = e >= 2;
        const bool vis = key + e % 2 < (hi ? n_hi : n_lo);
        dp[4 * n + e] = vis ? s[4 * n + e] * (dp[4 * n + e] - (hi ? delta_hi : delta_lo)) : 0.f;
      }
    }
    uint32_t ds[kKeys / 16][4];
    bwd90::AccToA<T, kKeys>(ds, dp);
    // dQ += dS K (K MN-major: stored key-major, 64-column blocks kKeys * 128
    // bytes apart).
#pragma unroll
    for (int c = 0; c < kDkB; ++c) bwd90::Fence(dq[c]);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int c = 0; c < kDkB; ++c)
        WgmmaN64RS<T, 1>(dq[c], ds[kk],
                         SmemDesc128(k_addr + c * kKeys * 128 + kk * 2048, kKeys * 128, 1024), 1);
    WgmmaCommit();
    // Before the next barrier, after which this stage is overwritten.
    WgmmaWait<0>();
#pragma unroll
    for (int c = 0; c < kDkB; ++c) bwd90::Fence(dq[c]);
    bwd90::Fence(ds);
  }
  CpAsyncWait<0>();

  // Every row of the block below R is written (zeros where it saw no key).
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int c = 0; c < kDkB; ++c)
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (r_lo < R)
        *reinterpret_cast<float2*>(p.grad_q + row_offset(r_lo) * Dk + c * 64 + n * 8 + col) =
            make_float2(dq[c][4 * n] * p.scale, dq[c][4 * n + 1] * p.scale);
      if (r_hi < R)
        *reinterpret_cast<float2*>(p.grad_q + row_offset(r_hi) * Dk + c * 64 + n * 8 + col) =
            make_float2(dq[c][4 * n + 2] * p.scale, dq[c][4 * n + 3] * p.scale);
    }
#endif
}

template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionBwdSm90(const AttentionBwdParams& p, cudaStream_t stream) {
  using Shape = AttnBwdSm90Shape<Dk, Dv>;
  const unsigned bh = unsigned(p.batch * p.heads_kv);
  if (bh == 0) return cudaSuccess;
  cudaError_t err;
  if (p.seq_kv > 0) {
    err = cudaFuncSetAttribute(AttentionBwdSm90KvKernel<T, Dk, Dv>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kKvSmem));
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned((p.seq_kv + Shape::kKvKeys - 1) / Shape::kKvKeys), 1, bh);
    AttentionBwdSm90KvKernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kKvSmem, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  if (rows > 0) {
    err = cudaFuncSetAttribute(AttentionBwdSm90QKernel<T, Dk, Dv>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kQSmem));
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), 1, bh);
    AttentionBwdSm90QKernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kQSmem, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace jax_mla::cuda
