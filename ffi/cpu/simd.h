// A minimal float32 SIMD vector for the CPU kernels, one definition per ISA
// level. kernels.cc is compiled once per level (CMake passes the target flags),
// so exactly one branch below is active in each copy. The kernels are written
// against this interface only; register blocking constants live next to it.
//
// Everything here lives in the copy's own namespace (jax_mla::cpu::<isa>::simd)
// like the kernels: an inline function the compiler emits out of line (Exp is,
// in the generic copy) is a weak symbol, and the linker keeps one definition
// per name for the whole module, so under a shared name the AVX2 copy could
// call the AVX-512 one (illegal instructions on a Zen 3) or one built for a
// different F32 (a different calling convention). CMake checks every copy's
// object for symbols outside its namespace (cmake/check_isa_symbols.py).
#pragma once

#ifndef JAX_MLA_ISA
#error \
    "simd.h belongs to the per-ISA kernel sources (kernels.cc), which CMake builds with -DJAX_MLA_ISA"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ffi/common/dtype.h"
#include "ffi/common/quant_format.h"

namespace jax_mla::cpu::JAX_MLA_ISA::simd {

#if defined(__AVX512F__)

struct F32 {
  static constexpr int kWidth = 16;
  __m512 v;
  static F32 Load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static F32 Splat(float x) { return {_mm512_set1_ps(x)}; }
  static F32 Zero() { return {_mm512_setzero_ps()}; }
  // Lane i = i as a float.
  static F32 Iota() {
    return {_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)};
  }
  void Store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline F32 Fma(F32 a, F32 b, F32 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F32 Mul(F32 a, F32 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F32 Div(F32 a, F32 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F32 Add(F32 a, F32 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F32 Sub(F32 a, F32 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F32 Max(F32 a, F32 b) { return {_mm512_max_ps(a.v, b.v)}; }
// where(a < b, x, y)
inline F32 SelectLt(F32 a, F32 b, F32 x, F32 y) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), y.v, x.v)};
}
inline F32 SelectEq(F32 a, F32 b, F32 x, F32 y) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ), y.v, x.v)};
}
inline float ReduceAdd(F32 a) { return _mm512_reduce_add_ps(a.v); }
inline F32 Round(F32 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// a * 2^n for integral-valued n.
inline F32 Scale2(F32 a, F32 n) { return {_mm512_scalef_ps(a.v, n.v)}; }

inline F32 LoadF16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline F32 LoadBF16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline F32 LoadI8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}

// 16 fp8_e4m3 bytes as float32, exactly: the bits of each value's magnitude
// shifted left by 7 are a float16 of value * 2^-8 (quant_format.h), the sign
// goes to bit 15, and the NaN bytes get an all-ones exponent.
inline F32 LoadE4M3(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7F));
  const __m256i nan =
      _mm256_and_si256(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7C00));
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16(-0x8000));
  const __m256i h = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16(mag, 7), sign), nan);
  return {_mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f))};
}

// Register blocking: 32 zmm registers.
inline constexpr int kQkRowVecs = 2;   // QK: row vectors (x16 rows) per block
inline constexpr int kQkKeys = 8;      // QK: keys per block (divides the tile)
inline constexpr int kQkKeysMain = 8;  // QK: keys per block before the last few (ForKeyBlocks)
inline constexpr int kQkKeys1 = 16;    // QK: keys per block with a single row vector
inline constexpr int kPvRows = 4;      // PV: rows per block
inline constexpr int kPvVecs = 4;      // PV: value vectors (x16 dims) per block
// Float K and V read in place for blocks of up to 16 rows (kernels/direct.h,
// QkDirect / PvDirect): whether to, and PV's rows and value vectors per block.
inline constexpr bool kDirect = true;
inline constexpr int kPvDirectRows = 16;
inline constexpr int kPvDirectVecs = 1;
// The backward's GEMMs (kernels/backward.h, Gemm): broadcast rows and lane
// vectors per block, 24 accumulators.
inline constexpr int kGemmRows = 6;
inline constexpr int kGemmVecs = 4;

#elif defined(__AVX2__)

struct F32 {
  static constexpr int kWidth = 8;
  __m256 v;
  static F32 Load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static F32 Splat(float x) { return {_mm256_set1_ps(x)}; }
  static F32 Zero() { return {_mm256_setzero_ps()}; }
  static F32 Iota() { return {_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)}; }
  void Store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline F32 Fma(F32 a, F32 b, F32 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F32 Mul(F32 a, F32 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F32 Div(F32 a, F32 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline F32 Add(F32 a, F32 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F32 Sub(F32 a, F32 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F32 Max(F32 a, F32 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline F32 SelectLt(F32 a, F32 b, F32 x, F32 y) {
  return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
}
inline F32 SelectEq(F32 a, F32 b, F32 x, F32 y) {
  return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ))};
}
inline float ReduceAdd(F32 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline F32 Round(F32 a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline F32 Scale2(F32 a, F32 n) {
  // n is in [-127, 128] after Exp's clamp; build 2^n from its exponent bits in
  // two halves so that n = -127 or 128 do not overflow the exponent field.
  const __m256i ni = _mm256_cvtps_epi32(n.v);
  const __m256i h1 = _mm256_srai_epi32(ni, 1);
  const __m256i h2 = _mm256_sub_epi32(ni, h1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(a.v, p1), p2)};
}

inline F32 LoadF16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline F32 LoadBF16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline F32 LoadI8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
// 8 fp8_e4m3 bytes as float32, exactly, through F16C as in the AVX-512 copy.
inline F32 LoadE4M3(const uint8_t* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7F));
  const __m128i nan =
      _mm_and_si128(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7C00));
  const __m128i sign = _mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16(-0x8000));
  const __m128i h = _mm_or_si128(_mm_or_si128(_mm_slli_epi16(mag, 7), sign), nan);
  return {_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f))};
}

// Register blocking: 16 ymm registers. Q.K's 6 keys x 2 row vectors and
// P.V's 4 rows x 3 value vectors (direct: 6 rows x 2) keep 12 accumulators,
// 15 or 16 registers with the loaded and broadcast operands (was 4 x 2 and
// 2 x 4, direct 4 x 2: MLA decode's kernel 1500 -> 1360 us, MLA prefill's
// 2050 -> 1430 us; benchmarks/NOTES.md 12).
inline constexpr int kQkRowVecs = 2;
inline constexpr int kQkKeys = 4;
inline constexpr int kQkKeysMain = 6;
inline constexpr int kQkKeys1 = 8;
inline constexpr int kPvRows = 4;
inline constexpr int kPvVecs = 3;
inline constexpr bool kDirect = true;
inline constexpr int kPvDirectRows = 6;
inline constexpr int kPvDirectVecs = 2;
// 12 accumulators, 15 registers with the two loaded vectors and a broadcast.
inline constexpr int kGemmRows = 6;
inline constexpr int kGemmVecs = 2;

#else  // generic: plain loops the compiler may vectorize for the baseline ISA

struct F32 {
  static constexpr int kWidth = 8;
  float v[kWidth];
  static F32 Load(const float* p) {
    F32 r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static F32 Splat(float x) {
    F32 r;
    for (float& e : r.v) e = x;
    return r;
  }
  static F32 Zero() { return Splat(0.f); }
  static F32 Iota() {
    F32 r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = float(i);
    return r;
  }
  void Store(float* p) const { std::memcpy(p, v, sizeof(v)); }
};
#define JAX_MLA_LANEWISE(expr)                         \
  F32 r;                                               \
  for (int i = 0; i < F32::kWidth; ++i) r.v[i] = expr; \
  return r
inline F32 Fma(F32 a, F32 b, F32 c) { JAX_MLA_LANEWISE(std::fma(a.v[i], b.v[i], c.v[i])); }
inline F32 Mul(F32 a, F32 b) { JAX_MLA_LANEWISE(a.v[i] * b.v[i]); }
inline F32 Div(F32 a, F32 b) { JAX_MLA_LANEWISE(a.v[i] / b.v[i]); }
inline F32 Add(F32 a, F32 b) { JAX_MLA_LANEWISE(a.v[i] + b.v[i]); }
inline F32 Sub(F32 a, F32 b) { JAX_MLA_LANEWISE(a.v[i] - b.v[i]); }
inline F32 Max(F32 a, F32 b) { JAX_MLA_LANEWISE(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline F32 SelectLt(F32 a, F32 b, F32 x, F32 y) {
  JAX_MLA_LANEWISE(a.v[i] < b.v[i] ? x.v[i] : y.v[i]);
}
inline F32 SelectEq(F32 a, F32 b, F32 x, F32 y) {
  JAX_MLA_LANEWISE(a.v[i] == b.v[i] ? x.v[i] : y.v[i]);
}
inline F32 Round(F32 a) { JAX_MLA_LANEWISE(std::nearbyint(a.v[i])); }
inline F32 Scale2(F32 a, F32 n) { JAX_MLA_LANEWISE(std::ldexp(a.v[i], int(n.v[i]))); }
#undef JAX_MLA_LANEWISE
inline float ReduceAdd(F32 a) {
  float s = 0.f;
  for (float e : a.v) s += e;
  return s;
}
inline F32 LoadF16(const uint16_t* p) {
  F32 r;
  for (int i = 0; i < F32::kWidth; ++i) r.v[i] = F16ToFloat(p[i]);
  return r;
}
inline F32 LoadBF16(const uint16_t* p) {
  F32 r;
  for (int i = 0; i < F32::kWidth; ++i) r.v[i] = BF16ToFloat(p[i]);
  return r;
}
inline F32 LoadI8(const int8_t* p) {
  F32 r;
  for (int i = 0; i < F32::kWidth; ++i) r.v[i] = float(p[i]);
  return r;
}
inline F32 LoadE4M3(const uint8_t* p) {
  F32 r;
  for (int i = 0; i < F32::kWidth; ++i) r.v[i] = E4M3ToFloat(p[i]);
  return r;
}

inline constexpr int kQkRowVecs = 1;
inline constexpr int kQkKeys = 4;
inline constexpr int kQkKeysMain = 4;
inline constexpr int kQkKeys1 = 4;
inline constexpr int kPvRows = 2;
inline constexpr int kPvVecs = 2;
inline constexpr bool kDirect = false;
inline constexpr int kPvDirectRows = 4;
inline constexpr int kPvDirectVecs = 1;
inline constexpr int kGemmRows = 4;
inline constexpr int kGemmVecs = 2;

#endif

inline constexpr int kWidth = F32::kWidth;

// exp(x) in float32, Cephes' expf scheme (range reduction by ln 2 in two
// parts, degree-5 polynomial): within 2 ulp of the true value for
// x in [-87, 88]. Inputs below about -87.3 return a tiny value or 0, never NaN;
// callers mask out keys that do not exist instead of relying on exp(-inf).
inline F32 Exp(F32 x) {
  x = Max(F32::Splat(-87.3365478515625f), x);
  x = SelectLt(F32::Splat(88.3762626647949f), x, F32::Splat(88.3762626647949f), x);
  const F32 n = Round(Mul(x, F32::Splat(1.44269504088896341f)));
  F32 r = Sub(x, Mul(n, F32::Splat(0.693359375f)));
  r = Sub(r, Mul(n, F32::Splat(-2.12194440e-4f)));
  F32 p = F32::Splat(1.9875691500e-4f);
  p = Fma(p, r, F32::Splat(1.3981999507e-3f));
  p = Fma(p, r, F32::Splat(8.3334519073e-3f));
  p = Fma(p, r, F32::Splat(4.1665795894e-2f));
  p = Fma(p, r, F32::Splat(1.6666665459e-1f));
  p = Fma(p, r, F32::Splat(5.0000001201e-1f));
  p = Fma(p, Mul(r, r), Add(r, F32::Splat(1.f)));
  return Scale2(p, n);
}

}  // namespace jax_mla::cpu::JAX_MLA_ISA::simd
