// The attention backward (docs/design.md, "Backward kernels"). The forward
// keeps only its output and LSE, so P is recomputed from the LSE:
//   P = exp(S - lse), dP = dO V^T, dS = P (dP - delta),
//   dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K
// (S the scaled scores). Each result element has one writer and a fixed
// summation order, so that no result depends on thread timing and none needs
// atomics or a reduction across threads. Two kernels:
//   AttendBwdKv: a block of keys of one KV head over every query of the heads
//     that share it (dK, dV), keys in the vector lanes; given the heads' dQ
//     rows it also adds dS K into them (5 GEMMs per query-key pair), which
//     the driver allows only when one task runs every key block of the KV
//     head in order;
//   AttendBwdQ: a block of query rows of one head over the keys they see
//     (dQ), rows in the vector lanes, for the driver's other plan, in which
//     dQ has its own items that recompute S and dP (7 GEMMs per pair).
// Every GEMM is Gemm (c (+)= a b with a broadcast from any strides and b's
// rows in the lanes), so each operand is laid out once, when its block is
// loaded. Float32 throughout.
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include "ffi/cpu/kernels/common.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// The blocks (kernels.h) as this copy's own constants: std::min takes its
// arguments by reference, and a sanitizer build would then emit the shared
// ones as data symbols in every ISA copy (cmake/check_isa_symbols.py).
constexpr int64_t kRows = kBwdRows;
constexpr int64_t kKeys = kBwdKeys;

// c[i][l] (+)= sum_{r < n} a[i * sa + r * sr] * b[r * ldb + l] for i < AB and
// l < LV * W: AB x LV accumulators, one broadcast of a per row and step.
template <int AB, int LV, bool kAdd>
void GemmBlock(const float* a, int64_t sa, int64_t sr, const float* b, int64_t ldb, int64_t n,
               float* c, int64_t ldc) {
  F32 acc[AB][LV];
  for (int i = 0; i < AB; ++i)
    for (int j = 0; j < LV; ++j) acc[i][j] = kAdd ? F32::Load(c + i * ldc + j * W) : F32::Zero();
  for (int64_t r = 0; r < n; ++r) {
    F32 bv[LV];
    for (int j = 0; j < LV; ++j) bv[j] = F32::Load(b + r * ldb + j * W);
    for (int i = 0; i < AB; ++i) {
      const F32 x = F32::Splat(a[i * sa + r * sr]);
      for (int j = 0; j < LV; ++j) acc[i][j] = simd::Fma(x, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < AB; ++i)
    for (int j = 0; j < LV; ++j) acc[i][j].Store(c + i * ldc + j * W);
}

// The rows left after the whole blocks (fewer than kGemmRows) as one block.
template <int AB, int LV, bool kAdd>
void GemmTail(int64_t rows, const float* a, int64_t sa, int64_t sr, const float* b, int64_t ldb,
              int64_t n, float* c, int64_t ldc) {
  if constexpr (AB > 0) {
    if (rows == AB) return GemmBlock<AB, LV, kAdd>(a, sa, sr, b, ldb, n, c, ldc);
    GemmTail<AB - 1, LV, kAdd>(rows, a, sa, sr, b, ldb, n, c, ldc);
  }
}

template <int LV, bool kAdd>
void GemmRows(const float* a, int64_t sa, int64_t sr, const float* b, int64_t ldb, int64_t n,
              float* c, int64_t ldc, int64_t rows) {
  constexpr int AB = simd::kGemmRows;
  int64_t i = 0;
  for (; i + AB <= rows; i += AB)
    GemmBlock<AB, LV, kAdd>(a + i * sa, sa, sr, b, ldb, n, c + i * ldc, ldc);
  GemmTail<AB - 1, LV, kAdd>(rows - i, a + i * sa, sa, sr, b, ldb, n, c + i * ldc, ldc);
}

// c[i][l] (+)= sum_{r < n} a[i * sa + r * sr] * b[r * ldb + l] for i < rows
// and l < lanes (a multiple of W); kAdd accumulates into c, else overwrites.
template <bool kAdd>
void Gemm(const float* a, int64_t sa, int64_t sr, const float* b, int64_t ldb, int64_t n, float* c,
          int64_t ldc, int64_t rows, int64_t lanes) {
  constexpr int LV = simd::kGemmVecs;
  int64_t l = 0;
  for (; l + LV * W <= lanes; l += LV * W)
    GemmRows<LV, kAdd>(a, sa, sr, b + l, ldb, n, c + l, ldc, rows);
  for (; l < lanes; l += W) GemmRows<1, kAdd>(a, sa, sr, b + l, ldb, n, c + l, ldc, rows);
}

void ScaleRow(float* x, int64_t n, float scale) {
  for (int64_t d = 0; d < n; d += W) simd::Mul(F32::Load(x + d), F32::Splat(scale)).Store(x + d);
}

const void* QueryRow(const BwdQuery& h, int64_t i) {
  return static_cast<const char*>(h.q) + i * h.q_stride * DTypeBytes(h.q_dtype);
}

const void* DoutRow(const BwdQuery& h, int64_t i) {
  return static_cast<const char*>(h.dout) + i * h.dout_stride * DTypeBytes(h.dout_dtype);
}

// Keys [t0, t0 + tn) a row sees: none when its LSE is -inf.
int64_t SeenKeys(float lse, int64_t end, int64_t t0, int64_t tn) {
  return lse == kNegInf ? 0 : std::clamp<int64_t>(end - t0, 0, tn);
}

// One query row with the keys in lanes: s (scores in, P out) and dp (dP in,
// dS out) over `lanes` keys, of which the first `seen` are visible; the
// others get exactly 0 whatever their scores.
void GradScoresKeys(float* s, float* dp, int64_t lanes, int64_t seen, float lse, float delta) {
  const F32 n = F32::Splat(float(seen)), m = F32::Splat(lse), dl = F32::Splat(delta);
  for (int64_t l = 0; l < lanes; l += W) {
    const F32 key = simd::Add(F32::Iota(), F32::Splat(float(l)));
    const F32 p = simd::SelectLt(key, n, simd::Exp(simd::Sub(F32::Load(s + l), m)), F32::Zero());
    const F32 ds = simd::Mul(p, simd::Sub(F32::Load(dp + l), dl));
    p.Store(s + l);
    simd::SelectLt(key, n, ds, F32::Zero()).Store(dp + l);
  }
}

// A tile of tn keys with the rows in lanes: st (scores in, dS out) from dpt
// (dP); row r sees the tile's first cnt[r] keys.
void GradScoresRows(float* st, const float* dpt, int64_t rp, int64_t tn, const float* cnt,
                    const float* lse, const float* delta) {
  for (int64_t r0 = 0; r0 < rp; r0 += W) {
    const F32 n = F32::Load(cnt + r0), m = F32::Load(lse + r0), dl = F32::Load(delta + r0);
    for (int64_t t = 0; t < tn; ++t) {
      float* s = st + t * rp + r0;
      const F32 key = F32::Splat(float(t));
      const F32 p = simd::Exp(simd::Sub(F32::Load(s), m));
      const F32 ds = simd::Mul(p, simd::Sub(F32::Load(dpt + t * rp + r0), dl));
      simd::SelectLt(key, n, ds, F32::Zero()).Store(s);
    }
  }
}

void AttendBwdKv(const BwdQuery* heads, int64_t n_heads, const int64_t* end, int64_t seq_q,
                 const KvRows& k, const KvRows& v, int64_t dk, int64_t dv, float scale, int64_t j0,
                 int64_t j1, float* grad_k, int64_t gk_stride, float* grad_v, int64_t gv_stride,
                 float* scratch) {
  const int64_t nk = j1 - j0, kp = RoundUp(nk, W);
  float* kt = scratch;             // [dk, kp] K transposed
  float* vt = kt + dk * kKeys;     // [dv, kp] V transposed
  float* qs = vt + dv * kKeys;     // [rows, dk] queries times scale
  float* od = qs + kRows * dk;     // [rows, dv] output gradients
  float* s = od + kRows * dv;      // [rows, kp] scores, then P
  float* dp = s + kRows * kKeys;   // [rows, kp] dP, then dS
  float* kn = dp + kRows * kKeys;  // [nk, dk] K as stored, for dQ += dS K
  float* row = kn + kKeys * dk;    // one converted row
  for (int64_t t = 0; t < nk; ++t) {
    RowToFloat(k, j0 + t, kn + t * dk, dk);
    for (int64_t d = 0; d < dk; ++d) kt[d * kp + t] = kn[t * dk + d];
    RowToFloat(v, j0 + t, row, dv);
    for (int64_t d = 0; d < dv; ++d) vt[d * kp + t] = row[d];
  }
  // Lanes past the block's keys: zeros, not cache rows (which may not
  // exist); their P and dS are masked to 0 below.
  for (int64_t t = nk; t < kp; ++t) {
    for (int64_t d = 0; d < dk; ++d) kt[d * kp + t] = 0.f;
    for (int64_t d = 0; d < dv; ++d) vt[d * kp + t] = 0.f;
  }
  float* gk = grad_k + j0 * gk_stride;
  float* gv = grad_v + j0 * gv_stride;
  for (int64_t t = 0; t < nk; ++t) {
    std::fill_n(gk + t * gk_stride, dk, 0.f);
    std::fill_n(gv + t * gv_stride, dv, 0.f);
  }
  // The first position that sees a key of the block (end is nondecreasing):
  // the ones before it contribute nothing.
  int64_t first = 0, last = seq_q;
  while (first < last) {
    const int64_t mid = first + (last - first) / 2;
    if (end[mid] > j0) {
      last = mid;
    } else {
      first = mid + 1;
    }
  }
  for (int64_t g = 0; g < n_heads; ++g) {
    const BwdQuery& h = heads[g];
    for (int64_t i0 = first; i0 < seq_q; i0 += kRows) {
      const int64_t R = std::min(kRows, seq_q - i0);
      for (int64_t r = 0; r < R; ++r) {
        ToFloat(QueryRow(h, i0 + r), h.q_dtype, qs + r * dk, dk);
        ScaleRow(qs + r * dk, dk, scale);
        ToFloat(DoutRow(h, i0 + r), h.dout_dtype, od + r * dv, dv);
      }
      Gemm<false>(qs, dk, 1, kt, kp, dk, s, kp, R, kp);   // S = (scale Q) K^T
      Gemm<false>(od, dv, 1, vt, kp, dv, dp, kp, R, kp);  // dP = dO V^T
      for (int64_t r = 0; r < R; ++r) {
        const float lse = h.lse[i0 + r];
        GradScoresKeys(s + r * kp, dp + r * kp, kp, SeenKeys(lse, end[i0 + r], j0, nk), lse,
                       h.delta[i0 + r]);
      }
      Gemm<true>(s, 1, kp, od, dv, R, gv, gv_stride, nk, dv);   // dV += P^T dO
      Gemm<true>(dp, 1, kp, qs, dk, R, gk, gk_stride, nk, dk);  // dK += dS^T (scale Q)
      // dQ += dS K over the block's keys (the lanes past nk hold dS = 0);
      // the driver zeroes the rows first and scales them at the end.
      if (h.dq != nullptr)
        Gemm<true>(dp, kp, 1, kn, dk, nk, h.dq + i0 * h.dq_stride, h.dq_stride, R, dk);
    }
  }
}

void AttendBwdQ(const BwdQuery& h, const int64_t* end, int64_t i0, int64_t i1, const KvRows& k,
                const KvRows& v, int64_t dk, int64_t dv, float scale, float* grad_q,
                int64_t gq_stride, float* scratch) {
  const int64_t R = i1 - i0, rp = RoundUp(R, W);
  float* qt = scratch;               // [dk, rp] queries times scale, transposed
  float* ot = qt + dk * kRows;       // [dv, rp] output gradients, transposed
  float* kt = ot + dv * kRows;       // [T, dk] key tile
  float* vt = kt + kKeys * dk;       // [T, dv] value tile
  float* st = vt + kKeys * dv;       // [T, rp] scores, then dS
  float* dpt = st + kKeys * kRows;   // [T, rp] dP
  float* lse = dpt + kKeys * kRows;  // [rp]
  float* delta = lse + kRows;        // [rp]
  float* cnt = delta + kRows;        // [rp] keys of the tile each row sees
  float* row = cnt + kRows;          // one converted row
  int64_t kv_end = 0;
  for (int64_t r = 0; r < rp; ++r) {
    const bool real = r < R;
    if (real) ToFloat(QueryRow(h, i0 + r), h.q_dtype, row, dk);
    for (int64_t d = 0; d < dk; ++d) qt[d * rp + r] = real ? scale * row[d] : 0.f;
    if (real) ToFloat(DoutRow(h, i0 + r), h.dout_dtype, row, dv);
    for (int64_t d = 0; d < dv; ++d) ot[d * rp + r] = real ? row[d] : 0.f;
    lse[r] = real ? h.lse[i0 + r] : 0.f;
    delta[r] = real ? h.delta[i0 + r] : 0.f;
    if (real && lse[r] != kNegInf) kv_end = std::max(kv_end, end[i0 + r]);
  }
  float* gq = grad_q + i0 * gq_stride;
  for (int64_t r = 0; r < R; ++r) std::fill_n(gq + r * gq_stride, dk, 0.f);
  for (int64_t t0 = 0; t0 < kv_end; t0 += kKeys) {
    const int64_t tn = std::min(kKeys, kv_end - t0);
    for (int64_t t = 0; t < tn; ++t) {
      RowToFloat(k, t0 + t, kt + t * dk, dk);
      RowToFloat(v, t0 + t, vt + t * dv, dv);
    }
    for (int64_t r = 0; r < rp; ++r)
      cnt[r] = r < R ? float(SeenKeys(lse[r], end[i0 + r], t0, tn)) : 0.f;
    Gemm<false>(kt, dk, 1, qt, rp, dk, st, rp, tn, rp);   // S^T = K (scale Q)^T
    Gemm<false>(vt, dv, 1, ot, rp, dv, dpt, rp, tn, rp);  // dP^T = V dO^T
    GradScoresRows(st, dpt, rp, tn, cnt, lse, delta);
    Gemm<true>(st, 1, rp, kt, dk, tn, gq, gq_stride, R, dk);  // dQ += dS K
  }
  for (int64_t r = 0; r < R; ++r) ScaleRow(gq + r * gq_stride, dk, scale);
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
