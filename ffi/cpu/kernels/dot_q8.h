// Q.K of one query row against one 8-bit key row (q8_0, q8_kv) on integer
// dot products, for the few-rows kernels (QueryLanesQ8, DotQ8Row, DotQ8);
// kInt8Dot says whether this ISA has them.
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
// Q.K of one query row against 8-bit key rows (q8_0, q8_kv) for the GEMV
// kernels, on VNNI: no dequantized K row. The row's query, already rounded to
// 8 bits per block (RoundQueryToQ8), as bytes, and per lane of 4 values (16
// lanes a vector, 8 a block of 32) its block scale qd and 128 times the
// lane's sum (the key bytes go in + 128, unsigned, as in QkInt8); a score is
//   sum over lanes of (dpbusd(k + 128, q) - 128 sum q) qd kd,
// the lane sums exact integers (subtracted before any rounding), the rest
// float32, as in the tile path's QkInt8. Rows of 32-value multiples (192,
// 576: whole 64-byte vectors; 96, 160: a 32-byte tail).
constexpr bool kInt8Dot = true;

// One query row's lanes: q[dk] bytes, qd[dk / 4] and qc[dk / 4], each 64-byte
// aligned.
struct QueryLanes {
  int8_t* q;
  float* qd;
  int32_t* qc;
};

struct QueryLanesQ8 {
  alignas(64) int8_t q[kMaxHeadDim];
  alignas(64) float qd[kMaxHeadDim / 4];
  alignas(64) int32_t qc[kMaxHeadDim / 4];
  QueryLanes Lanes() { return {q, qd, qc}; }
};

void PrepareQueryLanesQ8(const float* x, int64_t dk, QueryLanes out) {
  for (int64_t j = 0; j < dk / kQBlock; ++j) {
    int32_t qq[kQBlock];
    const float d = QueryBlockQ8(x + j * kQBlock, qq);
    for (int64_t i = 0; i < kQBlock; ++i) out.q[j * kQBlock + i] = int8_t(qq[i]);
    for (int64_t l = 0; l < kQBlock / 4; ++l) {
      const int64_t lane = j * kQBlock / 4 + l;
      out.qd[lane] = d;
      out.qc[lane] = 128 * (qq[4 * l] + qq[4 * l + 1] + qq[4 * l + 2] + qq[4 * l + 3]);
    }
  }
}

// Inlined: a call would pass QueryLanes through memory (a store-forwarding
// stall per key and head in AttendHeadsQ8).
[[gnu::always_inline]] inline float DotQ8Row(QueryLanes q, const int8_t* row, const char* scales,
                                             QFormat fmt, int64_t dk) {
  const int64_t nb = dk / kQBlock;
  float kd[kMaxHeadDim / kQBlock + 8];
  if (fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    std::fill(kd, kd + nb, d);
  } else {
    // Masked loads: the row's last scales may end its buffer.
    for (int64_t j = 0; j < nb; j += 8) {
      const __mmask8 m = nb - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (nb - j)) - 1);
      _mm256_storeu_ps(kd + j, _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, scales + 2 * j)));
    }
  }
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; 64 * i + 64 <= dk; ++i) {
    const __m512i kb = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * i), bias);
    const __m512i dp = _mm512_sub_epi32(
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), kb, _mm512_load_si512(q.q + 64 * i)),
        _mm512_load_si512(q.qc + 16 * i));
    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(dp), _mm512_load_ps(q.qd + 16 * i));
    const __m512 kdl =
        _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(kd[2 * i]), _mm512_set1_ps(kd[2 * i + 1]));
    acc = _mm512_fmadd_ps(x, kdl, acc);
  }
  if (64 * i < dk) {  // one block of 32 left
    const __m256i kb =
        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * i)),
                         _mm512_castsi512_si256(bias));
    const __m256i dp = _mm256_sub_epi32(
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), kb,
                            _mm256_load_si256(reinterpret_cast<const __m256i*>(q.q + 64 * i))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(q.qc + 16 * i)));
    const __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(dp), _mm256_load_ps(q.qd + 16 * i));
    acc = _mm512_add_ps(acc, _mm512_zextps256_ps512(_mm256_mul_ps(x, _mm256_set1_ps(kd[2 * i]))));
  }
  return _mm512_reduce_add_ps(acc);
}
#elif defined(__AVX2__)
// The same on AVX2, 32 values a step: vpmaddubsw takes |k| (unsigned) and q
// with k's sign, so pairs of products stay within int16 (2 * 128 * 127), and
// vpmaddwd by ones sums them to exact int32 lanes; each block's lanes are
// scaled by qd kd in float32. The query row: q[dk] bytes and qd[dk / 32].
constexpr bool kInt8Dot = true;

struct QueryLanes {
  int8_t* q;
  float* qd;
};

struct QueryLanesQ8 {
  alignas(64) int8_t q[kMaxHeadDim];
  alignas(64) float qd[kMaxHeadDim / kQBlock];
  QueryLanes Lanes() { return {q, qd}; }
};

void PrepareQueryLanesQ8(const float* x, int64_t dk, QueryLanes out) {
  for (int64_t j = 0; j < dk / kQBlock; ++j) {
    int32_t qq[kQBlock];
    out.qd[j] = QueryBlockQ8(x + j * kQBlock, qq);
    for (int64_t i = 0; i < kQBlock; ++i) out.q[j * kQBlock + i] = int8_t(qq[i]);
  }
}

[[gnu::always_inline]] inline float DotQ8Row(QueryLanes q, const int8_t* row, const char* scales,
                                             QFormat fmt, int64_t dk) {
  const int64_t nb = dk / kQBlock;
  float kd[kMaxHeadDim / kQBlock];
  BlockScales(scales, fmt, nb, kd);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kQBlock * j));
    const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q.q + kQBlock * j));
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(kv, kv), _mm256_sign_epi8(qv, kv));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)),
                          _mm256_set1_ps(q.qd[j] * kd[j]), acc);
  }
  return simd::ReduceAdd(F32{acc});
}
#endif

#if defined(__AVX2__)
inline float DotQ8(QueryLanes q, const KvRows& k, int64_t t, int64_t dk) {
  return DotQ8Row(q, static_cast<const int8_t*>(RowPtr(k, t)), k.Scales(t), k.fmt, dk);
}
#else
constexpr bool kInt8Dot = false;
#endif

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
