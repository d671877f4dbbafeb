// flash_mla over an 8-bit latent cache (q8_0, q8_kv; ffi/common/quant_format.h)
// or an fp8_e4m3 one (below),
// read in place: the int8 values and the scales of each KV tile are staged in
// shared memory by cp.async, K and V from the same rows (V = the first 512
// columns, block-aligned), as in the float kernel (mla_kernel.cuh), whose
// block layout (G row groups of 4 warps, 16 query rows per group, 32-key
// tiles, split-KV partials) this kernel shares.
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
// Over fp8_e4m3 (MlaFp8Kernel) nothing is rounded but the cache's values to
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

template <typename T, int G, QFormat F, bool kPaged>
__global__ void __launch_bounds__(128 * G, (MlaQuantShape<G, F>::kMinBlocks))
    MlaQuantKernel(const AttentionParams p) {
  using Shape = MlaQuantShape<G, F>;
  constexpr int kThreads = Shape::kThreads, kStages = Shape::kStages;
  constexpr int kScaleBytes = MlaScaleBytes<F>::value;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem;  // [16G][576] int8 (+pad)
  float* s_qd = reinterpret_cast<float*>(s_q + Shape::kRows * kMlaQsRowBytes);  // [16G][20]
  char* s_kv = reinterpret_cast<char*>(s_qd + Shape::kRows * kMlaQdStride);
  // stage s: [32][576] int8 (+pad), then [32] scales
  char* s_v = s_kv + kStages * Shape::kStageBytes;                        // [32][512] T (+pad)
  char* s_p = s_v + kMlaKeys * kMlaVRowBytes;                             // [G][16][32] (+pad)
  float* s_max = reinterpret_cast<float*>(s_p + G * 16 * kMlaPRowBytes);  // [G][4][16]
  float* s_sum = s_max + G * 64;                                          // [G][4][16]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int grp = warp / 4, wg = warp % 4;
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t H = p.heads_q, Sq = p.seq_q, R = Sq * H;
  const int64_t row0 = int64_t(blockIdx.x) * Shape::kRows;
  const MlaBlockKeys<kMlaKeys> span(p, b, split, row0, Shape::kRows);
  const int64_t kv_len = span.kv_len, t_begin = span.t_begin, t_end = span.t_end;
  const int64_t r_lo = row0 + grp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = span.Visible(r_lo), n_hi = span.Visible(r_hi);

  const CacheRows<kPaged> rows(p.k, b);
  // Scale strides count scales: float16 (q8_0) or float32 (q8_kv).
  const int64_t d_batch_bytes = p.k.scale_batch_stride * (F == QFormat::kQ8_0 ? 2 : 4);
  const char* qs_base =
      CacheRows<kPaged>::template Base<char>(p.k.data, b, p.kv_batch, p.k.batch_stride);
  const char* d_base =
      CacheRows<kPaged>::template Base<char>(p.k.scales, b, p.kv_batch, d_batch_bytes);
  auto load_tile = [&](int64_t t, int stage) {
    char* dst = s_kv + stage * Shape::kStageBytes;
    for (int c = tid; c < kMlaKeys * kMlaQsChunks; c += kThreads) {
      const int rr = c / kMlaQsChunks, cc = c % kMlaQsChunks;
      const int64_t j = t * kMlaKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + rr * kMlaQsRowBytes + cc * 16, qs_base + off + cc * 16, ok);
    }
    char* d_dst = dst + kMlaKeys * kMlaQsRowBytes;
    constexpr int kWords = kScaleBytes / 4;  // 4-byte words of scales per key
    for (int c = tid; c < kMlaKeys * kWords; c += kThreads) {
      const int rr = c / kWords, ww = c % kWords;
      const int64_t j = t * kMlaKeys + rr;
      int64_t off;
      const bool ok = rows.Locate(j, kv_len, d_batch_bytes, kScaleBytes, &off);
      CpAsync4(d_dst + rr * kScaleBytes + ww * 4, d_base + off + ww * 4, ok);
    }
  };

  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    CpAsyncCommit();
  }

  // The block's query rows, scaled and rounded to 8 bits per block of 32
  // (RoundQueryToQ8's arithmetic, float32, IEEE division and reciprocal).
  if (t_begin < t_end) {
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

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const int bar = 1 + grp;

  const char* q_frag = s_q + (grp * 16 + lane % 16) * kMlaQsRowBytes + (lane / 16) * 16;
  const float* qd_lo = s_qd + (grp * 16 + lane / 4) * kMlaQdStride;
  const float* qd_hi = qd_lo + 8 * kMlaQdStride;
  const char* p_frag = s_p + (grp * 16 + lane % 16) * kMlaPRowBytes + (lane / 16) * 16;
  char* p_store = s_p + (grp * 16 + lane / 4) * kMlaPRowBytes + (wg * 8 + 2 * (lane % 4)) * 2;
  const int key0 = wg * 8 + 2 * (lane % 4);  // this thread's two keys in the tile

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < t_end) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* tile = s_kv + (it % kStages) * Shape::kStageBytes;
    const char* tile_d = tile + kMlaKeys * kMlaQsRowBytes;

    // V = d * q for the first 512 columns, into s_v in the input type.
    // (Unrolled: every thread's 16-byte loads are in flight together.)
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

    // S = Q K^T, one 32-value block per int8 mma, scaled per block.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
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
    // The query was scaled before rounding: only the base-2 factor is left.
    const int64_t key = t * kMlaKeys + key0;
    // Keys key and key + 1 share a page (page sizes are even).
    const bool live = key >= kv_len || rows.Live(key);
    sc[0] = live && key < n_lo ? sc[0] * kLog2e : -INFINITY;
    sc[1] = live && key + 1 < n_lo ? sc[1] * kLog2e : -INFINITY;
    sc[2] = live && key < n_hi ? sc[2] * kLog2e : -INFINITY;
    sc[3] = live && key + 1 < n_hi ? sc[3] * kLog2e : -INFINITY;
    MlaSoftmaxStep<T>(sc, grp, wg, lane, bar, s_max, p_store, m_lo, m_hi, l_lo, l_hi, o);
    // P of the group's warps and the whole block's V conversion are visible after this.
    __syncthreads();

    // O += P V, V = columns [128 wg, 128 wg + 128) of the dequantized tile.
    MlaPvTile<T, kMlaVRowBytes>(o, p_frag, s_v, wg, lane);
  }
  CpAsyncWait<0>();
  MlaStoreRows<T>(p, b, split, grp, wg, lane, bar, r_lo, r_hi, m_lo, m_hi, l_lo, l_hi, o, s_sum);
}

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

template <typename T, int G, bool kPaged>
__global__ void __launch_bounds__(128 * G, (MlaQuantShape<G, QFormat::kFP8E4M3>::kMinBlocks))
    MlaFp8Kernel(const AttentionParams p) {
  using Shape = MlaQuantShape<G, QFormat::kFP8E4M3>;
  constexpr int kThreads = Shape::kThreads, kStages = Shape::kStages;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem;                                 // [16G][576] T (+pad)
  char* s_kv = s_q + Shape::kRows * kMlaRowBytes;   // stage s: [32][576] e4m3 (+pad), [32] d
  char* s_t = s_kv + kStages * Shape::kStageBytes;  // [32][576] T (+pad)
  char* s_p = s_t + kMlaKeys * kMlaRowBytes;        // [G][16][32] (+pad)
  float* s_max = reinterpret_cast<float*>(s_p + G * 16 * kMlaPRowBytes);  // [G][4][16]
  float* s_sum = s_max + G * 64;                                          // [G][4][16]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int grp = warp / 4, wg = warp % 4;
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t H = p.heads_q, Sq = p.seq_q, R = Sq * H;
  const int64_t row0 = int64_t(blockIdx.x) * Shape::kRows;
  const MlaBlockKeys<kMlaKeys> span(p, b, split, row0, Shape::kRows);
  const int64_t kv_len = span.kv_len, t_begin = span.t_begin, t_end = span.t_end;
  const int64_t r_lo = row0 + grp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = span.Visible(r_lo), n_hi = span.Visible(r_hi);

  const CacheRows<kPaged> rows(p.k, b);
  const int64_t d_batch_bytes = p.k.scale_batch_stride * 4;  // float32 scales
  const char* qs_base =
      CacheRows<kPaged>::template Base<char>(p.k.data, b, p.kv_batch, p.k.batch_stride);
  const char* d_base =
      CacheRows<kPaged>::template Base<char>(p.k.scales, b, p.kv_batch, d_batch_bytes);
  auto load_tile = [&](int64_t t, int stage) {
    char* dst = s_kv + stage * Shape::kStageBytes;
    for (int c = tid; c < kMlaKeys * kMlaQsChunks; c += kThreads) {
      const int rr = c / kMlaQsChunks, cc = c % kMlaQsChunks;
      const int64_t j = t * kMlaKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + rr * kMlaQsRowBytes + cc * 16, qs_base + off + cc * 16, ok);
    }
    char* d_dst = dst + kMlaKeys * kMlaQsRowBytes;
    for (int rr = tid; rr < kMlaKeys; rr += kThreads) {
      int64_t off;
      const bool ok = rows.Locate(t * kMlaKeys + rr, kv_len, d_batch_bytes, 4, &off);
      CpAsync4(d_dst + rr * 4, d_base + off, ok);
    }
  };

  // Q (in its type) goes with the first tile's group.
  if (t_begin < t_end) {
    const T* q_base = static_cast<const T*>(p.q) + (b * R + row0) * kMlaDk;
    for (int c = tid; c < Shape::kRows * kMlaChunks; c += kThreads) {
      const int rr = c / kMlaChunks, cc = c % kMlaChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + rr * kMlaRowBytes + cc * 16, q_base + (ok ? rr : 0) * kMlaDk + cc * 8, ok);
    }
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    CpAsyncCommit();
  }

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const int bar = 1 + grp;
  const char* q_frag = s_q + (grp * 16 + lane % 16) * kMlaRowBytes + (lane / 16) * 16;
  const char* p_frag = s_p + (grp * 16 + lane % 16) * kMlaPRowBytes + (lane / 16) * 16;
  char* p_store = s_p + (grp * 16 + lane / 4) * kMlaPRowBytes + (wg * 8 + 2 * (lane % 4)) * 2;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    // Also: every warp is done with the last tile's s_t.
    __syncthreads();
    if (t + kStages - 1 < t_end) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* tile = s_kv + (it % kStages) * Shape::kStageBytes;
    const char* tile_d = tile + kMlaKeys * kMlaQsRowBytes;

    // The tile's rows as d * value, rounded to T: 16 values per step.
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

    // From here on the float kernel's step (mla_kernel.cuh) over s_t.
    float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
    const char* k_frag = s_t + (wg * 8 + lane % 8) * kMlaRowBytes + (lane / 8) * 16;
#pragma unroll
    for (int kk = 0; kk < kMlaDk / 16; kk += 2) {
      uint32_t a0[4], a1[4], bk[4];
      LdMatrixX4(a0, q_frag + kk * 32);
      LdMatrixX4(a1, q_frag + (kk + 1) * 32);
      LdMatrixX4(bk, k_frag + kk * 32);
      Mma16816<T>(s0, a0, bk[0], bk[1]);
      Mma16816<T>(s1, a1, bk[2], bk[3]);
    }
    const int64_t key = t * kMlaKeys + wg * 8 + 2 * (lane % 4);
    // Keys key and key + 1 share a page (page sizes are even).
    const bool live = key >= kv_len || rows.Live(key);
    float sc[4];
    sc[0] = live && key < n_lo ? (s0[0] + s1[0]) * scale_log2 : -INFINITY;
    sc[1] = live && key + 1 < n_lo ? (s0[1] + s1[1]) * scale_log2 : -INFINITY;
    sc[2] = live && key < n_hi ? (s0[2] + s1[2]) * scale_log2 : -INFINITY;
    sc[3] = live && key + 1 < n_hi ? (s0[3] + s1[3]) * scale_log2 : -INFINITY;
    MlaSoftmaxStep<T>(sc, grp, wg, lane, bar, s_max, p_store, m_lo, m_hi, l_lo, l_hi, o);
    NamedBarrier(bar, 128);
    MlaPvTile<T, kMlaRowBytes>(o, p_frag, s_t, wg, lane);
  }
  CpAsyncWait<0>();
  MlaStoreRows<T>(p, b, split, grp, wg, lane, bar, r_lo, r_hi, m_lo, m_hi, l_lo, l_hi, o, s_sum);
}

// Launches the main kernel for one (dtype, G, format, paged or not); the
// caller launches the combine.
template <typename T, int G, QFormat F, bool kPaged>
cudaError_t LaunchMlaQuant(const AttentionParams& p, cudaStream_t stream) {
  using Shape = MlaQuantShape<G, F>;
  constexpr auto kernel = [] {
    if constexpr (F == QFormat::kFP8E4M3)
      return MlaFp8Kernel<T, G, kPaged>;
    else
      return MlaQuantKernel<T, G, F, kPaged>;
  }();
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * p.heads_q;
  const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), unsigned(p.num_splits),
                  unsigned(p.batch));
  kernel<<<grid, Shape::kThreads, Shape::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
