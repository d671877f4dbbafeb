// Per-ISA helpers shared by the attention kernels: the vector width and tile
// constants, cache rows and scales to float32 (float, q8_0, q6_0, q8_kv,
// fp8_e4m3),
// the rounded-P threshold, the 8-bit query blocks and key scales of the
// integer Q.K paths, and LoadAs.
//
// ffi/cpu/kernels/*.h are fragments of ffi/cpu/kernels.cc, included only by it
// (directly or through each other), so they are compiled once per ISA level
// inside its namespace jax_mla::cpu::JAX_MLA_ISA. The anonymous namespace
// they reopen is kernels.cc's own (one per translation unit): everything in
// them keeps internal linkage, as if written in kernels.cc.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ffi/cpu/kernels.h"
#include "ffi/cpu/simd.h"

#ifndef JAX_MLA_ISA
#error "JAX_MLA_ISA must be defined (generic, avx2 or avx512)"
#endif

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

using simd::F32;
constexpr int W = simd::kWidth;
constexpr int64_t T = kKvTile;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Key blocks may run past the tile's valid rows (tn) up to T: those rows are
// zero padding (or repeat the last valid row), so blocks that end a tile
// must divide it. kQkKeysMain need not: ForKeyBlocks ends its run of them
// before the tile's last kQkKeys blocks.
static_assert(T % simd::kQkKeys == 0 && T % simd::kQkKeys1 == 0, "key blocks must divide the tile");

int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void ToFloat(const void* src, DType dtype, float* dst, int64_t n) {
  int64_t i = 0;
  switch (dtype) {
    case DType::kF32: std::memcpy(dst, src, size_t(n) * sizeof(float)); return;
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + W <= n; i += W) simd::LoadF16(s + i).Store(dst + i);
      for (; i < n; ++i) dst[i] = F16ToFloat(s[i]);
      return;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + W <= n; i += W) simd::LoadBF16(s + i).Store(dst + i);
      for (; i < n; ++i) dst[i] = BF16ToFloat(s[i]);
      return;
    }
  }
}

void Merge(const float* const* src, const float* w, int64_t ns, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    F32 a = simd::Mul(F32::Splat(w[0]), F32::Load(src[0] + i));
    for (int64_t s = 1; s < ns; ++s) a = simd::Fma(F32::Splat(w[s]), F32::Load(src[s] + i), a);
    a.Store(dst + i);
  }
  for (; i < n; ++i) {
    float a = w[0] * src[0][i];
    for (int64_t s = 1; s < ns; ++s) a = std::fma(w[s], src[s][i], a);
    dst[i] = a;
  }
}

// Row t of `rows` (contiguous or paged: KvRows::Row).
const void* RowPtr(const KvRows& rows, int64_t t) { return rows.Row(t); }

// Converts n float16 scales to float32 (F16C for whole vectors).
void ScalesToFloat(const char* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + W <= n; j += W)
    simd::LoadF16(reinterpret_cast<const uint16_t*>(src) + j).Store(dst + j);
  if (j < n && n >= W) {  // the tail as one vector overlapping the last whole one
    simd::LoadF16(reinterpret_cast<const uint16_t*>(src) + n - W).Store(dst + n - W);
    return;
  }
#if defined(__F16C__)
  // Rows of fewer than W scales (Dk 192: 6, Dv 128: 4): fours, the same way.
  for (; j + 4 <= n; j += 4)
    _mm_storeu_ps(dst + j,
                  _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 2 * j))));
  if (j < n && n >= 4) {
    _mm_storeu_ps(
        dst + n - 4,
        _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 2 * (n - 4)))));
    return;
  }
#endif
  for (; j < n; ++j) {
    uint16_t h;
    std::memcpy(&h, src + 2 * j, sizeof h);
    dst[j] = F16ToFloat(h);
  }
}

// One q6_0 block (24 bytes) to its 32 values q - 32 (layout: quant_format.h).
void UnpackQ6(const uint8_t* block, int8_t* out) {
#if defined(__SSE2__)
  // Low nibbles: value j in byte j's low half, value j + 16 in its high
  // half. High 2-bit pairs: value j's (j < 16) in byte 16 + j % 8 at bit
  // 4 * (j / 8), value j + 16's two bits above; hh puts byte j's source at
  // byte j (16-bit shifts leak neighbour bits only into bits the masks drop).
  const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03), off = _mm_set1_epi8(32);
  const __m128i ql = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  const __m128i h8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 16));
  const __m128i hh = _mm_unpacklo_epi64(h8, _mm_srli_epi16(h8, 4));
  const __m128i lo_a = _mm_and_si128(ql, m4);
  const __m128i lo_b = _mm_and_si128(_mm_srli_epi16(ql, 4), m4);
  const __m128i hi_a = _mm_slli_epi16(_mm_and_si128(hh, m2), 4);
  const __m128i hi_b = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hh, 2), m2), 4);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_sub_epi8(_mm_or_si128(lo_a, hi_a), off));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                   _mm_sub_epi8(_mm_or_si128(lo_b, hi_b), off));
#else
  UnpackQ6Block(block, out);
#endif
}

// dst[i] = d * src[i] for i < n (n a multiple of 16).
void I8ToFloat(const int8_t* src, float d, float* dst, int64_t n) {
  const F32 scale = F32::Splat(d);
  for (int64_t i = 0; i < n; i += W) simd::Mul(simd::LoadI8(src + i), scale).Store(dst + i);
}

// Values [0, n) of row t as float32, n a multiple of 16. Quantized rows are
// dequantized here, a row at a time, straight from qs and d: no dequantized
// copy of a cache ever exists beyond the rows of the tile being processed.
void RowToFloat(const KvRows& r, int64_t t, float* dst, int64_t n) {
  const void* row = RowPtr(r, t);
  if (r.fmt == QFormat::kNone) return ToFloat(row, r.dtype, dst, n);
  const char* scales = r.Scales(t);
  const int8_t* qs = static_cast<const int8_t*>(row);
  if (r.fmt == QFormat::kQ8KV || r.fmt == QFormat::kFP8E4M3) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    if (r.fmt == QFormat::kQ8KV) return I8ToFloat(qs, d, dst, n);
    // Exact e4m3 values times d: one float32 rounding, as dequantize's.
    const F32 scale = F32::Splat(d);
    for (int64_t i = 0; i < n; i += W)
      simd::Mul(simd::LoadE4M3(reinterpret_cast<const uint8_t*>(qs) + i), scale).Store(dst + i);
    return;
  }
  float d[kMaxHeadDim / kQBlock + 1];
  ScalesToFloat(scales, (n + kQBlock - 1) / kQBlock, d);
  int8_t unpacked[kQBlock];
  for (int64_t j = 0; j < n; j += kQBlock) {
    const int8_t* block = qs + j;
    if (r.fmt == QFormat::kQ6_0) {
      UnpackQ6(reinterpret_cast<const uint8_t*>(qs) + j / kQBlock * 24, unpacked);
      block = unpacked;
    }
    I8ToFloat(block, d[j / kQBlock], dst + j, std::min(kQBlock, n - j));
  }
}

// A row's block scales as float32 from its scale bytes, dst[j] for j < nb:
// float16 per block of 32 values, or q8_kv's one float32 for every block.
// For K these scale the row's 32-value blocks; for 8-bit V with rounded P
// (quant_format.h) its blocks of 32 columns.
void BlockScales(const char* scales, QFormat fmt, int64_t nb, float* dst) {
  if (fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    std::fill(dst, dst + nb, d);
  } else {
    ScalesToFloat(scales, nb, dst);
  }
}

// Row t's block scales (BlockScales).
void RowScales(const KvRows& r, int64_t t, int64_t nb, float* dst) {
  BlockScales(r.Scales(t), r.fmt, nb, dst);
}

// The int8 values of row t as float32, unscaled (n a multiple of 16).
void RowInt8ToFloat(const KvRows& v, int64_t t, float* dst, int64_t n) {
  const int8_t* qs = static_cast<const int8_t*>(RowPtr(v, t));
  for (int64_t i = 0; i < n; i += W) simd::LoadI8(qs + i).Store(dst + i);
}

// A group whose largest x_t is below this gets q = 0 (its weights are below
// 2^-64 of the running max: invisible in a float32 output, and 1 / d would
// overflow for denormal d).
constexpr float kPTiny = 0x1p-64f;

// The integer Q.K paths' shared steps. A query block's 8-bit values and
// scale, re-derived from the (already rounded, RoundQueryToQ8) float query:
// x = d q with max |q| = 127, so amax / 127 gives d back and x / d rounds
// back to q exactly. Zeros for padding rows (x == nullptr).
float QueryBlockQ8(const float* x, int32_t* qq) {
  if (x == nullptr) {
    std::fill(qq, qq + kQBlock, 0);
    return 0.f;
  }
  float amax = 0.f;
  for (int64_t i = 0; i < kQBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int64_t i = 0; i < kQBlock; ++i) qq[i] = RoundHalfAway(x[i] * id);
  return d;
}

// Calls block(integral_constant<KB>, t) for blocks of KB keys up to a
// multiple of lcm(KB, KB_TAIL), then block(integral_constant<KB_TAIL>, t)
// for the rest: KB_TAIL divides the tile, so the padded keys of the last
// block stay inside it.
template <int KB, int KB_TAIL, class Block>
void ForKeyBlocks(int64_t tn, Block&& block) {
  static_assert(T % KB_TAIL == 0, "the tail blocks must divide the tile");
  constexpr int64_t L = std::lcm(KB, KB_TAIL);
  int64_t t = 0;
  for (; t < tn / L * L; t += KB) block(std::integral_constant<int, KB>{}, t);
  for (; t < tn; t += KB_TAIL) block(std::integral_constant<int, KB_TAIL>{}, t);
}

template <DType T>
F32 LoadAs(const void* row, int64_t d) {
  if constexpr (T == DType::kF32) return F32::Load(static_cast<const float*>(row) + d);
  if constexpr (T == DType::kF16) return simd::LoadF16(static_cast<const uint16_t*>(row) + d);
  if constexpr (T == DType::kBF16) return simd::LoadBF16(static_cast<const uint16_t*>(row) + d);
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
