// The tile kernel's 8-bit steps on AVX-512 VNNI (vpdpbusd): Q.K over 8-bit
// keys (QkInt8) and P.V over 8-bit V with P in bytes (PvInt8Tile); kInt8Qk
// and kInt8Pv say whether this ISA has them.
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>
#include <cstring>

#include "ffi/cpu/kernels/common.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Q.K over 8-bit keys (q8_0, q8_kv) on VNNI integer dot products. The query
// rows arrive already rounded to 8 bits per block of 32 (RoundQueryToQ8), so
// this computes the same scores as the float path, exactly up to float32
// rounding. vpdpbusd multiplies unsigned by signed bytes: the key bytes are
// taken + 128 (unsigned, the broadcast operand) and the query bytes (signed)
// are the vector one, so for block j of 32 values
//   sum_i q_i k_i = dpbusd(k + 128, q) - 128 * sum_i q_i,
// where the query block sums are computed once per call. A score is
//   s[r][t] = sum_j qd[r][j] * kd[t][j] * (dot_j - 128 * qsum[r][j]).
constexpr bool kInt8Qk = true;
constexpr int kInt8Keys = 8;  // keys per register block (8 int + 8 float accumulators)

// Re-quantizes the (already 8-bit-valued) query rows into the VNNI layout:
// qi[((j * 8 + g) * rp + r) * 4 + b] = q[r][32 j + 4 g + b] (int8),
// qd[j * rp + r] = the block's scale and qc[j * rp + r] = 128 * the sum of
// its values; padding rows are zeros.
void PrepareInt8Queries(const RowBlock& rows, int64_t rp, int64_t dk, int8_t* qi, float* qd,
                        float* qc) {
  const int64_t nb = dk / kQBlock;
  for (int64_t r = 0; r < rp; ++r) {
    for (int64_t j = 0; j < nb; ++j) {
      int32_t qq[kQBlock];
      const float d = QueryBlockQ8(r < rows.n_rows ? rows.q + r * dk + j * kQBlock : nullptr, qq);
      int32_t sum = 0;
      for (int64_t i = 0; i < kQBlock; ++i) sum += qq[i];
      qd[j * rp + r] = d;
      qc[j * rp + r] = 128.f * float(sum);
      for (int g = 0; g < 8; ++g)
        for (int b = 0; b < 4; ++b) qi[((j * 8 + g) * rp + r) * 4 + b] = int8_t(qq[4 * g + b]);
    }
  }
}

// Packs the bytes + 128 of the n <= kInt8Keys keys from t0 block-major into
// a sub-tile that stays in L1, kp[(j * kInt8Keys + i) * 32 + b] = key t0 + i's
// value 32 j + b + 128 (zeros for keys [n, kInt8Keys), whose scales are 0), so
// the register block reads one contiguous run per block; and per key i and
// block j stores the block's scale kd[i * nb + j].
void PrepareInt8Keys(const KvRows& k, int64_t t0, int64_t n, int64_t dk, uint8_t* kp, float* kd) {
  constexpr int KB = kInt8Keys;
  const int64_t nb = dk / kQBlock;
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  for (int64_t t = 0; t < KB; ++t) {
    float* kdt = kd + t * nb;
    if (t >= n) {
      std::fill(kdt, kdt + nb, 0.f);
      for (int64_t j = 0; j < nb; ++j) std::memset(kp + (j * KB + t) * kQBlock, 0, kQBlock);
      continue;
    }
    const auto* row = static_cast<const int8_t*>(RowPtr(k, t0 + t));
    RowScales(k, t0 + t, nb, kdt);
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(row + j * kQBlock), bias);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + (j * KB + t) * kQBlock),
                          _mm512_castsi512_si256(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + ((j + 1) * KB + t) * kQBlock),
                          _mm512_extracti64x4_epi64(v, 1));
    }
    for (; j < nb; ++j)
      for (int64_t i = 0; i < kQBlock; ++i)
        kp[(j * KB + t) * kQBlock + i] = uint8_t(row[j * kQBlock + i] ^ 0x80);
  }
}

// st[i][r0 .. r0 + 16) for the kInt8Keys keys of the sub-tile kp, kd.
void QkInt8(const int8_t* qi, const float* qd, const float* qc, int64_t rp, int64_t r0,
            const uint8_t* kp, int64_t dk, const float* kd, float* st) {
  constexpr int KB = kInt8Keys;
  const int64_t nb = dk / kQBlock;
  __m512 s[KB];
  for (auto& x : s) x = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    __m512i qv[8];
    for (int g = 0; g < 8; ++g) qv[g] = _mm512_loadu_si512(qi + ((j * 8 + g) * rp + r0) * 4);
    const uint8_t* kb = kp + j * KB * kQBlock;  // KB keys x 32 bytes, contiguous
    __m512i acc[KB];
    for (auto& a : acc) a = _mm512_setzero_si512();
    for (int g = 0; g < 8; ++g) {
      for (int i = 0; i < KB; ++i) {
        int32_t kw;
        std::memcpy(&kw, kb + i * kQBlock + 4 * g, sizeof kw);
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(kw), qv[g]);
      }
    }
    const __m512 qdv = _mm512_loadu_ps(qd + j * rp + r0);
    const __m512 qcv = _mm512_loadu_ps(qc + j * rp + r0);
    for (int i = 0; i < KB; ++i) {
      const __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps(acc[i]), qcv);
      s[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(qdv, _mm512_set1_ps(kd[i * nb + j])), s[i]);
    }
  }
  for (int i = 0; i < KB; ++i) _mm512_storeu_ps(st + i * rp + r0, s[i]);
}

// P.V over 8-bit V on vpdpbusd: the rounded P (unsigned bytes, quant_format.h)
// is the broadcast operand, four keys per dword, and V's int8 values the
// vector one, interleaved four keys per dword; the int32 sums are exact and
// equal the float path's (PvQBlock), so every ISA computes the same output.
constexpr bool kInt8Pv = true;

// P bytes for one tile: pqd[(j * T / 4 + u) * rp + r] holds q of keys
// 4u .. 4u + 3 (zero past tn) for V block j; ps as QuantizeProbs.
void QuantizeProbsU8(const float* st, int64_t rp, int64_t tn, const float* vd, int64_t nbv,
                     uint32_t* pqd, float* ps) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f),
               levels = _mm512_set1_ps(kPLevels), tiny = _mm512_set1_ps(kPTiny);
  // Per 128-bit lane, after the two packs below: q0 of the lane's 4 rows, then
  // q1, q2, q3; this shuffle makes each row's dword (q0, q1, q2, q3).
  const __m512i transpose =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  const int64_t nq = (tn + 3) / 4;
  alignas(64) float xb[T * 16];  // x of one block and 16 rows, zeros past tn
  for (int64_t t = tn; t < 4 * nq; ++t) _mm512_store_ps(xb + t * 16, zero);
  for (int64_t j = 0; j < nbv; ++j) {
    for (int64_t r0 = 0; r0 < rp; r0 += 16) {
      __m512 amax = zero;
      for (int64_t t = 0; t < tn; ++t) {
        const __m512 x =
            _mm512_mul_ps(_mm512_loadu_ps(st + t * rp + r0), _mm512_set1_ps(vd[t * nbv + j]));
        _mm512_store_ps(xb + t * 16, x);
        amax = _mm512_max_ps(amax, x);
      }
      const __m512 d = _mm512_div_ps(amax, levels);
      const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, tiny, _CMP_GE_OQ), one, d);
      _mm512_storeu_ps(ps + j * rp + r0, d);
      for (int64_t u = 0; u < nq; ++u) {
        __m512i q[4];
        for (int b = 0; b < 4; ++b)
          q[b] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_load_ps(xb + (4 * u + b) * 16), id),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // q in [0, 255]: the unsigned saturating packs keep every value.
        const __m512i bytes =
            _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]));
        _mm512_storeu_si512(pqd + (j * (T / 4) + u) * rp + r0,
                            _mm512_shuffle_epi8(bytes, transpose));
      }
    }
  }
}

// V's int8 values of columns [k0, k0 + nk) (nk <= 64, a multiple of 16) of
// one tile, four keys per dword: vp[((m * T / 4 + u) * 16 + i) * 4 + b] =
// V[4u + b][k0 + 16 m + i] (zeros past tn), 4 KiB at most, packed just before
// the row blocks read it so it stays in L1. Per 4 keys: a dword transpose
// inside each row's vector (so that the byte/word unpacks below, which work
// per 128-bit lane, produce whole 16-column chunks), then two rounds of
// unpacks.
void PackVInt8Cols(const KvRows& v, int64_t t0, int64_t tn, int64_t k0, int64_t nk, int8_t* vp) {
  const int64_t nc = nk / 16, nq = (tn + 3) / 4;
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __mmask64 mask = nk >= 64 ? ~__mmask64(0) : (__mmask64(1) << nk) - 1;
  for (int64_t u = 0; u < nq; ++u) {
    __m512i a[4];
    for (int b = 0; b < 4; ++b) {
      const int64_t t = 4 * u + b;
      a[b] = t < tn ? _mm512_permutexvar_epi32(
                          idx, _mm512_maskz_loadu_epi8(
                                   mask, static_cast<const int8_t*>(RowPtr(v, t0 + t)) + k0))
                    : _mm512_setzero_si512();
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(a[0], a[1]), hi01 = _mm512_unpackhi_epi8(a[0], a[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(a[2], a[3]), hi23 = _mm512_unpackhi_epi8(a[2], a[3]);
    const __m512i out[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                            _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int m = 0; m < 4; ++m)
      if (m < nc) _mm512_storeu_si512(vp + (m * (T / 4) + u) * 64, out[m]);
  }
}

// o[r][16 c ..) += ps[j][r] * sum_u dpbusd(P dword, V chunk) for RB rows from
// r0 and CB 16-column chunks from c0 (chunk c lies in V block c / 2); vp holds
// chunks c0 .. c0 + CB as PackVInt8Cols packs them.
template <int RB, int CB>
void PvInt8Block(const uint32_t* pqd, const float* ps, int64_t rp, int64_t r0, const int8_t* vp,
                 int64_t nq, float* o, int64_t dv, int64_t c0) {
  __m512i acc[RB][CB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_si512();
  for (int64_t u = 0; u < nq; ++u) {
    __m512i vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = _mm512_loadu_si512(vp + (c * (T / 4) + u) * 64);
    for (int i = 0; i < RB; ++i) {
      for (int c = 0; c < CB; ++c) {
        const int64_t j = (c0 + c) / 2;
        const __m512i p = _mm512_set1_epi32(int32_t(pqd[(j * (T / 4) + u) * rp + r0 + i]));
        acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], p, vv[c]);
      }
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int c = 0; c < CB; ++c) {
      const int64_t j = (c0 + c) / 2;
      float* op = o + (r0 + i) * dv + 16 * (c0 + c);
      _mm512_storeu_ps(op, _mm512_fmadd_ps(_mm512_set1_ps(ps[j * rp + r0 + i]),
                                           _mm512_cvtepi32_ps(acc[i][c]), _mm512_loadu_ps(op)));
    }
  }
}

// PvInt8Block<4, 4> for c0 % 4 == 0 (chunks c0, c0 + 1 in V block c0 / 2,
// c0 + 2, c0 + 3 in the next) with the step in asm: from intrinsics GCC 12
// copied every accumulator to a fresh register and back around each
// vpdpbusd (16 extra moves a step) and broadcast each P dword once per chunk.
void PvInt8Rows4x4(const uint32_t* pqd, const float* ps, int64_t rp, int64_t r0, const int8_t* vp,
                   int64_t nq, float* o, int64_t dv, int64_t c0) {
  static_assert(T / 4 * 64 == 1024, "the asm below steps 1024 bytes between chunks");
  const int64_t j0 = c0 / 2;
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00,
          a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00,
          a32 = a00, a33 = a00;
  const uint32_t* p0 = pqd + j0 * (T / 4) * rp + r0;
  const uint32_t* p1 = p0 + (T / 4) * rp;
  for (int64_t u = 0; u < nq; ++u, vp += 64, p0 += rp, p1 += rp) {
    // Two statements (one has at most 30 operands): the first loads the four
    // V chunks and runs rows 0, 1; the second takes them for rows 2, 3.
    __m512i v0, v1, v2, v3, pp;
    asm("vmovdqu64 (%[v]), %[v0]\n\t"
        "vmovdqu64 1024(%[v]), %[v1]\n\t"
        "vmovdqu64 2048(%[v]), %[v2]\n\t"
        "vmovdqu64 3072(%[v]), %[v3]\n\t"
        "vpbroadcastd (%[p0]), %[pp]\n\t"
        "vpdpbusd %[v0], %[pp], %[a00]\n\t"
        "vpdpbusd %[v1], %[pp], %[a01]\n\t"
        "vpbroadcastd (%[p1]), %[pp]\n\t"
        "vpdpbusd %[v2], %[pp], %[a02]\n\t"
        "vpdpbusd %[v3], %[pp], %[a03]\n\t"
        "vpbroadcastd 4(%[p0]), %[pp]\n\t"
        "vpdpbusd %[v0], %[pp], %[a10]\n\t"
        "vpdpbusd %[v1], %[pp], %[a11]\n\t"
        "vpbroadcastd 4(%[p1]), %[pp]\n\t"
        "vpdpbusd %[v2], %[pp], %[a12]\n\t"
        "vpdpbusd %[v3], %[pp], %[a13]"
        : [a00] "+v"(a00), [a01] "+v"(a01), [a02] "+v"(a02), [a03] "+v"(a03), [a10] "+v"(a10),
          [a11] "+v"(a11), [a12] "+v"(a12), [a13] "+v"(a13), [v0] "=&v"(v0), [v1] "=&v"(v1),
          [v2] "=&v"(v2), [v3] "=&v"(v3), [pp] "=&v"(pp)
        : [v] "r"(vp), [p0] "r"(p0), [p1] "r"(p1)
        : "memory");
    asm("vpbroadcastd 8(%[p0]), %[pp]\n\t"
        "vpdpbusd %[v0], %[pp], %[a20]\n\t"
        "vpdpbusd %[v1], %[pp], %[a21]\n\t"
        "vpbroadcastd 8(%[p1]), %[pp]\n\t"
        "vpdpbusd %[v2], %[pp], %[a22]\n\t"
        "vpdpbusd %[v3], %[pp], %[a23]\n\t"
        "vpbroadcastd 12(%[p0]), %[pp]\n\t"
        "vpdpbusd %[v0], %[pp], %[a30]\n\t"
        "vpdpbusd %[v1], %[pp], %[a31]\n\t"
        "vpbroadcastd 12(%[p1]), %[pp]\n\t"
        "vpdpbusd %[v2], %[pp], %[a32]\n\t"
        "vpdpbusd %[v3], %[pp], %[a33]"
        : [a20] "+v"(a20), [a21] "+v"(a21), [a22] "+v"(a22), [a23] "+v"(a23), [a30] "+v"(a30),
          [a31] "+v"(a31), [a32] "+v"(a32), [a33] "+v"(a33), [pp] "=&v"(pp)
        : [v0] "v"(v0), [v1] "v"(v1), [v2] "v"(v2), [v3] "v"(v3), [p0] "r"(p0), [p1] "r"(p1)
        : "memory");
  }
  const __m512i acc[4][4] = {
      {a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
  for (int i = 0; i < 4; ++i) {
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + c / 2;
      float* op = o + (r0 + i) * dv + 16 * (c0 + c);
      _mm512_storeu_ps(op, _mm512_fmadd_ps(_mm512_set1_ps(ps[j * rp + r0 + i]),
                                           _mm512_cvtepi32_ps(acc[i][c]), _mm512_loadu_ps(op)));
    }
  }
}

// P.V for the tile's R rows, 64 columns at a time: V's columns packed, then
// every row block over them.
void PvInt8Tile(const KvRows& v, int64_t t0, int64_t tn, const uint32_t* pqd, const float* ps,
                int64_t rp, int64_t R, int8_t* vp, float* o, int64_t dv) {
  const int64_t nq = (tn + 3) / 4;
  for (int64_t k0 = 0; k0 < dv; k0 += 64) {
    const int64_t nk = std::min<int64_t>(64, dv - k0), c0 = k0 / 16;
    PackVInt8Cols(v, t0, tn, k0, nk, vp);
    int64_t r0 = 0;
    if (nk == 64) {
      for (; r0 + 4 <= R; r0 += 4) PvInt8Rows4x4(pqd, ps, rp, r0, vp, nq, o, dv, c0);
      for (; r0 < R; ++r0) PvInt8Block<1, 4>(pqd, ps, rp, r0, vp, nq, o, dv, c0);
    } else {
      for (int64_t c = 0; c < nk / 16; ++c) {
        const int8_t* vc = vp + c * (T / 4) * 64;
        for (r0 = 0; r0 + 4 <= R; r0 += 4)
          PvInt8Block<4, 1>(pqd, ps, rp, r0, vc, nq, o, dv, c0 + c);
        for (; r0 < R; ++r0) PvInt8Block<1, 1>(pqd, ps, rp, r0, vc, nq, o, dv, c0 + c);
      }
    }
  }
}
#else
constexpr bool kInt8Qk = false;
constexpr bool kInt8Pv = false;
#endif

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
