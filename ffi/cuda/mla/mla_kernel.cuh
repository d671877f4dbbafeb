// flash_mla on tensor cores: DeepSeek's latent cache (Dk = 576, V = the first
// 512 columns of the same rows), every query head sharing the one latent KV
// head, so the query rows of a block are (position, head) pairs of one batch
// row and each KV tile is read once from global memory for both K and V.
//
// A block has G row groups of 4 warps; a row group owns 16 query rows. Per KV
// tile of kMlaKeys keys (staged in shared memory by a cp.async pipeline):
//   S = Q K^T    warp w of a group scores keys [8w, 8w + 8) of the tile for
//                the group's 16 rows (36 mma k-steps over Dk);
//   softmax      row maxima are exchanged through shared memory (online
//                softmax, float32, base-2 exponent with the scale folded in);
//                P goes to shared memory in the input type;
//   O += P V     warp w accumulates output columns [128w, 128w + 128) of its
//                group's rows, V read in place from the same tile (ldmatrix.trans).
// Each warp keeps a partial row sum over its own keys; the partials are added
// at the end. With split-KV (num_splits > 1) block y handles a contiguous
// range of tiles and writes normalized partials and their LSE; a combine
// kernel merges them. With kPaged the tile rows come from the pages the block
// table names (cache_rows.cuh): keys on skipped pages are zero-filled and
// masked, and tiles and splits run across page boundaries unchanged; the
// table entries a tile needs are read one tile before its copies and its
// masking use them.
//
// One kernel (MlaTileKernel) runs this loop for every cache format; what
// differs is its tile source: how a tile is staged, converted, scored and
// read as V (MlaFloatTiles here, the 8-bit and fp8 ones in
// mla_quant_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/common/params.h"
#include "ffi/cuda/common/cache_rows.cuh"
#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/mla/mla_config.h"

namespace jax_mla::cuda {

// One tile's online-softmax step for the quad's 2 x 2 scores sc (base-2,
// masked keys -inf): the tile's row maxima over the group's 4 warps (through
// s_max), the rescale of l and o, and P (in T) into this lane's p_store slot.
// Shared by the float and quantized kernels.
template <typename T>
__device__ __forceinline__ void MlaSoftmaxStep(const float (&sc)[4], int grp, int wg, int lane,
                                               int bar, float* s_max, char* p_store, float& m_lo,
                                               float& m_hi, float& l_lo, float& l_hi,
                                               float (&o)[16][4]) {
  float mx_lo = fmaxf(sc[0], sc[1]), mx_hi = fmaxf(sc[2], sc[3]);
  QuadRowMax(mx_lo, mx_hi);
  if (lane % 4 == 0) {
    s_max[(grp * 4 + wg) * 16 + lane / 4] = mx_lo;
    s_max[(grp * 4 + wg) * 16 + lane / 4 + 8] = mx_hi;
  }
  NamedBarrier(bar, 128);
  float mn_lo = m_lo, mn_hi = m_hi;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    mn_lo = fmaxf(mn_lo, s_max[(grp * 4 + w) * 16 + lane / 4]);
    mn_hi = fmaxf(mn_hi, s_max[(grp * 4 + w) * 16 + lane / 4 + 8]);
  }
  const MaxStep st = StepMax(m_lo, m_hi, mn_lo, mn_hi);
  const float mu_lo = st.mu_lo, mu_hi = st.mu_hi;
  const float al_lo = st.al_lo, al_hi = st.al_hi;
  const float p0 = Exp2(sc[0] - mu_lo), p1 = Exp2(sc[1] - mu_lo);
  const float p2 = Exp2(sc[2] - mu_hi), p3 = Exp2(sc[3] - mu_hi);
  l_lo = l_lo * al_lo + p0 + p1;
  l_hi = l_hi * al_hi + p2 + p3;
  m_lo = mn_lo;
  m_hi = mn_hi;
  *reinterpret_cast<uint32_t*>(p_store) = PackPair<T>(p0, p1);
  *reinterpret_cast<uint32_t*>(p_store + 8 * kMlaPRowBytes) = PackPair<T>(p2, p3);
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    o[n][0] *= al_lo;
    o[n][1] *= al_lo;
    o[n][2] *= al_hi;
    o[n][3] *= al_hi;
  }
}

// O += P V over one tile of kMlaKeys keys: warp wg's output columns
// [128 wg, 128 wg + 128) of its group's 16 rows, P (in T) from p_frag's rows
// and V from the tile's rows of kRowBytes bytes, read in place (ldmatrix.trans).
// Shared by the float kernel (V = the K tile) and the quantized one (V
// dequantized into its own tile).
template <typename T, int kRowBytes>
__device__ __forceinline__ void MlaPvTile(float (&o)[16][4], const char* p_frag, const char* v_tile,
                                          int wg, int lane) {
  const char* v_frag =
      v_tile + (lane % 8 + ((lane / 8) % 2) * 8) * kRowBytes + (wg * 128 + (lane / 16) * 8) * 2;
#pragma unroll
  for (int kk = 0; kk < kMlaKeys / 16; ++kk) {
    uint32_t a[4];
    LdMatrixX4(a, p_frag + kk * 32);
#pragma unroll
    for (int np = 0; np < 8; ++np) {
      uint32_t bv[4];
      LdMatrixX4Trans(bv, v_frag + kk * 16 * kRowBytes + np * 32);
      Mma16816<T>(o[2 * np], a, bv[0], bv[1]);
      Mma16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
    }
  }
}

// Rows r_lo and r_hi of a block divided by their row sums, into the output
// (one split) or the split's float32 partial, and their LSE (written by the
// threads that pass lse_writer). o is the thread's accumulator in the layout
// of mma.sync's m16n8 tiles (N = 16 of them) and of wgmma's m64nN (N = 32):
// o[4j + e] is (r_lo, column col0 + 8j + e), o[4j + 2 + e] the same column
// of r_hi. Every flash_mla kernel ends here.
template <typename T, int N>
__device__ __forceinline__ void MlaStoreNormalized(const AttentionParams& p, const float* o,
                                                   int64_t b, int split, int64_t r_lo, int64_t r_hi,
                                                   int col0, bool lse_writer, float m_lo,
                                                   float m_hi, float sum_lo, float sum_hi) {
  const int64_t H = p.heads_q, Sq = p.seq_q, R = Sq * H;
  // A row that saw no key: output 0, LSE -inf.
  const float inv_lo = sum_lo > 0.f ? 1.f / sum_lo : 0.f;
  const float inv_hi = sum_hi > 0.f ? 1.f / sum_hi : 0.f;
  const float lse_lo = sum_lo > 0.f ? (m_lo + log2f(sum_lo)) * kLn2 : -INFINITY;
  const float lse_hi = sum_hi > 0.f ? (m_hi + log2f(sum_hi)) * kLn2 : -INFINITY;
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + b * R * kMlaDv;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (r_lo < R)
        *reinterpret_cast<uint32_t*>(out + r_lo * kMlaDv + col0 + 8 * j) =
            PackPair<T>(o[4 * j] * inv_lo, o[4 * j + 1] * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<uint32_t*>(out + r_hi * kMlaDv + col0 + 8 * j) =
            PackPair<T>(o[4 * j + 2] * inv_hi, o[4 * j + 3] * inv_hi);
    }
    if (lse_writer) {  // lse [B, H, Sq]
      if (r_lo < R) p.lse[(b * H + r_lo % H) * Sq + r_lo / H] = lse_lo;
      if (r_hi < R) p.lse[(b * H + r_hi % H) * Sq + r_hi / H] = lse_hi;
    }
  } else {
    const int64_t base = (b * p.num_splits + split) * R;  // part_out [B, ns, Sq, H, dv]
    float* out = p.part_out + base * kMlaDv;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (r_lo < R)
        *reinterpret_cast<float2*>(out + r_lo * kMlaDv + col0 + 8 * j) =
            make_float2(o[4 * j] * inv_lo, o[4 * j + 1] * inv_lo);
      if (r_hi < R)
        *reinterpret_cast<float2*>(out + r_hi * kMlaDv + col0 + 8 * j) =
            make_float2(o[4 * j + 2] * inv_hi, o[4 * j + 3] * inv_hi);
    }
    if (lse_writer) {
      if (r_lo < R) p.part_lse[base + r_lo] = lse_lo;
      if (r_hi < R) p.part_lse[base + r_hi] = lse_hi;
    }
  }
}

// The end of a block: row sums over the quad's lanes and the group's 4 warps,
// then the normalized rows and their LSE into the output, or into the split
// partials when the keys are split. Shared by the float and quantized kernels.
template <typename T>
__device__ __forceinline__ void MlaStoreRows(const AttentionParams& p, int64_t b, int split,
                                             int grp, int wg, int lane, int bar, int64_t r_lo,
                                             int64_t r_hi, float m_lo, float m_hi, float l_lo,
                                             float l_hi, const float (&o)[16][4], float* s_sum) {
  QuadRowSum(l_lo, l_hi);
  if (lane % 4 == 0) {
    s_sum[(grp * 4 + wg) * 16 + lane / 4] = l_lo;
    s_sum[(grp * 4 + wg) * 16 + lane / 4 + 8] = l_hi;
  }
  NamedBarrier(bar, 128);
  float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    sum_lo += s_sum[(grp * 4 + w) * 16 + lane / 4];
    sum_hi += s_sum[(grp * 4 + w) * 16 + lane / 4 + 8];
  }
  MlaStoreNormalized<T, 16>(p, &o[0][0], b, split, r_lo, r_hi, wg * 128 + 2 * (lane % 4),
                            wg == 0 && lane % 4 == 0, m_lo, m_hi, sum_lo, sum_hi);
}

// What every flash_mla kernel knows of its block before it starts: batch row
// b's kv_len (clamped to [0, Skv]) and q_pos, how many keys row r of the
// R = Sq * H (position, head) rows sees (VisibleKeys; none past R), and the
// tiles [t_begin, t_end) of kKeys keys that split `split` takes of the block's
// rows [row0, row0 + rows): those its last row sees (visible keys grow with
// the row index), cut into num_splits near-equal ranges.
template <int kKeys>
struct MlaBlockKeys {
  int64_t H, Skv, R, q_pos, kv_len, t_begin, t_end;
  int32_t kv_len_raw;
  bool causal;
  __device__ __forceinline__ MlaBlockKeys(const AttentionParams& p, int64_t b, int split,
                                          int64_t row0, int rows)
      : H(p.heads_q), Skv(p.seq_kv), R(p.seq_q * p.heads_q), causal(p.causal) {
    kv_len_raw = p.kv_len[b];
    kv_len = kv_len_raw < 0 ? 0 : (kv_len_raw > Skv ? Skv : kv_len_raw);
    q_pos = p.q_pos[b];
    const int64_t last_row = (row0 + rows < R ? row0 + rows : R) - 1;
    const int64_t tiles = (Visible(last_row) + kKeys - 1) / kKeys;
    const int64_t per = (tiles + p.num_splits - 1) / p.num_splits;
    t_begin = split * per < tiles ? split * per : tiles;
    t_end = t_begin + per < tiles ? t_begin + per : tiles;
  }
  __device__ __forceinline__ int64_t Visible(int64_t r) const {
    return r < R ? VisibleKeys(q_pos + r / H, kv_len_raw, Skv, causal) : 0;
  }
};

// Q in T into s_q ([kRows][576], padded rows) by cp.async, rows past R
// zero-filled: the float and fp8 sources' query (the caller commits it with
// the first tile's group).
template <typename T, int kRows, int kThreads>
__device__ __forceinline__ void MlaStageQuery(const AttentionParams& p, char* s_q, int64_t b,
                                              int64_t row0, int tid) {
  const int64_t R = p.seq_q * p.heads_q;
  const T* q_base = static_cast<const T*>(p.q) + (b * R + row0) * kMlaDk;
  for (int c = tid; c < kRows * kMlaChunks; c += kThreads) {
    const int rr = c / kMlaChunks, cc = c % kMlaChunks;
    const bool ok = row0 + rr < R;
    CpAsync16(s_q + rr * kMlaRowBytes + cc * 16, q_base + (ok ? rr : 0) * kMlaDk + cc * 8, ok);
  }
}

// S = Q K^T for warp wg's 8 keys of a tile of T rows (kMlaRowBytes apart):
// the group's 16 rows (q_frag, this lane's ldmatrix address in Q) against keys
// [8 wg, 8 wg + 8), two accumulators for two mma chains, summed into sc
// (unscaled). The float and fp8 sources' scores.
template <typename T>
__device__ __forceinline__ void MlaScoresT(const char* q_frag, const char* tile, int wg, int lane,
                                           float (&sc)[4]) {
  float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
  const char* k_frag = tile + (wg * 8 + lane % 8) * kMlaRowBytes + (lane / 8) * 16;
#pragma unroll
  for (int kk = 0; kk < kMlaDk / 16; kk += 2) {
    uint32_t a0[4], a1[4], bk[4];
    LdMatrixX4(a0, q_frag + kk * 32);
    LdMatrixX4(a1, q_frag + (kk + 1) * 32);
    LdMatrixX4(bk, k_frag + kk * 32);
    Mma16816<T>(s0, a0, bk[0], bk[1]);
    Mma16816<T>(s1, a1, bk[2], bk[3]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) sc[i] = s0[i] + s1[i];
}

// The float source: the cache's rows in T, staged as they are, one tile
// serving as K and V (V = its first 512 columns, read in place).
template <typename T, int G, bool Paged>
struct MlaFloatTiles {
  using Elem = T;
  using Shape = MlaShape<G>;
  static constexpr int kGroups = G, kStages = Shape::kStages, kMinBlocks = 1;
  static constexpr bool kPaged = Paged;
  static constexpr size_t kSmem = Shape::kSmem;

  char* s_q;     // [16G][576] (+pad)
  char* s_kv;    // [stages][32][576] (+pad)
  char* s_p;     // [G][16][32] (+pad)
  float* s_max;  // [G][4][16]
  float* s_sum;  // [G][4][16]
  const T* kv_base;
  const char* q_frag;  // this lane's ldmatrix address in its group's Q rows

  __device__ __forceinline__ MlaFloatTiles(const AttentionParams& p, char* smem, int64_t b, int grp,
                                           int lane) {
    s_q = smem;
    s_kv = s_q + Shape::kRows * kMlaRowBytes;
    s_p = s_kv + kStages * kMlaKeys * kMlaRowBytes;
    s_max = reinterpret_cast<float*>(s_p + G * 16 * kMlaPRowBytes);
    s_sum = s_max + G * 64;
    kv_base = CacheRows<kPaged>::template Base<T>(p.k.data, b, p.kv_batch, p.k.batch_stride);
    q_frag = s_q + (grp * 16 + lane % 16) * kMlaRowBytes + (lane / 16) * 16;
  }
  __device__ __forceinline__ float ScoreScale(const AttentionParams& p) const {
    return p.scale * kLog2e;
  }
  __device__ __forceinline__ void LoadQuery(const AttentionParams& p, int64_t b, int64_t row0,
                                            int tid) {
    MlaStageQuery<T, Shape::kRows, Shape::kThreads>(p, s_q, b, row0, tid);
  }
  __device__ __forceinline__ void PrepareQuery(const AttentionParams&, int64_t, int64_t, int) {}
  __device__ __forceinline__ const char* Tile(int stage) const {
    return s_kv + stage * kMlaKeys * kMlaRowBytes;
  }
  __device__ __forceinline__ void LoadTile(const AttentionParams& p, const CacheRows<kPaged>& rows,
                                           const TilePages<kMlaKeys>& pages, int64_t t, int stage,
                                           int64_t kv_len, int tid) {
    char* dst = s_kv + stage * kMlaKeys * kMlaRowBytes;
    for (int c = tid; c < kMlaKeys * kMlaChunks; c += Shape::kThreads) {
      const int rr = c / kMlaChunks, cc = c % kMlaChunks;
      const int64_t j = t * kMlaKeys + rr;
      // Keys past kv_len or on a skipped page are zero-filled, never read.
      int64_t off;
      const bool ok = rows.Locate(pages, rr, j, kv_len, p.k.batch_stride, p.k.row_stride, &off);
      CpAsync16(dst + rr * kMlaRowBytes + cc * 16, kv_base + off + cc * 8, ok);
    }
  }
  __device__ __forceinline__ void PrepareTile(int, int) {}
  __device__ __forceinline__ void Scores(int stage, int wg, int lane, float (&sc)[4]) const {
    MlaScoresT<T>(q_frag, Tile(stage), wg, lane, sc);
  }
  __device__ __forceinline__ void SyncP(int bar) const { NamedBarrier(bar, 128); }
  // V = columns [128 wg, 128 wg + 128) of the same tile rows.
  __device__ __forceinline__ void Pv(float (&o)[16][4], const char* p_frag, int stage, int wg,
                                     int lane) const {
    MlaPvTile<T, kMlaRowBytes>(o, p_frag, Tile(stage), wg, lane);
  }
};

// The mma.sync flash_mla block: one kernel for every cache format, its tile
// source Src saying how a tile is staged, converted and scored. Src provides
//   Elem, kGroups (G), kStages, kMinBlocks, kPaged, kSmem;
//   Src(p, smem, b, grp, lane)     its shared-memory layout (s_p, s_max and
//                                  s_sum, which this loop uses, included);
//   LoadQuery / PrepareQuery       Q's cp.async (before the first tiles' and
//                                  in their group) / Q's synchronous part
//                                  (after them), when the block has tiles;
//   LoadTile(p, rows, pages, t, stage, kv_len, tid)   tile t's cp.asyncs into
//                                  stage, rows addressed through pages (the
//                                  tile's table entries, read a tile ahead);
//   PrepareTile(stage, tid)        the staged tile turned into what Scores and
//                                  Pv read (a conversion; block-wide barriers
//                                  it needs included);
//   ScoreScale(p), Scores(stage, wg, lane, sc)   warp wg's 4 scores of its
//                                  keys [8 wg, 8 wg + 8), times ScoreScale =
//                                  the base-2 logits;
//   SyncP(bar)                     the barrier after which the group's P (and
//                                  whatever Pv reads) is complete;
//   Pv(o, p_frag, stage, wg, lane) O += P V.
// The sources: MlaFloatTiles above, MlaQ8Tiles and MlaFp8Tiles
// (mla_quant_kernel.cuh).
template <class Src>
__global__ void __launch_bounds__(128 * Src::kGroups, Src::kMinBlocks)
    MlaTileKernel(const AttentionParams p) {
  using T = typename Src::Elem;
  constexpr int G = Src::kGroups, kRows = 16 * G, kStages = Src::kStages;
  constexpr bool kPaged = Src::kPaged;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int grp = warp / 4, wg = warp % 4;
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const MlaBlockKeys<kMlaKeys> span(p, b, split, row0, kRows);
  const int64_t kv_len = span.kv_len, t_begin = span.t_begin, t_end = span.t_end;
  const int64_t r_lo = row0 + grp * 16 + lane / 4, r_hi = r_lo + 8;
  const int64_t n_lo = span.Visible(r_lo), n_hi = span.Visible(r_hi);

  const CacheRows<kPaged> rows(p.k, b);
  Src src(p, smem, b, grp, lane);
  if (t_begin < t_end) src.LoadQuery(p, b, row0, tid);
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end)
      src.LoadTile(p, rows, rows.template Fetch<kMlaKeys>((t_begin + s) * kMlaKeys, kv_len),
                   t_begin + s, s, kv_len, tid);
    CpAsyncCommit();
  }
  if (t_begin < t_end) src.PrepareQuery(p, b, row0, tid);
  // Paged: the table entries of the next tile to copy and of this thread's
  // keys in the next tile to score, each read one tile before it is used, so
  // neither the copies nor the masking wait on a block-table load.
  TilePages<kMlaKeys> ahead =
      rows.template Fetch<kMlaKeys>((t_begin + kStages - 1) * kMlaKeys, kv_len);
  const int key_in_tile = wg * 8 + 2 * (lane % 4);  // this thread's two keys of a tile
  int32_t live_ahead = rows.Entry(t_begin * kMlaKeys + key_in_tile, kv_len);

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const float score_scale = src.ScoreScale(p);
  const int bar = 1 + grp;
  const char* p_frag = src.s_p + (grp * 16 + lane % 16) * kMlaPRowBytes + (lane / 16) * 16;
  char* p_store = src.s_p + (grp * 16 + lane / 4) * kMlaPRowBytes + (wg * 8 + 2 * (lane % 4)) * 2;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int it = int(t - t_begin);
    CpAsyncWait<kStages - 2>();
    // Also: every warp is done with the stage the copies below overwrite (and
    // with the last tile's converted copy, if the source keeps one).
    __syncthreads();
    if (t + kStages - 1 < t_end)
      src.LoadTile(p, rows, ahead, t + kStages - 1, (it + kStages - 1) % kStages, kv_len, tid);
    CpAsyncCommit();
    ahead = rows.template Fetch<kMlaKeys>((t + kStages) * kMlaKeys, kv_len);
    const int32_t live_entry = live_ahead;
    live_ahead = rows.Entry((t + 1) * kMlaKeys + key_in_tile, kv_len);
    const int stage = it % kStages;
    src.PrepareTile(stage, tid);

    float sc[4];
    src.Scores(stage, wg, lane, sc);
    const int64_t key = t * kMlaKeys + key_in_tile;
    // Keys key and key + 1 share a page (page sizes are even).
    const bool live = key >= kv_len || rows.Valid(live_entry);
    sc[0] = live && key < n_lo ? sc[0] * score_scale : -INFINITY;
    sc[1] = live && key + 1 < n_lo ? sc[1] * score_scale : -INFINITY;
    sc[2] = live && key < n_hi ? sc[2] * score_scale : -INFINITY;
    sc[3] = live && key + 1 < n_hi ? sc[3] * score_scale : -INFINITY;
    MlaSoftmaxStep<T>(sc, grp, wg, lane, bar, src.s_max, p_store, m_lo, m_hi, l_lo, l_hi, o);
    src.SyncP(bar);
    src.Pv(o, p_frag, stage, wg, lane);
  }
  CpAsyncWait<0>();
  MlaStoreRows<T>(p, b, split, grp, wg, lane, bar, r_lo, r_hi, m_lo, m_hi, l_lo, l_hi, o,
                  src.s_sum);
}

// Launches the mma.sync kernel over the tile source Src; the caller launches
// the combine.
template <class Src>
cudaError_t LaunchMlaTiles(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kRows = 16 * Src::kGroups;
  cudaError_t err = cudaFuncSetAttribute(
      MlaTileKernel<Src>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Src::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t rows = p.seq_q * p.heads_q;
  const dim3 grid(unsigned((rows + kRows - 1) / kRows), unsigned(p.num_splits), unsigned(p.batch));
  MlaTileKernel<Src><<<grid, 128 * Src::kGroups, Src::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Launches the float kernel for one (dtype, G, paged or not).
template <typename T, int G, bool kPaged>
cudaError_t LaunchMla(const AttentionParams& p, cudaStream_t stream) {
  return LaunchMlaTiles<MlaFloatTiles<T, G, kPaged>>(p, stream);
}

}  // namespace jax_mla::cuda
