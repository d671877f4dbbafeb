// The attention kernels, compiled once per ISA level: CMake builds this file
// with -DJAX_MLA_ISA=<isa> and that level's target flags (generic, avx2,
// avx512), each copy in its own namespace so the copies never mix; isa.cc
// hands out a copy only after checking the CPU.
//
// One call attends a block of R query rows (all heads that share a KV head,
// times a few query positions) over a range of keys, tile by tile:
//   1. the tile's K (and V) rows are converted once to float32 in scratch;
//      for MLA, V is a column range of the same converted rows;
//   2. S = Q K^T as a small GEMM with the rows in the vector lanes (Q
//      transposed once per call, K elements broadcast), so no horizontal sums
//      are needed and the online softmax below is vectorized across rows;
//   3. online softmax per row, masking keys past each row's end;
//   4. O += P V with value dims in the lanes, V un-transposed.
// With fewer rows than half a vector (decode with small GQA groups) that
// would waste the lanes; AttendFew then runs one GEMV per row instead. Blocks
// of up to 16 rows over float caches (MLA decode) skip step 1 and read K and
// V in place (QkDirect, PvDirect).
// Every product and sum is float32 (inputs are exact in float32); only the
// summation order differs from the reference. Over 8-bit caches the query
// (8-bit K) and the softmax weights (8-bit V) are rounded to 8 bits as
// quant_format.h says, identically on every path, and Q.K / P.V run on
// integer dot products where the ISA has them (exact int32 sums).
#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ffi/cpu/kernels.h"
#include "ffi/cpu/simd.h"

#ifndef JAX_MLA_ISA
#error "JAX_MLA_ISA must be defined (generic, avx2 or avx512)"
#endif
#define JAX_MLA_STR2(x) #x
#define JAX_MLA_STR(x) JAX_MLA_STR2(x)

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

using simd::F32;
constexpr int W = simd::kWidth;
constexpr int64_t T = kKvTile;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Key blocks may run past the tile's valid rows (tn) up to T: those rows are
// zero padding, so every block must divide the tile.
static_assert(T % simd::kQkKeys == 0 && T % simd::kQkKeys1 == 0,
              "key blocks must divide the tile");

int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void ToFloat(const void* src, DType dtype, float* dst, int64_t n) {
  int64_t i = 0;
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, size_t(n) * sizeof(float));
      return;
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

const void* RowPtr(const KvRows& rows, int64_t t) {
  return static_cast<const char*>(rows.data) + t * rows.row_bytes;
}

// Converts n float16 scales to float32 (F16C for whole vectors).
void ScalesToFloat(const char* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + W <= n; j += W) simd::LoadF16(reinterpret_cast<const uint16_t*>(src) + j).Store(dst + j);
  if (j < n && n >= W) {  // the tail as one vector overlapping the last whole one
    simd::LoadF16(reinterpret_cast<const uint16_t*>(src) + n - W).Store(dst + n - W);
    return;
  }
#if defined(__F16C__)
  // Rows of fewer than W scales (Dk 192: 6, Dv 128: 4): fours, the same way.
  for (; j + 4 <= n; j += 4)
    _mm_storeu_ps(dst + j, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 2 * j))));
  if (j < n && n >= 4) {
    _mm_storeu_ps(dst + n - 4,
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
  const char* scales = static_cast<const char*>(r.scales) + t * r.scale_row_bytes;
  const int8_t* qs = static_cast<const int8_t*>(row);
  if (r.fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    return I8ToFloat(qs, d, dst, n);
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

// 8-bit V with rounded P (quant_format.h): the per-key scales of row t, one
// per block of 32 columns (q8_kv: the row's scale for each block).
void VScales(const KvRows& v, int64_t t, int64_t nbv, float* dst) {
  const char* scales = static_cast<const char*>(v.scales) + t * v.scale_row_bytes;
  if (v.fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    std::fill(dst, dst + nbv, d);
  } else {
    ScalesToFloat(scales, nbv, dst);
  }
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

// The rounded P of one tile (quant_format.h), rows in lanes: for V block j,
// pq[(j * T + t) * rp + r] = q_t as a float (exact) and ps[j * rp + r] = d.
// Every path computes x, d, id and q with these same float32 operations.
void QuantizeProbs(const float* st, int64_t rp, int64_t tn, const float* vd, int64_t nbv,
                   float* pq, float* ps) {
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
void PvBlock(const float* st, int64_t rp, int64_t r0, const float* vt, int64_t vstride,
             int64_t tn, float* o, int64_t dv, int64_t d0) {
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

// Key t's block scales as float32, kdt[j] for j < nb (q8_kv: its one scale).
void KeyBlockScales(const KvRows& k, int64_t t, int64_t nb, float* kdt) {
  const char* scales = static_cast<const char*>(k.scales) + t * k.scale_row_bytes;
  if (k.fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    std::fill(kdt, kdt + nb, d);
  } else {
    ScalesToFloat(scales, nb, kdt);
  }
}

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
void PrepareInt8Keys(const KvRows& k, int64_t t0, int64_t n, int64_t dk, uint8_t* kp,
                     float* kd) {
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
    KeyBlockScales(k, t0 + t, nb, kdt);
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
  const __m512i transpose = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  const int64_t nq = (tn + 3) / 4;
  alignas(64) float xb[T * 16];  // x of one block and 16 rows, zeros past tn
  for (int64_t t = tn; t < 4 * nq; ++t) _mm512_store_ps(xb + t * 16, zero);
  for (int64_t j = 0; j < nbv; ++j) {
    for (int64_t r0 = 0; r0 < rp; r0 += 16) {
      __m512 amax = zero;
      for (int64_t t = 0; t < tn; ++t) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(st + t * rp + r0),
                                       _mm512_set1_ps(vd[t * nbv + j]));
        _mm512_store_ps(xb + t * 16, x);
        amax = _mm512_max_ps(amax, x);
      }
      const __m512 d = _mm512_div_ps(amax, levels);
      const __m512 id =
          _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, tiny, _CMP_GE_OQ), one, d);
      _mm512_storeu_ps(ps + j * rp + r0, d);
      for (int64_t u = 0; u < nq; ++u) {
        __m512i q[4];
        for (int b = 0; b < 4; ++b)
          q[b] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_load_ps(xb + (4 * u + b) * 16), id),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // q in [0, 255]: the unsigned saturating packs keep every value.
        const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]),
                                                  _mm512_packus_epi32(q[2], q[3]));
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
        for (r0 = 0; r0 + 4 <= R; r0 += 4) PvInt8Block<4, 1>(pqd, ps, rp, r0, vc, nq, o, dv, c0 + c);
        for (; r0 < R; ++r0) PvInt8Block<1, 1>(pqd, ps, rp, r0, vc, nq, o, dv, c0 + c);
      }
    }
  }
}
#else
constexpr bool kInt8Qk = false;
constexpr bool kInt8Pv = false;
#endif

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
      const __m256 id = _mm256_and_ps(_mm256_cmp_ps(amax, tiny, _CMP_NLT_UQ), _mm256_div_ps(one, d));
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
void PackVBlockInt16(const KvRows& v, int64_t t0, int64_t tn, int64_t c0, int64_t nc,
                     int16_t* vb) {
  const int64_t np = (tn + 1) / 2;
  const auto store = [&](int64_t c, int64_t u, __m128i x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vb + (c * (T / 2) + u) * 16), _mm256_cvtepi8_epi16(x));
  };
  for (int64_t u = 0; u < np; ++u) {
    const int8_t* r0 = static_cast<const int8_t*>(RowPtr(v, t0 + 2 * u)) + 8 * c0;
    const bool pair = 2 * u + 1 < tn;
    const int8_t* r1 = pair ? static_cast<const int8_t*>(RowPtr(v, t0 + 2 * u + 1)) + 8 * c0 : r0;
    if (nc == 4) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
      const __m256i b = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1))
                             : _mm256_setzero_si256();
      // Per 128-bit lane: lo = columns 0-7 (16-23) of both keys, hi = 8-15 (24-31).
      const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
      store(0, u, _mm256_castsi256_si128(lo));
      store(1, u, _mm256_castsi256_si128(hi));
      store(2, u, _mm256_extracti128_si256(lo, 1));
      store(3, u, _mm256_extracti128_si256(hi, 1));
    } else {  // q8_kv: the last 16 columns
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
      const __m128i b = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1))
                             : _mm_setzero_si128();
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
        : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [b0] "+x"(b0),
          [b1] "+x"(b1), [b2] "+x"(b2), [b3] "+x"(b3), [v0] "=&x"(v0), [v1] "=&x"(v1),
          [v2] "=&x"(v2), [v3] "=&x"(v3), [pp] "=&x"(pp), [t] "=&x"(t)
        : [v] "r"(v), [p] "r"(p + u * rp + r)
        : "memory");
  }
  const __m256i acc[2][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}};
  for (int i = 0; i < 2; ++i) {
    const __m256 di = _mm256_set1_ps(d[r + i]);
    float* op = o + (r + i) * dv;
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_ps(op + 8 * c,
                       _mm256_fmadd_ps(di, _mm256_cvtepi32_ps(acc[i][c]), _mm256_loadu_ps(op + 8 * c)));
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
  _mm256_storeu_ps(op, _mm256_fmadd_ps(_mm256_set1_ps(d[r]), _mm256_cvtepi32_ps(acc),
                                       _mm256_loadu_ps(op)));
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
        qw[(j * 16 + u) * rp + r] =
            uint32_t(uint16_t(int16_t(qq[2 * u]))) | uint32_t(uint16_t(int16_t(qq[2 * u + 1]))) << 16;
    }
  }
}

// Keys per sub-tile of the widened keys: 8 keys x 576 values x 2 bytes is
// 9 KiB, so the sub-tile and the 16-bit query rows (18 KiB for 16 rows) stay
// in L1 while Q.K reads them (the whole tile's keys, 73 KiB, went to L2 and
// back; 16-key sub-tiles were ~1% slower).
constexpr int64_t kInt16SubKeys = 8;

// n keys from t0 widened to 16 bits, block-major in a sub-tile of
// kInt16SubKeys keys: kw[(j * kInt16SubKeys + t) * 32 + i] = key t's value
// 32 j + i (zeros for keys [n, kInt16SubKeys), whose scales are 0), so
// dword u of a key's block is the pair (2u, 2u + 1); kd[t * nb + j] = the
// block's scale.
void PrepareInt16Keys(const KvRows& k, int64_t t0, int64_t n, int64_t dk, int16_t* kw,
                      float* kd) {
  constexpr int64_t NT = kInt16SubKeys;
  const int64_t nb = dk / kQBlock;
  for (int64_t t = 0; t < NT; ++t) {
    float* kdt = kd + t * nb;
    if (t >= n) {
      std::fill(kdt, kdt + nb, 0.f);
      for (int64_t j = 0; j < nb; ++j) std::fill_n(kw + (j * NT + t) * kQBlock, kQBlock, int16_t(0));
      continue;
    }
    const auto* row = static_cast<const int8_t*>(RowPtr(k, t0 + t));
    KeyBlockScales(k, t0 + t, nb, kdt);
    for (int64_t j = 0; j < nb; ++j) {
      int16_t* dst = kw + (j * NT + t) * kQBlock;
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * h),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(row + j * kQBlock + 16 * h))));
    }
  }
}

// st[t + i][r0 .. r0 + 8) for 4 keys from sub-tile row t.
void QkInt16(const uint32_t* qw, const float* qd, int64_t rp, int64_t r0, const int16_t* kw,
             int64_t t, int64_t dk, const float* kd, float* st) {
  constexpr int64_t NT = kInt16SubKeys;
  constexpr int KB = 4;
  const int64_t nb = dk / kQBlock;
  __m256 s[KB];
  for (auto& x : s) x = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const int16_t* kb = kw + (j * NT + t) * kQBlock;  // KB keys x 32 values, contiguous
    __m256i acc[KB];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int u = 0; u < kQBlock / 2; ++u) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (j * 16 + u) * rp + r0));
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

// The same for rows [r0, r0 + 16) (two row vectors): one broadcast key pair
// serves both row vectors; the float sums live in st.
void QkInt16Rows16(const uint32_t* qw, const float* qd, int64_t rp, int64_t r0, const int16_t* kw,
                   int64_t t, int64_t dk, const float* kd, float* st) {
  constexpr int64_t NT = kInt16SubKeys;
  const int64_t nb = dk / kQBlock;
  for (int64_t j = 0; j < nb; ++j) {
    const auto* kb = reinterpret_cast<const int32_t*>(kw + (j * NT + t) * kQBlock);
    const auto* q = reinterpret_cast<const __m256i*>(qw + j * 16 * rp + r0);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
            b3 = a0;
    for (int u = 0; u < kQBlock / 2; ++u, q += rp / 8) {
      // Key i's pair u is dword 16 i + u of the block-major sub-tile. In asm
      // because GCC 12 adds into the product's register and copies it back
      // to the accumulator's (8 extra moves a step).
      __m256i qa, qb, k, t;
      asm("vmovdqu (%[q]), %[qa]\n\t"
          "vmovdqu 32(%[q]), %[qb]\n\t"
          "vpbroadcastd (%[kb]), %[k]\n\t"
          "vpmaddwd %[k], %[qa], %[t]\n\t"
          "vpaddd %[t], %[a0], %[a0]\n\t"
          "vpmaddwd %[k], %[qb], %[t]\n\t"
          "vpaddd %[t], %[b0], %[b0]\n\t"
          "vpbroadcastd 64(%[kb]), %[k]\n\t"
          "vpmaddwd %[k], %[qa], %[t]\n\t"
          "vpaddd %[t], %[a1], %[a1]\n\t"
          "vpmaddwd %[k], %[qb], %[t]\n\t"
          "vpaddd %[t], %[b1], %[b1]\n\t"
          "vpbroadcastd 128(%[kb]), %[k]\n\t"
          "vpmaddwd %[k], %[qa], %[t]\n\t"
          "vpaddd %[t], %[a2], %[a2]\n\t"
          "vpmaddwd %[k], %[qb], %[t]\n\t"
          "vpaddd %[t], %[b2], %[b2]\n\t"
          "vpbroadcastd 192(%[kb]), %[k]\n\t"
          "vpmaddwd %[k], %[qa], %[t]\n\t"
          "vpaddd %[t], %[a3], %[a3]\n\t"
          "vpmaddwd %[k], %[qb], %[t]\n\t"
          "vpaddd %[t], %[b3], %[b3]"
          : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [b0] "+x"(b0),
            [b1] "+x"(b1), [b2] "+x"(b2), [b3] "+x"(b3), [qa] "=&x"(qa), [qb] "=&x"(qb),
            [k] "=&x"(k), [t] "=&x"(t)
          : [q] "r"(q), [kb] "r"(kb + u)
          : "memory");
    }
    const __m256i acc[4][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
    const __m256 qda = _mm256_loadu_ps(qd + j * rp + r0), qdb = _mm256_loadu_ps(qd + j * rp + r0 + 8);
    for (int i = 0; i < 4; ++i) {
      const __m256 kdi = _mm256_set1_ps(kd[(t + i) * nb + j]);
      for (int v = 0; v < 2; ++v) {
        const __m256 x = _mm256_cvtepi32_ps(acc[i][v]);
        const __m256 sc = _mm256_mul_ps(v == 0 ? qda : qdb, kdi);
        float* sp = st + (t + i) * rp + r0 + 8 * v;
        _mm256_storeu_ps(sp, j == 0 ? _mm256_mul_ps(x, sc)
                                    : _mm256_fmadd_ps(x, sc, _mm256_loadu_ps(sp)));
      }
    }
  }
}
#else
constexpr bool kInt16Pv = false;
constexpr bool kInt16Qk = false;
#endif

// Scratch layout (floats), see AttendScratchFloats.
struct Work {
  float* qt;   // [dk, rp]  Q transposed
  float* kt;   // [T, dk]   K tile
  float* vt;   // [T, dv]   V tile (unused when V lies inside the K rows)
  float* st;   // [T, rp]   scores, then probabilities
  float* m;    // [rp]
  float* l;    // [rp]
  float* cnt;  // [rp]      keys of the current tile each row sees
  float* corr; // [rp]      rescale factor of the current tile
  float* vd;   // [T, nbv]  8-bit V: per-key scales of each block of 32 columns
  float* pq;   // [nbv, T, rp] rounded P (floats; the VNNI path packs bytes here)
  float* ps;   // [nbv, rp] its scales
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

// Online-softmax update for one tile; st holds scores in, probabilities out.
void Softmax(const Work& w, int64_t rp, int64_t tn) {
  const F32 neg_inf = F32::Splat(kNegInf), zero = F32::Zero(), one = F32::Splat(1.f);
  for (int64_t r0 = 0; r0 < rp; r0 += W) {
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
    const F32 p = simd::SelectLt(F32::Iota(), F32::Splat(float(n - t)),
                                 simd::Exp(simd::Sub(F32::Load(s + t), F32::Splat(m_new))),
                                 F32::Zero());
    sum = simd::Add(sum, p);
    p.Store(s + t);
  }
  *m = m_new;
  *l = *l * corr + simd::ReduceAdd(sum);
  return corr;
}

template <DType T>
F32 LoadAs(const void* row, int64_t d) {
  if constexpr (T == DType::kF32) return F32::Load(static_cast<const float*>(row) + d);
  if constexpr (T == DType::kF16) return simd::LoadF16(static_cast<const uint16_t*>(row) + d);
  if constexpr (T == DType::kBF16) return simd::LoadBF16(static_cast<const uint16_t*>(row) + d);
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
    const __m256i kb = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * i)), _mm512_castsi512_si256(bias));
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
  if (fmt == QFormat::kQ8KV) {
    float d;
    std::memcpy(&d, scales, sizeof d);
    std::fill(kd, kd + nb, d);
  } else {
    ScalesToFloat(scales, nb, kd);
  }
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
  return DotQ8Row(q, static_cast<const int8_t*>(RowPtr(k, t)),
                  static_cast<const char*>(k.scales) + t * k.scale_row_bytes, k.fmt, dk);
}
#else
constexpr bool kInt8Dot = false;
#endif

// Float K and V read in place, for blocks of up to kDirectMaxRows rows
// (decode with many heads per KV head, MLA's 16): no converted tile. The
// tile path writes the whole float32 K tile (64 x 576 floats, 147 KB) to L2
// and reads it back for Q.K and again once per row block for P.V; here Q.K
// converts the next W dims of its KB keys into a small buffer in L1 (two
// chunks in flight, so the broadcasts never wait on the stores just made)
// and P.V converts V in registers, once per key and row block.
template <DType KT, int RV, int KB>
void QkDirect(const float* qt, int64_t rp, const void* const* kr, int64_t dk, float* st,
              int64_t t0, float* buf, const char* next, int64_t next_bytes) {
  F32 acc[KB][RV];
  for (auto& row : acc)
    for (F32& a : row) a = F32::Zero();
  const auto convert = [&](int64_t dc, float* b) {
    for (int i = 0; i < KB; ++i) LoadAs<KT>(kr[i], dc).Store(b + i * W);
  };
  // The next block's rows (next_bytes from `next`) are prefetched a few
  // lines per chunk, so that they come from L2, not L3, when converted.
  const int64_t chunks = dk / W;
  const int64_t lines = (next_bytes + 63) / 64, per_chunk = (lines + chunks - 1) / chunks;
  convert(0, buf);
  for (int64_t dc = 0, c = 0; dc < dk; dc += W, ++c) {
    for (int64_t l = c * per_chunk; l < std::min(lines, (c + 1) * per_chunk); ++l)
      __builtin_prefetch(next + l * 64);
    const float* cur = buf + (c & 1) * KB * W;
    if (dc + W < dk) convert(dc + W, buf + ((c + 1) & 1) * KB * W);
    for (int dd = 0; dd < W; ++dd) {
      F32 q[RV];
      for (int j = 0; j < RV; ++j) q[j] = F32::Load(qt + (dc + dd) * rp + j * W);
      for (int i = 0; i < KB; ++i) {
        const F32 kv = F32::Splat(cur[i * W + dd]);
        for (int j = 0; j < RV; ++j) acc[i][j] = simd::Fma(kv, q[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < RV; ++j) acc[i][j].Store(st + (t0 + i) * rp + j * W);
}

// o[r][d0 ..) = corr[r] * o[r][d0 ..) + sum_{t < tn} st[t][r] * V[t][d0 ..) for RB
// rows from r0 and DB vectors of dims, V row t at vbase + t * vrb.
template <DType VT, int RB, int DB>
void PvDirect(const float* st, int64_t rp, int64_t r0, const float* corr, const char* vbase,
              int64_t vrb, int64_t tn, float* o, int64_t dv, int64_t d0) {
  F32 acc[RB][DB];
  for (int i = 0; i < RB; ++i) {
    const F32 c = F32::Splat(corr[r0 + i]);
    for (int j = 0; j < DB; ++j) acc[i][j] = simd::Mul(F32::Load(o + (r0 + i) * dv + d0 + j * W), c);
  }
  const char* vr = vbase;
  for (int64_t t = 0; t < tn; ++t, vr += vrb) {
    F32 v[DB];
    for (int j = 0; j < DB; ++j) v[j] = LoadAs<VT>(vr, d0 + j * W);
    for (int i = 0; i < RB; ++i) {
      const F32 p = F32::Splat(st[t * rp + r0 + i]);
      for (int j = 0; j < DB; ++j) acc[i][j] = simd::Fma(p, v[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < DB; ++j) acc[i][j].Store(o + (r0 + i) * dv + d0 + j * W);
}

template <DType VT, int RB>
void PvDirectRows(const float* st, int64_t rp, int64_t r0, const float* corr, const char* vbase,
                  int64_t vrb, int64_t tn, float* o, int64_t dv) {
  constexpr int DB = simd::kPvDirectVecs;
  int64_t d0 = 0;
  for (; d0 + DB * W <= dv; d0 += DB * W)
    PvDirect<VT, RB, DB>(st, rp, r0, corr, vbase, vrb, tn, o, dv, d0);
  for (; d0 < dv; d0 += W) PvDirect<VT, RB, 1>(st, rp, r0, corr, vbase, vrb, tn, o, dv, d0);
}

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
        for (int64_t d = 0; d < dk; d += W) acc = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr[t], d), acc);
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
          // are adjacent): prefetch the K rows kAhead keys on, and this
          // group's V rows, which P.V reads next.
          constexpr int64_t kAhead = 16;
          for (int64_t t = 0; t < n; ++t) {
            const char* kn = static_cast<const char*>(RowPtr(k.r, g0 + t + kAhead));
            for (int64_t b = 0; b < dk; b += 64) __builtin_prefetch(kn + b);
            __builtin_prefetch(static_cast<const char*>(k.r.scales) +
                               (g0 + t + kAhead) * k.r.scale_row_bytes);
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
          for (int64_t d = 0; d < dk; d += W) a1 = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr[t], d), a1);
          s[c0 + t] = simd::ReduceAdd(a1);
        }
      }
      const F32 c = F32::Splat(SoftmaxBlock<G>(s, n, &m, &l));
      for (int64_t t = 0; t < n; ++t) VScales(v, g0 + t, nbv, vd + t * nbv);
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
          for (int64_t t = 0; t < nc; ++t) a = simd::Fma(F32::Splat(pj[t]), F32::Load(vbuf + t * vs + e), a);
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

// The same GEMV scheme over several KV heads, key-major: for each key the
// rows of all heads (adjacent in the cache) are read in turn, first for the
// scores of a block of keys, then for P.V. O rows stay in L1 meanwhile.
template <DType KT, DType VT>
void AttendHeads(const RowBlock* rows, int64_t nh, const KvRows& k, int64_t ks, const KvRows& v,
                 int64_t vs, int64_t dk, int64_t dv, int64_t kv_begin, float* scratch) {
  static_assert(kFew % W == 0, "the softmax block is whole vectors");
  const int64_t R = rows[0].n_rows;
  const int64_t kb = ks * DTypeBytes(KT), vb = vs * DTypeBytes(VT);
  int64_t kv_end = kv_begin;
  for (int64_t u = 0; u < nh; ++u)
    for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows[u].end[r]);
  const F32 zero = F32::Zero();
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kFew) {
    const int64_t nb = std::min(kFew, kv_end - t0);
    for (int64_t t = 0; t < nb; ++t) {
      const char* krow = static_cast<const char*>(RowPtr(k, t0 + t));
      for (int64_t u = 0; u < nh; ++u) {
        const void* kr = krow + u * kb;
        for (int64_t r = 0; r < R; ++r) {
          if (t0 + t >= rows[u].end[r]) continue;
          const float* q = rows[u].q + r * dk;
          F32 acc = zero;
          for (int64_t d = 0; d < dk; d += W) acc = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr, d), acc);
          scratch[(u * R + r) * kFew + t] = simd::ReduceAdd(acc);
        }
      }
    }
    for (int64_t u = 0; u < nh; ++u) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = std::clamp<int64_t>(rows[u].end[r] - t0, 0, nb);
        float* s = scratch + (u * R + r) * kFew;
        if (n == 0) {
          std::fill(s, s + kFew, 0.f);  // P = 0: P.V below leaves the row alone
          continue;
        }
        const float corr = SoftmaxBlock(s, n, rows[u].m + r, rows[u].l + r);
        if (corr != 1.f) {
          float* o = rows[u].o + r * dv;
          for (int64_t d = 0; d < dv; d += W) simd::Mul(F32::Load(o + d), F32::Splat(corr)).Store(o + d);
        }
      }
    }
    for (int64_t t = 0; t < nb; ++t) {
      const char* vrow = static_cast<const char*>(RowPtr(v, t0 + t));
      for (int64_t u = 0; u < nh; ++u) {
        const void* vr = vrow + u * vb;
        for (int64_t r = 0; r < R; ++r) {
          const float p = scratch[(u * R + r) * kFew + t];
          if (p == 0.f) continue;  // past the row's end (or an underflowed weight)
          float* o = rows[u].o + r * dv;
          const F32 pv = F32::Splat(p);
          for (int64_t d = 0; d < dv; d += W)
            simd::Fma(pv, LoadAs<VT>(vr, d), F32::Load(o + d)).Store(o + d);
        }
      }
    }
  }
}

template <DType KT>
void AttendHeadsV(const RowBlock* rows, int64_t nh, const KvRows& k, int64_t ks, const KvRows& v,
                  int64_t vs, int64_t dk, int64_t dv, int64_t kv_begin, float* scratch) {
  switch (v.dtype) {
    case DType::kF32: return AttendHeads<KT, DType::kF32>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
    case DType::kF16: return AttendHeads<KT, DType::kF16>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
    case DType::kBF16: return AttendHeads<KT, DType::kBF16>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
  }
}

void AttendHeadsAny(const RowBlock* rows, int64_t nh, const KvRows& k, int64_t ks,
                    const KvRows& v, int64_t vs, int64_t dk, int64_t dv, int64_t kv_begin,
                    float* scratch) {
  switch (k.dtype) {
    case DType::kF32: return AttendHeadsV<DType::kF32>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
    case DType::kF16: return AttendHeadsV<DType::kF16>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
    case DType::kBF16: return AttendHeadsV<DType::kBF16>(rows, nh, k, ks, v, vs, dk, dv, kv_begin, scratch);
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
    case DType::kBF16: return AttendFew(rows, k, InPlace<DType::kBF16>{v}, dk, dv, kv_begin, scratch);
  }
}

void AttendFewAny(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t dk, int64_t dv,
                  int64_t kv_begin, float* scratch) {
  if (k.fmt != QFormat::kNone) return AttendFewV(rows, Dequantized{k}, v, dk, dv, kv_begin, scratch);
  switch (k.dtype) {
    case DType::kF32: return AttendFewV(rows, InPlace<DType::kF32>{k}, v, dk, dv, kv_begin, scratch);
    case DType::kF16: return AttendFewV(rows, InPlace<DType::kF16>{k}, v, dk, dv, kv_begin, scratch);
    case DType::kBF16: return AttendFewV(rows, InPlace<DType::kBF16>{k}, v, dk, dv, kv_begin, scratch);
  }
}

// Decode with few rows per KV head over several KV heads of an 8-bit cache
// (K and V each q8_0 or q8_kv, Dk and Dv multiples of 32): AttendHeads for
// 8-bit rows. Head by head (AttendFewQ) one head's rows are a cache row
// apart and the loads wait on memory; here each group of kPGroup keys is
// walked key by key across the heads, in memory order:
//   1. scores: every head's rows against that head's K row of the key
//      (DotQ8: integer dot products where the ISA has them);
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
      _mm_storeu_si128(reinterpret_cast<__m128i*>(reinterpret_cast<uint8_t*>(pq) + j * kPGroup + v * W),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q.v)));
#elif defined(__AVX2__)
      const __m256i qi = _mm256_cvtps_epi32(q.v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(reinterpret_cast<int16_t*>(pq) + j * kPGroup + v * W),
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
    for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr[i] + c0));
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
    const __m512i t0 = _mm512_shuffle_i32x4(c[0], c[1], 0x44), t1 = _mm512_shuffle_i32x4(c[2], c[3], 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(c[0], c[1], 0xEE), t3 = _mm512_shuffle_i32x4(c[2], c[3], 0xEE);
    const __m512i out[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xDD),
                            _mm512_shuffle_i32x4(t2, t3, 0x88), _mm512_shuffle_i32x4(t2, t3, 0xDD)};
    for (int L = 0; L < 4; ++L) {
      float* oc = o + c0 + 16 * L;
      _mm512_storeu_ps(oc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(out[L]),
                                           _mm512_set1_ps(ps[(c0 + 16 * L) / kQBlock]), _mm512_loadu_ps(oc)));
    }
  }
  if (c0 < w.dv) {
    __m256i c[4];
    for (int i = 0; i < 4; ++i) c[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c0 + 8 * i));
    const __m256i out[4] = {_mm256_permute2x128_si256(c[0], c[1], 0x20), _mm256_permute2x128_si256(c[2], c[3], 0x20),
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
    const __m256i lo01 = _mm256_unpacklo_epi16(a[0], a[1]), hi01 = _mm256_unpackhi_epi16(a[0], a[1]);
    const __m256i lo23 = _mm256_unpacklo_epi16(a[2], a[3]), hi23 = _mm256_unpackhi_epi16(a[2], a[3]);
    for (int64_t r = r0; r < r0 + nrow; ++r) {
      if (w.n[r] <= t) continue;
      const uint32_t* p = reinterpret_cast<const uint32_t*>(w.Pq(r)) + e / kQBlock * kPGroup / 2 + t / 2;
      const __m256i p01 = _mm256_set1_epi32(int(p[0])), p23 = _mm256_set1_epi32(int(p[1]));
      __m256i* acc = reinterpret_cast<__m256i*>(reinterpret_cast<int32_t*>(w.Acc(r)) + e);
      _mm256_storeu_si256(acc, _mm256_add_epi32(_mm256_loadu_si256(acc),
                                                _mm256_add_epi32(_mm256_madd_epi16(lo01, p01),
                                                                 _mm256_madd_epi16(lo23, p23))));
      _mm256_storeu_si256(acc + 1, _mm256_add_epi32(_mm256_loadu_si256(acc + 1),
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
    _mm256_storeu_ps(o + e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20)), d,
                                            _mm256_loadu_ps(o + e)));
    _mm256_storeu_ps(o + e + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x31)),
                                                d, _mm256_loadu_ps(o + e + 8)));
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

// V's scales of keys g0 .. g0 + n (n <= kPGroup) of one head, key-minor:
// vd[j * kPGroup + t] = key g0 + t's scale of block j (VScales). Gathered
// 16 (AVX2: 8) keys at a time, two float16 scales a dword (the last of an
// odd count with the one before it, so no read passes the row's scales).
void GroupVScales(const char* base, int64_t scale_row_bytes, QFormat fmt, int64_t n, int64_t nbv,
                  float* vd) {
  const int srb = int(scale_row_bytes);
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(srb));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
    const char* b = base + t * srb;
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
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(srb));
  for (int64_t t = 0; t < n; t += 8) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - t)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const char* b = base + t * srb;
    if (fmt == QFormat::kQ8KV) {
      const __m256 d = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), reinterpret_cast<const float*>(b), idx,
                                                _mm256_castsi256_ps(m), 1);
      for (int64_t j = 0; j < nbv; ++j) _mm256_storeu_ps(vd + j * kPGroup + t, d);
      continue;
    }
    for (int64_t j = 0; j < nbv; j += 2) {
      const int64_t j0 = std::min(j, nbv - 2);
      const __m256i dw = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(),
                                                     reinterpret_cast<const int*>(b + 2 * j0), idx, m, 1);
      const __m256i lo = _mm256_and_si256(dw, _mm256_set1_epi32(0xFFFF)), hi = _mm256_srli_epi32(dw, 16);
      _mm256_storeu_ps(vd + j0 * kPGroup + t, _mm256_cvtph_ps(_mm_packus_epi32(
                                                  _mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1))));
      _mm256_storeu_ps(vd + (j0 + 1) * kPGroup + t, _mm256_cvtph_ps(_mm_packus_epi32(
                                                        _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1))));
    }
  }
#else
  KvRows v;
  v.fmt = fmt;
  v.scales = base;
  v.scale_row_bytes = scale_row_bytes;
  float vdt[kMaxHeadDim / kQBlock];
  for (int64_t t = 0; t < n; ++t) {
    VScales(v, t, nbv, vdt);
    for (int64_t j = 0; j < nbv; ++j) vd[j * kPGroup + t] = vdt[j];
  }
#endif
}

// Stands in for V rows past the last key of a P.V step (their P is 0).
alignas(64) constexpr int8_t kZeroRow[kMaxHeadDim] = {};

void AttendHeadsQ8(const RowBlock* rows, int64_t nh, const KvHeads& k, const KvHeads& v,
                   int64_t dk, int64_t dv, int64_t kv_begin, float* scratch) {
  const int64_t R = rows[0].n_rows, nr = nh * R;
  const HeadsQ8Work w = CarveHeadsQ8(scratch, nr, dk, dv);
  int64_t kv_end = kv_begin;
  for (int64_t u = 0; u < nh; ++u)
    for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows[u].end[r]);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  auto lanes = [&](int64_t row) {
    float* p = w.lanes + row * w.ql;
    return QueryLanes{reinterpret_cast<int8_t*>(p), p + w.ql / 3, reinterpret_cast<int32_t*>(p + 2 * w.ql / 3)};
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
  // Head u's row t (scales) at head0's + t * row bytes + u * head bytes.
  const char* const kd0 = static_cast<const char*>(k.head0.data);
  const char* const ks0 = static_cast<const char*>(k.head0.scales);
  const char* const vd0 = static_cast<const char*>(v.head0.data);
  const char* const vs0 = static_cast<const char*>(v.head0.scales);
  const int64_t krb = k.head0.row_bytes, ksrb = k.head0.scale_row_bytes;
  const int64_t vrb = v.head0.row_bytes, vsrb = v.head0.scale_row_bytes;
  const int64_t khb = k.head_bytes, kshb = k.scale_head_bytes;
  const int64_t vhb = v.head_bytes, vshb = v.scale_head_bytes;
  const int64_t nbv = w.nbv;
  for (int64_t g0 = kv_begin; g0 < kv_end; g0 += kPGroup) {
    const int64_t nmax = std::min(kPGroup, kv_end - g0);
    for (int64_t u = 0; u < nh; ++u)
      for (int64_t r = 0; r < R; ++r) w.n[u * R + r] = std::clamp<int64_t>(rows[u].end[r] - g0, 0, nmax);
    // 1. Scores, key by key across the heads. K rows, values and scales
    // are four streams, more than the hardware prefetchers keep ahead of:
    // the K rows and scales kAhead keys on are prefetched, and the group's
    // V rows and scales, which steps 2 and 3 read.
    constexpr int64_t kAhead = 4;
    for (int64_t t = 0; t < nmax; ++t) {
      const char* kt = kd0 + (g0 + t) * krb;
      const char* kst = ks0 + (g0 + t) * ksrb;
      const char* vt = vd0 + (g0 + t) * vrb;
      const char* vst = vs0 + (g0 + t) * vsrb;
      for (int64_t u = 0; u < nh; ++u) {
        const char* ka = kt + kAhead * krb + u * khb;
        for (int64_t b = 0; b < dk; b += 64) __builtin_prefetch(ka + b);
        __builtin_prefetch(ka + dk - 1);
        __builtin_prefetch(kst + kAhead * ksrb + u * kshb);
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
          w.S(row)[t] = DotQ8Row(lanes(row), krow, kst + u * kshb, k.head0.fmt, dk);
#else
          if (!converted) {
            KvRows kr = k.head0;
            kr.data = krow;
            kr.scales = kst + u * kshb;
            RowToFloat(kr, 0, w.kbuf, dk);
          }
          converted = true;
          const float* q = rows[u].q + r * dk;
          F32 a = F32::Zero();
          for (int64_t d = 0; d < dk; d += W) a = simd::Fma(F32::Load(q + d), F32::Load(w.kbuf + d), a);
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
      GroupVScales(vs0 + g0 * vsrb + u * vshb, vsrb, v.head0.fmt, nu, nbv, w.vd);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = u * R + r;
        if (w.n[row] == 0) continue;
        const float c = SoftmaxBlock<kPGroup>(w.S(row), w.n[row], rows[u].m + r, rows[u].l + r);
        if (c != 1.f) {
          float* o = rows[u].o + r * dv;
          for (int64_t d = 0; d < dv; d += W) simd::Mul(F32::Load(o + d), F32::Splat(c)).Store(o + d);
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
        vt[i] = valid ? reinterpret_cast<const int8_t*>(vd0 + (g0 + t + i) * vrb) : kZeroRow;
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

// Blocks of up to this many rows (and at most two row vectors) take the
// direct path where the ISA enables it (simd::kDirect); key tiles per step.
constexpr int64_t kDirectMaxRows = 16;
constexpr int64_t kDirectTiles = 4;

// Attend's tile loop over float K and V read in place (QkDirect, PvDirect);
// Q is transposed in w.qt and the softmax state is in w. V row t is at
// vbase + t * vrb.
template <DType KT, DType VT>
void AttendDirect(const RowBlock& rows, const Work& w, int64_t rp, const KvRows& k,
                  const char* vbase, int64_t vrb, int64_t dk, int64_t dv, int64_t kv_begin,
                  int64_t kv_end) {
  const int64_t R = rows.n_rows;
  float* buf = w.kt;  // QkDirect's two chunks of KB x W floats
  // When P.V covers all rows in one pass over V (one block of
  // kPvDirectRows), keys go in steps of kDirectTiles tiles: P.V loads and
  // stores O once per step (MLA decode avx512: 677 -> 648 us in kernel_bench
  // 16 2048). With several passes a tile per step was faster (avx2 with 16
  // rows: 753 vs 790 us). The scores of a longer step, [TS, rp], live in
  // w.vt, which this path does not use otherwise.
  const int64_t TS = R == simd::kPvDirectRows ? kDirectTiles * T : T;
  Work ws = w;
  if (TS > T) ws.st = w.vt;
  const auto qk = [&](auto rv, auto kb, int64_t t0, int64_t tn) {
    constexpr int RV = decltype(rv)::value, KB = decltype(kb)::value;
    const void* kr[KB];
    for (int64_t t = 0; t < tn; t += KB) {
      // Keys past tn repeat the last valid row; Softmax masks their scores.
      for (int i = 0; i < KB; ++i) kr[i] = RowPtr(k, t0 + std::min<int64_t>(t + i, tn - 1));
      // The rows of the next KB keys (up to kv_end), contiguous in the cache.
      const int64_t n_next = std::clamp<int64_t>(kv_end - (t0 + t + KB), 0, KB);
      const char* next = static_cast<const char*>(RowPtr(k, t0 + t + (n_next > 0 ? KB : 0)));
      const int64_t next_bytes = n_next > 0 ? (n_next - 1) * k.row_bytes + dk * DTypeBytes(KT) : 0;
      QkDirect<KT, RV, KB>(w.qt, rp, kr, dk, ws.st, t, buf, next, next_bytes);
    }
  };
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += TS) {
    const int64_t tn = std::min(TS, kv_end - t0);
    for (int64_t r = 0; r < rp; ++r)
      w.cnt[r] = r < R ? float(std::clamp<int64_t>(rows.end[r] - t0, 0, tn)) : 0.f;
    if (rp == W) {
      qk(std::integral_constant<int, 1>{}, std::integral_constant<int, simd::kQkKeys1>{}, t0, tn);
    } else {
      qk(std::integral_constant<int, 2>{}, std::integral_constant<int, simd::kQkKeys>{}, t0, tn);
    }
    Softmax(ws, rp, tn);
    const char* vt = vbase + t0 * vrb;
    constexpr int RB = simd::kPvDirectRows;
    int64_t r0 = 0;
    for (; r0 + RB <= R; r0 += RB) PvDirectRows<VT, RB>(ws.st, rp, r0, w.corr, vt, vrb, tn, rows.o, dv);
    for (; r0 + 4 <= R; r0 += 4) PvDirectRows<VT, 4>(ws.st, rp, r0, w.corr, vt, vrb, tn, rows.o, dv);
    for (; r0 < R; ++r0) PvDirectRows<VT, 1>(ws.st, rp, r0, w.corr, vt, vrb, tn, rows.o, dv);
  }
}

template <DType KT>
void AttendDirectV(DType vdt, const RowBlock& rows, const Work& w, int64_t rp, const KvRows& k,
                   const char* vbase, int64_t vrb, int64_t dk, int64_t dv, int64_t kv_begin,
                   int64_t kv_end) {
  switch (vdt) {
    case DType::kF32: return AttendDirect<KT, DType::kF32>(rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end);
    case DType::kF16: return AttendDirect<KT, DType::kF16>(rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end);
    case DType::kBF16: return AttendDirect<KT, DType::kBF16>(rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end);
  }
}

void Attend(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t v_in_k, int64_t dk,
            int64_t dv, int64_t kv_begin, float* scratch) {
  const int64_t R = rows.n_rows;
  if (2 * R < W) return AttendFewAny(rows, k, v, dk, dv, kv_begin, scratch);  // lanes would idle
  const int64_t rp = RoundUp(R, W);
  const Work w = Carve(scratch, dk, dv, rp);

  int64_t kv_end = kv_begin;
  for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows.end[r]);
  if (kv_end <= kv_begin) return;

  for (int64_t r = 0; r < rp; ++r) {
    w.m[r] = r < R ? rows.m[r] : kNegInf;
    w.l[r] = r < R ? rows.l[r] : 0.f;
  }
  // 8-bit keys take integer dot products where the ISA has them; then no
  // float K tile is made, and V (MLA: the V columns of the same rows, through
  // the V view) is converted on its own.
  const bool int8 = (kInt8Qk || kInt16Qk) && QuantizesQueries(k.fmt) && dk % kQBlock == 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  int8_t* qi = reinterpret_cast<int8_t*>(w.qt);   // [dk / 4, rp, 4] bytes
  float* qd = w.qt + dk * rp / 4;                   // [dk / 32, rp]
  float* qc = qd + dk / kQBlock * rp;               // [dk / 32, rp]
  uint8_t* kp = reinterpret_cast<uint8_t*>(w.kt);  // [dk / 32, kInt8Keys, 32] bytes
  float* kd = w.kt + kInt8Keys * dk / 4;            // [kInt8Keys, dk / 32]
  if (int8) PrepareInt8Queries(rows, rp, dk, qi, qd, qc);
#elif defined(__AVX2__)
  uint32_t* qw = reinterpret_cast<uint32_t*>(w.qt);  // [dk / 2, rp] 16-bit pairs
  float* qd = w.qt + dk * rp / 2;                      // [dk / 32, rp]
  int16_t* kw = reinterpret_cast<int16_t*>(w.kt);     // [dk / 32, kInt16SubKeys, 32]
  float* kd = w.kt + T * dk / 2;                       // [kInt16SubKeys, dk / 32]
  if (int8) PrepareInt16Queries(rows, rp, dk, qw, qd);
#endif
  if (!int8) {
    for (int64_t d = 0; d < dk; ++d)
      for (int64_t r = 0; r < rp; ++r) w.qt[d * rp + r] = r < R ? rows.q[r * dk + d] : 0.f;
  }
  // Float K and V with few rows: read in place, no converted tile.
  // (The step's scores need kDirectTiles * T * rp floats of w.vt.)
  if (simd::kDirect && !int8 && k.fmt == QFormat::kNone &&
      (v_in_k >= 0 || v.fmt == QFormat::kNone) && rp <= std::min<int64_t>(kDirectMaxRows, 2 * W) &&
      kDirectTiles * rp <= dv + kTilePad) {
    const DType vdt = v_in_k >= 0 ? k.dtype : v.dtype;
    const char* vbase = v_in_k >= 0 ? static_cast<const char*>(k.data) + v_in_k * DTypeBytes(k.dtype)
                                    : static_cast<const char*>(v.data);
    const int64_t vrb = v_in_k >= 0 ? k.row_bytes : v.row_bytes;
    switch (k.dtype) {
      case DType::kF32: AttendDirectV<DType::kF32>(vdt, rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end); break;
      case DType::kF16: AttendDirectV<DType::kF16>(vdt, rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end); break;
      case DType::kBF16: AttendDirectV<DType::kBF16>(vdt, rows, w, rp, k, vbase, vrb, dk, dv, kv_begin, kv_end); break;
    }
    for (int64_t r = 0; r < R; ++r) {
      rows.m[r] = w.m[r];
      rows.l[r] = w.l[r];
    }
    return;
  }
  // 8-bit V rounds P (quant_format.h) and multiplies it with V's int8 values:
  // on VNNI as packed bytes, else as floats; its scales go to w.vd.
  const bool qpv = RoundsProbabilities(v.fmt);
  const int64_t nbv = (dv + kQBlock - 1) / kQBlock;
  [[maybe_unused]] int8_t* vp = reinterpret_cast<int8_t*>(w.vt);        // VNNI: [4, T / 4, 64] bytes
  [[maybe_unused]] uint32_t* pqd = reinterpret_cast<uint32_t*>(w.pq);  // [nbv, T / 4, rp]
  // V inside the K rows (MLA): read it from the converted K tile.
  const bool v_from_k = v_in_k >= 0 && !int8 && !qpv;
  const float* vtile = v_from_k ? w.kt + v_in_k : w.vt;
  const int64_t vstride = v_from_k ? dk : dv + kTilePad;

  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += T) {
    // Keys past the block's largest end are never read: they may lie past
    // kv_len and hold anything. Padding rows of the tile are zeros.
    const int64_t tn = std::min(T, kv_end - t0);
    for (int64_t t = 0; t < tn; ++t) {
      if (!int8) RowToFloat(k, t0 + t, w.kt + t * dk, dk);
      if (qpv) {
        VScales(v, t0 + t, nbv, w.vd + t * nbv);
        if (!kInt8Pv && !kInt16Pv) RowInt8ToFloat(v, t0 + t, w.vt + t * vstride, dv);
      } else if (!v_from_k) {
        RowToFloat(v, t0 + t, w.vt + t * vstride, dv);
      }
    }
    if (tn < T && !int8) std::fill(w.kt + tn * dk, w.kt + T * dk, 0.f);
    for (int64_t r = 0; r < rp; ++r)
      w.cnt[r] = r < R ? float(std::clamp<int64_t>(rows.end[r] - t0, 0, tn)) : 0.f;

    if (int8) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      // Sub-tiles of kInt8Keys keys, packed just before use so they stay in
      // L1 (the tile's score rows past tn up to the sub-tile's end are
      // written and never read).
      for (int64_t t = 0; t < tn; t += kInt8Keys) {
        PrepareInt8Keys(k, t0 + t, std::min<int64_t>(kInt8Keys, tn - t), dk, kp, kd);
        for (int64_t r0 = 0; r0 < rp; r0 += W) QkInt8(qi, qd, qc, rp, r0, kp, dk, kd, w.st + t * rp);
      }
#elif defined(__AVX2__)
      // Sub-tiles of kInt16SubKeys keys (the tile's scores rows past tn up
      // to the sub-tile's end are written and never read).
      for (int64_t ts = 0; ts < tn; ts += kInt16SubKeys) {
        const int64_t n = std::min(kInt16SubKeys, tn - ts);
        PrepareInt16Keys(k, t0 + ts, n, dk, kw, kd);
        float* st = w.st + ts * rp;
        for (int64_t t = 0; t < n; t += 4) {
          int64_t r0 = 0;
          for (; r0 + 2 * W <= rp; r0 += 2 * W) QkInt16Rows16(qw, qd, rp, r0, kw, t, dk, kd, st);
          if (r0 < rp) QkInt16(qw, qd, rp, r0, kw, t, dk, kd, st);
        }
      }
#endif
    } else if (rp == W) {
      // One row vector: more keys per block keep the FMA units busy.
      constexpr int KB = simd::kQkKeys1;
      for (int64_t t = 0; t < tn; t += KB) QkLanes<1, KB>(w.qt, rp, w.kt, dk, w.st, t, 0);
    } else {
      constexpr int RV = simd::kQkRowVecs, KB = simd::kQkKeys;
      for (int64_t t = 0; t < tn; t += KB) {
        int64_t r0 = 0;
        for (; r0 + RV * W <= rp; r0 += RV * W) QkLanes<RV, KB>(w.qt, rp, w.kt, dk, w.st, t, r0);
        for (; r0 < rp; r0 += W) QkLanes<1, KB>(w.qt, rp, w.kt, dk, w.st, t, r0);
      }
    }

    Softmax(w, rp, tn);
    for (int64_t r = 0; r < R; ++r) {
      const float c = w.corr[r];
      if (c == 1.f) continue;
      float* o = rows.o + r * dv;
      for (int64_t d = 0; d < dv; d += W) simd::Mul(F32::Load(o + d), F32::Splat(c)).Store(o + d);
    }

    constexpr int RB = simd::kPvRows;
    int64_t r0 = 0;
    if (qpv) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      QuantizeProbsU8(w.st, rp, tn, w.vd, nbv, pqd, w.ps);
      PvInt8Tile(v, t0, tn, pqd, w.ps, rp, R, vp, rows.o, dv);
#elif defined(__AVX2__)
      QuantizeProbsI16(w.st, rp, tn, w.vd, nbv, pqd, w.ps);
      PvInt16Tile(v, t0, tn, pqd, w.ps, rp, R, reinterpret_cast<int16_t*>(w.vt), rows.o, dv);
#else
      QuantizeProbs(w.st, rp, tn, w.vd, nbv, w.pq, w.ps);
      for (; r0 + RB <= R; r0 += RB) PvQRows<RB>(w.pq, w.ps, rp, r0, w.vt, vstride, tn, rows.o, dv);
      for (; r0 < R; ++r0) PvQRows<1>(w.pq, w.ps, rp, r0, w.vt, vstride, tn, rows.o, dv);
#endif
      continue;
    }
    for (; r0 + RB <= R; r0 += RB) PvRows<RB>(w.st, rp, r0, vtile, vstride, tn, rows.o, dv);
    for (; r0 < R; ++r0) PvRows<1>(w.st, rp, r0, vtile, vstride, tn, rows.o, dv);
  }

  for (int64_t r = 0; r < R; ++r) {
    rows.m[r] = w.m[r];
    rows.l[r] = w.l[r];
  }
}

}  // namespace

extern const KernelTable kKernels;
const KernelTable kKernels = {JAX_MLA_STR(JAX_MLA_ISA), &Attend, &AttendHeadsAny, &AttendHeadsQ8,
                              &ToFloat, &Merge};

}  // namespace jax_mla::cpu::JAX_MLA_ISA
