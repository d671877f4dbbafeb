// The quantized cache formats (docs/formats.md, jax_mla/quant.py), as every backend
// reads them: storage sizes, scale types, the q6_0 block unpacking and the
// e4m3 value decoding. A
// cache in one of these formats arrives as two buffers, `qs` (the values) and
// `d` (the scales), quantized along the last axis.
#pragma once

#include <cmath>
#include <cstdint>

namespace jax_mla {

// Numbered as the Python wrappers pass them (the `*_fmt` attributes).
enum class QFormat : int64_t { kNone = 0, kQ8_0 = 1, kQ8KV = 2, kQ6_0 = 3, kFP8E4M3 = 4 };

inline constexpr int64_t kQBlock = 32;  // values per block of q8_0 and q6_0

inline bool IsValidQFormat(int64_t f) { return f >= 0 && f <= 4; }

inline const char* QFormatName(QFormat f) {
  switch (f) {
    case QFormat::kNone: return "float";
    case QFormat::kQ8_0: return "q8_0";
    case QFormat::kQ8KV: return "q8_kv";
    case QFormat::kQ6_0: return "q6_0";
    case QFormat::kFP8E4M3: return "fp8_e4m3";
  }
  return "?";
}

inline bool IsBlockFormat(QFormat f) { return f == QFormat::kQ8_0 || f == QFormat::kQ6_0; }

// Bytes of qs for n values (n a multiple of kQBlock for the block formats).
inline int64_t QsBytes(QFormat f, int64_t n) { return f == QFormat::kQ6_0 ? n * 3 / 4 : n; }

// q8_kv and fp8_e4m3 keep one float32 scale per row (per token, per KV head).
inline bool IsRowScaled(QFormat f) { return f == QFormat::kQ8KV || f == QFormat::kFP8E4M3; }

// Scales per row of n values: one per block, or one per row.
inline int64_t ScalesPerRow(QFormat f, int64_t n) { return IsRowScaled(f) ? 1 : n / kQBlock; }

// Scales are float16 for the block formats and float32 for the row-scaled ones.
inline int64_t ScaleBytes(QFormat f) { return IsRowScaled(f) ? 4 : 2; }

// fp8_e4m3 stores each value as an e4m3fn byte (sign, 4 exponent bits with
// bias 7, 3 mantissa bits; no infinities, NaN at 0x7F and 0xFF, largest
// finite 448) and the row as d * value, d = max|row| / 448. The value of one
// byte, exactly (every e4m3 value is a float32):
//   exponent e > 0: (1 + m / 8) * 2^(e - 7); e = 0: m / 8 * 2^-6.
// The vector paths use that the same bits shifted left by 7 are a float16
// of value * 2^-8, subnormals included.
inline float E4M3ToFloat(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 0x7;
  const float mag = (b & 0x7F) == 0x7F ? NAN
                    : e == 0           ? std::ldexp(float(m), -9)
                                       : std::ldexp(float(8 + m), e - 10);
  return b & 0x80 ? -mag : mag;
}

// Unpacks one q6_0 block (24 bytes) into its 32 signed values q - 32, in
// [-32, 31]. Byte layout (quant.py): bytes 0..15 hold the low nibbles, value
// j in the low half of byte j and value j + 16 in the high half; bytes
// 16..23 hold the high 2 bits, value j's (j < 16) in bits 4*(j/8)..+1 of byte
// 16 + j%8 and value j + 16's in the two bits above them.
inline void UnpackQ6Block(const uint8_t* block, int8_t* out) {
  for (int j = 0; j < 16; ++j) {
    const int h = (block[16 + j % 8] >> (4 * (j / 8))) & 0xF;
    out[j] = int8_t(((block[j] & 0xF) | ((h & 0x3) << 4)) - 32);
    out[j + 16] = int8_t(((block[j] >> 4) | ((h >> 2) << 4)) - 32);
  }
}

// Over 8-bit keys (q8_0, q8_kv) the kernels take the (scaled) query rows at 8
// bits too, so that Q.K can run on integer dot products: each block of 32
// values (the last one may be shorter) is replaced by d * q with q8_0's rule,
// the scale kept in float32: d = max|x| / 127, q = roundf(x * (1/d)) (0 when
// d = 0). Every backend and ISA path does this, so results do not depend on
// which one ran; the tests apply the same rounding to the reference's query.
inline bool QuantizesQueries(QFormat k_fmt) {
  return k_fmt == QFormat::kQ8_0 || k_fmt == QFormat::kQ8KV;
}

// roundf(v) for |v| < 2^29 as an integer, without a libm call (the drivers
// round every query value): v + 0.5 is exact in double, the cast truncates.
inline int32_t RoundHalfAway(float v) { return int32_t(double(v) + (v < 0.f ? -0.5 : 0.5)); }

inline void RoundQueryToQ8(float* x, int64_t n) {
  for (int64_t j = 0; j < n; j += kQBlock) {
    const int64_t m = n - j < kQBlock ? n - j : kQBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < m; ++i) amax = std::fmax(amax, std::fabs(x[j + i]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < m; ++i) x[j + i] = d * float(RoundHalfAway(x[j + i] * id));
  }
}

// Over 8-bit values (q8_0, q8_kv V) the CPU kernels also take the softmax
// weights P at 8 bits, so that P.V can run on integer dot products. V's scale
// is per key and block of 32 columns, so it is folded into P first: for each
// query row, each group of kPGroup keys (absolute positions [64 g, 64 g + 64),
// the kernels' key tiles) and each block j of 32 V columns (for q8_kv, whose
// scale is per key, every block gives the same values),
//   x_t = p_t * dv[t][j]            (p_t = exp(s_t - m) in [0, 1], float32)
//   d = max_t x_t / 255,  id = 1 / d,  q_t = round(x_t * id)
// (id = 0, so every q_t = 0, when max_t x_t < 2^-64: such weights are
// invisible next to the running max's, and 1 / d could overflow)
// with round half to even, q_t in [0, 255]; block j of the output gets
// d * sum_t q_t * vq[t] (the int8 values of V), and the softmax denominator
// stays the float sum of p. q_t does not depend on m (x_t / max x_t), so the
// result does not depend on the running max nor on the split boundaries
// (which fall on groups). reference.attention_quantized defines it in JAX.
inline constexpr int64_t kPGroup = 64;
inline constexpr float kPLevels = 255.f;

inline bool RoundsProbabilities(QFormat v_fmt) {
  return v_fmt == QFormat::kQ8_0 || v_fmt == QFormat::kQ8KV;
}

}  // namespace jax_mla
