// flash_attention on Hopper (sm_90a) warpgroup MMA, FlashAttention-3 style:
// a block of three warpgroups owns 128 query rows of one (batch, KV head).
// Warpgroup 0 produces: it copies Q once (cp.async) and each 128-key K and V
// tile into 128B-swizzled shared memory (ffi/cuda/common/wgmma.cuh), two stages
// deep, by TMA (one thread, bulk tensor copies that zero-fill rows past Skv);
// the tile that holds a kv_len < Skv goes by cp.async from all 128 threads,
// zero-filling keys past kv_len (nothing past it is read, so a NaN there
// cannot leak into P V), as does every tile when the strides do not suit TMA.
// Each tile is signalled on an mbarrier; the consumers release a stage on
// another. Warpgroups 1 and 2 consume, 64 rows each:
// S = Q K^T is a wgmma with both operands in shared memory, the online
// softmax runs on the S accumulators in registers, and P stays in registers
// as the A operand of O += P V, whose B operand (V, stored key-major) is read
// through an N-major descriptor. Each consumer issues S of tile t together
// with P V of tile t - 1 and runs the softmax of tile t while that P V is in
// flight; the two consumers take turns issuing (named barriers), so one's
// softmax overlaps the other's products. setmaxnreg moves registers from the
// producer to the consumers. Row bookkeeping (positions, GQA rows, masks, LSE,
// split-KV outputs) is the same as attention_kernel.cuh's. The kernel body
// exists only in the sm_90a pass; LaunchAttentionSm90 must be called only
// where RunsSm90a() (device.h) says the sm_90a code is what the device runs.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ffi/common/params.h"
#include "ffi/cuda/attention/attention_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/tensor_map.h"
#include "ffi/cuda/common/wgmma.cuh"

namespace jax_mla::cuda {

template <int Dk, int Dv>
struct AttnSm90Shape {
  static_assert(Dk % 64 == 0 && Dv == 128, "the P V product is one m64n128 wgmma per 16 keys");
  static constexpr int kThreads = 384;  // a producer warpgroup, two consumer warpgroups
  static constexpr int kRows = 128;     // 64 per consumer warpgroup
  static constexpr int kKeys = 128;     // the S product is m64n128
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kRows * Dk * 2;
  static constexpr int kKBytes = kKeys * Dk * 2;
  static constexpr int kVBytes = kKeys * Dv * 2;
  // Registers per thread after setmaxnreg: 128 * 56 + 256 * 224 <= 65536 (the
  // producer's cp.async path spilled at 40).
  static constexpr int kProducerRegs = 56, kConsumerRegs = 224;
  // mbarriers: Q full, K full[2], V full[2], K empty[2], V empty[2].
  static constexpr int kBarBytes = 9 * 8;
  // + 1024: the dynamic shared memory base is rounded up to the swizzle period.
  static constexpr size_t kSmem =
      size_t(kQBytes) + kStages * size_t(kKBytes + kVBytes) + kBarBytes + 1024;
};

// tm_k, tm_v: 4-d tensor maps over K [kv_batch, Skv, Hkv, Dk] and V (boxes of
// 64 columns x 128 rows, 128B swizzle), used when use_tma; tiles that hold
// kv_len (< Skv) and every tile without use_tma are copied with cp.async.
template <typename T, int Dk, int Dv>
__global__ void __launch_bounds__(384, 1)
    AttentionSm90Kernel(const AttentionParams p, const __grid_constant__ CUtensorMap tm_k,
                        const __grid_constant__ CUtensorMap tm_v, const int use_tma) {
#ifdef JAX_MLA_SM90A
  using Shape = AttnSm90Shape<Dk, Dv>;
  constexpr int kKeys = Shape::kKeys, kRows = Shape::kRows, kStages = Shape::kStages;
  constexpr int kKChunks = Dk / 8;
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);
  char* s_q = smem;                            // [Dk/64][128 rows][64], swizzled
  char* s_k = s_q + Shape::kQBytes;            // [stages][Dk/64][128 keys][64]
  char* s_v = s_k + kStages * Shape::kKBytes;  // [stages][Dv/64][128 keys][64]
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_v + kStages * Shape::kVBytes);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* v_full = bars + 3;
  uint64_t* k_empty = bars + 5;
  uint64_t* v_empty = bars + 7;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4;  // 0: producer, 1 and 2: consumers
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
  const int64_t tiles = (n_max + kKeys - 1) / kKeys;
  const int64_t per = (tiles + p.num_splits - 1) / p.num_splits;
  const int64_t t_begin = split * per < tiles ? split * per : tiles;
  const int64_t t_end = t_begin + per < tiles ? t_begin + per : tiles;
  const int n_tiles = int(t_end - t_begin);
  auto row_offset = [&](int64_t r) {  // element offset of row r in [B, Sq, Hq, *] / Dim
    return (b * Sq + r / group) * Hq + hk * group + r % group;
  };

  if (tid == 0) {
    MbarInit(q_full, 128);
    for (int s = 0; s < kStages; ++s) {
      MbarInit(k_full + s, 128);
      MbarInit(v_full + s, 128);
      MbarInit(k_empty + s, 256);
      MbarInit(v_empty + s, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: Q by cp.async (rows past R zero-filled); each K/V tile by TMA
    // from thread 0 while the others just arrive, or by cp.async from every
    // thread (keys past kv_len zero-filled), each arriving when its copies
    // have landed.
    SetMaxRegsDec<Shape::kProducerRegs>();
    if (n_tiles == 0) return;
    const T* q = static_cast<const T*>(p.q);
    for (int c = tid; c < kRows * kKChunks; c += 128) {
      const int rr = c / kKChunks, cc = c % kKChunks;
      const bool ok = row0 + rr < R;
      CpAsync16(s_q + Swizzle128(kRows, rr, cc), q + (ok ? row_offset(row0 + rr) : 0) * Dk + cc * 8,
                ok);
    }
    MbarArriveCpAsync(q_full);
    const int64_t kvb = b % p.kv_batch;
    const T* k_base =
        static_cast<const T*>(p.k.data) + kvb * p.k.batch_stride + hk * p.k.head_stride;
    const T* v_base =
        static_cast<const T*>(p.v.data) + kvb * p.v.batch_stride + hk * p.v.head_stride;
    // One K or V tile (D columns) into dst: by TMA from thread 0 (the others
    // just arrive) or by cp.async from every thread, arriving on `full`.
    auto load_tile = [&](auto dim, char* dst, const CUtensorMap& tm, const T* base,
                         int64_t row_stride, uint64_t* full, bool tma, int64_t key0) {
      constexpr int D = decltype(dim)::value, kChunks = D / 8;
      if (tma) {
        if (tid == 0) {
          MbarArriveExpectTx(full, uint32_t(kKeys * D * sizeof(T)));
#pragma unroll
          for (int cb = 0; cb < D / 64; ++cb)
            TmaLoad4d(dst + cb * kKeys * 128, &tm, cb * 64, int(hk), int(key0), int(kvb), full);
        } else {
          MbarArrive(full);
        }
      } else {
#pragma unroll 4
        for (int c = tid; c < kKeys * kChunks; c += 128) {
          const int rr = c / kChunks, cc = c % kChunks;
          const int64_t j = key0 + rr;
          const bool ok = j < kv_len;  // keys past kv_len are zero-filled, never read
          CpAsync16(dst + Swizzle128(kKeys, rr, cc), base + (ok ? j : 0) * row_stride + cc * 8, ok);
        }
        MbarArriveCpAsync(full);
      }
    };
    for (int it = 0; it < n_tiles; ++it) {
      const int st = it % kStages;
      const uint32_t phase = (it / kStages) & 1;
      const int64_t key0 = (t_begin + it) * kKeys;
      // TMA zero-fills rows past Skv but would read real rows in [kv_len, Skv)
      // (a NaN there would survive P = 0 in P V): such a tile goes by cp.async.
      const bool tma = use_tma && (key0 + kKeys <= kv_len || kv_len == Skv);
      MbarWait(k_empty + st, phase ^ 1);
      load_tile(std::integral_constant<int, Dk>{}, s_k + st * Shape::kKBytes, tm_k, k_base,
                p.k.row_stride, k_full + st, tma, key0);
      MbarWait(v_empty + st, phase ^ 1);
      load_tile(std::integral_constant<int, Dv>{}, s_v + st * Shape::kVBytes, tm_v, v_base,
                p.v.row_stride, v_full + st, tma, key0);
    }
    CpAsyncWait<0>();
    return;
  }

  // Consumers: warpgroup cw owns rows [row0 + 64 cw, row0 + 64 cw + 64).
  SetMaxRegsInc<Shape::kConsumerRegs>();
  const int cw = wg - 1, wwarp = warp % 4;
  const int64_t r_lo = row0 + 64 * cw + wwarp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = visible(r_lo), n_hi = visible(r_hi);
  const int64_t wg_n_min = visible(row0 + 64 * cw);

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float s[64];
  uint32_t pf[kKeys / 16][4];
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = SmemAddr(s_q) + 64 * cw * 128;
  // The two consumer warpgroups take turns issuing their products (named
  // barriers 1 and 2), so one's softmax runs while the other's wgmmas do.
  auto my_turn = [&] { NamedBarrier(1 + cw, 256); };
  auto your_turn = [&] { NamedBarrierArrive(2 - cw, 256); };
  if (cw == 1 && n_tiles > 0) NamedBarrierArrive(1, 256);  // consumer 0 goes first

  auto issue_s = [&](int st) {
    const uint32_t k_addr = SmemAddr(s_k + st * Shape::kKBytes);
#pragma unroll
    for (int kk = 0; kk < Dk / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // 16-wide slice kk of 64-wide block kk / 4
      WgmmaM64N128K16SS<T, 0>(s, SmemDesc128(q_addr + (kk / 4) * kRows * 128 + off, 16, 1024),
                              SmemDesc128(k_addr + (kk / 4) * kKeys * 128 + off, 16, 1024), kk > 0);
    }
    WgmmaCommit();
  };
  auto issue_pv = [&](int st) {
    const uint32_t v_addr = SmemAddr(s_v + st * Shape::kVBytes);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
      WgmmaM64N128K16RS<T, 1>(o, pf[kk], SmemDesc128(v_addr + kk * 2048, kKeys * 128, 1024), 1);
    WgmmaCommit();
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      pf[kk][0] = PackPair<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = PackPair<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = PackPair<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = PackPair<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // Masks and exponentiates s (tile t) in place; returns the rescale factors
  // of the rows' earlier sums and updates the running maxima.
  auto softmax = [&](int64_t t, float& al_lo, float& al_hi) {
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
    QuadRowMax(mx_lo, mx_hi);
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const MaxStep st = StepMax(m_lo, m_hi, mn_lo, mn_hi);
    const float mu_lo = st.mu_lo, mu_hi = st.mu_hi;
    al_lo = st.al_lo;
    al_hi = st.al_hi;
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
  };

  if (n_tiles > 0) {
    MbarWait(q_full, 0);
    MbarWait(k_full, 0);
    FenceProxyAsync();  // the cp.async (generic proxy) writes -> wgmma (async proxy) reads
    my_turn();
    WgmmaFence();
    issue_s(0);
    your_turn();
    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(s[i]);
    MbarArrive(k_empty);
    float al_lo, al_hi;
    softmax(t_begin, al_lo, al_hi);  // o is still 0: no rescale
    for (int it = 1; it < n_tiles; ++it) {
      const int st = it % kStages, sp = (it - 1) % kStages;
      MbarWait(k_full + st, (it / kStages) & 1);
      MbarWait(v_full + sp, ((it - 1) / kStages) & 1);
      FenceProxyAsync();
      pack_p();  // P of tile it - 1, before s is overwritten by tile it
      my_turn();
#pragma unroll
      for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
      WgmmaFence();
      issue_s(st);
      issue_pv(sp);
      your_turn();
      WgmmaWait<1>();  // S of tile it done; P V of tile it - 1 may still run
#pragma unroll
      for (int i = 0; i < 64; ++i) FenceOperand(s[i]);
      MbarArrive(k_empty + st);
      softmax(t_begin + it, al_lo, al_hi);
      WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) FenceOperand(pf[kk][e]);
      MbarArrive(v_empty + sp);
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        o[4 * n + 0] *= al_lo;
        o[4 * n + 1] *= al_lo;
        o[4 * n + 2] *= al_hi;
        o[4 * n + 3] *= al_hi;
      }
    }
    const int sl = (n_tiles - 1) % kStages;
    MbarWait(v_full + sl, ((n_tiles - 1) / kStages) & 1);
    FenceProxyAsync();
    pack_p();
    my_turn();
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
    WgmmaFence();
    issue_pv(sl);
    if (cw == 0) your_turn();  // consumer 1's last turn is not waited for
    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) FenceOperand(o[i]);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) FenceOperand(pf[kk][e]);
  }

  AttentionStoreRows<T, Dv>(p, b, hk, split, lane, r_lo, r_hi, m_lo, m_hi, l_lo, l_hi,
                            [&](int n, int e) { return o[4 * n + e]; });
#endif
}

template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionSm90(const AttentionParams& p, cudaStream_t stream) {
  using Shape = AttnSm90Shape<Dk, Dv>;
  cudaError_t err =
      cudaFuncSetAttribute(AttentionSm90Kernel<T, Dk, Dv>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmem));
  if (err != cudaSuccess) return err;
  CUtensorMap tm_k{}, tm_v{};
  const bool tma =
      EncodeRowsMap<T>(&tm_k, p.k, p.kv_batch, p.seq_kv, p.heads_kv, Dk, Shape::kKeys) &&
      EncodeRowsMap<T>(&tm_v, p.v, p.kv_batch, p.seq_kv, p.heads_kv, Dv, Shape::kKeys);
  const int64_t rows = p.seq_q * (p.heads_q / p.heads_kv);
  const dim3 grid(unsigned((rows + Shape::kRows - 1) / Shape::kRows), unsigned(p.num_splits),
                  unsigned(p.batch * p.heads_kv));
  AttentionSm90Kernel<T, Dk, Dv>
      <<<grid, Shape::kThreads, Shape::kSmem, stream>>>(p, tm_k, tm_v, tma ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace jax_mla::cuda
