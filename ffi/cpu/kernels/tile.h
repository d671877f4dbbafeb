// The tile kernel's scratch layout (Work, Carve) and its online-softmax step
// over one tile, vectorized across rows (Softmax).
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include "ffi/cpu/kernels/common.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// Scratch layout (floats), see AttendScratchFloats.
struct Work {
  float* qt;    // [dk, rp]  Q transposed
  float* kt;    // [T, dk]   K tile
  float* vt;    // [T, dv]   V tile (unused when V lies inside the K rows)
  float* st;    // [T, rp]   scores, then probabilities
  float* m;     // [rp]
  float* l;     // [rp]
  float* cnt;   // [rp]      keys of the current tile each row sees
  float* corr;  // [rp]      rescale factor of the current tile
  float* vd;    // [T, nbv]  8-bit V: per-key scales of each block of 32 columns
  float* pq;    // [nbv, T, rp] rounded P (floats; the VNNI path packs bytes here)
  float* ps;    // [nbv, rp] its scales
};

Work Carve(float* scratch, int64_t dk, int64_t dv, int64_t rp) {
  Work w;
  w.qt = scratch;
  w.kt = w.qt + dk * rp;
  w.vt = w.kt + T * dk;
  w.st = w.vt + T * (dv + kTilePad);
  w.m = w.st + T * rp;
  w.l = w.m + rp;
  w.cnt = w.l + rp;
  w.corr = w.cnt + rp;
  w.vd = w.corr + rp;
  w.pq = w.vd + T * ((dv + kQBlock - 1) / kQBlock);
  w.ps = w.pq + T * rp * ((dv + kQBlock - 1) / kQBlock);
  return w;
}

// Online-softmax update for one tile, rows [r_begin, rp) (r_begin a multiple
// of W); st holds scores in, probabilities out.
void Softmax(const Work& w, int64_t rp, int64_t tn, int64_t r_begin = 0) {
  const F32 neg_inf = F32::Splat(kNegInf), zero = F32::Zero(), one = F32::Splat(1.f);
  for (int64_t r0 = r_begin; r0 < rp; r0 += W) {
    const F32 n = F32::Load(w.cnt + r0);
    F32 mx = neg_inf;
    for (int64_t t = 0; t < tn; ++t) {
      F32 s = F32::Load(w.st + t * rp + r0);
      s = simd::SelectLt(F32::Splat(float(t)), n, s, neg_inf);
      mx = simd::Max(mx, s);
      s.Store(w.st + t * rp + r0);
    }
    const F32 m_old = F32::Load(w.m + r0);
    const F32 m_new = simd::Max(m_old, mx);
    // Rows that have seen no key yet keep m = -inf and corr = 1; their
    // probabilities are selected to 0 below (exp(-inf - -inf) is discarded).
    const F32 corr = simd::SelectEq(m_old, m_new, one, simd::Exp(simd::Sub(m_old, m_new)));
    F32 sum = zero;
    for (int64_t t = 0; t < tn; ++t) {
      const F32 s = F32::Load(w.st + t * rp + r0);
      const F32 p = simd::SelectLt(F32::Splat(float(t)), n, simd::Exp(simd::Sub(s, m_new)), zero);
      sum = simd::Add(sum, p);
      p.Store(w.st + t * rp + r0);
    }
    m_new.Store(w.m + r0);
    simd::Fma(F32::Load(w.l + r0), corr, sum).Store(w.l + r0);
    corr.Store(w.corr + r0);
  }
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
