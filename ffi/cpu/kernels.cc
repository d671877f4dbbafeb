// The attention kernels, compiled once per ISA level: CMake builds this file
// with -DJAX_MLA_ISA=<isa> and that level's target flags (generic, avx2,
// avx512), each copy in its own namespace so the copies never mix; isa.cc
// hands out a copy only after checking the CPU.
//
// One call attends a block of R query rows (all heads that share a KV head,
// times a few query positions) over a range of keys, tile by tile:
//   1. the tile's K (and V) rows are converted once to float32 in scratch;
//      for MLA, V is a column range of the same converted rows;
//   2. S = Q K^T as a small GEMM with the rows in the vector lanes (Q
//      transposed once per call, K elements broadcast), so no horizontal sums
//      are needed and the online softmax below is vectorized across rows;
//   3. online softmax per row, masking keys past each row's end;
//   4. O += P V with value dims in the lanes, V un-transposed.
// On the float path, steps 2-4 skip the rows that are done (a causal block's
// rows before its diagonal) and the keys no row of a row block sees, so a
// long block's diagonal costs no more than a short one's.
// With fewer rows than half a vector (decode with small GQA groups) that
// would waste the lanes; AttendFew then runs one GEMV per row instead. Blocks
// of up to 16 rows over float caches (MLA decode) skip step 1 and read K and
// V in place (QkDirect, PvDirect).
// Every product and sum is float32 (inputs are exact in float32); only the
// summation order differs from the reference. Over 8-bit caches the query
// (8-bit K) and the softmax weights (8-bit V) are rounded to 8 bits as
// quant_format.h says, identically on every path, and Q.K / P.V run on
// integer dot products where the ISA has them (exact int32 sums).
//
// The pieces live in ffi/cpu/kernels/, one job per header, all compiled here:
// common.h (shared helpers), tile.h and tile_float.h (steps 1-4),
// tile_q8_avx512.h and tile_q8_avx2.h (their 8-bit forms), gemv.h and dot_q8.h
// (AttendFew), heads.h and heads_q8.h (several KV heads), direct.h, and
// backward.h (the backward's two work items).
#include "ffi/cpu/kernels.h"

#include <algorithm>

#include "ffi/cpu/kernels/backward.h"
#include "ffi/cpu/kernels/common.h"
#include "ffi/cpu/kernels/direct.h"
#include "ffi/cpu/kernels/gemv.h"
#include "ffi/cpu/kernels/heads.h"
#include "ffi/cpu/kernels/heads_q8.h"
#include "ffi/cpu/kernels/tile.h"
#include "ffi/cpu/kernels/tile_float.h"
#include "ffi/cpu/kernels/tile_q8_avx2.h"
#include "ffi/cpu/kernels/tile_q8_avx512.h"
#include "ffi/cpu/simd.h"

#define JAX_MLA_STR2(x) #x
#define JAX_MLA_STR(x) JAX_MLA_STR2(x)

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

void Attend(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t v_in_k, int64_t dk,
            int64_t dv, int64_t kv_begin, float* scratch) {
  const int64_t R = rows.n_rows;
  if (2 * R < W) return AttendFewAny(rows, k, v, dk, dv, kv_begin, scratch);  // lanes would idle
  const int64_t rp = RoundUp(R, W);
  const Work w = Carve(scratch, dk, dv, rp);

  int64_t kv_end = kv_begin;
  for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows.end[r]);
  if (kv_end <= kv_begin) return;

  for (int64_t r = 0; r < rp; ++r) {
    w.m[r] = r < R ? rows.m[r] : kNegInf;
    w.l[r] = r < R ? rows.l[r] : 0.f;
  }
  // 8-bit keys take integer dot products where the ISA has them; then no
  // float K tile is made, and V (MLA: the V columns of the same rows, through
  // the V view) is converted on its own.
  const bool int8 = (kInt8Qk || kInt16Qk) && QuantizesQueries(k.fmt) && dk % kQBlock == 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  int8_t* qi = reinterpret_cast<int8_t*>(w.qt);    // [dk / 4, rp, 4] bytes
  float* qd = w.qt + dk * rp / 4;                  // [dk / 32, rp]
  float* qc = qd + dk / kQBlock * rp;              // [dk / 32, rp]
  uint8_t* kp = reinterpret_cast<uint8_t*>(w.kt);  // [dk / 32, kInt8Keys, 32] bytes
  float* kd = w.kt + kInt8Keys * dk / 4;           // [kInt8Keys, dk / 32]
  if (int8) PrepareInt8Queries(rows, rp, dk, qi, qd, qc);
#elif defined(__AVX2__)
  uint32_t* qw = reinterpret_cast<uint32_t*>(w.qt);  // [dk / 2, rp] 16-bit pairs
  float* qd = w.qt + dk * rp / 2;                    // [dk / 32, rp]
  int16_t* kw = reinterpret_cast<int16_t*>(w.kt);    // [dk / 32, kInt16SubKeys, 32]
  float* kd = w.kt + T * dk / 2;                     // [kInt16SubKeys, dk / 32]
  if (int8) PrepareInt16Queries(rows, rp, dk, qw, qd);
#endif
  if (!int8) {
    for (int64_t d = 0; d < dk; ++d)
      for (int64_t r = 0; r < rp; ++r) w.qt[d * rp + r] = r < R ? rows.q[r * dk + d] : 0.f;
  }
  // Float K and V with few rows: read in place, no converted tile.
  // (The step's scores need kDirectTiles * T * rp floats of w.vt.)
  if (simd::kDirect && !int8 && k.fmt == QFormat::kNone &&
      (v_in_k >= 0 || v.fmt == QFormat::kNone) && rp <= std::min<int64_t>(kDirectMaxRows, 2 * W) &&
      kDirectTiles * rp <= dv + kTilePad) {
    const KvRows vr = v_in_k >= 0 ? k.Offset(v_in_k * DTypeBytes(k.dtype), 0) : v;
    switch (k.dtype) {
      case DType::kF32:
        AttendDirectV<DType::kF32>(rows, w, rp, k, vr, dk, dv, kv_begin, kv_end);
        break;
      case DType::kF16:
        AttendDirectV<DType::kF16>(rows, w, rp, k, vr, dk, dv, kv_begin, kv_end);
        break;
      case DType::kBF16:
        AttendDirectV<DType::kBF16>(rows, w, rp, k, vr, dk, dv, kv_begin, kv_end);
        break;
    }
    for (int64_t r = 0; r < R; ++r) {
      rows.m[r] = w.m[r];
      rows.l[r] = w.l[r];
    }
    return;
  }
  // 8-bit V rounds P (quant_format.h) and multiplies it with V's int8 values:
  // on VNNI as packed bytes, else as floats; its scales go to w.vd.
  const bool qpv = RoundsProbabilities(v.fmt);
  const int64_t nbv = (dv + kQBlock - 1) / kQBlock;
  [[maybe_unused]] int8_t* vp = reinterpret_cast<int8_t*>(w.vt);       // VNNI: [4, T / 4, 64] bytes
  [[maybe_unused]] uint32_t* pqd = reinterpret_cast<uint32_t*>(w.pq);  // [nbv, T / 4, rp]
  // V inside the K rows (MLA): read it from the converted K tile.
  const bool v_from_k = v_in_k >= 0 && !int8 && !qpv;
  const float* vtile = v_from_k ? w.kt + v_in_k : w.vt;
  const int64_t vstride = v_from_k ? dk : dv + kTilePad;

  // A row that sees none of a tile sees none of the later ones. On the float
  // path (the 8-bit ones round P over every row) the leading rows that are
  // done (causal rows before the block's diagonal) are skipped from Q.K to
  // P.V: from `lo` on, in whole vectors from `lv` for Q.K and the softmax;
  // and a block of rows skips the keys none of its rows sees.
  const bool skip = !int8 && !qpv;
  int64_t lo = 0;
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += T) {
    // Keys past the block's largest end are never read: they may lie past
    // kv_len and hold anything. Padding rows of the tile are zeros.
    const int64_t tn = std::min(T, kv_end - t0);
    if (skip)
      while (rows.end[lo] <= t0) ++lo;  // stops below R: some row ends past t0
    const int64_t lv = lo / W * W;
    for (int64_t t = 0; t < tn; ++t) {
      if (!int8) RowToFloat(k, t0 + t, w.kt + t * dk, dk);
      if (qpv) {
        RowScales(v, t0 + t, nbv, w.vd + t * nbv);
        if (!kInt8Pv && !kInt16Pv) RowInt8ToFloat(v, t0 + t, w.vt + t * vstride, dv);
      } else if (!v_from_k) {
        RowToFloat(v, t0 + t, w.vt + t * vstride, dv);
      }
    }
    if (tn < T && !int8) std::fill(w.kt + tn * dk, w.kt + T * dk, 0.f);
    for (int64_t r = 0; r < rp; ++r)
      w.cnt[r] = r < R ? float(std::clamp<int64_t>(rows.end[r] - t0, 0, tn)) : 0.f;
    // The tile's keys rows [r0, r0 + n) see: the most any of them sees.
    const auto seen = [&](int64_t r0, int64_t n) {
      float most = 0.f;
      for (int64_t r = r0; r < r0 + n; ++r) most = std::max(most, w.cnt[r]);
      return int64_t(most);
    };

    if (int8) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      // Sub-tiles of kInt8Keys keys, packed just before use so they stay in
      // L1 (the tile's score rows past tn up to the sub-tile's end are
      // written and never read).
      for (int64_t t = 0; t < tn; t += kInt8Keys) {
        PrepareInt8Keys(k, t0 + t, std::min<int64_t>(kInt8Keys, tn - t), dk, kp, kd);
        for (int64_t r0 = 0; r0 < rp; r0 += W)
          QkInt8(qi, qd, qc, rp, r0, kp, dk, kd, w.st + t * rp);
      }
#elif defined(__AVX2__)
      // Sub-tiles of kInt16SubKeys keys (the tile's score rows past tn up
      // to the last key block's end are written and never read).
      for (int64_t ts = 0; ts < tn; ts += kInt16SubKeys) {
        const int64_t n = std::min(kInt16SubKeys, tn - ts);
        PrepareInt16Keys(k, t0 + ts, n, dk, kw, kd);
        float* st = w.st + ts * rp;
        ForKeyBlocks<kInt16QkKeys, kInt16QkTailKeys>(n, [&](auto kb, int64_t t) {
          constexpr int KB = decltype(kb)::value;
          int64_t r0 = 0;
          for (; r0 + 2 * W <= rp; r0 += 2 * W)
            QkInt16Rows16<KB>(qw, qd, rp, r0, kw, t, dk, kd, st);
          if (r0 < rp) QkInt16<KB>(qw, qd, rp, r0, kw, t, dk, kd, st);
        });
      }
#endif
    } else if (rp == W) {
      // One row vector: more keys per block keep the FMA units busy.
      constexpr int KB = simd::kQkKeys1;
      for (int64_t t = 0; t < tn; t += KB) QkLanes<1, KB>(w.qt, rp, w.kt, dk, w.st, t, 0);
    } else {
      constexpr int RV = simd::kQkRowVecs;
      // Scores a row does not see are left as they are: the softmax masks
      // them by the row's count.
      const auto block = [&](auto kb, int64_t t) {
        constexpr int KB = decltype(kb)::value;
        int64_t r0 = lv;
        for (; r0 + RV * W <= rp; r0 += RV * W)
          if (t < seen(r0, RV * W)) QkLanes<RV, KB>(w.qt, rp, w.kt, dk, w.st, t, r0);
        for (; r0 < rp; r0 += W)
          if (t < seen(r0, W)) QkLanes<1, KB>(w.qt, rp, w.kt, dk, w.st, t, r0);
      };
      ForKeyBlocks<simd::kQkKeysMain, simd::kQkKeys>(tn, block);
    }

    Softmax(w, rp, tn, lv);
    for (int64_t r = lv; r < R; ++r) {
      const float c = w.corr[r];
      if (c == 1.f) continue;
      float* o = rows.o + r * dv;
      for (int64_t d = 0; d < dv; d += W) simd::Mul(F32::Load(o + d), F32::Splat(c)).Store(o + d);
    }

    constexpr int RB = simd::kPvRows;
    int64_t r0 = lo;
    if (qpv) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      QuantizeProbsU8(w.st, rp, tn, w.vd, nbv, pqd, w.ps);
      PvInt8Tile(v, t0, tn, pqd, w.ps, rp, R, vp, rows.o, dv);
#elif defined(__AVX2__)
      QuantizeProbsI16(w.st, rp, tn, w.vd, nbv, pqd, w.ps);
      PvInt16Tile(v, t0, tn, pqd, w.ps, rp, R, reinterpret_cast<int16_t*>(w.vt), rows.o, dv);
#else
      QuantizeProbs(w.st, rp, tn, w.vd, nbv, w.pq, w.ps);
      for (; r0 + RB <= R; r0 += RB) PvQRows<RB>(w.pq, w.ps, rp, r0, w.vt, vstride, tn, rows.o, dv);
      for (; r0 < R; ++r0) PvQRows<1>(w.pq, w.ps, rp, r0, w.vt, vstride, tn, rows.o, dv);
#endif
      continue;
    }
    // Each block of rows only up to the last key one of them sees (their
    // probabilities past it are 0).
    for (; r0 + RB <= R; r0 += RB)
      if (const int64_t n = seen(r0, RB); n > 0)
        PvRows<RB>(w.st, rp, r0, vtile, vstride, n, rows.o, dv);
    for (; r0 < R; ++r0)
      if (const int64_t n = seen(r0, 1); n > 0)
        PvRows<1>(w.st, rp, r0, vtile, vstride, n, rows.o, dv);
  }

  for (int64_t r = 0; r < R; ++r) {
    rows.m[r] = w.m[r];
    rows.l[r] = w.l[r];
  }
}

}  // namespace

extern const KernelTable kKernels;
const KernelTable kKernels = {JAX_MLA_STR(JAX_MLA_ISA),
                              &Attend,
                              &AttendHeadsAny,
                              &AttendHeadsQ8,
                              &AttendBwdKv,
                              &AttendBwdQ,
                              &ToFloat,
                              &Merge};

}  // namespace jax_mla::cpu::JAX_MLA_ISA
