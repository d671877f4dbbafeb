// flash_mla for 64-row blocks on Hopper (sm_90a), the default kernel there:
// the "seesaw" schedule described below, on the wgmma helpers of
// common/wgmma.cuh and the shared-memory tile layout, descriptors and
// constants of the key-split kernel (mla_sm90_split_kernel.cuh), which stays
// as the path for caches whose strides do not suit TMA. Everything that emits
// sm_90a instructions compiles to nothing outside __CUDA_ARCH_FEAT_SM90_ALL;
// the host launches it only where RunsSm90a() (device.h).
//
// Paged caches (kPaged): the tensor map covers the page pool [num_pages,
// page_size, 576] in boxes of min(page_size, 64) keys (MlaKvMap), so a tile
// is 64 / box keys' worth of boxes per column block, each at (row in page,
// page) and 1024-byte aligned in the tile (the 128B swizzle follows the
// shared address), all completing on the block's one barrier. A tile that
// reaches past kv_len or touches a skipped page goes by the cp.async path
// (rows through the block table, cache_rows.cuh; skipped ones zero-filled)
// and its keys on skipped pages are masked like keys past the row's length.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ffi/common/params.h"
#include "ffi/cuda/common/cache_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/wgmma.cuh"
#include "ffi/cuda/mla/mla_config.h"
#include "ffi/cuda/mla/mla_sm90_split_kernel.cuh"

namespace jax_mla::cuda {

// The "seesaw" kernel (the default on sm_90a; FlashMLA's idea of two warpgroups
// taking alternate tiles, our code and our order of the steps).
//
// A block is 2 consumer warpgroups plus a producer warpgroup (384 threads,
// setmaxnreg 232 / 40; only its first warp works) and owns 64 query rows,
// like the key-split kernel. Tiles of 64 keys alternate between two
// shared-memory buffers: tile i of the block's range lands in
// buffer i % 2 and its Q K^T is computed by warpgroup i % 2 alone, for all 64
// keys (wgmma m64n64k16 x 36: 128 B of shared memory a clock, not the 192 of
// m64n32). Warpgroup w owns output columns [256w, 256w + 256) (128 f32
// accumulators a thread) and accumulates P V over every tile. The running
// row maximum is a chain through the tiles in order:
//   m_i = max(m_{i-1}, rowmax S_i), alpha_i = exp2(m_{i-1} - m_i),
//   P_i = exp2(S_i - m_i), O_w = O_w * alpha_i + P_i V_i[cols of w].
// The owner of tile i publishes P_i (input type, in the tile's rope column
// block, free once its Q K^T is done: 64 x 64 x 2 bytes = that block exactly,
// same swizzled K-major layout), alpha_i and m_i; the other warpgroup reads
// them for its half of P_i V_i and as m_{i-1} of its next tile. Warpgroup w,
// for its tiles j = w, w + 2, ... (then the other's last tile, if any):
//   (A) issue S_j = Q K_j^T over its own 4 column blocks (the first loaded);
//   (B) wait for the other's tile j - 1 (P, alpha, m: the chain) and for (A),
//       O *= alpha_{j-1}, P_{j-1} V_{j-1} for its columns, waited for at once:
//       that frees its half of buffer j - 1, so the other warpgroup's next
//       tile is loading before this one waits for data again;
//   (C) the rest of S_j (4 more column blocks and the rope block);
//   (D) softmax of S_j with m_{j-1}, publish P_j, alpha_j, m_j, O *= alpha_j,
//       P_j V_j, waited for (frees its half of buffer j).
// The ncu profile of an earlier order ((A) = all of S_j, (B)'s P V waited
// for after the softmax) showed 61% of stalls on mbarrier waits, and cycle
// counters showed half of every tile spent waiting for TMA data: each warpgroup freed its half of
// the other's buffer only after its own next tile had arrived. NOTES, CUDA 7, has the orders tried.
// Every wgmma group is retired before the loop's back edge and no
// accumulator is written while a group is pending: otherwise ptxas
// serializes all wgmmas of the kernel (C7515).
// So one warpgroup's softmax runs while the other's wgmmas do. Each
// warpgroup keeps a partial row sum (its own tiles' P sums, rescaled by every
// alpha); the two are added at the end (both end on the same m).
//
// Loads: the producer warp (warp 8) fills buffer i % 2 with tile i as tile
// i - 2 is released, half by half (empty[buffer][warpgroup], count 4: lane 0
// of each of the warpgroup's warps once its P V of that tile completed): the
// owner's 4 column blocks (its P V's V columns) as soon as the owner's own
// P V retired, the other 4 and the rope block (P) once the other
// warpgroup's P V retired too. Q K^T consumes the blocks in that order
// (SeesawBlock), its first part in (A), the rest in (C). A tile is 9 bulk tensor
// copies (TMA, 64 columns x 64 keys, 128B swizzle) each completing on its own
// full[buffer][block] mbarrier. TMA zero-fills keys past Skv but would read rows in
// [kv_len, Skv) (a NaN there survives P = 0 in P V), so the tile that holds
// kv_len < Skv goes by cp.async from the producer warp's 32 lanes (keys past
// kv_len zero-filled; each lane's cp.async arrival on all 9 barriers, count
// 32). Q is staged once by cp.async from the consumer threads.
//
// Shared memory (1024-aligned): Q [64][576] 72 KB | buffers 0, 1 [64][576]
// 72 KB each (column block b at b * 8 KB; block 8, the rope columns, holds P
// once Q K^T is done) | mbarriers full[2][9], empty[2][2], pready[2] (count 128:
// the owner's threads, after writing P, alpha, m and fence.proxy.async),
// sums_ready (count 256: the row-sum exchange at the end) |
// alpha[2][64], m[2][64], row sums [2][64] floats. 217 KB.
// Hazards: a half of a buffer is rewritten only after the P V that reads it
// (the owner's half after the owner's, the other half and P after both); alpha/m[buffer] likewise
// (the reader takes them before it releases). pready's phases cannot alias: the owner's next
// arrival on it needs the buffer's next tile, which needs the reader's release.

// bar.sync that the compiler may not move shared-memory accesses across
// (NamedBarrier in kernel_utils.cuh has no memory clobber).
__device__ __forceinline__ void SeesawBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// The order in which tile columns are loaded and consumed by Q K^T: the 4
// column blocks of the owner's output columns (buffer b's tiles belong to
// warpgroup b), freed first by the owner's own P V, then the other 4, then the
// rope block (it holds P, read by both P V products).
__device__ __forceinline__ int SeesawBlock(int bi, int buf) {
  return bi < 8 ? (bi + 4 * buf) & 7 : 8;
}
constexpr int kSeesawThreads = 384;  // two consumer warpgroups + a producer warpgroup
constexpr int kSeesawProducerRegs = 40, kSeesawConsumerRegs = 232;       // setmaxnreg
constexpr size_t kSeesawSmem = 3 * size_t(kSm90TileBytes) +              // Q, two buffers
                               (2 * 9 + 4 + 2 + 1) * sizeof(uint64_t) +  // mbarriers
                               3 * 2 * kSm90Rows * sizeof(float) +       // alpha, m, sums
                               1024;                                     // alignment slack

template <typename T, bool kPaged>
__global__ void __launch_bounds__(kSeesawThreads, 1)
    MlaSm90SeesawKernel(const AttentionParams p, const __grid_constant__ CUtensorMap tm_kv) {
#ifdef JAX_MLA_SM90A
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);    // swizzle atoms
  char* s_q = smem;                                                         // [64][576] swizzled
  char* s_kv = s_q + kSm90TileBytes;                                        // [2][64][576] swizzled
  uint64_t* full = reinterpret_cast<uint64_t*>(s_kv + 2 * kSm90TileBytes);  // [2][9]
  uint64_t* empty = full + 18;                                // [2 buffers][2 warpgroups]
  uint64_t* pready = empty + 4;                               // [2]
  uint64_t* sums_ready = pready + 2;                          // [1]
  float* s_alpha = reinterpret_cast<float*>(sums_ready + 1);  // [2][64]
  float* s_m = s_alpha + 2 * kSm90Rows;                       // [2][64]
  float* s_sum = s_m + 2 * kSm90Rows;                         // [2][64]

  const int tid = threadIdx.x, lane = tid % 32;
  // Warp-uniform as far as the compiler can tell (wgmma in a branch it thinks
  // divergent gets serialized).
  const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t H = p.heads_q, Sq = p.seq_q, Skv = p.seq_kv, R = Sq * H;
  const int64_t row0 = int64_t(blockIdx.x) * kSm90Rows;
  const MlaBlockKeys<kSm90Keys> span(p, b, split, row0, kSm90Rows);
  const int64_t kv_len = span.kv_len, t_begin = span.t_begin, t_end = span.t_end;
  const int n = int(t_end - t_begin);
  const CacheRows<kPaged> rows(p.k, b);
  // Keys per TMA box: a paged tile is several boxes when pages are shorter.
  const int box_keys = kPaged && p.k.page_size < kSm90Keys ? int(p.k.page_size) : kSm90Keys;
  // Whether tile i goes by TMA (same answer in the producer and the consumers).
  auto by_tma = [&](int i) {
    const int64_t key0 = (t_begin + i) * kSm90Keys;
    if constexpr (kPaged) {
      if (key0 + kSm90Keys > kv_len) return false;
      for (int k = 0; k < kSm90Keys; k += box_keys)
        if (!rows.Live(key0 + k)) return false;
      return true;
    }
    return key0 + kSm90Keys <= kv_len || kv_len == Skv;
  };

  if (tid == 0) {
    for (int i = 0; i < 18; ++i) MbarInit(full + i, 32);
    for (int i = 0; i < 4; ++i) MbarInit(empty + i, 4);
    MbarInit(pready, 128);
    MbarInit(pready + 1, 128);
    MbarInit(sums_ready, 256);
  }
  __syncthreads();

  if (warp >= 8) {
    // Producer warpgroup: its first warp loads, the others leave.
    SetMaxRegsDec<kSeesawProducerRegs>();
    if (warp > 8) return;
    const int64_t kvb = b % p.kv_batch;
    const T* kv_base =
        CacheRows<kPaged>::template Base<T>(p.k.data, b, p.kv_batch, p.k.batch_stride);
    constexpr int kChunks = kMlaDk / 8;  // 16-byte chunks per row
    for (int i = 0; i < n; ++i) {
      const int buf = i & 1;
      const uint32_t use = uint32_t(i >> 1);
      // Tile i - 2 released (first use: at once): its owner's columns (warpgroup
      // buf's P V) first, then the other half and the P block.
      const uint32_t parity = (use & 1) ^ 1;
      char* dst = s_kv + buf * kSm90TileBytes;
      uint64_t* bar = full + buf * 9;
      const int64_t key0 = (t_begin + i) * kSm90Keys;
      MbarWait(empty + 2 * buf + buf, parity);
      if (by_tma(i)) {
#pragma unroll 1
        for (int bi = 0; bi < 9; ++bi) {
          const int blk = SeesawBlock(bi, buf);
          if (bi == 4) {
            MbarWait(empty + 2 * buf + (buf ^ 1), parity);
          }
          if (lane == 0) {
            MbarArriveExpectTx(bar + blk, uint32_t(kSm90Keys * 128));
            if constexpr (kPaged) {
              for (int k = 0; k < kSm90Keys; k += box_keys)
                TmaLoad4d(dst + blk * (kSm90Keys * 128) + k * 128, &tm_kv, blk * 64, 0,
                          int(rows.Row(key0 + k)), int(rows.Page(key0 + k)), bar + blk);
            } else {
              TmaLoad4d(dst + blk * (kSm90Keys * 128), &tm_kv, blk * 64, 0, int(key0), int(kvb),
                        bar + blk);
            }
          } else {
            MbarArrive(bar + blk);
          }
        }
      } else {
        MbarWait(empty + 2 * buf + (buf ^ 1), parity);
#pragma unroll 4
        for (int c = lane; c < kSm90Keys * kChunks; c += 32) {
          const int rr = c / kChunks, cc = c % kChunks;
          const int64_t j = key0 + rr;
          // Keys past kv_len or on a skipped page are zero-filled, never read.
          int64_t off;
          const bool ok = rows.Locate(j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
          CpAsync16(dst + Swizzle128(kSm90Keys, rr, cc), kv_base + off + cc * 8, ok);
        }
#pragma unroll 1
        for (int blk = 0; blk < 9; ++blk) MbarArriveCpAsync(bar + blk);
      }
    }
    CpAsyncWait<0>();
    return;
  }

  // Consumers.
  SetMaxRegsInc<kSeesawConsumerRegs>();
  const int wg = warp / 4, wv = warp % 4;          // warpgroup; warp within it
  const int rl = wv * 16 + lane / 4, rh = rl + 8;  // this thread's two rows in the block
  const int64_t r_lo = row0 + rl, r_hi = row0 + rh;
  const int64_t n_lo = span.Visible(r_lo), n_hi = span.Visible(r_hi);
  if (n > 0) {
    constexpr int kChunks = kMlaDk / 8;
    const T* q_base = static_cast<const T*>(p.q) + (b * R + row0) * kMlaDk;
    for (int c = tid; c < kSm90Rows * kChunks; c += 256) {
      const int rr = c / kChunks, cc = c % kChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + Swizzle128(kSm90Rows, rr, cc), q_base + (ok ? rr : 0) * kMlaDk + cc * 8, ok);
    }
    CpAsyncCommit();
    CpAsyncWait<0>();
    FenceProxyAsync();
  }
  SeesawBarrier(1, 256);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = SmemAddr(s_q), kv_addr = SmemAddr(s_kv);
  auto tile_addr = [&](int buf) { return kv_addr + buf * kSm90TileBytes; };
  auto p_addr = [&](int buf) { return tile_addr(buf) + 8 * (kSm90Keys * 128); };
  // Lane 0 of each consumer warp releases tile i's buffer (only if a later
  // tile is loaded into it) once this warp's P V of tile i has completed.
  auto release = [&](int i) {
    if (i + 2 < n && lane == 0) MbarArrive(empty + 2 * (i & 1) + wg);
  };
  // S_i = Q K_i^T over the column blocks [bi0, bi1) in SeesawBlock order (the
  // whole tile by default), one wgmma group.
  auto issue_s = [&](int i, int bi0 = 0, int bi1 = 9) {
    const int buf = i & 1;
    const uint32_t parity = uint32_t(i >> 1) & 1;
    const bool fence = !by_tma(i);  // cp.async (generic proxy) writes -> wgmma reads
    const uint32_t tile = tile_addr(buf);
    Sm90Touch(s);
    WgmmaFence();
#pragma unroll
    for (int bi = bi0; bi < bi1; ++bi) {
      const int blk = SeesawBlock(bi, buf);
      MbarWait(full + buf * 9 + blk, parity);
      if (fence) FenceProxyAsync();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t off = blk * (kSm90Rows * 128) + 32 * k;
        WgmmaN64<T>(s, SmemDesc128(q_addr + off, 16, 1024), SmemDesc128(tile + off, 16, 1024),
                    bi > 0 || k > 0);
      }
    }
    WgmmaCommit();
  };
  auto issue_pv = [&](int buf) {
    Sm90Touch(o);  // the rescale stays before the fence
    WgmmaFence();
#pragma unroll
    for (int k = 0; k < kSm90Keys / 16; ++k)
      WgmmaN256<T, 1>(o, SmemDesc128(p_addr(buf) + 32 * k, 16, 1024),
                      SmemDesc128(tile_addr(buf) + wg * 4 * (kSm90Keys * 128) + 2048 * k,
                                  kSm90Keys * 128, 1024),
                      1);
    WgmmaCommit();
  };
  auto rescale = [&](float al_lo, float al_hi) { ScaleRows(o, al_lo, al_hi); };

  // (D) up to P_j V_j: softmax of S_j (each row's keys past its
  // visible count masked) on the chain's m, P_j into the tile's rope block,
  // alpha_j and m_j published (pready), the row sums updated; alpha_j comes back.
  auto softmax_publish = [&](int j, float& al_lo, float& al_hi) {
    const int buf = j & 1;
    const int64_t key0 = (t_begin + j) * kSm90Keys + 2 * (lane % 4);
    const int64_t lim_lo64 = n_lo - key0, lim_hi64 = n_hi - key0;
    const int lim_lo = lim_lo64 < 0 ? 0 : (lim_lo64 > 64 ? 64 : int(lim_lo64));
    const int lim_hi = lim_hi64 < 0 ? 0 : (lim_hi64 > 64 ? 64 : int(lim_hi64));
    // Keys on skipped pages (only in tiles the cp.async path loaded); keys
    // key0 + 8jj and + 1 share a page (page sizes are even).
    bool live[8];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) live[jj] = true;
    if constexpr (kPaged) {
      if (!by_tma(j)) {
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
          live[jj] = key0 + 8 * jj >= kv_len || rows.Live(key0 + 8 * jj);
      }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[4 * jj + e] = live[jj] && 8 * jj + e < lim_lo ? s[4 * jj + e] * scale_log2 : -INFINITY;
        s[4 * jj + 2 + e] =
            live[jj] && 8 * jj + e < lim_hi ? s[4 * jj + 2 + e] * scale_log2 : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[4 * jj + e]);
        mx_hi = fmaxf(mx_hi, s[4 * jj + 2 + e]);
      }
    }
    QuadRowMax(mx_lo, mx_hi);
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const MaxStep st = StepMax(m_lo, m_hi, mn_lo, mn_hi);
    const float mu_lo = st.mu_lo, mu_hi = st.mu_hi;
    al_lo = st.al_lo;
    al_hi = st.al_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
    char* s_p = s_kv + buf * kSm90TileBytes + 8 * (kSm90Keys * 128);
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const float p0 = Exp2(s[4 * jj] - mu_lo), p1 = Exp2(s[4 * jj + 1] - mu_lo);
      const float p2 = Exp2(s[4 * jj + 2] - mu_hi), p3 = Exp2(s[4 * jj + 3] - mu_hi);
      sum_lo += p0 + p1;
      sum_hi += p2 + p3;
      *reinterpret_cast<uint32_t*>(s_p + Swizzle128(kSm90Rows, rl, jj) + 4 * (lane % 4)) =
          PackPair<T>(p0, p1);
      *reinterpret_cast<uint32_t*>(s_p + Swizzle128(kSm90Rows, rh, jj) + 4 * (lane % 4)) =
          PackPair<T>(p2, p3);
    }
    if (lane % 4 == 0) {
      s_alpha[buf * kSm90Rows + rl] = al_lo;
      s_alpha[buf * kSm90Rows + rh] = al_hi;
      s_m[buf * kSm90Rows + rl] = mn_lo;
      s_m[buf * kSm90Rows + rh] = mn_hi;
    }
    FenceProxyAsync();
    MbarArrive(pready + buf);
    SeesawBarrier(2 + wg, 128);  // this warpgroup's P is complete for its own wgmma
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
  };

  // (B): the other warpgroup's tile j - 1: wait for its P, take alpha and m
  // (m_{j-1}, the chain), then (with this warpgroup's wgmmas retired) rescale
  // and issue this warpgroup's P V of it.
  auto other_scale = [&](int j, float& al_lo, float& al_hi) {
    const int ob = (j - 1) & 1;
    MbarWait(pready + ob, uint32_t((j - 1) >> 1) & 1);
    if (!by_tma(j - 1)) FenceProxyAsync();
    al_lo = s_alpha[ob * kSm90Rows + rl];
    al_hi = s_alpha[ob * kSm90Rows + rh];
    m_lo = s_m[ob * kSm90Rows + rl];
    m_hi = s_m[ob * kSm90Rows + rh];
  };
  auto other_pv = [&](int j, float al_lo, float al_hi) {
    rescale(al_lo, al_hi);
    l_lo *= al_lo;
    l_hi *= al_hi;
    issue_pv((j - 1) & 1);
  };
  // Each wgmma group is waited for in the branch that issued it, before the
  // loop's back edge, and no accumulator is rescaled while a group is pending:
  // otherwise ptxas serializes every wgmma of the kernel (C7515; seen with P V
  // in flight across the back edge: a wait after every HGMMA, 0.98 ms instead
  // of 0.94 for the key-split kernel at 128,128,8192).
  for (int j = wg; n > 0 && j - 1 < n; j += 2) {  // n > 0: then j >= n means j >= 1
    float bl_lo = 1.f, bl_hi = 1.f;
    if (j < n) {
      issue_s(j, 0, 4);  // (A) this warpgroup's column blocks, loaded first
      if (j >= 1) {
        // (B) the other's tile j - 1, waited for at once: that releases
        // this warpgroup's half of buffer j - 1 before it waits for more data.
        other_scale(j, bl_lo, bl_hi);
        WgmmaWait<0>();
        Sm90Touch(s);
        other_pv(j, bl_lo, bl_hi);
        WgmmaWait<0>();
        Sm90Touch(o);
        release(j - 1);
      }
      issue_s(j, 4, 9);  // (C) the rest of S_j
      WgmmaWait<0>();
      Sm90Touch(s);
      Sm90Touch(o);
      // (D)
      float al_lo, al_hi;
      softmax_publish(j, al_lo, al_hi);
      rescale(al_lo, al_hi);
      issue_pv(j & 1);
      WgmmaWait<0>();  // before the loop's back edge (see above)
      Sm90Touch(o);
      release(j);
    } else {
      other_scale(j, bl_lo, bl_hi);
      other_pv(j, bl_lo, bl_hi);
      WgmmaWait<0>();
      Sm90Touch(o);
    }
  }
  WgmmaWait<0>();
  Sm90Touch(o);

  // Row sums: the quad's lanes, then the two warpgroups (both end on the same m).
  QuadRowSum(l_lo, l_hi);
  if (lane % 4 == 0) {
    s_sum[wg * kSm90Rows + rl] = l_lo;
    s_sum[wg * kSm90Rows + rh] = l_hi;
  }
  // An mbarrier (arrive releases, the wait acquires) rather than bar.sync 1:
  // compute-sanitizer racecheck flagged this exchange across the named
  // barrier (32 hazards, write and read on either side of the BAR.SYNC).
  MbarArrive(sums_ready);
  MbarWait(sums_ready, 0);
  const float sum_lo = s_sum[rl] + s_sum[kSm90Rows + rl];
  const float sum_hi = s_sum[rh] + s_sum[kSm90Rows + rh];
  MlaSm90StoreRows<T>(p, o, b, split, r_lo, r_hi, wg, lane, m_lo, m_hi, sum_lo, sum_hi);
#endif
}

// Launches the seesaw kernel over the cache rows (or pages) `tm_kv` maps
// (MlaKvMap, mla_launch.h); the caller launches the combine. Only where
// RunsSm90a().
template <typename T, bool kPaged>
cudaError_t LaunchMlaSm90Seesaw(const AttentionParams& p, const CUtensorMap& tm_kv,
                                cudaStream_t stream) {
  auto kernel = MlaSm90SeesawKernel<T, kPaged>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSeesawSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * p.heads_q;
  const dim3 grid(unsigned((rows + kSm90Rows - 1) / kSm90Rows), unsigned(p.num_splits),
                  unsigned(p.batch));
  kernel<<<grid, kSeesawThreads, kSeesawSmem, stream>>>(p, tm_kv);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
