// flash_mla for 64-row blocks on Hopper (sm_90a), the key-split kernel (taken
// instead of the seesaw kernel, mla_sm90_seesaw_kernel.cuh, where the cache's
// strides do not suit TMA): warpgroup MMAs (wgmma) with both operands in
// 128-byte-swizzled shared memory, so each K/V tile operand is read from
// shared memory once per 64-row warpgroup instead of once per 16-row warp (the bound of the
// mma.sync kernel, benchmarks/NOTES.md "CUDA 1").
//
// A block is 2 warpgroups (256 threads) and owns 64 query rows, (position,
// head) pairs of one batch row, like the mma.sync kernel's G = 4 blocks (so
// the split heuristic's work items are the same). KV tiles of 64 keys are
// staged by cp.async, two deep. Per tile:
//   S = Q K^T   warpgroup w scores keys [32w, 32w + 32) for all 64 rows
//               (wgmma m64n32k16 x 36, Q and K from shared memory);
//   softmax     row maxima exchanged between the two warpgroups through
//               shared memory (online softmax, float32, base-2 exponent);
//               P is written to shared memory in the input type, swizzled;
//   O += P V    warpgroup w accumulates output columns [256w, 256w + 256)
//               (wgmma m64n256k16 x 4, P K-major, V = the same tile read
//               MN-major in place: no V copy).
// Split-KV partials and the combine are the mma.sync kernel's. A paged cache
// (kPaged) is read like the mma.sync kernel's: rows through the block table
// (cache_rows.cuh), skipped pages zero-filled and masked.
//
// Shared-memory layout (PTX ISA "Shared Memory Matrix Layout", 128B swizzle):
// a [rows][576] tile is 9 column blocks of 64 elements, block b at b * rows *
// 128 bytes; row r of a block is 128 bytes with its 16-byte chunk c at
// (c ^ (r % 8)) * 16. K-major descriptors (Q, K, P): SBO 1024 (8 rows), the
// k-th 16-wide slice at 32 * (k % 4) bytes into block k / 4. MN-major (V):
// LBO = the block stride (64 * 128), SBO 1024 (8 keys), the k-th 16-key slice
// 2048 * k bytes in. Accumulators of m64nNk16: warp v of the warpgroup holds
// rows 16v + lane/4 (lo) and + 8 (hi); d[4j + e] is (lo, column 8j + 2(lane%4)
// + e) and d[4j + 2 + e] the same column of hi.
//
// Everything that emits sm_90a instructions compiles to nothing outside
// __CUDA_ARCH_FEAT_SM90_ALL; the host launches this kernel only where
// RunsSm90a() (device.h, mla.cu), the mma.sync kernel elsewhere.
#pragma once

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
#include "ffi/cuda/mla/mla_kernel.cuh"

namespace jax_mla::cuda {

constexpr int kSm90Threads = 256;                                 // two warpgroups
constexpr int kSm90TileBytes = kSm90Keys * kMlaDk * 2;            // one [64][576] tile: 73728
constexpr size_t kSm90Smem = 2 * size_t(kSm90TileBytes) +         // K/V, two stages
                             size_t(kSm90TileBytes) +             // Q
                             kSm90Rows * 128 +                    // P [64][64]
                             2 * 2 * kSm90Rows * sizeof(float) +  // row max, row sum per warpgroup
                             1024;                                // alignment slack

// A warpgroup's m64n256 accumulator (its two rows' 128 values a thread)
// rescaled by each row's alpha, in both sm_90a MLA kernels.
__device__ __forceinline__ void ScaleRows(float (&o)[128], float al_lo, float al_hi) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j] *= al_lo;
    o[4 * j + 1] *= al_lo;
    o[4 * j + 2] *= al_hi;
    o[4 * j + 3] *= al_hi;
  }
}

// The end of a 64-row block of the sm_90a MLA kernels (both): this
// warpgroup's 256 output columns of its rows r_lo, r_hi divided by the row
// sums, stored as the output (one split) or the split's float32 partial, and
// the LSE (warpgroup 0).
template <typename T>
__device__ __forceinline__ void MlaSm90StoreRows(const AttentionParams& p, const float (&o)[128],
                                                 int64_t b, int split, int64_t r_lo, int64_t r_hi,
                                                 int wg, int lane, float m_lo, float m_hi,
                                                 float sum_lo, float sum_hi) {
  MlaStoreNormalized<T, 32>(p, o, b, split, r_lo, r_hi, wg * 256 + 2 * (lane % 4),
                            wg == 0 && lane % 4 == 0, m_lo, m_hi, sum_lo, sum_hi);
}

template <typename T, bool kPaged>
__global__ void __launch_bounds__(kSm90Threads, 1) MlaSm90Kernel(const AttentionParams p) {
#ifdef JAX_MLA_SM90A
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);  // swizzle atoms
  char* s_kv = smem;                                                      // [2][64][576] swizzled
  char* s_q = s_kv + 2 * kSm90TileBytes;                                  // [64][576] swizzled
  char* s_p = s_q + kSm90TileBytes;                                       // [64][64] swizzled
  float* s_max = reinterpret_cast<float*>(s_p + kSm90Rows * 128);         // [2][64]
  float* s_sum = s_max + 2 * kSm90Rows;                                   // [2][64]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4, wv = warp % 4;  // warpgroup; warp within it
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t H = p.heads_q, Sq = p.seq_q, R = Sq * H;
  const int64_t row0 = int64_t(blockIdx.x) * kSm90Rows;
  const MlaBlockKeys<kSm90Keys> span(p, b, split, row0, kSm90Rows);
  const int64_t kv_len = span.kv_len, t_begin = span.t_begin, t_end = span.t_end;
  const int rl = wv * 16 + lane / 4, rh = rl + 8;  // this thread's two rows in the block
  const int64_t r_lo = row0 + rl, r_hi = row0 + rh;
  const int64_t n_lo = span.Visible(r_lo), n_hi = span.Visible(r_hi);

  constexpr int kChunks = kMlaDk / 8;  // 16-byte chunks per row
  const CacheRows<kPaged> rows(p.k, b);
  const T* kv_base = CacheRows<kPaged>::template Base<T>(p.k.data, b, p.kv_batch, p.k.batch_stride);
  // Rows addressed through the tile's table entries (paged), read a tile
  // ahead: no copy waits on a block-table load.
  auto load_tile = [&](int64_t t, int stage, const TilePages<kSm90Keys>& pages) {
    char* dst = s_kv + stage * kSm90TileBytes;
    for (int c = tid; c < kSm90Keys * kChunks; c += kSm90Threads) {
      const int rr = c / kChunks, cc = c % kChunks;
      const int64_t j = t * kSm90Keys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(pages, rr, j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + Swizzle128(kSm90Keys, rr, cc), kv_base + off + cc * 8, ok);
    }
  };
  if (t_begin < t_end) {
    const T* q_base = static_cast<const T*>(p.q) + (b * R + row0) * kMlaDk;
    for (int c = tid; c < kSm90Rows * kChunks; c += kSm90Threads) {
      const int rr = c / kChunks, cc = c % kChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + Swizzle128(kSm90Rows, rr, cc), q_base + (ok ? rr : 0) * kMlaDk + cc * 8, ok);
    }
    load_tile(t_begin, 0, rows.template Fetch<kSm90Keys>(t_begin * kSm90Keys, kv_len));
  }
  CpAsyncCommit();
  // Paged: the entries of the next tile to copy, and of this thread's keys
  // (two 16-key runs: keys [32 wg, 32 wg + 32) of a tile) in the next tile to
  // score, each read one tile before it is used.
  TilePages<kSm90Keys> ahead = rows.template Fetch<kSm90Keys>((t_begin + 1) * kSm90Keys, kv_len);
  const int key_in_tile = wg * 32 + 2 * (lane % 4);  // + 8j, j < 4: this thread's keys
  int32_t live_ahead[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    live_ahead[h] = rows.Entry(t_begin * kSm90Keys + key_in_tile + 16 * h, kv_len);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = SmemAddr(s_q), kv_addr = SmemAddr(s_kv), p_addr = SmemAddr(s_p);

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int stage = int(t - t_begin) % 2;
    CpAsyncWait<0>();
    FenceProxyAsync();
    __syncthreads();
    const uint32_t tile = kv_addr + stage * kSm90TileBytes;

    // S = Q K^T for this warpgroup's 32 keys.
    float s[16];
    WgmmaFence();
#pragma unroll
    for (int k = 0; k < kMlaDk / 16; ++k) {
      const uint32_t off = (k / 4) * (kSm90Rows * 128) + 32 * (k % 4);
      WgmmaN32<T, 0>(s, SmemDesc128(q_addr + off, 16, 1024),
                     SmemDesc128(tile + off + wg * 32 * 128, 16, 1024), k > 0);
    }
    WgmmaCommit();
    // The next tile's copies are issued while the tensor cores work (its
    // stage was last read by the previous PV, finished before the barrier).
    if (t + 1 < t_end) load_tile(t + 1, stage ^ 1, ahead);
    CpAsyncCommit();
    ahead = rows.template Fetch<kSm90Keys>((t + 2) * kSm90Keys, kv_len);
    int32_t live_entry[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      live_entry[h] = live_ahead[h];
      live_ahead[h] = rows.Entry((t + 1) * kSm90Keys + key_in_tile + 16 * h, kv_len);
    }
    WgmmaWait<0>();
    Sm90Touch(s);

    const int64_t key0 = t * kSm90Keys + key_in_tile;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Keys key0 + 8j and + 1 share a page (page sizes are even), in run j / 2.
      const bool live = key0 + 8 * j >= kv_len || rows.Valid(live_entry[j / 2]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t key = key0 + 8 * j + e;
        s[4 * j + e] = live && key < n_lo ? s[4 * j + e] * scale_log2 : -INFINITY;
        s[4 * j + 2 + e] = live && key < n_hi ? s[4 * j + 2 + e] * scale_log2 : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[4 * j + e]);
        mx_hi = fmaxf(mx_hi, s[4 * j + 2 + e]);
      }
    }
    QuadRowMax(mx_lo, mx_hi);
    if (lane % 4 == 0) {
      s_max[wg * kSm90Rows + rl] = mx_lo;
      s_max[wg * kSm90Rows + rh] = mx_hi;
    }
    NamedBarrier(1, kSm90Threads);
    const float mn_lo = fmaxf(m_lo, fmaxf(s_max[rl], s_max[kSm90Rows + rl]));
    const float mn_hi = fmaxf(m_hi, fmaxf(s_max[rh], s_max[kSm90Rows + rh]));
    const MaxStep st = StepMax(m_lo, m_hi, mn_lo, mn_hi);
    const float mu_lo = st.mu_lo, mu_hi = st.mu_hi;
    const float al_lo = st.al_lo, al_hi = st.al_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float p0 = Exp2(s[4 * j] - mu_lo), p1 = Exp2(s[4 * j + 1] - mu_lo);
      const float p2 = Exp2(s[4 * j + 2] - mu_hi), p3 = Exp2(s[4 * j + 3] - mu_hi);
      sum_lo += p0 + p1;
      sum_hi += p2 + p3;
      const int chunk = wg * 4 + j;  // keys [8 chunk, 8 chunk + 8) of the tile
      *reinterpret_cast<uint32_t*>(s_p + Swizzle128(kSm90Rows, rl, chunk) + 4 * (lane % 4)) =
          PackPair<T>(p0, p1);
      *reinterpret_cast<uint32_t*>(s_p + Swizzle128(kSm90Rows, rh, chunk) + 4 * (lane % 4)) =
          PackPair<T>(p2, p3);
    }
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
    ScaleRows(o, al_lo, al_hi);
    FenceProxyAsync();
    NamedBarrier(1, kSm90Threads);

    // O += P V for this warpgroup's 256 columns (4 column blocks of the tile).
    WgmmaFence();
#pragma unroll
    for (int k = 0; k < kSm90Keys / 16; ++k)
      WgmmaN256<T, 1>(
          o, SmemDesc128(p_addr + 32 * k, 16, 1024),
          SmemDesc128(tile + wg * 4 * (kSm90Keys * 128) + 2048 * k, kSm90Keys * 128, 1024), 1);
    WgmmaCommit();
    WgmmaWait<0>();
    Sm90Touch(o);
  }
  CpAsyncWait<0>();

  // Row sums: the quad's lanes, then the two warpgroups.
  QuadRowSum(l_lo, l_hi);
  if (lane % 4 == 0) {
    s_sum[wg * kSm90Rows + rl] = l_lo;
    s_sum[wg * kSm90Rows + rh] = l_hi;
  }
  NamedBarrier(1, kSm90Threads);
  const float sum_lo = s_sum[rl] + s_sum[kSm90Rows + rl];
  const float sum_hi = s_sum[rh] + s_sum[kSm90Rows + rh];
  MlaSm90StoreRows<T>(p, o, b, split, r_lo, r_hi, wg, lane, m_lo, m_hi, sum_lo, sum_hi);
#endif
}

// Launches the key-split kernel above (auto's choice when the cache's strides
// do not suit TMA; mla.cu). Only where RunsSm90a() (device.h).
template <typename T, bool kPaged>
cudaError_t LaunchMlaSm90Split(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(
      MlaSm90Kernel<T, kPaged>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSm90Smem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * p.heads_q;
  const dim3 grid(unsigned((rows + kSm90Rows - 1) / kSm90Rows), unsigned(p.num_splits),
                  unsigned(p.batch));
  MlaSm90Kernel<T, kPaged><<<grid, kSm90Threads, kSm90Smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
