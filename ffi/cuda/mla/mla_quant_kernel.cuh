// flash_mla over an 8-bit latent cache (q8_0, q8_kv; ffi/common/quant_format.h)
// or an fp8_e4m3 one (below),
// read in place: the int8 values and the scales of each KV tile are staged in
// shared memory by cp.async, K and V from the same rows (V = the first 512
// columns, block-aligned), as in the float kernel (mla_kernel.cuh), whose
// block layout (G row groups of 4 warps, 16 query rows per group, 32-key
// tiles, split-KV partials) and tile loop (MlaTileKernel) these sources
// (MlaQ8Tiles, MlaFp8Tiles) plug into.
//
// Semantics (quant_format.h, QuantizesQueries): the query rows are scaled and
// rounded to 8 bits per block of 32 with q8_0's rule and a float32 scale,
// once per thread block, into shared memory. Then per KV tile:
//   S = Q K^T    on int8 tensor cores (mma.sync m16n8k32, s32 accumulation):
//                one 32-value block per mma, exact integer dot products, each
//                scaled by (query block scale * key block scale) in float32;
//                warp w of a group scores keys [8w, 8w + 8).
//   V            the tile's first 512 columns are dequantized once, d * q in
//                float32 (the value jax_mla.dequantize computes), rounded to
//                the input type into a shared-memory tile.
//   softmax, O += P V   exactly as the float kernel (P and V in the input type
//                on the tensor cores, float32 accumulation).
// A paged cache (kPaged) is read in place like the float kernel's: values
// and scales through the block table, skipped pages zero-filled and masked.
//
// Over fp8_e4m3 (MlaFp8Tiles) nothing is rounded but the cache's values to
// the input type: each staged tile's 576 columns are converted in registers,
// d * value in float32 (the value jax_mla.dequantize computes), rounded to T
// into one shared-memory tile that serves as K and V, and the rest is the
// float kernel's (Q in T, S = Q K^T and O += P V on f16/bf16 tensor cores):
// the result is the float kernel's over jax_mla.dequantize(kv, T).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/common/quant_format.h"
#include "ffi/cuda/common/cache_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/q8_tile.cuh"
#include "ffi/cuda/mla/mla_config.h"
#include "ffi/cuda/mla/mla_kernel.cuh"

namespace jax_mla::cuda {

// The 8-bit integer source (q8_0, q8_kv): the int8 rows and their scales
// staged as they are; Q rounded to 8 bits once per block; per tile V
// dequantized into s_v, S = Q K^T on int8 tensor cores.
template <typename T, int G, QFormat F, bool Paged>
struct MlaQ8Tiles {
  using Elem = T;
  using Shape = MlaQuantShape<G, F>;
  static constexpr int kGroups = G, kStages = Shape::kStages, kMinBlocks = Shape::kMinBlocks;
  static constexpr bool kPaged = Paged;
  static constexpr size_t kSmem = Shape::kSmem;
  static constexpr int kThreads = Shape::kThreads;
  static constexpr int kScaleBytes = MlaScaleBytes<F>::value;

  char* s_q;     // [16G][576] int8 (+pad)
  float* s_qd;   // [16G][20]
  char* s_kv;    // stage s: [32][576] int8 (+pad), then [32] scales
  char* s_v;     // [32][512] T (+pad)
  char* s_p;     // [G][16][32] (+pad)
  float* s_max;  // [G][4][16]
  float* s_sum;  // [G][4][16]
  int64_t d_batch_bytes;
  const char* qs_base;
  const char* d_base;
  const char* q_frag;
  const float* qd_lo;
  const float* qd_hi;

  __device__ __forceinline__ MlaQ8Tiles(const AttentionParams& p, char* smem, int64_t b, int grp,
                                        int lane) {
    s_q = smem;
    s_qd = reinterpret_cast<float*>(s_q + Shape::kRows * kMlaQsRowBytes);
    s_kv = reinterpret_cast<char*>(s_qd + Shape::kRows * kMlaQdStride);
    s_v = s_kv + kStages * Shape::kStageBytes;
    s_p = s_v + kMlaKeys * kMlaVRowBytes;
    s_max = reinterpret_cast<float*>(s_p + G * 16 * kMlaPRowBytes);
    s_sum = s_max + G * 64;
    // Scale strides count scales: float16 (q8_0) or float32 (q8_kv).
    d_batch_bytes = p.k.scale_batch_stride * (F == QFormat::kQ8_0 ? 2 : 4);
    qs_base = CacheRows<kPaged>::template Base<char>(p.k.data, b, p.kv_batch, p.k.batch_stride);
    d_base = CacheRows<kPaged>::template Base<char>(p.k.scales, b, p.kv_batch, d_batch_bytes);
    q_frag = s_q + (grp * 16 + lane % 16) * kMlaQsRowBytes + (lane / 16) * 16;
    qd_lo = s_qd + (grp * 16 + lane / 4) * kMlaQdStride;
    qd_hi = qd_lo + 8 * kMlaQdStride;
  }
  // The query was scaled before rounding: only the base-2 factor is left.
  __device__ __forceinline__ float ScoreScale(const AttentionParams&) const { return kLog2e; }
  __device__ __forceinline__ void LoadQuery(const AttentionParams&, int64_t, int64_t, int) {}
  // The block's query rows, scaled and rounded to 8 bits per block of 32
  // (RoundQueryToQ8's arithmetic, float32, IEEE division and reciprocal),
  // while the first tiles load.
  __device__ __forceinline__ void PrepareQuery(const AttentionParams& p, int64_t b, int64_t row0,
                                               int tid) {
    const int64_t R = p.seq_q * p.heads_q;
    const T* q_base = static_cast<const T*>(p.q) + (b * R + row0) * kMlaDk;
    for (int it = tid; it < Shape::kRows * kMlaBlocks; it += kThreads) {
      const int rr = it / kMlaBlocks, kb = it % kMlaBlocks;
      uint32_t packed[8];
      const float d =
          RoundQ8Block<T>(q_base + rr * kMlaDk + kb * 32, p.scale, row0 + rr < R, packed);
      uint4* dst = reinterpret_cast<uint4*>(s_q + rr * kMlaQsRowBytes + kb * 32);
      dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
      s_qd[rr * kMlaQdStride + kb] = d;
    }
  }
  __device__ __forceinline__ const char* Tile(int stage) const {
    return s_kv + stage * Shape::kStageBytes;
  }
  __device__ __forceinline__ void LoadTile(const AttentionParams& p, const CacheRows<kPaged>& rows,
                                           const TilePages<kMlaKeys>& pages, int64_t t, int stage,
                                           int64_t kv_len, int tid) {
    char* dst = s_kv + stage * Shape::kStageBytes;
    for (int c = tid; c < kMlaKeys * kMlaQsChunks; c += kThreads) {
      const int rr = c / kMlaQsChunks, cc = c % kMlaQsChunks;
      const int64_t j = t * kMlaKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(pages, rr, j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + rr * kMlaQsRowBytes + cc * 16, qs_base + off + cc * 16, ok);
    }
    char* d_dst = dst + kMlaKeys * kMlaQsRowBytes;
    constexpr int kWords = kScaleBytes / 4;  // 4-byte words of scales per key
    for (int c = tid; c < kMlaKeys * kWords; c += kThreads) {
      const int rr = c / kWords, ww = c % kWords;
      const int64_t j = t * kMlaKeys + rr;
      int64_t off;
      const bool ok = rows.Locate(pages, rr, j, kv_len, d_batch_bytes, kScaleBytes, &off);
      CpAsync4(d_dst + rr * kScaleBytes + ww * 4, d_base + off + ww * 4, ok);
    }
  }
  // V = d * q for the first 512 columns, into s_v in the input type.
  // (Unrolled: every thread's 16-byte loads are in flight together.)
  __device__ __forceinline__ void PrepareTile(int stage, int tid) {
    const char* tile = Tile(stage);
    const char* tile_d = tile + kMlaKeys * kMlaQsRowBytes;
#pragma unroll
    for (int i = 0; i < kMlaKeys * (kMlaDv / 16) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int rr = c / (kMlaDv / 16), cc = c % (kMlaDv / 16);
      const uint4 raw = *reinterpret_cast<const uint4*>(tile + rr * kMlaQsRowBytes + cc * 16);
      const float d =
          F == QFormat::kQ8_0
              ? __half2float(reinterpret_cast<const __half*>(tile_d + rr * kScaleBytes)[cc / 2])
              : *reinterpret_cast<const float*>(tile_d + rr * kScaleBytes);
      const uint32_t w[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u,
                             raw.w ^ 0x80808080u};
      uint32_t out[8];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        out[i] = PackPair<T>(ByteToFloat(w[i / 2], 2 * (i % 2)) * d,
                             ByteToFloat(w[i / 2], 2 * (i % 2) + 1) * d);
      uint4* dst = reinterpret_cast<uint4*>(s_v + rr * kMlaVRowBytes + cc * 32);
      dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
      dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    }
  }
  // S = Q K^T, one 32-value block per int8 mma, scaled per block.
  __device__ __forceinline__ void Scores(int stage, int wg, int lane, float (&sc)[4]) const {
    const char* tile = Tile(stage);
    const char* tile_d = tile + kMlaKeys * kMlaQsRowBytes;
    const int key0 = wg * 8 + 2 * (lane % 4);  // this thread's two keys in the tile
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] = 0.f;
    const char* k_frag = tile + (wg * 8 + lane % 8) * kMlaQsRowBytes + (lane / 8) * 16;
    const char* kd0 = tile_d + key0 * kScaleBytes;
    const char* kd1 = kd0 + kScaleBytes;
#pragma unroll
    for (int kb = 0; kb < kMlaBlocks; kb += 2) {
      uint32_t a0[4], a1[4], bk[4];
      LdMatrixX4(a0, q_frag + kb * 32);
      LdMatrixX4(a1, q_frag + (kb + 1) * 32);
      LdMatrixX4(bk, k_frag + kb * 32);
      int c0[4], c1[4];
      MmaS8(c0, a0, bk[0], bk[1], kMagicInt);
      MmaS8(c1, a1, bk[2], bk[3], kMagicInt);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = kb + h;
        const int* c = h ? c1 : c0;
        const float dlo = qd_lo[k], dhi = qd_hi[k];
        float e0 = dlo, e1 = dlo, e2 = dhi, e3 = dhi;
        if constexpr (F == QFormat::kQ8_0) {
          const float k0 = __half2float(reinterpret_cast<const __half*>(kd0)[k]);
          const float k1 = __half2float(reinterpret_cast<const __half*>(kd1)[k]);
          e0 *= k0;
          e1 *= k1;
          e2 *= k0;
          e3 *= k1;
        }
        sc[0] = fmaf(__int_as_float(c[0]) - kMagicFloat, e0, sc[0]);
        sc[1] = fmaf(__int_as_float(c[1]) - kMagicFloat, e1, sc[1]);
        sc[2] = fmaf(__int_as_float(c[2]) - kMagicFloat, e2, sc[2]);
        sc[3] = fmaf(__int_as_float(c[3]) - kMagicFloat, e3, sc[3]);
      }
    }
    if constexpr (F == QFormat::kQ8KV) {  // one scale per key
      const float k0 = *reinterpret_cast<const float*>(kd0);
      const float k1 = *reinterpret_cast<const float*>(kd1);
      sc[0] *= k0;
      sc[1] *= k1;
      sc[2] *= k0;
      sc[3] *= k1;
    }
  }
  // P of the group's warps and the whole block's V conversion are visible after this.
  __device__ __forceinline__ void SyncP(int) const { __syncthreads(); }
  // V = columns [128 wg, 128 wg + 128) of the dequantized tile.
  __device__ __forceinline__ void Pv(float (&o)[16][4], const char* p_frag, int, int wg,
                                     int lane) const {
    MlaPvTile<T, kMlaVRowBytes>(o, p_frag, s_v, wg, lane);
  }
};

// Two e4m3 bytes (the low 16 bits of `pair`, the first in the low byte) as
// floats, exactly. sm_89+ converts them in one instruction; before it the
// bits of each magnitude shifted left by 7 are a float16 of value * 2^-8
// (quant_format.h; subnormals included), the sign goes to bit 15 and the NaN
// bytes (0x7F, 0xFF) get an all-ones exponent.
__device__ __forceinline__ float2 E4M3x2ToFloat2(uint32_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"(uint16_t(pair)));
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
#else
  const uint32_t t = __byte_perm(pair, 0u, 0x4140u);  // byte i into 16-bit lane i
  const uint32_t mag = t & 0x007F007Fu;
  const uint32_t nan = __vcmpeq2(mag, 0x007F007Fu) & 0x7C007C00u;
  const uint32_t h = (mag << 7) | ((t & 0x00800080u) << 8) | nan;
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return make_float2(f.x * 256.f, f.y * 256.f);
#endif
}

// The fp8_e4m3 source: the e4m3 rows and their float32 scales staged as they
// are; per tile all 576 columns converted to d * value in T into s_t, which
// then serves as K and V exactly as the float source's tile does.
template <typename T, int G, bool Paged>
struct MlaFp8Tiles {
  using Elem = T;
  using Shape = MlaQuantShape<G, QFormat::kFP8E4M3>;
  static constexpr int kGroups = G, kStages = Shape::kStages, kMinBlocks = Shape::kMinBlocks;
  static constexpr bool kPaged = Paged;
  static constexpr size_t kSmem = Shape::kSmem;
  static constexpr int kThreads = Shape::kThreads;

  char* s_q;     // [16G][576] T (+pad)
  char* s_kv;    // stage s: [32][576] e4m3 (+pad), [32] d
  char* s_t;     // [32][576] T (+pad)
  char* s_p;     // [G][16][32] (+pad)
  float* s_max;  // [G][4][16]
  float* s_sum;  // [G][4][16]
  int64_t d_batch_bytes;
  const char* qs_base;
  const char* d_base;
  const char* q_frag;

  __device__ __forceinline__ MlaFp8Tiles(const AttentionParams& p, char* smem, int64_t b, int grp,
                                         int lane) {
    s_q = smem;
    s_kv = s_q + Shape::kRows * kMlaRowBytes;
    s_t = s_kv + kStages * Shape::kStageBytes;
    s_p = s_t + kMlaKeys * kMlaRowBytes;
    s_max = reinterpret_cast<float*>(s_p + G * 16 * kMlaPRowBytes);
    s_sum = s_max + G * 64;
    d_batch_bytes = p.k.scale_batch_stride * 4;  // float32 scales
    qs_base = CacheRows<kPaged>::template Base<char>(p.k.data, b, p.kv_batch, p.k.batch_stride);
    d_base = CacheRows<kPaged>::template Base<char>(p.k.scales, b, p.kv_batch, d_batch_bytes);
    q_frag = s_q + (grp * 16 + lane % 16) * kMlaRowBytes + (lane / 16) * 16;
  }
  __device__ __forceinline__ float ScoreScale(const AttentionParams& p) const {
    return p.scale * kLog2e;
  }
  // Q (in its type) goes with the first tile's group.
  __device__ __forceinline__ void LoadQuery(const AttentionParams& p, int64_t b, int64_t row0,
                                            int tid) {
    MlaStageQuery<T, Shape::kRows, kThreads>(p, s_q, b, row0, tid);
  }
  __device__ __forceinline__ void PrepareQuery(const AttentionParams&, int64_t, int64_t, int) {}
  __device__ __forceinline__ void LoadTile(const AttentionParams& p, const CacheRows<kPaged>& rows,
                                           const TilePages<kMlaKeys>& pages, int64_t t, int stage,
                                           int64_t kv_len, int tid) {
    char* dst = s_kv + stage * Shape::kStageBytes;
    for (int c = tid; c < kMlaKeys * kMlaQsChunks; c += kThreads) {
      const int rr = c / kMlaQsChunks, cc = c % kMlaQsChunks;
      const int64_t j = t * kMlaKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(pages, rr, j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + rr * kMlaQsRowBytes + cc * 16, qs_base + off + cc * 16, ok);
    }
    char* d_dst = dst + kMlaKeys * kMlaQsRowBytes;
    for (int rr = tid; rr < kMlaKeys; rr += kThreads) {
      int64_t off;
      const bool ok = rows.Locate(pages, rr, t * kMlaKeys + rr, kv_len, d_batch_bytes, 4, &off);
      CpAsync4(d_dst + rr * 4, d_base + off, ok);
    }
  }
  // The tile's rows as d * value, rounded to T: 16 values per step; the
  // whole block's conversion is visible after the barrier.
  __device__ __forceinline__ void PrepareTile(int stage, int tid) {
    const char* tile = s_kv + stage * Shape::kStageBytes;
    const char* tile_d = tile + kMlaKeys * kMlaQsRowBytes;
    for (int c = tid; c < kMlaKeys * kMlaQsChunks; c += kThreads) {
      const int rr = c / kMlaQsChunks, cc = c % kMlaQsChunks;
      const uint4 raw = *reinterpret_cast<const uint4*>(tile + rr * kMlaQsRowBytes + cc * 16);
      const float d = *reinterpret_cast<const float*>(tile_d + rr * 4);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      uint32_t out[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float2 f = E4M3x2ToFloat2(w[i / 2] >> (16 * (i % 2)));
        out[i] = PackPair<T>(f.x * d, f.y * d);
      }
      uint4* dst = reinterpret_cast<uint4*>(s_t + rr * kMlaRowBytes + cc * 32);
      dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
      dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    }
    __syncthreads();
  }
  // From here on the float source's step over s_t.
  __device__ __forceinline__ void Scores(int, int wg, int lane, float (&sc)[4]) const {
    MlaScoresT<T>(q_frag, s_t, wg, lane, sc);
  }
  __device__ __forceinline__ void SyncP(int bar) const { NamedBarrier(bar, 128); }
  __device__ __forceinline__ void Pv(float (&o)[16][4], const char* p_frag, int, int wg,
                                     int lane) const {
    MlaPvTile<T, kMlaRowBytes>(o, p_frag, s_t, wg, lane);
  }
};

// Launches the kernel for one (dtype, G, format, paged or not); the caller
// launches the combine.
template <typename T, int G, QFormat F, bool kPaged>
cudaError_t LaunchMlaQuant(const AttentionParams& p, cudaStream_t stream) {
  if constexpr (F == QFormat::kFP8E4M3)
    return LaunchMlaTiles<MlaFp8Tiles<T, G, kPaged>>(p, stream);
  else
    return LaunchMlaTiles<MlaQ8Tiles<T, G, F, kPaged>>(p, stream);
}

}  // namespace jax_mla::cuda
