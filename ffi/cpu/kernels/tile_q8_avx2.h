// The tile kernel's 8-bit steps on AVX2 without VNNI (vpmaddwd on 16-bit
// pairs): P.V over 8-bit V (PvInt16Tile) and Q.K over 8-bit keys
// (QkInt16Rows16, QkInt16); kInt16Pv and kInt16Qk say whether this ISA
// uses them.
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>
#include <cstring>

#include "ffi/cpu/kernels/common.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
// P.V over 8-bit V on AVX2 (no VNNI): vpmaddwd on 16-bit values, two keys
// per dword (P in [0, 255] and V in [-128, 127] fit 16 bits; the pair sums
// and the int32 accumulation cannot overflow, unlike vpmaddubsw's 16-bit
// saturation), then vpaddd. The int32 sums are exact, as on VNNI.
constexpr bool kInt16Pv = true;

// P for one tile as 16-bit pairs: pqw[(j * T / 2 + u) * rp + r] holds q of
// keys 2u (low half) and 2u + 1 (zero past tn); ps as QuantizeProbs, whose
// operations this repeats: x = p * d_v is formed once (kept for the second
// pass), and the conversion rounds to nearest even as Round does (the default
// MXCSR mode, which nothing in the process changes).
void QuantizeProbsI16(const float* st, int64_t rp, int64_t tn, const float* vd, int64_t nbv,
                      uint32_t* pqw, float* ps) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f),
               levels = _mm256_set1_ps(kPLevels), tiny = _mm256_set1_ps(kPTiny);
  const int64_t np = (tn + 1) / 2;
  __m256 x[T + 1];
  x[tn] = zero;  // the missing second key of an odd tile
  for (int64_t j = 0; j < nbv; ++j) {
    for (int64_t r0 = 0; r0 < rp; r0 += 8) {
      __m256 amax = zero;
      for (int64_t t = 0; t < tn; ++t) {
        x[t] = _mm256_mul_ps(_mm256_loadu_ps(st + t * rp + r0), _mm256_set1_ps(vd[t * nbv + j]));
        amax = _mm256_max_ps(amax, x[t]);
      }
      const __m256 d = _mm256_div_ps(amax, levels);
      const __m256 id =
          _mm256_and_ps(_mm256_cmp_ps(amax, tiny, _CMP_NLT_UQ), _mm256_div_ps(one, d));
      _mm256_storeu_ps(ps + j * rp + r0, d);
      uint32_t* out = pqw + j * (T / 2) * rp + r0;
      for (int64_t u = 0; u < np; ++u) {
        const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(x[2 * u], id));
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(x[2 * u + 1], id));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + u * rp),
                            _mm256_or_si256(q0, _mm256_slli_epi32(q1, 16)));
      }
    }
  }
}

// V's int8 values of one V block (columns [8 c0, 8 c0 + 8 nc), nc = 4 or 2
// chunks of 8) for one tile as 16-bit pairs of keys:
// vb[((c * T / 2 + u) * 8 + i) * 2 + b] = V[2u + b][8 (c0 + c) + i] (zeros
// past tn). A block at a time (4 KiB), just before P.V reads it, so it stays
// in L1 (the whole tile's, 64 KiB, went to L2 and back).
void PackVBlockInt16(const KvRows& v, int64_t t0, int64_t tn, int64_t c0, int64_t nc, int16_t* vb) {
  const int64_t np = (tn + 1) / 2;
  const auto store = [&](int64_t c, int64_t u, __m128i x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vb + (c * (T / 2) + u) * 16),
                        _mm256_cvtepi8_epi16(x));
  };
  for (int64_t u = 0; u < np; ++u) {
    const int8_t* r0 = static_cast<const int8_t*>(RowPtr(v, t0 + 2 * u)) + 8 * c0;
    const bool pair = 2 * u + 1 < tn;
    const int8_t* r1 = pair ? static_cast<const int8_t*>(RowPtr(v, t0 + 2 * u + 1)) + 8 * c0 : r0;
    if (nc == 4) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
      const __m256i b =
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)) : _mm256_setzero_si256();
      // Per 128-bit lane: lo = columns 0-7 (16-23) of both keys, hi = 8-15 (24-31).
      const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
      store(0, u, _mm256_castsi256_si128(lo));
      store(1, u, _mm256_castsi256_si128(hi));
      store(2, u, _mm256_extracti128_si256(lo, 1));
      store(3, u, _mm256_extracti128_si256(hi, 1));
    } else {  // q8_kv: the last 16 columns
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
      const __m128i b =
          pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)) : _mm_setzero_si128();
      store(0, u, _mm_unpacklo_epi8(a, b));
      store(1, u, _mm_unpackhi_epi8(a, b));
    }
  }
}

// o[r + i][0 .. 32) += d[i] * sum_u madd(P pair, V pair chunk) for rows r,
// r + 1 and one V block: p = the block's P pairs (p[u * rp + r]), d = its
// scales (d[r]), vb its packed chunks, o the block's first column of row 0.
// Each V chunk is loaded once for both rows.
void PvInt16Rows2(const uint32_t* p, const float* d, int64_t rp, int64_t r, const int16_t* vb,
                  int64_t np, float* o, int64_t dv) {
  const auto* v = reinterpret_cast<const __m256i*>(vb);
  static_assert(T / 2 * 32 == 1024, "the asm below steps 1024 bytes between chunks");
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
          b3 = a0;
  for (int64_t u = 0; u < np; ++u, ++v) {
    // In asm: from intrinsics GCC 12 either reloaded each V chunk per row or,
    // with the accumulators in an array, added into the product's register
    // and copied it back (or spilled one). Alone, the intrinsics step ran at
    // 1.22 madds a cycle; in asm MLA decode's kernel went from 1428 to 1284 us.
    __m256i v0, v1, v2, v3, pp, t;
    asm("vmovdqu (%[v]), %[v0]\n\t"
        "vmovdqu 1024(%[v]), %[v1]\n\t"
        "vmovdqu 2048(%[v]), %[v2]\n\t"
        "vmovdqu 3072(%[v]), %[v3]\n\t"
        "vpbroadcastd (%[p]), %[pp]\n\t"
        "vpmaddwd %[v0], %[pp], %[t]\n\t"
        "vpaddd %[t], %[a0], %[a0]\n\t"
        "vpmaddwd %[v1], %[pp], %[t]\n\t"
        "vpaddd %[t], %[a1], %[a1]\n\t"
        "vpmaddwd %[v2], %[pp], %[t]\n\t"
        "vpaddd %[t], %[a2], %[a2]\n\t"
        "vpmaddwd %[v3], %[pp], %[t]\n\t"
        "vpaddd %[t], %[a3], %[a3]\n\t"
        "vpbroadcastd 4(%[p]), %[pp]\n\t"
        "vpmaddwd %[v0], %[pp], %[t]\n\t"
        "vpaddd %[t], %[b0], %[b0]\n\t"
        "vpmaddwd %[v1], %[pp], %[t]\n\t"
        "vpaddd %[t], %[b1], %[b1]\n\t"
        "vpmaddwd %[v2], %[pp], %[t]\n\t"
        "vpaddd %[t], %[b2], %[b2]\n\t"
        "vpmaddwd %[v3], %[pp], %[t]\n\t"
        "vpaddd %[t], %[b3], %[b3]"
        : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [b0] "+x"(b0), [b1] "+x"(b1),
          [b2] "+x"(b2), [b3] "+x"(b3), [v0] "=&x"(v0), [v1] "=&x"(v1), [v2] "=&x"(v2),
          [v3] "=&x"(v3), [pp] "=&x"(pp), [t] "=&x"(t)
        : [v] "r"(v), [p] "r"(p + u * rp + r)
        : "memory");
  }
  const __m256i acc[2][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}};
  for (int i = 0; i < 2; ++i) {
    const __m256 di = _mm256_set1_ps(d[r + i]);
    float* op = o + (r + i) * dv;
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_ps(op + 8 * c, _mm256_fmadd_ps(di, _mm256_cvtepi32_ps(acc[i][c]),
                                                   _mm256_loadu_ps(op + 8 * c)));
  }
}

// The same for row r and one chunk of 8 columns (vc its packed pairs, o its
// first column of row 0).
void PvInt16Row1(const uint32_t* p, const float* d, int64_t rp, int64_t r, const int16_t* vc,
                 int64_t np, float* o, int64_t dv) {
  const auto* v = reinterpret_cast<const __m256i*>(vc);
  __m256i acc = _mm256_setzero_si256();
  for (int64_t u = 0; u < np; ++u)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_set1_epi32(int32_t(p[u * rp + r])),
                                                  _mm256_loadu_si256(v + u)));
  float* op = o + r * dv;
  _mm256_storeu_ps(
      op, _mm256_fmadd_ps(_mm256_set1_ps(d[r]), _mm256_cvtepi32_ps(acc), _mm256_loadu_ps(op)));
}

// P.V of one tile over 8-bit V for all n_rows rows, V block by V block: the
// block is packed (PackVBlockInt16, into vb: 4 KiB) and then read by every
// row pair from L1.
void PvInt16Tile(const KvRows& v, int64_t t0, int64_t tn, const uint32_t* pqw, const float* ps,
                 int64_t rp, int64_t n_rows, int16_t* vb, float* o, int64_t dv) {
  const int64_t np = (tn + 1) / 2;
  for (int64_t j = 0; j * kQBlock < dv; ++j) {
    const int64_t c0 = 4 * j, nc = std::min<int64_t>(4, dv / 8 - c0);
    PackVBlockInt16(v, t0, tn, c0, nc, vb);
    const uint32_t* p = pqw + j * (T / 2) * rp;
    const float* d = ps + j * rp;
    float* oj = o + 8 * c0;
    int64_t r = 0;
    if (nc == 4)
      for (; r + 2 <= n_rows; r += 2) PvInt16Rows2(p, d, rp, r, vb, np, oj, dv);
    for (; r < n_rows; ++r)
      for (int64_t c = 0; c < nc; ++c)
        PvInt16Row1(p, d, rp, r, vb + c * (T / 2) * 16, np, oj + 8 * c, dv);
  }
}

// Q.K over 8-bit keys on AVX2 (no VNNI): vpmaddwd on 16-bit values, two dims
// per dword, the query pair the vector operand (rows in lanes) and the key
// pair the broadcast one. Query values lie in [-127, 127] and key values in
// [-128, 127], so products and pair sums fit (vpmaddubsw's 16-bit saturation
// would not, without sign tricks that break on -128); the int32 block sums
// are exact, and a score is s[r][t] = sum_j qd[r][j] * kd[t][j] * dot_j, the
// VNNI path's arithmetic without its +128 offset.
constexpr bool kInt16Qk = true;

// The query rows as 16-bit pairs: qw[(j * 16 + u) * rp + r] = q[r][32 j + 2 u]
// (low half) and q[r][32 j + 2 u + 1]; qd[j * rp + r] = the block's scale;
// padding rows are zeros.
void PrepareInt16Queries(const RowBlock& rows, int64_t rp, int64_t dk, uint32_t* qw, float* qd) {
  const int64_t nb = dk / kQBlock;
  for (int64_t r = 0; r < rp; ++r) {
    for (int64_t j = 0; j < nb; ++j) {
      int32_t qq[kQBlock];
      qd[j * rp + r] = QueryBlockQ8(r < rows.n_rows ? rows.q + r * dk + j * kQBlock : nullptr, qq);
      for (int u = 0; u < kQBlock / 2; ++u)
        qw[(j * 16 + u) * rp + r] = uint32_t(uint16_t(int16_t(qq[2 * u]))) |
                                    uint32_t(uint16_t(int16_t(qq[2 * u + 1]))) << 16;
    }
  }
}

// Keys per Q.K block (QkInt16Rows16, QkInt16), and per block at the end of
// a sub-tile that is not whole (ForKeyBlocks).
constexpr int kInt16QkKeys = 6, kInt16QkTailKeys = 4;

// Keys per sub-tile of the widened keys: 12 keys x 576 values x 2 bytes is
// 13.5 KiB, which with the 16-bit query rows (18 KiB for 16 rows) about
// fills L1 while Q.K reads them (the whole tile's keys, 73 KiB, went to L2
// and back; 16-key sub-tiles were ~1% slower than 8, 12 about 1-3% faster
// with 6-key blocks). Two blocks of 6 keys; the tile's last 4 keys take a
// 4-key block.
constexpr int64_t kInt16SubKeys = 2 * kInt16QkKeys;

// n keys from t0 widened to 16 bits, block-major in a sub-tile of
// kInt16SubKeys keys: kw[(j * kInt16SubKeys + t) * 32 + i] = key t's value
// 32 j + i (zeros for keys [n, kInt16SubKeys), whose scales are 0), so
// dword u of a key's block is the pair (2u, 2u + 1); kd[t * nb + j] = the
// block's scale.
void PrepareInt16Keys(const KvRows& k, int64_t t0, int64_t n, int64_t dk, int16_t* kw, float* kd) {
  constexpr int64_t NT = kInt16SubKeys;
  const int64_t nb = dk / kQBlock;
  for (int64_t t = 0; t < NT; ++t) {
    float* kdt = kd + t * nb;
    if (t >= n) {
      std::fill(kdt, kdt + nb, 0.f);
      for (int64_t j = 0; j < nb; ++j)
        std::fill_n(kw + (j * NT + t) * kQBlock, kQBlock, int16_t(0));
      continue;
    }
    const auto* row = static_cast<const int8_t*>(RowPtr(k, t0 + t));
    RowScales(k, t0 + t, nb, kdt);
    for (int64_t j = 0; j < nb; ++j) {
      int16_t* dst = kw + (j * NT + t) * kQBlock;
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * h),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(row + j * kQBlock + 16 * h))));
    }
  }
}

// st[t + i][r0 .. r0 + 8) for KB keys from sub-tile row t.
template <int KB>
void QkInt16(const uint32_t* qw, const float* qd, int64_t rp, int64_t r0, const int16_t* kw,
             int64_t t, int64_t dk, const float* kd, float* st) {
  constexpr int64_t NT = kInt16SubKeys;
  const int64_t nb = dk / kQBlock;
  __m256 s[KB];
  for (auto& x : s) x = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const int16_t* kb = kw + (j * NT + t) * kQBlock;  // KB keys x 32 values, contiguous
    __m256i acc[KB];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int u = 0; u < kQBlock / 2; ++u) {
      const __m256i qv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (j * 16 + u) * rp + r0));
      for (int i = 0; i < KB; ++i) {
        int32_t kk;
        std::memcpy(&kk, kb + i * kQBlock + 2 * u, sizeof kk);
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(qv, _mm256_set1_epi32(kk)));
      }
    }
    const __m256 qdv = _mm256_loadu_ps(qd + j * rp + r0);
    for (int i = 0; i < KB; ++i)
      s[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]),
                             _mm256_mul_ps(qdv, _mm256_set1_ps(kd[(t + i) * nb + j])), s[i]);
  }
  for (int i = 0; i < KB; ++i) _mm256_storeu_ps(st + (t + i) * rp + r0, s[i]);
}

// One key's step of QkInt16Rows16's asm: its pair u broadcast (key i at
// byte 64 i of the block-major sub-tile) times both row vectors. (Asm text
// built from macro arguments: clang-format would split its literals.)
// clang-format off
#define JAX_MLA_QK16_KEY(off, a, b)                 \
  "vpbroadcastd " off "(%[kb]), %[k]\n\t"           \
  "vpmaddwd %[k], %[qa], %[t]\n\t"                  \
  "vpaddd %[t], %[" a "], %[" a "]\n\t"             \
  "vpmaddwd %[k], %[qb], %[t]\n\t"                  \
  "vpaddd %[t], %[" b "], %[" b "]\n\t"
// clang-format on

// The same for rows [r0, r0 + 16) (two row vectors) and KB = 4 or 6 keys:
// one broadcast key pair serves both row vectors; the float sums live in
// st. Six keys take all 16 registers (12 accumulators) and load 2 + 6
// operands for 12 vpmaddwd, against 2 + 4 for 8.
template <int KB>
void QkInt16Rows16(const uint32_t* qw, const float* qd, int64_t rp, int64_t r0, const int16_t* kw,
                   int64_t t, int64_t dk, const float* kd, float* st) {
  static_assert(KB == 4 || KB == 6, "QkInt16Rows16 takes 4 or 6 keys");
  constexpr int64_t NT = kInt16SubKeys;
  const int64_t nb = dk / kQBlock;
  for (int64_t j = 0; j < nb; ++j) {
    const auto* kb = reinterpret_cast<const int32_t*>(kw + (j * NT + t) * kQBlock);
    const auto* q = reinterpret_cast<const __m256i*>(qw + j * 16 * rp + r0);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, b0 = a0,
            b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    for (int u = 0; u < kQBlock / 2; ++u, q += rp / 8) {
      // Key i's pair u is dword 16 i + u of the block-major sub-tile. In asm
      // because GCC 12 adds into the product's register and copies it back
      // to the accumulator's (8 extra moves a step).
      __m256i qa, qb, k, t;
      // clang-format off
      if constexpr (KB == 4) {
        asm("vmovdqu (%[q]), %[qa]\n\t"
            "vmovdqu 32(%[q]), %[qb]\n\t"
            JAX_MLA_QK16_KEY("0", "a0", "b0") JAX_MLA_QK16_KEY("64", "a1", "b1")
            JAX_MLA_QK16_KEY("128", "a2", "b2") JAX_MLA_QK16_KEY("192", "a3", "b3")
            : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [b0] "+x"(b0),
              [b1] "+x"(b1), [b2] "+x"(b2), [b3] "+x"(b3), [qa] "=&x"(qa), [qb] "=&x"(qb),
              [k] "=&x"(k), [t] "=&x"(t)
            : [q] "r"(q), [kb] "r"(kb + u)
            : "memory");
      } else {
        asm("vmovdqu (%[q]), %[qa]\n\t"
            "vmovdqu 32(%[q]), %[qb]\n\t"
            JAX_MLA_QK16_KEY("0", "a0", "b0") JAX_MLA_QK16_KEY("64", "a1", "b1")
            JAX_MLA_QK16_KEY("128", "a2", "b2") JAX_MLA_QK16_KEY("192", "a3", "b3")
            JAX_MLA_QK16_KEY("256", "a4", "b4") JAX_MLA_QK16_KEY("320", "a5", "b5")
            : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4),
              [a5] "+x"(a5), [b0] "+x"(b0), [b1] "+x"(b1), [b2] "+x"(b2), [b3] "+x"(b3),
              [b4] "+x"(b4), [b5] "+x"(b5), [qa] "=&x"(qa), [qb] "=&x"(qb), [k] "=&x"(k),
              [t] "=&x"(t)
            : [q] "r"(q), [kb] "r"(kb + u)
            : "memory");
      }
      // clang-format on
    }
    const __m256i acc[6][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}, {a4, b4}, {a5, b5}};
    const __m256 qda = _mm256_loadu_ps(qd + j * rp + r0),
                 qdb = _mm256_loadu_ps(qd + j * rp + r0 + 8);
    for (int i = 0; i < KB; ++i) {
      const __m256 kdi = _mm256_set1_ps(kd[(t + i) * nb + j]);
      for (int v = 0; v < 2; ++v) {
        const __m256 x = _mm256_cvtepi32_ps(acc[i][v]);
        const __m256 sc = _mm256_mul_ps(v == 0 ? qda : qdb, kdi);
        float* sp = st + (t + i) * rp + r0 + 8 * v;
        _mm256_storeu_ps(
            sp, j == 0 ? _mm256_mul_ps(x, sc) : _mm256_fmadd_ps(x, sc, _mm256_loadu_ps(sp)));
      }
    }
  }
}
#undef JAX_MLA_QK16_KEY
#else
constexpr bool kInt16Pv = false;
constexpr bool kInt16Qk = false;
#endif

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
