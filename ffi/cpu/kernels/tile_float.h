// The tile kernel's float steps: Q.K with the rows in the lanes (QkLanes),
// P.V (PvRows), and for 8-bit V the rounded P and its P.V in float sums of
// integers (QuantizeProbs, PvQRows; the path of ISAs without integer P.V).
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include "ffi/cpu/kernels/common.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// The rounded P of one tile (quant_format.h), rows in lanes: for V block j,
// pq[(j * T + t) * rp + r] = q_t as a float (exact) and ps[j * rp + r] = d.
// Every path computes x, d, id and q with these same float32 operations.
void QuantizeProbs(const float* st, int64_t rp, int64_t tn, const float* vd, int64_t nbv, float* pq,
                   float* ps) {
  const F32 zero = F32::Zero(), one = F32::Splat(1.f), levels = F32::Splat(kPLevels),
            tiny = F32::Splat(kPTiny);
  for (int64_t j = 0; j < nbv; ++j) {
    for (int64_t r0 = 0; r0 < rp; r0 += W) {
      F32 amax = zero;
      for (int64_t t = 0; t < tn; ++t)
        amax = simd::Max(amax, simd::Mul(F32::Load(st + t * rp + r0), F32::Splat(vd[t * nbv + j])));
      const F32 d = simd::Div(amax, levels);
      const F32 id = simd::SelectLt(amax, tiny, zero, simd::Div(one, d));
      d.Store(ps + j * rp + r0);
      for (int64_t t = 0; t < tn; ++t) {
        const F32 x = simd::Mul(F32::Load(st + t * rp + r0), F32::Splat(vd[t * nbv + j]));
        simd::Round(simd::Mul(x, id)).Store(pq + (j * T + t) * rp + r0);
      }
    }
  }
}

// o[r][d0 ..) += ps[r] * sum_{t < tn} pq[t][r] * vt[t][d] for RB rows from r0
// and DB vectors of dims inside one V block; vt holds V's int8 values as
// floats, so the sums are exact integers (64 * 255 * 128 < 2^24) and equal
// the integer path's.
template <int RB, int DB>
void PvQBlock(const float* pq, const float* ps, int64_t rp, int64_t r0, const float* vt,
              int64_t vstride, int64_t tn, float* o, int64_t dv, int64_t d0) {
  F32 acc[RB][DB];
  for (auto& row : acc)
    for (F32& a : row) a = F32::Zero();
  for (int64_t t = 0; t < tn; ++t) {
    F32 v[DB];
    for (int j = 0; j < DB; ++j) v[j] = F32::Load(vt + t * vstride + d0 + j * W);
    for (int i = 0; i < RB; ++i) {
      const F32 p = F32::Splat(pq[t * rp + r0 + i]);
      for (int j = 0; j < DB; ++j) acc[i][j] = simd::Fma(p, v[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    const F32 d = F32::Splat(ps[r0 + i]);
    for (int j = 0; j < DB; ++j) {
      float* op = o + (r0 + i) * dv + d0 + j * W;
      simd::Fma(d, acc[i][j], F32::Load(op)).Store(op);
    }
  }
}

template <int RB>
void PvQRows(const float* pq, const float* ps, int64_t rp, int64_t r0, const float* vt,
             int64_t vstride, int64_t tn, float* o, int64_t dv) {
  static_assert(kQBlock % W == 0 && 16 % W == 0, "a V block is whole vectors");
  for (int64_t j = 0, d0 = 0; d0 < dv; ++j, d0 += kQBlock) {
    const float* pqj = pq + j * T * rp;
    const float* psj = ps + j * rp;
    if (dv - d0 >= kQBlock) {
      PvQBlock<RB, kQBlock / W>(pqj, psj, rp, r0, vt, vstride, tn, o, dv, d0);
    } else {
      PvQBlock<RB, 16 / W>(pqj, psj, rp, r0, vt, vstride, tn, o, dv, d0);  // q8_kv: dv % 32 == 16
    }
  }
}

// st[t][r] = sum_d qt[d][r] * kt[t][d] for t in [t0, t0 + KB), rows
// [r0, r0 + RV * W): rows in lanes, one broadcast K element per FMA group.
template <int RV, int KB>
void QkLanes(const float* qt, int64_t rp, const float* kt, int64_t dk, float* st, int64_t t0,
             int64_t r0) {
  F32 acc[KB][RV];
  for (auto& row : acc)
    for (F32& a : row) a = F32::Zero();
  for (int64_t d = 0; d < dk; ++d) {
    F32 q[RV];
    for (int j = 0; j < RV; ++j) q[j] = F32::Load(qt + d * rp + r0 + j * W);
    for (int i = 0; i < KB; ++i) {
      const F32 k = F32::Splat(kt[(t0 + i) * dk + d]);
      for (int j = 0; j < RV; ++j) acc[i][j] = simd::Fma(k, q[j], acc[i][j]);
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < RV; ++j) acc[i][j].Store(st + (t0 + i) * rp + r0 + j * W);
}

// o[r][d] += sum_{t < tn} st[t][r] * vt[t][d] for RB rows from r0 and DB
// vectors of dims from d0.
template <int RB, int DB>
void PvBlock(const float* st, int64_t rp, int64_t r0, const float* vt, int64_t vstride, int64_t tn,
             float* o, int64_t dv, int64_t d0) {
  F32 acc[RB][DB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < DB; ++j) acc[i][j] = F32::Load(o + (r0 + i) * dv + d0 + j * W);
  for (int64_t t = 0; t < tn; ++t) {
    F32 v[DB];
    for (int j = 0; j < DB; ++j) v[j] = F32::Load(vt + t * vstride + d0 + j * W);
    for (int i = 0; i < RB; ++i) {
      const F32 p = F32::Splat(st[t * rp + r0 + i]);
      for (int j = 0; j < DB; ++j) acc[i][j] = simd::Fma(p, v[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < DB; ++j) acc[i][j].Store(o + (r0 + i) * dv + d0 + j * W);
}

template <int RB>
void PvRows(const float* st, int64_t rp, int64_t r0, const float* vt, int64_t vstride, int64_t tn,
            float* o, int64_t dv) {
  constexpr int DB = simd::kPvVecs;
  int64_t d0 = 0;
  for (; d0 + DB * W <= dv; d0 += DB * W) PvBlock<RB, DB>(st, rp, r0, vt, vstride, tn, o, dv, d0);
  for (; d0 < dv; d0 += W) PvBlock<RB, 1>(st, rp, r0, vt, vstride, tn, o, dv, d0);
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
