// Few rows per KV head (decode with small GQA groups): a GEMV per row with a
// blockwise online softmax (SoftmaxBlock), over float or quantized K and V
// (AttendFew), and over 8-bit V with rounded P (AttendFewQ); AttendFewAny
// picks one by the cache's formats.
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "ffi/cpu/kernels/common.h"
#include "ffi/cpu/kernels/dot_q8.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// Decode with few rows per KV head (GQA groups smaller than half a vector):
// a GEMV per row, so no tile is converted or transposed. K and V are read in
// their own dtype straight from the cache (converted in registers), scores
// are dot products along d, and the online softmax runs over blocks of kFew
// keys with the exp vectorized across the block.
constexpr int64_t kFew = kFewKeys;

// One row's online-softmax step over a block of n <= kFew keys: turns the
// scores s[0..n) into probabilities (s[n..kFew) become 0: those lanes hold
// stale scores, so they are selected away, never multiplied), updates the
// running max *m and sum *l, and returns the factor the row's output must be
// scaled by (exp(-inf) = 0 on the row's first block).
template <int64_t N = kFew>
float SoftmaxBlock(float* s, int64_t n, float* m, float* l) {
  static_assert(N % W == 0, "the softmax block is whole vectors");
  float mx = s[0];
  for (int64_t t = 1; t < n; ++t) mx = std::max(mx, s[t]);
  const float m_new = std::max(*m, mx);
  const float corr = *m == m_new ? 1.f : std::exp(*m - m_new);
  F32 sum = F32::Zero();
  for (int64_t t = 0; t < N; t += W) {
    const F32 p =
        simd::SelectLt(F32::Iota(), F32::Splat(float(n - t)),
                       simd::Exp(simd::Sub(F32::Load(s + t), F32::Splat(m_new))), F32::Zero());
    sum = simd::Add(sum, p);
    p.Store(s + t);
  }
  *m = m_new;
  *l = *l * corr + simd::ReduceAdd(sum);
  return corr;
}

// Where the GEMV kernel reads a row from: in place, converted in registers
// (float rows), or dequantized into a row buffer first (quantized rows).
template <DType T>
struct InPlace {
  static constexpr DType kType = T;
  const KvRows& r;
  const void* Row(int64_t t, float*, int64_t) const { return RowPtr(r, t); }
};
struct Dequantized {
  static constexpr DType kType = DType::kF32;
  const KvRows& r;
  const void* Row(int64_t t, float* buf, int64_t n) const {
    RowToFloat(r, t, buf, n);
    return buf;
  }
};

template <class KS, class VS>
void AttendFew(const RowBlock& rows, const KS& k, const VS& v, int64_t dk, int64_t dv,
               int64_t kv_begin, float* scratch) {
  static_assert(kFew % W == 0, "the softmax block is whole vectors");
  constexpr DType KT = KS::kType, VT = VS::kType;
  float* s = scratch;              // [kFew] scores, then probabilities
  float* kbuf = s + kFew;          // [kFew, dk] dequantized K rows (quantized K only)
  float* vbuf = kbuf + kFew * dk;  // [kFew, dv] dequantized V rows (quantized V only)
  const void* kr[kFew];
  const void* vr[kFew];
  const F32 zero = F32::Zero();
  for (int64_t r = 0; r < rows.n_rows; ++r) {
    const int64_t end = rows.end[r];
    const float* q = rows.q + r * dk;
    float* o = rows.o + r * dv;
    float m = rows.m[r], l = rows.l[r];
    for (int64_t t0 = kv_begin; t0 < end; t0 += kFew) {
      const int64_t n = std::min(kFew, end - t0);
      for (int64_t t = 0; t < n; ++t) kr[t] = k.Row(t0 + t, kbuf + t * dk, dk);
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        F32 acc[4] = {zero, zero, zero, zero};
        for (int64_t d = 0; d < dk; d += W) {
          const F32 qv = F32::Load(q + d);
          for (int i = 0; i < 4; ++i) acc[i] = simd::Fma(qv, LoadAs<KT>(kr[t + i], d), acc[i]);
        }
        for (int i = 0; i < 4; ++i) s[t + i] = simd::ReduceAdd(acc[i]);
      }
      for (; t < n; ++t) {
        F32 acc = zero;
        for (int64_t d = 0; d < dk; d += W)
          acc = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr[t], d), acc);
        s[t] = simd::ReduceAdd(acc);
      }
      const F32 c = F32::Splat(SoftmaxBlock(s, n, &m, &l));
      for (t = 0; t < n; ++t) vr[t] = v.Row(t0 + t, vbuf + t * dv, dv);
      for (int64_t d = 0; d < dv; d += W) {
        F32 acc = simd::Mul(F32::Load(o + d), c);
        for (t = 0; t < n; ++t) acc = simd::Fma(F32::Splat(s[t]), LoadAs<VT>(vr[t], d), acc);
        acc.Store(o + d);
      }
    }
    rows.m[r] = m;
    rows.l[r] = l;
  }
}

// AttendFew over 8-bit V, which rounds P (quant_format.h): the keys go in
// groups of kPGroup aligned as the tile kernel's (kv_begin is a multiple of
// it), scores and softmax per group, then per V block of 32 columns P is
// rounded and o += d * sum_t q_t * vq[t] in exact float32 integer sums. K and
// V rows are converted kFew at a time, so the buffers stay in L1.
template <class KS>
void AttendFewQ(const RowBlock& rows, const KS& k, const KvRows& v, int64_t dk, int64_t dv,
                int64_t kv_begin, float* scratch) {
  constexpr int64_t G = kPGroup;
  constexpr DType KT = KS::kType;
  const int64_t nbv = (dv + kQBlock - 1) / kQBlock;
  const int64_t vs = dv + kTilePad;
  float* s = scratch;              // [G] scores, then probabilities
  float* kbuf = s + G;             // [kFew, dk] dequantized K rows (quantized K only)
  float* vbuf = kbuf + kFew * dk;  // [kFew, vs] V's int8 values as floats
  float* vd = vbuf + kFew * vs;    // [G, nbv] V's scales
  float* pq = vd + G * nbv;        // [nbv, G] rounded P
  float* ps = pq + nbv * G;        // [nbv] its scales
  float* acc = ps + nbv;           // [dv] the group's integer sums
  const void* kr[kFew];
  const F32 zero = F32::Zero();
  // 8-bit keys: integer dot products over the key rows in place.
  [[maybe_unused]] bool dot8 = false;
  if constexpr (kInt8Dot && std::is_same_v<KS, Dequantized>)
    dot8 = QuantizesQueries(k.r.fmt) && dk % kQBlock == 0;
#if defined(__AVX2__)
  QueryLanesQ8 ql;
#endif
  for (int64_t r = 0; r < rows.n_rows; ++r) {
    const int64_t end = rows.end[r];
    const float* q = rows.q + r * dk;
    float* o = rows.o + r * dv;
    float m = rows.m[r], l = rows.l[r];
#if defined(__AVX2__)
    if (dot8) PrepareQueryLanesQ8(q, dk, ql.Lanes());
#endif
    for (int64_t g0 = kv_begin; g0 < end; g0 += G) {
      const int64_t n = std::min(G, end - g0);
#if defined(__AVX2__)
      if constexpr (std::is_same_v<KS, Dequantized>) {
        if (dot8) {
          // One head's rows are a cache-row stride apart (the heads of a key
          // are adjacent): prefetch the K rows kAhead keys on (the row's
          // last key at most: a paged cache's table holds no page past it),
          // and this group's V rows, which P.V reads next.
          constexpr int64_t kAhead = 16;
          for (int64_t t = 0; t < n; ++t) {
            const int64_t ta = std::min(g0 + t + kAhead, end - 1);
            const char* kn = k.r.Row(ta);
            for (int64_t b = 0; b < dk; b += 64) __builtin_prefetch(kn + b);
            __builtin_prefetch(k.r.Scales(ta));
            const char* vr = static_cast<const char*>(RowPtr(v, g0 + t));
            for (int64_t b = 0; b < dv; b += 64) __builtin_prefetch(vr + b);
            s[t] = DotQ8(ql.Lanes(), k.r, g0 + t, dk);
          }
        }
      }
#endif
      for (int64_t c0 = 0; c0 < n && !dot8; c0 += kFew) {
        const int64_t nc = std::min(kFew, n - c0);
        for (int64_t t = 0; t < nc; ++t) kr[t] = k.Row(g0 + c0 + t, kbuf + t * dk, dk);
        int64_t t = 0;
        for (; t + 4 <= nc; t += 4) {
          F32 a4[4] = {zero, zero, zero, zero};
          for (int64_t d = 0; d < dk; d += W) {
            const F32 qv = F32::Load(q + d);
            for (int i = 0; i < 4; ++i) a4[i] = simd::Fma(qv, LoadAs<KT>(kr[t + i], d), a4[i]);
          }
          for (int i = 0; i < 4; ++i) s[c0 + t + i] = simd::ReduceAdd(a4[i]);
        }
        for (; t < nc; ++t) {
          F32 a1 = zero;
          for (int64_t d = 0; d < dk; d += W)
            a1 = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr[t], d), a1);
          s[c0 + t] = simd::ReduceAdd(a1);
        }
      }
      const F32 c = F32::Splat(SoftmaxBlock<G>(s, n, &m, &l));
      for (int64_t t = 0; t < n; ++t) RowScales(v, g0 + t, nbv, vd + t * nbv);
      for (int64_t j = 0; j < nbv; ++j) {
        // The same float32 operations as QuantizeProbs, one lane.
        float amax = 0.f;
        for (int64_t t = 0; t < n; ++t) amax = std::max(amax, s[t] * vd[t * nbv + j]);
        const float d = amax / kPLevels;
        const float id = amax < kPTiny ? 0.f : 1.f / d;
        for (int64_t t = 0; t < n; ++t) pq[j * G + t] = std::nearbyint(s[t] * vd[t * nbv + j] * id);
        ps[j] = d;
      }
      std::fill(acc, acc + dv, 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += kFew) {
        const int64_t nc = std::min(kFew, n - c0);
        for (int64_t t = 0; t < nc; ++t) RowInt8ToFloat(v, g0 + c0 + t, vbuf + t * vs, dv);
        for (int64_t e = 0; e < dv; e += W) {
          const float* pj = pq + e / kQBlock * G + c0;
          F32 a = F32::Load(acc + e);
          for (int64_t t = 0; t < nc; ++t)
            a = simd::Fma(F32::Splat(pj[t]), F32::Load(vbuf + t * vs + e), a);
          a.Store(acc + e);
        }
      }
      for (int64_t e = 0; e < dv; e += W)
        simd::Fma(F32::Splat(ps[e / kQBlock]), F32::Load(acc + e), simd::Mul(F32::Load(o + e), c))
            .Store(o + e);
    }
    rows.m[r] = m;
    rows.l[r] = l;
  }
}

template <class KS>
void AttendFewV(const RowBlock& rows, const KS& k, const KvRows& v, int64_t dk, int64_t dv,
                int64_t kv_begin, float* scratch) {
  if (RoundsProbabilities(v.fmt)) return AttendFewQ(rows, k, v, dk, dv, kv_begin, scratch);
  if (v.fmt != QFormat::kNone) return AttendFew(rows, k, Dequantized{v}, dk, dv, kv_begin, scratch);
  switch (v.dtype) {
    case DType::kF32: return AttendFew(rows, k, InPlace<DType::kF32>{v}, dk, dv, kv_begin, scratch);
    case DType::kF16: return AttendFew(rows, k, InPlace<DType::kF16>{v}, dk, dv, kv_begin, scratch);
    case DType::kBF16:
      return AttendFew(rows, k, InPlace<DType::kBF16>{v}, dk, dv, kv_begin, scratch);
  }
}

void AttendFewAny(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t dk, int64_t dv,
                  int64_t kv_begin, float* scratch) {
  if (k.fmt != QFormat::kNone)
    return AttendFewV(rows, Dequantized{k}, v, dk, dv, kv_begin, scratch);
  switch (k.dtype) {
    case DType::kF32:
      return AttendFewV(rows, InPlace<DType::kF32>{k}, v, dk, dv, kv_begin, scratch);
    case DType::kF16:
      return AttendFewV(rows, InPlace<DType::kF16>{k}, v, dk, dv, kv_begin, scratch);
    case DType::kBF16:
      return AttendFewV(rows, InPlace<DType::kBF16>{k}, v, dk, dv, kv_begin, scratch);
  }
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
