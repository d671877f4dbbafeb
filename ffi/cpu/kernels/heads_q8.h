// Few rows per KV head over several KV heads of an 8-bit cache (q8_0, q8_kv):
// scores, softmax with rounded P, and P.V four keys at a time across the
// heads (AttendHeadsQ8).
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "ffi/cpu/kernels/common.h"
#include "ffi/cpu/kernels/dot_q8.h"
#include "ffi/cpu/kernels/gemv.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// Decode with few rows per KV head over several KV heads of an 8-bit cache
// (K and V each q8_0 or q8_kv, Dk and Dv multiples of 32): AttendHeads for
// 8-bit rows. Head by head (AttendFewQ) one head's rows are a cache row
// apart and the loads wait on memory; here each group of kPGroup keys is
// walked key by key across the heads, in memory order:
//   1. scores: every head's rows against that head's K row of the key
//      (DotQ8Row: integer dot products where the ISA has them);
//   2. per row: the online-softmax step and P rounded to 8 bits per V block
//      (quant_format.h), vectorized over the group's keys;
//   3. P.V: four keys at a time, each head's four V rows interleaved into
//      its rows' exact int32 sums (VNNI: vpdpbusd on the bytes; AVX2:
//      vpmaddwd on key pairs; generic: float sums of integers); the group
//      ends with o += d * sum per V block (HeadsQ8Flush).
// The interleaving leaves the sums' columns permuted within each vector
// block; HeadsQ8Flush puts them back once per group.
constexpr int64_t kHeadsQ8Keys = 4;  // keys per P.V step
static_assert(kPGroup % kHeadsQ8Keys == 0, "P.V steps divide the group");

struct HeadsQ8Work {
  int64_t ql, nbv, dv;  // floats of query lanes per row; V blocks; Dv
  float* lanes;         // [rows, ql] each row's 8-bit query (QueryLanes)
  float* s;             // [rows, kPGroup] scores, then P
  float* pq;            // [rows, nbv, kPGroup] rounded P (bytes, int16 or floats)
  float* ps;            // [rows, nbv] their scales
  float* acc;           // [rows, dv] the group's sums (int32; generic: float)
  float* vd;            // [nbv, kPGroup] one head's V scales, key-minor
  float* kbuf;          // [dk] generic: a dequantized K row
  int64_t* n;           // [rows] keys of the group each row sees
  float* S(int64_t r) const { return s + r * kPGroup; }
  float* Pq(int64_t r) const { return pq + r * nbv * kPGroup; }
  float* Ps(int64_t r) const { return ps + r * nbv; }
  float* Acc(int64_t r) const { return acc + r * dv; }
};

HeadsQ8Work CarveHeadsQ8(float* scratch, int64_t nr, int64_t dk, int64_t dv) {
  HeadsQ8Work w;
  w.ql = 3 * RoundUp(dk / 4, 16);
  w.nbv = dv / kQBlock;
  w.dv = dv;
  w.lanes = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  w.s = w.lanes + nr * w.ql;
  w.pq = w.s + nr * kPGroup;
  w.acc = w.pq + nr * w.nbv * kPGroup;
  w.ps = w.acc + nr * dv;
  w.vd = w.ps + RoundUp(nr * w.nbv, 16);
  w.kbuf = w.vd + w.nbv * kPGroup;
  w.n = reinterpret_cast<int64_t*>(w.kbuf + RoundUp(dk, 16));
  return w;
}

// Row r's P for the group (quant_format.h, the same float32 operations as
// QuantizeProbs) from its probabilities s (0 past its n keys) and the
// head's V scales vd: pq[j][t] = q_t, stored as bytes (VNNI), int16 (AVX2)
// or floats, and ps[j] = d.
void RoundGroupP(const float* s, int64_t n, const float* vd, int64_t nbv, float* pq, float* ps) {
  constexpr int64_t NV = kPGroup / W;
  const F32 zero = F32::Zero(), nv = F32::Splat(float(n));
  for (int64_t j = 0; j < nbv; ++j) {
    F32 x[NV];
    F32 amax = zero;
    for (int64_t v = 0; v < NV; ++v) {
      // Keys past n: x = 0, never 0 * a scale that may not be finite.
      x[v] = simd::SelectLt(simd::Add(F32::Iota(), F32::Splat(float(v * W))), nv,
                            simd::Mul(F32::Load(s + v * W), F32::Load(vd + j * kPGroup + v * W)),
                            zero);
      amax = simd::Max(amax, x[v]);
    }
    alignas(64) float lanes[W];
    amax.Store(lanes);
    const float a = *std::max_element(lanes, lanes + W);
    const float d = a / kPLevels;
    const F32 id = F32::Splat(a < kPTiny ? 0.f : 1.f / d);
    ps[j] = d;
    for (int64_t v = 0; v < NV; ++v) {
      const F32 q = simd::Round(simd::Mul(x[v], id));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(reinterpret_cast<uint8_t*>(pq) + j * kPGroup + v * W),
          _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q.v)));
#elif defined(__AVX2__)
      const __m256i qi = _mm256_cvtps_epi32(q.v);
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(reinterpret_cast<int16_t*>(pq) + j * kPGroup + v * W),
          _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1)));
#else
      q.Store(pq + j * kPGroup + v * W);
#endif
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Four keys' V rows (bytes) to four vectors of 16 columns x 4 keys: vector i,
// 128-bit lane L, dword k holds column 16 L + 4 i + k of the four keys.
inline void InterleaveKeys4(__m512i a0, __m512i a1, __m512i a2, __m512i a3, __m512i* c) {
  const __m512i b0 = _mm512_unpacklo_epi8(a0, a1), b1 = _mm512_unpackhi_epi8(a0, a1);
  const __m512i b2 = _mm512_unpacklo_epi8(a2, a3), b3 = _mm512_unpackhi_epi8(a2, a3);
  c[0] = _mm512_unpacklo_epi16(b0, b2);
  c[1] = _mm512_unpackhi_epi16(b0, b2);
  c[2] = _mm512_unpacklo_epi16(b1, b3);
  c[3] = _mm512_unpackhi_epi16(b1, b3);
}

// P.V of keys [t, t + 4) of one head: vr are its four V rows; the rows
// rows0 .. rows0 + nrow of w that see key t take them. Columns 64 c .. + 64
// of a row's sums hold vector i of InterleaveKeys4 at 16 i; a last block of
// 32 columns (Dv = 32 mod 64) is the same on 256 bits (vector i at 8 i).
void HeadsQ8Pv(const HeadsQ8Work& w, int64_t r0, int64_t nrow, const int8_t* const* vr, int64_t t) {
  const int64_t dv = w.dv;
  int64_t c0 = 0;
  for (; c0 + 64 <= dv; c0 += 64) {
    __m512i c[4];
    InterleaveKeys4(_mm512_loadu_si512(vr[0] + c0), _mm512_loadu_si512(vr[1] + c0),
                    _mm512_loadu_si512(vr[2] + c0), _mm512_loadu_si512(vr[3] + c0), c);
    const int64_t j = c0 / kQBlock;
    for (int64_t r = r0; r < r0 + nrow; ++r) {
      if (w.n[r] <= t) continue;
      const uint32_t* p = reinterpret_cast<const uint32_t*>(w.Pq(r)) + t / 4;
      const __m512i pv = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(int(p[j * kPGroup / 4])),
                                                 _mm512_set1_epi32(int(p[(j + 1) * kPGroup / 4])));
      int32_t* acc = reinterpret_cast<int32_t*>(w.Acc(r)) + c0;
      for (int i = 0; i < 4; ++i)
        _mm512_storeu_si512(acc + 16 * i,
                            _mm512_dpbusd_epi32(_mm512_loadu_si512(acc + 16 * i), pv, c[i]));
    }
  }
  if (c0 < dv) {
    __m256i a[4], b[4], c[4];
    for (int i = 0; i < 4; ++i)
      a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr[i] + c0));
    b[0] = _mm256_unpacklo_epi8(a[0], a[1]);
    b[1] = _mm256_unpackhi_epi8(a[0], a[1]);
    b[2] = _mm256_unpacklo_epi8(a[2], a[3]);
    b[3] = _mm256_unpackhi_epi8(a[2], a[3]);
    c[0] = _mm256_unpacklo_epi16(b[0], b[2]);
    c[1] = _mm256_unpackhi_epi16(b[0], b[2]);
    c[2] = _mm256_unpacklo_epi16(b[1], b[3]);
    c[3] = _mm256_unpackhi_epi16(b[1], b[3]);
    for (int64_t r = r0; r < r0 + nrow; ++r) {
      if (w.n[r] <= t) continue;
      const uint32_t* p = reinterpret_cast<const uint32_t*>(w.Pq(r)) + t / 4;
      const __m256i pv = _mm256_set1_epi32(int(p[c0 / kQBlock * kPGroup / 4]));
      int32_t* acc = reinterpret_cast<int32_t*>(w.Acc(r)) + c0;
      for (int i = 0; i < 4; ++i) {
        __m256i* a8 = reinterpret_cast<__m256i*>(acc + 8 * i);
        _mm256_storeu_si256(a8, _mm256_dpbusd_epi32(_mm256_loadu_si256(a8), pv, c[i]));
      }
    }
  }
}

// o += d_j * sum for row r, the sums back in column order, then zeroed.
void HeadsQ8Flush(const HeadsQ8Work& w, int64_t r, float* o) {
  int32_t* acc = reinterpret_cast<int32_t*>(w.Acc(r));
  const float* ps = w.Ps(r);
  int64_t c0 = 0;
  for (; c0 + 64 <= w.dv; c0 += 64) {
    __m512i c[4];
    for (int i = 0; i < 4; ++i) c[i] = _mm512_loadu_si512(acc + c0 + 16 * i);
    // A 4 x 4 transpose of 128-bit blocks: out[L] = lane L of c[0..3].
    const __m512i t0 = _mm512_shuffle_i32x4(c[0], c[1], 0x44),
                  t1 = _mm512_shuffle_i32x4(c[2], c[3], 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(c[0], c[1], 0xEE),
                  t3 = _mm512_shuffle_i32x4(c[2], c[3], 0xEE);
    const __m512i out[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xDD),
                            _mm512_shuffle_i32x4(t2, t3, 0x88), _mm512_shuffle_i32x4(t2, t3, 0xDD)};
    for (int L = 0; L < 4; ++L) {
      float* oc = o + c0 + 16 * L;
      _mm512_storeu_ps(
          oc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(out[L]),
                              _mm512_set1_ps(ps[(c0 + 16 * L) / kQBlock]), _mm512_loadu_ps(oc)));
    }
  }
  if (c0 < w.dv) {
    __m256i c[4];
    for (int i = 0; i < 4; ++i)
      c[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c0 + 8 * i));
    const __m256i out[4] = {
        _mm256_permute2x128_si256(c[0], c[1], 0x20), _mm256_permute2x128_si256(c[2], c[3], 0x20),
        _mm256_permute2x128_si256(c[0], c[1], 0x31), _mm256_permute2x128_si256(c[2], c[3], 0x31)};
    const __m256 d = _mm256_set1_ps(ps[c0 / kQBlock]);
    for (int L = 0; L < 4; ++L) {
      float* oc = o + c0 + 8 * L;
      _mm256_storeu_ps(oc, _mm256_fmadd_ps(_mm256_cvtepi32_ps(out[L]), d, _mm256_loadu_ps(oc)));
    }
  }
  std::fill(acc, acc + w.dv, 0);
}
#elif defined(__AVX2__)
// P.V of keys [t, t + 4) of one head on vpmaddwd: per 16 columns, the keys'
// values widened to int16 and interleaved in pairs; a row's sums at column
// e .. e + 16 hold lanes (e + 0..3, e + 8..11) at e and (e + 4..7, e + 12..15)
// at e + 8, as _mm256_unpack{lo,hi}_epi16 leave them.
void HeadsQ8Pv(const HeadsQ8Work& w, int64_t r0, int64_t nrow, const int8_t* const* vr, int64_t t) {
  for (int64_t e = 0; e < w.dv; e += 16) {
    __m256i a[4];
    for (int i = 0; i < 4; ++i)
      a[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr[i] + e)));
    const __m256i lo01 = _mm256_unpacklo_epi16(a[0], a[1]),
                  hi01 = _mm256_unpackhi_epi16(a[0], a[1]);
    const __m256i lo23 = _mm256_unpacklo_epi16(a[2], a[3]),
                  hi23 = _mm256_unpackhi_epi16(a[2], a[3]);
    for (int64_t r = r0; r < r0 + nrow; ++r) {
      if (w.n[r] <= t) continue;
      const uint32_t* p =
          reinterpret_cast<const uint32_t*>(w.Pq(r)) + e / kQBlock * kPGroup / 2 + t / 2;
      const __m256i p01 = _mm256_set1_epi32(int(p[0])), p23 = _mm256_set1_epi32(int(p[1]));
      __m256i* acc = reinterpret_cast<__m256i*>(reinterpret_cast<int32_t*>(w.Acc(r)) + e);
      _mm256_storeu_si256(acc, _mm256_add_epi32(_mm256_loadu_si256(acc),
                                                _mm256_add_epi32(_mm256_madd_epi16(lo01, p01),
                                                                 _mm256_madd_epi16(lo23, p23))));
      _mm256_storeu_si256(acc + 1,
                          _mm256_add_epi32(_mm256_loadu_si256(acc + 1),
                                           _mm256_add_epi32(_mm256_madd_epi16(hi01, p01),
                                                            _mm256_madd_epi16(hi23, p23))));
    }
  }
}

void HeadsQ8Flush(const HeadsQ8Work& w, int64_t r, float* o) {
  int32_t* acc = reinterpret_cast<int32_t*>(w.Acc(r));
  const float* ps = w.Ps(r);
  for (int64_t e = 0; e < w.dv; e += 16) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + e));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + e + 8));
    const __m256 d = _mm256_set1_ps(ps[e / kQBlock]);
    _mm256_storeu_ps(o + e,
                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20)), d,
                                     _mm256_loadu_ps(o + e)));
    _mm256_storeu_ps(o + e + 8,
                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x31)), d,
                                     _mm256_loadu_ps(o + e + 8)));
  }
  std::fill(acc, acc + w.dv, 0);
}
#else
void HeadsQ8Pv(const HeadsQ8Work& w, int64_t r0, int64_t nrow, const int8_t* const* vr, int64_t t) {
  for (int64_t r = r0; r < r0 + nrow; ++r) {
    if (w.n[r] <= t) continue;
    float* acc = w.Acc(r);
    for (int64_t e = 0; e < w.dv; ++e) {
      const float* p = w.Pq(r) + e / kQBlock * kPGroup + t;
      for (int64_t i = 0; i < kHeadsQ8Keys; ++i) acc[e] += p[i] * float(vr[i][e]);
    }
  }
}

void HeadsQ8Flush(const HeadsQ8Work& w, int64_t r, float* o) {
  float* acc = w.Acc(r);
  for (int64_t e = 0; e < w.dv; ++e) o[e] += w.Ps(r)[e / kQBlock] * acc[e];
  std::fill(acc, acc + w.dv, 0.f);
}
#endif

// V's scales of keys g0 .. g0 + n (n <= kPGroup) of one head (its rows
// `v`), key-minor: vd[j * kPGroup + t] = key g0 + t's scale of block j
// (RowScales). Gathered 16 (AVX2: 8) keys at a time, two float16 scales a
// dword (the last of an odd count with the one before it, so no read passes
// the row's scales). g0 is a multiple of kPGroup, so each gather's keys lie
// in one page of a paged cache (pages hold 16 keys or more).
void GroupVScales(const KvRows& v, int64_t g0, int64_t n, int64_t nbv, float* vd) {
  const QFormat fmt = v.fmt;
  [[maybe_unused]] const int srb = int(v.scale_row_bytes);
#if defined(__AVX512F__)
  const __m512i idx =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(srb));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
    const char* b = v.Scales(g0 + t);
    if (fmt == QFormat::kQ8KV) {
      const __m512 d = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, b, 1);
      for (int64_t j = 0; j < nbv; ++j) _mm512_storeu_ps(vd + j * kPGroup + t, d);
      continue;
    }
    for (int64_t j = 0; j < nbv; j += 2) {
      const int64_t j0 = std::min(j, nbv - 2);  // nbv >= 2 (HeadsQ8Takes)
      const __m512i dw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, b + 2 * j0, 1);
      _mm512_storeu_ps(vd + j0 * kPGroup + t, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw)));
      _mm512_storeu_ps(vd + (j0 + 1) * kPGroup + t,
                       _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dw, 16))));
    }
  }
#elif defined(__AVX2__)
  const __m256i idx =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(srb));
  for (int64_t t = 0; t < n; t += 8) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - t)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const char* b = v.Scales(g0 + t);
    if (fmt == QFormat::kQ8KV) {
      const __m256 d = _mm256_mask_i32gather_ps(
          _mm256_setzero_ps(), reinterpret_cast<const float*>(b), idx, _mm256_castsi256_ps(m), 1);
      for (int64_t j = 0; j < nbv; ++j) _mm256_storeu_ps(vd + j * kPGroup + t, d);
      continue;
    }
    for (int64_t j = 0; j < nbv; j += 2) {
      const int64_t j0 = std::min(j, nbv - 2);
      const __m256i dw = _mm256_mask_i32gather_epi32(
          _mm256_setzero_si256(), reinterpret_cast<const int*>(b + 2 * j0), idx, m, 1);
      const __m256i lo = _mm256_and_si256(dw, _mm256_set1_epi32(0xFFFF)),
                    hi = _mm256_srli_epi32(dw, 16);
      _mm256_storeu_ps(vd + j0 * kPGroup + t,
                       _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(lo),
                                                        _mm256_extracti128_si256(lo, 1))));
      _mm256_storeu_ps(vd + (j0 + 1) * kPGroup + t,
                       _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi),
                                                        _mm256_extracti128_si256(hi, 1))));
    }
  }
#else
  float vdt[kMaxHeadDim / kQBlock];
  for (int64_t t = 0; t < n; ++t) {
    BlockScales(v.Scales(g0 + t), fmt, nbv, vdt);
    for (int64_t j = 0; j < nbv; ++j) vd[j * kPGroup + t] = vdt[j];
  }
#endif
}

// Stands in for V rows past the last key of a P.V step (their P is 0).
alignas(64) constexpr int8_t kZeroRow[kMaxHeadDim] = {};

void AttendHeadsQ8(const RowBlock* rows, int64_t nh, const KvHeads& k, const KvHeads& v, int64_t dk,
                   int64_t dv, int64_t kv_begin, float* scratch) {
  const int64_t R = rows[0].n_rows, nr = nh * R;
  const HeadsQ8Work w = CarveHeadsQ8(scratch, nr, dk, dv);
  int64_t kv_end = kv_begin;
  for (int64_t u = 0; u < nh; ++u)
    for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows[u].end[r]);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  auto lanes = [&](int64_t row) {
    float* p = w.lanes + row * w.ql;
    return QueryLanes{reinterpret_cast<int8_t*>(p), p + w.ql / 3,
                      reinterpret_cast<int32_t*>(p + 2 * w.ql / 3)};
  };
#elif defined(__AVX2__)
  auto lanes = [&](int64_t row) {
    float* p = w.lanes + row * w.ql;
    return QueryLanes{reinterpret_cast<int8_t*>(p), p + w.ql / 3};
  };
#endif
  for (int64_t u = 0; u < nh; ++u) {
    for (int64_t r = 0; r < R; ++r) {
#if defined(__AVX2__)
      PrepareQueryLanesQ8(rows[u].q + r * dk, dk, lanes(u * R + r));
#endif
      std::fill(w.Acc(u * R + r), w.Acc(u * R + r) + dv, 0.f);  // int32 0 has float 0's bits
    }
  }
  // Head u's row t (scales) at head0's row t (scales) + u * head bytes.
  const KvRows &k0 = k.head0, &v0 = v.head0;
  const int64_t khb = k.head_bytes, kshb = k.scale_head_bytes;
  const int64_t vhb = v.head_bytes, vshb = v.scale_head_bytes;
  const int64_t nbv = w.nbv;
  for (int64_t g0 = kv_begin; g0 < kv_end; g0 += kPGroup) {
    const int64_t nmax = std::min(kPGroup, kv_end - g0);
    for (int64_t u = 0; u < nh; ++u)
      for (int64_t r = 0; r < R; ++r)
        w.n[u * R + r] = std::clamp<int64_t>(rows[u].end[r] - g0, 0, nmax);
    // 1. Scores, key by key across the heads. K rows, values and scales
    // are four streams, more than the hardware prefetchers keep ahead of:
    // the K rows and scales kAhead keys on (up to the last key: a paged
    // cache's table holds no page past it) are prefetched, and the group's
    // V rows and scales, which steps 2 and 3 read.
    constexpr int64_t kAhead = 4;
    for (int64_t t = 0; t < nmax; ++t) {
      const int64_t ta = std::min(g0 + t + kAhead, kv_end - 1);
      const char* kt = k0.Row(g0 + t);
      const char* kst = k0.Scales(g0 + t);
      const char* kat = k0.Row(ta);
      const char* kast = k0.Scales(ta);
      const char* vt = v0.Row(g0 + t);
      const char* vst = v0.Scales(g0 + t);
      for (int64_t u = 0; u < nh; ++u) {
        const char* ka = kat + u * khb;
        for (int64_t b = 0; b < dk; b += 64) __builtin_prefetch(ka + b);
        __builtin_prefetch(ka + dk - 1);
        __builtin_prefetch(kast + u * kshb);
        const char* vr = vt + u * vhb;
        for (int64_t b = 0; b < dv; b += 64) __builtin_prefetch(vr + b);
        __builtin_prefetch(vr + dv - 1);
        __builtin_prefetch(vst + u * vshb);
        const int8_t* krow = reinterpret_cast<const int8_t*>(kt + u * khb);
#if !defined(__AVX2__)
        bool converted = false;
#endif
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = u * R + r;
          if (w.n[row] <= t) continue;
#if defined(__AVX2__)
          w.S(row)[t] = DotQ8Row(lanes(row), krow, kst + u * kshb, k0.fmt, dk);
#else
          if (!converted) {
            KvRows kr = k0;  // the row alone, as row 0 of contiguous rows
            kr.data = krow;
            kr.scales = kst + u * kshb;
            kr.pages = nullptr;
            RowToFloat(kr, 0, w.kbuf, dk);
          }
          converted = true;
          const float* q = rows[u].q + r * dk;
          F32 a = F32::Zero();
          for (int64_t d = 0; d < dk; d += W)
            a = simd::Fma(F32::Load(q + d), F32::Load(w.kbuf + d), a);
          w.S(row)[t] = simd::ReduceAdd(a);
#endif
        }
      }
    }
    // 2. Softmax step and rounded P, head by head (V's scales are per head).
    for (int64_t u = 0; u < nh; ++u) {
      int64_t nu = 0;
      for (int64_t r = 0; r < R; ++r) nu = std::max(nu, w.n[u * R + r]);
      if (nu == 0) continue;
      GroupVScales(v0.Offset(u * vhb, u * vshb), g0, nu, nbv, w.vd);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = u * R + r;
        if (w.n[row] == 0) continue;
        const float c = SoftmaxBlock<kPGroup>(w.S(row), w.n[row], rows[u].m + r, rows[u].l + r);
        if (c != 1.f) {
          float* o = rows[u].o + r * dv;
          for (int64_t d = 0; d < dv; d += W)
            simd::Mul(F32::Load(o + d), F32::Splat(c)).Store(o + d);
        }
        RoundGroupP(w.S(row), w.n[row], w.vd, nbv, w.Pq(row), w.Ps(row));
      }
    }
    // 3. P.V, four keys at a time across the heads.
    for (int64_t t = 0; t < nmax; t += kHeadsQ8Keys) {
      const int8_t* vt[kHeadsQ8Keys];
      int64_t vstep[kHeadsQ8Keys];  // head stride, 0 for the zero row
      for (int64_t i = 0; i < kHeadsQ8Keys; ++i) {
        const bool valid = t + i < nmax;
        vt[i] = valid ? reinterpret_cast<const int8_t*>(v0.Row(g0 + t + i)) : kZeroRow;
        vstep[i] = valid ? vhb : 0;
      }
      for (int64_t u = 0; u < nh; ++u) {
        const int8_t* vr[kHeadsQ8Keys];
        for (int64_t i = 0; i < kHeadsQ8Keys; ++i) vr[i] = vt[i] + u * vstep[i];
        HeadsQ8Pv(w, u * R, R, vr, t);
      }
    }
    for (int64_t u = 0; u < nh; ++u)
      for (int64_t r = 0; r < R; ++r)
        if (w.n[u * R + r] > 0) HeadsQ8Flush(w, u * R + r, rows[u].o + r * dv);
  }
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
