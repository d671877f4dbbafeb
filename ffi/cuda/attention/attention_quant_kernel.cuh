// flash_attention over 8-bit K and V caches (q8_0, q8_kv; ffi/common/quant_format.h),
// read in place: the float kernel's layout (attention_kernel.cuh: a block of
// 4 warps owns 64 (position, head-in-group) rows of one (batch, KV head), a
// warp 16 rows, key tiles of AttnShape's size through a two-stage cp.async
// pipeline, split-KV partials) over the caches' int8 values and scales, each
// staged as they are in memory. K and V each have their own format, read
// from the call's parameters: one branch per tile picks the score and the V
// conversion code, so one instantiation serves every pair of formats.
//
// Semantics (as flash_mla's 8-bit kernel, mla/mla_quant_kernel.cuh, and
// reference.attention_quantized(round_p=False)):
//   Q            the query rows scaled and rounded to 8 bits per block of 32
//                with q8_0's rule and a float32 scale (quant_format.h,
//                QuantizesQueries), once per thread block; held in registers.
//   S = Q K^T    on int8 tensor cores (mma.sync m16n8k32, s32 accumulation):
//                one 32-value block per mma, exact integer dot products, each
//                scaled by (query block scale * key block scale) in float32
//                (q8_0 keys), or summed over the blocks with the query's
//                scales and then scaled by the key's (q8_kv).
//   V            each tile dequantized once, d * q in float32 (the value
//                jax_mla.dequantize computes) rounded to the input type, into
//                a shared-memory tile.
//   softmax, O += P V   as the float kernel (P and V in the input type on the
//                tensor cores, float32 accumulation). P is not rounded to 8
//                bits (the CPU kernels' rounding of P is theirs alone).
// Keys past kv_len are never read: their values and scales are zero-filled by
// cp.async and their scores masked.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/common/quant_format.h"
#include "ffi/cuda/attention/attention_config.h"
#include "ffi/cuda/attention/attention_rows.cuh"
#include "ffi/cuda/common/cache_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/q8_tile.cuh"

namespace jax_mla::cuda {

// S = Q K^T for a warp's 16 rows over a staged key tile (int8 rows `kt`, the
// keys' scales `kd`; qf, qd_lo, qd_hi: the warp's query fragments and the
// block scales of the thread's two rows): s[n] holds keys [8n, 8n + 8) in the
// m16n8 accumulator layout. kBlockScales: q8_0 keys, a float16 scale per key
// and block of 32; else q8_kv, one float32 scale per key, applied after the
// block sum.
template <typename Shape, bool kBlockScales>
__device__ __forceinline__ void QuantScores(float (&s)[Shape::kKeys / 8][4],
                                            const uint32_t (&qf)[Shape::kKBlocks][4],
                                            const float (&qd_lo)[Shape::kKBlocks],
                                            const float (&qd_hi)[Shape::kKBlocks], const char* kt,
                                            const char* kd, int lane) {
  constexpr int kNT = Shape::kKeys / 8, kKB = Shape::kKBlocks, kRow = Shape::kQsRow;
  const char* k_frag = kt + (lane % 8) * kRow + (lane / 8) * 16;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    // The scales of this thread's two keys, 8n + 2 (lane % 4) and the next.
    const char* kd0 = kd + (n * 8 + 2 * (lane % 4)) * Shape::kKScaleBytes;
    const char* kd1 = kd0 + Shape::kKScaleBytes;
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kb = 0; kb < kKB; kb += 2) {
      uint32_t bk[4];
      LdMatrixX4(bk, k_frag + n * 8 * kRow + kb * 32);  // blocks kb and kb + 1 of 8 keys
      int c[2][4];
      MmaS8(c[0], qf[kb], bk[0], bk[1], kMagicInt);
      MmaS8(c[1], qf[kb + 1], bk[2], bk[3], kMagicInt);
      float2 k0 = make_float2(1.f, 1.f), k1 = k0;  // (block kb, kb + 1) scales of the two keys
      if constexpr (kBlockScales) {
        k0 = __half22float2(*reinterpret_cast<const __half2*>(kd0 + kb * 2));
        k1 = __half22float2(*reinterpret_cast<const __half2*>(kd1 + kb * 2));
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float a0 = h ? k0.y : k0.x, a1 = h ? k1.y : k1.x;
        const float ql = qd_lo[kb + h], qh = qd_hi[kb + h];
        s[n][0] = fmaf(__int_as_float(c[h][0]) - kMagicFloat, ql * a0, s[n][0]);
        s[n][1] = fmaf(__int_as_float(c[h][1]) - kMagicFloat, ql * a1, s[n][1]);
        s[n][2] = fmaf(__int_as_float(c[h][2]) - kMagicFloat, qh * a0, s[n][2]);
        s[n][3] = fmaf(__int_as_float(c[h][3]) - kMagicFloat, qh * a1, s[n][3]);
      }
    }
    if constexpr (!kBlockScales) {
      const float k0 = *reinterpret_cast<const float*>(kd0);
      const float k1 = *reinterpret_cast<const float*>(kd1);
      s[n][0] *= k0;
      s[n][1] *= k1;
      s[n][2] *= k0;
      s[n][3] *= k1;
    }
  }
}

// The staged int8 V tile (`vq`, scales `vd`) as d * q in float32 rounded to
// T, into s_v (rows of Shape::kVRow bytes). kBlockScales: q8_0 values, a
// float16 scale per block of 32; else q8_kv, one float32 scale per key.
// (Unrolled: every thread's 16-byte loads are in flight together.)
template <typename T, typename Shape, bool kBlockScales>
__device__ __forceinline__ void DequantizeV(char* s_v, const char* vq, const char* vd, int tid) {
  constexpr int kChunks = Shape::kVqRow / 16;  // 16 values per chunk
  static_assert(Shape::kKeys * kChunks % Shape::kThreads == 0, "whole steps per thread");
#pragma unroll
  for (int i = 0; i < Shape::kKeys * kChunks / Shape::kThreads; ++i) {
    const int c = tid + i * Shape::kThreads;
    const int rr = c / kChunks, cc = c % kChunks;
    const uint4 raw = *reinterpret_cast<const uint4*>(vq + rr * Shape::kVqRow + cc * 16);
    const char* d_row = vd + rr * Shape::kVScaleBytes;
    const float d = kBlockScales ? __half2float(reinterpret_cast<const __half*>(d_row)[cc / 2])
                                 : *reinterpret_cast<const float*>(d_row);
    const uint32_t w[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u,
                           raw.w ^ 0x80808080u};
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      out[j] = PackPair<T>(ByteToFloat(w[j / 2], 2 * (j % 2)) * d,
                           ByteToFloat(w[j / 2], 2 * (j % 2) + 1) * d);
    uint4* dst = reinterpret_cast<uint4*>(s_v + rr * Shape::kVRow + cc * 32);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(128) AttentionQuantKernel(const AttentionParams p) {
  using Shape = AttnQuantShape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kStages = Shape::kStages, kThreads = Shape::kThreads;
  constexpr int kKB = Shape::kKBlocks, kQsRow = Shape::kQsRow, kVRow = Shape::kVRow;
  // Offsets inside a stage: K values, K scales, V values, V scales.
  constexpr int kKdOff = kKeys * kQsRow;
  constexpr int kVqOff = kKdOff + kKeys * Shape::kKScaleBytes;
  constexpr int kVdOff = kVqOff + kKeys * Shape::kVqRow;
  extern __shared__ __align__(128) char smem[];
  char* s_stage = smem;                             // [stages][stage bytes]
  char* s_q = smem + kStages * Shape::kStageBytes;  // [64][Dk] int8 (+pad): Q until tile 0
  char* s_v = s_q;  // [keys][Dv] T (+pad): the dequantized V tile from tile 0 on
  float* s_qd = reinterpret_cast<float*>(s_q + Shape::kQVBytes);  // [64][Dk / 32]

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

  // The formats (the handler admits q8_0 and q8_kv only): q8_0 has a float16
  // scale per block of 32, q8_kv a float32 one per row. Values are addressed
  // in bytes, scales in scales (RowView, params.h).
  const bool k_blocks = p.k.fmt == QFormat::kQ8_0, v_blocks = p.v.fmt == QFormat::kQ8_0;
  const int k_scale = k_blocks ? 2 : 4, v_scale = v_blocks ? 2 : 4;  // bytes per scale
  const int k_words = k_blocks ? kKB / 2 : 1;                        // 4-byte words per key
  const int v_words = v_blocks ? Shape::kVBlocks / 2 : 1;
  const CacheRows<false> rows(p.k, b);
  const int64_t kvb = b % p.kv_batch;
  const char* kq_base =
      static_cast<const char*>(p.k.data) + kvb * p.k.batch_stride + hk * p.k.head_stride;
  const char* vq_base =
      static_cast<const char*>(p.v.data) + kvb * p.v.batch_stride + hk * p.v.head_stride;
  const char* kd_base = static_cast<const char*>(p.k.scales) +
                        (kvb * p.k.scale_batch_stride + hk * p.k.scale_head_stride) * k_scale;
  const char* vd_base = static_cast<const char*>(p.v.scales) +
                        (kvb * p.v.scale_batch_stride + hk * p.v.scale_head_stride) * v_scale;
  const int64_t kd_row = p.k.scale_row_stride * k_scale, vd_row = p.v.scale_row_stride * v_scale;
  auto load_tile = [&](int64_t t, int stage) {
    char* st = s_stage + stage * Shape::kStageBytes;
    constexpr int kKChunks = Dk / 16, kVChunks = Dv / 16;  // 16-byte chunks per row
    // Keys past kv_len are zero-filled, never read.
    for (int c = tid; c < kKeys * kKChunks; c += kThreads) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      int64_t off;
      const bool ok = rows.Locate(t * kKeys + rr, kv_len, 0, p.k.row_stride, &off);
      CpAsync16(st + rr * kQsRow + cc * 16, kq_base + off + cc * 16, ok);
    }
    for (int c = tid; c < kKeys * kVChunks; c += kThreads) {
      const int rr = c / kVChunks, cc = c % kVChunks;
      int64_t off;
      const bool ok = rows.Locate(t * kKeys + rr, kv_len, 0, p.v.row_stride, &off);
      CpAsync16(st + kVqOff + rr * Shape::kVqRow + cc * 16, vq_base + off + cc * 16, ok);
    }
    for (int c = tid; c < kKeys * k_words; c += kThreads) {
      const int rr = c / k_words, ww = c % k_words;
      int64_t off;
      const bool ok = rows.Locate(t * kKeys + rr, kv_len, 0, kd_row, &off);
      CpAsync4(st + kKdOff + rr * Shape::kKScaleBytes + ww * 4, kd_base + off + ww * 4, ok);
    }
    for (int c = tid; c < kKeys * v_words; c += kThreads) {
      const int rr = c / v_words, ww = c % v_words;
      int64_t off;
      const bool ok = rows.Locate(t * kKeys + rr, kv_len, 0, vd_row, &off);
      CpAsync4(st + kVdOff + rr * Shape::kVScaleBytes + ww * 4, vd_base + off + ww * 4, ok);
    }
  };
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };

  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    CpAsyncCommit();
  }

  // The block's query rows rounded to 8 bits (while the first tile loads),
  // then each warp's fragments and its rows' block scales into registers.
  uint32_t qf[kKB][4];
  float qd_lo[kKB], qd_hi[kKB];
  if (t_begin < t_end) {
    const T* q = static_cast<const T*>(p.q);
    for (int it = tid; it < Shape::kRows * kKB; it += kThreads) {
      const int rr = it / kKB, kb = it % kKB;
      const bool ok = row0 + rr < R;
      uint32_t packed[8];
      const float d =
          RoundQ8Block<T>(q + (ok ? row_offset(row0 + rr) : 0) * Dk + kb * 32, p.scale, ok, packed);
      uint4* dst = reinterpret_cast<uint4*>(s_q + rr * kQsRow + kb * 32);
      dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
      s_qd[rr * kKB + kb] = d;
    }
    __syncthreads();
    const char* q_frag = s_q + (warp * 16 + lane % 16) * kQsRow + (lane / 16) * 16;
    const float* qd_row = s_qd + (warp * 16 + lane / 4) * kKB;
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      LdMatrixX4(qf[kb], q_frag + kb * 32);
      qd_lo[kb] = qd_row[kb];
      qd_hi[kb] = qd_row[8 * kKB + kb];
    }
  }

  constexpr int kNT = kKeys / 8, kOT = Dv / 8;
  float o[kOT][4];
#pragma unroll
  for (int n = 0; n < kOT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    // Also: every warp is done with the last tile's s_v (and, before tile 0,
    // has its query fragments in registers: s_v reuses their room).
    __syncthreads();
    if (t + kStages - 1 < t_end) load_tile(t + kStages - 1, (it + kStages - 1) % kStages);
    CpAsyncCommit();
    const char* st = s_stage + (it % kStages) * Shape::kStageBytes;

    if (v_blocks)
      DequantizeV<T, Shape, true>(s_v, st + kVqOff, st + kVdOff, tid);
    else
      DequantizeV<T, Shape, false>(s_v, st + kVqOff, st + kVdOff, tid);

    float s[kNT][4];
    if (k_blocks)
      QuantScores<Shape, true>(s, qf, qd_lo, qd_hi, st, st + kKdOff, lane);
    else
      QuantScores<Shape, false>(s, qf, qd_lo, qd_hi, st, st + kKdOff, lane);

    // The query was scaled before rounding: only the base-2 factor is left.
    const bool need_mask = (t + 1) * kKeys > n_min;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const int64_t key = t * kKeys + n * 8 + 2 * (lane % 4);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = (!need_mask || key + e < n_lo) ? s[n][e] * kLog2e : -INFINITY;
        s[n][2 + e] = (!need_mask || key + e < n_hi) ? s[n][2 + e] * kLog2e : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[n][e]);
        mx_hi = fmaxf(mx_hi, s[n][2 + e]);
      }
    }
    QuadRowMax(mx_lo, mx_hi);
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const MaxStep step = StepMax(m_lo, m_hi, mn_lo, mn_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      s[n][0] = Exp2(s[n][0] - step.mu_lo);
      s[n][1] = Exp2(s[n][1] - step.mu_lo);
      s[n][2] = Exp2(s[n][2] - step.mu_hi);
      s[n][3] = Exp2(s[n][3] - step.mu_hi);
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
    l_lo = l_lo * step.al_lo + sum_lo;
    l_hi = l_hi * step.al_hi + sum_hi;
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      o[n][0] *= step.al_lo;
      o[n][1] *= step.al_lo;
      o[n][2] *= step.al_hi;
      o[n][3] *= step.al_hi;
    }
    // The whole dequantized V tile is visible after this.
    __syncthreads();

    const char* v_frag = s_v + (lane % 8 + ((lane / 8) % 2) * 8) * kVRow + (lane / 16) * 16;
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

template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionQuant(const AttentionParams& p, cudaStream_t stream) {
  using Shape = AttnQuantShape<Dk, Dv>;
  cudaError_t err =
      cudaFuncSetAttribute(AttentionQuantKernel<T, Dk, Dv>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), unsigned(p.num_splits),
                  unsigned(p.batch * p.heads_kv));
  AttentionQuantKernel<T, Dk, Dv><<<grid, Shape::kThreads, Shape::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
