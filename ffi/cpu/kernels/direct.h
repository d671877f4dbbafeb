// The tile loop over float K and V read in place, for blocks of up to
// kDirectMaxRows rows (MLA decode): no converted K tile (QkDirect, PvDirect,
// AttendDirectV).
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>
#include <type_traits>

#include "ffi/cpu/kernels/common.h"
#include "ffi/cpu/kernels/tile.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// The bytes to prefetch for the next key block: `bytes` from `at`, then
// `bytes2` from `at2` (its rows cross a page boundary of a paged cache).
struct NextRows {
  const char* at = nullptr;
  int64_t bytes = 0;
  const char* at2 = nullptr;
  int64_t bytes2 = 0;
};

// Float K and V read in place, for blocks of up to kDirectMaxRows rows
// (decode with many heads per KV head, MLA's 16): no converted tile. The
// tile path writes the whole float32 K tile (64 x 576 floats, 147 KB) to L2
// and reads it back for Q.K and again once per row block for P.V; here Q.K
// converts the next W dims of its KB keys into a small buffer in L1 (two
// chunks in flight, so the broadcasts never wait on the stores just made)
// and P.V converts V in registers, once per key and row block.
template <DType KT, int RV, int KB>
void QkDirect(const float* qt, int64_t rp, const void* const* kr, int64_t dk, float* st, int64_t t0,
              float* buf, const NextRows& next) {
  F32 acc[KB][RV];
  for (auto& row : acc)
    for (F32& a : row) a = F32::Zero();
  const auto convert = [&](int64_t dc, float* b) {
    for (int i = 0; i < KB; ++i) LoadAs<KT>(kr[i], dc).Store(b + i * W);
  };
  // The next block's rows are prefetched a few lines per chunk, so that
  // they come from L2, not L3, when converted.
  const int64_t chunks = dk / W;
  const int64_t lines1 = (next.bytes + 63) / 64, lines = lines1 + (next.bytes2 + 63) / 64;
  const int64_t per_chunk = (lines + chunks - 1) / chunks;
  convert(0, buf);
  for (int64_t dc = 0, c = 0; dc < dk; dc += W, ++c) {
    for (int64_t l = c * per_chunk; l < std::min(lines, (c + 1) * per_chunk); ++l)
      __builtin_prefetch(l < lines1 ? next.at + l * 64 : next.at2 + (l - lines1) * 64);
    const float* cur = buf + (c & 1) * KB * W;
    if (dc + W < dk) convert(dc + W, buf + ((c + 1) & 1) * KB * W);
    for (int dd = 0; dd < W; ++dd) {
      F32 q[RV];
      for (int j = 0; j < RV; ++j) q[j] = F32::Load(qt + (dc + dd) * rp + j * W);
      for (int i = 0; i < KB; ++i) {
        const F32 kv = F32::Splat(cur[i * W + dd]);
        for (int j = 0; j < RV; ++j) acc[i][j] = simd::Fma(kv, q[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < RV; ++j) acc[i][j].Store(st + (t0 + i) * rp + j * W);
}

// o[r][d0 ..) = corr[r] * o[r][d0 ..) + sum_{t < tn} st[t][r] * V[t0 + t][d0 ..)
// for RB rows from r0 and DB vectors of dims; V's rows are walked a run of
// rows adjacent in memory (a page) at a time.
template <DType VT, int RB, int DB>
void PvDirect(const float* st, int64_t rp, int64_t r0, const float* corr, const KvRows& v,
              int64_t t0, int64_t tn, float* o, int64_t dv, int64_t d0) {
  F32 acc[RB][DB];
  for (int i = 0; i < RB; ++i) {
    const F32 c = F32::Splat(corr[r0 + i]);
    for (int j = 0; j < DB; ++j)
      acc[i][j] = simd::Mul(F32::Load(o + (r0 + i) * dv + d0 + j * W), c);
  }
  const int64_t vrb = v.row_bytes;
  for (int64_t t = 0; t < tn;) {
    const int64_t run = std::min(tn, v.RunEnd(t0 + t) - t0);
    const char* vr = v.Row(t0 + t);
    for (; t < run; ++t, vr += vrb) {
      F32 x[DB];
      for (int j = 0; j < DB; ++j) x[j] = LoadAs<VT>(vr, d0 + j * W);
      for (int i = 0; i < RB; ++i) {
        const F32 p = F32::Splat(st[t * rp + r0 + i]);
        for (int j = 0; j < DB; ++j) acc[i][j] = simd::Fma(p, x[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < DB; ++j) acc[i][j].Store(o + (r0 + i) * dv + d0 + j * W);
}

// P.V's row blocks over R rows: kPvDirectRows at a time, then 4, 2 and 1;
// where that would end in one block of RB and one of 2 rows and RB + 2 is
// whole blocks of 4 (AVX2: 6 + 2 = 4 + 4), those blocks of 4 instead.
// PvDirectPasses counts the blocks, each a pass over the step's V.
constexpr int64_t PvDirectFullBlocks(int64_t R) {
  constexpr int64_t RB = simd::kPvDirectRows;
  return R / RB - ((RB + 2) % 4 == 0 && R % RB == 2 && R > RB ? 1 : 0);
}
constexpr int64_t PvDirectPasses(int64_t R) {
  const int64_t rest = R - PvDirectFullBlocks(R) * simd::kPvDirectRows;
  return PvDirectFullBlocks(R) + rest / 4 + rest % 4 / 2 + rest % 2;
}

// P.V for all R rows. Dims go outermost: the column strip of V that one
// PvDirect reads (tn keys x DB vectors) stays in L1 for every row block
// after the first, instead of coming again from L2 once per row block.
template <DType VT>
void PvDirectAll(const float* st, int64_t rp, int64_t R, const float* corr, const KvRows& v,
                 int64_t t0, int64_t tn, float* o, int64_t dv) {
  constexpr int RB = simd::kPvDirectRows, DB = simd::kPvDirectVecs;
  const int64_t full = PvDirectFullBlocks(R) * RB;
  const auto rows = [&](auto db, int64_t d0) {
    constexpr int D = decltype(db)::value;
    int64_t r0 = 0;
    for (; r0 < full; r0 += RB) PvDirect<VT, RB, D>(st, rp, r0, corr, v, t0, tn, o, dv, d0);
    for (; r0 + 4 <= R; r0 += 4) PvDirect<VT, 4, D>(st, rp, r0, corr, v, t0, tn, o, dv, d0);
    for (; r0 + 2 <= R; r0 += 2) PvDirect<VT, 2, D>(st, rp, r0, corr, v, t0, tn, o, dv, d0);
    for (; r0 < R; ++r0) PvDirect<VT, 1, D>(st, rp, r0, corr, v, t0, tn, o, dv, d0);
  };
  int64_t d0 = 0;
  for (; d0 + DB * W <= dv; d0 += DB * W) rows(std::integral_constant<int, DB>{}, d0);
  for (; d0 < dv; d0 += W) rows(std::integral_constant<int, 1>{}, d0);
}

// Blocks of up to this many rows (and at most two row vectors) take the
// direct path where the ISA enables it (simd::kDirect); key tiles per step.
constexpr int64_t kDirectMaxRows = 16;
constexpr int64_t kDirectTiles = 4;

// Attend's tile loop over float K and V read in place (QkDirect, PvDirect);
// Q is transposed in w.qt and the softmax state is in w. V's rows are `v`'s
// (MLA: the V columns of K's rows).
template <DType KT, DType VT>
void AttendDirect(const RowBlock& rows, const Work& w, int64_t rp, const KvRows& k, const KvRows& v,
                  int64_t dk, int64_t dv, int64_t kv_begin, int64_t kv_end) {
  const int64_t R = rows.n_rows;
  float* buf = w.kt;  // QkDirect's two chunks of KB x W floats
  // When P.V covers all rows in one pass over V (a single row block),
  // keys go in steps of kDirectTiles tiles: P.V loads and stores O once per
  // step (MLA decode avx512: 677 -> 648 us in kernel_bench 16 2048). With
  // several passes a tile per step was faster (avx2 with 16 rows: 753 vs 790
  // us; with the dims-outer P.V 1462 vs 1572 us over 4096 keys: a longer
  // step's V strips and scores no longer stay in L1). The scores of
  // a longer step, [TS, rp], live in w.vt, which this path does not use
  // otherwise.
  const int64_t TS = PvDirectPasses(R) == 1 ? kDirectTiles * T : T;
  Work ws = w;
  if (TS > T) ws.st = w.vt;
  // Q.K of keys [t, t + KB) of the step from t0 (tn valid).
  const auto qk_block = [&](auto rv, auto kb, int64_t t0, int64_t t, int64_t tn) {
    constexpr int RV = decltype(rv)::value, KB = decltype(kb)::value;
    const void* kr[KB];
    // Keys past tn repeat the last valid row; Softmax masks their scores.
    for (int i = 0; i < KB; ++i) kr[i] = RowPtr(k, t0 + std::min<int64_t>(t + i, tn - 1));
    // The rows of the next KB keys (up to kv_end): adjacent in memory, or
    // two runs where they cross a page boundary (KB is at most a page).
    static_assert(KB <= 16, "a key block spans at most two pages of 16 keys or more");
    NextRows next;
    const int64_t a = t0 + t + KB, b = std::min(kv_end, a + KB);
    const auto bytes = [&](int64_t n) { return (n - 1) * k.row_bytes + dk * DTypeBytes(KT); };
    if (a < b) {
      const int64_t a2 = std::min(b, k.RunEnd(a));
      next.at = k.Row(a);
      next.bytes = bytes(a2 - a);
      if (a2 < b) {
        next.at2 = k.Row(a2);
        next.bytes2 = bytes(b - a2);
      }
    }
    QkDirect<KT, RV, KB>(w.qt, rp, kr, dk, ws.st, t, buf, next);
  };
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += TS) {
    const int64_t tn = std::min(TS, kv_end - t0);
    for (int64_t r = 0; r < rp; ++r)
      w.cnt[r] = r < R ? float(std::clamp<int64_t>(rows.end[r] - t0, 0, tn)) : 0.f;
    if (rp == W) {
      ForKeyBlocks<simd::kQkKeys1, simd::kQkKeys1>(tn, [&](auto kb, int64_t t) {
        qk_block(std::integral_constant<int, 1>{}, kb, t0, t, tn);
      });
    } else {
      ForKeyBlocks<simd::kQkKeysMain, simd::kQkKeys>(tn, [&](auto kb, int64_t t) {
        qk_block(std::integral_constant<int, 2>{}, kb, t0, t, tn);
      });
    }
    Softmax(ws, rp, tn);
    PvDirectAll<VT>(ws.st, rp, R, w.corr, v, t0, tn, rows.o, dv);
  }
}

template <DType KT>
void AttendDirectV(const RowBlock& rows, const Work& w, int64_t rp, const KvRows& k,
                   const KvRows& v, int64_t dk, int64_t dv, int64_t kv_begin, int64_t kv_end) {
  switch (v.dtype) {
    case DType::kF32:
      return AttendDirect<KT, DType::kF32>(rows, w, rp, k, v, dk, dv, kv_begin, kv_end);
    case DType::kF16:
      return AttendDirect<KT, DType::kF16>(rows, w, rp, k, v, dk, dv, kv_begin, kv_end);
    case DType::kBF16:
      return AttendDirect<KT, DType::kBF16>(rows, w, rp, k, v, dk, dv, kv_begin, kv_end);
  }
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
